// The oracle itself: the reference kernels on hand-computed cases, and the
// dtype conversions against the compiler's own _Float16 conversion.
#include "reference_kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using namespace moesh::ref;

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

TEST(ReferenceDtypes, F16ToF32KnownValues) {
    EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
    EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
    EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
    EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));          // smallest normal
    EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));          // smallest subnormal
    EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));       // largest subnormal
    EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
    EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
    EXPECT_TRUE(std::isnan(f16_to_f32(0xfc01)));
}

TEST(ReferenceDtypes, F16RoundTripsEveryValue) {
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = f16_to_f32(uint16_t(h));
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << std::hex << h;
        } else {
            EXPECT_EQ(f32_to_f16(f), h) << std::hex << h;
        }
    }
}

TEST(ReferenceDtypes, F32ToF16RoundsToNearestEven) {
    EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);       // tie, down to even
    EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);   // tie, up to even
    EXPECT_EQ(f32_to_f16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
    EXPECT_EQ(f32_to_f16(65519.996f), 0x7bff);
    EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);                           // tie above the largest: inf
    EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
    EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
    EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);              // tie, down to even (zero)
    EXPECT_EQ(f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
    EXPECT_EQ(f32_to_f16(3 * std::ldexp(1.0f, -25)), 0x0002);          // tie, up to even
    EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)), 0x0400);   // rounds up into the normals
    EXPECT_EQ(f32_to_f16(-1e-30f), 0x8000);
    EXPECT_EQ(f32_to_f16(from_bits(0x7fc00000)) & 0x7e00, 0x7e00);   // quiet NaN
    EXPECT_EQ(f32_to_f16(from_bits(0x7f800001)) & 0x7e00, 0x7e00);   // signalling NaN comes out quiet
}

#if defined(__FLT16_MAX__)
// GCC and Clang convert float to _Float16 with round-to-nearest-even.
TEST(ReferenceDtypes, F32ToF16MatchesCompilerFloat16) {
    std::mt19937 rng(11);
    std::uniform_int_distribution<uint32_t> bits;
    std::uniform_int_distribution<int> exponent(-30, 17);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    for (int i = 0; i < 2000000; ++i) {
        // Half arbitrary bit patterns, half values in and around the f16 range.
        const float f = i % 2 ? from_bits(bits(rng)) : std::ldexp(mantissa(rng), exponent(rng)) * (i % 4 ? 1 : -1);
        if (std::isnan(f)) {
            continue;
        }
        const _Float16 h = static_cast<_Float16>(f);
        uint16_t want;
        std::memcpy(&want, &h, sizeof want);
        ASSERT_EQ(f32_to_f16(f), want) << "f = " << f;
        if (!std::isnan(float(h))) {
            ASSERT_EQ(f16_to_f32(want), float(h));
        }
    }
}
#endif

TEST(ReferenceDtypes, Bf16RoundsToNearestEven) {
    EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000)), 0x3f80);   // tie, down to even
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000)), 0x3f82);   // tie, up to even
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f808001)), 0x3f81);
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f807fff)), 0x3f80);
    EXPECT_EQ(f32_to_bf16(from_bits(0x7f7fffff)), 0x7f80);   // largest float: rounds to inf
    EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
    EXPECT_EQ(f32_to_bf16(from_bits(0x00000001)), 0x0000);   // float subnormal
    EXPECT_EQ(f32_to_bf16(from_bits(0x7fc00000)), 0x7fc0);
    EXPECT_EQ(f32_to_bf16(from_bits(0x7f800001)) & 0x7fc0, 0x7fc0);   // signalling NaN stays NaN
    EXPECT_EQ(f32_to_bf16(from_bits(0xff800000)), 0xff80);
    EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);
    EXPECT_EQ(bf16_to_f32(0xc000), -2.0f);
}

TEST(ReferenceKernels, MatmulComputesSmallProduct) {
    const float w[] = {1, 2, 3, 4, 5, 6};      // [3, 2]
    const float x[] = {1, -1, 9, 0.5f, 2, 9};   // [2, 3]: stride 3, last column ignored
    const float bias[] = {0.5f, 0, -1};
    float y[8];                               // [2, 4]
    std::fill(std::begin(y), std::end(y), 7.0f);
    matmul({sizeof(moesh_matmul_args), MOESH_DTYPE_F32, w, bias, x, y, 2, 3, 2, 3, 4});
    const float want[] = {-0.5f, -1, -2, 7, 5, 9.5f, 13.5f, 7};
    for (int i = 0; i < 8; ++i) {
        EXPECT_EQ(y[i], want[i]) << i;
    }
    uint16_t w_bf16[6], w_f16[6];
    for (int i = 0; i < 6; ++i) {
        w_bf16[i] = f32_to_bf16(w[i]);
        w_f16[i] = f32_to_f16(w[i]);
    }
    float y_bf16[8] = {}, y_f16[8] = {};
    matmul({sizeof(moesh_matmul_args), MOESH_DTYPE_BF16, w_bf16, bias, x, y_bf16, 2, 3, 2, 3, 4});
    matmul({sizeof(moesh_matmul_args), MOESH_DTYPE_F16, w_f16, bias, x, y_f16, 2, 3, 2, 3, 4});
    for (int i : {0, 1, 2, 4, 5, 6}) {
        EXPECT_EQ(y_bf16[i], want[i]) << i;
        EXPECT_EQ(y_f16[i], want[i]) << i;
    }
}

