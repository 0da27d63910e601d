// Picks the next token from a row of logits.
//
//   Sampler s(SamplerParams{.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 1});
//   int32_t tok = s.sample(logits, n_vocab);
//
// The logit bias comes first (added to the listed tokens' logits, as OpenAI's logit_bias), then
// penalties on tokens seen before, in vLLM's order: repetition
// (Hugging Face's: every token of the prompt and of the output so far, a
// positive logit divided by it, a negative one multiplied), then frequency and
// presence (OpenAI's: minus frequency times the token's count in the output,
// minus presence once it is there). Then temperature <= 0 means greedy (argmax,
// ties to the lower id); otherwise, in the order Hugging Face's generate
// applies them: temperature, top-k, top-p, then a draw from the remaining
// distribution with a seeded generator, so a seed gives the same tokens on
// every machine. Buffers are sized once; only the part of the vocabulary the
// draw reaches is sorted.
//
// token_logprobs() gives a token's log-probability under the model's own
// logits (before penalties and temperature, as vLLM's default and
// transformers' output_logits) and the most likely tokens.
// Thread safety: one thread per Sampler.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <string>
#include <vector>

namespace moesh {

class GrammarMatcher;

struct SamplerParams {
    float temperature = 0.0f;
    int32_t top_k = 0;      // 0 = off
    float top_p = 1.0f;     // 1 = off
    uint64_t seed = 0;
    float repetition_penalty = 1.0f;   // (0, 10]; 1 = off
    float frequency_penalty = 0.0f;    // [-2, 2]; 0 = off
    float presence_penalty = 0.0f;     // [-2, 2]; 0 = off
    std::vector<std::pair<int32_t, float>> logit_bias = {};   // (token id >= 0, bias in [-100, 100]); ids past the vocabulary are ignored
};

// Empty when valid, else a message naming the bad parameter.
std::string validate(const SamplerParams & p);

class Sampler {
public:
    // prompt: what the repetition penalty counts besides the output (ids outside
    // [0, n_vocab) are ignored).
    explicit Sampler(const SamplerParams & params, int64_t n_vocab = 0, const std::vector<int32_t> & prompt = {});
    // The next token from logits [n_vocab], which stay as they are; it counts as output.
    // With a grammar, a token it refuses is drawn again among the tokens it allows (llama.cpp's
    // order: without truncation this is exactly the distribution restricted to them); -1 when it
    // allows none. The caller advances the grammar.
    int32_t sample(const float * logits, int64_t n_vocab, GrammarMatcher * grammar = nullptr);
    // Counts token as output without sampling it (replaying a history).
    void accept(int32_t token);
    // logits [n_vocab] with the bias and penalties applied, in a buffer of the Sampler's (valid
    // until the next call); logits themselves when neither is set.
    const float * penalize(const float * logits, int64_t n_vocab);

private:
    bool penalized() const;
    int32_t draw(const float * logits, int64_t n_vocab);

    SamplerParams params_;
    std::mt19937_64 rng_;
    std::vector<int32_t> idx_;   // [n_vocab]
    std::vector<float> probs_;   // [n_vocab]: the candidates' weights, by token id
    // Penalties only: per token id, its count in the output and whether the prompt has it;
    // seen_ lists each id with either, once; work_ is the penalized copy of a row.
    std::vector<int32_t> count_;
    std::vector<uint8_t> in_prompt_;
    std::vector<int32_t> seen_;
    std::vector<float> work_;
    std::vector<uint8_t> allowed_;   // grammar only: [n_vocab]
    std::vector<float> masked_;      // grammar only: the row with refused tokens at -inf
};

constexpr int32_t k_max_top_logprobs = 20;

struct TokenLogprobs {
    float logprob = 0;                      // of the token asked about
    int32_t n_top = 0;                      // entries of top_*: the most likely first, ties to the lower id
    int32_t top_ids[k_max_top_logprobs] = {};
    float top_logprobs[k_max_top_logprobs] = {};
};

// log softmax(logits)[token] and the n_top (<= k_max_top_logprobs, clamped) largest entries.
void token_logprobs(const float * logits, int64_t n_vocab, int32_t token, int32_t n_top, TokenLogprobs * out);

int32_t argmax(const float * x, int64_t n);

} // namespace moesh
