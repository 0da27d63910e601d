#include "runtime/sampler.h"

#include "runtime/grammar.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <vector>

namespace moesh {
namespace {

TEST(Sampler, TemperatureZeroIsArgmaxWithLowestIdOnTies) {
    const float l[5] = {0.0f, 3.0f, 1.0f, 3.0f, -2.0f};
    Sampler s({0.0f, 0, 1.0f, 0});
    EXPECT_EQ(s.sample(l, 5), 1);
}

// argmax against the plain scan (the first index whose value no later one beats) on rows of
// every length around the vector width, with ties, signed zeros, infinities and NaNs anywhere.
TEST(Sampler, ArgmaxIsTheFirstLargestAndNeverANan) {
    auto scan = [](const float * x, int64_t n) {
        int64_t best = 0;
        for (int64_t i = 1; i < n; ++i)
            if (x[i] > x[best]) best = i;
        return int32_t(best);
    };
    const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, 1.0f, -1.0f};
    uint32_t r = 7;
    auto next = [&r] { return r = r * 1664525u + 1013904223u; };
    for (int64_t n = 1; n <= 70; ++n)
        for (int rep = 0; rep < 200; ++rep) {
            std::vector<float> x(static_cast<size_t>(n));
            for (float & v : x) v = next() % 4 == 0 ? special[next() % 8] : float(int(next() % 9) - 4);
            ASSERT_EQ(argmax(x.data(), n), scan(x.data(), n)) << "n " << n << " rep " << rep;
        }
    std::vector<float> row(32000, -5.0f);
    row[31999] = 2.0f;
    row[17] = NAN;
    EXPECT_EQ(argmax(row.data(), 32000), 31999);
    row[0] = NAN;
    EXPECT_EQ(argmax(row.data(), 32000), 0);
}

TEST(Sampler, TopKOneIsGreedy) {
    const float l[4] = {0.5f, 0.1f, 2.0f, 1.9f};
    Sampler s({1.0f, 1, 1.0f, 9});
    for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample(l, 4), 2);
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
    // probabilities ~ {0.64, 0.24, 0.09, 0.03}: top-p 0.8 keeps tokens 0 and 1
    const float l[4] = {2.0f, 1.0f, 0.0f, -1.0f};
    Sampler s({1.0f, 0, 0.8f, 5});
    std::map<int, int> seen;
    for (int i = 0; i < 400; ++i) ++seen[s.sample(l, 4)];
    EXPECT_GT(seen[0], 0);
    EXPECT_GT(seen[1], 0);
    EXPECT_EQ(seen.count(2) + seen.count(3), 0u);
}

TEST(Sampler, FollowsTheDistribution) {
    const float l[2] = {0.0f, std::log(3.0f)}; // p = 0.25, 0.75
    Sampler s({1.0f, 0, 1.0f, 1234});
    int ones = 0;
    const int n = 4000;
    for (int i = 0; i < n; ++i) ones += s.sample(l, 2);
    EXPECT_NEAR(double(ones) / n, 0.75, 0.03);
}

// Under a grammar: greedy picks the most likely allowed token; a draw follows the model's
// distribution restricted to the allowed tokens (a refused draw is drawn again among them).
TEST(Sampler, GrammarRestrictsTheDistributionExactly) {
    std::vector<std::string> pieces(256);
    for (int b = 0; b < 256; ++b) pieces[size_t(b)] = std::string(1, char(b));
    const auto vocab = std::make_shared<const GrammarVocab>(std::move(pieces));
    std::string err;
    const auto g = Grammar::parse("root ::= [a-f] | \"z\"", &err);
    ASSERT_TRUE(g) << err;
    std::vector<float> logits(256);
    for (int i = 0; i < 256; ++i) logits[size_t(i)] = float((i * 37) % 11) * 0.5f;   // 'z' (122) is 5.0 high
    logits[size_t('c')] = 6.0f;
    logits[size_t('0')] = 9.0f;   // the most likely token, refused
    GrammarMatcher m(g, vocab, {});
    Sampler greedy(SamplerParams{});
    EXPECT_EQ(greedy.sample(logits.data(), 256, &m), 'c');

    Sampler s(SamplerParams{.temperature = 1.0f, .seed = 11});
    std::map<int32_t, int> counts;
    const int n = 40000;
    for (int i = 0; i < n; ++i) ++counts[s.sample(logits.data(), 256, &m)];   // m stays at the start
    double z = 0;
    for (int32_t t : {'a', 'b', 'c', 'd', 'e', 'f', 'z'}) z += std::exp(double(logits[size_t(t)]));
    int in = 0;
    for (int32_t t : {'a', 'b', 'c', 'd', 'e', 'f', 'z'}) {
        const double p = std::exp(double(logits[size_t(t)])) / z;
        EXPECT_NEAR(double(counts[t]) / n, p, 4 * std::sqrt(p * (1 - p) / n) + 1e-4) << char(t);
        in += counts[t];
    }
    EXPECT_EQ(in, n);   // nothing refused came out
}

