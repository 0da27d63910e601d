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
 * `struct_size` and every required slot before use.
 *
 * Usage (host side):
 *     const moesh_backend_iface * be; moesh_backend * ctx;
 *     init(&host, &be);                         // table is static, never freed
 *     moesh_backend_params p = { sizeof p, 2, MOESH_ACTIVATIONS_FAST };  // 2 threads
 *     be->create(&p, &host, &ctx);
 *     moesh_matmul_args a = {0};
 *     a.struct_size = sizeof a;                  // then the other members
 *     be->matmul(ctx, &a);
 *     be->destroy(ctx);
 *
 * The rules:
 *
 * Types. No C enum is stored in a struct or passed across the boundary (its
 *   size is up to the compiler, and C++ may not hold a value outside its
 *   enumerators): those members and parameters are int32_t, and the enums
 *   below only name their values, which never change. A plugin must handle
 *   any int32_t there (an unknown dtype, op or rope mode is
 *   MOESH_ERR_UNSUPPORTED, or 0 from supports). No argument struct has
 *   padding: the 4-byte members come first, and `reserved` members fill the
 *   gaps (must be 0; a plugin rejects other values, so that a later ABI may
 *   give them a meaning).
 *
 * Versions. The host accepts a plugin whose abi_version equals its own
 *   MOESH_PLUGIN_ABI_VERSION; a plugin accepts a host whose abi_version is at
 *   least its own. Members are only ever appended, never moved, resized or
 *   removed. Every table and argument struct carries its struct_size, the
 *   sizeof of the side that filled it in. A slot appended to
 *   moesh_backend_iface is marked `// optional, since ABI vN`, and the host
 *   reads it as NULL when the plugin's struct_size does not cover it. A plugin
 *   rejects an argument struct whose struct_size is less than that struct's
 *   v1 size (MOESH_ERR_INVALID_ARGUMENT), and reads a member appended later
 *   only when struct_size covers it.
 *
 * Memory. Every data pointer in an argument struct (weights, activations,
 *   outputs, scratch, and also bias, scale, pos, inv_freq, block_table) must
 *   be memory the backend can address: for a backend whose table says
 *   host_memory, any host pointer; otherwise a buffer from its buffer_alloc
 *   (or a place inside one). The argument struct itself is ordinary host
 *   memory, read during the call only. Whoever allocates frees.
 *
 * Aliasing. No output may overlap an input or another output, except:
 *   rms_norm y == x (in place; no partial overlap); rope and softmax work in
 *   place on x; expert_ffn out == x (in place; no partial overlap). Any other
 *   overlap is undefined; the CPU plugin rejects the ones it checks (matmul y
 *   with x, rms_norm and expert_ffn partial overlaps, expert_ffn scratch with
 *   x or out) with MOESH_ERR_INVALID_ARGUMENT.
 *
 * Lifetime. The host api table stays valid, at the same address, until the
 *   host unloads the library; a plugin may keep the pointer it got in init or
 *   create. The backend table returned by init stays valid while the library
 *   is loaded. Data pointed to by an argument struct must stay valid until
 *   the op has completed (the call returns, or `synchronize` for a backend
 *   that runs asynchronously).
 *
 * Errors. Every status-returning entry returns MOESH_OK (0) or an error code;
 *   once a context exists, last_error says why. init and create have no
 *   context to hold a message: they report failure detail through host->log
 *   at MOESH_LOG_ERROR.
 *
 * Thread safety: a moesh_backend context is used by one host thread at a time;
 * the plugin may use its own worker threads inside a call. Calls are
 * synchronous unless the backend documents streams (CUDA: `synchronize`).
 * No C++ exception may cross this boundary.
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

/* Status of every call: MOESH_OK (0) or one of the errors below. A host
 * must expect values it does not know (a newer plugin's codes). */
typedef int32_t moesh_status;
enum moesh_status_code {
    MOESH_OK = 0,
    MOESH_ERR_INVALID_ARGUMENT = 1,
    MOESH_ERR_UNSUPPORTED = 2,   /* op/format combination not offered */
    MOESH_ERR_OUT_OF_MEMORY = 3,
    MOESH_ERR_INTERNAL = 4,
    MOESH_ERR_ABI_MISMATCH = 5
};

