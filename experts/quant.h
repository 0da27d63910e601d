// GGUF block quantization formats, as plain scalar reference code: the oracle
// that SIMD kernels are tested against and the load-time quantizer. Results
// are bit-identical to the `gguf` Python package (gguf.quants), which follows
// ggml's ggml-quants.c.
//
//   const int64_t n = 4096;                                   // a multiple of the block size
//   std::vector<uint8_t> q(quant_row_bytes(QuantType::Q4_0, n));
//   quantize_row(QuantType::Q4_0, x, q.data(), n);            // x: float[n]
//   dequantize_row(QuantType::Q4_0, q.data(), y, n);          // y: float[n]
//
// A row is a whole number of blocks; functions given another length refuse it
// (0 bytes, or false) and write nothing. K-quants (Q4_K, Q5_K, Q6_K) can only
// be dequantized: gguf has no reference quantizer for them to be checked against.
// Multi-byte fields are little-endian (the only byte order supported).
//
// Thread safety: no shared state; concurrent calls on disjoint outputs are fine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace moesh {

// Values are ggml's type ids (enum ggml_type), as stored in GGUF tensor infos.
enum class QuantType : int32_t {
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
};

inline constexpr int64_t QK_BLOCK = 32;  // elements per block of Q4_0, Q4_1, Q8_0
inline constexpr int64_t QK_K = 256;     // elements per K-quant super-block

// Block layouts. A block stores `block_elems` consecutive values of a row;
// d, dmin and m are IEEE fp16 bit patterns. Element i of a block decodes as:

// Q8_0, 34 bytes: x[i] = d * qs[i]
struct BlockQ8_0 {
    uint16_t d;            // scale, amax / 127
    int8_t qs[QK_BLOCK];   // [32]
};

// Q4_0, 18 bytes: x[i] = d * (nibble(i) - 8), where elements 0..15 are the low
// nibbles of qs[0..15] and elements 16..31 the high nibbles.
struct BlockQ4_0 {
    uint16_t d;                // scale, the signed max-abs element / -8
    uint8_t qs[QK_BLOCK / 2];  // [16] two 4-bit values each
};

// Q4_1, 20 bytes: x[i] = d * nibble(i) + m, nibbles as in Q4_0.
struct BlockQ4_1 {
    uint16_t d;                // scale, (max - min) / 15
    uint16_t m;                // min
    uint8_t qs[QK_BLOCK / 2];  // [16]
};

// Q4_K, 144 bytes: 8 sub-blocks of 32 elements. Sub-block j has a 6-bit scale
// sc[j] and 6-bit min mn[j]; x = (d * sc[j]) * q - (dmin * mn[j]), q 4-bit.
// q: sub-blocks 2k and 2k+1 are the low and high nibbles of qs[32k .. 32k+31].
// scales[12], bits 7..0, for j < 4 (sc = s, mn = m) and j >= 4 (upper case):
//   scales[0..3]  = S[j+4] >> 4 (2 bits) | s[j]   (6 bits)
//   scales[4..7]  = M[j+4] >> 4 (2 bits) | m[j]   (6 bits)
//   scales[8..11] = M[j+4] & 15 (4 bits) | S[j+4] & 15 (4 bits)
struct BlockQ4_K {
    uint16_t d;               // super-block scale of the 6-bit scales
    uint16_t dmin;            // super-block scale of the 6-bit mins
    uint8_t scales[12];       // 8 (scale, min) pairs, 6 bits each, packed as above
    uint8_t qs[QK_K / 2];     // [128] 4-bit values
};

// Q5_K, 176 bytes: as Q4_K, with a fifth bit: q = nibble | bit << 4, where
// the bit of element l (0..31) of sub-block j is bit j of qh[l].
struct BlockQ5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];       // as Q4_K
    uint8_t qh[QK_K / 8];     // [32] high bits
    uint8_t qs[QK_K / 2];     // [128] low 4 bits, as Q4_K
};

// Q6_K, 210 bytes (d last): 16 sub-blocks of 16 elements; x = (d * scales[e / 16]) * (q - 32),
// q 6-bit. In each half h (128 elements, e = 128h + 32r + l, r 0..3, l 0..31):
//   low 4 bits : r 0, 1 -> low nibble of ql[64h + 32r + l]; r 2, 3 -> high nibble of ql[64h + 32(r-2) + l]
//   high 2 bits: bits 2r+1..2r of qh[32h + l]
struct BlockQ6_K {
    uint8_t ql[QK_K / 2];     // [128] low 4 bits
    uint8_t qh[QK_K / 4];     // [64] high 2 bits
    int8_t scales[QK_K / 16]; // [16] signed 8-bit scales
    uint16_t d;               // super-block scale
};

static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// ggml's name ("q8_0", "q4_K", ...).
const char * quant_type_name(QuantType type);
// The QuantType for a ggml type id, or nullopt for one not supported here.
std::optional<QuantType> quant_type_from_ggml(int32_t ggml_type);
int64_t quant_block_elems(QuantType type);  // 32 or 256
size_t quant_block_bytes(QuantType type);
// Bytes of a row of n values; 0 when n is negative or not a multiple of the block
// size (and for n = 0, an empty row).
size_t quant_row_bytes(QuantType type, int64_t n);
// Whether quantize_row supports the type (Q8_0, Q4_0, Q4_1).
bool quant_can_quantize(QuantType type);

// src: quant_row_bytes(type, n) bytes, no alignment needed; dst: float[n].
// Returns false (writing nothing) when n is not a whole number of blocks.
bool dequantize_row(QuantType type, const void * src, float * dst, int64_t n);
// src: float[n]; dst: quant_row_bytes(type, n) bytes, no alignment needed.
// Returns false (writing nothing) when n is not a whole number of blocks or the
// type has no quantizer. Bit-identical to gguf for finite inputs whose inverse
// scale is finite; a scale above the fp16 range is stored as infinity, as in
// gguf; NaN/infinite inputs give unspecified (but defined) bytes.
bool quantize_row(QuantType type, const float * src, void * dst, int64_t n);

// IEEE binary16 <-> float. Widening is exact; narrowing rounds to nearest,
// ties to even (as numpy's float16 cast); overflow gives infinity; NaN stays a
// quiet NaN with its sign. A private copy of the reference kernels' helpers,
// which moesh_experts does not link.
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);

} // namespace moesh
