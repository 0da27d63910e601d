// Block quantization against gguf's reference (tests/fixtures/quant, written by
// scripts/make_quant_fixtures.py), plus format arithmetic and error bounds.
#include "experts/quant.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace moesh {

// Readable parameter values in gtest's failure messages.
void PrintTo(QuantType type, std::ostream * os) { *os << quant_type_name(type); }

namespace {

const std::string kFixtureDir = std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/quant/";

std::vector<uint8_t> read_bytes(const std::string & name) {
    std::ifstream in(kFixtureDir + name, std::ios::binary);
    EXPECT_TRUE(in) << "cannot open " << kFixtureDir + name;
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <typename T>
std::vector<T> read_array(const std::string & name) {
    const std::vector<uint8_t> bytes = read_bytes(name);
    EXPECT_EQ(bytes.size() % sizeof(T), 0u) << name;
    std::vector<T> out(bytes.size() / sizeof(T));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
}

const nlohmann::json & manifest() {
    static const nlohmann::json m = [] {
        std::ifstream in(kFixtureDir + "manifest.json");
        return nlohmann::json::parse(in);
    }();
    return m;
}

// Index of the first element whose bit pattern differs, or -1.
template <typename T>
int64_t first_mismatch(const std::vector<T> & a, const std::vector<T> & b) {
    if (a.size() != b.size()) {
        return int64_t(std::min(a.size(), b.size()));
    }
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
            return int64_t(i);
        }
    }
    return -1;
}

const QuantType kAllTypes[] = {QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1,
                               QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K};

std::vector<float> random_row(int64_t n, uint32_t seed, float scale) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> x(size_t(n), 0.0f); // [n]
    for (float & v : x) {
        v = dist(gen);
    }
    return x;
}

// ---- format arithmetic ----

TEST(QuantFormat, ReportsGgmlIdsNamesAndBlockSizes) {
    struct Expected {
        QuantType type;
        int32_t ggml_id;
        const char * name;
        int64_t n_per_block;
        size_t n_bytes;
    };
    const Expected expected[] = {
        {QuantType::Q8_0, 8, "q8_0", 32, 34},     {QuantType::Q4_0, 2, "q4_0", 32, 18},
        {QuantType::Q4_1, 3, "q4_1", 32, 20},     {QuantType::Q4_K, 12, "q4_K", 256, 144},
        {QuantType::Q5_K, 13, "q5_K", 256, 176},  {QuantType::Q6_K, 14, "q6_K", 256, 210},
    };
    for (const Expected & e : expected) {
        EXPECT_EQ(int32_t(e.type), e.ggml_id);
        EXPECT_STREQ(quant_type_name(e.type), e.name);
        EXPECT_EQ(quant_block_elems(e.type), e.n_per_block) << e.name;
        EXPECT_EQ(quant_block_bytes(e.type), e.n_bytes) << e.name;
        ASSERT_TRUE(quant_type_from_ggml(e.ggml_id).has_value()) << e.name;
        EXPECT_EQ(*quant_type_from_ggml(e.ggml_id), e.type);
    }
}

TEST(QuantFormat, FromGgmlRejectsTypesNotSupported) {
    for (int32_t id : {-1, 0, 1, 6, 7, 9, 10, 11, 15, 30, 1000}) {  // f32, f16, q5_0, q8_1, q2_K, q8_K, bf16, ...
        EXPECT_FALSE(quant_type_from_ggml(id).has_value()) << id;
    }
}

TEST(QuantFormat, RowBytesAreBlockCountTimesBlockBytes) {
    EXPECT_EQ(quant_row_bytes(QuantType::Q8_0, 4096), size_t(128 * 34));
    EXPECT_EQ(quant_row_bytes(QuantType::Q4_0, 32), size_t(18));
    EXPECT_EQ(quant_row_bytes(QuantType::Q4_1, 14336), size_t(448 * 20));
    EXPECT_EQ(quant_row_bytes(QuantType::Q4_K, 4096), size_t(16 * 144));
    EXPECT_EQ(quant_row_bytes(QuantType::Q5_K, 256), size_t(176));
    EXPECT_EQ(quant_row_bytes(QuantType::Q6_K, 14336), size_t(56 * 210));
    for (QuantType t : kAllTypes) {
        EXPECT_EQ(quant_row_bytes(t, 0), 0u) << quant_type_name(t);
    }
}

