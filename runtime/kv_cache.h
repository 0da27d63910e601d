// Paged KV cache: per layer, a pool of fixed-size blocks of keys and values;
// each sequence owns a block table. The pool is sized once, up front, from a
// byte budget; a sequence gets blocks only through reserve(), which says no
// (returns false) instead of allocating when the pool is exhausted.
//
//   KvCache kv(KvCacheSpec{n_layer, n_head_kv, head_dim, 16, n_blocks, n_seq});
//   if (!kv.reserve(seq, n_positions)) { /* not admitted: wait or refuse */ }
//   float * k = kv.k_row(layer, seq, pos);   // [n_head_kv * head_dim]
//
// Thread safety: owned by the thread that runs the forward pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moesh {

struct KvCacheSpec {
    int64_t n_layer = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;
    int64_t block_size = 16;   // positions per block
    int64_t n_blocks = 0;      // blocks in the pool (shared by all sequences)
    int64_t n_seq_max = 1;     // sequence ids are 0..n_seq_max-1

    size_t bytes() const; // the whole pool, keys and values, all layers
    // blocks needed for a budget in bytes
    static int64_t blocks_for_budget(size_t budget, int64_t n_layer, int64_t n_head_kv, int64_t head_dim,
                                     int64_t block_size);
};

class KvCache {
public:
    explicit KvCache(const KvCacheSpec & spec);

    const KvCacheSpec & spec() const { return spec_; }

    // Makes sequence `seq` able to hold positions 0..n_positions-1.
    bool reserve(int32_t seq, int64_t n_positions);
    void release(int32_t seq);
    int64_t capacity(int32_t seq) const; // positions reserved
    int64_t n_free_blocks() const { return int64_t(free_.size()); }

    float * k_row(int64_t layer, int32_t seq, int64_t pos); // [n_head_kv * head_dim]
    float * v_row(int64_t layer, int32_t seq, int64_t pos);
    const float * k_pool(int64_t layer) const { return k_[size_t(layer)].data(); }
    const float * v_pool(int64_t layer) const { return v_[size_t(layer)].data(); }
    const int32_t * block_table(int32_t seq) const { return tables_[size_t(seq)].data(); }

private:
    size_t row_offset(int32_t seq, int64_t pos) const;

    KvCacheSpec spec_;
    int64_t row_elems_;                          // n_head_kv * head_dim
    std::vector<std::vector<float>> k_, v_;      // [n_layer][n_blocks * block_size * row_elems]
    std::vector<std::vector<int32_t>> tables_;   // [n_seq_max][blocks of the sequence]
    std::vector<int32_t> free_;                  // free block ids
};

} // namespace moesh
