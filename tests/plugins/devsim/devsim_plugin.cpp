// "devsim": a device-memory backend for tests on machines without a GPU. It
// computes with the reference kernels but keeps the rules a GPU imposes, and
// enforces them so that a host that breaks one fails here instead of on a GPU:
//   - host_memory = 0: every data pointer of an op must lie, with its whole
//     extent, inside a live buffer_alloc buffer; a host pointer is refused;
//   - buffers are mapped PROT_NONE except during the op or copy that uses
//     them, so a host that reads or writes "device" memory directly crashes;
//   - copy_to_device / copy_to_host check that one side is a buffer and the
//     other is not;
//   - memory is limited: MOESH_DEVSIM_MEMORY (bytes, default 1 GiB) is what
//     memory_info reports and what buffer_alloc gives out at most;
//   - copy_to_device_async copies as late as the ABI allows: when an op or copy
//     first touches dst after a copy_wait covering the ticket, at copy_wait with
//     wait_host = 1, or at synchronize. Touching dst before any copy_wait is an
//     error, and a src changed or freed too early gives wrong bytes, as on a GPU.
//     copy_elapsed reports how long the memcpy took, once performed.
// Not installed; built for the tests only.
#include <moesh/plugin.h>

#include "common/plugin_support.h"
#include "reference_kernels.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <vector>

struct moesh_backend {
    moesh_host_api host{};
    std::map<uintptr_t, size_t> buffers;   // start -> mapped bytes
    size_t limit = 0, used = 0;
    char last_error[512] = "";
    struct Pending {
        uint64_t ticket;
        uint8_t * dst;
        const void * src;
        size_t n;
    };
    std::vector<Pending> pending;   // async copies not performed yet, in ticket order
    uint64_t next_ticket = 1;
    uint64_t fenced = 0;            // copies up to this ticket may be touched by ops
    static constexpr uint64_t k_timed = 64;   // the latest tickets whose time is kept
    struct Timed {
        uint64_t ticket = 0;
        double seconds = -1;
    };
    Timed timed[k_timed];   // ticket t in t % k_timed
};

namespace {

using moesh::plugin::fail;
using moesh::plugin::guarded;
using moesh::plugin::ll;
using moesh::plugin::read_args;

size_t page_round(size_t n) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
}

// The buffer holding [p, p + n), or buffers.end().
std::map<uintptr_t, size_t>::iterator find_buffer(moesh_backend * be, const void * p, size_t n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = be->buffers.upper_bound(a);
    if (it == be->buffers.begin()) return be->buffers.end();
    --it;
    if (a < it->first || a + n > it->first + it->second || a + n < a) return be->buffers.end();
    return it;
}

