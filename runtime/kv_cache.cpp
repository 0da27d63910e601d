#include "runtime/kv_cache.h"

#include "runtime/error.h"

#include <cassert>
#include <cstdio>

namespace moesh {

size_t KvCacheSpec::bytes() const {
    return size_t(2) * size_t(n_layer) * size_t(n_blocks) * size_t(block_size) * size_t(n_head_kv) *
           size_t(head_dim) * elem_bytes();
}

int64_t KvCacheSpec::blocks_for_budget(size_t budget, int64_t n_layer, int64_t n_head_kv, int64_t head_dim,
                                       int64_t block_size, int32_t type) {
    const size_t per_block = size_t(2) * size_t(n_layer) * size_t(block_size) * size_t(n_head_kv) *
                             size_t(head_dim) * (type == MOESH_DTYPE_F16 ? 2 : 4);
    return per_block == 0 ? 0 : int64_t(budget / per_block);
}


bool backend_offers_kv_type(const Backend & backend, int32_t type) {
    if (type == MOESH_DTYPE_F32) return true;
    constexpr int32_t k_unknown = 99;   // no moesh_dtype
    for (int32_t op : {MOESH_OP_ATTENTION, MOESH_OP_COPY_ROWS})
        if (!backend.supports(op, type) || backend.supports(op, k_unknown)) return false;
    return true;
}

KvCache::KvCache(const KvCacheSpec & spec, const Backend & backend) : spec_(spec), tables_(size_t(spec.n_seq_max)) {
    if (spec.n_layer <= 0 || spec.n_head_kv <= 0 || spec.head_dim <= 0 || spec.block_size <= 0 || spec.n_blocks <= 0 ||
        spec.n_seq_max <= 0)
        throw Error("KV cache: every size must be positive");
    if (spec.type != MOESH_DTYPE_F32 && spec.type != MOESH_DTYPE_F16) throw Error("KV cache: the type must be f32 or f16");
    if (!backend_offers_kv_type(backend, spec.type))
        throw Error(std::string("backend '") + backend.name() + "' cannot keep the KV cache in " + kv_type_name(spec.type) +
                    " (its attention or copy_rows does not offer it); use --kv-type f32");
    if (spec.n_blocks > INT32_MAX / spec.block_size)
        throw Error("KV cache: " + std::to_string(spec.n_blocks) + " blocks of " + std::to_string(spec.block_size) +
                    " positions are more rows than a 32-bit index holds");
    const size_t pool = size_t(spec.n_blocks) * size_t(spec.block_size) * size_t(spec.n_head_kv * spec.head_dim) *
                        spec.elem_bytes();
    try {
        for (int64_t il = 0; il < spec.n_layer; ++il) {
            k_.emplace_back(backend, pool, "buffer_alloc (KV cache)");
            v_.emplace_back(backend, pool, "buffer_alloc (KV cache)");
        }
    } catch (const BackendError & e) {
        char need[64];
        std::snprintf(need, sizeof need, "%.2f GiB", double(spec.bytes()) / double(1u << 30));
        throw Error("the KV cache (" + std::string(need) + " for " + std::to_string(spec.n_blocks * spec.block_size) +
                    " positions) does not fit in backend '" + backend.name() + "' memory (" + e.what() +
                    "); use a shorter context (--ctx)");
    }
    free_.reserve(size_t(spec.n_blocks));
    for (int64_t b = spec.n_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
    for (auto & t : tables_) t.reserve(size_t(spec.n_blocks));
}

bool KvCache::reserve(int32_t seq, int64_t n_positions) {
    if (seq < 0 || seq >= spec_.n_seq_max) return false;
    auto & table = tables_[size_t(seq)];
    const int64_t need = (n_positions + spec_.block_size - 1) / spec_.block_size - int64_t(table.size());
    if (need <= 0) return true;
    if (need > int64_t(free_.size())) return false;
    for (int64_t i = 0; i < need; ++i) {
        table.push_back(free_.back());
        free_.pop_back();
    }
    return true;
}

void KvCache::release(int32_t seq) {
    auto & table = tables_[size_t(seq)];
    for (auto it = table.rbegin(); it != table.rend(); ++it) free_.push_back(*it);
    table.clear();
}

int64_t KvCache::capacity(int32_t seq) const {
    if (seq < 0 || seq >= spec_.n_seq_max) return 0;
    return int64_t(tables_[size_t(seq)].size()) * spec_.block_size;
}

int32_t KvCache::pool_row(int32_t seq, int64_t pos) const {
    assert(pos >= 0 && pos < capacity(seq));
    const int32_t block = tables_[size_t(seq)][size_t(pos / spec_.block_size)];
    return int32_t(int64_t(block) * spec_.block_size + pos % spec_.block_size);   // < INT32_MAX (constructor)
}

} // namespace moesh
