// plugins/cuda/quant_math.h, compiled for the host, against the reference
// decoders nobody here wrote the kernels from: experts/quant.cpp (bit-identical
// to gguf) and the reference plugin's widening. Needs no GPU.
#include "plugins/cuda/quant_math.h"

#include "experts/quant.h"
#include "plugins/reference/reference_kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

namespace moesh::cuda {
namespace {

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

QuantType quant_type(int32_t t) {
    switch (t) {
    case MOESH_DTYPE_Q8_0: return QuantType::Q8_0;
    case MOESH_DTYPE_Q4_0: return QuantType::Q4_0;
    default: return QuantType::Q4_K;
    }
}

// n_blocks random blocks of block type t whose fp16 scales (d, and dmin of
// Q4_K) are finite, subnormals included; every other byte is random.
std::vector<uint8_t> random_blocks(int32_t t, int n_blocks, std::mt19937 & rng) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<uint8_t> row(size_t(n_blocks) * block_bytes(t));
    for (auto & b : row) {
        b = uint8_t(byte(rng));
    }
    const int n_scales = t == MOESH_DTYPE_Q4_K ? 2 : 1;
    for (int k = 0; k < n_blocks; ++k) {
        for (int s = 0; s < n_scales; ++s) {
            uint8_t * p = row.data() + size_t(k) * block_bytes(t) + 2 * s;
            p[1] = uint8_t(p[1] % 0x7c | (p[1] & 0x80));   // exponent < 31
        }
    }
    return row;
}

TEST(QuantMath, F16BitsWidenExactlyAsQuantCpp) {
    for (uint32_t h = 0; h <= 0xffff; ++h) {
        ASSERT_EQ(bits(f16_bits_to_f32(uint16_t(h))), bits(fp16_to_f32(uint16_t(h)))) << "h = " << h;
    }
}

TEST(QuantMath, Bf16BitsWidenExactlyAsReference) {
    for (uint32_t b = 0; b <= 0xffff; ++b) {
        ASSERT_EQ(bits(bf16_bits_to_f32(uint16_t(b))), bits(ref::bf16_to_f32(uint16_t(b)))) << "b = " << b;
    }
}

TEST(QuantMath, PlainRowElementsAndPiecesMatchReference) {
    std::mt19937 rng(7);
    std::uniform_int_distribution<uint32_t> word(0, 0xffffffffu);
    for (int32_t t : {MOESH_DTYPE_F32, MOESH_DTYPE_F16, MOESH_DTYPE_BF16}) {
        const int64_t n = 3 * kUnit;
        std::vector<uint8_t> row(size_t(n) * block_bytes(t));
        for (auto & b : row) {
            b = uint8_t(word(rng));
        }
        for (int64_t i = 0; i < n; ++i) {
            ASSERT_EQ(bits(row_element(t, row.data(), i)), bits(ref::load_weight(row.data(), t, i)))
                << "type " << t << " element " << i;
        }
        for (int64_t u = 0; u < n / kUnit; ++u) {
            for (int q = 0; q < kPieces; ++q) {
                float w[8];
                load_piece_bytes(t, row.data(), u, q, w);
                for (int g = 0; g < 2; ++g) {
                    for (int i = 0; i < 4; ++i) {
                        const int64_t e = u * kUnit + piece_offset(t, q, g) + i;
                        ASSERT_EQ(bits(w[4 * g + i]), bits(ref::load_weight(row.data(), t, e)))
                            << "type " << t << " element " << e;
                    }
                }
            }
        }
    }
}

class BlockTypeTest : public testing::TestWithParam<int32_t> {};

TEST_P(BlockTypeTest, ElementsAndBlocksMatchDequantizeRowBitForBit) {
    const int32_t t = GetParam();
    std::mt19937 rng(uint32_t(100 + t));
    for (int rep = 0; rep < 50; ++rep) {
        const int n_blocks = 5;
        const int64_t n = int64_t(n_blocks) * block_elems(t);
        const std::vector<uint8_t> row = random_blocks(t, n_blocks, rng);
        std::vector<float> expected(static_cast<size_t>(n));
        ASSERT_TRUE(dequantize_row(quant_type(t), row.data(), expected.data(), n));

        std::vector<float> got(static_cast<size_t>(n));
        for (int k = 0; k < n_blocks; ++k) {
            dequantize_block(t, row.data() + size_t(k) * block_bytes(t), got.data() + size_t(k) * block_elems(t));
        }
        for (int64_t i = 0; i < n; ++i) {
            ASSERT_EQ(bits(got[size_t(i)]), bits(expected[size_t(i)])) << "dequantize_block, element " << i;
            ASSERT_EQ(bits(row_element(t, row.data(), i)), bits(expected[size_t(i)])) << "row_element, element " << i;
            ASSERT_EQ(bits(ref::load_weight(row.data(), t, i)), bits(expected[size_t(i)])) << "reference, element " << i;
        }
    }
}

TEST_P(BlockTypeTest, BlockDotIsWithinFloatRoundingOfDoubleSum) {
    const int32_t t = GetParam();
    std::mt19937 rng(uint32_t(200 + t));
    std::uniform_real_distribution<float> act(-2.0f, 2.0f);
    const int n = block_elems(t);
    for (int rep = 0; rep < 200; ++rep) {
        const std::vector<uint8_t> blk = random_blocks(t, 1, rng);
        std::vector<float> w(static_cast<size_t>(n));
        ASSERT_TRUE(dequantize_row(quant_type(t), blk.data(), w.data(), n));
        std::vector<float> x(static_cast<size_t>(n));
        for (auto & v : x) {
            v = act(rng);
        }
        double exact = 0.0;
        double magnitude = 0.0;
        for (int i = 0; i < n; ++i) {
            exact += double(w[size_t(i)]) * x[size_t(i)];
            magnitude += std::fabs(double(w[size_t(i)]) * x[size_t(i)]);
        }
        // Recursive float summation of n products: |error| <= n * u * sum |w x| (u = 2^-24, first order).
        const double bound = double(n) * 0x1p-24 * magnitude * 1.01;
        EXPECT_LE(std::fabs(double(block_dot(t, blk.data(), x.data())) - exact), bound) << "rep " << rep;
    }
}

INSTANTIATE_TEST_SUITE_P(QuantMath, BlockTypeTest,
                         testing::Values(int32_t(MOESH_DTYPE_Q8_0), int32_t(MOESH_DTYPE_Q4_0), int32_t(MOESH_DTYPE_Q4_K)),
                         [](const testing::TestParamInfo<int32_t> & info) {
                             return std::string(info.param == MOESH_DTYPE_Q8_0   ? "Q8_0"
                                                : info.param == MOESH_DTYPE_Q4_0 ? "Q4_0"
                                                                                 : "Q4_K");
                         });

} // namespace
} // namespace moesh::cuda
