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
        for (Policy p : {Policy::Lru, Policy::Lfu, Policy::Heat, Policy::Lookahead})
            EXPECT_LE(run(r, cap, p).hits, opt) << policy_name(p) << " capacity " << cap;
        EXPECT_LE(run(r, cap, Policy::Static).hits, opt + cap) << "capacity " << cap;   // pins start loaded
    }
    // The window oracle is Belady's rule within its window: never above it, equal when it sees everything
    // (one request per visit here, so visits and requests count alike).
    PolicyParams w;
    w.policy = Policy::Window;
    for (int64_t cap : {1, 3, 6, 9}) {
        const int64_t opt = run(r, cap, Policy::Belady).hits;
        w.window = 4;
        EXPECT_LE(simulate_cache(r, 4, 1, cap, w).hits, opt) << "capacity " << cap;
        w.window = int64_t(r.size());
        EXPECT_EQ(simulate_cache(r, 4, 1, cap, w).hits, opt) << "capacity " << cap;
    }
    EXPECT_EQ(run(r, 12, Policy::Lru).hits, run(r, 12, Policy::Belady).hits);   // everything fits: only cold misses
    EXPECT_EQ(run(r, 1, Policy::Lru).hits, 0);   // layers alternate: one slot never hits
    EXPECT_GT(run(r, 1, Policy::Belady).hits, 0);   // but keeping one hot expert does
    EXPECT_EQ(run(r, 12, Policy::Lru).loads, 12);
}

// Two layers of two experts, k = 1, lookahead decay 0.99: the priors are a use rate of k / n_expert = 0.5
// after a use and after a non-use (4 visits' worth), 0.75 for a prediction's first rank, 0.5 for its
// second rank and for unpredicted experts. Keys: layer 0 = {0, 1}, layer 1 = {2, 3}.
TEST(CachePolicy, LookaheadEvictsTheNextLayersUnpredictedExpert) {
    PolicyState st(2, 2, 1, PolicyParams{Policy::Lookahead, 0.95, {}, 0.99});
    // At layer 0, nothing seen: heat's p = k (0 + 1) / (0 + n_expert) = 0.5, reuse 0.5, so p1 = p0 = 0.5 and
    // expected next use = d + (1 - p1) n_layer / p0 = 1 + 0.5 * 2 / 0.5 = 3 for both; the tie goes to
    // the first candidate.
    const int64_t cand[] = {3, 2};
    EXPECT_DOUBLE_EQ(st.expected_next_use(2, 0, 0), 3.0);
    EXPECT_EQ(st.victim(cand, 2, 0, 0), 0u);
    EXPECT_EQ(st.predicted_rank(3), -2);
    // The next layer is predicted to want 3: its p1 is rank 0's precision 0.75, 2's the unpredicted 0.5.
    const int32_t three[] = {1};   // expert 1 of layer 1 = key 3
    st.predict(1, three, 1);
    EXPECT_EQ(st.predicted_rank(3), 0);
    EXPECT_EQ(st.predicted_rank(2), -1);
    EXPECT_EQ(st.predicted_rank(0), -2);
    EXPECT_DOUBLE_EQ(st.expected_next_use(3, 0, 0), 1.0 + 0.25 * 2 / 0.5);
    EXPECT_DOUBLE_EQ(st.expected_next_use(2, 0, 0), 3.0);
    EXPECT_EQ(st.victim(cand, 2, 0, 0), 1u);
    // A missed expert of layer 0 (2 layers away: 2 + 0.5 * 2 / 0.5 = 4) is not admitted over 2 (3).
    EXPECT_FALSE(st.admit(0, 2, 0, 0));
    // Layer 1's visit wants 3: the prediction is scored (decay 0.99 first) and consumed; 3 now follows a use.
    st.begin_visit(1, three, 1);
    st.use(3, 0);
    EXPECT_EQ(st.predicted_rank(3), -2);
    EXPECT_DOUBLE_EQ(st.prediction_precision(0), (3 * 0.99 + 1) / (4 * 0.99 + 1));
    EXPECT_DOUBLE_EQ(st.prediction_precision(1), (2 * 0.99) / (4 * 0.99));
    EXPECT_DOUBLE_EQ(st.prediction_precision(-1), (2 * 0.99) / (4 * 0.99 + 1));
    // reuse of 3: after a use, 2 * 0.99 / (4 * 0.99) = 0.5, averaged with heat's k (1 + 1) / (1 + 2) = 2/3;
    // 2 followed a non-use and was not wanted: 2 * 0.99 / (4 * 0.99 + 1), with heat's 1/3.
    EXPECT_DOUBLE_EQ(st.reuse_probability(3, 0), 0.5 * 0.5 + 0.5 * (2.0 / 3.0));
    EXPECT_DOUBLE_EQ(st.reuse_probability(2, 0), 0.5 * (2 * 0.99) / (4 * 0.99 + 1) + 0.5 * (1.0 / 3.0));
    // Back at layer 0 with no prediction pending, 3 (reused more likely) outlives 2.
    EXPECT_EQ(st.victim(cand, 2, 1, 0), 1u);
}

