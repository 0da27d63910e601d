// Routed experts as addressable units: expert (layer, index) is a view of its
// own gate/up/down weights, wherever they sit (an mmap'd file today; a tier of
// the placement engine later), so experts can be placed, moved and quantized
// one by one.
//
//   ExpertTable table(n_layer, n_expert);
//   table.set({layer, e}, ExpertWeights{gate, up, down});
//   const ExpertWeights & w = table.get({layer, e});
//
// Glossary: a *logical* expert id is what the router outputs (0..n_expert-1
// within a layer). ExpertId{layer, index} names one logical expert of the
// model. Copies and their tiers belong to the placement engine (later).
// Thread safety: read-only after loading.
#pragma once

#include <moesh/plugin.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moesh {

// Bytes per element; 0 for the block types (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
// Q6_K), whose size is per block (see dtype_row_bytes), and for unknown values.
size_t dtype_size(moesh_dtype type);
const char * dtype_name(moesh_dtype type);   // "f32", "q8_0", ...; "?" if unknown
// Bytes of a row of n_cols elements of `type`: n_cols * dtype_size for the
// element types, whole blocks (layouts in plugin.h) for the block types. 0 when
// n_cols is negative, for a block type when n_cols is not a multiple of its
// block size, and for an unknown type.
size_t dtype_row_bytes(moesh_dtype type, int64_t n_cols);

// A row-major weight matrix [n_rows, n_cols] of `type`, not owned.
struct WeightMatrix {
    const void * data = nullptr;
    moesh_dtype type = MOESH_DTYPE_F32;
    int64_t n_rows = 0;
    int64_t n_cols = 0;

    bool empty() const { return data == nullptr; }
    size_t n_bytes() const { return size_t(n_rows) * dtype_row_bytes(type, n_cols); }
};

// SiLU-gated FFN: down(silu(gate x) * up x).
struct ExpertWeights {
    WeightMatrix gate; // [n_ff, n_embd]
    WeightMatrix up;   // [n_ff, n_embd]
    WeightMatrix down; // [n_embd, n_ff]

    bool empty() const { return gate.empty(); }
    size_t n_bytes() const { return gate.n_bytes() + up.n_bytes() + down.n_bytes(); }
    int64_t n_ff() const { return gate.n_rows; }
};

// The expert_ffn arguments (plugin.h) for w, stored as it is, over n_tokens rows of x:
// out[t] += scale[t] * down(silu(gate x[t]) * up x[t]) (scale may be null: 1).
moesh_expert_ffn_args expert_ffn_args(const ExpertWeights & w, const float * x, const float * scale, float * out,
                                      float * scratch, int64_t n_tokens);

struct ExpertId {
    int32_t layer = 0;
    int32_t index = 0;
};

class ExpertTable {
public:
    ExpertTable() = default;
    ExpertTable(int64_t n_layer, int64_t n_expert);

    void set(ExpertId id, const ExpertWeights & w);
    const ExpertWeights & get(ExpertId id) const { return experts_[slot(id)]; }
    bool has(ExpertId id) const { return !experts_[slot(id)].empty(); }

    int64_t n_layer() const { return n_layer_; }
    int64_t n_expert() const { return n_expert_; }
    size_t bytes_per_expert(int32_t layer) const; // 0 for a layer without experts
    size_t total_bytes() const;
    int64_t n_present() const;

private:
    size_t slot(ExpertId id) const { return size_t(id.layer) * size_t(n_expert_) + size_t(id.index); }

    int64_t n_layer_ = 0;
    int64_t n_expert_ = 0;
    std::vector<ExpertWeights> experts_; // [n_layer * n_expert]
};

} // namespace moesh