TEST(ReferenceKernels, RmsNormScalesByRootMeanSquare) {
    const float x[] = {3, 4};
    const float weight[] = {1, 2};
    float y[2];
    rms_norm({sizeof(moesh_rms_norm_args), 0.0f, x, weight, y, 2, 1});
    const double rms = std::sqrt(12.5);
    EXPECT_FLOAT_EQ(y[0], float(3 / rms));
    EXPECT_FLOAT_EQ(y[1], float(8 / rms));
}

TEST(ReferenceKernels, RopeRotatesPairsOfEachLayout) {
    const float quarter_turn = float(M_PI / 2);
    const float inv_freq[] = {quarter_turn, 0.0f};
    const int32_t pos[] = {1};
    // NEOX pairs (i, i + rot_dim/2): dims 0 and 2 rotate by 90 degrees.
    float neox[] = {1, 5, 0, 7};
    rope({sizeof(moesh_rope_args), MOESH_ROPE_NEOX, 1.0f, 0, neox, pos, inv_freq, 1, 1, 4, 4});
    EXPECT_NEAR(neox[0], 0.0f, 1e-7);
    EXPECT_FLOAT_EQ(neox[2], 1.0f);
    EXPECT_FLOAT_EQ(neox[1], 5.0f);   // angle 0
    EXPECT_FLOAT_EQ(neox[3], 7.0f);
    // NORM pairs (2i, 2i+1), with attn_factor scaling cos and sin.
    float norm[] = {1, 0, 5, 7};
    rope({sizeof(moesh_rope_args), MOESH_ROPE_NORM, 2.0f, 0, norm, pos, inv_freq, 1, 1, 4, 4});
    EXPECT_NEAR(norm[0], 0.0f, 1e-6);
    EXPECT_FLOAT_EQ(norm[1], 2.0f);
    EXPECT_FLOAT_EQ(norm[2], 10.0f);
    EXPECT_FLOAT_EQ(norm[3], 14.0f);
    // Partial rotation leaves the dims past rot_dim alone.
    float partial[] = {1, 0, 3, 4};
    rope({sizeof(moesh_rope_args), MOESH_ROPE_NEOX, 1.0f, 0, partial, pos, inv_freq, 1, 1, 4, 2});
    EXPECT_FLOAT_EQ(partial[1], 1.0f);
    EXPECT_EQ(partial[2], 3.0f);
    EXPECT_EQ(partial[3], 4.0f);
}

TEST(ReferenceKernels, SoftmaxNormalisesStably) {
    float x[] = {0.0f, float(std::log(3.0)), 1000.0f, 1000.0f};
    softmax({sizeof(moesh_softmax_args), 0, x, 2, 2});
    EXPECT_FLOAT_EQ(x[0], 0.25f);
    EXPECT_FLOAT_EQ(x[1], 0.75f);
    EXPECT_FLOAT_EQ(x[2], 0.5f);
    EXPECT_FLOAT_EQ(x[3], 0.5f);
}

TEST(ReferenceKernels, ExpertFfnOfOneFeature) {
    const float gate[] = {2}, up[] = {3}, down[] = {0.5f};
    const float x[] = {1, -1};
    const float scale[] = {1, 2};
    float out[] = {1, 1};
    expert_ffn({sizeof(moesh_expert_ffn_args), MOESH_DTYPE_F32, gate, up, down, x, scale, out, nullptr, 1, 1, 2});
    const double silu2 = 2 / (1 + std::exp(-2.0));
    const double silu_m2 = -2 / (1 + std::exp(2.0));
    EXPECT_FLOAT_EQ(out[0], float(1 + 0.5 * silu2 * 3));
    EXPECT_FLOAT_EQ(out[1], float(1 + 2 * 0.5 * silu_m2 * -3));
}

TEST(ReferenceKernels, AttentionFollowsBlockTableAndCausality) {
    // 2 query heads share kv head 0 of 1; block_size 1 and a reversed table.
    const int32_t block_table[] = {1, 0};
    const float k_pool[] = {0, 0, /* block 1 = pos 0 */ 1, 0};   // [2 blocks, 1, 1, 2]
    const float v_pool[] = {10, 20, /* pos 0 */ 1, 2};
    const float q[] = {5, 0, 5, 0, 5, 0, 5, 0};                  // [2 tokens, 2 heads, 2]
    const int32_t pos[] = {0, 1};
    float out[8];
    attention({sizeof(moesh_attention_args), 1.0f, q, k_pool, v_pool, block_table, pos, out, 2, 2, 1, 2, 1, 2, 2,
               MOESH_DTYPE_F32, 0});
    // Token 0 sees only position 0.
    EXPECT_FLOAT_EQ(out[0], 1.0f);
    EXPECT_FLOAT_EQ(out[1], 2.0f);
    EXPECT_FLOAT_EQ(out[2], 1.0f);
    // Token 1: scores 5 (pos 0) and 0 (pos 1).
    const double p0 = 1 / (1 + std::exp(-5.0));
    EXPECT_FLOAT_EQ(out[4], float(p0 * 1 + (1 - p0) * 10));
    EXPECT_FLOAT_EQ(out[5], float(p0 * 2 + (1 - p0) * 20));
    EXPECT_FLOAT_EQ(out[6], out[4]);
}

} // namespace
