// The CPU backend plugin: the moesh_backend_iface table, argument validation
// and the split of every op over the context's thread pool. The SIMD kernels
// are in cpu_kernels.cpp.
#include <moesh/plugin.h>

#include "cpu_kernels.h"
#include "common/plugin_support.h"
#include "host_memory.h"
#include "quant_kernels.h"
#include "thread_pool.h"

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace {

using moesh::cpu::ThreadPool;

constexpr int32_t k_score = 10;
constexpr int32_t k_max_threads = 1024;
// Multiply-adds below which a call runs on the calling thread alone: waking
// the workers would cost more than they save.
constexpr int64_t k_min_work_per_thread = int64_t(1) << 15;
// Below this many multiply-adds (~100 us on one core) a call does not wait
// for sleeping workers to wake up (tens of microseconds on a VM).
constexpr int64_t k_short_work = int64_t(1) << 20;
// Buffers of at least this size start on a 2 MiB boundary and ask for
// transparent huge pages (Linux often gives them only where asked: "madvise").
// Decode streams every weight once per token, and with 4 KiB pages each page
// costs a TLB walk (two-level under a hypervisor): the packed Q8_0 matvec ran
// 5-15% faster with huge pages on the 2-vCPU VM.
constexpr size_t k_huge_page = size_t(2) << 20;

// Floats between the per-thread slices of the context scratch (a cache line).
constexpr int64_t k_scratch_align = 16;
// Rows (of float outputs) per work unit of the quantized kernels: whole cache
// lines of a 64-byte aligned output row, so threads never write the same line.
constexpr int64_t k_quant_row_unit = 16;

// 64-byte aligned float buffer that only ever grows.
class ScratchBuffer {
public:
    ScratchBuffer() = default;
    ScratchBuffer(const ScratchBuffer &) = delete;
    ScratchBuffer & operator=(const ScratchBuffer &) = delete;
    ~ScratchBuffer() { std::free(data_); }

    float * reserve(size_t n_floats) {
        if (n_floats > n_floats_) {
            void * p = nullptr;
            if (posix_memalign(&p, 64, n_floats * sizeof(float)) != 0) {
                throw std::bad_alloc();
            }
            std::free(data_);
            data_ = static_cast<float *>(p);
            n_floats_ = n_floats;
        }
        return data_;
    }

    float * data() const { return data_; }

private:
    float * data_ = nullptr;
    size_t n_floats_ = 0;
};

} // namespace

struct moesh_backend {
    moesh_backend(int n_threads, bool precise) : pool(n_threads), precise(precise) {}

    moesh_host_api host{};   // the v1 members of the host's table, copied
    ThreadPool pool;
    ScratchBuffer scratch;       // [n_threads, stride]: rope cos/sin, attention scores
    ScratchBuffer activations;   // [n_tokens, n_in]: matmul/expert_ffn input in kernel layout
    // Block weight types: inputs quantized to 8 bits (moesh::cpu::QuantActs),
    // expert_ffn's h likewise, and one unpacked-weights panel per thread.
    ScratchBuffer quant_x;
    ScratchBuffer quant_h;
    ScratchBuffer panels;   // [n_threads, panel_stride]
    // MOESH_ACTIVATIONS_PRECISE: block weights see x as two 8-bit passes, x and
    // the rounding error of the first; these hold that error and the second pass.
    bool precise = false;
    ScratchBuffer residual;  // [n_tokens, n_in]
    ScratchBuffer second;    // [n_tokens, n_out]
    ScratchBuffer ffn_tmp;   // [n_tokens, n_embd]: expert_ffn's down output before scaling
    std::vector<int64_t> moe_cost;   // moe_ffn's work split; grows once
    std::vector<moesh_attention_args> attention_runs;   // attention_batch's runs as single calls; grows once
    char last_error[512] = "";
};

namespace {

using moesh::plugin::disjoint;
using moesh::plugin::fail;
using moesh::plugin::guarded;
using moesh::plugin::host_log;
using moesh::plugin::ll;
using moesh::plugin::product_fits;
using moesh::plugin::read_args;

bool weight_type_ok(int32_t t) {
    return t == MOESH_DTYPE_F32 || t == MOESH_DTYPE_F16 || t == MOESH_DTYPE_BF16 || moesh::cpu::is_quant_type(t);
}

moesh_status unsupported_weight_type(moesh_backend * be, const char * op, int32_t t) {
    return fail(be, MOESH_ERR_UNSUPPORTED,
                "%s: weight dtype %d is not supported by the cpu backend (f32, f16, bf16, q8_0, q4_0, q4_1, q4_K, "
                "q5_K, q6_K are, and q8_0, q4_0 packed)",
                op, int(t));
}

// A packed weight's header matches the type and shape of the call.
bool packed_ok(int32_t w_type, const void * w, int64_t n_rows, int64_t n_cols) {
    return !(w_type & MOESH_DTYPE_PACKED) ||
           moesh::cpu::packed_matches(w, w_type & ~MOESH_DTYPE_PACKED, n_rows, n_cols);
}

// Whether n is a whole number of w_type's blocks (always, for element types).
bool whole_blocks(int32_t w_type, int64_t n) {
    const int64_t b = moesh::cpu::quant_block_elems(w_type);
    return b == 0 || n % b == 0;
}

// One panel per thread for rows of up to n_in values; returns the stride in bytes.
uint8_t * thread_panels(moesh_backend * be, int64_t n_in, size_t * stride) {
    *stride = (moesh::cpu::quant_panel_bytes(n_in) + 63) / 64 * 64;
    return reinterpret_cast<uint8_t *>(be->panels.reserve(*stride / 4 * size_t(be->pool.n_threads())));
}

moesh::cpu::QuantActs quant_buffer(ScratchBuffer & buf, int64_t n, int64_t n_rows, int32_t w_type) {
    return moesh::cpu::quant_acts_at(buf.reserve((moesh::cpu::quant_acts_bytes(n, n_rows) + 3) / 4), n, n_rows,
                                     moesh::cpu::quant_block_elems(w_type));
}

// Byte ranges [p, p + n_p) and [q, q + n_q) do not overlap.
// Threads worth waking for this many multiply-adds.
int n_active_threads(const moesh_backend * be, int64_t work) {
    const int64_t n = std::max<int64_t>(1, work / k_min_work_per_thread);
    return int(std::min<int64_t>(n, be->pool.n_threads()));
}

// Runs task(ith, part, n_parts) over the pool for `work` multiply-adds, on
// at most max_threads threads (the number of independent items).
template <class F>
void run_parallel(moesh_backend * be, int64_t work, int64_t max_threads, F & task) {
    const int n_active = int(std::min<int64_t>(n_active_threads(be, work), std::max<int64_t>(max_threads, 1)));
    be->pool.run(n_active, work < k_short_work, task);
}

// Balanced share [begin, end) of n units for one of n_parts parts.
struct Range {
    int64_t begin;
    int64_t end;
};

Range split(int64_t n, int64_t part, int64_t n_parts) {
    return {n * part / n_parts, n * (part + 1) / n_parts};
}

// Parts the pool cuts a task into when n_active threads run it.
int64_t n_parts_for(int n_active) {
    return n_active > 1 ? int64_t(n_active) * ThreadPool::k_parts_per_thread : 1;
}

int default_thread_count() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) {
            return n;
        }
    }
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? int(n) : 1;
}

