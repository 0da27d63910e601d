// What every backend plugin's table needs around its kernels: logging through
// the host, last_error messages, reading versioned argument structs, keeping
// exceptions from crossing the C boundary, and overflow-checked sizes.
// Header-only, so that each plugin (compiled by any toolchain) carries its own
// copy and exports nothing new. Be is the plugin's moesh_backend struct, which
// must have `char last_error[N]`.
#pragma once

#include <moesh/plugin.h>

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <exception>
#include <new>

namespace moesh::plugin {

inline bool has_host_log(const moesh_host_api & host) {
    return host.struct_size >= offsetof(moesh_host_api, log) + sizeof(host.log) && host.log != nullptr;
}

__attribute__((format(printf, 3, 4)))
inline void host_log(const moesh_host_api * host, int32_t level, const char * fmt, ...) {
    if (!host || !has_host_log(*host)) {
        return;
    }
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    host->log(host->ctx, level, msg);
}

// Sets be->last_error and returns status.
template <class Be>
__attribute__((format(printf, 3, 4)))
moesh_status fail(Be * be, moesh_status status, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(be->last_error, sizeof be->last_error, fmt, ap);
    va_end(ap);
    return status;
}

// Bytes of an argument struct's first members, the least a caller may pass; members appended
// after them read as zero when the caller's struct_size ends before them.
template <class T>
constexpr size_t args_min_size() { return sizeof(T); }
template <>
constexpr size_t args_min_size<moesh_attention_args>() { return offsetof(moesh_attention_args, kv_type); }
template <>
constexpr size_t args_min_size<moesh_attention_batch_args>() { return offsetof(moesh_attention_batch_args, kv_type); }
template <>
constexpr size_t args_min_size<moesh_copy_rows_args>() { return offsetof(moesh_copy_rows_args, dst_type); }

// Copies the caller's argument struct after checking that struct_size covers its first
// members (args_min_size); what the caller's struct_size leaves out of T is zero. False, with
// last_error set, when args is NULL or too short.
template <class Be, class T>
bool read_args(Be * be, const T * args, const char * op, const char * type_name, T * out) {
    if (!args) {
        fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: args is NULL", op);
        return false;
    }
    uint32_t struct_size = 0;
    std::memcpy(&struct_size, args, sizeof struct_size);   // the first member of every args struct
    if (struct_size < args_min_size<T>()) {
        fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: %s struct_size %u is smaller than its v1 size %zu", op, type_name,
             unsigned(struct_size), args_min_size<T>());
        return false;
    }
    std::memset(static_cast<void *>(out), 0, sizeof(T));
    std::memcpy(static_cast<void *>(out), args, std::min<size_t>(struct_size, sizeof(T)));
    return true;
}

// Runs an entry point's body so that no C++ exception crosses the C boundary.
template <class Be, class F>
moesh_status guarded(Be * be, const char * op, F && body) noexcept {
    if (!be) {
        return MOESH_ERR_INVALID_ARGUMENT;
    }
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return fail(be, MOESH_ERR_OUT_OF_MEMORY, "%s: out of memory", op);
    } catch (const std::exception & e) {
        return fail(be, MOESH_ERR_INTERNAL, "%s: %s", op, e.what());
    } catch (...) {
        return fail(be, MOESH_ERR_INTERNAL, "%s: unknown exception", op);
    }
}

inline long long ll(int64_t v) { return static_cast<long long>(v); }

// a * b fits in int64 (both non-negative) and, as a float count, in size_t.
inline bool product_fits(int64_t a, int64_t b, int64_t * out = nullptr) {
    int64_t p;
    if (__builtin_mul_overflow(a, b, &p) || p > (INT64_MAX >> 3)) {
        return false;
    }
    if (out) {
        *out = p;
    }
    return true;
}

// The byte ranges [p, p + n_p) and [q, q + n_q) do not overlap.
inline bool disjoint(const void * p, size_t n_p, const void * q, size_t n_q) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t b = reinterpret_cast<uintptr_t>(q);
    return a + n_p <= b || b + n_q <= a;
}

