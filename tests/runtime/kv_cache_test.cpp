// The paged KV pool's prefix cache under a long random mix of admissions, computed positions,
// publications and releases, against a shadow of what each block holds: an attached prefix is
// always the same tokens the block's positions were computed from, a block a sequence writes is
// held by no other sequence, every block is held, cached or free exactly once, and reserve()
// refuses only what the free count cannot cover.
#include "runtime/kv_cache.h"
#include "test_support.h"

#include <gtest/gtest.h>

#include <random>
#include <set>

namespace moesh {
namespace {

void random_use(Backend & backend, uint32_t seed) {
    SCOPED_TRACE(testing::Message() << "seed " << seed);
    constexpr int64_t bs = 4, n_blocks = 24, n_seq = 6;
    KvCache kv({1, 1, 4, bs, n_blocks, n_seq}, backend);
    struct Seq {
        bool live = false;
        std::vector<int32_t> tokens;   // prompt, then "generated" tokens as they are computed
        int64_t written = 0;           // positions computed (their KV written) so far
    };
    std::vector<Seq> seqs(n_seq);
    // What each block's rows were computed from: the writer's tokens up to the block's last written
    // row (keys and values depend on every token before them, not only the block's own).
    std::vector<std::vector<int32_t>> content(n_blocks);
    std::mt19937 rng(seed);
    auto pick = [&](int64_t n) { return int64_t(std::uniform_int_distribution<int64_t>(0, n - 1)(rng)); };
    int64_t attached_total = 0, refused = 0;

    auto check_pool = [&]() {
        std::set<int32_t> held;
        for (int32_t s = 0; s < n_seq; ++s)
            for (int64_t k = 0; k < kv.capacity(s) / bs; ++k) held.insert(kv.block_table(s)[k]);
        ASSERT_EQ(int64_t(held.size()) + kv.n_free_blocks(), n_blocks);
        ASSERT_LE(kv.n_idle_cached_blocks(), kv.n_free_blocks());
    };

    for (int op = 0; op < 20000; ++op) {
        const int32_t s = int32_t(pick(n_seq));
        Seq & q = seqs[size_t(s)];
        if (!q.live) {   // admit: a prompt over a 3-token alphabet, so that starts repeat often
            q.tokens.clear();
            const int64_t n = 1 + pick(24);
            for (int64_t i = 0; i < n; ++i) q.tokens.push_back(int32_t(1 + pick(2 + (i > 8))));
            const int64_t extra = pick(12);
            const int64_t got = kv.attach_prefix(s, q.tokens.data(), n - 1);
            ASSERT_EQ(got % bs, 0);
            ASSERT_LE(got, n - 1);
            for (int64_t k = 0; k < got / bs; ++k) {
                const int32_t b = kv.block_table(s)[k];
                const std::vector<int32_t> want(q.tokens.begin(), q.tokens.begin() + (k + 1) * bs);
                ASSERT_EQ(content[size_t(b)], want) << "op " << op << ": block " << b << " was computed after another prefix";
            }
            const int64_t need = (n + extra + bs - 1) / bs - got / bs;
            const int64_t free_before = kv.n_free_blocks();
            if (!kv.reserve(s, n + extra)) {
                ASSERT_GT(need, free_before) << "op " << op << ": refused although the free blocks cover it";
                kv.release(s);
                ++refused;
            } else {
                q.live = true;
                q.written = got;
                attached_total += got;
            }
        } else if (pick(4) == 0) {   // the request ends
            kv.publish(s, q.tokens.data(), q.written);
            kv.release(s);
            q.live = false;
        } else {   // compute up to 5 more positions (prompt first, then generated tokens), then publish
            const int64_t cap = kv.capacity(s);
            const int64_t k = std::min<int64_t>(1 + pick(5), cap - q.written);
            for (int64_t p = q.written; p < q.written + k; ++p) {
                if (p >= int64_t(q.tokens.size())) q.tokens.push_back(int32_t(1 + pick(3)));
                const int32_t b = kv.block_table(s)[p / bs];
                for (int32_t o = 0; o < n_seq; ++o)   // nobody else may hold a block being written
                    for (int64_t j = 0; o != s && j < kv.capacity(o) / bs; ++j)
                        ASSERT_NE(kv.block_table(o)[j], b) << "op " << op << ": seq " << s << " writes a block seq " << o << " holds";
                content[size_t(b)].assign(q.tokens.begin(), q.tokens.begin() + p + 1);
            }
            q.written += k;
            if (pick(2)) kv.publish(s, q.tokens.data(), q.written);
        }
        check_pool();
    }
    EXPECT_GT(attached_total, 1000);   // the prefixes were found often enough to mean something
    EXPECT_GT(refused, 0);             // and the pool was full at times
    for (int32_t s = 0; s < n_seq; ++s) kv.release(s);
    EXPECT_EQ(kv.n_free_blocks(), n_blocks);
}

TEST(KvCache, PrefixCacheBookkeepingHoldsUnderRandomUse) {
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    for (uint32_t seed = 1; seed <= 12; ++seed) {
        random_use(*be, seed);
        if (testing::Test::HasFatalFailure()) return;
    }
}

// Two requests compute the same start at once; the second publishes what follows it after the
// first's blocks. If the first's block is then evicted (it was released first) and reused for
// another prompt, the second's block that followed it must not be found after the new one.
TEST(KvCache, ABlockReusedForAnotherPromptLosesItsOldSuccessor) {
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    KvCache kv({1, 1, 4, 2, 5, 4}, *be);   // blocks of 2 positions, 5 blocks
    const std::vector<int32_t> a = {1, 1, 2, 2}, b = {1, 1, 2, 2, 3, 3};
    ASSERT_TRUE(kv.reserve(0, 4));   // request 0: blocks A0 A1
    ASSERT_TRUE(kv.reserve(1, 6));   // request 1, at the same time: B0 B1 B2
    kv.publish(0, a.data(), 4);      // A0 A1 published
    kv.publish(1, b.data(), 6);      // B0 B1 hold what A0 A1 hold: B2 published after A1
    const int32_t a1 = kv.block_table(0)[1];
    kv.release(0);                   // cached, unheld: A1 then A0
    kv.release(1);                   // B2 cached, B0 B1 free
    ASSERT_EQ(kv.n_idle_cached_blocks(), 3);
    ASSERT_TRUE(kv.reserve(2, 6));   // the two free blocks, then the cached one released first: A1
    ASSERT_EQ(kv.block_table(2)[2], a1);
    const std::vector<int32_t> c = {7, 7, 8, 8, 9, 9, 3, 3, 4};
    kv.publish(2, c.data(), 6);      // A1 now holds 9 9, after 7 7 8 8
    std::vector<int32_t> d = c;      // 7 7 8 8 9 9 then B2's tokens: B2 holds them after 1 1 2 2
    EXPECT_EQ(kv.attach_prefix(3, d.data(), 8), 6);
    kv.release(3);
    // and the start all of them share is still found
    EXPECT_EQ(kv.attach_prefix(3, a.data(), 4), 2);
}

} // namespace
} // namespace moesh
