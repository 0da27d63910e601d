// Picks the next token from a row of logits.
//
//   Sampler s(SamplerParams{.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 1});
//   int32_t tok = s.sample(logits, n_vocab);
//
// temperature <= 0 means greedy (argmax, ties to the lower id). Otherwise, in
// the order Hugging Face's generate applies them: temperature, top-k, top-p,
// then a draw from the remaining distribution with a seeded generator, so a
// seed gives the same tokens on every machine. Buffers are sized once; only
// the part of the vocabulary the draw reaches is sorted.
// Thread safety: one thread per Sampler.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace moesh {

struct SamplerParams {
    float temperature = 0.0f;
    int32_t top_k = 0;      // 0 = off
    float top_p = 1.0f;     // 1 = off
    uint64_t seed = 0;
};

// Empty when valid, else a message naming the bad parameter.
std::string validate(const SamplerParams & p);

class Sampler {
public:
    explicit Sampler(const SamplerParams & params, int64_t n_vocab = 0);
    int32_t sample(const float * logits, int64_t n_vocab); // logits [n_vocab]

private:
    SamplerParams params_;
    std::mt19937_64 rng_;
    std::vector<int32_t> idx_;   // [n_vocab]
    std::vector<float> probs_;   // [n_vocab]: the candidates' weights, by token id
};

int32_t argmax(const float * x, int64_t n);

} // namespace moesh