/* Element types (the int32_t w_type members). Values are stable across ABI
 * versions; they are moesh's own, not ggml type ids.
 *
 * The block types have GGUF's (ggml's) block layouts, little-endian, IEEE
 * fp16 scales; blocks need no alignment. 32-element blocks:
 *   Q8_0, 34 bytes: d, int8 q[32];  element i = d * q[i]
 *   Q4_0, 18 bytes: d, uint8 qs[16]; element i = d * (nibble(i) - 8), where
 *                   elements 0..15 are the low nibbles of qs[0..15] and
 *                   elements 16..31 the high nibbles.
 *   Q4_1, 20 bytes: d, m, uint8 qs[16]; element i = d * nibble(i) + m.
 * 256-element super-blocks (ggml's K-quants; bit layouts in ggml-common.h,
 * restated in moesh's experts/quant.h):
 *   Q4_K, 144 bytes: d, dmin, scales[12] (8 x 6-bit scale and min), qs[128]
 *   Q5_K, 176 bytes: as Q4_K plus qh[32], the fifth bit
 *   Q6_K, 210 bytes: ql[128], qh[64], int8 scales[16], d (last)
 * A weight row of n_in elements (n_ff for expert_ffn's down, n_embd for gate
 * and up) is n_in / block-size consecutive blocks, rows one after the other
 * with no padding; a row length that is not a multiple of the block size is
 * MOESH_ERR_INVALID_ARGUMENT. Activations and outputs stay float32. Which
 * weight types a backend offers for which op is what supports() answers
 * (MOESH_ERR_UNSUPPORTED otherwise). MOESH_DTYPE_COUNT_V1 keeps its value: the
 * number of the first (non-block) types, from before the block types. */
typedef enum moesh_dtype {
    MOESH_DTYPE_F32 = 0,
    MOESH_DTYPE_F16 = 1,
    MOESH_DTYPE_BF16 = 2,
    MOESH_DTYPE_COUNT_V1 = 3,
    MOESH_DTYPE_Q8_0 = 3,   /* 34-byte blocks of 32 elements */
    MOESH_DTYPE_Q4_0 = 4,   /* 18-byte blocks of 32 elements */
    MOESH_DTYPE_Q4_1 = 5,   /* 20-byte blocks of 32 elements */
    MOESH_DTYPE_Q4_K = 6,   /* 144-byte blocks of 256 elements */
    MOESH_DTYPE_Q5_K = 7,   /* 176-byte blocks of 256 elements */
    MOESH_DTYPE_Q6_K = 8    /* 210-byte blocks of 256 elements */
} moesh_dtype;

/* Packed weights: w_type = (block type) | MOESH_DTYPE_PACKED says that a weight
 * pointer holds what this backend's pack_weights wrote from a matrix of that
 * block type (its own layout, e.g. rows interleaved for its SIMD kernels),
 * not the GGUF layout. supports(op, t | MOESH_DTYPE_PACKED) says which ops
 * take them; a packed matrix is only valid with the shape it was packed for. */
#define MOESH_DTYPE_PACKED 0x100

/* Elements per block of MOESH_DTYPE_Q8_0, Q4_0 and Q4_1. */
#define MOESH_QK_BLOCK 32
/* Elements per super-block of MOESH_DTYPE_Q4_K, Q5_K and Q6_K. */
#define MOESH_QK_K 256

/* Ops (the int32_t op parameter of supports). */
typedef enum moesh_op {
    MOESH_OP_MATMUL = 0,
    MOESH_OP_RMS_NORM = 1,
    MOESH_OP_ROPE = 2,
    MOESH_OP_EXPERT_FFN = 3,
    MOESH_OP_SOFTMAX = 4,
    MOESH_OP_ATTENTION = 5,
    MOESH_OP_COUNT_V1 = 6,  /* the ops of the first table; later ones follow */
    MOESH_OP_COPY_ROWS = 6,
    MOESH_OP_MOE_FFN = 7
} moesh_op;

/* Levels of host->log. */
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
    void (*log)(void * ctx, int32_t level /* moesh_log_level */, const char * msg);
} moesh_host_api;

/* Values of moesh_backend_params.activations: how a backend may round the
 * float32 activations it multiplies with block (quantized) weights. */
typedef enum moesh_activations {
    MOESH_ACTIVATIONS_FAST = 0,    /* 8 bits per value (a scale per block), as llama.cpp does */
    MOESH_ACTIVATIONS_PRECISE = 1  /* error at least 100x smaller than FAST (e.g. two 8-bit passes) */
} moesh_activations;

typedef struct moesh_backend_params {
    uint32_t struct_size;   /* sizeof(moesh_backend_params) of the host */
    int32_t n_threads;      /* <= 0: plugin decides */
    int32_t activations;    /* moesh_activations; absent (older host) = FAST */
} moesh_backend_params;

