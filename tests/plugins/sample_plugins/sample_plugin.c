/* A tiny backend plugin for the loader tests, written in C to prove a C compiler builds
 * plugins against moesh/plugin.h. tests/plugins/CMakeLists.txt compiles it once per case,
 * each case a different misbehaviour chosen by these macros:
 *
 *   SAMPLE_NAME          backend name in the table, a bare token (required)
 *   SAMPLE_SCORE         exported moesh_plugin_score returns it (no score symbol if unset)
 *   SAMPLE_WRONG_VERSION abi_version = MOESH_PLUGIN_ABI_VERSION + 1
 *   SAMPLE_SMALL_STRUCT  struct_size ends before the last required slot
 *   SAMPLE_HUGE_STRUCT   struct_size is garbage (0xFFFFFFFF)
 *   SAMPLE_NO_ATTENTION  leave the required attention slot NULL
 *   SAMPLE_NO_INIT       export a misnamed entry point instead of moesh_plugin_init
 *   SAMPLE_INIT_FAILS    init logs an error and returns MOESH_ERR_INTERNAL
 *   SAMPLE_NULL_TABLE    init returns OK without a table
 *   SAMPLE_CREATE_FAILS  create logs an error and returns MOESH_ERR_OUT_OF_MEMORY
 *   SAMPLE_HALF_ASYNC    offer copy_to_device_async without copy_wait
 *   SAMPLE_LONE_ELAPSED  offer copy_elapsed without the copy queue
 *   SAMPLE_OLD_TABLE     struct_size ends before copy_elapsed, as a plugin built before it
 *   SAMPLE_SAYS_YES      supports() answers 1 to everything, as plugins did for ops without
 *                        weights before attention/copy_rows read w_type as the KV type
 *
 * Kernels are trivial: matmul checks its arguments (struct_size, w_type) and returns OK, the
 * rest UNSUPPORTED.
 * Built with hidden visibility, so only the MOESH_PLUGIN_EXPORT entry points are visible. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesh/plugin.h"

#ifndef SAMPLE_NAME
#error "SAMPLE_NAME must be defined"
#endif
#define SAMPLE_STR2(x) #x
#define SAMPLE_STR(x) SAMPLE_STR2(x)

#if defined(SAMPLE_WRONG_VERSION)
#define SAMPLE_ABI_VERSION (MOESH_PLUGIN_ABI_VERSION + 1u)
#else
#define SAMPLE_ABI_VERSION MOESH_PLUGIN_ABI_VERSION
#endif

#if defined(SAMPLE_SMALL_STRUCT)
#define SAMPLE_STRUCT_SIZE offsetof(moesh_backend_iface, attention)
#elif defined(SAMPLE_OLD_TABLE)
#define SAMPLE_STRUCT_SIZE offsetof(moesh_backend_iface, copy_elapsed)
#elif defined(SAMPLE_HUGE_STRUCT)
#define SAMPLE_STRUCT_SIZE 0xFFFFFFFFu
#else
#define SAMPLE_STRUCT_SIZE sizeof(moesh_backend_iface)
#endif

struct moesh_backend {
    const moesh_host_api * host;
    int32_t n_threads;
    char error[128];
};

static moesh_status fail(moesh_backend * be, moesh_status s, const char * msg) {
    snprintf(be->error, sizeof be->error, "%s", msg);
    return s;
}

static void host_log(const moesh_host_api * host, int32_t level, const char * msg) {
    if (host && host->struct_size >= sizeof(moesh_host_api) && host->log) {
        host->log(host->ctx, level, msg);
    }
}

static moesh_status sample_create(const moesh_backend_params * params,
                                  const moesh_host_api * host, moesh_backend ** out) {
    moesh_backend * be;
    char msg[64];
    if (!params || !out) return MOESH_ERR_INVALID_ARGUMENT;
#ifdef SAMPLE_CREATE_FAILS
    host_log(host, MOESH_LOG_ERROR, "device is busy");
    return MOESH_ERR_OUT_OF_MEMORY;
#endif
    be = (moesh_backend *)calloc(1, sizeof *be);
    if (!be) return MOESH_ERR_OUT_OF_MEMORY;
    be->host = host;
    be->n_threads = params->n_threads;
    snprintf(msg, sizeof msg, "created with n_threads=%d", (int)params->n_threads);
    host_log(host, MOESH_LOG_INFO, msg);
    *out = be;
    return MOESH_OK;
}

static void sample_destroy(moesh_backend * be) {
    if (be) host_log(be->host, MOESH_LOG_INFO, "destroyed");
    free(be);
}

static const char * sample_last_error(moesh_backend * be) { return be ? be->error : ""; }

static moesh_status sample_memory_info(moesh_backend * be, uint64_t * free_bytes,
                                       uint64_t * total_bytes) {
    if (!free_bytes || !total_bytes) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "NULL output");
    *free_bytes = 1u << 20;
    *total_bytes = 1u << 20;
    return MOESH_OK;
}

static moesh_status sample_buffer_alloc(moesh_backend * be, size_t n_bytes, void ** out) {
    if (!out) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "NULL output");
    *out = malloc(n_bytes ? n_bytes : 1);
    return *out ? MOESH_OK : fail(be, MOESH_ERR_OUT_OF_MEMORY, "malloc failed");
}

static void sample_buffer_free(moesh_backend * be, void * ptr) { free(ptr); }

static moesh_status sample_copy(moesh_backend * be, void * dst, const void * src, size_t n) {
    if (n && (!dst || !src)) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "NULL pointer");
    if (n) memcpy(dst, src, n);
    return MOESH_OK;
}

static moesh_status sample_synchronize(moesh_backend * be) { return MOESH_OK; }

static int32_t sample_supports(moesh_backend * be, int32_t op, int32_t w_type) {
#ifdef SAMPLE_SAYS_YES
    return 1;
#else
    return op == MOESH_OP_MATMUL && w_type == MOESH_DTYPE_F32;
#endif
}

static moesh_status sample_matmul(moesh_backend * be, const moesh_matmul_args * args) {
    if (!args) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "matmul args is NULL");
    if (args->struct_size < sizeof(moesh_matmul_args)) {
        char msg[96];
        snprintf(msg, sizeof msg, "moesh_matmul_args struct_size %u is smaller than its v1 size %u",
                 (unsigned)args->struct_size, (unsigned)sizeof(moesh_matmul_args));
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, msg);
    }
    if (args->w_type != MOESH_DTYPE_F32) return fail(be, MOESH_ERR_UNSUPPORTED, "only f32");
    return MOESH_OK;
}

static moesh_status sample_rms_norm(moesh_backend * be, const moesh_rms_norm_args * args) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "rms_norm is not offered");
}

static moesh_status sample_rope(moesh_backend * be, const moesh_rope_args * args) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "rope is not offered");
}

static moesh_status sample_expert_ffn(moesh_backend * be, const moesh_expert_ffn_args * args) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "expert_ffn is not offered");
}

static moesh_status sample_softmax(moesh_backend * be, const moesh_softmax_args * args) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "softmax is not offered");
}

#ifdef SAMPLE_HALF_ASYNC
static moesh_status sample_copy_async(moesh_backend * be, void * dst, const void * src, size_t n, uint64_t * ticket) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "copy_to_device_async is not offered");
}
#endif

#ifdef SAMPLE_LONE_ELAPSED
static moesh_status sample_copy_elapsed(moesh_backend * be, uint64_t ticket, double * seconds) {
    return fail(be, MOESH_ERR_INVALID_ARGUMENT, "no copy was ever queued");
}
#endif

#ifndef SAMPLE_NO_ATTENTION
static moesh_status sample_attention(moesh_backend * be, const moesh_attention_args * args) {
    return fail(be, MOESH_ERR_UNSUPPORTED, "attention is not offered");
}
#endif

static const moesh_backend_iface sample_iface = {
    /* .abi_version    = */ SAMPLE_ABI_VERSION,
    /* .struct_size    = */ (uint32_t)(SAMPLE_STRUCT_SIZE),
    /* .name           = */ SAMPLE_STR(SAMPLE_NAME),
    /* .host_memory    = */ 1,
    /* .create         = */ sample_create,
    /* .destroy        = */ sample_destroy,
    /* .last_error     = */ sample_last_error,
    /* .memory_info    = */ sample_memory_info,
    /* .buffer_alloc   = */ sample_buffer_alloc,
    /* .buffer_free    = */ sample_buffer_free,
    /* .copy_to_device = */ sample_copy,
    /* .copy_to_host   = */ sample_copy,
    /* .synchronize    = */ sample_synchronize,
    /* .supports       = */ sample_supports,
    /* .matmul         = */ sample_matmul,
    /* .rms_norm       = */ sample_rms_norm,
    /* .rope           = */ sample_rope,
    /* .expert_ffn     = */ sample_expert_ffn,
    /* .softmax        = */ sample_softmax,
