/* moesh backend plugin ABI (pure C).
 *
 * A backend plugin is a shared library that exports one entry point:
 *
 *     moesh_status moesh_plugin_init(const moesh_host_api * host,
 *                                    const moesh_backend_iface ** out);
 *
 * and optionally `int32_t moesh_plugin_score(void)` (higher = preferred when
 * several plugins are found; a negative score means "cannot run here").
 * The host loads it with dlopen, calls init, then checks `abi_version`,
 * `struct_size` and every required slot before use. Members of every table are
 * only ever appended; optional slots say since which ABI version they exist.
 *
 * Usage (host side):
 *     const moesh_backend_iface * be; moesh_backend * ctx;
 *     init(&host, &be);                         // table is static, never freed
 *     moesh_backend_params p = { sizeof p, 2 };  // 2 threads
 *     be->create(&p, &host, &ctx);
 *     be->matmul(ctx, &args);
 *     be->destroy(ctx);
 *
 * Thread safety: a moesh_backend context is used by one host thread at a time;
 * the plugin may use its own worker threads inside a call. Calls are
 * synchronous unless the backend documents streams (CUDA: `synchronize`).
 * Memory: whoever allocates frees. No C++ exception may cross this boundary.
 */
#ifndef MOESH_PLUGIN_H
#define MOESH_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOESH_PLUGIN_ABI_VERSION 1u

#if defined(_WIN32)
#define MOESH_PLUGIN_EXPORT __declspec(dllexport)
#else
#define MOESH_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

typedef enum moesh_status {
    MOESH_OK = 0,
    MOESH_ERR_INVALID_ARGUMENT = 1,
    MOESH_ERR_UNSUPPORTED = 2,   /* op/format combination not offered */
    MOESH_ERR_OUT_OF_MEMORY = 3,
    MOESH_ERR_INTERNAL = 4,
    MOESH_ERR_ABI_MISMATCH = 5
} moesh_status;

/* Element types. Values are stable across ABI versions. */
typedef enum moesh_dtype {
    MOESH_DTYPE_F32 = 0,
    MOESH_DTYPE_F16 = 1,
    MOESH_DTYPE_BF16 = 2,
    MOESH_DTYPE_COUNT_V1 = 3
} moesh_dtype;

typedef enum moesh_op {
    MOESH_OP_MATMUL = 0,
    MOESH_OP_RMS_NORM = 1,
    MOESH_OP_ROPE = 2,
    MOESH_OP_EXPERT_FFN = 3,
    MOESH_OP_SOFTMAX = 4,
    MOESH_OP_ATTENTION = 5,
    MOESH_OP_COUNT_V1 = 6
} moesh_op;

typedef enum moesh_log_level {
    MOESH_LOG_DEBUG = 0,
    MOESH_LOG_INFO = 1,
    MOESH_LOG_WARN = 2,
    MOESH_LOG_ERROR = 3
} moesh_log_level;

/* What the host offers the plugin. */
typedef struct moesh_host_api {
    uint32_t abi_version;   /* MOESH_PLUGIN_ABI_VERSION of the host */
    uint32_t struct_size;   /* sizeof(moesh_host_api) of the host */
    void * ctx;
    void (*log)(void * ctx, moesh_log_level level, const char * msg);
} moesh_host_api;

typedef struct moesh_backend_params {
    uint32_t struct_size;   /* sizeof(moesh_backend_params) of the host */
    int32_t n_threads;      /* <= 0: plugin decides */
} moesh_backend_params;

typedef struct moesh_backend moesh_backend; /* opaque, owned by the plugin */

/* y[n_tokens, n_out] = x[n_tokens, n_in] . W[n_out, n_in]^T (+ bias[n_out]).
 * Rows of x and y are contiguous with the given strides (in elements). */
typedef struct moesh_matmul_args {
    const void * w;         /* [n_out, n_in] of w_type, row-major */
    moesh_dtype w_type;
    const float * bias;     /* [n_out] or NULL */
    const float * x;        /* [n_tokens, x_stride] */
    float * y;              /* [n_tokens, y_stride] */
    int64_t n_in;
    int64_t n_out;
    int64_t n_tokens;
    int64_t x_stride;       /* >= n_in */
    int64_t y_stride;       /* >= n_out */
} moesh_matmul_args;

/* y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight[:]; in place allowed. */
typedef struct moesh_rms_norm_args {
    const float * x;        /* [n_rows, n] contiguous */
    const float * weight;   /* [n] */
    float * y;              /* [n_rows, n] */
    int64_t n;
    int64_t n_rows;
    float eps;
} moesh_rms_norm_args;

typedef enum moesh_rope_mode {
    MOESH_ROPE_NEOX = 0,    /* rotate-half: pairs (i, i + rot_dim/2), as in HF */
    MOESH_ROPE_NORM = 1     /* adjacent pairs (2i, 2i+1) */
} moesh_rope_mode;

/* In place: x[t, h, 0:rot_dim] rotated by angle pos[t] * inv_freq[i];
 * cos/sin are multiplied by attn_factor (YaRN). Dims past rot_dim untouched. */
