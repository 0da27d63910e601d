#include "experts/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

// gguf rounds every product before adding (x * id + 8.5f); a fused multiply-add,
// which GCC emits by default on FMA targets (AArch64, -march=native), could move
// a value across a rounding boundary. (Dequantization is immune: an fp16 scale
// times the small integers of these formats is exact in float.)
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static_assert(std::endian::native == std::endian::little, "block formats are little-endian");

namespace moesh {

namespace {

template <typename Block>
Block load_block(const void * src, int64_t i) {
    Block b;
    std::memcpy(&b, static_cast<const uint8_t *>(src) + size_t(i) * sizeof(Block), sizeof(Block));
    return b;
}

template <typename Block>
void store_block(void * dst, int64_t i, const Block & b) {
    std::memcpy(static_cast<uint8_t *>(dst) + size_t(i) * sizeof(Block), &b, sizeof(Block));
}

// ---- dequantization ----

void dequantize_q8_0(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ8_0>(src, i);
        const float d = fp16_to_f32(b.d);
        float * y = dst + i * QK_BLOCK; // [32]
        for (int j = 0; j < QK_BLOCK; ++j) {
            y[j] = float(b.qs[j]) * d;
        }
    }
}

void dequantize_q4_0(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ4_0>(src, i);
        const float d = fp16_to_f32(b.d);
        float * y = dst + i * QK_BLOCK; // [32]
        for (int j = 0; j < QK_BLOCK / 2; ++j) {
            y[j] = d * float((b.qs[j] & 0x0f) - 8);
            y[j + QK_BLOCK / 2] = d * float((b.qs[j] >> 4) - 8);
        }
    }
}

void dequantize_q4_1(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ4_1>(src, i);
        const float d = fp16_to_f32(b.d);
        const float m = fp16_to_f32(b.m);
        float * y = dst + i * QK_BLOCK; // [32]
        for (int j = 0; j < QK_BLOCK / 2; ++j) {
            y[j] = d * float(b.qs[j] & 0x0f) + m;
            y[j + QK_BLOCK / 2] = d * float(b.qs[j] >> 4) + m;
        }
    }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block.
void k_scale_min(const uint8_t * scales /* [12] */, int j, int & sc, int & mn) {
    if (j < 4) {
        sc = scales[j] & 63;
        mn = scales[j + 4] & 63;
    } else {
        sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

void dequantize_q4_k(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ4_K>(src, i);
        const float d = fp16_to_f32(b.d);
        const float dmin = fp16_to_f32(b.dmin);
        for (int j = 0; j < 8; ++j) {
            int sc = 0, mn = 0;
            k_scale_min(b.scales, j, sc, mn);
            const float dl = d * float(sc);
            const float ml = dmin * float(mn);
            const uint8_t * qs = b.qs + 32 * (j / 2); // [32]
            const int shift = 4 * (j % 2);
            float * y = dst + i * QK_K + 32 * j; // [32]
            for (int l = 0; l < 32; ++l) {
                y[l] = dl * float((qs[l] >> shift) & 0x0f) - ml;
            }
        }
    }
}

void dequantize_q5_k(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ5_K>(src, i);
        const float d = fp16_to_f32(b.d);
        const float dmin = fp16_to_f32(b.dmin);
        for (int j = 0; j < 8; ++j) {
            int sc = 0, mn = 0;
            k_scale_min(b.scales, j, sc, mn);
            const float dl = d * float(sc);
            const float ml = dmin * float(mn);
            const uint8_t * qs = b.qs + 32 * (j / 2); // [32]
            const int shift = 4 * (j % 2);
            float * y = dst + i * QK_K + 32 * j; // [32]
            for (int l = 0; l < 32; ++l) {
                const int q = ((qs[l] >> shift) & 0x0f) | (((b.qh[l] >> j) & 1) << 4);
                y[l] = dl * float(q) - ml;
            }
        }
    }
}

