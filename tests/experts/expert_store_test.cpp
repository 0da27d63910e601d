// The run-time expert cache against a real file: every acquired expert holds
// the bytes its home has, the budget and the pins hold under a random
// workload, reads that fail are reported and do not poison the rest.
#include "experts/expert_store.h"
#include "experts/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

namespace moesh {
namespace {

// A file laid out like GGUF expert tensors: per layer, gate/up/down of every
// expert back to back (f32, odd sizes so matrices start mid-page), mmap'd.
struct ExpertFile {
    std::string path;
    int fd = -1;
    uint8_t * map = nullptr;
    size_t size = 0;
    ExpertTable table;

    ExpertFile(int32_t n_layer, int32_t n_expert, uint32_t seed) : table(n_layer, n_expert) {
        char tmpl[] = "/var/tmp/moesh_store_XXXXXX";
        fd = ::mkstemp(tmpl);
        path = tmpl;
        std::vector<uint8_t> bytes(1000);   // a header, so nothing is page-aligned
        std::mt19937 rng(seed);
        std::vector<std::array<size_t, 3>> at;
        for (int32_t l = 0; l < n_layer; ++l)
            for (int32_t e = 0; e < n_expert; ++e) {
                const int64_t n_embd = 24 + 8 * l, n_ff = 40 + 4 * l;   // layers differ in size
                std::array<size_t, 3> off{};
                for (int m = 0; m < 3; ++m) {
                    off[size_t(m)] = bytes.size();
                    const size_t n = size_t(n_embd * n_ff) * 4;
                    for (size_t i = 0; i < n; ++i) bytes.push_back(uint8_t(rng()));
                }
                at.push_back(off);
            }
        EXPECT_EQ(::write(fd, bytes.data(), bytes.size()), ssize_t(bytes.size()));
        size = bytes.size();
        map = static_cast<uint8_t *>(::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0));
        size_t i = 0;
        for (int32_t l = 0; l < n_layer; ++l)
            for (int32_t e = 0; e < n_expert; ++e, ++i) {
                const int64_t n_embd = 24 + 8 * l, n_ff = 40 + 4 * l;
                ExpertWeights w;
                w.gate = {map + at[i][0], MOESH_DTYPE_F32, n_ff, n_embd};
                w.up = {map + at[i][1], MOESH_DTYPE_F32, n_ff, n_embd};
                w.down = {map + at[i][2], MOESH_DTYPE_F32, n_embd, n_ff};
                table.set({l, e}, w);
            }
    }
    ~ExpertFile() {
        ::munmap(map, size);
        ::close(fd);
        std::remove(path.c_str());
    }
    std::vector<MappedRegion> regions() const { return {{path, map, size}}; }
    size_t slot() const {
        size_t m = 0;
        for (int32_t l = 0; l < table.n_layer(); ++l) m = std::max(m, table.bytes_per_expert(l));
        return slot_bytes_for(m);
    }
};

bool same_bytes(const ExpertWeights & a, const ExpertWeights & b) {
    for (auto [x, y] : {std::pair{&a.gate, &b.gate}, {&a.up, &b.up}, {&a.down, &b.down}})
        if (x->n_bytes() != y->n_bytes() || std::memcmp(x->data, y->data, x->n_bytes()) != 0 || x->data == y->data) return false;
    return true;
}

StoreOptions options(const ExpertFile & f, int64_t n_slots, Policy p, bool direct) {
    StoreOptions o;
    o.slot_bytes = f.slot();
    o.budget = uint64_t(n_slots) * o.slot_bytes + o.slot_bytes / 2;   // a part-slot is left unused
    o.n_expert_used = 2;
    o.policy.policy = p;
    o.direct_io = direct;
    return o;
}

TEST(ExpertStore, RandomWorkloadKeepsBytesBudgetAndPins) {
    const int32_t L = 3, E = 6;
    ExpertFile f(L, E, 7);
    for (Policy p : {Policy::Lru, Policy::Lfu, Policy::Heat, Policy::Lookahead})
        for (bool direct : {true, false}) {
            StoreOptions o = options(f, 5, p, direct);
            o.policy.pinned = {int64_t(1) * E + 2};   // layer 1, expert 2
            ExpertStore store(f.table, f.regions(), o);
            EXPECT_EQ(store.slots(), 5);
            EXPECT_LE(uint64_t(store.slots()) * store.slot_bytes(), o.budget);
            std::mt19937 rng(11);
            int64_t wanted_total = 0;
            for (int64_t step = 0; step < 60; ++step)
                for (int32_t l = 0; l < L; ++l) {
                    std::vector<int32_t> all(E);
                    for (int32_t e = 0; e < E; ++e) all[size_t(e)] = e;
                    std::shuffle(all.begin(), all.end(), rng);
                    const int64_t n = 1 + int64_t(rng() % 4);   // up to 4: more than the unpinned slots free
                    std::vector<int32_t> want(all.begin(), all.begin() + n);
                    std::shuffle(all.begin(), all.end(), rng);
                    store.predict((l + 1) % L, all.data(), 2);   // as the forward pass: before this layer's misses
                    store.begin_layer(l, step, want.data(), n);
                    wanted_total += n;
                    store.prefetch((l + 1) % L, all.data(), 2);
                    std::stable_sort(want.begin(), want.end(), [&](int32_t a, int32_t b) { return store.order({l, a}) < store.order({l, b}); });
                    for (int32_t e : want) {
                        const ExpertWeights & w = store.acquire({l, e});
                        ASSERT_TRUE(same_bytes(w, f.table.get({l, e}))) << "layer " << l << " expert " << e;
                        store.release({l, e});
                    }
                    store.end_layer();
                    ASSERT_EQ(store.check(), "") << policy_name(p) << " step " << step << " layer " << l;
                    ASSERT_TRUE(store.resident({1, 2}));
                }
            const StoreStats s = store.stats();
            EXPECT_EQ(s.requests, wanted_total);
            EXPECT_EQ(s.hits + s.misses, s.requests);
            EXPECT_GT(s.hits, 0);
            EXPECT_GT(s.misses, 0);
            EXPECT_GT(s.bytes_read, 0u);
            EXPECT_LE(s.predicted_wanted, s.predicted);
            if (!direct) {
                EXPECT_FALSE(store.direct_io());   // direct may be refused by the file system
            }
        }
}

// Two slots, a layer that wants four experts, taken in the worst order: no deadlock, right bytes.
TEST(ExpertStore, MoreExpertsThanSlotsInOneLayer) {
    ExpertFile f(1, 4, 3);
    ExpertStore store(f.table, f.regions(), options(f, 2, Policy::Lru, true));
    const int32_t want[] = {0, 1, 2, 3};
    store.begin_layer(0, 0, want, 4);
    for (int32_t e : {3, 2, 1, 0}) {
        ASSERT_TRUE(same_bytes(store.acquire({0, e}), f.table.get({0, e})));
        store.release({0, e});
    }
    store.end_layer();
    EXPECT_EQ(store.check(), "");
}

TEST(ExpertStore, HeatKeepsTheNextLayersExperts) {
    // Three layers of one expert, two slots (too few for a streaming slot, so every miss is cached):
    // in layer order, the expert of the layer just done goes.
    ExpertFile f(3, 1, 5);
    ExpertStore store(f.table, f.regions(), options(f, 2, Policy::Heat, true));
    const int32_t e0[] = {0};
    for (int64_t step = 0; step < 4; ++step)
        for (int32_t l = 0; l < 3; ++l) {
            store.begin_layer(l, step, e0, 1);
            store.acquire({l, 0});
            store.release({l, 0});
            store.end_layer();
        }
    EXPECT_EQ(store.stats().hits, 5);   // the simulator's hand-worked trace (cache_policy_test) without admission
    EXPECT_EQ(store.stats().streamed, 0);
}

TEST(ExpertStore, HeatStreamsWhatItDoesNotAdmit) {
    // Four layers of one expert, three slots: two cache, one streams. The cache keeps two layers'
    // experts for good; the other two take turns in the streaming slot.
    ExpertFile f(4, 1, 6);
    const int32_t e0[] = {0};
    auto hits = [&](Policy p) {
        ExpertStore store(f.table, f.regions(), options(f, 3, p, true));
        for (int64_t step = 0; step < 6; ++step)
            for (int32_t l = 0; l < 4; ++l) {
                store.begin_layer(l, step, e0, 1);
                EXPECT_TRUE(same_bytes(store.acquire({l, 0}), f.table.get({l, 0})));
                store.release({l, 0});
                store.end_layer();
                EXPECT_EQ(store.check(), "");
            }
        if (p != Policy::Lru) {
            EXPECT_GT(store.stats().streamed, 0);
        }
        return store.stats().hits;
    };
    EXPECT_EQ(hits(Policy::Lru), 0);    // lru on a cycle longer than the cache: never a hit
    EXPECT_EQ(hits(Policy::Heat), 10);  // two layers' experts hit from the second step on: 2 x 5
    EXPECT_EQ(hits(Policy::Lookahead), 10);   // every layer wants its one expert each time: as heat
}

// The forward pass tells the store the next layer's prediction before the layer's misses, then
// prefetches the same list: the prediction is counted once and scored when that layer comes.
TEST(ExpertStore, APredictionThenItsPrefetchCountOnce) {
    ExpertFile f(2, 4, 9);
    StoreOptions o = options(f, 5, Policy::Lookahead, true);   // 4 to cache, 1 to stream
    o.prefetch_min_precision = 0;
    ExpertStore store(f.table, f.regions(), o);
    const int32_t want0[] = {0, 1}, guess[] = {2, 3}, want1[] = {2, 0};
    store.predict(1, guess, 2);
    store.begin_layer(0, 0, want0, 2);
    store.prefetch(1, guess, 2);
    for (int32_t e : want0) {
        store.acquire({0, e});
        store.release({0, e});
    }
    store.end_layer();
    EXPECT_EQ(store.stats().predicted, 2);
    EXPECT_EQ(store.stats().prefetches, 2);
    store.begin_layer(1, 0, want1, 2);
    for (int32_t e : want1) {
        EXPECT_TRUE(same_bytes(store.acquire({1, e}), f.table.get({1, e})));
        store.release({1, e});
    }
    store.end_layer();
    const StoreStats s = store.stats();
    EXPECT_EQ(s.predicted_wanted, 1);   // 2 was predicted and wanted, 3 predicted in vain, 0 not predicted
    EXPECT_EQ(s.prefetch_hits, 1);
    EXPECT_DOUBLE_EQ(s.prefetch_precision(), 0.5);
    EXPECT_DOUBLE_EQ(s.prefetch_recall(), 0.5);
    EXPECT_EQ(store.check(), "");
}

TEST(ExpertStore, RefusesABudgetBelowTwoFreeSlots) {
    ExpertFile f(1, 4, 1);
    StoreOptions o = options(f, 2, Policy::Lru, true);
    o.policy.pinned = {0};
    try {
        ExpertStore store(f.table, f.regions(), o);
        FAIL() << "a budget of 2 slots with 1 pin was accepted";
    } catch (const std::runtime_error & e) {
        EXPECT_NE(std::string(e.what()).find("at least 2 unpinned slots"), std::string::npos) << e.what();
    }
}

TEST(ExpertStore, AFailedReadIsReportedAndTheRestStillWork) {
    ExpertFile f(1, 3, 9);
    ExpertStore store(f.table, f.regions(), options(f, 2, Policy::Lru, false));
    // The last expert's bytes go away under us (the mapping is not touched, so no SIGBUS).
    ASSERT_EQ(::ftruncate(f.fd, off_t(static_cast<const uint8_t *>(f.table.get({0, 2}).gate.data) - f.map)), 0);
    const int32_t want[] = {2};
    store.begin_layer(0, 0, want, 1);
    try {
        store.acquire({0, 2});
        FAIL() << "a read past the end of the file succeeded";
    } catch (const std::runtime_error & e) {
        EXPECT_NE(std::string(e.what()).find(f.path), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("ends early"), std::string::npos) << e.what();
    }
    store.end_layer();
    const int32_t ok[] = {0, 1};
    store.begin_layer(0, 1, ok, 2);
    for (int32_t e : ok) {
        EXPECT_TRUE(same_bytes(store.acquire({0, e}), f.table.get({0, e})));
        store.release({0, e});
    }
    store.end_layer();
    EXPECT_EQ(store.check(), "");
}

} // namespace
} // namespace moesh
