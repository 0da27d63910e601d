// Weight decoding shared by the CUDA kernels and host code: fp16/bf16 widening
// and GGUF block dequantization (Q8_0, Q4_0, Q4_K), bit-identical to
// experts/quant.cpp. Plain C++ when not compiled by nvcc, so that a host test
// checks the same functions the kernels call.
//
//     float w[8];                                  // one "piece" of a row
//     load_piece_bytes(MOESH_DTYPE_Q4_0, row, u, q, w);
//     // w[4 * g + i] is element piece_offset(MOESH_DTYPE_Q4_0, q, g) + i of unit u
//
// Kernels see a weight row as units of 32 elements (a Q8_0 or Q4_0 block, a
// Q4_K sub-block, 32 plain elements), each split into 4 pieces of 8 elements:
// two runs of 4 consecutive elements, so activations load as float4.
//
// Every product of an fp16 scale and these formats' small integers is exact in
// float, so a fused multiply-add (which nvcc emits) rounds Q4_K's
// d * sc * q - dmin * mn once, exactly as the separate multiply and subtract.
// Thread safety: pure functions.
#pragma once

#include <moesh/plugin.h>

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define MOESH_HD __host__ __device__
#else
#define MOESH_HD
#endif

namespace moesh::cuda {

inline constexpr int kUnit = 32;         // elements per unit
inline constexpr int kPieces = 4;        // pieces per unit
inline constexpr int kQ8_0Bytes = 34;    // d, int8 q[32]
inline constexpr int kQ4_0Bytes = 18;    // d, qs[16]
inline constexpr int kQ4_KBytes = 144;   // d, dmin, scales[12], qs[128]

MOESH_HD constexpr bool is_block_type(int32_t t) {
    return t == MOESH_DTYPE_Q8_0 || t == MOESH_DTYPE_Q4_0 || t == MOESH_DTYPE_Q4_K;
}

// Elements per block (1 for plain types).
MOESH_HD constexpr int block_elems(int32_t t) {
    return t == MOESH_DTYPE_Q4_K ? MOESH_QK_K : is_block_type(t) ? MOESH_QK_BLOCK : 1;
}

// Bytes per block (the element size for plain types).
MOESH_HD constexpr int block_bytes(int32_t t) {
    switch (t) {
    case MOESH_DTYPE_F32: return 4;
    case MOESH_DTYPE_F16:
    case MOESH_DTYPE_BF16: return 2;
    case MOESH_DTYPE_Q8_0: return kQ8_0Bytes;
    case MOESH_DTYPE_Q4_0: return kQ4_0Bytes;
    case MOESH_DTYPE_Q4_K: return kQ4_KBytes;
    default: return 0;
    }
}

// Bytes of a row of n elements (n a whole number of blocks).
MOESH_HD constexpr int64_t row_bytes(int32_t t, int64_t n) {
    return n / block_elems(t) * block_bytes(t);
}

MOESH_HD inline float bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
}

MOESH_HD inline float f16_bits_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));   // one exact cvt instruction
#else
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0x1f) {
        return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        const float magnitude = float(mantissa) * 5.9604644775390625e-08f;   // 2^-24, exact
        return sign ? -magnitude : magnitude;
    }
    return bits_to_f32(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
#endif
}

MOESH_HD inline float bf16_bits_to_f32(uint16_t b) { return bits_to_f32(uint32_t(b) << 16); }