// Performs pending async copies [0, upto) of the list (their dst buffers opened just for it).
void perform(moesh_backend * be, size_t upto) {
    for (size_t i = 0; i < upto; ++i) {
        const auto & c = be->pending[i];
        auto it = find_buffer(be, c.dst, c.n);
        if (it == be->buffers.end()) std::abort();   // buffer_free drops a buffer's copies: a devsim bug
        mprotect(reinterpret_cast<void *>(it->first), it->second, PROT_READ | PROT_WRITE);
        const auto t0 = std::chrono::steady_clock::now();
        std::memcpy(c.dst, c.src, c.n);
        be->timed[c.ticket % be->k_timed] = {c.ticket, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
        mprotect(reinterpret_cast<void *>(it->first), it->second, PROT_NONE);
    }
    be->pending.erase(be->pending.begin(), be->pending.begin() + ptrdiff_t(upto));
}

// Before an op or copy touches [p, p + n): false (with last_error) when a copy not yet waited
// for writes there; otherwise the copies up to the last that writes there are performed.
bool settle(moesh_backend * be, const void * p, size_t n, const char * what, bool * performed) {
    const auto * a = static_cast<const uint8_t *>(p);
    size_t upto = 0;
    for (size_t i = 0; i < be->pending.size(); ++i) {
        const auto & c = be->pending[i];
        if (c.dst >= a + n || a >= c.dst + c.n) continue;
        if (c.ticket > be->fenced) {
            fail(be, MOESH_ERR_INVALID_ARGUMENT,
                 "%s: %p (+%zu bytes) is written by async copy %llu, which no copy_wait has covered yet", what, p, n,
                 static_cast<unsigned long long>(c.ticket));
            return false;
        }
        upto = i + 1;
    }
    perform(be, upto);
    *performed = upto > 0;
    return true;
}

// The buffers an op touches, opened for the op and closed again after it.
class Access {
public:
    explicit Access(moesh_backend * be) : be_(be) {}
    moesh_status refusal = MOESH_ERR_INVALID_ARGUMENT;   // what a failed check returns; a check may set it
    ~Access() {
        for (auto & [start, size] : open_) mprotect(reinterpret_cast<void *>(start), size, PROT_NONE);
    }
    // False (with last_error) unless [p, p + n) lies in one buffer. NULL with n == 0 is fine.
    bool need(const void * p, size_t n, const char * what) {
        if (!p && n == 0) return true;
        auto it = find_buffer(be_, p, n ? n : 1);
        if (it == be_->buffers.end()) {
            fail(be_, MOESH_ERR_INVALID_ARGUMENT, "%s: %p (+%zu bytes) is not inside a buffer_alloc buffer", what, p, n);
            return false;
        }
        bool performed = false;
        if (!settle(be_, p, n ? n : 1, what, &performed)) return false;
        if (performed)   // perform closed the buffers it wrote; reopen what this op holds
            for (auto & o : open_) mprotect(reinterpret_cast<void *>(o.first), o.second, PROT_READ | PROT_WRITE);
        for (auto & o : open_)
            if (o.first == it->first) return true;
        mprotect(reinterpret_cast<void *>(it->first), it->second, PROT_READ | PROT_WRITE);
        open_.push_back(*it);
        return true;
    }

private:
    moesh_backend * be_;
    std::vector<std::pair<uintptr_t, size_t>> open_;
};

size_t f32s(int64_t n) { return size_t(n) * sizeof(float); }
size_t rows(int64_t n_rows, int64_t stride, int64_t width) { return n_rows <= 0 ? 0 : f32s((n_rows - 1) * stride + width); }

moesh_status devsim_create(const moesh_backend_params *, const moesh_host_api * host, moesh_backend ** out) {
    if (!out) return MOESH_ERR_INVALID_ARGUMENT;
    auto * be = new (std::nothrow) moesh_backend();
    if (!be) return MOESH_ERR_OUT_OF_MEMORY;
    if (host) std::memcpy(&be->host, host, std::min<size_t>(host->struct_size, sizeof be->host));
    const char * env = std::getenv("MOESH_DEVSIM_MEMORY");
    be->limit = env ? size_t(std::strtoull(env, nullptr, 10)) : size_t(1) << 30;
    *out = be;
    return MOESH_OK;
}

void devsim_destroy(moesh_backend * be) {
    if (!be) return;
    for (auto & [start, size] : be->buffers) munmap(reinterpret_cast<void *>(start), size);
    delete be;
}

const char * devsim_last_error(moesh_backend * be) { return be ? be->last_error : "devsim: NULL context"; }

moesh_status devsim_memory_info(moesh_backend * be, uint64_t * free_bytes, uint64_t * total_bytes) {
    if (!be || !free_bytes || !total_bytes) return MOESH_ERR_INVALID_ARGUMENT;
    *free_bytes = be->limit - be->used;
    *total_bytes = be->limit;
    return MOESH_OK;
}

moesh_status devsim_buffer_alloc(moesh_backend * be, size_t n_bytes, void ** out) {
    return guarded(be, "buffer_alloc", [&]() -> moesh_status {
        if (!out || n_bytes == 0) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "buffer_alloc: out NULL or 0 bytes");
        const size_t size = page_round(n_bytes);
        if (size > be->limit - be->used)
            return fail(be, MOESH_ERR_OUT_OF_MEMORY, "buffer_alloc: %zu bytes wanted, %zu of %zu free", n_bytes,
                        be->limit - be->used, be->limit);
        void * p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return fail(be, MOESH_ERR_OUT_OF_MEMORY, "buffer_alloc: mmap of %zu bytes failed", size);
        be->buffers[reinterpret_cast<uintptr_t>(p)] = size;
        be->used += size;
        *out = p;
        return MOESH_OK;
    });
}