// Per-thread slices of the context scratch, each n_per_thread floats.
float * thread_scratch(moesh_backend * be, int64_t n_per_thread, int64_t * stride) {
    *stride = (n_per_thread + k_scratch_align - 1) / k_scratch_align * k_scratch_align;
    return be->scratch.reserve(size_t(*stride) * size_t(be->pool.n_threads()));
}

// ---------------------------------------------------------------- lifetime

moesh_status cpu_create(const moesh_backend_params * params, const moesh_host_api * host, moesh_backend ** out) {
    if (!out) {
        host_log(host, MOESH_LOG_ERROR, "cpu backend: create: out is NULL");
        return MOESH_ERR_INVALID_ARGUMENT;
    }
    *out = nullptr;
    try {
        int32_t n_threads = 0;
        int32_t activations = MOESH_ACTIVATIONS_FAST;
        if (params) {
            if (params->struct_size < offsetof(moesh_backend_params, n_threads) + sizeof(params->n_threads)) {
                host_log(host, MOESH_LOG_ERROR, "cpu backend: create: params struct_size %u is too small",
                         unsigned(params->struct_size));
                return MOESH_ERR_INVALID_ARGUMENT;
            }
            n_threads = params->n_threads;
            if (params->struct_size >= offsetof(moesh_backend_params, activations) + sizeof(params->activations)) {
                activations = params->activations;
            }
        }
        if (activations != MOESH_ACTIVATIONS_FAST && activations != MOESH_ACTIVATIONS_PRECISE) {
            host_log(host, MOESH_LOG_ERROR, "cpu backend: create: unknown activations mode %d", int(activations));
            return MOESH_ERR_UNSUPPORTED;
        }
        if (n_threads > k_max_threads) {
            host_log(host, MOESH_LOG_ERROR, "cpu backend: create: n_threads %d is more than %d", int(n_threads),
                     int(k_max_threads));
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        if (n_threads <= 0) {
            n_threads = default_thread_count();
        }
        moesh::cpu::apply_simd_limit_from_env();
        auto be = std::make_unique<moesh_backend>(n_threads, activations == MOESH_ACTIVATIONS_PRECISE);
        if (host) {
            std::memcpy(&be->host, host, std::min<size_t>(host->struct_size, sizeof be->host));
            be->host.struct_size = std::min<uint32_t>(host->struct_size, sizeof be->host);
        }
        host_log(&be->host, MOESH_LOG_INFO, "cpu backend: %d threads, SIMD target %s, %s activations", int(n_threads),
                 moesh::cpu::simd_target_name(), be->precise ? "precise" : "8-bit");
        *out = be.release();
        return MOESH_OK;
    } catch (const std::bad_alloc &) {
        host_log(host, MOESH_LOG_ERROR, "cpu backend: create: out of memory");
        return MOESH_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        host_log(host, MOESH_LOG_ERROR, "cpu backend: create: %s", e.what());
        return MOESH_ERR_INTERNAL;
    } catch (...) {
        return MOESH_ERR_INTERNAL;
    }
}

void cpu_destroy(moesh_backend * be) {
    delete be;   // joins the workers; nothing in it throws
}

const char * cpu_last_error(moesh_backend * be) {
    return be ? be->last_error : "cpu backend: NULL context";
}

// ---------------------------------------------------------------- memory

moesh_status cpu_memory_info(moesh_backend * be, uint64_t * free_bytes, uint64_t * total_bytes) {
    return guarded(be, "memory_info", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(free_bytes && total_bytes, "memory_info: free_bytes and total_bytes must not be NULL");
        moesh::cpu::HostMemory m;
        if (!moesh::cpu::query_host_memory(&m)) {
            return fail(be, MOESH_ERR_INTERNAL, "memory_info: cannot read the host's memory size");
        }
        *free_bytes = m.free_bytes;
        *total_bytes = m.total_bytes;
        return MOESH_OK;
    });
}

moesh_status cpu_buffer_alloc(moesh_backend * be, size_t n_bytes, void ** out) {
    return guarded(be, "buffer_alloc", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(out, "buffer_alloc: out is NULL");
        *out = nullptr;
        MOESH_PLUGIN_REQUIRE(n_bytes > 0, "buffer_alloc: n_bytes is 0");
        MOESH_PLUGIN_REQUIRE(n_bytes <= SIZE_MAX - 63, "buffer_alloc: n_bytes %zu is too large", n_bytes);
        void * p = nullptr;
        // A whole number of cache lines, so SIMD loads past the end stay inside.
        const size_t size = (n_bytes + 63) & ~size_t(63);
        const size_t align = size >= k_huge_page ? k_huge_page : 64;
        if (posix_memalign(&p, align, size) != 0) {
            return fail(be, MOESH_ERR_OUT_OF_MEMORY, "buffer_alloc: cannot allocate %zu bytes", n_bytes);
        }
#ifdef MADV_HUGEPAGE
        if (align == k_huge_page) {
            // Advice only: without transparent huge pages the buffer keeps 4 KiB pages.
            madvise(p, size, MADV_HUGEPAGE);
        }
#endif
        // Touched now, at set-up: the page faults of a fresh mapping would otherwise land in
        // the first forward steps (measured: -30% on a 128-token prefill with 2 threads).
        std::memset(p, 0, size);
        *out = p;
        return MOESH_OK;
    });
}

void cpu_buffer_free(moesh_backend * be, void * ptr) {
    std::free(ptr);
}

moesh_status copy_bytes(moesh_backend * be, const char * op, void * dst, const void * src, size_t n_bytes) {
    return guarded(be, op, [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(n_bytes == 0 || (dst && src), "%s: dst and src must not be NULL", op);
        if (n_bytes > 0) {
            std::memmove(dst, src, n_bytes);
        }
        return MOESH_OK;
    });
}

moesh_status cpu_copy_to_device(moesh_backend * be, void * dst, const void * src, size_t n_bytes) {
    return copy_bytes(be, "copy_to_device", dst, src, n_bytes);
}

moesh_status cpu_copy_to_host(moesh_backend * be, void * dst, const void * src, size_t n_bytes) {
    return copy_bytes(be, "copy_to_host", dst, src, n_bytes);
}

moesh_status cpu_synchronize(moesh_backend * be) {
    return be ? MOESH_OK : MOESH_ERR_INVALID_ARGUMENT;   // every call is synchronous
}

int32_t cpu_supports(moesh_backend * be, int32_t op, int32_t w_type) {
    switch (op) {
    case MOESH_OP_MATMUL:
    case MOESH_OP_EXPERT_FFN:
        return weight_type_ok(w_type) ? 1 : 0;
    case MOESH_OP_MOE_FFN:   // the integer kernels; precise activations take expert_ffn's route
        return be && !be->precise && moesh::cpu::is_quant_type(w_type) ? 1 : 0;
    case MOESH_OP_ATTENTION:   // w_type: the KV pools' type; copy_rows: dst's
    case MOESH_OP_COPY_ROWS:
        return w_type == MOESH_DTYPE_F32 || w_type == MOESH_DTYPE_F16 || w_type == MOESH_DTYPE_Q8_0 ? 1 : 0;
    case MOESH_OP_RMS_NORM:
    case MOESH_OP_ROPE:
    case MOESH_OP_SOFTMAX:
        return 1;
    default:
        return 0;
    }
}

