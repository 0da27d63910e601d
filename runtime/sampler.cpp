#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moesh {

std::string validate(const SamplerParams & p) {
    if (!std::isfinite(p.temperature) || p.temperature < 0) return "temperature must be >= 0 (0 = greedy)";
    if (p.top_k < 0) return "top-k must be >= 0 (0 = off)";
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return "top-p must be in (0, 1] (1 = off)";
    return {};
}

int32_t argmax(const float * x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return int32_t(best);
}

Sampler::Sampler(const SamplerParams & params, int64_t n_vocab) : params_(params), rng_(params.seed) {
    idx_.reserve(size_t(n_vocab));
    probs_.reserve(size_t(n_vocab));
}

int32_t Sampler::sample(const float * logits, int64_t n_vocab) {
    if (params_.temperature <= 0.0f) return argmax(logits, n_vocab);

    idx_.resize(size_t(n_vocab));
    std::iota(idx_.begin(), idx_.end(), 0);
    auto by_logit = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    int64_t n = n_vocab;
    if (params_.top_k > 0 && params_.top_k < n) {
        std::partial_sort(idx_.begin(), idx_.begin() + params_.top_k, idx_.end(), by_logit);
        n = params_.top_k;
    } else {
        std::sort(idx_.begin(), idx_.end(), by_logit);
    }
    probs_.resize(size_t(n));
    const float inv_t = 1.0f / params_.temperature;
    const float max_l = logits[idx_[0]] * inv_t;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        probs_[size_t(i)] = std::exp(logits[idx_[size_t(i)]] * inv_t - max_l);
        sum += probs_[size_t(i)];
    }
    if (params_.top_p < 1.0f) {
        // keep the smallest prefix whose mass reaches top_p (at least one token)
        double cum = 0.0;
        int64_t keep = n;
        for (int64_t i = 0; i < n; ++i) {
            cum += probs_[size_t(i)] / sum;
            if (cum >= params_.top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += probs_[size_t(i)];
    }
    // 53 random bits -> [0, 1): mt19937_64 is specified exactly, the standard
    // distributions are not, so this keeps seeds portable across libraries.
    double r = double(rng_() >> 11) * 0x1.0p-53 * sum;
    for (int64_t i = 0; i < n; ++i) {
        r -= probs_[size_t(i)];
        if (r <= 0.0) return idx_[size_t(i)];
    }
    return idx_[size_t(n - 1)];
}

} // namespace moesh