void dequantize_q6_k(const void * src, float * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const auto b = load_block<BlockQ6_K>(src, i);
        const float d = fp16_to_f32(b.d);
        for (int e = 0; e < QK_K; ++e) {
            const int h = e / 128;
            const int r = (e % 128) / 32;
            const int l = e % 32;
            const int low = (b.ql[64 * h + 32 * (r % 2) + l] >> (4 * (r / 2))) & 0x0f;
            const int high = (b.qh[32 * h + l] >> (2 * r)) & 3;
            const float dl = d * float(b.scales[e / 16]);
            dst[i * QK_K + e] = dl * float((low | (high << 4)) - 32);
        }
    }
}

// ---- quantization ----

// Float to int, saturating to [lo, hi] with NaN as `nan`. Finite in-range inputs
// are what gguf handles; the rest (an inverse scale that overflowed for a block
// of float-subnormal values) would be undefined behaviour in a plain cast.
int clamp_to_int(float v, int lo, int hi, int nan) {
    if (std::isnan(v)) {
        return nan;
    }
    return v <= float(lo) ? lo : v >= float(hi) ? hi : int(v);
}

void quantize_q8_0(const float * src, void * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const float * x = src + i * QK_BLOCK; // [32]
        float amax = 0.0f;
        for (int j = 0; j < QK_BLOCK; ++j) {
            amax = std::max(amax, std::fabs(x[j]));
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        BlockQ8_0 b;
        b.d = f32_to_fp16(d);
        for (int j = 0; j < QK_BLOCK; ++j) {
            b.qs[j] = int8_t(clamp_to_int(std::round(x[j] * id), -127, 127, 0));  // round half away, as np_roundf
        }
        store_block(dst, i, b);
    }
}

void quantize_q4_0(const float * src, void * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const float * x = src + i * QK_BLOCK; // [32]
        // The element of largest magnitude, sign kept (the first on a tie), maps
        // to -8 exactly, so the unused level is +8 rather than -8.
        float max = x[0];
        float amax = std::fabs(x[0]);
        for (int j = 1; j < QK_BLOCK; ++j) {
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        BlockQ4_0 b;
        b.d = f32_to_fp16(d);
        for (int j = 0; j < QK_BLOCK / 2; ++j) {
            const int lo = clamp_to_int(x[j] * id + 8.5f, 0, 15, 8);
            const int hi = clamp_to_int(x[j + QK_BLOCK / 2] * id + 8.5f, 0, 15, 8);
            b.qs[j] = uint8_t(lo | (hi << 4));
        }
        store_block(dst, i, b);
    }
}

void quantize_q4_1(const float * src, void * dst, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const float * x = src + i * QK_BLOCK; // [32]
        float min = x[0];
        float max = x[0];
        for (int j = 1; j < QK_BLOCK; ++j) {
            min = std::min(min, x[j]);
            max = std::max(max, x[j]);
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        BlockQ4_1 b;
        b.d = f32_to_fp16(d);
        b.m = f32_to_fp16(min);
        for (int j = 0; j < QK_BLOCK / 2; ++j) {
            const int lo = clamp_to_int((x[j] - min) * id + 0.5f, 0, 15, 0);
            const int hi = clamp_to_int((x[j + QK_BLOCK / 2] - min) * id + 0.5f, 0, 15, 0);
            b.qs[j] = uint8_t(lo | (hi << 4));
        }
        store_block(dst, i, b);
    }
}

} // namespace

const char * quant_type_name(QuantType type) {
    switch (type) {
    case QuantType::Q4_0: return "q4_0";
    case QuantType::Q4_1: return "q4_1";
    case QuantType::Q8_0: return "q8_0";
    case QuantType::Q4_K: return "q4_K";
    case QuantType::Q5_K: return "q5_K";
    case QuantType::Q6_K: return "q6_K";
    }
    return "?";
}

std::optional<QuantType> quant_type_from_ggml(int32_t ggml_type) {
    switch (ggml_type) {
    case 2: return QuantType::Q4_0;
    case 3: return QuantType::Q4_1;
    case 8: return QuantType::Q8_0;
    case 12: return QuantType::Q4_K;
    case 13: return QuantType::Q5_K;
    case 14: return QuantType::Q6_K;
    default: return std::nullopt;
    }
}

