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

// Tokens are visited in descending logit order (ties: lower id first), the order the
// cumulative draw walks. Only as much of the vocabulary is sorted as the walk reaches: the
// mass sits in a few dozen tokens, so a full 32000-entry sort per token (5 ms on this
// machine, 5x a decode step's forward pass at 16 sequences) becomes a partial one.
int32_t Sampler::sample(const float * logits, int64_t n_vocab) {
    if (params_.temperature <= 0.0f) return argmax(logits, n_vocab);
    idx_.resize(size_t(n_vocab));
    std::iota(idx_.begin(), idx_.end(), 0);
    auto by_logit = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    const float inv_t = 1.0f / params_.temperature;
    // 53 random bits -> [0, 1): mt19937_64 is specified exactly, the standard
    // distributions are not, so this keeps seeds portable across libraries.
    const double u = double(rng_() >> 11) * 0x1.0p-53;

    // The candidates idx_[0, n): the top-k, sorted whole, or the vocabulary, sorted as the walk goes.
    int64_t n = n_vocab, sorted = 0, chunk = 64;
    if (params_.top_k > 0 && params_.top_k < n_vocab) {
        n = params_.top_k;
        std::partial_sort(idx_.begin(), idx_.begin() + n, idx_.end(), by_logit);
        sorted = n;
    }
    auto ensure_sorted = [&](int64_t upto) {   // idx_[0, upto) holds the upto largest, in order
        while (sorted < upto) {
            const int64_t m = std::min<int64_t>(n_vocab, std::max(upto, sorted + chunk));
            if (m < n_vocab) std::nth_element(idx_.begin() + sorted, idx_.begin() + m, idx_.end(), by_logit);
            std::sort(idx_.begin() + sorted, idx_.begin() + m, by_logit);
            sorted = m;
            chunk *= 4;
        }
    };
    // Weights by token id, summed over the candidates.
    probs_.resize(size_t(n_vocab));
    float max_logit = logits[idx_[0]];
    if (sorted == 0)
        for (int64_t i = 1; i < n_vocab; ++i) max_logit = std::max(max_logit, logits[i]);
    const float max_l = max_logit * inv_t;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t t = idx_[size_t(i)];
        sum += probs_[size_t(t)] = std::exp(logits[t] * inv_t - max_l);
    }
    if (params_.top_p < 1.0f) {   // the nucleus: the smallest prefix whose mass reaches top_p (at least one token)
        double cum = 0.0, kept = 0.0;
        int64_t keep = 0;
        while (keep < n) {
            ensure_sorted(keep + 1);
            const double p = probs_[size_t(idx_[size_t(keep)])];
            kept += p;
            cum += p / sum;
            ++keep;
            if (cum >= params_.top_p) break;
        }
        n = keep;
        sum = kept;
    }
    double r = u * sum;
    for (int64_t i = 0; i < n; ++i) {
        ensure_sorted(i + 1);
        r -= probs_[size_t(idx_[size_t(i)])];
        if (r <= 0.0) return idx_[size_t(i)];
    }
    ensure_sorted(n);
    return idx_[size_t(n - 1)];
}

} // namespace moesh