// ---------------------------------------------------------------- ops

// y = W . x (+ bias) for block weights, x rounded to 8 bits per value; with
// be->precise, a second pass adds W . (x - that rounding), whose own rounding
// error is ~127x smaller.
void quant_matmul_pass(moesh_backend * be, const moesh_matmul_args & a, int64_t work, int n_active, int64_t n_parts,
                       const moesh::cpu::QuantActs & xq) {
    moesh::cpu::quantize_acts(a.x, a.x_stride, 0, a.n_tokens, xq);
    size_t stride = 0;
    uint8_t * panels = thread_panels(be, a.n_in, &stride);
    const int64_t n_units = (a.n_out + k_quant_row_unit - 1) / k_quant_row_unit;
    const bool by_tokens = n_units < n_parts && a.n_tokens > n_units;
    auto task = [&](int ith, int64_t part, int64_t n_parts_run) {
        if (by_tokens) {
            const Range t = split(a.n_tokens, part, n_parts_run);
            moesh::cpu::quant_matmul_rows(a, xq, 0, a.n_out, t.begin, t.end, panels + size_t(ith) * stride);
        } else {
            const Range u = split(n_units, part, n_parts_run);
            moesh::cpu::quant_matmul_rows(a, xq, u.begin * k_quant_row_unit, std::min(u.end * k_quant_row_unit, a.n_out),
                                          0, a.n_tokens, panels + size_t(ith) * stride);
        }
    };
    run_parallel(be, work, n_active, task);
}

void quant_matmul(moesh_backend * be, const moesh_matmul_args & a, int64_t work, int n_active, int64_t n_parts) {
    const moesh::cpu::QuantActs xq = quant_buffer(be->quant_x, a.n_in, a.n_tokens, a.w_type);
    quant_matmul_pass(be, a, work, n_active, n_parts, xq);
    if (!be->precise) {
        return;
    }
    float * r = be->residual.reserve(size_t(a.n_tokens * a.n_in));
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        for (int64_t i = 0; i < a.n_in; ++i) {
            r[t * a.n_in + i] = a.x[t * a.x_stride + i] - float(xq.q[t * xq.n + i]) * xq.d[t * xq.ng8 + i / 32];
        }
    }
    moesh_matmul_args b = a;
    b.x = r;
    b.x_stride = a.n_in;
    b.bias = nullptr;
    b.y = be->second.reserve(size_t(a.n_tokens * a.n_out));
    b.y_stride = a.n_out;
    quant_matmul_pass(be, b, work, n_active, n_parts, xq);
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        for (int64_t o = 0; o < a.n_out; ++o) {
            a.y[t * a.y_stride + o] += b.y[t * a.n_out + o];
        }
    }
}

// expert_ffn as three precise matmuls: h = silu(gate x) * (up x) in scratch, out += scale * (down h).
void quant_expert_ffn_precise(moesh_backend * be, const moesh_expert_ffn_args & a, int64_t work, int n_active) {
    const int64_t n_parts = n_parts_for(n_active);
    float * g = a.scratch;
    float * u = a.scratch + a.n_tokens * a.n_ff;
    moesh_matmul_args m{};
    m.struct_size = sizeof m;
    m.w_type = a.w_type;
    m.x = a.x;
    m.n_in = a.n_embd;
    m.n_out = a.n_ff;
    m.n_tokens = a.n_tokens;
    m.x_stride = a.n_embd;
    m.y_stride = a.n_ff;
    m.w = a.gate;
    m.y = g;
    quant_matmul(be, m, work / 3, n_active, n_parts);
    m.w = a.up;
    m.y = u;
    quant_matmul(be, m, work / 3, n_active, n_parts);
    for (int64_t i = 0; i < a.n_tokens * a.n_ff; ++i) {
        g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
    float * o = be->ffn_tmp.reserve(size_t(a.n_tokens * a.n_embd));
    m.w = a.down;
    m.x = g;
    m.y = o;
    m.n_in = a.n_ff;
    m.n_out = a.n_embd;
    m.x_stride = a.n_ff;
    m.y_stride = a.n_embd;
    quant_matmul(be, m, work / 3, n_active, n_parts);
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        const float s = a.scale ? a.scale[t] : 1.0f;
        for (int64_t e = 0; e < a.n_embd; ++e) {
            a.out[t * a.n_embd + e] += s * o[t * a.n_embd + e];
        }
    }
}

moesh_status cpu_matmul(moesh_backend * be, const moesh_matmul_args * args) {
    return guarded(be, "matmul", [&]() -> moesh_status {
        moesh_matmul_args a;
        if (!read_args(be, args, "matmul", "moesh_matmul_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.w && a.x && a.y, "matmul: w, x and y must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_in > 0 && a.n_out > 0 && a.n_tokens > 0,
                          "matmul: n_in (%lld), n_out (%lld) and n_tokens (%lld) must be positive", ll(a.n_in),
                          ll(a.n_out), ll(a.n_tokens));
        MOESH_PLUGIN_REQUIRE(a.x_stride >= a.n_in, "matmul: x_stride (%lld) is less than n_in (%lld)", ll(a.x_stride),
                          ll(a.n_in));
        MOESH_PLUGIN_REQUIRE(a.y_stride >= a.n_out, "matmul: y_stride (%lld) is less than n_out (%lld)",
                          ll(a.y_stride), ll(a.n_out));
        int64_t n_w = 0;
        int64_t n_x = 0;
        int64_t n_y = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_out, a.n_in, &n_w) && product_fits(a.n_tokens, a.x_stride, &n_x) &&
                              product_fits(a.n_tokens, a.y_stride, &n_y),
                          "matmul: sizes overflow");
        if (!weight_type_ok(a.w_type)) {
            return unsupported_weight_type(be, "matmul", a.w_type);
        }
        MOESH_PLUGIN_REQUIRE(whole_blocks(a.w_type, a.n_in),
                          "matmul: n_in (%lld) is not a multiple of %lld, as block weight dtype %d needs", ll(a.n_in),
                          ll(moesh::cpu::quant_block_elems(a.w_type)), int(a.w_type));
        MOESH_PLUGIN_REQUIRE(packed_ok(a.w_type, a.w, a.n_out, a.n_in),
                          "matmul: w is not what pack_weights wrote for dtype %d and shape [%lld, %lld]",
                          int(a.w_type & ~MOESH_DTYPE_PACKED), ll(a.n_out), ll(a.n_in));
        // Exact extents: rows are n_in (n_out) floats, x_stride (y_stride) apart.
        MOESH_PLUGIN_REQUIRE(disjoint(a.y, size_t(n_y - a.y_stride + a.n_out) * 4, a.x,
                                   size_t(n_x - a.x_stride + a.n_in) * 4),
                          "matmul: y overlaps x");

        int64_t work = INT64_MAX;
        product_fits(n_w, a.n_tokens, &work);
        const int n_active = n_active_threads(be, work);
        const int64_t n_parts = n_parts_for(n_active);
        if (moesh::cpu::is_quant_type(a.w_type)) {
            quant_matmul(be, a, work, n_active, n_parts);
            return MOESH_OK;
        }
        moesh_matmul_args k = a;   // as the kernels see it
        if (moesh::cpu::needs_kernel_layout(a.w_type)) {
            k.x = be->activations.reserve(size_t(a.n_tokens * a.n_in));
            k.x_stride = a.n_in;
            moesh::cpu::to_kernel_layout(a.w_type, a.x, a.x_stride, a.n_in, a.n_tokens, be->activations.data());
        }
        // Parts are blocks of 4 rows; with few rows and more tokens (a
        // router's logits over a prompt), they are tokens instead.
        const int64_t n_row_blocks = (a.n_out + 3) / 4;
        const bool by_tokens = n_row_blocks < n_parts && a.n_tokens > n_row_blocks;
        auto task = [&](int, int64_t part, int64_t n_parts_run) {
            if (by_tokens) {
                const Range t = split(a.n_tokens, part, n_parts_run);
                moesh::cpu::matmul_rows(k, 0, a.n_out, t.begin, t.end);
            } else {
                const Range r = split(n_row_blocks, part, n_parts_run);
                moesh::cpu::matmul_rows(k, r.begin * 4, std::min(r.end * 4, a.n_out), 0, a.n_tokens);
            }
        };
        run_parallel(be, work, n_active, task);
        return MOESH_OK;
    });
}

