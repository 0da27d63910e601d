#include "experts/expert.h"

#include <cassert>

namespace moesh {

moesh_expert_ffn_args expert_ffn_args(const ExpertWeights & w, const float * x, const float * scale, float * out,
                                      float * scratch, int64_t n_tokens) {
    moesh_expert_ffn_args a{};
    a.struct_size = sizeof a;
    a.gate = w.gate.data;
    a.up = w.up.data;
    a.down = w.down.data;
    a.w_type = w.gate.type;
    a.x = x;
    a.scale = scale;
    a.out = out;
    a.scratch = scratch;
    a.n_embd = w.gate.n_cols;
    a.n_ff = w.gate.n_rows;
    a.n_tokens = n_tokens;
    return a;
}

size_t dtype_size(moesh_dtype type) {
    switch (type) {
    case MOESH_DTYPE_F32: return 4;
    case MOESH_DTYPE_F16: return 2;
    case MOESH_DTYPE_BF16: return 2;
    default: return 0;
    }
}

size_t dtype_row_bytes(moesh_dtype type, int64_t n_cols) {
    if (n_cols < 0) return 0;
    switch (type) {
    case MOESH_DTYPE_Q8_0: return n_cols % MOESH_QK_BLOCK ? 0 : size_t(n_cols / MOESH_QK_BLOCK) * 34;
    case MOESH_DTYPE_Q4_0: return n_cols % MOESH_QK_BLOCK ? 0 : size_t(n_cols / MOESH_QK_BLOCK) * 18;
    case MOESH_DTYPE_Q4_1: return n_cols % MOESH_QK_BLOCK ? 0 : size_t(n_cols / MOESH_QK_BLOCK) * 20;
    case MOESH_DTYPE_Q4_K: return n_cols % MOESH_QK_K ? 0 : size_t(n_cols / MOESH_QK_K) * 144;
    case MOESH_DTYPE_Q5_K: return n_cols % MOESH_QK_K ? 0 : size_t(n_cols / MOESH_QK_K) * 176;
    case MOESH_DTYPE_Q6_K: return n_cols % MOESH_QK_K ? 0 : size_t(n_cols / MOESH_QK_K) * 210;
    default: return size_t(n_cols) * dtype_size(type);
    }
}

const char * dtype_name(moesh_dtype type) {
    switch (type) {
    case MOESH_DTYPE_F32: return "f32";
    case MOESH_DTYPE_F16: return "f16";
    case MOESH_DTYPE_BF16: return "bf16";
    case MOESH_DTYPE_Q8_0: return "q8_0";
    case MOESH_DTYPE_Q4_0: return "q4_0";
    case MOESH_DTYPE_Q4_1: return "q4_1";
    case MOESH_DTYPE_Q4_K: return "q4_K";
    case MOESH_DTYPE_Q5_K: return "q5_K";
    case MOESH_DTYPE_Q6_K: return "q6_K";
    default: return "?";
    }
}

ExpertTable::ExpertTable(int64_t n_layer, int64_t n_expert)
    : n_layer_(n_layer), n_expert_(n_expert), experts_(size_t(n_layer) * size_t(n_expert)) {}

void ExpertTable::set(ExpertId id, const ExpertWeights & w) {
    assert(id.layer >= 0 && id.layer < n_layer_ && id.index >= 0 && id.index < n_expert_);
    experts_[slot(id)] = w;
}

size_t ExpertTable::bytes_per_expert(int32_t layer) const {
    for (int64_t e = 0; e < n_expert_; ++e) {
        const auto & w = experts_[slot({layer, int32_t(e)})];
        if (!w.empty()) return w.n_bytes();
    }
    return 0;
}

size_t ExpertTable::total_bytes() const {
    size_t s = 0;
    for (const auto & w : experts_) s += w.n_bytes();
    return s;
}

int64_t ExpertTable::n_present() const {
    int64_t n = 0;
    for (const auto & w : experts_) n += !w.empty();
    return n;
}

} // namespace moesh
