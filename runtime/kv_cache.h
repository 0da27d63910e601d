// Paged KV cache: per layer, a pool of fixed-size blocks of keys and values in
// the backend's memory (VRAM for a GPU backend); each sequence owns a block
// table, kept on the host. The pool is sized once, up front, from a byte
// budget; a sequence gets blocks only through reserve(), which says no
// (returns false) instead of allocating when the pool is exhausted.
//
// Prefix cache: a full block whose positions hold the keys and values of known
// tokens can be published; a later sequence whose first tokens are the same
// attaches it instead of computing them again (a chat's system prompt, the turns
// before the last). A block is found by its tokens and by the block before it
// (checked, not only hashed), so it is found only after the same prefix. A
// published block that no sequence holds stays cached until reserve() needs the
// memory, least recently released first: cached blocks count as free, so the
// cache never costs a request its admission.
//
//   KvCache kv(KvCacheSpec{n_layer, n_head_kv, head_dim, 16, n_blocks, n_seq}, backend);
//   if (!kv.reserve(seq, n_positions)) { /* not admitted: wait or refuse */ }
//   int32_t row = kv.pool_row(seq, pos);     // row of k_pool(layer) / v_pool(layer)
//
// Thread safety: owned by the thread that runs the forward pass.
#pragma once

#include "plugins/loader/plugin_loader.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moesh {

struct KvCacheSpec {
    int64_t n_layer = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;
    int64_t block_size = 16;   // positions per block
    int64_t n_blocks = 0;      // blocks in the pool (shared by all sequences)
    int64_t n_seq_max = 1;     // sequence ids are 0..n_seq_max-1
    int32_t type = MOESH_DTYPE_F32;   // of the pools: MOESH_DTYPE_F32, MOESH_DTYPE_F16 or MOESH_DTYPE_Q8_0

    size_t bytes() const; // the whole pool, keys and values, all layers
    // One position's row of one kv head (head_dim values): 4 or 2 bytes a value, or head_dim / 32
    // Q8_0 blocks of 34 bytes (8.5 bits a value).
    static size_t row_bytes(int32_t type, int64_t head_dim);
    // blocks that fit a budget in bytes
    static int64_t blocks_for_budget(size_t budget, int64_t n_layer, int64_t n_head_kv, int64_t head_dim,
                                     int64_t block_size, int32_t type = MOESH_DTYPE_F32);
};

// "f32" / "f16" / "q8_0" -> MOESH_DTYPE_F32 / MOESH_DTYPE_F16 / MOESH_DTYPE_Q8_0; -1 for anything
// else. Inline: the TOML parser (and its fuzz target) uses it without the cache.
inline int32_t parse_kv_type(const std::string & name) {
    return name == "f32" ? MOESH_DTYPE_F32 : name == "f16" ? MOESH_DTYPE_F16 : name == "q8_0" ? MOESH_DTYPE_Q8_0 : -1;
}
inline const char * kv_type_name(int32_t type) {
    return type == MOESH_DTYPE_F16 ? "f16" : type == MOESH_DTYPE_Q8_0 ? "q8_0" : type < 0 ? "auto" : "f32";
}

// Why a KV cache of type cannot hold rows of head_dim values ("" when it can): q8_0 needs whole
// blocks of 32.
std::string kv_type_problem(int32_t type, int64_t head_dim);

// Whether backend's attention and copy_rows take KV pools of type. f32 always; f16 and q8_0 only from a
// plugin that answers supports() per type: one built before the KV type existed ignored w_type
// for these ops and says yes to anything (an unknown type too), yet reads the pools as f32.
bool backend_offers_kv_type(const Backend & backend, int32_t type);

class KvCache {
public:
    // Allocates the pools with backend's buffer_alloc (which must outlive this);
    // throws moesh::Error saying how much did not fit.
    KvCache(const KvCacheSpec & spec, const Backend & backend);

    const KvCacheSpec & spec() const { return spec_; }

    // Makes sequence `seq` able to hold positions 0..n_positions-1.
    bool reserve(int32_t seq, int64_t n_positions);
    void release(int32_t seq);
    int64_t capacity(int32_t seq) const; // positions reserved
    // Blocks reserve() can hand out: never used, or cached with no sequence holding them.
    int64_t n_free_blocks() const { return int64_t(free_.size()) + n_idle_cached_; }
    int64_t n_idle_cached_blocks() const { return n_idle_cached_; }

    // On an empty table of seq: attaches the published blocks that hold tokens[0, k * block_size)
    // for the largest such k with k * block_size <= max_positions; returns k * block_size.
    int64_t attach_prefix(int32_t seq, const int32_t * tokens, int64_t max_positions);
    // Positions [0, n) of seq hold the keys and values of tokens[0, n): publishes its full blocks
    // in that range (those not yet published, unless the same prefix already is).
    void publish(int32_t seq, const int32_t * tokens, int64_t n);

    // Row of the pools ([n_blocks * block_size] rows of n_head_kv * head_dim
    // elements of spec().type) that holds position pos of seq; pos < capacity(seq).
    int32_t pool_row(int32_t seq, int64_t pos) const;
    // Backend memory: [n_blocks, block_size, n_head_kv, head_dim] of spec().type.
    void * k_pool(int64_t layer) const { return k_[size_t(layer)].get(); }
    void * v_pool(int64_t layer) const { return v_[size_t(layer)].get(); }
    // Host memory: the sequence's blocks, capacity(seq) / block_size of them.
    const int32_t * block_table(int32_t seq) const { return tables_[size_t(seq)].data(); }

private:
    uint64_t key(int32_t parent, uint32_t parent_gen, const int32_t * tokens) const;
    // The index: open addressing over a fixed table (twice the blocks), so that publishing
    // during a forward step allocates nothing. find: the block under key, or -1.
    int32_t index_find(uint64_t key) const;
    void index_insert(uint64_t key, int32_t b);
    void index_erase(uint64_t key, int32_t b);   // the entry of key if it is b's
    // The published block that holds tokens after parent (checked, not only hashed), or -1.
    int32_t lookup(int32_t parent, uint32_t parent_gen, const int32_t * tokens) const;
    void idle_push(int32_t b);     // a cached block no sequence holds: last in the eviction order
    void idle_remove(int32_t b);
    void forget(int32_t b);        // no longer cached (its memory is about to be reused)

    KvCacheSpec spec_;
    std::vector<BackendBuffer> k_, v_;           // [n_layer] pools
    std::vector<std::vector<int32_t>> tables_;   // [n_seq_max][blocks of the sequence]
    std::vector<int32_t> free_;                  // never-used (or forgotten) block ids
    // Per block: how many tables hold it; whether published, then its tokens, the block before it
    // (-1: none) and that block's generation, which changes each time a block is forgotten, so
    // that a block whose predecessor's memory was reused is never found again (a block published
    // after another request's block can outlive it in the cache).
    std::vector<int32_t> refs_;
    std::vector<uint8_t> cached_;
    std::vector<int32_t> tokens_;                // [n_blocks, block_size]
    std::vector<int32_t> parent_;
    std::vector<uint32_t> parent_gen_, gen_;
    std::vector<uint64_t> slot_key_;   // index slots: key(parent, gen, tokens) ...
    std::vector<int32_t> slot_block_;  // ... -> block, -1: empty
    uint64_t slot_mask_ = 0;
    // Cached blocks no table holds, least recently released first (links by block id, -1 ends).
    std::vector<int32_t> idle_prev_, idle_next_;
    int32_t idle_head_ = -1, idle_tail_ = -1;
    int64_t n_idle_cached_ = 0;
};

} // namespace moesh