moesh_status cpu_rms_norm(moesh_backend * be, const moesh_rms_norm_args * args) {
    return guarded(be, "rms_norm", [&]() -> moesh_status {
        moesh_rms_norm_args a;
        if (!read_args(be, args, "rms_norm", "moesh_rms_norm_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.x && a.weight && a.y, "rms_norm: x, weight and y must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n > 0 && a.n_rows > 0, "rms_norm: n (%lld) and n_rows (%lld) must be positive", ll(a.n),
                          ll(a.n_rows));
        int64_t n_x = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n, a.n_rows, &n_x), "rms_norm: sizes overflow");
        MOESH_PLUGIN_REQUIRE(std::isfinite(a.eps) && a.eps >= 0.0f, "rms_norm: eps (%g) must be finite and >= 0",
                          double(a.eps));
        MOESH_PLUGIN_REQUIRE(a.y == a.x || disjoint(a.y, size_t(n_x) * 4, a.x, size_t(n_x) * 4),
                          "rms_norm: y partly overlaps x (only y == x is allowed)");
        auto task = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split(a.n_rows, part, n_parts);
            moesh::cpu::rms_norm_rows(a, r.begin, r.end);
        };
        run_parallel(be, n_x, a.n_rows, task);
        return MOESH_OK;
    });
}

moesh_status cpu_rope(moesh_backend * be, const moesh_rope_args * args) {
    return guarded(be, "rope", [&]() -> moesh_status {
        moesh_rope_args a;
        if (!read_args(be, args, "rope", "moesh_rope_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.x && a.pos && a.inv_freq, "rope: x, pos and inv_freq must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_tokens > 0 && a.n_head > 0 && a.head_dim > 0,
                          "rope: n_tokens (%lld), n_head (%lld) and head_dim (%lld) must be positive", ll(a.n_tokens),
                          ll(a.n_head), ll(a.head_dim));
        MOESH_PLUGIN_REQUIRE(a.rot_dim > 0 && a.rot_dim % 2 == 0 && a.rot_dim <= a.head_dim,
                          "rope: rot_dim (%lld) must be even, positive and <= head_dim (%lld)", ll(a.rot_dim),
                          ll(a.head_dim));
        int64_t n_th = 0;
        int64_t n_x = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_tokens, a.n_head, &n_th) && product_fits(n_th, a.head_dim, &n_x),
                          "rope: sizes overflow");
        MOESH_PLUGIN_REQUIRE(std::isfinite(a.attn_factor), "rope: attn_factor must be finite");
        MOESH_PLUGIN_REQUIRE(a.reserved == 0, "rope: reserved is %u, must be 0", unsigned(a.reserved));
        if (a.mode != MOESH_ROPE_NEOX && a.mode != MOESH_ROPE_NORM) {
            return fail(be, MOESH_ERR_UNSUPPORTED, "rope: mode %d is not supported", int(a.mode));
        }
        int64_t stride = 0;
        float * cos_sin = thread_scratch(be, a.rot_dim, &stride);   // [n_threads, stride]
        auto task = [&](int ith, int64_t part, int64_t n_parts) {
            const Range t = split(a.n_tokens, part, n_parts);
            moesh::cpu::rope_tokens(a, t.begin, t.end, cos_sin + ith * stride);
        };
        // Counted as 16 multiply-adds an element: cos/sin are the expensive part.
        const int64_t work = n_x < (INT64_MAX >> 5) ? n_x * 16 : INT64_MAX;
        run_parallel(be, work, a.n_tokens, task);
        return MOESH_OK;
    });
}