TEST(Sampler, SameSeedSameTokens) {
    std::vector<float> l(100);
    for (int i = 0; i < 100; ++i) l[size_t(i)] = float(i % 7) * 0.3f;
    Sampler a({0.9f, 20, 0.95f, 77}), b({0.9f, 20, 0.95f, 77});
    for (int i = 0; i < 50; ++i) EXPECT_EQ(a.sample(l.data(), 100), b.sample(l.data(), 100));
}

TEST(Sampler, ValidateNamesBadParameters) {
    EXPECT_NE(validate({-1.0f, 0, 1.0f, 0}).find("temperature"), std::string::npos);
    EXPECT_NE(validate({1.0f, -1, 1.0f, 0}).find("top-k"), std::string::npos);
    EXPECT_NE(validate({1.0f, 0, 1.5f, 0}).find("top-p"), std::string::npos);
    EXPECT_TRUE(validate({0.7f, 40, 0.9f, 0}).empty());
    EXPECT_NE(validate({0.0f, 0, 1.0f, 0, 0.0f}).find("repetition penalty"), std::string::npos);
    EXPECT_NE(validate({0.0f, 0, 1.0f, 0, 1.0f, 2.5f}).find("frequency penalty"), std::string::npos);
    EXPECT_NE(validate({0.0f, 0, 1.0f, 0, 1.0f, 0.0f, -2.1f}).find("presence penalty"), std::string::npos);
    EXPECT_NE(validate({0.0f, 0, 1.0f, 0, 1.0f, 0.0f, NAN}).find("presence penalty"), std::string::npos);
    EXPECT_TRUE(validate({0.0f, 0, 1.0f, 0, 1.3f, -2.0f, 2.0f}).empty());
}

// Greedy on a fixed row: each penalty moves the choice exactly where its formula says.
TEST(Sampler, FrequencyAndPresencePenaltiesCountTheOutputOnly) {
    const float l[3] = {2.0f, 1.5f, 0.0f};
    SamplerParams p;
    p.frequency_penalty = 0.4f;   // token 0 after n picks: 2 - 0.4 n; token 1: 1.5 - 0.4 m
    Sampler s(p, 3, {1, 1, 1});   // the prompt does not count
    std::vector<int32_t> got;
    for (int i = 0; i < 6; ++i) got.push_back(s.sample(l, 3));
    // 0 (2 vs 1.5), 0 (1.6 vs 1.5), 1 (1.2 vs 1.5), 0 (1.2 vs 1.1), 1 (0.8 vs 1.1), 0 (0.8 vs 0.7)
    EXPECT_EQ(got, (std::vector<int32_t>{0, 0, 1, 0, 1, 0}));
    EXPECT_EQ(l[0], 2.0f);   // the caller's row is left as it was

    SamplerParams q;
    q.presence_penalty = 0.6f;   // once: 1.4 vs 1.5, then both are present: 1.4 vs 0.9
    Sampler t(q, 3);
    EXPECT_EQ(t.sample(l, 3), 0);
    EXPECT_EQ(t.sample(l, 3), 1);
    EXPECT_EQ(t.sample(l, 3), 0);
    EXPECT_EQ(t.sample(l, 3), 0);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
    const float l[3] = {2.0f, 1.2f, -0.5f};
    SamplerParams p;
    p.repetition_penalty = 2.0f;
    Sampler s(p, 3, {0, 7, -1});   // ids outside the vocabulary are ignored
    EXPECT_EQ(s.sample(l, 3), 1);  // 2 / 2 = 1 < 1.2
    EXPECT_EQ(s.sample(l, 3), 0);  // 1.2 / 2 = 0.6 < 1
    const float m[3] = {-1.0f, -0.9f, -0.6f};
    Sampler t(p, 3, {2});
    EXPECT_EQ(t.sample(m, 3), 1);  // -0.6 * 2 = -1.2 < -0.9
}

