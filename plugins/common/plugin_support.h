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

// The checks of moesh_copy_rows_args that need no look at the index arrays
// (which may be device memory). MOESH_OK, or INVALID_ARGUMENT with last_error.
template <class Be>
moesh_status check_copy_rows(Be * be, const moesh_copy_rows_args & a) {
    if (!a.dst) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: dst must not be NULL");
    if (a.reserved != 0 || a.reserved2 != 0)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: reserved (%u) and reserved2 (%u) must be 0", unsigned(a.reserved),
                    unsigned(a.reserved2));
    if (a.dst_type != MOESH_DTYPE_F32 && a.dst_type != MOESH_DTYPE_F16)
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_rows: dst_type %d is neither f32 (%d) nor f16 (%d)", int(a.dst_type),
                    int(MOESH_DTYPE_F32), int(MOESH_DTYPE_F16));
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
    const size_t dst_elem = a.dst_type == MOESH_DTYPE_F16 ? 2 : sizeof(float);
    if (a.src == a.dst) {
        if (a.src_rows || a.dst_rows || a.src_stride != a.dst_stride || a.dst_type != MOESH_DTYPE_F32)
            return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                        "copy_rows: in place (src == dst) needs f32, no index arrays and equal strides");
    } else if (a.src && !disjoint(a.src, size_t(n_src) * sizeof(float), a.dst, size_t(n_dst) * dst_elem)) {
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
