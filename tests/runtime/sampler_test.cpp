#include "runtime/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

namespace moesh {
namespace {

TEST(Sampler, TemperatureZeroIsArgmaxWithLowestIdOnTies) {
    const float l[5] = {0.0f, 3.0f, 1.0f, 3.0f, -2.0f};
    Sampler s({0.0f, 0, 1.0f, 0});
    EXPECT_EQ(s.sample(l, 5), 1);
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
}

} // namespace
} // namespace moesh