typedef struct moesh_backend moesh_backend; /* opaque, owned by the plugin */

/* y[n_tokens, n_out] = x[n_tokens, n_in] . W[n_out, n_in]^T (+ bias[n_out]).
 * Rows of x and y are contiguous with the given strides (in elements).
 * y must not overlap x, w or bias. */
typedef struct moesh_matmul_args {
    uint32_t struct_size;   /* sizeof(moesh_matmul_args) of the caller */
    int32_t w_type;         /* moesh_dtype */
    const void * w;         /* [n_out, n_in] of w_type, row-major */
    const float * bias;     /* [n_out] or NULL */
    const float * x;        /* [n_tokens, x_stride] */
    float * y;              /* [n_tokens, y_stride] */
    int64_t n_in;
    int64_t n_out;
    int64_t n_tokens;
    int64_t x_stride;       /* >= n_in */
    int64_t y_stride;       /* >= n_out */
} moesh_matmul_args;

/* y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight[:].
 * y == x (in place) is allowed; any other overlap is not. */
typedef struct moesh_rms_norm_args {
    uint32_t struct_size;   /* sizeof(moesh_rms_norm_args) of the caller */
    float eps;              /* finite, >= 0 */
    const float * x;        /* [n_rows, n] contiguous */
    const float * weight;   /* [n] */
    float * y;              /* [n_rows, n] */
    int64_t n;
    int64_t n_rows;
} moesh_rms_norm_args;

/* Values of moesh_rope_args.mode. */
typedef enum moesh_rope_mode {
    MOESH_ROPE_NEOX = 0,    /* rotate-half: pairs (i, i + rot_dim/2), as in HF */
    MOESH_ROPE_NORM = 1     /* adjacent pairs (2i, 2i+1) */
} moesh_rope_mode;

/* In place: x[t, h, 0:rot_dim] rotated by angle pos[t] * inv_freq[i];
 * cos/sin are multiplied by attn_factor (YaRN). Dims past rot_dim untouched. */
typedef struct moesh_rope_args {
    uint32_t struct_size;   /* sizeof(moesh_rope_args) of the caller */
    int32_t mode;           /* moesh_rope_mode */
    float attn_factor;      /* 1.0 unless the scaling variant says otherwise */
    uint32_t reserved;      /* 0 */
    float * x;              /* [n_tokens, n_head, head_dim] contiguous */
    const int32_t * pos;    /* [n_tokens] */
    const float * inv_freq; /* [rot_dim / 2] */
    int64_t n_tokens;
    int64_t n_head;
    int64_t head_dim;
    int64_t rot_dim;        /* even, <= head_dim */
} moesh_rope_args;

/* SiLU-gated FFN of one expert over the tokens routed to it:
 *   out[t, :] += scale[t] * down( silu(gate . x[t]) * (up . x[t]) )
 * (scale == NULL means 1). gate/up are [n_ff, n_embd], down is [n_embd, n_ff],
 * all of w_type. scratch must hold 2 * n_tokens * n_ff floats; its contents
 * on return are unspecified. out == x is allowed (x is read in full before
 * out is written); any other overlap of out, x and scratch is not. */
typedef struct moesh_expert_ffn_args {
    uint32_t struct_size;   /* sizeof(moesh_expert_ffn_args) of the caller */
    int32_t w_type;         /* moesh_dtype */
    const void * gate;      /* [n_ff, n_embd] */
    const void * up;        /* [n_ff, n_embd] */
    const void * down;      /* [n_embd, n_ff] */
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
    uint32_t struct_size;   /* sizeof(moesh_softmax_args) of the caller */
    uint32_t reserved;      /* 0 */
    float * x;              /* [n_rows, n] */
    int64_t n;
    int64_t n_rows;
} moesh_softmax_args;

/* Causal attention of n_tokens queries of ONE sequence against that sequence's
 * paged KV cache. Query t attends cache positions 0..pos[t] inclusive. The
 * cache position p lives in block block_table[p / block_size], row p % block_size;
 * every entry of block_table is in [0, n_blocks).
 * Grouped-query: query head h reads kv head h / (n_head / n_head_kv).
 * out must not overlap any input. */
