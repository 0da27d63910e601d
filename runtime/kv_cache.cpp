#include "runtime/kv_cache.h"

#include "runtime/error.h"

#include <algorithm>
#include <cassert>
#include <cstdio>

namespace moesh {

size_t KvCacheSpec::row_bytes(int32_t type, int64_t head_dim) {
    // q8_0: whole blocks (a head_dim that is not a multiple of 32 is refused: kv_type_problem)
    return type == MOESH_DTYPE_Q8_0 ? size_t((head_dim + MOESH_QK_BLOCK - 1) / MOESH_QK_BLOCK) * 34
                                    : size_t(head_dim) * (type == MOESH_DTYPE_F16 ? 2 : 4);
}

std::string kv_type_problem(int32_t type, int64_t head_dim) {
    if (type == MOESH_DTYPE_Q8_0 && head_dim % MOESH_QK_BLOCK != 0)
        return "a q8_0 KV cache needs the model's head_dim (" + std::to_string(head_dim) +
               ") to be a multiple of 32; use --kv-type f16 (or [runtime] kv_type = \"f16\")";
    return {};
}

size_t KvCacheSpec::bytes() const {
    return size_t(2) * size_t(n_layer) * size_t(n_blocks) * size_t(block_size) * size_t(n_head_kv) *
           row_bytes(type, head_dim);
}

int64_t KvCacheSpec::blocks_for_budget(size_t budget, int64_t n_layer, int64_t n_head_kv, int64_t head_dim,
                                       int64_t block_size, int32_t type) {
    const size_t per_block = size_t(2) * size_t(n_layer) * size_t(block_size) * size_t(n_head_kv) * row_bytes(type, head_dim);
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
    if (spec.type != MOESH_DTYPE_F32 && spec.type != MOESH_DTYPE_F16 && spec.type != MOESH_DTYPE_Q8_0)
        throw Error("KV cache: the type must be f32, f16 or q8_0");
    if (const std::string why = kv_type_problem(spec.type, spec.head_dim); !why.empty()) throw Error(why);
    if (!backend_offers_kv_type(backend, spec.type))
        throw Error(std::string("backend '") + backend.name() + "' cannot keep the KV cache in " + kv_type_name(spec.type) +
                    " (its attention or copy_rows does not offer it); use --kv-type " +
                    (spec.type == MOESH_DTYPE_Q8_0 ? "f16 or auto" : "f32"));
    if (spec.n_blocks > INT32_MAX / spec.block_size)
        throw Error("KV cache: " + std::to_string(spec.n_blocks) + " blocks of " + std::to_string(spec.block_size) +
                    " positions are more rows than a 32-bit index holds");
    const size_t pool =
        size_t(spec.n_blocks) * size_t(spec.block_size) * size_t(spec.n_head_kv) * KvCacheSpec::row_bytes(spec.type, spec.head_dim);
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
    const size_t nb = size_t(spec.n_blocks);
    refs_.assign(nb, 0);
    cached_.assign(nb, 0);
    tokens_.assign(nb * size_t(spec.block_size), 0);
    parent_.assign(nb, -1);
    parent_gen_.assign(nb, 0);
    gen_.assign(nb, 0);
    idle_prev_.assign(nb, -1);
    idle_next_.assign(nb, -1);
    size_t slots = 16;
    while (slots < 2 * nb) slots *= 2;
    slot_key_.assign(slots, 0);
    slot_block_.assign(slots, -1);
    slot_mask_ = slots - 1;
}

bool KvCache::reserve(int32_t seq, int64_t n_positions) {
    if (seq < 0 || seq >= spec_.n_seq_max) return false;
    auto & table = tables_[size_t(seq)];
    const int64_t need = (n_positions + spec_.block_size - 1) / spec_.block_size - int64_t(table.size());
    if (need <= 0) return true;
    if (need > n_free_blocks()) return false;
    for (int64_t i = 0; i < need; ++i) {
        int32_t b;
        if (!free_.empty()) {
            b = free_.back();
            free_.pop_back();
        } else {   // the cached block released longest ago
            b = idle_head_;
            idle_remove(b);
            forget(b);
        }
        refs_[size_t(b)] = 1;
        table.push_back(b);
    }
    return true;
}

void KvCache::release(int32_t seq) {
    auto & table = tables_[size_t(seq)];
    // Last block first: a prefix's later blocks leave the cache before its earlier ones.
    for (auto it = table.rbegin(); it != table.rend(); ++it) {
        const int32_t b = *it;
        if (--refs_[size_t(b)] > 0) continue;
        if (cached_[size_t(b)]) idle_push(b);
        else free_.push_back(b);
    }
    table.clear();
}

uint64_t KvCache::key(int32_t parent, uint32_t parent_gen, const int32_t * tokens) const {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t(uint32_t(parent)) << 32 | parent_gen);
    auto mix = [&h](uint64_t v) {
        h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
        h *= 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
    };
    for (int64_t i = 0; i < spec_.block_size; ++i) mix(uint32_t(tokens[i]));
    return h;
}