void devsim_buffer_free(moesh_backend * be, void * ptr) {
    if (!be || !ptr) return;
    auto it = be->buffers.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == be->buffers.end()) std::abort();   // freeing what was not allocated: a host bug, loudly
    const auto * lo = static_cast<const uint8_t *>(ptr);
    // A GPU's free waits for the copies into the buffer; their bytes are gone with it.
    std::erase_if(be->pending, [&](const moesh_backend::Pending & c) { return c.dst >= lo && c.dst < lo + it->second; });
    munmap(ptr, it->second);
    be->used -= it->second;
    be->buffers.erase(it);
}

moesh_status devsim_copy(moesh_backend * be, void * dst, const void * src, size_t n, bool to_device) {
    const char * what = to_device ? "copy_to_device" : "copy_to_host";
    const void * dev = to_device ? static_cast<const void *>(dst) : src;
    const void * host = to_device ? src : static_cast<const void *>(dst);
    if (n == 0) return MOESH_OK;
    if (!dst || !src) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: NULL pointer", what);
    if (find_buffer(be, host, 1) != be->buffers.end())
        return fail(be, MOESH_ERR_INVALID_ARGUMENT, "%s: the host side %p is device memory", what, host);
    Access acc(be);
    if (!acc.need(dev, n, what)) return MOESH_ERR_INVALID_ARGUMENT;
    std::memcpy(dst, src, n);
    return MOESH_OK;
}

moesh_status devsim_copy_to_device(moesh_backend * be, void * dst, const void * src, size_t n) {
    return guarded(be, "copy_to_device", [&] { return devsim_copy(be, dst, src, n, true); });
}

moesh_status devsim_copy_to_host(moesh_backend * be, void * dst, const void * src, size_t n) {
    return guarded(be, "copy_to_host", [&] { return devsim_copy(be, dst, src, n, false); });
}

moesh_status devsim_copy_to_device_async(moesh_backend * be, void * dst, const void * src, size_t n, uint64_t * ticket) {
    return guarded(be, "copy_to_device_async", [&]() -> moesh_status {
        if (!ticket) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_to_device_async: ticket is NULL");
        if (n > 0) {
            if (!dst || !src) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_to_device_async: NULL pointer");
            if (find_buffer(be, src, 1) != be->buffers.end())
                return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_to_device_async: the host side %p is device memory", src);
            if (find_buffer(be, dst, n) == be->buffers.end())
                return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                            "copy_to_device_async: %p (+%zu bytes) is not inside a buffer_alloc buffer", dst, n);
        }
        *ticket = be->next_ticket++;
        if (n > 0)
            be->pending.push_back({*ticket, static_cast<uint8_t *>(dst), src, n});
        else
            be->timed[*ticket % be->k_timed] = {*ticket, 0.0};
        return MOESH_OK;
    });
}

moesh_status devsim_copy_wait(moesh_backend * be, uint64_t ticket, int32_t wait_host) {
    return guarded(be, "copy_wait", [&]() -> moesh_status {
        if (wait_host != 0 && wait_host != 1)
            return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_wait: wait_host is %d, must be 0 or 1", int(wait_host));
        if (ticket == 0 || ticket >= be->next_ticket)
            return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_wait: ticket %llu was never issued (last: %llu)",
                        static_cast<unsigned long long>(ticket), static_cast<unsigned long long>(be->next_ticket - 1));
        be->fenced = std::max(be->fenced, ticket);
        if (wait_host) {
            size_t upto = 0;
            while (upto < be->pending.size() && be->pending[upto].ticket <= ticket) ++upto;
            perform(be, upto);
        }
        return MOESH_OK;
    });
}