typedef struct moesh_attention_args {
    uint32_t struct_size;       /* sizeof(moesh_attention_args) of the caller */
    float scale;                /* usually 1/sqrt(head_dim) */
    const float * q;            /* [n_tokens, n_head, head_dim] */
    const void * k_pool;        /* [n_blocks, block_size, n_head_kv, head_dim] of kv_type */
    const void * v_pool;        /* [n_blocks, block_size, n_head_kv, head_dim] of kv_type */
    const int32_t * block_table;/* [ceil(n_kv / block_size)] */
    const int32_t * pos;        /* [n_tokens], each < n_kv */
    float * out;                /* [n_tokens, n_head, head_dim] */
    int64_t n_tokens;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t block_size;         /* cache positions per block */
    int64_t n_blocks;           /* blocks in k_pool and in v_pool */
    int64_t n_kv;               /* cache positions filled for this sequence */
    /* Appended in ABI v1 (a caller whose struct_size ends before them means F32): */
    int32_t kv_type;            /* MOESH_DTYPE_F32, MOESH_DTYPE_F16 or MOESH_DTYPE_Q8_0, as
                                   supports(ATTENTION) offers. Q8_0 needs head_dim a multiple of 32:
                                   a pool row of head_dim values is head_dim / 32 GGUF Q8_0 blocks of
                                   34 bytes (f16 scale d, 32 int8 q; value d * q), so element i of a
                                   pool lies in its block i / 32, at byte (i / 32) * 34 */
    uint32_t reserved2;         /* 0 */
} moesh_attention_args;

/* One sequence's run of query rows in an attention_batch call. */
typedef struct moesh_attention_run {
    int64_t first;          /* its rows are [first, first + n_tokens) of q, pos and out */
    int64_t n_tokens;
    int64_t table;          /* its block table starts at block_tables[table] */
    int64_t n_kv;           /* cache positions filled for its sequence */
} moesh_attention_run;

/* attention for several sequences in one call, so that a backend can share
 * the work of a decode step's many short queries out at once. Run r is the
 * attention call with q, pos and out advanced to row runs[r].first,
 * block_table = block_tables + runs[r].table, n_tokens and n_kv from the run,
 * and the other members from here; every rule of that call holds for it.
 * runs is host memory read during the call; runs come in ascending row order,
 * do not overlap and lie in [0, n_tokens); each run's block table lies in
 * [0, n_table). */
typedef struct moesh_attention_batch_args {
    uint32_t struct_size;       /* sizeof(moesh_attention_batch_args) of the caller */
    float scale;
    const float * q;            /* [n_tokens, n_head, head_dim] */
    const void * k_pool;        /* [n_blocks, block_size, n_head_kv, head_dim] of kv_type */
    const void * v_pool;        /* [n_blocks, block_size, n_head_kv, head_dim] of kv_type */
    const int32_t * block_tables;  /* [n_table] */
    const int32_t * pos;        /* [n_tokens] */
    float * out;                /* [n_tokens, n_head, head_dim] */
    const moesh_attention_run * runs;  /* [n_runs] */
    int64_t n_tokens;
    int64_t n_runs;
    int64_t n_table;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t block_size;
    int64_t n_blocks;
    /* Appended in ABI v1 (a caller whose struct_size ends before them means F32): */
    int32_t kv_type;            /* as moesh_attention_args.kv_type */
    uint32_t reserved2;         /* 0 */
} moesh_attention_batch_args;

/* Rows of float32 moved inside backend memory (written as f32, or as f16 into
 * an f16 KV cache: dst_type), for the host-side glue of a
 * forward pass on a device-memory backend (residual adds, gathering the
 * tokens of one expert and scattering its output back, KV cache writes,
 * clipping). For i in [0, n_rows), with s = src_rows ? src_rows[i] : i and
 * d = dst_rows ? dst_rows[i] : i:
 *   dst[d, 0:n_cols] = (accumulate ? dst[d, 0:n_cols] : 0) + (src ? src[s, 0:n_cols] : 0)
 * then, when clamp > 0, each written value is clamped to [-clamp, clamp].
 * Rows are src_stride / dst_stride elements apart. Every s must be in
 * [0, src_n_rows) and every d in [0, dst_n_rows): the index arrays live in
 * backend memory, so a backend that cannot check them before returning (an
 * asynchronous one) writes no row for a bad index and reports the error from
 * synchronize. dst_rows must not name a row twice. src == dst (in place) is
 * allowed when both index arrays are NULL and the strides are equal; no other
 * overlap is. */