void KvCache::idle_push(int32_t b) {
    idle_prev_[size_t(b)] = idle_tail_;
    idle_next_[size_t(b)] = -1;
    if (idle_tail_ >= 0) idle_next_[size_t(idle_tail_)] = b;
    else idle_head_ = b;
    idle_tail_ = b;
    ++n_idle_cached_;
}

void KvCache::idle_remove(int32_t b) {
    const int32_t p = idle_prev_[size_t(b)], n = idle_next_[size_t(b)];
    if (p >= 0) idle_next_[size_t(p)] = n;
    else idle_head_ = n;
    if (n >= 0) idle_prev_[size_t(n)] = p;
    else idle_tail_ = p;
    idle_prev_[size_t(b)] = idle_next_[size_t(b)] = -1;
    --n_idle_cached_;
}

int32_t KvCache::index_find(uint64_t k) const {
    for (uint64_t i = k & slot_mask_;; i = (i + 1) & slot_mask_) {
        if (slot_block_[i] < 0) return -1;
        if (slot_key_[i] == k) return slot_block_[i];
    }
}

void KvCache::index_insert(uint64_t k, int32_t b) {   // k is not in the index; there is room (<= n_blocks entries)
    uint64_t i = k & slot_mask_;
    while (slot_block_[i] >= 0) i = (i + 1) & slot_mask_;
    slot_key_[i] = k;
    slot_block_[i] = b;
}

void KvCache::index_erase(uint64_t k, int32_t b) {
    uint64_t i = k & slot_mask_;
    while (slot_block_[i] >= 0 && !(slot_key_[i] == k && slot_block_[i] == b)) i = (i + 1) & slot_mask_;
    if (slot_block_[i] < 0) return;
    // Backward shift: move up each later entry of the run that may sit at or before its home slot.
    for (uint64_t j = (i + 1) & slot_mask_; slot_block_[j] >= 0; j = (j + 1) & slot_mask_) {
        const uint64_t home = slot_key_[j] & slot_mask_;
        const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (stays) continue;
        slot_key_[i] = slot_key_[j];
        slot_block_[i] = slot_block_[j];
        i = j;
    }
    slot_block_[i] = -1;
}

int32_t KvCache::lookup(int32_t parent, uint32_t parent_gen, const int32_t * tokens) const {
    const int32_t b = index_find(key(parent, parent_gen, tokens));
    if (b < 0) return -1;
    const int32_t * held = &tokens_[size_t(b) * size_t(spec_.block_size)];
    const bool same = cached_[size_t(b)] && parent_[size_t(b)] == parent && parent_gen_[size_t(b)] == parent_gen &&
                      std::equal(tokens, tokens + spec_.block_size, held);
    return same ? b : -1;   // else a hash collision: not this prefix
}

void KvCache::forget(int32_t b) {
    index_erase(key(parent_[size_t(b)], parent_gen_[size_t(b)], &tokens_[size_t(b) * size_t(spec_.block_size)]), b);
    cached_[size_t(b)] = 0;
    ++gen_[size_t(b)];
}

int64_t KvCache::attach_prefix(int32_t seq, const int32_t * tokens, int64_t max_positions) {
    if (seq < 0 || seq >= spec_.n_seq_max || !tables_[size_t(seq)].empty()) return 0;
    auto & table = tables_[size_t(seq)];
    const int64_t bs = spec_.block_size;
    int32_t parent = -1;
    uint32_t parent_gen = 0;
    for (int64_t k = 0; (k + 1) * bs <= max_positions; ++k) {
        const int32_t b = lookup(parent, parent_gen, tokens + k * bs);
        if (b < 0) break;
        if (refs_[size_t(b)]++ == 0) idle_remove(b);
        table.push_back(b);
        parent = b;
        parent_gen = gen_[size_t(b)];
    }
    return int64_t(table.size()) * bs;
}

void KvCache::publish(int32_t seq, const int32_t * tokens, int64_t n) {
    if (seq < 0 || seq >= spec_.n_seq_max) return;
    const auto & table = tables_[size_t(seq)];
    const int64_t bs = spec_.block_size;
    int32_t parent = -1;
    uint32_t parent_gen = 0;
    for (int64_t k = 0; k < int64_t(table.size()) && (k + 1) * bs <= n; ++k) {
        int32_t b = table[size_t(k)];
        if (!cached_[size_t(b)]) {
            const uint64_t h = key(parent, parent_gen, tokens + k * bs);
            if (index_find(h) >= 0) {
                // Another request published these tokens after this parent (the same system prompt
                // computed at once): go on from its block, which holds the same keys and values,
                // so that what follows here (another end, this answer) is found after it.
                b = lookup(parent, parent_gen, tokens + k * bs);
                if (b < 0) return;   // a hash collision
                parent = b;
                parent_gen = gen_[size_t(b)];
                continue;
            }
            index_insert(h, b);
            cached_[size_t(b)] = 1;
            parent_[size_t(b)] = parent;
            parent_gen_[size_t(b)] = parent_gen;
            std::copy(tokens + k * bs, tokens + (k + 1) * bs, &tokens_[size_t(b) * size_t(bs)]);
        }
        parent = b;
        parent_gen = gen_[size_t(b)];
    }
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
