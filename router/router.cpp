#include "router/router.h"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace moesh {

void route_softmax_topk(const float * logits, int64_t n_tokens, const RouterSpec & spec, int32_t * ids,
                        float * weights) {
    const int64_t n_expert = spec.n_expert;
    const int64_t k = spec.n_expert_used;
    assert(k >= 1 && k <= n_expert);
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * row = logits + t * n_expert;
        int32_t * out_ids = ids + t * k;
        float * out_w = weights + t * k;

        float max_logit = row[0];
        for (int64_t e = 1; e < n_expert; ++e) max_logit = std::max(max_logit, row[e]);
        float sum = 0.0f;
        for (int64_t e = 0; e < n_expert; ++e) sum += std::exp(row[e] - max_logit);

        // Selection on logits equals selection on probabilities (softmax is
        // monotonic); insertion into a sorted top-k list, ties to the lower id.
        int64_t n_sel = 0;
        for (int64_t e = 0; e < n_expert; ++e) {
            const float v = row[e];
            if (n_sel == k && !(v > row[out_ids[k - 1]])) continue;
            int64_t j = n_sel < k ? n_sel++ : k - 1;
            while (j > 0 && v > row[out_ids[j - 1]]) {
                out_ids[j] = out_ids[j - 1];
                --j;
            }
            out_ids[j] = int32_t(e);
        }
        float sel_sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            out_w[j] = std::exp(row[out_ids[j]] - max_logit) / sum;
            sel_sum += out_w[j];
        }
        if (spec.renormalize)
            for (int64_t j = 0; j < k; ++j) out_w[j] /= sel_sum;
    }
}

void shared_expert_gate(float * gate_logits, int64_t n_tokens) {
    for (int64_t t = 0; t < n_tokens; ++t) gate_logits[t] = 1.0f / (1.0f + std::exp(-gate_logits[t]));
}

ExpertDispatch::ExpertDispatch(int64_t n_expert, int64_t max_pairs)
    : n_expert_(n_expert), offsets_(size_t(n_expert) + 1, 0), cursor_(size_t(n_expert), 0),
      tokens_(size_t(max_pairs)), weights_(size_t(max_pairs)) {}

void ExpertDispatch::build(const int32_t * ids, const float * weights, int64_t n_tokens, int64_t n_expert_used) {
    const int64_t n_pairs = n_tokens * n_expert_used;
    assert(n_pairs <= int64_t(tokens_.size()));
    std::fill(offsets_.begin(), offsets_.end(), 0);
    for (int64_t i = 0; i < n_pairs; ++i) {
        assert(ids[i] >= 0 && ids[i] < n_expert_);
        ++offsets_[size_t(ids[i]) + 1];
    }
    for (int64_t e = 0; e < n_expert_; ++e) offsets_[size_t(e) + 1] += offsets_[size_t(e)];
    std::copy(offsets_.begin(), offsets_.end() - 1, cursor_.begin());
    for (int64_t i = 0; i < n_pairs; ++i) {
        const int64_t slot = cursor_[size_t(ids[i])]++;
        tokens_[size_t(slot)] = int32_t(i / n_expert_used);
        weights_[size_t(slot)] = weights[i];
    }
}

ExpertHeat::ExpertHeat(int64_t n_layer, int64_t n_expert)
    : counts_(size_t(n_layer), std::vector<uint64_t>(size_t(n_expert), 0)) {}

void ExpertHeat::add(int64_t layer, const int32_t * ids, int64_t n_ids) {
    auto & c = counts_[size_t(layer)];
    for (int64_t i = 0; i < n_ids; ++i) ++c[size_t(ids[i])];
}

uint64_t ExpertHeat::total(int64_t layer) const {
    uint64_t s = 0;
    for (uint64_t c : counts_[size_t(layer)]) s += c;
    return s;
}

void ExpertHeat::reset() {
    for (auto & c : counts_) std::fill(c.begin(), c.end(), 0);
}

} // namespace moesh