// Two layers of three experts (keys: layer 0 = {0, 1, 2}, layer 1 = {3, 4, 5}), k = 1, three slots.
// Tokens (layer 0, layer 1): (1,1) (1,0) (1,1) (0,1) (0,0), i.e. keys 1 4 | 1 3 | 1 4 | 0 4 | 0 3.
TEST(CachePolicy, LookaheadKeepsWhatTheNextLayerIsPredictedToWant) {
    const std::vector<ExpertRequest> r = {{0, 0, 1}, {0, 1, 1}, {1, 0, 1}, {1, 1, 0}, {2, 0, 1},
                                          {2, 1, 1}, {3, 0, 0}, {3, 1, 1}, {4, 0, 0}, {4, 1, 0}};
    PolicyParams p;
    p.policy = Policy::Lookahead;
    // t0-t2: {1} {1,4} 1* {1,4,3} 1* 4*. t3: 0 misses; expected next uses 1: 3.92, 4: 3.37, 3: 4.53, 0 (two
    // layers away, rarely used): 6.63, so 0 is not admitted; 4*. t4: 0 misses again, with the prediction of
    // t4's layer 1 known since this visit began:
    // - right (expert 0 = key 3): 3 is expected in 2.62 visits, 1 in 4.64 and 0 in 5.32: 0 is not admitted; 3*
    // - wrong (expert 1 = key 4): 3 in 5.318, above 0's 5.316: 0 takes its slot {1,4,0}; 3 misses (not admitted)
    const std::vector<LayerPrediction> right = {{4, 1, {0}}}, wrong = {{4, 1, {1}}};
    EXPECT_EQ(simulate_cache(r, 3, 1, 3, p, &right).hits, 5);
    const CacheStats w = simulate_cache(r, 3, 1, 3, p, &wrong);
    EXPECT_EQ(w.hits, 4);
    EXPECT_EQ(w.evictions, 1);
    EXPECT_EQ(simulate_cache(r, 3, 1, 3, p).hits, 4);   // no prediction: as the wrong one here
    // A prediction of the first visit of a step is never revealed (the token is not known before it).
    const std::vector<LayerPrediction> first = {{4, 0, {1}}};
    EXPECT_EQ(simulate_cache(r, 3, 1, 3, p, &first).hits, 4);
}

// A prediction is revealed at the visit before its own, in the same step; one a policy other than
// lookahead gets changes nothing.
TEST(CachePolicy, SimulatorTakesPredictionsInVisitOrder) {
    std::vector<ExpertRequest> r;
    std::vector<LayerPrediction> p;
    for (int64_t t = 0; t < 50; ++t)
        for (int32_t l = 0; l < 3; ++l) {
            const int32_t first = int32_t((t * 7 + l * 3) % 4);
            r.push_back({t, l, first});
            r.push_back({t, l, int32_t((first + 1 + t % 3) % 4)});
            p.push_back({t, l, {first}});
        }
    PolicyParams pp;
    pp.policy = Policy::Heat;
    EXPECT_EQ(simulate_cache(r, 4, 2, 5, pp, &p).hits, simulate_cache(r, 4, 2, 5, pp).hits);
    pp.policy = Policy::Lookahead;
    pp.heat_decay = 0.9;
    const CacheStats with = simulate_cache(r, 4, 2, 5, pp, &p);
    EXPECT_EQ(with.requests, 300);
    pp.policy = Policy::Belady;
    EXPECT_LE(with.hits, simulate_cache(r, 4, 2, 5, pp).hits);
    std::swap(p[3], p[4]);   // out of order
    pp.policy = Policy::Lookahead;
    EXPECT_THROW(simulate_cache(r, 4, 2, 5, pp, &p), std::invalid_argument);
    p = {{0, 1, {4}}};       // expert out of range
    EXPECT_THROW(simulate_cache(r, 4, 2, 5, pp, &p), std::invalid_argument);
    pp.lookahead_decay = 1.5;
    EXPECT_THROW(simulate_cache(r, 4, 2, 5, pp), std::invalid_argument);
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
    p.heat_decay = 0.95;
    p.policy = Policy::Window;
    p.window = -1;
    EXPECT_THROW(simulate_cache(one_layer({0}), 4, 1, 2, p), std::invalid_argument);
    EXPECT_TRUE(parse_policy("window", &q));
    EXPECT_TRUE(parse_policy("lookahead", &q));
    EXPECT_EQ(q, Policy::Lookahead);
    EXPECT_FALSE(parse_policy("mru", &q));
    EXPECT_EQ(simulate_cache({}, 4, 1, 0, PolicyParams{}).hit_rate(), 0.0);
}

} // namespace
} // namespace moesh