TEST(QuantFormat, RowBytesIsZeroForLengthsThatAreNotWholeBlocks) {
    for (QuantType t : kAllTypes) {
        const int64_t b = quant_block_elems(t);
        for (int64_t n : {int64_t(1), b - 1, b + 1, 3 * b + 16, -b}) {
            EXPECT_EQ(quant_row_bytes(t, n), 0u) << quant_type_name(t) << " n=" << n;
        }
    }
}

TEST(QuantFormat, DequantizeRefusesRowsThatAreNotWholeBlocksAndWritesNothing) {
    for (QuantType t : kAllTypes) {
        const int64_t n = quant_block_elems(t) + 16;
        std::vector<uint8_t> src(2 * quant_block_bytes(t), 0x11); // [2 blocks]
        std::vector<float> dst(size_t(n), 42.0f);                  // [n]
        EXPECT_FALSE(dequantize_row(t, src.data(), dst.data(), n)) << quant_type_name(t);
        for (float v : dst) {
            ASSERT_EQ(v, 42.0f) << quant_type_name(t);
        }
    }
}

TEST(QuantFormat, QuantizeRefusesRowsThatAreNotWholeBlocksAndWritesNothing) {
    for (QuantType t : {QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1}) {
        const std::vector<float> x = random_row(48, 1, 1.0f);  // [48]
        std::vector<uint8_t> dst(2 * quant_block_bytes(t), 0xAB);
        EXPECT_FALSE(quantize_row(t, x.data(), dst.data(), 48)) << quant_type_name(t);
        for (uint8_t v : dst) {
            ASSERT_EQ(v, 0xAB) << quant_type_name(t);
        }
    }
}

TEST(QuantFormat, KQuantsAreDequantizeOnly) {
    for (QuantType t : {QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K}) {
        EXPECT_FALSE(quant_can_quantize(t));
        const std::vector<float> x = random_row(256, 2, 1.0f);
        std::vector<uint8_t> dst(quant_block_bytes(t));
        EXPECT_FALSE(quantize_row(t, x.data(), dst.data(), 256)) << quant_type_name(t);
    }
    for (QuantType t : {QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1}) {
        EXPECT_TRUE(quant_can_quantize(t));
    }
}

// ---- fp16 ----

TEST(Fp16, EveryHalfWidensAndNarrowsBackToItself) {
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = fp16_to_f32(uint16_t(h));
        const bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
        if (is_nan) {
            ASSERT_TRUE(std::isnan(f)) << std::hex << h;
            ASSERT_EQ(f32_to_fp16(f) & 0x7e00, 0x7e00) << "quiet NaN expected, h=" << std::hex << h;
            ASSERT_EQ(f32_to_fp16(f) & 0x8000, h & 0x8000) << std::hex << h;
            continue;
        }
        ASSERT_EQ(f32_to_fp16(f), h) << std::hex << h;
    }
    EXPECT_EQ(fp16_to_f32(0x3c00), 1.0f);
    EXPECT_EQ(fp16_to_f32(0x0001), 0x1p-24f);
    EXPECT_EQ(fp16_to_f32(0xfbff), -65504.0f);
}