moesh_status devsim_copy_elapsed(moesh_backend * be, uint64_t ticket, double * seconds) {
    return guarded(be, "copy_elapsed", [&]() -> moesh_status {
        if (!seconds) return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_elapsed: seconds is NULL");
        if (ticket == 0 || ticket >= be->next_ticket)
            return fail(be, MOESH_ERR_INVALID_ARGUMENT, "copy_elapsed: ticket %llu was never issued (last: %llu)",
                        static_cast<unsigned long long>(ticket), static_cast<unsigned long long>(be->next_ticket - 1));
        const auto & t = be->timed[ticket % be->k_timed];
        *seconds = t.ticket == ticket ? t.seconds : -1.0;
        return MOESH_OK;
    });
}

moesh_status devsim_synchronize(moesh_backend * be) {
    if (!be) return MOESH_ERR_INVALID_ARGUMENT;
    be->fenced = be->next_ticket - 1;
    perform(be, be->pending.size());
    return MOESH_OK;
}

int32_t devsim_supports(moesh_backend *, int32_t op, int32_t w_type) {
    switch (op) {
    case MOESH_OP_MATMUL:
    case MOESH_OP_EXPERT_FFN: return w_type >= MOESH_DTYPE_F32 && w_type <= MOESH_DTYPE_Q6_K ? 1 : 0;
    case MOESH_OP_ATTENTION:   // w_type: the KV pools' type; copy_rows: dst's
    case MOESH_OP_COPY_ROWS: return w_type == MOESH_DTYPE_F32 || w_type == MOESH_DTYPE_F16 ? 1 : 0;
    case MOESH_OP_RMS_NORM:
    case MOESH_OP_ROPE:
    case MOESH_OP_SOFTMAX: return 1;
    default: return 0;
    }
}

template <class T, class Check, class Run>
moesh_status op(moesh_backend * be, const T * args, const char * name, Check check, Run run) {
    return guarded(be, name, [&]() -> moesh_status {
        T a;
        if (!read_args(be, args, name, name, &a)) return MOESH_ERR_INVALID_ARGUMENT;
        Access acc(be);
        if (!check(a, acc)) return acc.refusal;
        return run(a);
    });
}

moesh_status devsim_matmul(moesh_backend * be, const moesh_matmul_args * args) {
    return op(be, args, "matmul", [&](const moesh_matmul_args & a, Access & acc) {
        const size_t row = moesh::ref::weight_row_bytes(a.w_type, a.n_in);
        return row > 0 && a.n_tokens > 0 && acc.need(a.w, row * size_t(a.n_out), "matmul w") &&
               acc.need(a.bias, a.bias ? f32s(a.n_out) : 0, "matmul bias") &&
               acc.need(a.x, rows(a.n_tokens, a.x_stride, a.n_in), "matmul x") &&
               acc.need(a.y, rows(a.n_tokens, a.y_stride, a.n_out), "matmul y");
    }, [](const moesh_matmul_args & a) { moesh::ref::matmul(a); return MOESH_OK; });
}

moesh_status devsim_rms_norm(moesh_backend * be, const moesh_rms_norm_args * args) {
    return op(be, args, "rms_norm", [&](const moesh_rms_norm_args & a, Access & acc) {
        return acc.need(a.x, f32s(a.n * a.n_rows), "rms_norm x") && acc.need(a.y, f32s(a.n * a.n_rows), "rms_norm y") &&
               acc.need(a.weight, f32s(a.n), "rms_norm weight");
    }, [](const moesh_rms_norm_args & a) { moesh::ref::rms_norm(a); return MOESH_OK; });
}

moesh_status devsim_rope(moesh_backend * be, const moesh_rope_args * args) {
    return op(be, args, "rope", [&](const moesh_rope_args & a, Access & acc) {
        return acc.need(a.x, f32s(a.n_tokens * a.n_head * a.head_dim), "rope x") &&
               acc.need(a.pos, size_t(a.n_tokens) * 4, "rope pos") && acc.need(a.inv_freq, f32s(a.rot_dim / 2), "rope inv_freq");
    }, [](const moesh_rope_args & a) { moesh::ref::rope(a); return MOESH_OK; });
}