// Whole rows against transformers' SequenceBiasLogitsProcessor and RepetitionPenaltyLogitsProcessor and llama.cpp's penalties
// sampler (scripts/make_penalty_references.py): every value, not only where the argmax moves.
TEST(Sampler, PenalisedRowsEqualTransformersAndLlamaCpp) {
    std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/shipped/moesh-tiny-py/penalties.json");
    ASSERT_TRUE(in.good());
    const auto rows = nlohmann::json::parse(in).at("rows");
    ASSERT_EQ(rows.size(), 4u);
    for (const auto & r : rows) {
        SamplerParams p;
        for (const auto & b : r.at("logit_bias")) p.logit_bias.push_back({b.at(0).get<int32_t>(), b.at(1).get<float>()});
        p.repetition_penalty = r.at("repetition_penalty").get<float>();
        p.frequency_penalty = r.at("frequency_penalty").get<float>();
        p.presence_penalty = r.at("presence_penalty").get<float>();
        const auto logits = r.at("logits").get<std::vector<float>>();
        const auto want = r.at("penalized").get<std::vector<float>>();
        Sampler s(p, int64_t(logits.size()), r.at("prompt").get<std::vector<int32_t>>());
        for (int32_t t : r.at("output").get<std::vector<int32_t>>()) s.accept(t);
        const float * got = s.penalize(logits.data(), int64_t(logits.size()));
        int changed = 0;
        for (size_t i = 0; i < want.size(); ++i) {
            EXPECT_NEAR(got[i], want[i], 1e-5f * std::max(1.0f, std::fabs(want[i]))) << r.dump().substr(0, 80) << ", token " << i;
            changed += got[i] != logits[i];
        }
        EXPECT_GT(changed, 10);   // the case moves many values
    }
}

TEST(Sampler, TokenLogprobsAreTheLogSoftmaxAndItsLargestEntries) {
    const float l[6] = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f, 2.0f};
    double z = 0;
    for (float v : l) z += std::exp(double(v));
    TokenLogprobs lp;
    token_logprobs(l, 6, 4, 3, &lp);
    EXPECT_NEAR(lp.logprob, 0.5 - std::log(z), 1e-6);
    ASSERT_EQ(lp.n_top, 3);
    EXPECT_EQ(lp.top_ids[0], 1);   // ties to the lower id
    EXPECT_EQ(lp.top_ids[1], 3);
    EXPECT_EQ(lp.top_ids[2], 5);
    EXPECT_NEAR(lp.top_logprobs[2], 2.0 - std::log(z), 1e-6);
    double total = 0;
    token_logprobs(l, 6, 0, 99, &lp);   // clamped to the vocabulary
    ASSERT_EQ(lp.n_top, 6);
    for (int j = 0; j < lp.n_top; ++j) total += std::exp(double(lp.top_logprobs[j]));
    EXPECT_NEAR(total, 1.0, 1e-6);
    EXPECT_EQ(lp.top_ids[5], 2);
    token_logprobs(l, 6, 2, 0, &lp);
    EXPECT_EQ(lp.n_top, 0);
    EXPECT_NEAR(lp.logprob, -2.0 - std::log(z), 1e-6);
}

} // namespace
} // namespace moesh