// The checks of one attention call (op names it in messages) that every backend makes before
// its own: pointers, sizes, heads, kv_type. MOESH_OK, or INVALID_ARGUMENT with last_error.
template <class Be>
moesh_status check_attention_shape(Be * be, const moesh_attention_args & a, const char * op) {
    if (!(a.q && a.k_pool && a.v_pool && a.block_table && a.pos && a.out))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: q, k_pool, v_pool, block_table, pos and out must not be NULL", op);
    if (!(a.n_tokens > 0 && a.n_head > 0 && a.n_head_kv > 0 && a.head_dim > 0 && a.block_size > 0 && a.n_blocks > 0 &&
          a.n_kv > 0))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "%s: n_tokens (%lld), n_head (%lld), n_head_kv (%lld), head_dim (%lld), block_size (%lld), n_blocks "
                    "(%lld) and n_kv (%lld) must be positive", op, ll(a.n_tokens), ll(a.n_head), ll(a.n_head_kv),
                    ll(a.head_dim), ll(a.block_size), ll(a.n_blocks), ll(a.n_kv));
    if (a.n_head % a.n_head_kv != 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: n_head (%lld) is not a multiple of n_head_kv (%lld)", op,
                    ll(a.n_head), ll(a.n_head_kv));
    if ((a.kv_type != MOESH_DTYPE_F32 && a.kv_type != MOESH_DTYPE_F16 && a.kv_type != MOESH_DTYPE_Q8_0) || a.reserved2 != 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "%s: kv_type %d is none of f32 (%d), f16 (%d) and q8_0 (%d), or reserved2 (%u) is not 0", op, int(a.kv_type),
                    int(MOESH_DTYPE_F32), int(MOESH_DTYPE_F16), int(MOESH_DTYPE_Q8_0), unsigned(a.reserved2));
    if (a.kv_type == MOESH_DTYPE_Q8_0 && a.head_dim % MOESH_QK_BLOCK != 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: a q8_0 KV pool needs head_dim (%lld) a multiple of %d", op,
                    ll(a.head_dim), MOESH_QK_BLOCK);
    return MOESH_OK;
}

// attention_batch's checks of the call as a whole; *q_row: floats per row of q and out.
// MOESH_OK, or INVALID_ARGUMENT with last_error.
template <class Be>
moesh_status check_attention_batch(Be * be, const moesh_attention_batch_args & b, int64_t * q_row) {
    if (!b.runs || !b.block_tables || !b.pos)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention_batch: runs, block_tables and pos must not be NULL");
    if (!(b.n_runs > 0 && b.n_tokens > 0 && b.n_table > 0 && b.n_head > 0 && b.head_dim > 0 && b.block_size > 0))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "attention_batch: n_runs (%lld), n_tokens (%lld), n_table (%lld), n_head (%lld), head_dim (%lld) and "
                    "block_size (%lld) must be positive", ll(b.n_runs), ll(b.n_tokens), ll(b.n_table), ll(b.n_head),
                    ll(b.head_dim), ll(b.block_size));
    if (!product_fits(b.n_head, b.head_dim, q_row) || !product_fits(b.n_tokens, *q_row))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention_batch: sizes overflow");
    return MOESH_OK;
}

// Run r of b (its rows after *end, the end of the previous run's, which it advances) as the
// attention call it stands for, in *a, once its rows and block table are checked; the plugin
// then checks *a as it checks an attention call. q_row: from check_attention_batch.
template <class Be>
moesh_status attention_batch_run(Be * be, const moesh_attention_batch_args & b, int64_t r, int64_t q_row, int64_t * end,
                                 moesh_attention_args * a) {
    const moesh_attention_run & u = b.runs[r];
    if (!(u.first >= *end && u.n_tokens > 0 && u.first < b.n_tokens && u.n_tokens <= b.n_tokens - u.first))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "attention_batch: run %lld's rows [%lld, +%lld) overlap an earlier run's, come out of order or leave "
                    "[0, n_tokens = %lld)", ll(r), ll(u.first), ll(u.n_tokens), ll(b.n_tokens));
    *end = u.first + u.n_tokens;
    if (!(u.n_kv > 0 && u.table >= 0 && u.table < b.n_table && (u.n_kv - 1) / b.block_size < b.n_table - u.table))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "attention_batch: run %lld's block table (from %lld, for n_kv = %lld) leaves block_tables [0, n_table = "
                    "%lld)", ll(r), ll(u.table), ll(u.n_kv), ll(b.n_table));
    const int64_t row = u.first * q_row;   // < n_tokens * q_row, which fits
    *a = {};
    a->struct_size = sizeof *a;
    a->scale = b.scale;
    a->q = b.q ? b.q + row : nullptr;
    a->k_pool = b.k_pool;
    a->v_pool = b.v_pool;
    a->block_table = b.block_tables + u.table;
    a->pos = b.pos + u.first;
    a->out = b.out ? b.out + row : nullptr;
    a->n_tokens = u.n_tokens;
    a->n_head = b.n_head;
    a->n_head_kv = b.n_head_kv;
    a->head_dim = b.head_dim;
    a->block_size = b.block_size;
    a->n_blocks = b.n_blocks;
    a->n_kv = u.n_kv;
    a->kv_type = b.kv_type;
    a->reserved2 = b.reserved2;
    return MOESH_OK;
}