moesh_status cpu_expert_ffn(moesh_backend * be, const moesh_expert_ffn_args * args) {
    return guarded(be, "expert_ffn", [&]() -> moesh_status {
        moesh_expert_ffn_args a;
        if (!read_args(be, args, "expert_ffn", "moesh_expert_ffn_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.gate && a.up && a.down && a.x && a.out && a.scratch,
                          "expert_ffn: gate, up, down, x, out and scratch must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_embd > 0 && a.n_ff > 0 && a.n_tokens > 0,
                          "expert_ffn: n_embd (%lld), n_ff (%lld) and n_tokens (%lld) must be positive",
                          ll(a.n_embd), ll(a.n_ff), ll(a.n_tokens));
        int64_t n_w = 0;
        int64_t n_x = 0;
        int64_t n_h = 0;
        int64_t work = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_ff, a.n_embd, &n_w) && product_fits(a.n_tokens, a.n_embd, &n_x) &&
                              product_fits(2 * a.n_tokens, a.n_ff, &n_h) && product_fits(3 * n_w, a.n_tokens, &work),
                          "expert_ffn: sizes overflow");
        if (!weight_type_ok(a.w_type)) {
            return unsupported_weight_type(be, "expert_ffn", a.w_type);
        }
        MOESH_PLUGIN_REQUIRE(whole_blocks(a.w_type, a.n_embd) && whole_blocks(a.w_type, a.n_ff),
                          "expert_ffn: n_embd (%lld) and n_ff (%lld) must be multiples of %lld for block weight dtype %d",
                          ll(a.n_embd), ll(a.n_ff), ll(moesh::cpu::quant_block_elems(a.w_type)), int(a.w_type));
        MOESH_PLUGIN_REQUIRE(packed_ok(a.w_type, a.gate, a.n_ff, a.n_embd) && packed_ok(a.w_type, a.up, a.n_ff, a.n_embd) &&
                              packed_ok(a.w_type, a.down, a.n_embd, a.n_ff),
                          "expert_ffn: gate, up and down are not what pack_weights wrote for dtype %d and shapes "
                          "[%lld, %lld], [%lld, %lld]",
                          int(a.w_type & ~MOESH_DTYPE_PACKED), ll(a.n_ff), ll(a.n_embd), ll(a.n_embd), ll(a.n_ff));
        MOESH_PLUGIN_REQUIRE(disjoint(a.scratch, size_t(n_h) * 4, a.x, size_t(n_x) * 4) &&
                              disjoint(a.scratch, size_t(n_h) * 4, a.out, size_t(n_x) * 4),
                          "expert_ffn: scratch overlaps x or out");
        MOESH_PLUGIN_REQUIRE(a.out == a.x || disjoint(a.out, size_t(n_x) * 4, a.x, size_t(n_x) * 4),
                          "expert_ffn: out partly overlaps x (only out == x is allowed)");
        const int n_active = n_active_threads(be, work);
        if (moesh::cpu::is_quant_type(a.w_type) && be->precise) {
            quant_expert_ffn_precise(be, a, work, n_active);
            return MOESH_OK;
        }
        if (moesh::cpu::is_quant_type(a.w_type)) {
            // x quantized once; each thread quantizes the activation blocks of h
            // it computes (its features come in whole blocks), so the down pass
            // (after the barrier) reads h as 8-bit.
            const moesh::cpu::QuantActs xq = quant_buffer(be->quant_x, a.n_embd, a.n_tokens, a.w_type);
            const moesh::cpu::QuantActs hq = quant_buffer(be->quant_h, a.n_ff, a.n_tokens, a.w_type);
            const int64_t unit = moesh::cpu::quant_block_elems(a.w_type);
            moesh::cpu::quantize_acts(a.x, a.n_embd, 0, a.n_tokens, xq);
            size_t stride = 0;
            uint8_t * panels = thread_panels(be, std::max(a.n_embd, a.n_ff), &stride);
            auto gate_up = [&](int ith, int64_t part, int64_t n_parts) {
                const Range u = split(a.n_ff / unit, part, n_parts);
                moesh::cpu::quant_gate_up_rows(a, xq, u.begin * unit, u.end * unit, panels + size_t(ith) * stride,
                                               hq);
            };
            run_parallel(be, work, n_active, gate_up);
            auto down = [&](int ith, int64_t part, int64_t n_parts) {
                const Range u = split((a.n_embd + k_quant_row_unit - 1) / k_quant_row_unit, part, n_parts);
                moesh::cpu::quant_down_rows(a, hq, u.begin * k_quant_row_unit,
                                            std::min(u.end * k_quant_row_unit, a.n_embd),
                                            panels + size_t(ith) * stride);
            };
            run_parallel(be, work, n_active, down);
            return MOESH_OK;
        }
        moesh_expert_ffn_args k = a;   // as the kernels see it
        if (moesh::cpu::needs_kernel_layout(a.w_type)) {
            k.x = be->activations.reserve(size_t(n_x));
            moesh::cpu::to_kernel_layout(a.w_type, a.x, a.n_embd, a.n_embd, a.n_tokens, be->activations.data());
        }
        // Two passes: every thread's down rows need all of h. The first pass
        // reads all of x before the second writes out, so out may be x.
        auto gate_up = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split((a.n_ff + 1) / 2, part, n_parts);
            moesh::cpu::expert_gate_up_rows(k, r.begin * 2, std::min(r.end * 2, a.n_ff));
        };
        run_parallel(be, work, n_active, gate_up);
        auto down = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split((a.n_embd + 3) / 4, part, n_parts);
            moesh::cpu::expert_down_rows(k, r.begin * 4, std::min(r.end * 4, a.n_embd));
        };
        run_parallel(be, work, n_active, down);
        return MOESH_OK;
    });
}

// A gate/up work unit of expert e costs this many tokens' worth plus its n tokens:
// its weights stream in once, then every token multiplies them.
constexpr int64_t k_moe_unit_weight_cost = 4;

