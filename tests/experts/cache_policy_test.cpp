// Replacement policies on traces worked out by hand (the comments give the cache after each request).
#include "experts/cache_policy.h"

#include <gtest/gtest.h>

#include <stdexcept>

namespace moesh {
namespace {

std::vector<ExpertRequest> one_layer(const std::vector<int32_t> & experts) {
    std::vector<ExpertRequest> r;
    for (size_t i = 0; i < experts.size(); ++i) r.push_back({int64_t(i), 0, experts[i]});
    return r;
}

CacheStats run(const std::vector<ExpertRequest> & r, int64_t capacity, Policy p, double decay = 0.95) {
    PolicyParams pp;
    pp.policy = p;
    pp.heat_decay = decay;
    if (p == Policy::Static) pp.pinned = most_used_experts(r, 4, capacity);
    return simulate_cache(r, 4, 1, capacity, pp);
}

// 0 1 2 0 1 3 0 with two slots.
TEST(CachePolicy, CyclicTraceDefeatsLruAndLfuButNotBelady) {
    const auto r = one_layer({0, 1, 2, 0, 1, 3, 0});
    // lru: {0} {0,1} {1,2} {2,0} {0,1} {1,3} {3,0}: no hits
    CacheStats s = run(r, 2, Policy::Lru);
    EXPECT_EQ(s.hits, 0);
    EXPECT_EQ(s.loads, 7);
    EXPECT_EQ(s.evictions, 5);
    // lfu (counts so far, ties by recency): {0} {0,1} {1,2} {2,0} {0,1} {1,3} {1,0}: no hits
    EXPECT_EQ(run(r, 2, Policy::Lfu).hits, 0);
    // belady: {0} {0,1}, 2 is never needed again: not cached, {0,1}* {0,1}*, 3 not cached, {0,1}*
    s = run(r, 2, Policy::Belady);
    EXPECT_EQ(s.hits, 3);
    EXPECT_EQ(s.loads, 2);
    EXPECT_EQ(s.evictions, 0);
    // static: the two most used (0: 3 uses, 1: 2 uses) pinned, nothing else cached
    s = run(r, 2, Policy::Static);
    EXPECT_EQ(s.hits, 5);
    EXPECT_EQ(s.loads, 0);
    EXPECT_DOUBLE_EQ(s.hit_rate(), 5.0 / 7.0);
}

// A A A A B C B C B C with two slots: A was hot and went cold.
TEST(CachePolicy, HeatForgetsWhatLfuRemembers) {
    const auto r = one_layer({0, 0, 0, 0, 1, 2, 1, 2, 1, 2});
    // lfu keeps A (4 uses) and thrashes B and C in the other slot: hits only A's 3
    EXPECT_EQ(run(r, 2, Policy::Lfu).hits, 3);
    // heat, decay 0.5: at step 5 A has 1.875 * 0.5^2 = 0.47 < B's 0.5, so A goes: 3 + 4 hits
    EXPECT_EQ(run(r, 2, Policy::Heat, 0.5).hits, 7);
    // with no decay, counts: C (1, then 2) is never expected back sooner than B (1, then 2, 3), so it
    // is not admitted and B stays: A's 3 hits + B's 2
    EXPECT_EQ(run(r, 2, Policy::Heat, 1.0).hits, 5);
    EXPECT_EQ(run(r, 2, Policy::Lru).hits, 7);
    EXPECT_EQ(run(r, 2, Policy::Belady).hits, 7);
}

// Three layers of one expert each, visited in order, two slots.
TEST(CachePolicy, HeatKeepsTheLayerThatComesNext) {
    std::vector<ExpertRequest> r;
    for (int64_t t = 0; t < 4; ++t)
        for (int32_t l = 0; l < 3; ++l) r.push_back({t, l, 0});
    PolicyParams p;
    p.policy = Policy::Lru;
    // lru always evicts the layer that comes next: {0} {0,1} {1,2} {2,0} ... never a hit
    EXPECT_EQ(simulate_cache(r, 1, 1, 2, p).hits, 0);
    // heat (p = 1 for a layer's only expert): the victim is the layer wanted farthest away, and a missed
    // expert is admitted only if it is wanted sooner than that. t0: {0} {0,1}; 2 (back in 3 layers) vs
    // 1 (back in 2): not admitted. t1..t3: 0 and 1 hit, 2 streams: 6 hits
    p.policy = Policy::Heat;
    EXPECT_EQ(simulate_cache(r, 1, 1, 2, p).hits, 6);
    p.policy = Policy::Belady;
    EXPECT_GE(simulate_cache(r, 1, 1, 2, p).hits, 5);
    // the state agrees: at layer 2, layer 0's expert is 1 visit away and layer 1's 2
    PolicyState st(3, 1, 1, PolicyParams{Policy::Heat, 0.95, {}});
    for (int64_t k : {0, 1, 2}) st.use(k, 0);
    EXPECT_DOUBLE_EQ(st.expected_next_use(0, 0, 2), 1.0);
    EXPECT_DOUBLE_EQ(st.expected_next_use(1, 0, 2), 2.0);
    const int64_t cand[] = {0, 1};
    EXPECT_EQ(st.victim(cand, 2, 0, 2), 1u);
}

TEST(CachePolicy, BeladyIsNeverBeaten) {
    std::vector<ExpertRequest> r;
    uint32_t x = 12345;
    for (int t = 0; t < 400; ++t)
        for (int32_t l = 0; l < 3; ++l) {
            x = x * 1103515245u + 12345u;
            r.push_back({t, l, int32_t((x >> 16) % 4 < 3 ? (x >> 20) % 2 : (x >> 20) % 4)});   // skewed
        }
    for (int64_t cap : {1, 3, 6, 9}) {
        const int64_t opt = run(r, cap, Policy::Belady).hits;
        for (Policy p : {Policy::Lru, Policy::Lfu, Policy::Heat})
            EXPECT_LE(run(r, cap, p).hits, opt) << policy_name(p) << " capacity " << cap;
        EXPECT_LE(run(r, cap, Policy::Static).hits, opt + cap) << "capacity " << cap;   // pins start loaded
    }
    EXPECT_EQ(run(r, 12, Policy::Lru).hits, run(r, 12, Policy::Belady).hits);   // everything fits: only cold misses
    EXPECT_EQ(run(r, 1, Policy::Lru).hits, 0);   // layers alternate: one slot never hits
    EXPECT_GT(run(r, 1, Policy::Belady).hits, 0);   // but keeping one hot expert does
    EXPECT_EQ(run(r, 12, Policy::Lru).loads, 12);
}

TEST(CachePolicy, PinsAreAlwaysResidentAndNeverEvicted) {
    const auto r = one_layer({3, 0, 1, 2, 3, 0, 1, 2, 3});
    PolicyParams p;
    p.policy = Policy::Lru;
    p.pinned = {3};
    const CacheStats s = simulate_cache(r, 4, 1, 2, p);   // one free slot for 0 1 2: all miss; 3 always hits
    EXPECT_EQ(s.hits, 3);
    EXPECT_EQ(s.loads, 6);
}

TEST(CachePolicy, RefusesWhatCannotBe) {
    PolicyParams p;
    EXPECT_THROW(simulate_cache(one_layer({4}), 4, 1, 2, p), std::invalid_argument);   // expert out of range
    p.pinned = {0, 1, 2};
    EXPECT_THROW(simulate_cache(one_layer({0}), 4, 1, 2, p), std::invalid_argument);   // more pins than slots
    p.pinned = {};
    p.heat_decay = 0.0;
    EXPECT_THROW(simulate_cache(one_layer({0}), 4, 1, 2, p), std::invalid_argument);
    Policy q;
    EXPECT_TRUE(parse_policy("heat", &q));
    EXPECT_EQ(q, Policy::Heat);
    EXPECT_FALSE(parse_policy("mru", &q));
    EXPECT_EQ(simulate_cache({}, 4, 1, 0, PolicyParams{}).hit_rate(), 0.0);
}

} // namespace
} // namespace moesh