// The checks of moesh_copy_rows_args that need no look at the index arrays
// (which may be device memory). MOESH_OK, or INVALID_ARGUMENT with last_error.
template <class Be>
moesh_status check_copy_rows(Be * be, const moesh_copy_rows_args & a) {
    if (!a.dst) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: dst must not be NULL");
    if (a.reserved != 0 || a.reserved2 != 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: reserved (%u) and reserved2 (%u) must be 0", unsigned(a.reserved),
                    unsigned(a.reserved2));
    if (a.dst_type != MOESH_DTYPE_F32 && a.dst_type != MOESH_DTYPE_F16 && a.dst_type != MOESH_DTYPE_Q8_0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: dst_type %d is none of f32 (%d), f16 (%d) and q8_0 (%d)",
                    int(a.dst_type), int(MOESH_DTYPE_F32), int(MOESH_DTYPE_F16), int(MOESH_DTYPE_Q8_0));
    if (a.dst_type == MOESH_DTYPE_Q8_0 && (a.n_cols % MOESH_QK_BLOCK != 0 || a.dst_stride % MOESH_QK_BLOCK != 0 || a.accumulate))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "copy_rows: a q8_0 dst needs n_cols (%lld) and dst_stride (%lld) multiples of %d and accumulate 0 (is %d)",
                    ll(a.n_cols), ll(a.dst_stride), MOESH_QK_BLOCK, int(a.accumulate));
    if (a.accumulate != 0 && a.accumulate != 1)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: accumulate is %d, must be 0 or 1", int(a.accumulate));
    if (!(a.clamp >= 0.0f && a.clamp <= 3.4e38f))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: clamp must be finite and >= 0");
    if (a.n_rows < 0 || a.n_cols <= 0 || a.src_n_rows < 0 || a.dst_n_rows < 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                    "copy_rows: n_rows (%lld), src_n_rows (%lld) and dst_n_rows (%lld) must be >= 0 and n_cols (%lld) > 0",
                    ll(a.n_rows), ll(a.src_n_rows), ll(a.dst_n_rows), ll(a.n_cols));
    if (a.dst_stride < a.n_cols || (a.src && a.src_stride < a.n_cols))
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: src_stride (%lld) and dst_stride (%lld) must be at least n_cols (%lld)",
                    ll(a.src_stride), ll(a.dst_stride), ll(a.n_cols));
    int64_t n_src = 0, n_dst = 0;
    if (!product_fits(a.dst_n_rows, a.dst_stride, &n_dst) || (a.src && !product_fits(a.src_n_rows, a.src_stride, &n_src)) ||
        a.n_rows > INT32_MAX)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: sizes overflow");
    if (!a.dst_rows && a.n_rows > a.dst_n_rows)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: n_rows (%lld) is more than dst_n_rows (%lld)", ll(a.n_rows),
                    ll(a.dst_n_rows));
    if (a.src && !a.src_rows && a.n_rows > a.src_n_rows)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: n_rows (%lld) is more than src_n_rows (%lld)", ll(a.n_rows),
                    ll(a.src_n_rows));
    const size_t dst_bytes = a.dst_type == MOESH_DTYPE_F16    ? size_t(n_dst) * 2
                             : a.dst_type == MOESH_DTYPE_Q8_0 ? size_t(n_dst) / MOESH_QK_BLOCK * 34
                                                              : size_t(n_dst) * sizeof(float);
    if (a.src == a.dst) {
        if (a.src_rows || a.dst_rows || a.src_stride != a.dst_stride || a.dst_type != MOESH_DTYPE_F32)
            return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                        "copy_rows: in place (src == dst) needs f32, no index arrays and equal strides");
    } else if (a.src && !disjoint(a.src, size_t(n_src) * sizeof(float), a.dst, dst_bytes)) {
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: src overlaps dst");
    }
    return MOESH_OK;
}

// The index arrays' check, for a backend that can read them (host memory).
template <class Be>
moesh_status check_copy_rows_indices(Be * be, const moesh_copy_rows_args & a) {
    for (int64_t i = 0; i < a.n_rows; ++i) {
        if (a.src && a.src_rows && (a.src_rows[i] < 0 || a.src_rows[i] >= a.src_n_rows))
            return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: src_rows[%lld] = %d is outside [0, src_n_rows = %lld)",
                        ll(i), int(a.src_rows[i]), ll(a.src_n_rows));
        if (a.dst_rows && (a.dst_rows[i] < 0 || a.dst_rows[i] >= a.dst_n_rows))
            return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: dst_rows[%lld] = %d is outside [0, dst_n_rows = %lld)",
                        ll(i), int(a.dst_rows[i]), ll(a.dst_n_rows));
    }
    return MOESH_OK;
}

} // namespace moesh::plugin

// Returns MOESH_ERR_INVALID_ARGUMENT with the message from the enclosing
// entry point (which has `be`) unless cond holds.
#define MOESH_PLUGIN_REQUIRE(cond, ...)                                            \
    do {                                                                           \
        if (!(cond)) {                                                             \
            return ::moesh::plugin::fail(be, MOESH_ERR_INVALID_ARGUMENT, __VA_ARGS__); \
        }                                                                          \
    } while (0)
