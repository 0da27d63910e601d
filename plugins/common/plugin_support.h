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

// Copies the caller's argument struct, of which the plugin reads its v1
// members, after checking that struct_size covers them. False, with
// last_error set, when args is NULL or too short.
template <class Be, class T>
bool read_args(Be * be, const T * args, const char * op, const char * type_name, T * out) {
    if (!args) {
        fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: args is NULL", op);
        return false;
    }
    uint32_t struct_size = 0;
    std::memcpy(&struct_size, args, sizeof struct_size);   // the first member of every args struct
    if (struct_size < sizeof(T)) {
        fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: %s struct_size %u is smaller than its v1 size %zu", op, type_name,
             unsigned(struct_size), sizeof(T));
        return false;
    }
    std::memcpy(static_cast<void *>(out), args, sizeof(T));
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

} // namespace moesh::plugin

// Returns MOESH_ERR_INVALID_ARGUMENT with the message from the enclosing
// entry point (which has `be`) unless cond holds.
#define MOESH_PLUGIN_REQUIRE(cond, ...)                                            \
    do {                                                                           \
        if (!(cond)) {                                                             \
            return ::moesh::plugin::fail(be, MOESH_ERR_INVALID_ARGUMENT, __VA_ARGS__); \
        }                                                                          \
    } while (0)