typedef struct moesh_copy_rows_args {
    uint32_t struct_size;       /* sizeof(moesh_copy_rows_args) of the caller */
    int32_t accumulate;         /* 0: dst = src; 1: dst += src */
    float clamp;                /* > 0: clamp written values to [-clamp, clamp]; 0: no clamp */
    uint32_t reserved;          /* 0 */
    const float * src;          /* [src_n_rows, src_stride], or NULL for rows of zeros */
    void * dst;                 /* [dst_n_rows, dst_stride] of dst_type */
    const int32_t * src_rows;   /* [n_rows] or NULL (row i) */
    const int32_t * dst_rows;   /* [n_rows] or NULL (row i) */
    int64_t n_rows;
    int64_t n_cols;             /* <= src_stride and dst_stride */
    int64_t src_stride;
    int64_t dst_stride;
    int64_t src_n_rows;         /* rows src holds (bounds the indices) */
    int64_t dst_n_rows;         /* rows dst holds */
    /* Appended in ABI v1 (a caller whose struct_size ends before them means F32): */
    int32_t dst_type;           /* MOESH_DTYPE_F32, or MOESH_DTYPE_F16 (values rounded to nearest
                                   even; with accumulate, dst is read as f16, added in f32, rounded),
                                   or MOESH_DTYPE_Q8_0: n_cols and dst_stride multiples of 32 (strides
                                   still count values), accumulate 0; each 32 written values (after
                                   the clamp) become one block as GGUF quantizes Q8_0: d = max|x| / 127
                                   stored as f16, q = round(x / d), halves away from zero */
    uint32_t reserved2;         /* 0 */
} moesh_copy_rows_args;

/* One routed expert of a moe_ffn call: its weights (as in moesh_expert_ffn_args)
 * and its pairs, [first, first + n) of the call's token and weight arrays. */
typedef struct moesh_moe_expert {
    const void * gate;      /* [n_ff, n_embd] */
    const void * up;        /* [n_ff, n_embd] */
    const void * down;      /* [n_embd, n_ff] */
    int64_t first;
    int64_t n;              /* 0: the expert is skipped */
} moesh_moe_expert;

/* The routed experts of one MoE layer over a batch, in one call, so that a
 * backend can share its work out across experts at once (ggml's mul_mat_id,
 * with the FFN fused). For each expert e and each pair p of it:
 *   out[token[p]] += weight[p] * (down_e . (silu(gate_e . x[token[p]]) * (up_e . x[token[p]])))
 * The result equals expert_ffn over each expert's rows, experts in order.
 * experts is host memory read during the call; the experts' pair ranges come
 * in ascending order, do not overlap and lie in [0, n_pairs); every token is
 * in [0, n_tokens); all weights are of w_type. scratch holds n_pairs * n_ff
 * floats; its contents on return are unspecified. out must not overlap x or
 * scratch. */
typedef struct moesh_moe_ffn_args {
    uint32_t struct_size;       /* sizeof(moesh_moe_ffn_args) of the caller */
    int32_t w_type;             /* moesh_dtype */
    const moesh_moe_expert * experts;  /* [n_experts] */
    const int32_t * token;      /* [n_pairs] row of x and out */
    const float * weight;       /* [n_pairs] routing weight, or NULL (1) */
    const float * x;            /* [n_tokens, n_embd] contiguous */
    float * out;                /* [n_tokens, n_embd] accumulated into */
    float * scratch;            /* [n_pairs, n_ff] */
    int64_t n_embd;
    int64_t n_ff;
    int64_t n_tokens;
    int64_t n_experts;
    int64_t n_pairs;
} moesh_moe_ffn_args;