moesh_status cpu_moe_ffn(moesh_backend * be, const moesh_moe_ffn_args * args) {
    return guarded(be, "moe_ffn", [&]() -> moesh_status {
        moesh_moe_ffn_args a;
        if (!read_args(be, args, "moe_ffn", "moesh_moe_ffn_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.experts && a.token && a.x && a.out && a.scratch,
                          "moe_ffn: experts, token, x, out and scratch must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_embd > 0 && a.n_ff > 0 && a.n_tokens > 0 && a.n_experts > 0 && a.n_pairs > 0,
                          "moe_ffn: n_embd (%lld), n_ff (%lld), n_tokens (%lld), n_experts (%lld) and n_pairs (%lld) "
                          "must be positive",
                          ll(a.n_embd), ll(a.n_ff), ll(a.n_tokens), ll(a.n_experts), ll(a.n_pairs));
        int64_t n_w = 0, n_x = 0, n_h = 0, work = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_ff, a.n_embd, &n_w) && product_fits(a.n_tokens, a.n_embd, &n_x) &&
                              product_fits(a.n_pairs, a.n_ff, &n_h) && product_fits(n_w, a.n_pairs, &work) &&
                              work <= INT64_MAX / 3 && product_fits(a.n_pairs, a.n_embd),
                          "moe_ffn: sizes overflow");
        work *= 3;   // gate, up and down
        if (!moesh::cpu::is_quant_type(a.w_type) || be->precise) {
            return fail(be, MOESH_ERR_UNSUPPORTED,
                        "moe_ffn: weight dtype %d%s is not supported (block types only, with fast activations); "
                        "use expert_ffn", int(a.w_type), be->precise ? " with precise activations" : "");
        }
        MOESH_PLUGIN_REQUIRE(whole_blocks(a.w_type, a.n_embd) && whole_blocks(a.w_type, a.n_ff),
                          "moe_ffn: n_embd (%lld) and n_ff (%lld) must be multiples of %lld for block weight dtype %d",
                          ll(a.n_embd), ll(a.n_ff), ll(moesh::cpu::quant_block_elems(a.w_type)), int(a.w_type));
        int64_t end = 0;   // of the previous expert's pairs
        for (int64_t e = 0; e < a.n_experts; ++e) {
            const moesh_moe_expert & x = a.experts[e];
            MOESH_PLUGIN_REQUIRE(x.n >= 0 && x.first >= end && x.first <= a.n_pairs && x.n <= a.n_pairs - x.first,
                              "moe_ffn: expert %lld's pairs [%lld, +%lld) overlap an earlier expert's, come out of "
                              "order or leave [0, n_pairs = %lld)",
                              ll(e), ll(x.first), ll(x.n), ll(a.n_pairs));
            end = x.first + x.n;
            if (x.n == 0) {
                continue;
            }
            MOESH_PLUGIN_REQUIRE(x.gate && x.up && x.down, "moe_ffn: expert %lld has a NULL gate, up or down", ll(e));
            MOESH_PLUGIN_REQUIRE(packed_ok(a.w_type, x.gate, a.n_ff, a.n_embd) &&
                                  packed_ok(a.w_type, x.up, a.n_ff, a.n_embd) &&
                                  packed_ok(a.w_type, x.down, a.n_embd, a.n_ff),
                              "moe_ffn: expert %lld's gate, up and down are not what pack_weights wrote for dtype %d "
                              "and shapes [%lld, %lld], [%lld, %lld]",
                              ll(e), int(a.w_type & ~MOESH_DTYPE_PACKED), ll(a.n_ff), ll(a.n_embd), ll(a.n_embd),
                              ll(a.n_ff));
        }
        for (int64_t p = 0; p < a.n_pairs; ++p) {
            MOESH_PLUGIN_REQUIRE(a.token[p] >= 0 && a.token[p] < a.n_tokens,
                              "moe_ffn: token[%lld] = %d is outside [0, n_tokens = %lld)", ll(p), int(a.token[p]),
                              ll(a.n_tokens));
        }
        MOESH_PLUGIN_REQUIRE(disjoint(a.out, size_t(n_x) * 4, a.x, size_t(n_x) * 4) &&
                              disjoint(a.out, size_t(n_x) * 4, a.scratch, size_t(n_h) * 4) &&
                              disjoint(a.scratch, size_t(n_h) * 4, a.x, size_t(n_x) * 4),
                          "moe_ffn: out, x and scratch must not overlap");

        // Each pair's row of x quantized, so that an expert's rows lie together.
        const moesh::cpu::QuantActs xq = quant_buffer(be->quant_x, a.n_embd, a.n_pairs, a.w_type);
        const moesh::cpu::QuantActs hq = quant_buffer(be->quant_h, a.n_ff, a.n_pairs, a.w_type);
        auto quantize = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split(a.n_pairs, part, n_parts);
            for (int64_t p = r.begin; p < r.end; ++p) {
                moesh::cpu::quantize_acts(a.x + size_t(a.token[p]) * size_t(a.n_embd), a.n_embd, 0, 1,
                                          moesh::cpu::quant_rows_from(xq, p));
            }
        };
        run_parallel(be, a.n_pairs * a.n_embd, a.n_pairs, quantize);   // fits: checked above

        auto expert_args = [&](const moesh_moe_expert & x) {
            moesh_expert_ffn_args f{};
            f.struct_size = sizeof f;
            f.w_type = a.w_type;
            f.gate = x.gate;
            f.up = x.up;
            f.down = x.down;
            f.x = a.x;   // unread: the kernels take xq
            f.scale = a.weight ? a.weight + x.first : nullptr;
            f.out = a.out;
            f.scratch = a.scratch + size_t(x.first) * size_t(a.n_ff);
            f.n_embd = a.n_embd;
            f.n_ff = a.n_ff;
            f.n_tokens = x.n;
            return f;
        };
        // gate/up: units of `unit` features of every expert with tokens, shared out by cost
        // (cum[e] is the cost before expert e; ubase[e] the units before it).
        const int64_t unit = moesh::cpu::quant_block_elems(a.w_type);
        const int64_t per_expert = a.n_ff / unit;
        std::vector<int64_t> & cum = be->moe_cost;
        cum.resize(size_t(2 * a.n_experts + 2));
        int64_t * ubase = cum.data() + a.n_experts + 1;
        cum[0] = 0;
        ubase[0] = 0;
        for (int64_t e = 0; e < a.n_experts; ++e) {
            const int64_t n = a.experts[e].n;
            cum[size_t(e) + 1] = cum[size_t(e)] + (n > 0 ? per_expert * (k_moe_unit_weight_cost + n) : 0);
            ubase[e + 1] = ubase[e] + (n > 0 ? per_expert : 0);
        }
        const int64_t total_cost = cum[size_t(a.n_experts)], n_units = ubase[a.n_experts];
        // The first unit at or after cost position c (units of expert e cost k + n_e each).
        auto unit_at = [&](int64_t c) -> int64_t {
            if (c >= total_cost) {
                return n_units;
            }
            const int64_t e = std::upper_bound(cum.begin(), cum.begin() + a.n_experts + 1, c) - cum.begin() - 1;
            const int64_t uc = k_moe_unit_weight_cost + a.experts[e].n;
            return ubase[e] + (c - cum[size_t(e)] + uc - 1) / uc;
        };
        size_t stride = 0;
        uint8_t * panels = thread_panels(be, std::max(a.n_embd, a.n_ff), &stride);
        auto gate_up = [&](int ith, int64_t part, int64_t n_parts) {
            // floor(total_cost * p / n_parts) without overflow
            auto cost_at = [&](int64_t p) { return total_cost / n_parts * p + total_cost % n_parts * p / n_parts; };
            const int64_t u1 = unit_at(cost_at(part)), u2 = unit_at(cost_at(part + 1));
            int64_t e = std::upper_bound(ubase, ubase + a.n_experts + 1, u1) - ubase - 1;
            for (int64_t u = u1; u < u2; ++e) {
                if (ubase[e + 1] <= u) {
                    continue;   // an expert without tokens (no units)
                }
                const int64_t u_end = std::min(u2, ubase[e + 1]);
                const moesh_moe_expert & x = a.experts[e];
                moesh::cpu::quant_gate_up_rows(expert_args(x), moesh::cpu::quant_rows_from(xq, x.first),
                                               (u - ubase[e]) * unit, (u_end - ubase[e]) * unit,
                                               panels + size_t(ith) * stride, moesh::cpu::quant_rows_from(hq, x.first));
                u = u_end;
            }
        };
        run_parallel(be, work, n_units, gate_up);
        // down: every part owns whole cache lines of each output row, for every expert in turn.
        auto down = [&](int ith, int64_t part, int64_t n_parts) {
            const Range u = split((a.n_embd + k_quant_row_unit - 1) / k_quant_row_unit, part, n_parts);
            for (int64_t e = 0; e < a.n_experts; ++e) {
                const moesh_moe_expert & x = a.experts[e];
                if (x.n > 0) {
                    moesh::cpu::quant_down_rows(expert_args(x), moesh::cpu::quant_rows_from(hq, x.first),
                                                u.begin * k_quant_row_unit, std::min(u.end * k_quant_row_unit, a.n_embd),
                                                panels + size_t(ith) * stride, a.token + x.first);
                }
            }
        };
        run_parallel(be, work, (a.n_embd + k_quant_row_unit - 1) / k_quant_row_unit, down);
        return MOESH_OK;
    });
}

moesh_status cpu_softmax(moesh_backend * be, const moesh_softmax_args * args) {
    return guarded(be, "softmax", [&]() -> moesh_status {
        moesh_softmax_args a;
        if (!read_args(be, args, "softmax", "moesh_softmax_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        MOESH_PLUGIN_REQUIRE(a.x, "softmax: x must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.reserved == 0, "softmax: reserved is %u, must be 0", unsigned(a.reserved));
        MOESH_PLUGIN_REQUIRE(a.n > 0 && a.n_rows > 0, "softmax: n (%lld) and n_rows (%lld) must be positive", ll(a.n),
                          ll(a.n_rows));
        int64_t n_x = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n, a.n_rows, &n_x), "softmax: sizes overflow");
        auto task = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split(a.n_rows, part, n_parts);
            moesh::cpu::softmax_rows(a, r.begin, r.end);
        };
        run_parallel(be, n_x * 8, a.n_rows, task);
        return MOESH_OK;
    });
}

