// PredictionTracker on visits worked out by hand: 2 layers x 4 experts (key = layer * 4 + expert).
#include "experts/prediction.h"

#include <gtest/gtest.h>

namespace moesh {
namespace {

TEST(PredictionTracker, ScoresEachVisitOnceAndMovesThePrecisionByATenth) {
    PredictionTracker t(2, 4, 0.75);
    EXPECT_TRUE(t.loads_allowed());   // starts at 1
    bool first = false;
    const int32_t guess[] = {1, 2, 2, 9};   // a repeat and an id out of range count nothing
    EXPECT_EQ(t.note(1, guess, 4, &first), 2);
    EXPECT_TRUE(first);
    const int32_t more[] = {2, 3};
    EXPECT_EQ(t.note(1, more, 2, &first), 1);   // only 3 is new
    EXPECT_FALSE(first);
    EXPECT_TRUE(t.predicted(4 + 1) && t.predicted(4 + 2) && t.predicted(4 + 3));
    EXPECT_FALSE(t.predicted(4 + 0) || t.predicted(1));

    // Layer 0 had no prediction: nothing is scored.
    const int64_t w0[] = {0, 1};
    PredictionTracker::Visit v = t.visit(0, w0, 2);
    EXPECT_EQ(v.wanted, 0);
    EXPECT_EQ(v.right, 0);
    EXPECT_DOUBLE_EQ(t.precision(), 1.0);

    // Layer 1 wants experts 0 and 2: one of three predictions right.
    const int64_t w1[] = {4 + 0, 4 + 2};
    v = t.visit(1, w1, 2);
    EXPECT_EQ(v.wanted, 2);
    EXPECT_EQ(v.right, 1);
    EXPECT_DOUBLE_EQ(t.precision(), 0.9 + 0.1 / 3.0);
    EXPECT_FALSE(t.predicted(4 + 2));   // forgotten after its visit
    v = t.visit(1, w1, 2);              // a second visit without a new prediction scores nothing
    EXPECT_EQ(v.wanted, 0);

    // Wrong guesses pull the precision under the bar, and right ones bring it back.
    const int32_t wrong[] = {3};
    const int64_t want0[] = {0};
    for (int i = 0; i < 3; ++i) {
        t.note(0, wrong, 1, &first);
        t.visit(0, want0, 1);
    }
    EXPECT_NEAR(t.precision(), (0.9 + 0.1 / 3.0) * 0.9 * 0.9 * 0.9, 1e-12);
    EXPECT_FALSE(t.loads_allowed());
    const int32_t right[] = {0};
    while (!t.loads_allowed()) {
        t.note(0, right, 1, &first);
        t.visit(0, want0, 1);
    }
    EXPECT_GE(t.precision(), 0.75);
}

TEST(PredictionTracker, ABarOfZeroAlwaysAllowsLoads) {
    PredictionTracker t(1, 2, 0.0);
    bool first = false;
    const int32_t wrong[] = {1};
    const int64_t want[] = {0};
    for (int i = 0; i < 50; ++i) {
        t.note(0, wrong, 1, &first);
        t.visit(0, want, 1);
    }
    EXPECT_LT(t.precision(), 0.01);
    EXPECT_TRUE(t.loads_allowed());
}

} // namespace
} // namespace moesh
