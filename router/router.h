// Gating: router logits -> the top-k experts of every token and their weights.
//
//   RouterSpec spec{.n_expert = 8, .n_expert_used = 2, .renormalize = true};
//   route_softmax_topk(logits, n_tokens, spec, ids, weights);   // Mixtral
//   ExpertDispatch d(n_expert, max_tokens * k);
//   d.build(ids, weights, n_tokens, k);          // tokens grouped by expert
//
// The router outputs *logical* expert ids (0..n_expert-1 of one layer); where
// copies of an expert live is the placement engine's business.
// Thread safety: free functions are pure; ExpertDispatch and ExpertHeat are
// plain objects owned by one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moesh {

struct RouterSpec {
    int64_t n_expert = 0;
    int64_t n_expert_used = 0;   // k
    bool renormalize = false;    // divide the k weights by their sum
};

// softmax over all experts in float32, then top-k (ties: lower id first),
// then optional renormalisation, as Mixtral / Qwen-MoE / OLMoE do.
//   logits  [n_tokens, n_expert]
//   ids     [n_tokens, n_expert_used]  out
//   weights [n_tokens, n_expert_used]  out, ordered by descending weight
void route_softmax_topk(const float * logits, int64_t n_tokens, const RouterSpec & spec, int32_t * ids,
                        float * weights);

// Qwen2-MoE's shared expert gate: sigmoid of one logit per token, in place.
void shared_expert_gate(float * gate_logits, int64_t n_tokens); // [n_tokens]

// Groups (token, slot) pairs by expert with a counting sort into buffers sized
// once at construction: no allocation per step.
class ExpertDispatch {
public:
    ExpertDispatch(int64_t n_expert, int64_t max_pairs);

    void build(const int32_t * ids, const float * weights, int64_t n_tokens, int64_t n_expert_used);

    int64_t n_expert() const { return n_expert_; }
    int64_t n_tokens_for(int64_t expert) const { return offsets_[size_t(expert) + 1] - offsets_[size_t(expert)]; }
    // token indices routed to `expert`, and the matching router weights
    const int32_t * tokens_for(int64_t expert) const { return tokens_.data() + offsets_[size_t(expert)]; }
    const float * weights_for(int64_t expert) const { return weights_.data() + offsets_[size_t(expert)]; }
    // All pairs of the last build, grouped by expert: expert e's are [offset(e), offset(e + 1)).
    int64_t offset(int64_t expert) const { return offsets_[size_t(expert)]; }
    int64_t n_pairs() const { return offsets_[size_t(n_expert_)]; }
    const int32_t * tokens() const { return tokens_.data(); }
    const float * weights() const { return weights_.data(); }

private:
    int64_t n_expert_;
    std::vector<int64_t> offsets_;   // [n_expert + 1]
    std::vector<int64_t> cursor_;    // [n_expert]
    std::vector<int32_t> tokens_;    // [max_pairs]
    std::vector<float> weights_;     // [max_pairs]
};

// Per-layer, per-expert activation counts: the heat the placement engine reads.
class ExpertHeat {
public:
    ExpertHeat() = default;
    ExpertHeat(int64_t n_layer, int64_t n_expert);

    void add(int64_t layer, const int32_t * ids, int64_t n_ids); // ids [n_ids]
    const std::vector<uint64_t> & counts(int64_t layer) const { return counts_[size_t(layer)]; }
    int64_t n_layer() const { return int64_t(counts_.size()); }
    uint64_t total(int64_t layer) const;
    void reset();

private:
    std::vector<std::vector<uint64_t>> counts_; // [n_layer][n_expert]
};

} // namespace moesh