moesh_status devsim_expert_ffn(moesh_backend * be, const moesh_expert_ffn_args * args) {
    return op(be, args, "expert_ffn", [&](const moesh_expert_ffn_args & a, Access & acc) {
        const size_t in_row = moesh::ref::weight_row_bytes(a.w_type, a.n_embd);
        const size_t ff_row = moesh::ref::weight_row_bytes(a.w_type, a.n_ff);
        return in_row > 0 && ff_row > 0 && acc.need(a.gate, in_row * size_t(a.n_ff), "expert_ffn gate") &&
               acc.need(a.up, in_row * size_t(a.n_ff), "expert_ffn up") &&
               acc.need(a.down, ff_row * size_t(a.n_embd), "expert_ffn down") &&
               acc.need(a.x, f32s(a.n_tokens * a.n_embd), "expert_ffn x") &&
               acc.need(a.out, f32s(a.n_tokens * a.n_embd), "expert_ffn out") &&
               acc.need(a.scale, a.scale ? f32s(a.n_tokens) : 0, "expert_ffn scale") &&
               acc.need(a.scratch, f32s(2 * a.n_tokens * a.n_ff), "expert_ffn scratch");
    }, [](const moesh_expert_ffn_args & a) { moesh::ref::expert_ffn(a); return MOESH_OK; });
}

moesh_status devsim_softmax(moesh_backend * be, const moesh_softmax_args * args) {
    return op(be, args, "softmax", [&](const moesh_softmax_args & a, Access & acc) {
        return acc.need(a.x, f32s(a.n * a.n_rows), "softmax x");
    }, [](const moesh_softmax_args & a) { moesh::ref::softmax(a); return MOESH_OK; });
}

moesh_status devsim_attention(moesh_backend * be, const moesh_attention_args * args) {
    return op(be, args, "attention", [&](const moesh_attention_args & a, Access & acc) {
        if (a.kv_type == MOESH_DTYPE_Q8_0) {   // valid by the ABI; devsim, standing in for a device, does not offer it
            acc.refusal = fail(be, MOESH_ERR_UNSUPPORTED, "attention: devsim reads KV pools of f32 or f16, not q8_0");
            return false;
        }
        if ((a.kv_type != MOESH_DTYPE_F32 && a.kv_type != MOESH_DTYPE_F16) || a.reserved2 != 0) {
            fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention: kv_type %d is neither f32 nor f16, or reserved2 (%u) is not 0",
                 int(a.kv_type), unsigned(a.reserved2));
            return false;
        }
        if (!(a.n_tokens > 0 && a.n_head > 0 && a.n_head_kv > 0 && a.head_dim > 0 && a.block_size > 0 && a.n_blocks > 0 &&
              a.n_kv > 0 && a.n_head % a.n_head_kv == 0)) {   // the sizes below divide by them
            fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention: a size is not positive, or n_head is not a multiple of n_head_kv");
            return false;
        }
        const size_t pool = size_t(a.n_blocks * a.block_size * a.n_head_kv * a.head_dim) * (a.kv_type == MOESH_DTYPE_F16 ? 2 : 4);
        const int64_t n_table = (a.n_kv + a.block_size - 1) / a.block_size;
        if (!(acc.need(a.q, f32s(a.n_tokens * a.n_head * a.head_dim), "attention q") &&
              acc.need(a.out, f32s(a.n_tokens * a.n_head * a.head_dim), "attention out") &&
              acc.need(a.k_pool, pool, "attention k_pool") && acc.need(a.v_pool, pool, "attention v_pool") &&
              acc.need(a.block_table, size_t(n_table) * 4, "attention block_table") &&
              acc.need(a.pos, size_t(a.n_tokens) * 4, "attention pos")))
            return false;
        for (int64_t t = 0; t < a.n_tokens; ++t) {
            if (a.pos[t] < 0 || a.pos[t] >= a.n_kv) {
                fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention: pos[%lld] = %d outside [0, %lld)", ll(t), int(a.pos[t]),
                     ll(a.n_kv));
                return false;
            }
        }
        for (int64_t b = 0; b < n_table; ++b) {
            if (a.block_table[b] < 0 || a.block_table[b] >= a.n_blocks) {
                fail(be, MOESH_ERR_INVALID_ARGUMENT, "attention: block_table[%lld] = %d outside [0, %lld)", ll(b),
                     int(a.block_table[b]), ll(a.n_blocks));
                return false;
            }
        }
        return true;
    }, [](const moesh_attention_args & a) { moesh::ref::attention(a); return MOESH_OK; });
}