/* The function table. Every slot is required unless marked optional. */
typedef struct moesh_backend_iface {
    uint32_t abi_version;   /* MOESH_PLUGIN_ABI_VERSION the plugin was built for */
    uint32_t struct_size;   /* sizeof(moesh_backend_iface) of the plugin */
    const char * name;      /* "cpu", "cuda", ... */
    /* nonzero when kernels accept host pointers (e.g. mmap'd weights) directly */
    int32_t host_memory;

    /* failure detail goes to host->log (there is no context for last_error yet) */
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

    /* 1 when op is offered for weights of w_type, 0 otherwise, also for
     * values it does not know. For MOESH_OP_ATTENTION w_type is the KV pools'
     * type (kv_type), for MOESH_OP_COPY_ROWS dst's type (dst_type); other ops
     * without weights ignore it. (A plugin built before kv_type/dst_type said
     * 1 for these ops whatever w_type was; the host takes a 1 for a value no
     * dtype has as the sign of such a plugin, and keeps its KV cache f32.) */
    int32_t (*supports)(moesh_backend * be, int32_t op /* moesh_op */, int32_t w_type /* moesh_dtype */);

    moesh_status (*matmul)(moesh_backend * be, const moesh_matmul_args * args);
    moesh_status (*rms_norm)(moesh_backend * be, const moesh_rms_norm_args * args);
    moesh_status (*rope)(moesh_backend * be, const moesh_rope_args * args);
    moesh_status (*expert_ffn)(moesh_backend * be, const moesh_expert_ffn_args * args);
    moesh_status (*softmax)(moesh_backend * be, const moesh_softmax_args * args);
    moesh_status (*attention)(moesh_backend * be, const moesh_attention_args * args);

    /* Optional, since ABI v1 (NULL when the plugin does not pack): rewriting
     * block weights into the backend's own layout at load time, so that its
     * kernels read them faster. The host decides what to pack and owns the
     * memory (a buffer_alloc buffer of packed_size bytes; free it with
     * buffer_free), so memory budgets stay the host's.
     * packed_size: bytes that a [n_rows, n_cols] matrix of block type w_type
     *   takes packed; MOESH_ERR_UNSUPPORTED for a type the backend does not pack.
     * pack_weights: packs w (GGUF layout, host memory) into dst (dst_bytes
     *   >= packed_size). Ops then take dst with w_type | MOESH_DTYPE_PACKED
     *   and the same shape. */
    moesh_status (*packed_size)(moesh_backend * be, int32_t w_type, int64_t n_rows, int64_t n_cols,
                                size_t * out_bytes);
    moesh_status (*pack_weights)(moesh_backend * be, int32_t w_type, const void * w, int64_t n_rows,
                                 int64_t n_cols, void * dst, size_t dst_bytes);
    /* Optional, since ABI v1 (NULL when absent): moesh_copy_rows_args above.
     * The forward pass needs it, so a backend without it cannot run a model. */
    moesh_status (*copy_rows)(moesh_backend * be, const moesh_copy_rows_args * args);
    /* Optional, since ABI v1 (NULL when absent): moesh_moe_ffn_args above, for
     * the types supports(MOESH_OP_MOE_FFN) names; the host falls back to
     * expert_ffn per expert otherwise. */
    moesh_status (*moe_ffn)(moesh_backend * be, const moesh_moe_ffn_args * args);
    /* Optional, since ABI v1 (NULL when absent): moesh_attention_batch_args above;
     * the host calls attention per sequence otherwise. */
    moesh_status (*attention_batch)(moesh_backend * be, const moesh_attention_batch_args * args);
    /* Optional, since ABI v1 (NULL when absent; a host-memory backend has no
     * use for them): host-to-device copies that run beside the ops, so that
     * expert uploads overlap compute.
     * copy_to_device_async queues the copy and returns at once with a ticket
     * (nonzero, increasing; copies complete in ticket order). The copy starts
     * after every op queued before the call has finished with dst; ops queued
     * later may run while it is in flight, so until it is waited for, no op
     * (copy_to_device and copy_to_host included) may touch dst, and src must
     * stay valid and unchanged. buffer_free waits for the copies into it.
     * copy_wait(ticket, wait_host): every copy up to ticket is done before any
     * op queued after this call runs. With wait_host = 0 the host does not
     * wait (src must still stay unchanged until a later wait_host = 1 or
     * synchronize); with wait_host = 1 it returns when those copies are done
     * and their src may be reused. synchronize also waits for every copy.
     * A ticket never issued is MOESH_ERR_INVALID_ARGUMENT. */
    moesh_status (*copy_to_device_async)(moesh_backend * be, void * dst, const void * src, size_t n_bytes,
                                         uint64_t * ticket);
    moesh_status (*copy_wait)(moesh_backend * be, uint64_t ticket, int32_t wait_host);
    /* Optional, since ABI v1 (NULL when absent; only beside the copy queue
     * above): how long the device spent on an async copy, so that the host's
     * cost model learns the queue's rate (the host does not see the copy run).
     * *seconds: from the copy's start on the queue (after the ops it waits for)
     * to its end, once known; -1 while it runs, or when the plugin no longer
     * keeps it (it keeps at least the last 64 tickets). After copy_wait(ticket, 1)
     * or synchronize, a kept ticket is known. A ticket never issued is
     * MOESH_ERR_INVALID_ARGUMENT. */
    moesh_status (*copy_elapsed)(moesh_backend * be, uint64_t ticket, double * seconds);
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