// Checks one sequence's attention arguments (op names the call in messages); the longest
// context any of its queries attends into *n_ctx_max.
moesh_status check_attention(moesh_backend * be, const moesh_attention_args & a, const char * op, int64_t * n_ctx_max) {
    const moesh_status s = moesh::plugin::check_attention_shape(be, a, op);
    if (s != MOESH_OK) {
        return s;
    }
    int64_t n_items = 0;
    int64_t n_q = 0;
    int64_t kv_row = 0;
    int64_t n_pool_rows = 0;
    // Every block id is checked to be < n_blocks, so this bounds every cache offset.
    MOESH_PLUGIN_REQUIRE(product_fits(a.n_tokens, a.n_head, &n_items) && product_fits(n_items, a.head_dim, &n_q) &&
                          product_fits(a.n_head_kv, a.head_dim, &kv_row) &&
                          product_fits(a.n_blocks, a.block_size, &n_pool_rows) && product_fits(n_pool_rows, kv_row),
                      "%s: sizes overflow", op);
    MOESH_PLUGIN_REQUIRE(std::isfinite(a.scale), "%s: scale must be finite", op);
    *n_ctx_max = 0;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        MOESH_PLUGIN_REQUIRE(a.pos[t] >= 0 && a.pos[t] < a.n_kv, "%s: pos[%lld] = %d is outside [0, n_kv = %lld)", op,
                          ll(t), int(a.pos[t]), ll(a.n_kv));
        *n_ctx_max = std::max(*n_ctx_max, int64_t(a.pos[t]) + 1);
    }
    const int64_t n_table = a.n_kv / a.block_size + (a.n_kv % a.block_size != 0);   // ceil(n_kv / block_size)
    for (int64_t b = 0; b < n_table; ++b) {
        MOESH_PLUGIN_REQUIRE(a.block_table[b] >= 0 && a.block_table[b] < a.n_blocks,
                          "%s: block_table[%lld] = %d is outside [0, n_blocks = %lld)", op, ll(b),
                          int(a.block_table[b]), ll(a.n_blocks));
    }
    return MOESH_OK;
}