TEST(Fp16, NarrowingRoundsToNearestEvenAndOverflowsToInfinity) {
    EXPECT_EQ(f32_to_fp16(1.0f + 0x1p-11f), 0x3c00);           // tie, even is down
    EXPECT_EQ(f32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);       // tie, even is up
    EXPECT_EQ(f32_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01); // just past the tie
    EXPECT_EQ(f32_to_fp16(65519.0f), 0x7bff);
    EXPECT_EQ(f32_to_fp16(65520.0f), 0x7c00);
    EXPECT_EQ(f32_to_fp16(-1e10f), 0xfc00);
    EXPECT_EQ(f32_to_fp16(0x1p-25f), 0x0000);                  // half the smallest subnormal: to even 0
    EXPECT_EQ(f32_to_fp16(3 * 0x1p-25f), 0x0002);              // 1.5 units: to even 2
    EXPECT_EQ(f32_to_fp16(-0x1p-26f), 0x8000);
    EXPECT_EQ(f32_to_fp16(0x1p-14f - 0x1p-25f), 0x0400);       // rounds up into the normals
}

TEST(Fp16, NarrowingMatchesNumpyFloat16Cast) {
    const std::vector<float> x = read_array<float>("fp16.input.f32");
    const std::vector<uint16_t> expected = read_array<uint16_t>("fp16.bits.u16");
    ASSERT_EQ(x.size(), expected.size());
    ASSERT_EQ(int64_t(x.size()), manifest()["fp16"]["n"].get<int64_t>());
    std::vector<uint16_t> got(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        got[i] = f32_to_fp16(x[i]);
    }
    const int64_t bad = first_mismatch(got, expected);
    EXPECT_EQ(bad, -1) << "x=" << x[size_t(bad)] << " got " << std::hex << got[size_t(bad)]
                       << " numpy " << expected[size_t(bad)];
}

// ---- against gguf ----

class QuantFixture : public ::testing::TestWithParam<QuantType> {
protected:
    void SetUp() override {
        const nlohmann::json & m = manifest()["types"][quant_type_name(GetParam())];
        ASSERT_TRUE(m.is_object()) << "no fixture for " << quant_type_name(GetParam());
        ASSERT_EQ(m["ggml_type"].get<int32_t>(), int32_t(GetParam()));
        n_rows = m["n_rows"].get<int64_t>();
        n_per_row = m["n_per_row"].get<int64_t>();
        row_bytes = m["row_bytes"].get<size_t>();
        ASSERT_EQ(quant_row_bytes(GetParam(), n_per_row), row_bytes);
        blocks = read_bytes(m["blocks"].get<std::string>());
        dequant = read_array<float>(m["dequant"].get<std::string>());
        if (!m["input"].is_null()) {
            input = read_array<float>(m["input"].get<std::string>());
        }
        ASSERT_EQ(blocks.size(), size_t(n_rows) * row_bytes);
        ASSERT_EQ(dequant.size(), size_t(n_rows * n_per_row));
        for (const auto & r : m["rows"]) {
            row_names.push_back(r.get<std::string>());
        }
    }

    std::string describe(int64_t flat_index, int64_t n_per_row_) const {
        const int64_t row = flat_index / n_per_row_;
        std::string s = "row " + std::to_string(row);
        if (size_t(row) < row_names.size()) {
            s += " (" + row_names[size_t(row)] + ")";
        }
        return s + ", element " + std::to_string(flat_index % n_per_row_);
    }

    int64_t n_rows = 0;
    int64_t n_per_row = 0;
    size_t row_bytes = 0;
    std::vector<uint8_t> blocks;     // [n_rows, row_bytes]
    std::vector<float> dequant;      // [n_rows, n_per_row]
    std::vector<float> input;        // [n_rows, n_per_row], empty for K-quants
    std::vector<std::string> row_names;
};

TEST_P(QuantFixture, DequantizeMatchesGgufBitForBit) {
    std::vector<float> got(dequant.size(), std::nanf("")); // [n_rows, n_per_row]
    for (int64_t r = 0; r < n_rows; ++r) {
        ASSERT_TRUE(dequantize_row(GetParam(), blocks.data() + size_t(r) * row_bytes,
                                   got.data() + r * n_per_row, n_per_row));
    }
    const int64_t bad = first_mismatch(got, dequant);
    EXPECT_EQ(bad, -1) << describe(bad, n_per_row) << ": got " << got[size_t(bad)] << " (0x" << std::hex
                       << std::bit_cast<uint32_t>(got[size_t(bad)]) << "), gguf " << dequant[size_t(bad)]
                       << " (0x" << std::bit_cast<uint32_t>(dequant[size_t(bad)]) << ")";
}