#ifdef SAMPLE_NO_ATTENTION
    /* .attention      = */ NULL,
#else
    /* .attention      = */ sample_attention,
#endif
    /* .packed_size    = */ NULL,   /* optional: this plugin does not pack */
    /* .pack_weights   = */ NULL,
    /* .copy_rows      = */ NULL,   /* optional: without it no forward pass runs here */
    /* .moe_ffn        = */ NULL,   /* optional */
    /* .attention_batch = */ NULL,
#ifdef SAMPLE_HALF_ASYNC
    /* .copy_to_device_async = */ sample_copy_async,
#else
    /* .copy_to_device_async = */ NULL,
#endif
    /* .copy_wait = */ NULL,
#ifdef SAMPLE_LONE_ELAPSED
    /* .copy_elapsed = */ sample_copy_elapsed,
#else
    /* .copy_elapsed = */ NULL,
#endif
};

/* Not an entry point: hidden visibility keeps it out of the dynamic symbol table. */
int sample_internal_helper(void) { return 42; }

#ifdef SAMPLE_NO_INIT
#define SAMPLE_INIT_SYMBOL moesh_plugin_initialize /* close, but not the name the host looks up */
#else
#define SAMPLE_INIT_SYMBOL moesh_plugin_init
#endif

MOESH_PLUGIN_EXPORT moesh_status SAMPLE_INIT_SYMBOL(const moesh_host_api * host,
                                                    const moesh_backend_iface ** out) {
    if (!out) return MOESH_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!host || host->abi_version != MOESH_PLUGIN_ABI_VERSION) return MOESH_ERR_ABI_MISMATCH;
#if defined(SAMPLE_INIT_FAILS)
    (void)sample_iface;
    host_log(host, MOESH_LOG_ERROR, "no usable device found");
    return MOESH_ERR_INTERNAL;
#elif defined(SAMPLE_NULL_TABLE)
    (void)sample_iface;
    return MOESH_OK;
#else
    *out = &sample_iface;
    return MOESH_OK;
#endif
}

#ifdef SAMPLE_SCORE
MOESH_PLUGIN_EXPORT int32_t moesh_plugin_score(void) { return SAMPLE_SCORE; }
#endif