moesh_status cpu_attention(moesh_backend * be, const moesh_attention_args * args) {
    return guarded(be, "attention", [&]() -> moesh_status {
        moesh_attention_args a;
        if (!read_args(be, args, "attention", "moesh_attention_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        int64_t n_ctx_max = 0;
        const moesh_status s = check_attention(be, a, "attention", &n_ctx_max);
        if (s != MOESH_OK) {
            return s;
        }
        const int hpi = moesh::cpu::attention_heads_per_item(a.n_head, a.n_head_kv, a.n_tokens, be->pool.n_threads());
        const int64_t n_items = a.n_tokens * (a.n_head / hpi);
        int64_t stride = 0;
        float * scores = thread_scratch(be, hpi * n_ctx_max, &stride);   // [n_threads, stride]
        auto task = [&](int ith, int64_t part, int64_t n_parts) {
            const Range r = split(n_items, part, n_parts);
            moesh::cpu::attention_items(a, hpi, r.begin, r.end, scores + ith * stride);
        };
        int64_t work = 0;   // multiply-adds, however the heads are grouped
        product_fits(a.n_tokens * a.n_head * a.head_dim, 2 * n_ctx_max, &work);
        run_parallel(be, work, n_items, task);
        return MOESH_OK;
    });
}

moesh_status cpu_attention_batch(moesh_backend * be, const moesh_attention_batch_args * args) {
    return guarded(be, "attention_batch", [&]() -> moesh_status {
        moesh_attention_batch_args b;
        if (!read_args(be, args, "attention_batch", "moesh_attention_batch_args", &b)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        int64_t q_row = 0;   // floats per row of q and out
        moesh_status s = moesh::plugin::check_attention_batch(be, b, &q_row);
        if (s != MOESH_OK) {
            return s;
        }
        // Each run as the attention call it stands for, checked as that call is.
        std::vector<moesh_attention_args> & runs = be->attention_runs;
        runs.resize(size_t(b.n_runs));
        int64_t end = 0, n_tokens = 0, n_ctx_max = 0, work = 0;
        for (int64_t r = 0; r < b.n_runs; ++r) {
            moesh_attention_args & a = runs[size_t(r)];
            if ((s = moesh::plugin::attention_batch_run(be, b, r, q_row, &end, &a)) != MOESH_OK) {
                return s;
            }
            const moesh_attention_run & u = b.runs[r];
            char op[64];
            std::snprintf(op, sizeof op, "attention_batch: run %lld", ll(r));
            int64_t n_ctx = 0;
            if ((s = check_attention(be, a, op, &n_ctx)) != MOESH_OK) {
                return s;
            }
            n_ctx_max = std::max(n_ctx_max, n_ctx);
            n_tokens += u.n_tokens;
            int64_t w = INT64_MAX;
            product_fits(u.n_tokens * q_row, 2 * n_ctx, &w);
            work = w > INT64_MAX - work ? INT64_MAX : work + w;
        }
        const int hpi = moesh::cpu::attention_heads_per_item(b.n_head, b.n_head_kv, n_tokens, be->pool.n_threads());
        const int64_t n_items = n_tokens * (b.n_head / hpi);
        int64_t stride = 0;
        float * scores = thread_scratch(be, hpi * n_ctx_max, &stride);   // [n_threads, stride]
        // Items (token, heads) of all runs in order; a part walks the runs its range covers.
        auto task = [&](int ith, int64_t part, int64_t n_parts) {
            const Range rg = split(n_items, part, n_parts);
            int64_t base = 0;
            for (const moesh_attention_args & a : runs) {
                const int64_t n = a.n_tokens * (a.n_head / hpi);
                const int64_t i0 = std::max(rg.begin - base, int64_t(0)), i1 = std::min(rg.end - base, n);
                if (i0 < i1) {
                    moesh::cpu::attention_items(a, hpi, i0, i1, scores + ith * stride);
                }
                base += n;
                if (base >= rg.end) {
                    break;
                }
            }
        };
        run_parallel(be, work, n_items, task);
        return MOESH_OK;
    });
}

moesh_status cpu_copy_rows(moesh_backend * be, const moesh_copy_rows_args * args) {
    return guarded(be, "copy_rows", [&]() -> moesh_status {
        moesh_copy_rows_args a;
        if (!read_args(be, args, "copy_rows", "moesh_copy_rows_args", &a)) {
            return MOESH_ERR_INVALID_ARGUMENT;
        }
        moesh_status s = moesh::plugin::check_copy_rows(be, a);
        if (s == MOESH_OK) {
            s = moesh::plugin::check_copy_rows_indices(be, a);
        }
        if (s == MOESH_OK) {
            // The common cases as plain copies and adds the compiler vectorises; rows split
            // between threads when there are enough of them (prefill glue).
            const size_t row_bytes = size_t(a.n_cols) * sizeof(float);
            auto task = [&](int, int64_t part, int64_t n_parts) {
                const Range r = split(a.n_rows, part, n_parts);
                if (a.dst_type == MOESH_DTYPE_F16) {   // KV cache writes: few rows, converted one by one
                    moesh::cpu::copy_rows_f16(a, r.begin, r.end);
                    return;
                }
                if (a.dst_type == MOESH_DTYPE_Q8_0) {   // KV cache writes, quantized as the reference does
                    moesh::cpu::copy_rows_q8_0(a, r.begin, r.end);
                    return;
                }
                for (int64_t i = r.begin; i < r.end; ++i) {
                    const int64_t k = a.src_rows ? a.src_rows[i] : i;
                    const float * src = a.src ? a.src + k * a.src_stride : nullptr;
                    float * dst = static_cast<float *>(a.dst) + (a.dst_rows ? a.dst_rows[i] : i) * a.dst_stride;
                    if (!a.accumulate && src != dst) {
                        if (src) std::memcpy(dst, src, row_bytes);
                        else std::memset(dst, 0, row_bytes);
                    } else if (a.accumulate && src) {
                        for (int64_t j = 0; j < a.n_cols; ++j) dst[j] += src[j];
                    }
                    if (a.clamp > 0.0f) {
                        for (int64_t j = 0; j < a.n_cols; ++j) dst[j] = std::clamp(dst[j], -a.clamp, a.clamp);
                    }
                }
            };
            int64_t work = 0;
            product_fits(a.n_rows, a.n_cols, &work);
            run_parallel(be, work / 4, a.n_rows, task);   // a moved value costs about a quarter of a multiply-add
        }
        return s;
    });
}

// ---------------------------------------------------------------- packing

moesh_status cpu_packed_size(moesh_backend * be, int32_t w_type, int64_t n_rows, int64_t n_cols, size_t * out) {
    return guarded(be, "packed_size", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(out, "packed_size: out_bytes is NULL");
        *out = 0;
        if (!moesh::cpu::is_packable(w_type)) {
            return fail(be, MOESH_ERR_UNSUPPORTED, "packed_size: dtype %d is not packed by the cpu backend (q8_0, q4_0 are)",
                        int(w_type));
        }
        MOESH_PLUGIN_REQUIRE(n_rows > 0 && n_cols > 0 && n_cols % 32 == 0,
                          "packed_size: n_rows (%lld) must be positive and n_cols (%lld) a positive multiple of 32",
                          ll(n_rows), ll(n_cols));
        *out = moesh::cpu::packed_bytes(w_type, n_rows, n_cols);
        MOESH_PLUGIN_REQUIRE(*out > 0, "packed_size: [%lld, %lld] overflows", ll(n_rows), ll(n_cols));
        return MOESH_OK;
    });
}

moesh_status cpu_pack_weights(moesh_backend * be, int32_t w_type, const void * w, int64_t n_rows, int64_t n_cols,
                              void * dst, size_t dst_bytes) {
    return guarded(be, "pack_weights", [&]() -> moesh_status {
        size_t need = 0;
        const moesh_status s = cpu_packed_size(be, w_type, n_rows, n_cols, &need);
        if (s != MOESH_OK) {
            return s;
        }
        MOESH_PLUGIN_REQUIRE(w && dst, "pack_weights: w and dst must not be NULL");
        MOESH_PLUGIN_REQUIRE(dst_bytes >= need, "pack_weights: dst_bytes %zu is less than the %zu packed_size says",
                          dst_bytes, need);
        MOESH_PLUGIN_REQUIRE(disjoint(w, size_t(n_rows) * size_t(n_cols / 32) * (w_type == MOESH_DTYPE_Q4_0 ? 18 : 34),
                                   dst, need),
                          "pack_weights: dst overlaps w");
        moesh::cpu::pack_header(w_type, n_rows, n_cols, dst);
        const int64_t n_tiles = (n_rows + 7) / 8;
        auto task = [&](int, int64_t part, int64_t n_parts) {
            const Range r = split(n_tiles, part, n_parts);
            moesh::cpu::pack_tiles(w_type, w, n_rows, n_cols, dst, r.begin, r.end);
        };
        int64_t work = INT64_MAX;
        product_fits(n_rows, n_cols, &work);
        run_parallel(be, work, n_tiles, task);
        return MOESH_OK;
    });
}

const moesh_backend_iface k_cpu_iface = {
    /* .abi_version    = */ MOESH_PLUGIN_ABI_VERSION,
    /* .struct_size    = */ sizeof(moesh_backend_iface),
    /* .name           = */ "cpu",
    /* .host_memory    = */ 1,
    /* .create         = */ cpu_create,
    /* .destroy        = */ cpu_destroy,
    /* .last_error     = */ cpu_last_error,
    /* .memory_info    = */ cpu_memory_info,
    /* .buffer_alloc   = */ cpu_buffer_alloc,
    /* .buffer_free    = */ cpu_buffer_free,
    /* .copy_to_device = */ cpu_copy_to_device,
    /* .copy_to_host   = */ cpu_copy_to_host,
    /* .synchronize    = */ cpu_synchronize,
    /* .supports       = */ cpu_supports,
    /* .matmul         = */ cpu_matmul,
    /* .rms_norm       = */ cpu_rms_norm,
    /* .rope           = */ cpu_rope,
    /* .expert_ffn     = */ cpu_expert_ffn,
    /* .softmax        = */ cpu_softmax,
    /* .attention      = */ cpu_attention,
    /* .packed_size    = */ cpu_packed_size,
    /* .pack_weights   = */ cpu_pack_weights,
    /* .copy_rows      = */ cpu_copy_rows,
    /* .moe_ffn        = */ cpu_moe_ffn,
    /* .attention_batch = */ cpu_attention_batch,
    /* .copy_to_device_async = */ nullptr,
    /* .copy_wait = */ nullptr,
    /* .copy_elapsed = */ nullptr,
};

} // namespace

extern "C" {

MOESH_PLUGIN_EXPORT moesh_status moesh_plugin_init(const moesh_host_api * host, const moesh_backend_iface ** out) {
    if (!out) {
        host_log(host, MOESH_LOG_ERROR, "cpu backend: init: out is NULL");
        return MOESH_ERR_INVALID_ARGUMENT;
    }
    *out = nullptr;
    if (!host) {
        return MOESH_ERR_INVALID_ARGUMENT;
    }
    // Tables are append-only, so a newer host still offers what this plugin
    // reads; an older one (or one whose table is too short) does not.
    if (host->abi_version < MOESH_PLUGIN_ABI_VERSION ||
        host->struct_size < offsetof(moesh_host_api, log) + sizeof(host->log)) {
        host_log(host, MOESH_LOG_ERROR,
                 "cpu backend: host ABI version %u (struct_size %u) is older than the plugin's version %u",
                 unsigned(host->abi_version), unsigned(host->struct_size), unsigned(MOESH_PLUGIN_ABI_VERSION));
        return MOESH_ERR_ABI_MISMATCH;
    }
    *out = &k_cpu_iface;
    return MOESH_OK;
}

MOESH_PLUGIN_EXPORT int32_t moesh_plugin_score(void) {
    return k_score;
}

} // extern "C"