// Only the types gguf can quantize (K-quants: see QuantFormat.KQuantsAreDequantizeOnly).
class QuantizeFixture : public QuantFixture {};

TEST_P(QuantizeFixture, QuantizeMatchesGgufBytesExactly) {
    ASSERT_EQ(input.size(), size_t(n_rows * n_per_row));
    std::vector<uint8_t> got(blocks.size(), 0); // [n_rows, row_bytes]
    for (int64_t r = 0; r < n_rows; ++r) {
        ASSERT_TRUE(quantize_row(GetParam(), input.data() + r * n_per_row, got.data() + size_t(r) * row_bytes,
                                 n_per_row));
    }
    const int64_t bad = first_mismatch(got, blocks);
    if (bad >= 0) {
        const size_t block_bytes = quant_block_bytes(GetParam());
        const int64_t row = bad / int64_t(row_bytes);
        FAIL() << "first differing byte " << bad << ": row " << row << " ("
               << (size_t(row) < row_names.size() ? row_names[size_t(row)] : "") << "), block "
               << (bad % int64_t(row_bytes)) / int64_t(block_bytes) << ", byte "
               << (bad % int64_t(row_bytes)) % int64_t(block_bytes) << ": got " << int(got[size_t(bad)])
               << ", gguf " << int(blocks[size_t(bad)]);
    }
}

std::string type_param_name(const ::testing::TestParamInfo<QuantType> & info) {
    return quant_type_name(info.param);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, QuantFixture, ::testing::ValuesIn(kAllTypes), type_param_name);
INSTANTIATE_TEST_SUITE_P(QuantizableTypes, QuantizeFixture,
                         ::testing::Values(QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1), type_param_name);

// ---- round trip ----

// Every block of a few random rows at several magnitudes.
template <typename Check>
void for_each_quantized_block(QuantType type, Check check) {
    const int64_t n = 1024;
    const size_t block_bytes = quant_block_bytes(type);
    for (uint32_t seed = 0; seed < 4; ++seed) {
        for (float scale : {1e-3f, 1.0f, 300.0f}) {
            const std::vector<float> x = random_row(n, seed, scale);  // [n]
            std::vector<uint8_t> q(quant_row_bytes(type, n));          // [n / 32, block_bytes]
            std::vector<float> y(static_cast<size_t>(n));              // [n]
            ASSERT_TRUE(quantize_row(type, x.data(), q.data(), n));
            ASSERT_TRUE(dequantize_row(type, q.data(), y.data(), n));
            for (int64_t b = 0; b < n / QK_BLOCK; ++b) {
                check(x.data() + b * QK_BLOCK, y.data() + b * QK_BLOCK, q.data() + size_t(b) * block_bytes);
            }
        }
    }
}

float max_abs(const float * x, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        m = std::max(m, std::fabs(x[i]));
    }
    return m;
}

TEST(QuantRoundTrip, Q8_0ErrorIsWithinHalfAScale) {
    for_each_quantized_block(QuantType::Q8_0, [](const float * x, const float * y, const uint8_t * q) {
        BlockQ8_0 b;
        std::memcpy(&b, q, sizeof b);
        const float d = max_abs(x, QK_BLOCK) / 127.0f;
        const float d16 = fp16_to_f32(b.d);
        // half a step, plus what rounding the scale to fp16 moves the top level
        const float bound = 0.5f * d + 127.0f * std::fabs(d - d16) + 1e-6f * d;
        for (int i = 0; i < QK_BLOCK; ++i) {
            ASSERT_LE(std::fabs(x[i] - y[i]), bound) << "i=" << i << " x=" << x[i];
        }
    });
}