typedef struct moesh_rope_args {
    float * x;              /* [n_tokens, n_head, head_dim] contiguous */
    const int32_t * pos;    /* [n_tokens] */
    const float * inv_freq; /* [rot_dim / 2] */
    int64_t n_tokens;
    int64_t n_head;
    int64_t head_dim;
    int64_t rot_dim;        /* even, <= head_dim */
    float attn_factor;      /* 1.0 unless the scaling variant says otherwise */
    moesh_rope_mode mode;
} moesh_rope_args;

/* SiLU-gated FFN of one expert over the tokens routed to it:
 *   out[t, :] += scale[t] * down( silu(gate . x[t]) * (up . x[t]) )
 * (scale == NULL means 1). gate/up are [n_ff, n_embd], down is [n_embd, n_ff],
 * all of w_type. scratch must hold 2 * n_tokens * n_ff floats. */
typedef struct moesh_expert_ffn_args {
    const void * gate;      /* [n_ff, n_embd] */
    const void * up;        /* [n_ff, n_embd] */
    const void * down;      /* [n_embd, n_ff] */
    moesh_dtype w_type;
    const float * x;        /* [n_tokens, n_embd] contiguous */
    const float * scale;    /* [n_tokens] or NULL */
    float * out;            /* [n_tokens, n_embd] accumulated into */
    float * scratch;        /* [2, n_tokens, n_ff] */
    int64_t n_embd;
    int64_t n_ff;
    int64_t n_tokens;
} moesh_expert_ffn_args;

/* Row-wise softmax in place, in float32. */
typedef struct moesh_softmax_args {
    float * x;              /* [n_rows, n] */
    int64_t n;
    int64_t n_rows;
} moesh_softmax_args;

/* Causal attention of n_tokens queries of ONE sequence against that sequence's
 * paged KV cache. Query t attends cache positions 0..pos[t] inclusive. The
 * cache position p lives in block block_table[p / block_size], row p % block_size.
 * Grouped-query: query head h reads kv head h / (n_head / n_head_kv). */
typedef struct moesh_attention_args {
    const float * q;            /* [n_tokens, n_head, head_dim] */
    const float * k_pool;       /* [n_blocks, block_size, n_head_kv, head_dim] */
    const float * v_pool;       /* [n_blocks, block_size, n_head_kv, head_dim] */
    const int32_t * block_table;/* [ceil(n_kv / block_size)] */
    const int32_t * pos;        /* [n_tokens], each < n_kv */
    float * out;                /* [n_tokens, n_head, head_dim] */
    int64_t n_tokens;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t block_size;
    int64_t n_kv;               /* cache positions filled for this sequence */
    float scale;                /* usually 1/sqrt(head_dim) */
} moesh_attention_args;

/* The function table. Every slot is required unless marked optional. */
typedef struct moesh_backend_iface {
    uint32_t abi_version;   /* MOESH_PLUGIN_ABI_VERSION the plugin was built for */
    uint32_t struct_size;   /* sizeof(moesh_backend_iface) of the plugin */
    const char * name;      /* "cpu", "cuda", ... */
    /* nonzero when kernels accept host pointers (e.g. mmap'd weights) directly */
    int32_t host_memory;

    moesh_status (*create)(const moesh_backend_params * params,
                           const moesh_host_api * host, moesh_backend ** out);
    void (*destroy)(moesh_backend * be);
    /* last error message of this context (valid until the next call), never NULL */
    const char * (*last_error)(moesh_backend * be);

    moesh_status (*memory_info)(moesh_backend * be, uint64_t * free_bytes, uint64_t * total_bytes);
    moesh_status (*buffer_alloc)(moesh_backend * be, size_t n_bytes, void ** out);
    void (*buffer_free)(moesh_backend * be, void * ptr);
    moesh_status (*copy_to_device)(moesh_backend * be, void * dst, const void * src, size_t n_bytes);
    moesh_status (*copy_to_host)(moesh_backend * be, void * dst, const void * src, size_t n_bytes);
    moesh_status (*synchronize)(moesh_backend * be);

    /* 1 when op is offered for weights of w_type (w_type ignored for
     * ops without weights), 0 otherwise. */
    int32_t (*supports)(moesh_backend * be, moesh_op op, moesh_dtype w_type);

    moesh_status (*matmul)(moesh_backend * be, const moesh_matmul_args * args);
    moesh_status (*rms_norm)(moesh_backend * be, const moesh_rms_norm_args * args);
    moesh_status (*rope)(moesh_backend * be, const moesh_rope_args * args);
    moesh_status (*expert_ffn)(moesh_backend * be, const moesh_expert_ffn_args * args);
    moesh_status (*softmax)(moesh_backend * be, const moesh_softmax_args * args);
    moesh_status (*attention)(moesh_backend * be, const moesh_attention_args * args);
    /* append new members below this line only */
} moesh_backend_iface;

typedef moesh_status (*moesh_plugin_init_fn)(const moesh_host_api * host,
                                             const moesh_backend_iface ** out);
typedef int32_t (*moesh_plugin_score_fn)(void);

#define MOESH_PLUGIN_INIT_SYMBOL "moesh_plugin_init"
#define MOESH_PLUGIN_SCORE_SYMBOL "moesh_plugin_score"

#ifdef __cplusplus
}
#endif

#endif /* MOESH_PLUGIN_H */