// Little-endian loads from any address, a byte at a time.
MOESH_HD inline uint16_t load_u16(const uint8_t * p) { return uint16_t(p[0] | (p[1] << 8)); }
MOESH_HD inline uint32_t load_u32(const uint8_t * p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// Unit offset of the first element of group g (0, 1) of piece q (0..3). Q4_0
// keeps a byte's two nibbles in one piece: they are 16 elements apart.
MOESH_HD constexpr int piece_offset(int32_t t, int q, int g) {
    return t == MOESH_DTYPE_Q4_0 ? 4 * q + 16 * g : 8 * q + 4 * g;
}

// ---- piece decoders, from quant bits already loaded (little-endian words) ----

// Q8_0: lo, hi are int8 q[8q .. 8q+7].
MOESH_HD inline void q8_0_piece(float d, uint32_t lo, uint32_t hi, float * w /* [8] */) {
    for (int i = 0; i < 4; ++i) {
        w[i] = float(int8_t(lo >> (8 * i))) * d;
        w[4 + i] = float(int8_t(hi >> (8 * i))) * d;
    }
}

// Q4_0: qs holds bytes qs[4q .. 4q+3]; low nibbles are w[0..3], high w[4..7].
MOESH_HD inline void q4_0_piece(float d, uint32_t qs, float * w /* [8] */) {
    for (int i = 0; i < 4; ++i) {
        w[i] = d * float(int((qs >> (8 * i)) & 0x0f) - 8);
        w[4 + i] = d * float(int((qs >> (8 * i + 4)) & 0x0f) - 8);
    }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K super-block.
MOESH_HD inline void k_scale_min(const uint8_t * scales /* [12] */, int j, int & sc, int & mn) {
    if (j < 4) {
        sc = scales[j] & 63;
        mn = scales[j + 4] & 63;
    } else {
        sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

// Q4_K: lo, hi are bytes qs[32 * (j / 2) + 8q ..] of sub-block j, shift = 4 * (j % 2);
// dl = d * sc, ml = dmin * mn.
MOESH_HD inline void q4_k_piece(float dl, float ml, uint32_t lo, uint32_t hi, int shift, float * w /* [8] */) {
    for (int i = 0; i < 4; ++i) {
        w[i] = dl * float((lo >> (8 * i + shift)) & 0x0f) - ml;
        w[4 + i] = dl * float((hi >> (8 * i + shift)) & 0x0f) - ml;
    }
}

// dl and ml of sub-block j of the Q4_K super-block at blk.
MOESH_HD inline void q4_k_sub_scales(const uint8_t * blk, int j, float & dl, float & ml) {
    int sc = 0, mn = 0;
    k_scale_min(blk + 4, j, sc, mn);
    dl = f16_bits_to_f32(load_u16(blk)) * float(sc);
    ml = f16_bits_to_f32(load_u16(blk + 2)) * float(mn);
}

// Byte offset, from a row's start, of the quant bits of piece q of unit u
// (block types), and of the block holding it.
MOESH_HD inline int64_t unit_block_offset(int32_t t, int64_t u) {
    return t == MOESH_DTYPE_Q4_K ? (u / 8) * kQ4_KBytes : u * block_bytes(t);
}
MOESH_HD inline int piece_quant_offset(int32_t t, int64_t u, int q) {
    switch (t) {
    case MOESH_DTYPE_Q8_0: return 2 + 8 * q;
    case MOESH_DTYPE_Q4_0: return 2 + 4 * q;
    default: return 16 + 32 * int((u % 8) / 2) + 8 * q;   // Q4_K
    }
}

// Piece q of unit u of a row of type t: the 8 weights w[4 * g + i] at unit
// offsets piece_offset(t, q, g) + i. Loads a byte or an element at a time, so
// the row needs no alignment beyond its element type's.
MOESH_HD inline void load_piece_bytes(int32_t t, const uint8_t * row, int64_t u, int q, float * w /* [8] */) {
    const int64_t e0 = u * kUnit + 8 * q;   // plain types: first element of the piece
    switch (t) {
    case MOESH_DTYPE_F32:
        for (int i = 0; i < 8; ++i) {
            w[i] = bits_to_f32(load_u32(row + 4 * (e0 + i)));
        }
        return;
    case MOESH_DTYPE_F16:
        for (int i = 0; i < 8; ++i) {
            w[i] = f16_bits_to_f32(load_u16(row + 2 * (e0 + i)));
        }
        return;
    case MOESH_DTYPE_BF16:
        for (int i = 0; i < 8; ++i) {
            w[i] = bf16_bits_to_f32(load_u16(row + 2 * (e0 + i)));
        }
        return;
    default:
        break;
    }
    const uint8_t * blk = row + unit_block_offset(t, u);
    const uint8_t * qs = blk + piece_quant_offset(t, u, q);
    switch (t) {
    case MOESH_DTYPE_Q8_0:
        q8_0_piece(f16_bits_to_f32(load_u16(blk)), load_u32(qs), load_u32(qs + 4), w);
        return;
    case MOESH_DTYPE_Q4_0:
        q4_0_piece(f16_bits_to_f32(load_u16(blk)), load_u32(qs), w);
        return;
    case MOESH_DTYPE_Q4_K: {
        float dl = 0.0f, ml = 0.0f;
        q4_k_sub_scales(blk, int(u % 8), dl, ml);
        q4_k_piece(dl, ml, load_u32(qs), load_u32(qs + 4), 4 * int(u % 2), w);
        return;
    }
    default:
        return;
    }
}

// Element i of a row of type t, as experts/quant.cpp's dequantize_row gives it
// (plain types: the value widened).
MOESH_HD inline float row_element(int32_t t, const uint8_t * row, int64_t i) {
    switch (t) {
    case MOESH_DTYPE_F32: return bits_to_f32(load_u32(row + 4 * i));
    case MOESH_DTYPE_F16: return f16_bits_to_f32(load_u16(row + 2 * i));
    case MOESH_DTYPE_BF16: return bf16_bits_to_f32(load_u16(row + 2 * i));
    default: break;
    }
    const int64_t b = i / block_elems(t);
    const int j = int(i % block_elems(t));
    const uint8_t * blk = row + b * block_bytes(t);
    const float d = f16_bits_to_f32(load_u16(blk));
    switch (t) {
    case MOESH_DTYPE_Q8_0:
        return float(int8_t(blk[2 + j])) * d;
    case MOESH_DTYPE_Q4_0: {
        const uint8_t q = blk[2 + j % 16];
        return d * float((j < 16 ? q & 0x0f : q >> 4) - 8);
    }
    case MOESH_DTYPE_Q4_K: {
        float dl = 0.0f, ml = 0.0f;
        q4_k_sub_scales(blk, j / 32, dl, ml);
        const int q = (blk[16 + 32 * (j / 64) + j % 32] >> (4 * ((j / 32) % 2))) & 0x0f;
        return dl * float(q) - ml;
    }
    default:
        return 0.0f;
    }
}

// Dequantizes the block at blk (t a block type) into y.
MOESH_HD inline void dequantize_block(int32_t t, const uint8_t * blk, float * y /* [block_elems(t)] */) {
    for (int u = 0; u < block_elems(t) / kUnit; ++u) {
        for (int q = 0; q < kPieces; ++q) {
            float w[8];
            load_piece_bytes(t, blk, u, q, w);
            for (int g = 0; g < 2; ++g) {
                for (int i = 0; i < 4; ++i) {
                    y[u * kUnit + piece_offset(t, q, g) + i] = w[4 * g + i];
                }
            }
        }
    }
}

// Dot product of the block at blk (t a block type) with x[0 .. block_elems(t)),
// accumulated in float piece by piece, as the kernels do.
MOESH_HD inline float block_dot(int32_t t, const uint8_t * blk, const float * x) {
    float sum = 0.0f;
    for (int u = 0; u < block_elems(t) / kUnit; ++u) {
        for (int q = 0; q < kPieces; ++q) {
            float w[8];
            load_piece_bytes(t, blk, u, q, w);
            for (int g = 0; g < 2; ++g) {
                for (int i = 0; i < 4; ++i) {
                    sum += w[4 * g + i] * x[u * kUnit + piece_offset(t, q, g) + i];
                }
            }
        }
    }
    return sum;
}

} // namespace moesh::cuda