TEST(QuantRoundTrip, Q4_0ErrorIsWithinHalfAScaleExceptTheUnusedTopLevel) {
    for_each_quantized_block(QuantType::Q4_0, [](const float * x, const float * y, const uint8_t * q) {
        BlockQ4_0 b;
        std::memcpy(&b, q, sizeof b);
        const float amax = max_abs(x, QK_BLOCK);
        const float d = amax / 8.0f;
        const float d16 = std::fabs(fp16_to_f32(b.d));
        const float fp16_slack = 8.0f * std::fabs(d - d16) + 1e-6f * d;
        for (int i = 0; i < QK_BLOCK; ++i) {
            // The max-abs element maps to -8; values that would need +8 are clipped to +7.
            const bool clipped = std::fabs(x[i]) > 7.5f * d;
            const float bound = (clipped ? d : 0.5f * d) + fp16_slack;
            ASSERT_LE(std::fabs(x[i] - y[i]), bound) << "i=" << i << " x=" << x[i];
        }
        // The signed max-abs element itself comes back to within the fp16 rounding of d.
        for (int i = 0; i < QK_BLOCK; ++i) {
            if (std::fabs(x[i]) == amax) {
                EXPECT_LE(std::fabs(x[i] - y[i]), fp16_slack);
                break;
            }
        }
    });
}

TEST(QuantRoundTrip, Q4_1ErrorIsWithinHalfAScale) {
    for_each_quantized_block(QuantType::Q4_1, [](const float * x, const float * y, const uint8_t * q) {
        BlockQ4_1 b;
        std::memcpy(&b, q, sizeof b);
        float min = x[0], max = x[0];
        for (int i = 1; i < QK_BLOCK; ++i) {
            min = std::min(min, x[i]);
            max = std::max(max, x[i]);
        }
        const float d = (max - min) / 15.0f;
        const float bound = 0.5f * d + 15.0f * std::fabs(d - fp16_to_f32(b.d)) +
                            std::fabs(min - fp16_to_f32(b.m)) + 1e-6f * (max - min);
        for (int i = 0; i < QK_BLOCK; ++i) {
            ASSERT_LE(std::fabs(x[i] - y[i]), bound) << "i=" << i << " x=" << x[i];
        }
    });
}

TEST(QuantRoundTrip, Q8_0IsExactForIntegersUpTo127) {
    std::vector<float> x(64); // [64]
    for (int i = 0; i < 64; ++i) {
        x[size_t(i)] = float((i * 37) % 255 - 127);
    }
    x[0] = 127.0f;
    x[32] = -127.0f;
    std::vector<uint8_t> q(quant_row_bytes(QuantType::Q8_0, 64));
    std::vector<float> y(64);
    ASSERT_TRUE(quantize_row(QuantType::Q8_0, x.data(), q.data(), 64));
    ASSERT_TRUE(dequantize_row(QuantType::Q8_0, q.data(), y.data(), 64));
    EXPECT_EQ(first_mismatch(x, y), -1);
}

TEST(QuantRoundTrip, BlocksOfFloatSubnormalsQuantizeToZeroWithoutOverflow) {
    // amax / 127 is a float subnormal whose inverse overflows to infinity.
    std::vector<float> x(32); // [32]
    for (int i = 0; i < 32; ++i) {
        x[size_t(i)] = (i % 3 - 1) * 1e-39f * float(i);
    }
    for (QuantType t : {QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1}) {
        std::vector<uint8_t> q(quant_block_bytes(t));
        std::vector<float> y(32, 1.0f);
        ASSERT_TRUE(quantize_row(t, x.data(), q.data(), 32)) << quant_type_name(t);
        ASSERT_TRUE(dequantize_row(t, q.data(), y.data(), 32)) << quant_type_name(t);
        for (float v : y) {
            ASSERT_EQ(v, 0.0f) << quant_type_name(t);
        }
    }
}

// ---- layouts, by hand (independent of the fixtures) ----

TEST(QuantLayout, Q4_0LowNibblesHoldTheFirstHalfOfTheBlock) {
    BlockQ4_0 b{};
    b.d = f32_to_fp16(1.0f);
    for (int j = 0; j < 16; ++j) {
        b.qs[j] = uint8_t(j | ((15 - j) << 4));
    }
    float y[32];
    ASSERT_TRUE(dequantize_row(QuantType::Q4_0, &b, y, 32));
    for (int j = 0; j < 16; ++j) {
        EXPECT_EQ(y[j], float(j - 8));
        EXPECT_EQ(y[j + 16], float(7 - j));
    }
}

