// Weight dtypes as moesh_experts sizes and names them, and the block types'
// dequantization in the reference kernels (plugins/reference) against the
// GGUF oracle (experts/quant): the two are separate copies that must agree.
#include "experts/expert.h"
#include "experts/quant.h"
#include "reference_kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using moesh::QuantType;

TEST(ExpertDtype, RowBytesOfElementAndBlockTypes) {
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_F32, 7), 28u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_F16, 7), 14u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_BF16, 7), 14u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q8_0, 96), 3u * 34u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q4_0, 96), 3u * 18u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q8_0, 48), 0u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q4_0, -32), 0u);
    EXPECT_EQ(moesh::dtype_row_bytes(moesh_dtype(99), 32), 0u);
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q8_0, 4096), moesh::quant_row_bytes(QuantType::Q8_0, 4096));
    EXPECT_EQ(moesh::dtype_row_bytes(MOESH_DTYPE_Q4_0, 4096), moesh::quant_row_bytes(QuantType::Q4_0, 4096));
    EXPECT_EQ(moesh::dtype_size(MOESH_DTYPE_Q8_0), 0u);   // per block, not per element
    EXPECT_EQ(std::string(moesh::dtype_name(MOESH_DTYPE_Q8_0)), "q8_0");
    EXPECT_EQ(std::string(moesh::dtype_name(MOESH_DTYPE_Q4_0)), "q4_0");

    const moesh::WeightMatrix m{nullptr, MOESH_DTYPE_Q4_0, 10, 64};
    EXPECT_EQ(m.n_bytes(), 10u * 2u * 18u);
    const moesh::WeightMatrix f{nullptr, MOESH_DTYPE_BF16, 10, 64};
    EXPECT_EQ(f.n_bytes(), 10u * 64u * 2u);
}

// The reference kernels' Q8_0 quantizer (what a Q8_0 KV cache write must produce) against
// experts/quant's, which the GGUF fixtures tie to gguf-py: the same bytes, halves, zeros, tiny
// and huge values included.
TEST(ExpertDtype, ReferenceQ8_0QuantizerMatchesGgufBitForBit) {
    std::mt19937 rng(9);
    std::uniform_real_distribution<float> u(-3.0f, 3.0f);
    for (int rep = 0; rep < 200; ++rep) {
        float x[32];
        for (float & v : x) v = u(rng) * (rep % 4 == 0 ? 1e-6f : rep % 4 == 1 ? 1e4f : 1.0f);
        if (rep % 5 == 0) std::fill(x, x + 32, 0.0f);
        if (rep % 7 == 0) x[3] = 127.0f / 2.0f * (x[0] != 0.0f ? std::fabs(x[0]) : 1.0f);
        uint8_t got[34], want[34];
        moesh::ref::quantize_q8_0_block(x, got);
        ASSERT_TRUE(moesh::quantize_row(QuantType::Q8_0, x, want, 32));
        ASSERT_EQ(std::memcmp(got, want, sizeof got), 0) << "rep " << rep;
    }
}

TEST(ExpertDtype, ReferenceDequantizationMatchesGgufBitForBit) {
    std::mt19937 rng(5);
    std::uniform_int_distribution<int> byte(0, 255);
    const int64_t n_rows = 3;
    const std::pair<moesh_dtype, QuantType> types[] = {
        {MOESH_DTYPE_Q8_0, QuantType::Q8_0}, {MOESH_DTYPE_Q4_0, QuantType::Q4_0}, {MOESH_DTYPE_Q4_1, QuantType::Q4_1},
        {MOESH_DTYPE_Q4_K, QuantType::Q4_K}, {MOESH_DTYPE_Q5_K, QuantType::Q5_K}, {MOESH_DTYPE_Q6_K, QuantType::Q6_K},
    };
    for (auto [type, qt] : types) {
        SCOPED_TRACE(moesh::quant_type_name(qt));
        const int64_t block_elems = moesh::quant_block_elems(qt);
        const int64_t n = block_elems * 3;
        const size_t row_bytes = moesh::quant_row_bytes(qt, n);
        ASSERT_EQ(moesh::ref::weight_row_bytes(type, n), row_bytes);
        ASSERT_EQ(moesh::dtype_row_bytes(type, n), row_bytes);
        std::vector<uint8_t> w(row_bytes * n_rows);
        for (auto & b : w) b = uint8_t(byte(rng));
        // Sane scales: finite fp16 of either sign, subnormals included. Q6_K
        // has its d last; the others d first (and Q4_1's m, K-quants' dmin next).
        const size_t block = moesh::quant_block_bytes(qt);
        for (size_t off = 0; off < w.size(); off += block) {
            if (qt == QuantType::Q6_K) {
                w[off + block - 1] &= 0x3b;   // exponent below 0x1f, often small
            } else {
                w[off + 1] &= 0x3b;
                if (qt != QuantType::Q8_0 && qt != QuantType::Q4_0) {
                    w[off + 3] &= 0x3b;
                }
            }
        }
        for (int64_t r = 0; r < n_rows; ++r) {
            std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n));
            ASSERT_TRUE(moesh::dequantize_row(qt, w.data() + size_t(r) * row_bytes, want.data(), n));
            moesh::ref::load_weight_row(w.data(), type, r, n, got.data());
            EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0) << "row " << r;
            for (int64_t i = 0; i < n; ++i) {
                const float e = moesh::ref::load_weight(w.data(), type, r * n + i);
                ASSERT_EQ(std::memcmp(&e, &want[size_t(i)], sizeof e), 0) << "element " << i;
            }
        }
        std::vector<float> out(size_t(block_elems + 16));
        EXPECT_THROW(moesh::ref::load_weight_row(w.data(), type, 0, block_elems + 16, out.data()),
                     std::invalid_argument);
        EXPECT_EQ(moesh::ref::weight_row_bytes(type, block_elems + 16), 0u);
    }
}

} // namespace
