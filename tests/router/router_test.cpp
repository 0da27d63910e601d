#include "router/router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

namespace moesh {
namespace {

TEST(Router, SoftmaxTopkPicksLargestAndRenormalises) {
    const float logits[2 * 4] = {0.1f, 2.0f, -1.0f, 1.0f,   // token 0: experts 1, 3
                                 3.0f, 3.0f, 0.0f, -5.0f};  // token 1: tie -> 0 then 1
    int32_t ids[4];
    float w[4];
    route_softmax_topk(logits, 2, {4, 2, true}, ids, w);
    EXPECT_EQ(ids[0], 1);
    EXPECT_EQ(ids[1], 3);
    EXPECT_EQ(ids[2], 0);
    EXPECT_EQ(ids[3], 1);
    EXPECT_NEAR(w[0] + w[1], 1.0f, 1e-6);
    EXPECT_NEAR(w[0], 1.0 / (1.0 + std::exp(-1.0)), 1e-6); // e^2 / (e^2 + e^1)
    EXPECT_NEAR(w[2], 0.5f, 1e-6);
}

TEST(Router, WithoutRenormalisationWeightsAreSoftmaxProbabilities) {
    const float logits[3] = {1.0f, 2.0f, 3.0f};
    int32_t ids[2];
    float w[2];
    route_softmax_topk(logits, 1, {3, 2, false}, ids, w);
    const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    EXPECT_EQ(ids[0], 2);
    EXPECT_EQ(ids[1], 1);
    EXPECT_NEAR(w[0], std::exp(3.0) / z, 1e-6);
    EXPECT_NEAR(w[1], std::exp(2.0) / z, 1e-6);
}

TEST(Router, TopkOfAllExpertsAndLargeLogitsStayFinite) {
    const float logits[4] = {1000.0f, -1000.0f, 999.0f, 0.0f};
    int32_t ids[4];
    float w[4];
    route_softmax_topk(logits, 1, {4, 4, true}, ids, w);
    EXPECT_EQ(std::vector<int32_t>(ids, ids + 4), (std::vector<int32_t>{0, 2, 3, 1}));
    for (float x : w) EXPECT_TRUE(std::isfinite(x));
    EXPECT_NEAR(w[0] + w[1] + w[2] + w[3], 1.0f, 1e-6);
}

TEST(Router, SharedExpertGateIsSigmoid) {
    float g[3] = {0.0f, 2.0f, -40.0f};
    shared_expert_gate(g, 3);
    EXPECT_FLOAT_EQ(g[0], 0.5f);
    EXPECT_NEAR(g[1], 1.0 / (1.0 + std::exp(-2.0)), 1e-7);
    EXPECT_GE(g[2], 0.0f);
}

TEST(ExpertDispatch, GroupsTokensByExpertKeepingWeights) {
    const int32_t ids[6] = {2, 0, 0, 1, 2, 1}; // 3 tokens x top-2
    const float w[6] = {0.6f, 0.4f, 0.7f, 0.3f, 0.9f, 0.1f};
    ExpertDispatch d(4, 6);
    d.build(ids, w, 3, 2);
    EXPECT_EQ(d.n_tokens_for(0), 2);
    EXPECT_EQ(d.n_tokens_for(1), 2);
    EXPECT_EQ(d.n_tokens_for(2), 2);
    EXPECT_EQ(d.n_tokens_for(3), 0);
    EXPECT_EQ(d.tokens_for(0)[0], 0);
    EXPECT_EQ(d.tokens_for(0)[1], 1);
    EXPECT_FLOAT_EQ(d.weights_for(0)[1], 0.7f);
    EXPECT_EQ(d.tokens_for(2)[1], 2);
    EXPECT_FLOAT_EQ(d.weights_for(2)[1], 0.9f);
}

TEST(ExpertHeat, CountsActivationsPerLayer) {
    ExpertHeat h(2, 3);
    const int32_t ids[4] = {0, 2, 2, 2};
    h.add(1, ids, 4);
    EXPECT_EQ(h.counts(1), (std::vector<uint64_t>{1, 0, 3}));
    EXPECT_EQ(h.total(0), 0u);
    EXPECT_EQ(h.total(1), 4u);
    h.reset();
    EXPECT_EQ(h.total(1), 0u);
}

} // namespace
} // namespace moesh