int64_t quant_block_elems(QuantType type) {
    switch (type) {
    case QuantType::Q4_0:
    case QuantType::Q4_1:
    case QuantType::Q8_0: return QK_BLOCK;
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K: return QK_K;
    }
    return 0;
}

size_t quant_block_bytes(QuantType type) {
    switch (type) {
    case QuantType::Q4_0: return sizeof(BlockQ4_0);
    case QuantType::Q4_1: return sizeof(BlockQ4_1);
    case QuantType::Q8_0: return sizeof(BlockQ8_0);
    case QuantType::Q4_K: return sizeof(BlockQ4_K);
    case QuantType::Q5_K: return sizeof(BlockQ5_K);
    case QuantType::Q6_K: return sizeof(BlockQ6_K);
    }
    return 0;
}

size_t quant_row_bytes(QuantType type, int64_t n) {
    const int64_t n_per_block = quant_block_elems(type);
    if (n_per_block == 0 || n < 0 || n % n_per_block != 0) {
        return 0;
    }
    return size_t(n / n_per_block) * quant_block_bytes(type);
}

bool quant_can_quantize(QuantType type) {
    return type == QuantType::Q8_0 || type == QuantType::Q4_0 || type == QuantType::Q4_1;
}

bool dequantize_row(QuantType type, const void * src, float * dst, int64_t n) {
    const int64_t n_per_block = quant_block_elems(type);
    if (n_per_block == 0 || n < 0 || n % n_per_block != 0) {
        return false;
    }
    const int64_t n_blocks = n / n_per_block;
    switch (type) {
    case QuantType::Q4_0: dequantize_q4_0(src, dst, n_blocks); return true;
    case QuantType::Q4_1: dequantize_q4_1(src, dst, n_blocks); return true;
    case QuantType::Q8_0: dequantize_q8_0(src, dst, n_blocks); return true;
    case QuantType::Q4_K: dequantize_q4_k(src, dst, n_blocks); return true;
    case QuantType::Q5_K: dequantize_q5_k(src, dst, n_blocks); return true;
    case QuantType::Q6_K: dequantize_q6_k(src, dst, n_blocks); return true;
    }
    return false;
}

bool quantize_row(QuantType type, const float * src, void * dst, int64_t n) {
    const int64_t n_per_block = quant_block_elems(type);
    if (!quant_can_quantize(type) || n < 0 || n % n_per_block != 0) {
        return false;
    }
    const int64_t n_blocks = n / n_per_block;
    switch (type) {
    case QuantType::Q4_0: quantize_q4_0(src, dst, n_blocks); return true;
    case QuantType::Q4_1: quantize_q4_1(src, dst, n_blocks); return true;
    case QuantType::Q8_0: quantize_q8_0(src, dst, n_blocks); return true;
    default: return false;
    }
}

float fp16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0x1f) {
        return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = float(mantissa) * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

uint16_t f32_to_fp16(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const auto sign = uint16_t((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return uint16_t(sign | 0x7e00 | ((a >> 13) & 0x3ff));  // NaN: quiet, top payload bits kept
    }
    const int exponent = int(a >> 23) - 127;
    if (exponent > 15) {
        return uint16_t(sign | 0x7c00);
    }
    // Magnitude as an integer count of the target's last unit, split into the
    // kept part and the dropped bits that decide the rounding.
    uint32_t kept = 0;
    uint32_t dropped = 0;
    uint32_t half = 0;
    if (exponent >= -14) {
        kept = (uint32_t(exponent + 15) << 10) | ((a & 0x7fffff) >> 13);
        dropped = a & 0x1fff;
        half = 0x1000;
    } else {
        // fp16 subnormal, in units of 2^-24: (mantissa | 2^23) * 2^(exponent - 23) / 2^-24
        const int shift = -exponent - 1;  // >= 14
        if (shift > 24) {
            return sign;  // below half the smallest subnormal (float subnormals included)
        }
        const uint32_t full = (a & 0x7fffff) | 0x800000u;
        kept = full >> shift;
        dropped = full & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    }
    if (dropped > half || (dropped == half && (kept & 1))) {
        ++kept;  // a carry into the exponent is right, up to and including infinity
    }
    return uint16_t(sign | kept);
}

} // namespace moesh
