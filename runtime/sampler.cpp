#include "runtime/sampler.h"

#include "runtime/grammar.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace moesh {

std::string validate(const SamplerParams & p) {
    if (!std::isfinite(p.temperature) || p.temperature < 0) return "temperature must be >= 0 (0 = greedy)";
    if (p.top_k < 0) return "top-k must be >= 0 (0 = off)";
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return "top-p must be in (0, 1] (1 = off)";
    if (!(p.repetition_penalty > 0.0f && p.repetition_penalty <= 10.0f)) return "repetition penalty must be in (0, 10] (1 = off)";
    if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) return "frequency penalty must be in [-2, 2] (0 = off)";
    if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) return "presence penalty must be in [-2, 2] (0 = off)";
    for (const auto & [t, b] : p.logit_bias)
        if (t < 0 || !(b >= -100.0f && b <= 100.0f))
            return "logit bias of token " + std::to_string(t) + ": the id must be >= 0 and the bias in [-100, 100]";
    return {};
}

// The first index of the largest value, NaNs never winning (but a NaN at 0 is the answer, as a
// scan from 0 that moves only to strictly larger values gives). Sixteen independent maxima in
// vectors (GCC/Clang vector extensions, any target), where one running index does not
// vectorise: 2x faster over a 32000-entry row; the second pass stops at the answer.
int32_t argmax(const float * x, int64_t n) {
    if (n <= 1 || std::isnan(x[0])) return 0;
    typedef float v4 __attribute__((vector_size(16)));
    v4 l[4];
    for (v4 & v : l) v = v4{} - INFINITY;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; ++j) {
            v4 a;
            std::memcpy(&a, x + i + 4 * j, sizeof a);
            l[j] = a > l[j] ? a : l[j];
        }
    float m = x[0];
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    for (const v4 & v : l)
        for (int j = 0; j < 4; ++j) m = v[j] > m ? v[j] : m;
    for (i = 0; i < n; ++i)
        if (x[i] == m) break;   // found: m is x[0] or a value of the row
    return int32_t(i);
}

Sampler::Sampler(const SamplerParams & params, int64_t n_vocab, const std::vector<int32_t> & prompt)
    : params_(params), rng_(params.seed) {
    idx_.reserve(size_t(n_vocab));
    probs_.reserve(size_t(n_vocab));
    if (!penalized()) return;
    count_.assign(size_t(n_vocab), 0);
    in_prompt_.assign(size_t(n_vocab), 0);
    work_.reserve(size_t(n_vocab));
    if (params_.repetition_penalty == 1.0f) return;   // only the output counts
    for (int32_t t : prompt)
        if (t >= 0 && t < n_vocab && !in_prompt_[size_t(t)]) {
            in_prompt_[size_t(t)] = 1;
            seen_.push_back(t);
        }
}

bool Sampler::penalized() const {
    return params_.repetition_penalty != 1.0f || params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f ||
           !params_.logit_bias.empty();
}

// The row with the penalties applied to the ids seen so far (a copy; the caller's row is left).
const float * Sampler::penalize(const float * logits, int64_t n_vocab) {
    if (!penalized() || int64_t(count_.size()) != n_vocab) return logits;   // off, or sized for another vocabulary
    work_.assign(logits, logits + n_vocab);
    for (const auto & [t, b] : params_.logit_bias)
        if (t >= 0 && t < n_vocab) work_[size_t(t)] += b;
    for (int32_t t : seen_) {
        float & l = work_[size_t(t)];
        const int32_t n = count_[size_t(t)];
        if (params_.repetition_penalty != 1.0f) l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
        l -= params_.frequency_penalty * float(n) + (n > 0 ? params_.presence_penalty : 0.0f);
    }
    return work_.data();
}

int32_t Sampler::sample(const float * logits, int64_t n_vocab, GrammarMatcher * grammar) {
    const float * row = penalized() ? penalize(logits, n_vocab) : logits;
    int32_t t = draw(row, n_vocab);
    if (grammar && !grammar->allows(t)) {
        if (grammar->fill_allowed(&allowed_) == 0) return -1;
        masked_.assign(row, row + n_vocab);
        for (int64_t i = 0; i < n_vocab; ++i)
            if (!allowed_[size_t(i)]) masked_[size_t(i)] = -INFINITY;
        t = draw(masked_.data(), n_vocab);
    }
    if (penalized()) accept(t);
    return t;
}

void Sampler::accept(int32_t t) {
    if (t >= 0 && t < int64_t(count_.size()) && count_[size_t(t)]++ == 0 && !in_prompt_[size_t(t)]) seen_.push_back(t);
}

void token_logprobs(const float * logits, int64_t n_vocab, int32_t token, int32_t n_top, TokenLogprobs * out) {
    n_top = std::clamp<int32_t>(n_top, 0, int32_t(std::min<int64_t>(k_max_top_logprobs, n_vocab)));
    float mx = logits[0];
    for (int64_t i = 1; i < n_vocab; ++i) mx = std::max(mx, logits[i]);
    double sum = 0.0;   // float exponentials summed in double (double ones were 3% of a serving profile)
    for (int64_t i = 0; i < n_vocab; ++i) sum += double(std::exp(logits[i] - mx));
    const double lse = double(mx) + std::log(sum);
    // The n_top largest by insertion into a short sorted list; a later equal logit has the
    // higher id and stays behind, so ties go to the lower id.
    int32_t n = 0;
    for (int64_t i = 0; i < n_vocab && n_top > 0; ++i) {
        const float l = logits[i];
        if (n == n_top && !(l > logits[out->top_ids[n - 1]])) continue;
        int32_t j = n < n_top ? n++ : n - 1;
        while (j > 0 && l > logits[out->top_ids[j - 1]]) {
            out->top_ids[j] = out->top_ids[j - 1];
            --j;
        }
        out->top_ids[j] = int32_t(i);
    }
    out->n_top = n;
    for (int32_t j = 0; j < n; ++j) out->top_logprobs[j] = float(double(logits[out->top_ids[j]]) - lse);
    out->logprob = token >= 0 && token < n_vocab ? float(double(logits[token]) - lse) : -INFINITY;
}

// Tokens are visited in descending logit order (ties: lower id first), the order the
// cumulative draw walks. Only as much of the vocabulary is sorted as the walk reaches: the
// mass sits in a few dozen tokens, so a full 32000-entry sort per token (5 ms on this
// machine, 5x a decode step's forward pass at 16 sequences) becomes a partial one.
int32_t Sampler::draw(const float * logits, int64_t n_vocab) {
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
    ensure_sorted(n);   // rounding left r > 0: the last candidate with any weight (never a -inf one)
    for (int64_t i = n - 1; i > 0; --i)
        if (probs_[size_t(idx_[size_t(i)])] > 0.0f) return idx_[size_t(i)];
    return idx_[0];
}

} // namespace moesh