moesh_status devsim_copy_rows(moesh_backend * be, const moesh_copy_rows_args * args) {
    return op(be, args, "copy_rows", [&](const moesh_copy_rows_args & a, Access & acc) {
        if (a.dst_type == MOESH_DTYPE_Q8_0) {   // valid by the ABI; devsim, standing in for a device, does not offer it
            acc.refusal = fail(be, MOESH_ERR_UNSUPPORTED, "copy_rows: devsim writes f32 or f16, not q8_0");
            return false;
        }
        return moesh::plugin::check_copy_rows(be, a) == MOESH_OK &&
               acc.need(a.dst, rows(a.dst_n_rows, a.dst_stride, a.n_cols) / (a.dst_type == MOESH_DTYPE_F16 ? 2 : 1),
                        "copy_rows dst") &&
               acc.need(a.src, a.src ? rows(a.src_n_rows, a.src_stride, a.n_cols) : 0, "copy_rows src") &&
               acc.need(a.src_rows, a.src_rows ? size_t(a.n_rows) * 4 : 0, "copy_rows src_rows") &&
               acc.need(a.dst_rows, a.dst_rows ? size_t(a.n_rows) * 4 : 0, "copy_rows dst_rows") &&
               moesh::plugin::check_copy_rows_indices(be, a) == MOESH_OK;
    }, [](const moesh_copy_rows_args & a) { moesh::ref::copy_rows(a); return MOESH_OK; });
}

const moesh_backend_iface k_iface = {
    /* .abi_version    = */ MOESH_PLUGIN_ABI_VERSION,
    /* .struct_size    = */ sizeof(moesh_backend_iface),
    /* .name           = */ "devsim",
    /* .host_memory    = */ 0,
    /* .create         = */ devsim_create,
    /* .destroy        = */ devsim_destroy,
    /* .last_error     = */ devsim_last_error,
    /* .memory_info    = */ devsim_memory_info,
    /* .buffer_alloc   = */ devsim_buffer_alloc,
    /* .buffer_free    = */ devsim_buffer_free,
    /* .copy_to_device = */ devsim_copy_to_device,
    /* .copy_to_host   = */ devsim_copy_to_host,
    /* .synchronize    = */ devsim_synchronize,
    /* .supports       = */ devsim_supports,
    /* .matmul         = */ devsim_matmul,
    /* .rms_norm       = */ devsim_rms_norm,
    /* .rope           = */ devsim_rope,
    /* .expert_ffn     = */ devsim_expert_ffn,
    /* .softmax        = */ devsim_softmax,
    /* .attention      = */ devsim_attention,
    /* .packed_size    = */ nullptr,
    /* .pack_weights   = */ nullptr,
    /* .copy_rows      = */ devsim_copy_rows,
    /* .moe_ffn        = */ nullptr,
    /* .attention_batch = */ nullptr,
    /* .copy_to_device_async = */ devsim_copy_to_device_async,
    /* .copy_wait = */ devsim_copy_wait,
    /* .copy_elapsed = */ devsim_copy_elapsed,
};

} // namespace

extern "C" {

MOESH_PLUGIN_EXPORT moesh_status moesh_plugin_init(const moesh_host_api * host, const moesh_backend_iface ** out) {
    if (!out || !host) return MOESH_ERR_INVALID_ARGUMENT;
    *out = &k_iface;
    return MOESH_OK;
}

// Below the cpu plugin: chosen only by name.
MOESH_PLUGIN_EXPORT int32_t moesh_plugin_score(void) { return 1; }

} // extern "C"