TEST(QuantLayout, Q4_KUnpacksSixBitScalesAndMinsOfEightSubBlocks) {
    const int sc[8] = {1, 2, 3, 63, 17, 33, 48, 63};
    const int mn[8] = {0, 5, 62, 7, 63, 16, 1, 40};
    BlockQ4_K b{};
    b.d = f32_to_fp16(1.0f);
    b.dmin = f32_to_fp16(0.5f);
    for (int j = 0; j < 4; ++j) {
        b.scales[j] = uint8_t(sc[j] | ((sc[j + 4] >> 4) << 6));
        b.scales[j + 4] = uint8_t(mn[j] | ((mn[j + 4] >> 4) << 6));
        b.scales[j + 8] = uint8_t((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
    for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 32; ++l) {
            b.qs[32 * k + l] = uint8_t((l % 16) | ((15 - l % 16) << 4));
        }
    }
    std::vector<float> y(256);
    ASSERT_TRUE(dequantize_row(QuantType::Q4_K, &b, y.data(), 256));
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            const int q = j % 2 == 0 ? l % 16 : 15 - l % 16;
            ASSERT_EQ(y[size_t(32 * j + l)], float(sc[j] * q) - 0.5f * float(mn[j])) << "j=" << j << " l=" << l;
        }
    }
}

TEST(QuantLayout, Q5_KTakesTheFifthBitOfSubBlockJFromBitJOfQh) {
    BlockQ5_K b{};
    b.d = f32_to_fp16(1.0f);
    for (int j = 0; j < 4; ++j) {
        b.scales[j] = 1;          // sc = 1 for j < 4, min 0
        b.scales[j + 8] = 1;      // sc = 1 for j >= 4
    }
    for (int l = 0; l < 32; ++l) {
        b.qh[l] = uint8_t(1u << (l % 8));  // element l of sub-block l % 8 gets the fifth bit
    }
    std::vector<float> y(256);
    ASSERT_TRUE(dequantize_row(QuantType::Q5_K, &b, y.data(), 256));
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            ASSERT_EQ(y[size_t(32 * j + l)], l % 8 == j ? 16.0f : 0.0f) << "j=" << j << " l=" << l;
        }
    }
}

TEST(QuantLayout, Q6_KInterleavesFourQuartersOfEachHalfInQlAndQh) {
    BlockQ6_K b{};
    b.d = f32_to_fp16(1.0f);
    for (int s = 0; s < 16; ++s) {
        b.scales[s] = int8_t(s % 2 == 0 ? 1 : -1);
    }
    // Packs a distinct q per element e = 128h + 32r + l: low nibble into ql[64h + 32(r % 2) + l]
    // (low half for r < 2, high half otherwise), 2 high bits into bits 2r+1..2r of qh[32h + l].
    std::vector<int> want(256); // [256] q values in 0..63
    for (int e = 0; e < 256; ++e) {
        want[size_t(e)] = (e * 7 + 3) % 64;
    }
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, r = (e % 128) / 32, l = e % 32;
        const int q = want[size_t(e)];
        b.ql[64 * h + 32 * (r % 2) + l] |= uint8_t((q & 15) << (4 * (r / 2)));
        b.qh[32 * h + l] |= uint8_t((q >> 4) << (2 * r));
    }
    std::vector<float> y(256);
    ASSERT_TRUE(dequantize_row(QuantType::Q6_K, &b, y.data(), 256));
    for (int e = 0; e < 256; ++e) {
        const float scale = (e / 16) % 2 == 0 ? 1.0f : -1.0f;
        ASSERT_EQ(y[size_t(e)], scale * float(want[size_t(e)] - 32)) << "e=" << e;
    }
}

} // namespace
} // namespace moesh
