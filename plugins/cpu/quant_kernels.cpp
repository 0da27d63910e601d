// Highway compiles this file once per SIMD target (foreach_target.h re-includes
// it) and HWY_DYNAMIC_DISPATCH picks the best one for the CPU at run time. The
// dot-product kernel and the hot unpackers use AVX2 intrinsics on x86 targets
// that have them (AVX2, AVX-512); other targets take the portable C++ below.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "quant_kernels.cpp"
#include <hwy/foreach_target.h>  // must precede highway.h

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include "quant_kernels.h"

#if HWY_ARCH_X86
#include <immintrin.h>
#endif

// Target-independent layout of the per-thread panel (compiled once).
#ifndef MOESH_QUANT_KERNELS_SHARED
#define MOESH_QUANT_KERNELS_SHARED
namespace moesh::cpu::quant {

// Weight rows one panel holds: expert gate and up rows side by side (4 + 4
// from the file layout, 8 + 8 from packed tiles).
constexpr int64_t k_panel_rows = 16;
// Rows the dot kernel multiplies at once.
constexpr int64_t k_tile_rows = 4;
// How far ahead of the 8 groups being multiplied each row's bytes are
// prefetched in decode, in such chunks (4 row streams).
constexpr int64_t k_prefetch_chunks = 6;

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Packed weights (MOESH_DTYPE_PACKED): a header, then tiles of k_pack_rows
// rows (the last padded with zero rows). A tile is n_g groups; a group is the
// 8 rows' fp16 scales (row j at byte 2j), then their values in 4-byte pieces
// interleaved: bytes [16 + 32c + 4j, +4) are piece c of row j's block (Q8_0:
// values 4c..4c+3, c < 8; Q4_0: qs[4c..4c+3], whose low nibbles are values
// 4c..4c+3 and high nibbles 16+4c..16+4c+3, c < 4). One 32-byte load then
// holds the same 4 values of 8 rows: one maddubs against 4 activation bytes
// broadcast serves 8 rows, and the float conversion and scaling happen once
// per group for 8 rows instead of once per row.
constexpr int64_t k_pack_rows = 8;
// How many groups ahead decode prefetches a packed tile (tiles are
// consecutive, so past a tile's end this is the next tile's start).
constexpr size_t k_pack_prefetch_groups = 8;
constexpr size_t k_pack_header_bytes = 64;
constexpr char k_pack_magic[8] = {'M', 'O', 'E', 'S', 'H', 'P', 'K', '1'};

struct PackHeader {
    char magic[8];
    int32_t w_type;   // the block type it was packed from
    int32_t reserved;
    int64_t n_rows;
    int64_t n_cols;
};
static_assert(sizeof(PackHeader) <= k_pack_header_bytes);

// Bytes of one packed group of 8 rows; 0 for a type that is not packed.
constexpr size_t pack_group_bytes(int32_t w_type) {
    return w_type == MOESH_DTYPE_Q4_0 ? 16 + 8 * 16 : w_type == MOESH_DTYPE_Q8_0 ? 16 + 8 * 32 : 0;
}

inline const uint8_t * packed_tile(const void * w, int64_t tile, int64_t n_g, size_t group_bytes) {
    return static_cast<const uint8_t *>(w) + k_pack_header_bytes + size_t(tile) * size_t(n_g) * group_bytes;
}

// What the kernel does with a panel, per weight type.
enum class Kind {
    Unsigned,   // bytes 0..31; value = sw * byte + ow per group of 32 (Q4_0, Q4_1, Q4_K, Q5_K)
    Signed,     // int8; value = sw * byte (Q8_0)
    Sub16,      // bytes 0..63; value = sw * sub[half] * byte + ow16[half] per 16 (Q6_K)
};

// Unpacked rows: for each panel row r and group g (32 weights).
struct Panel {
    uint8_t * w;     // [k_panel_rows, n_g, 32] one byte per weight
    float * sw;      // [k_panel_rows, n_g8] scale
    float * ow;      // [k_panel_rows, 2 * n_g8] offset per group (Sub16: per half-group), zero padded
    int16_t * sub;   // [k_panel_rows, n_g, 16] K-quants only: per-half integer scales, 8 lanes each
    int64_t n_g;
    int64_t n_g8;
};

inline size_t panel_bytes(int64_t n_g) {
    const size_t n_g8 = size_t(round8(n_g));
    return size_t(k_panel_rows) * (size_t(n_g) * 32 + n_g8 * 4 + 2 * n_g8 * 4 + size_t(n_g) * 32);
}

inline Panel panel_at(void * mem, int64_t n_g) {
    Panel p;
    p.n_g = n_g;
    p.n_g8 = round8(n_g);
    auto * b = static_cast<uint8_t *>(mem);
    p.w = b;
    b += k_panel_rows * n_g * 32;
    p.sw = reinterpret_cast<float *>(b);
    b += k_panel_rows * p.n_g8 * 4;
    p.ow = reinterpret_cast<float *>(b);
    b += k_panel_rows * 2 * p.n_g8 * 4;
    p.sub = reinterpret_cast<int16_t *>(b);
    return p;
}

} // namespace moesh::cpu::quant
#endif // MOESH_QUANT_KERNELS_SHARED

HWY_BEFORE_NAMESPACE();
namespace moesh::cpu {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using namespace moesh::cpu::quant;

#undef MOESH_QK_AVX2
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
#define MOESH_QK_AVX2 1
#else
#define MOESH_QK_AVX2 0
#endif

HWY_INLINE uint16_t load_u16(const uint8_t * p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// fp16 bits -> float, exactly.
HWY_INLINE float f16_to_f32(uint16_t h) {
#if MOESH_QK_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    uint32_t bits;
    float f;
    if (em >= 0x7c00u) {
        bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13);   // inf / NaN
        std::memcpy(&f, &bits, sizeof f);
        return f;
    }
    bits = em << 13;
    std::memcpy(&f, &bits, sizeof f);
    f *= 0x1p112f;   // rebias the exponent; exact, subnormals included
    return sign ? -f : f;
#endif
}

#if !MOESH_QK_AVX2
// out[i] = the fp16 at p + i * stride, for i < n.
HWY_INLINE void f16_scales(const uint8_t * p, size_t stride, int64_t n, float * out) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = f16_to_f32(load_u16(p + size_t(i) * stride));
    }
}
#endif

// ---- weight types ----
// Each type offers, for groups of 32 weights of one row (file bytes, as is):
//   scales(row, g0, n, ...): the float scale (and offset) of groups
//       g0 .. g0 + n - 1 (n <= 8; K-quants: g0 a multiple of 8 and n = 8),
//       in registers (AVX2: Sc) or into memory (other targets, 32-value types)
//   K-quants: panel_scales(row, g0, sw, ow, sub): a super-block's d, offsets
//       and integer sub-scales, for the panel of several tokens (all targets)
//   AVX2: group2(row, g, w0, w1) -> groups g, g + 1 as bytes in registers
//       (32-value types also group(row, g), for an odd last group)
//   other targets: bytes2 / bytes, the same into memory

#if MOESH_QK_AVX2
HWY_INLINE __m256i load256(const uint8_t * p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }

// Low nibbles of qs[0..16) then the high ones, as 32 bytes.
HWY_INLINE __m256i nibbles16(const uint8_t * qs) {
    const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)));
    const __m256i v = _mm256_srlv_epi32(q, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

// Scales of up to 8 groups, in registers: sw, ow (offsets per group, or per
// half-group for Q6_K: ow then ow_hi) and, for Q6_K, its 16 int8 scales
// widened to int16 (see sub_of).
struct Sc {
    __m256 sw, ow, ow_hi;
    __m256i sc16;
};

// The fp16 at p + i * stride for i < n (n <= 8; lanes past n are 0), as floats.
// Built in a register: scalar stores read back as a vector would stall.
HWY_INLINE __m256 f16x8(const uint8_t * p, size_t stride, int64_t n) {
    if (n == 8) {
        __m128i h = _mm_cvtsi32_si128(load_u16(p));
        h = _mm_insert_epi16(h, load_u16(p + stride), 1);
        h = _mm_insert_epi16(h, load_u16(p + 2 * stride), 2);
        h = _mm_insert_epi16(h, load_u16(p + 3 * stride), 3);
        h = _mm_insert_epi16(h, load_u16(p + 4 * stride), 4);
        h = _mm_insert_epi16(h, load_u16(p + 5 * stride), 5);
        h = _mm_insert_epi16(h, load_u16(p + 6 * stride), 6);
        h = _mm_insert_epi16(h, load_u16(p + 7 * stride), 7);
        return _mm256_cvtph_ps(h);
    }
    HWY_ALIGN uint16_t h[8] = {};
    for (int64_t i = 0; i < n; ++i) {
        h[i] = load_u16(p + size_t(i) * stride);
    }
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i *>(h)));
}

// Q6_K's per-half scales of group g as 16 int16: sc[2g] in the low 8, sc[2g + 1] in the high 8.
HWY_INLINE __m256i sub_of(__m256i sc16, int64_t g) {
    const __m256i pair = _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(int(g)));   // (sc[2g], sc[2g+1]) everywhere
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
                                          2, 3, 2, 3, 2, 3);
    return _mm256_shuffle_epi8(pair, pick);
}
#else
HWY_INLINE void nibbles16(const uint8_t * HWY_RESTRICT qs, uint8_t * HWY_RESTRICT w) {
    for (int j = 0; j < 16; ++j) {
        w[j] = qs[j] & 0x0f;
        w[j + 16] = qs[j] >> 4;
    }
}
#endif

struct TQ8_0 {
    static constexpr int32_t type = MOESH_DTYPE_Q8_0;
    static constexpr Kind kind = Kind::Signed;
    static constexpr int64_t block_elems = 32;
    static constexpr size_t block_bytes = 34;
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, Sc & s) {
        s.sw = f16x8(row + g0 * 34, 34, n);
    }
    static HWY_INLINE __m256i group(const uint8_t * row, int64_t g) { return load256(row + g * 34 + 2); }
#else
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, float * sw, float *, int16_t *) {
        f16_scales(row + g0 * 34, 34, n, sw);
    }
    static HWY_INLINE void bytes(const uint8_t * row, int64_t g, uint8_t * w) { std::memcpy(w, row + g * 34 + 2, 32); }
#endif
};

struct TQ4_0 {
    static constexpr int32_t type = MOESH_DTYPE_Q4_0;
    static constexpr Kind kind = Kind::Unsigned;
    static constexpr int64_t block_elems = 32;
    static constexpr size_t block_bytes = 18;
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, Sc & s) {
        s.sw = f16x8(row + g0 * 18, 18, n);
        s.ow = _mm256_mul_ps(s.sw, _mm256_set1_ps(-8.0f));
    }
    static HWY_INLINE __m256i group(const uint8_t * row, int64_t g) { return nibbles16(row + g * 18 + 2); }
#else
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, float * sw, float * ow, int16_t *) {
        f16_scales(row + g0 * 18, 18, n, sw);
        for (int64_t i = 0; i < n; ++i) {
            ow[i] = -8.0f * sw[i];
        }
    }
    static HWY_INLINE void bytes(const uint8_t * row, int64_t g, uint8_t * w) { nibbles16(row + g * 18 + 2, w); }
#endif
};

struct TQ4_1 {
    static constexpr Kind kind = Kind::Unsigned;
    static constexpr int64_t block_elems = 32;
    static constexpr size_t block_bytes = 20;
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, Sc & s) {
        s.sw = f16x8(row + g0 * 20, 20, n);
        s.ow = f16x8(row + g0 * 20 + 2, 20, n);
    }
    static HWY_INLINE __m256i group(const uint8_t * row, int64_t g) { return nibbles16(row + g * 20 + 4); }
#else
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t n, float * sw, float * ow, int16_t *) {
        f16_scales(row + g0 * 20, 20, n, sw);
        f16_scales(row + g0 * 20 + 2, 20, n, ow);
    }
    static HWY_INLINE void bytes(const uint8_t * row, int64_t g, uint8_t * w) { nibbles16(row + g * 20 + 4, w); }
#endif
};

// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K super-block.
HWY_INLINE void k_scales_mins(const uint8_t * s /* [12] */, int * sc, int * mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

// For the panel of several tokens: sw = d, ow = -dmin * mn and integer
// sub-scales sc (16 lanes each) for the 8 groups of the super-block at b.
HWY_INLINE void k_panel_scales(const uint8_t * b, float * sw, float * ow, int16_t * sub) {
    const float d = f16_to_f32(load_u16(b));
    const float dmin = f16_to_f32(load_u16(b + 2));
    int sc[8], mn[8];
    k_scales_mins(b + 4, sc, mn);
    for (int j = 0; j < 8; ++j) {
        sw[j] = d;
        ow[j] = -dmin * float(mn[j]);
        std::fill(sub + 16 * j, sub + 16 * j + 16, int16_t(sc[j]));
    }
}

#if MOESH_QK_AVX2
// k_scales_mins in registers: the 8 scales as int16 in both 128-bit halves (for k_pick_scale),
// the mins as floats.
// Bytes (2g, 2g + 1) in every int16 lane: _mm256_shuffle_epi8 of the 8 scales (in both halves)
// with it puts group g's scale in every lane, one shuffle per group.
alignas(32) constexpr int16_t k_pick_scale[8][16] = {
#define MOESH_PICK(g) {int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), \
                       int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), \
                       int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), \
                       int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g), int16_t(0x0100 + 0x0202 * g)}
    MOESH_PICK(0), MOESH_PICK(1), MOESH_PICK(2), MOESH_PICK(3), MOESH_PICK(4), MOESH_PICK(5), MOESH_PICK(6), MOESH_PICK(7)
#undef MOESH_PICK
};

HWY_INLINE void k_scales_mins_v(const uint8_t * s /* [12] */, __m256i & sc_both, __m256 & mn) {
    uint32_t w[3];
    std::memcpy(w, s, sizeof w);
    const uint32_t sc_lo = w[0] & 0x3f3f3f3fu;
    const uint32_t mn_lo = w[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (w[2] & 0x0f0f0f0fu) | ((w[0] >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((w[2] >> 4) & 0x0f0f0f0fu) | ((w[1] >> 2) & 0x30303030u);
    const __m128i sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(int64_t(uint64_t(sc_lo) | (uint64_t(sc_hi) << 32))));
    sc_both = _mm256_broadcastsi128_si256(sc);
    mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(uint64_t(mn_lo) | (uint64_t(mn_hi) << 32)))));
}

// The decode scales d * sc and offsets -dmin * mn of a super-block's 8 groups,
// in registers: the 12 bytes as three u32, each byte's fields moved into place
// with shifts and masks (as k_scales_mins).
HWY_INLINE void k_group_scales_v(const uint8_t * b, Sc & s) {
    uint32_t w[3];
    std::memcpy(w, b + 4, sizeof w);
    const uint32_t sc_lo = w[0] & 0x3f3f3f3fu;
    const uint32_t mn_lo = w[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (w[2] & 0x0f0f0f0fu) | ((w[0] >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((w[2] >> 4) & 0x0f0f0f0fu) | ((w[1] >> 2) & 0x30303030u);
    auto widen = [](uint32_t lo, uint32_t hi) {
        const __m128i v = _mm_cvtsi64_si128(int64_t(uint64_t(lo) | (uint64_t(hi) << 32)));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    };
    s.sw = _mm256_mul_ps(widen(sc_lo, sc_hi), _mm256_set1_ps(f16_to_f32(load_u16(b))));
    s.ow = _mm256_mul_ps(widen(mn_lo, mn_hi), _mm256_set1_ps(-f16_to_f32(load_u16(b + 2))));
}
#endif

// Q4_K: groups 2k and 2k + 1 of a super-block are the low and high nibbles of qs[32k .. 32k + 32).
struct TQ4_K {
    static constexpr Kind kind = Kind::Unsigned;
    static constexpr int64_t block_elems = 256;
    static constexpr size_t block_bytes = 144;
    static HWY_INLINE void panel_scales(const uint8_t * row, int64_t g0, float * sw, float * ow, int16_t * sub) {
        k_panel_scales(row + (g0 / 8) * 144, sw, ow, sub);
    }
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t, Sc & s) {
        k_group_scales_v(row + (g0 / 8) * 144, s);
    }
    static HWY_INLINE void group2(const uint8_t * row, int64_t g, __m256i & w0, __m256i & w1) {
        const __m256i q = load256(row + (g / 8) * 144 + 16 + 16 * (g % 8));
        const __m256i m = _mm256_set1_epi8(0x0f);
        w0 = _mm256_and_si256(q, m);
        w1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
    }
#else
    static HWY_INLINE void bytes2(const uint8_t * row, int64_t g, uint8_t * w0, uint8_t * w1) {
        const uint8_t * q = row + (g / 8) * 144 + 16 + 16 * (g % 8);
        for (int l = 0; l < 32; ++l) {
            w0[l] = q[l] & 0x0f;
            w1[l] = q[l] >> 4;
        }
    }
#endif
};

// Q5_K: as Q4_K, plus the fifth bit of group j in bit j of qh[l].
struct TQ5_K {
    static constexpr Kind kind = Kind::Unsigned;
    static constexpr int64_t block_elems = 256;
    static constexpr size_t block_bytes = 176;
    static HWY_INLINE void panel_scales(const uint8_t * row, int64_t g0, float * sw, float * ow, int16_t * sub) {
        k_panel_scales(row + (g0 / 8) * 176, sw, ow, sub);
    }
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t, Sc & s) {
        k_group_scales_v(row + (g0 / 8) * 176, s);
    }
    static HWY_INLINE void group2(const uint8_t * row, int64_t g, __m256i & w0, __m256i & w1) {
        const uint8_t * b = row + (g / 8) * 176;
        const int j = int(g % 8);
        const __m256i q = load256(b + 48 + 16 * j);
        const __m256i h = load256(b + 16);
        const __m256i m = _mm256_set1_epi8(0x0f);
        const __m256i b4 = _mm256_set1_epi8(0x10);
        const __m256i bit0 = _mm256_set1_epi8(char(1 << j));
        const __m256i bit1 = _mm256_set1_epi8(char(2 << j));
        w0 = _mm256_or_si256(_mm256_and_si256(q, m),
                             _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit0), bit0), b4));
        w1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m),
                             _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit1), bit1), b4));
    }
#else
    static HWY_INLINE void bytes2(const uint8_t * row, int64_t g, uint8_t * w0, uint8_t * w1) {
        const uint8_t * b = row + (g / 8) * 176;
        const int j = int(g % 8);
        const uint8_t * q = b + 48 + 16 * j;
        for (int l = 0; l < 32; ++l) {
            w0[l] = uint8_t((q[l] & 0x0f) | (((b[16 + l] >> j) & 1) << 4));
            w1[l] = uint8_t((q[l] >> 4) | (((b[16 + l] >> (j + 1)) & 1) << 4));
        }
    }
#endif
};

// Q6_K: group 4h + r (h = half, r 0..3) takes its low 4 bits from ql[64h + 32 (r % 2) ..]
// (low nibbles for r < 2, high for r >= 2) and its top 2 bits from bits 2r of qh[32h ..].
struct TQ6_K {
    static constexpr Kind kind = Kind::Sub16;
    static constexpr int64_t block_elems = 256;
    static constexpr size_t block_bytes = 210;
    static HWY_INLINE void panel_scales(const uint8_t * row, int64_t g0, float * sw, float * ow, int16_t * sub) {
        const uint8_t * b = row + (g0 / 8) * 210;
        const auto * sc = reinterpret_cast<const int8_t *>(b + 192);   // [16]
        const float d = f16_to_f32(load_u16(b + 208));
        for (int g = 0; g < 8; ++g) {
            sw[g] = d;
            for (int l = 0; l < 8; ++l) {
                sub[16 * g + l] = sc[2 * g];
                sub[16 * g + 8 + l] = sc[2 * g + 1];
            }
        }
        for (int k = 0; k < 16; ++k) {
            ow[k] = -32.0f * d * float(sc[k]);
        }
    }
#if MOESH_QK_AVX2
    static HWY_INLINE void scales(const uint8_t * row, int64_t g0, int64_t, Sc & s) {
        const uint8_t * b = row + (g0 / 8) * 210;
        const float d = f16_to_f32(load_u16(b + 208));
        const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i *>(b + 192));   // int8 [16]
        s.sw = _mm256_set1_ps(d);
        s.sc16 = _mm256_cvtepi8_epi16(sc);
        const __m256 o = _mm256_set1_ps(-32.0f * d);
        s.ow = _mm256_mul_ps(o, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
        s.ow_hi = _mm256_mul_ps(o, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
    }
    static HWY_INLINE void group2(const uint8_t * row, int64_t g, __m256i & w0, __m256i & w1) {
        const uint8_t * b = row + (g / 8) * 210;
        const int h = int(g % 8) / 4;
        const int r = int(g % 4);   // 0 or 2
        const __m256i l0 = load256(b + 64 * h);
        const __m256i l1 = load256(b + 64 * h + 32);
        const __m256i hb = _mm256_srli_epi16(load256(b + 128 + 32 * h), 2 * r);
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        const __m256i lo0 = r == 0 ? _mm256_and_si256(l0, m4) : _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4);
        const __m256i lo1 = r == 0 ? _mm256_and_si256(l1, m4) : _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4);
        // Masking before each 16-bit shift keeps bits from crossing bytes.
        w0 = _mm256_or_si256(lo0, _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x03)), 4));
        w1 = _mm256_or_si256(lo1, _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x0c)), 2));
    }
#else
    static HWY_INLINE void bytes2(const uint8_t * row, int64_t g, uint8_t * w0, uint8_t * w1) {
        const uint8_t * b = row + (g / 8) * 210;
        const int h = int(g % 8) / 4;
        const int r = int(g % 4);
        for (int l = 0; l < 32; ++l) {
            const int high = b[128 + 32 * h + l] >> (2 * r);
            w0[l] = uint8_t(((b[64 * h + l] >> (2 * r)) & 0x0f) | ((high & 3) << 4));
            w1[l] = uint8_t(((b[64 * h + 32 + l] >> (2 * r)) & 0x0f) | ((high & 0x0c) << 2));
        }
    }
#endif
};

#if MOESH_QK_AVX2
template <class Ty>
HWY_INLINE void group2(const uint8_t * row, int64_t g, __m256i & w0, __m256i & w1) {
    if constexpr (Ty::block_elems == 32) {
        w0 = Ty::group(row, g);
        w1 = Ty::group(row, g + 1);
    } else {
        Ty::group2(row, g, w0, w1);
    }
}
#endif

// Groups g and g + 1 (or g alone when one is false) as bytes at w0, w1.
template <class Ty>
HWY_INLINE void group_bytes(const uint8_t * row, int64_t g, bool two, uint8_t * w0, uint8_t * w1) {
#if MOESH_QK_AVX2
    if (two) {
        __m256i a, b;
        group2<Ty>(row, g, a, b);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(w0), a);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(w1), b);
    } else if constexpr (Ty::block_elems == 32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(w0), Ty::group(row, g));
    }
#else
    if constexpr (Ty::block_elems == 32) {
        Ty::bytes(row, g, w0);
        if (two) {
            Ty::bytes(row, g + 1, w1);
        }
    } else {
        Ty::bytes2(row, g, w0, w1);
    }
#endif
}

// Groups [g0, g0 + p.n_g) of one weight row into panel row r.
template <class Ty>
void unpack(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    uint8_t * w = p.w + r * p.n_g * 32;   // [n_g, 32]
    float * ow = p.ow + r * 2 * p.n_g8;
    for (int64_t c = 0; c < p.n_g; c += 8) {
        const int64_t n = std::min<int64_t>(8, p.n_g - c);
        if constexpr (Ty::block_elems == 256) {
            Ty::panel_scales(row, g0 + c, p.sw + r * p.n_g8 + c, ow + (Ty::kind == Kind::Sub16 ? 2 * c : c),
                             p.sub + (r * p.n_g + c) * 16);
        } else {
#if MOESH_QK_AVX2
        // 8 lanes fit: c + 8 <= n_g8.
        Sc sc;
        Ty::scales(row, g0 + c, n, sc);
        _mm256_storeu_ps(p.sw + r * p.n_g8 + c, sc.sw);
        if constexpr (Ty::kind == Kind::Unsigned) {
            _mm256_storeu_ps(ow + c, sc.ow);
        }
#else
        Ty::scales(row, g0 + c, n, p.sw + r * p.n_g8 + c, ow + c, nullptr);
#endif
        }
        for (int64_t g = 0; g < n; g += 2) {
            group_bytes<Ty>(row, g0 + c + g, g + 1 < n, w + (c + g) * 32, w + (c + g + 1) * 32);
        }
    }
    if (Ty::kind == Kind::Unsigned) {
        std::fill(ow + p.n_g, ow + p.n_g8, 0.0f);
    }
}

// ---- the dot kernel ----

// One token's quantized activations.
struct TokenActs {
    const int8_t * q;   // [n_g, 32]
    const float * d;    // [n_g]
    const float * s;    // [n_g8] s32, or [2 * n_g8] s16 for Sub16
};

HWY_INLINE TokenActs token_acts(const QuantActs & a, int64_t t, Kind kind) {
    return {a.q + t * a.n, a.d + t * a.ng8, kind == Kind::Sub16 ? a.s16 + t * 2 * a.ng8 : a.s32 + t * a.ng8};
}

#if MOESH_QK_AVX2
template <int NT, Kind K>
HWY_INLINE void tile_super(const Panel & p, int64_t r0, const TokenActs * x, float * HWY_RESTRICT acc) {
    const int64_t n_g = p.n_g;
    const uint8_t * w0 = p.w + r0 * n_g * 32;
    const float * sw0 = p.sw + r0 * p.n_g8;
    const int16_t * sub0 = p.sub + r0 * n_g * 16;
    __m256 a[k_tile_rows][NT];
    for (int r = 0; r < k_tile_rows; ++r) {
        for (int t = 0; t < NT; ++t) {
            a[r][t] = _mm256_setzero_ps();
        }
    }
    for (int64_t sb = 0; sb < n_g; sb += 8) {
        __m256i ai[k_tile_rows][NT];
        for (int r = 0; r < k_tile_rows; ++r) {
            for (int t = 0; t < NT; ++t) {
                ai[r][t] = _mm256_setzero_si256();
            }
        }
        for (int64_t g = sb; g < sb + 8; ++g) {
            __m256i xq[NT];
            for (int t = 0; t < NT; ++t) {
                xq[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[t].q + 32 * g));
            }
            for (int r = 0; r < k_tile_rows; ++r) {
                const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w0 + (r * n_g + g) * 32));
                const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(sub0 + (r * n_g + g) * 16));
                for (int t = 0; t < NT; ++t) {
                    ai[r][t] = _mm256_add_epi32(ai[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq[t]), m));
                }
            }
        }
        const float * ow0 = p.ow + r0 * 2 * p.n_g8;
        for (int r = 0; r < k_tile_rows; ++r) {
            const __m256 s = _mm256_broadcast_ss(sw0 + r * p.n_g8 + sb);
            for (int t = 0; t < NT; ++t) {
                a[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[r][t]),
                                          _mm256_mul_ps(s, _mm256_broadcast_ss(x[t].d + sb)), a[r][t]);
                // the super-block's offsets right after it, as decode_tile adds them
                const float * ow = ow0 + r * 2 * p.n_g8;
                if constexpr (K == Kind::Unsigned) {
                    a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(ow + sb), _mm256_loadu_ps(x[t].s + sb), a[r][t]);
                } else if constexpr (K == Kind::Sub16) {
                    a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(ow + 2 * sb), _mm256_loadu_ps(x[t].s + 2 * sb), a[r][t]);
                    a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(ow + 2 * sb + 8), _mm256_loadu_ps(x[t].s + 2 * sb + 8), a[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < k_tile_rows; ++r) {
        for (int t = 0; t < NT; ++t) {
            _mm256_storeu_ps(acc + (r * NT + t) * 8, a[r][t]);
        }
    }
}
#endif

// acc[(r * NT + t) * 8 + lane] = lanes of (panel row r0 + r) . (token t), for
// r < 4 and t < NT; the row's dot product is the sum of its 8 lanes. Super:
// K-quant panels (sw = d, integer sub-scales in sub, activations with one
// scale per 256), whose 8 groups of a super-block are summed in int32 and
// scaled to float once.
template <int NT, Kind K, bool Super>
HWY_INLINE void tile(const Panel & p, int64_t r0, const TokenActs * x, float * HWY_RESTRICT acc) {
    static_assert(Super || K != Kind::Sub16, "half-group offsets only come with super-blocks (tile_super)");
    const int64_t n_g = p.n_g;
#if MOESH_QK_AVX2
    if constexpr (Super) {
        tile_super<NT, K>(p, r0, x, acc);
        return;
    }
    __m256 a[k_tile_rows][NT];
    for (int r = 0; r < k_tile_rows; ++r) {
        for (int t = 0; t < NT; ++t) {
            a[r][t] = _mm256_setzero_ps();
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t * w0 = p.w + r0 * n_g * 32;
    const float * sw0 = p.sw + r0 * p.n_g8;
    for (int64_t g = 0; g < n_g; ++g) {
        __m256i xq[NT];
        __m256 xd[NT];
        for (int t = 0; t < NT; ++t) {
            xq[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[t].q + 32 * g));
            xd[t] = _mm256_broadcast_ss(x[t].d + g);
        }
        for (int r = 0; r < k_tile_rows; ++r) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w0 + (r * n_g + g) * 32));
            const __m256 s = _mm256_broadcast_ss(sw0 + r * p.n_g8 + g);
            const __m256i m = ones;
            // maddubs takes unsigned x signed bytes; Q8_0's signs move to the activations.
            const __m256i wu = K == Kind::Signed ? _mm256_sign_epi8(w, w) : w;
            for (int t = 0; t < NT; ++t) {
                const __m256i xs = K == Kind::Signed ? _mm256_sign_epi8(xq[t], w) : xq[t];
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), m);
                a[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, xd[t]), a[r][t]);
            }
        }
        if constexpr (K == Kind::Unsigned) {
            // Each 8 groups' offsets right after them, in the order decode_tile adds them: a token's
            // dots then have the same bits alone (decode_tile) and batched (here).
            if ((g & 7) == 7 || g + 1 == n_g) {
                const int64_t k = g & ~int64_t(7);
                const float * ow0 = p.ow + r0 * 2 * p.n_g8;
                for (int t = 0; t < NT; ++t) {
                    const __m256 sv = _mm256_loadu_ps(x[t].s + k);
                    for (int r = 0; r < k_tile_rows; ++r) {
                        a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(ow0 + r * 2 * p.n_g8 + k), sv, a[r][t]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < k_tile_rows; ++r) {
        for (int t = 0; t < NT; ++t) {
            _mm256_storeu_ps(acc + (r * NT + t) * 8, a[r][t]);
        }
    }
#else
    for (int r = 0; r < k_tile_rows; ++r) {
        const int64_t pr = r0 + r;
        for (int t = 0; t < NT; ++t) {
            float sum = 0.0f;
            for (int64_t g = 0; g < n_g; ++g) {
                const uint8_t * w = p.w + (pr * n_g + g) * 32;
                const int8_t * q = x[t].q + 32 * g;
                int32_t half[2] = {0, 0};
                for (int j = 0; j < 32; ++j) {
                    const int wv = K == Kind::Signed ? int(int8_t(w[j])) : int(w[j]);
                    half[j / 16] += wv * int(q[j]);
                }
                int32_t dot = half[0] + half[1];
                if constexpr (Super) {
                    const int16_t * sub = p.sub + (pr * n_g + g) * 16;
                    dot = half[0] * sub[0] + half[1] * sub[8];
                }
                sum += float(dot) * (p.sw[pr * p.n_g8 + g] * x[t].d[g]);
            }
            if constexpr (K != Kind::Signed) {
                const int64_t n_off = K == Kind::Sub16 ? 2 * n_g : n_g;
                for (int64_t k = 0; k < n_off; ++k) {
                    sum += p.ow[pr * 2 * p.n_g8 + k] * x[t].s[k];
                }
            }
            std::fill(acc + (r * NT + t) * 8, acc + (r * NT + t + 1) * 8, 0.0f);
            acc[(r * NT + t) * 8] = sum;
        }
    }
#endif
}

HWY_INLINE float lanes_sum(const float * v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#if MOESH_QK_AVX2
// Decode (one token): dots[j] = rows[j] . x for 4 rows, straight from the
// file's bytes: per 8 groups, the rows' scales (times the activation scales)
// go to a small stack buffer, then each group is unpacked in registers and
// multiplied at once; no panel stores.
template <class Ty>
HWY_INLINE void decode_tile(const uint8_t * const * rows, int64_t n_g, const TokenActs & x, float * dots) {
    constexpr Kind K = Ty::kind;
    const size_t chunk_bytes = size_t(8 * 32 / Ty::block_elems) * Ty::block_bytes;
    const size_t row_bytes = size_t(n_g * 32 / Ty::block_elems) * Ty::block_bytes;
    HWY_ALIGN float sw[k_tile_rows][8];   // scale times activation scale, per group
    __m256 ow[k_tile_rows], ow_hi[k_tile_rows];
    __m256i sc16[k_tile_rows];
    __m256 acc[k_tile_rows];
    for (int r = 0; r < k_tile_rows; ++r) {
        acc[r] = _mm256_setzero_ps();
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t c = 0; c < n_g; c += 8) {
        const int64_t n = std::min<int64_t>(8, n_g - c);
        const size_t off = size_t(c * 32 / Ty::block_elems) * Ty::block_bytes;
        if constexpr (Ty::block_elems == 256) {
            // A super-block as tile_super (the batched kernel) does it, so that a token's dots have
            // the same bits alone and batched: its 8 groups summed in int32 with their integer
            // sub-scales, scaled once, then its offsets.
            const __m256 dx = _mm256_broadcast_ss(x.d + c);
            for (int r = 0; r < k_tile_rows; ++r) {
                const size_t ahead = off + k_prefetch_chunks * chunk_bytes;   // as below
                const size_t pf = ahead < row_bytes ? ahead : ahead + (k_tile_rows - 1) * row_bytes;
                for (size_t b = 0; b < chunk_bytes; b += 64) {
                    __builtin_prefetch(reinterpret_cast<const void *>(reinterpret_cast<uintptr_t>(rows[r]) + pf + b), 0, 3);
                }
                // the values panel_scales gives the batched kernel, computed the same way
                float d;
                __m256 ow_lo, ow_hi = _mm256_setzero_ps();
                __m256i sc16;   // the integer scales: sub(g) puts group g's in every lane
                if constexpr (K == Kind::Unsigned) {   // Q4_K, Q5_K: d, dmin, then 6-bit scales and mins
                    const uint8_t * b = rows[r] + off;
                    d = f16_to_f32(load_u16(b));
                    const float dmin = f16_to_f32(load_u16(b + 2));
                    __m256 mn;
                    k_scales_mins_v(b + 4, sc16, mn);
                    ow_lo = _mm256_mul_ps(_mm256_set1_ps(-dmin), mn);
                } else {   // Q6_K: int8 scales per half-group
                    Sc scv;
                    Ty::scales(rows[r], c, n, scv);
                    d = _mm256_cvtss_f32(scv.sw);
                    sc16 = scv.sc16;
                    ow_lo = scv.ow;
                    ow_hi = scv.ow_hi;
                }
                auto sub = [&](int64_t g) {
                    if constexpr (K == Kind::Unsigned)
                        return _mm256_shuffle_epi8(sc16, _mm256_load_si256(reinterpret_cast<const __m256i *>(k_pick_scale[g])));
                    else
                        return sub_of(sc16, g);
                };
                __m256i ai = _mm256_setzero_si256();
                for (int64_t g = 0; g < 8; g += 2) {
                    __m256i w0, w1;
                    group2<Ty>(rows[r], c + g, w0, w1);
                    const __m256i x0 = load256(reinterpret_cast<const uint8_t *>(x.q + 32 * (c + g)));
                    const __m256i x1 = load256(reinterpret_cast<const uint8_t *>(x.q + 32 * (c + g + 1)));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), sub(g)));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), sub(g + 1)));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_mul_ps(_mm256_set1_ps(d), dx), acc[r]);
                if constexpr (K == Kind::Unsigned) {
                    acc[r] = _mm256_fmadd_ps(ow_lo, _mm256_loadu_ps(x.s + c), acc[r]);
                } else {
                    acc[r] = _mm256_fmadd_ps(ow_lo, _mm256_loadu_ps(x.s + 2 * c), acc[r]);
                    acc[r] = _mm256_fmadd_ps(ow_hi, _mm256_loadu_ps(x.s + 2 * c + 8), acc[r]);
                }
            }
            continue;
        }
        const __m256 dx = _mm256_loadu_ps(x.d + c);   // zero past the row
        for (int r = 0; r < k_tile_rows; ++r) {
            // Past the end of its row, each stream prefetches the same place in
            // the next tile's row (the tile's rows are consecutive, and so are
            // the tiles), so a new tile starts with its first lines in flight.
            // Integer arithmetic: the address may lie past the matrix.
            const size_t ahead = off + k_prefetch_chunks * chunk_bytes;
            const size_t pf = ahead < row_bytes ? ahead : ahead + (k_tile_rows - 1) * row_bytes;
            for (size_t b = 0; b < chunk_bytes; b += 64) {
                __builtin_prefetch(reinterpret_cast<const void *>(reinterpret_cast<uintptr_t>(rows[r]) + pf + b), 0, 3);
            }
            Sc sc;
            Ty::scales(rows[r], c, n, sc);
            _mm256_store_ps(sw[r], _mm256_mul_ps(sc.sw, dx));
            ow[r] = sc.ow;
            ow_hi[r] = sc.ow_hi;
            sc16[r] = sc.sc16;
        }
        auto dot = [&](int r, int64_t g, __m256i w, __m256i xq) {
            __m256i m = ones;
            if constexpr (K == Kind::Sub16) {
                m = sub_of(sc16[r], g);
            }
            const __m256i wu = K == Kind::Signed ? _mm256_sign_epi8(w, w) : w;
            const __m256i xs = K == Kind::Signed ? _mm256_sign_epi8(xq, w) : xq;
            const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), m);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(&sw[r][g]), acc[r]);
        };
        int64_t g = 0;
        for (; g + 2 <= n; g += 2) {
            const __m256i x0 = load256(reinterpret_cast<const uint8_t *>(x.q + 32 * (c + g)));
            const __m256i x1 = load256(reinterpret_cast<const uint8_t *>(x.q + 32 * (c + g + 1)));
            for (int r = 0; r < k_tile_rows; ++r) {
                __m256i w0, w1;
                group2<Ty>(rows[r], c + g, w0, w1);
                dot(r, g, w0, x0);
                dot(r, g + 1, w1, x1);
            }
        }
        if constexpr (Ty::block_elems == 32) {
            if (g < n) {
                const __m256i x0 = load256(reinterpret_cast<const uint8_t *>(x.q + 32 * (c + g)));
                for (int r = 0; r < k_tile_rows; ++r) {
                    dot(r, g, Ty::group(rows[r], c + g), x0);
                }
            }
        }
        if constexpr (K == Kind::Unsigned) {
            const __m256 s = _mm256_loadu_ps(x.s + c);   // zero past the row, as ow past n
            for (int r = 0; r < k_tile_rows; ++r) {
                acc[r] = _mm256_fmadd_ps(ow[r], s, acc[r]);
            }
        } else if constexpr (K == Kind::Sub16) {
            const __m256 s0 = _mm256_loadu_ps(x.s + 2 * c);
            const __m256 s1 = _mm256_loadu_ps(x.s + 2 * c + 8);
            for (int r = 0; r < k_tile_rows; ++r) {
                acc[r] = _mm256_fmadd_ps(ow[r], s0, acc[r]);
                acc[r] = _mm256_fmadd_ps(ow_hi[r], s1, acc[r]);
            }
        }
    }
    for (int r = 0; r < k_tile_rows; ++r) {
        HWY_ALIGN float v[8];
        _mm256_store_ps(v, acc[r]);
        dots[r] = lanes_sum(v);
    }
}
#endif

// The panel's n_rows rows (a multiple of 4) times tokens [t0, t1) of xq;
// out(t, dots) receives each token's n_rows dots.
template <Kind K, bool Super, class Out>
HWY_INLINE void panel_tokens(const Panel & p, int64_t n_rows, const QuantActs & xq, int64_t t0, int64_t t1,
                             Out && out) {
    const int64_t n_tiles = n_rows / k_tile_rows;
    HWY_ALIGN float acc[k_panel_rows * 2 * 8];   // [n_rows, NT, 8]
    HWY_ALIGN float dots[2][k_panel_rows];
    int64_t t = t0;
    for (; t + 2 <= t1; t += 2) {
        const TokenActs x[2] = {token_acts(xq, t, K), token_acts(xq, t + 1, K)};
        for (int64_t tr = 0; tr < n_tiles; ++tr) {
            tile<2, K, Super>(p, tr * k_tile_rows, x, acc + tr * k_tile_rows * 2 * 8);
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            dots[0][j] = lanes_sum(acc + (2 * j) * 8);
            dots[1][j] = lanes_sum(acc + (2 * j + 1) * 8);
        }
        out(t, dots[0]);
        out(t + 1, dots[1]);
    }
    if (t < t1) {
        const TokenActs x = token_acts(xq, t, K);
        for (int64_t tr = 0; tr < n_tiles; ++tr) {
            tile<1, K, Super>(p, tr * k_tile_rows, &x, acc + tr * k_tile_rows * 8);
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            dots[0][j] = lanes_sum(acc + j * 8);
        }
        out(t, dots[0]);
    }
}

// dots[t, j] = rows[j] . x[t] for n_rows (4 or 8) weight rows of n_in values
// and tokens [t0, t1) of xq; out(t, dots) receives each token's n_rows dots.
template <class Ty, class Out>
HWY_INLINE void row_block(const uint8_t * const * rows, int64_t n_rows, int64_t n_in, const QuantActs & xq,
                          int64_t t0, int64_t t1, void * mem, Out && out) {
    constexpr Kind K = Ty::kind;
    const int64_t n_g = n_in / 32;
#if MOESH_QK_AVX2
    if (t1 - t0 == 1) {
        HWY_ALIGN float dots[k_panel_rows];
        const TokenActs x = token_acts(xq, t0, K);
        for (int64_t tr = 0; tr < n_rows / k_tile_rows; ++tr) {
            decode_tile<Ty>(rows + tr * k_tile_rows, n_g, x, dots + tr * k_tile_rows);
        }
        out(t0, dots);
        return;
    }
#endif
    // Unpack whole rows once, then every token pair reads them.
    const Panel p = panel_at(mem, n_g);
    for (int64_t r = 0; r < n_rows; ++r) {
        unpack<Ty>(rows[r], 0, p, r);
    }
    panel_tokens<K, Ty::block_elems == 256>(p, n_rows, xq, t0, t1, out);
}

// ---- packed weights ----

// Row j of a packed tile into panel row r.
template <class Ty>
HWY_INLINE void unpack_packed(const uint8_t * tile, int64_t j, const Panel & p, int64_t r) {
    constexpr size_t gb = pack_group_bytes(Ty::type);
    uint8_t * w = p.w + r * p.n_g * 32;   // [n_g, 32]
    float * sw = p.sw + r * p.n_g8;
    float * ow = p.ow + r * 2 * p.n_g8;
    for (int64_t g = 0; g < p.n_g; ++g) {
        const uint8_t * gp = tile + size_t(g) * gb;
        sw[g] = f16_to_f32(load_u16(gp + 2 * j));
        if constexpr (Ty::kind == Kind::Unsigned) {
            ow[g] = -8.0f * sw[g];
            HWY_ALIGN uint8_t qs[16];
            for (int c = 0; c < 4; ++c) {
                std::memcpy(qs + 4 * c, gp + 16 + 32 * c + 4 * j, 4);
            }
#if MOESH_QK_AVX2
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(w + g * 32), nibbles16(qs));
#else
            nibbles16(qs, w + g * 32);
#endif
        } else {
            for (int c = 0; c < 8; ++c) {
                std::memcpy(w + g * 32 + 4 * c, gp + 16 + 32 * c + 4 * j, 4);
            }
        }
    }
    if constexpr (Ty::kind == Kind::Unsigned) {
        std::fill(ow + p.n_g, ow + p.n_g8, 0.0f);
    }
}

#if MOESH_QK_AVX2
HWY_INLINE __m256i bcast4(const int8_t * p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

// NT tokens on a packed tile, straight from it: out[t * out_stride + j] =
// row j . x[t]. Each group's weights are unpacked into registers once and
// multiplied with every token: Q4_0's nibbles as they are (8 maddubs pair
// sums, each <= 2 * 15 * 127, add up within int16), Q8_0's as |w| with the
// signs moved to each token's activations (maddubs takes unsigned x signed).
template <class Ty, int NT>
HWY_INLINE void gemm_packed(const uint8_t * tile, int64_t n_g, const TokenActs * x, float * out, int64_t out_stride) {
    constexpr size_t gb = pack_group_bytes(Ty::type);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) {
        acc[t] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < n_g; ++g) {
        const uint8_t * gp = tile + size_t(g) * gb;
        const uint8_t * q = gp + 16;
        {
            // The tile streams from memory (decode; a serving step's few tokens per
            // expert): the hardware prefetcher alone leaves ~15% on the table at one
            // token and ~6% at four. Integer arithmetic: the address may lie past the
            // matrix (tiles are consecutive, so this runs into the next).
            for (size_t b = 0; b < gb; b += 64) {
                __builtin_prefetch(
                    reinterpret_cast<const void *>(reinterpret_cast<uintptr_t>(gp) + k_pack_prefetch_groups * gb + b), 0,
                    3);
            }
        }
        const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(gp)));
        __m256i w[8];   // Q4_0: w[c] values 4c..4c+3 of the 8 rows, w[4 + c] values 16+4c..; Q8_0: |w| of piece c
        if constexpr (Ty::kind == Kind::Unsigned) {
            for (int c = 0; c < 4; ++c) {
                const __m256i l = load256(q + 32 * c);
                w[c] = _mm256_and_si256(l, m4);
                w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
            }
        } else {
            for (int c = 0; c < 8; ++c) {
                const __m256i l = load256(q + 32 * c);
                w[c] = _mm256_sign_epi8(l, l);
            }
        }
        for (int t = 0; t < NT; ++t) {
            const int8_t * xq = x[t].q + 32 * g;
            if constexpr (Ty::kind == Kind::Unsigned) {
                __m256i s0 = _mm256_maddubs_epi16(w[0], bcast4(xq));
                __m256i s1 = _mm256_maddubs_epi16(w[4], bcast4(xq + 16));
                for (int c = 1; c < 4; ++c) {
                    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(w[c], bcast4(xq + 4 * c)));
                    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(w[4 + c], bcast4(xq + 16 + 4 * c)));
                }
                const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones));
                // sw * (dx * sum(nibble * q) - 8 * dx * sum(q)): Q4_0's offset of -8
                const __m256 v = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), _mm256_broadcast_ss(x[t].s + g),
                                                  _mm256_mul_ps(f, _mm256_broadcast_ss(x[t].d + g)));
                acc[t] = _mm256_fmadd_ps(sw, v, acc[t]);
            } else {
                __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
                for (int c = 0; c < 8; c += 2) {
                    const __m256i xs0 = _mm256_sign_epi8(bcast4(xq + 4 * c), load256(q + 32 * c));
                    const __m256i xs1 = _mm256_sign_epi8(bcast4(xq + 4 * c + 4), load256(q + 32 * c + 32));
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], xs0), ones));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(w[c + 1], xs1), ones));
                }
                const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(sw, _mm256_broadcast_ss(x[t].d + g)), f, acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; ++t) {
        _mm256_storeu_ps(out + t * out_stride, acc[t]);
    }
}

// Q8_0's gemm_packed for several tokens: the group in two halves of 4 loads, so that |w|,
// one int32 sum per token and the NT accumulators fit the 16 AVX2 registers (with all 8 |w|
// live, the accumulators went to the stack every group). Out of line: inlined, it moved the
// Q4_0 kernel's code and cost that 5-8%. The halves ran 14% faster at 128 tokens.
template <int NT>
HWY_NOINLINE void gemm_packed_q8(const uint8_t * tile, int64_t n_g, const TokenActs * x, float * out, int64_t out_stride) {
    constexpr size_t gb = pack_group_bytes(MOESH_DTYPE_Q8_0);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) {
        acc[t] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < n_g; ++g) {
        const uint8_t * gp = tile + size_t(g) * gb;
        const uint8_t * q = gp + 16;
        for (size_t b = 0; b < gb; b += 64) {   // as gemm_packed
            __builtin_prefetch(reinterpret_cast<const void *>(reinterpret_cast<uintptr_t>(gp) + k_pack_prefetch_groups * gb + b),
                               0, 3);
        }
        const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(gp)));
        __m256i s[NT];   // per token, the group's integer dot products
        for (int half = 0; half < 2; ++half) {
            const int c = 4 * half;
            __m256i w[4];   // |w| of loads c..c+3
            for (int k = 0; k < 4; ++k) {
                const __m256i l = load256(q + 32 * (c + k));
                w[k] = _mm256_sign_epi8(l, l);
            }
            for (int t = 0; t < NT; ++t) {
                const int8_t * xq = x[t].q + 32 * g;
                __m256i p16[4];
                for (int k = 0; k < 4; ++k) {
                    const __m256i xs = _mm256_sign_epi8(bcast4(xq + 4 * (c + k)), load256(q + 32 * (c + k)));
                    p16[k] = _mm256_maddubs_epi16(w[k], xs);
                }
                const __m256i p =
                    _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(p16[0], ones), _mm256_madd_epi16(p16[1], ones)),
                                     _mm256_add_epi32(_mm256_madd_epi16(p16[2], ones), _mm256_madd_epi16(p16[3], ones)));
                s[t] = half == 0 ? p : _mm256_add_epi32(s[t], p);
            }
        }
        for (int t = 0; t < NT; ++t) {
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(sw, _mm256_broadcast_ss(x[t].d + g)), _mm256_cvtepi32_ps(s[t]), acc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        _mm256_storeu_ps(out + t * out_stride, acc[t]);
    }
}
#endif

// As row_block, for n_tiles (1 or 2) packed tiles of 8 rows: dots[8 * i + j]
// is row j of tiles[i].
template <class Ty, class Out>
HWY_INLINE void packed_block(const uint8_t * const * tiles, int64_t n_tiles, int64_t n_in, const QuantActs & xq,
                             int64_t t0, int64_t t1, void * mem, Out && out) {
    constexpr Kind K = Ty::kind;
    const int64_t n_g = n_in / 32;
#if MOESH_QK_AVX2
    // Tokens 4 at a time (then 2, then 1: decode) per pass over the tiles.
    constexpr int NT = 4;
    HWY_ALIGN float dots[NT][k_panel_rows];
    auto run = [&](auto nt, int64_t t) {
        constexpr int n = decltype(nt)::value;
        TokenActs x[n];
        for (int k = 0; k < n; ++k) {
            x[k] = token_acts(xq, t + k, K);
        }
        for (int64_t i = 0; i < n_tiles; ++i) {
            if constexpr (Ty::kind == Kind::Unsigned || n == 1) {   // decode keeps the prefetching one-token form
                gemm_packed<Ty, n>(tiles[i], n_g, x, dots[0] + i * k_pack_rows, k_panel_rows);
            } else {
                gemm_packed_q8<n>(tiles[i], n_g, x, dots[0] + i * k_pack_rows, k_panel_rows);
            }
        }
        for (int k = 0; k < n; ++k) {
            out(t + k, dots[k]);
        }
    };
    int64_t t = t0;
    for (; t + NT <= t1; t += NT) {
        run(std::integral_constant<int, NT>{}, t);
    }
    for (; t + 2 <= t1; t += 2) {
        run(std::integral_constant<int, 2>{}, t);
    }
    if (t < t1) {
        run(std::integral_constant<int, 1>{}, t);
    }
    return;
#endif
    // Other targets: unpack the rows into a panel, as for the file's layout.
    const Panel p = panel_at(mem, n_g);
    for (int64_t i = 0; i < n_tiles; ++i) {
        for (int64_t j = 0; j < k_pack_rows; ++j) {
            unpack_packed<Ty>(tiles[i], j, p, i * k_pack_rows + j);
        }
    }
    panel_tokens<K, false>(p, n_tiles * k_pack_rows, xq, t0, t1, out);
}

// f(Ty{}) for the types that are packed (Q4_0, Q8_0); w_type without the flag.
template <class F>
HWY_INLINE void with_packed_type(int32_t w_type, F && f) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0: f(TQ8_0{}); break;
    case MOESH_DTYPE_Q4_0: f(TQ4_0{}); break;
    default: break;
    }
}

// f(Ty{}) with the type traits of w_type (a block type, validated by the caller).
template <class F>
HWY_INLINE void with_type(int32_t w_type, F && f) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0: f(TQ8_0{}); break;
    case MOESH_DTYPE_Q4_0: f(TQ4_0{}); break;
    case MOESH_DTYPE_Q4_1: f(TQ4_1{}); break;
    case MOESH_DTYPE_Q4_K: f(TQ4_K{}); break;
    case MOESH_DTYPE_Q5_K: f(TQ5_K{}); break;
    case MOESH_DTYPE_Q6_K: f(TQ6_K{}); break;
    default: break;
    }
}

// Row r of a weight matrix of rows of n_in values.
template <class Ty>
HWY_INLINE const uint8_t * row_at(const void * w, int64_t r, int64_t n_in) {
    return static_cast<const uint8_t *>(w) + size_t(r) * size_t(n_in / Ty::block_elems) * Ty::block_bytes;
}

// ---- activation quantization ----

// Groups [gb, ge) of rows [r0, r1); gb and ge are multiples of out.scale_groups
// (or ge is the row's last group).
void quantize_groups(const float * x, int64_t x_stride, int64_t r0, int64_t r1, int64_t gb, int64_t ge,
                     const QuantActs & out) {
    // At most 8 lanes, so that a half-group of 16 is whole vectors on every target.
    const hn::CappedTag<float, 8> df;
    const hn::Rebind<int32_t, decltype(df)> di;
    const hn::Rebind<int8_t, decltype(df)> d8;
    const int64_t N = int64_t(hn::Lanes(df));
    const int64_t n_g = out.n / 32;
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t gs = gb; gs < ge; gs += out.scale_groups) {
            const int64_t g_end = std::min(ge, gs + out.scale_groups);
            const float * v0 = x + r * x_stride + 32 * gs;   // [32 * (g_end - gs)]
            // Largest magnitude as an integer max of the bits without sign: ordered
            // like the values, and a NaN (above infinity) is not dropped.
            auto amax_v = hn::Zero(di);
            for (int64_t k = 0; k < 32 * (g_end - gs); k += N) {
                amax_v = hn::Max(amax_v, hn::And(hn::BitCast(di, hn::LoadU(df, v0 + k)), hn::Set(di, 0x7fffffff)));
            }
            const int32_t amax_bits = hn::GetLane(hn::MaxOfLanes(di, amax_v));
            float amax;
            std::memcpy(&amax, &amax_bits, sizeof amax);
            // A NaN or infinity makes d (and so every dot with this block) NaN.
            const bool finite = amax_bits < 0x7f800000;
            const float d = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
            const float inv = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
            // Below ~1e-36 the inverse overflows; those rare blocks divide instead.
            const bool divide = std::isinf(inv) && d != 0.0f;
            const auto id = hn::Set(df, inv);
            const auto vd = hn::Set(df, d);
            for (int64_t g = gs; g < g_end; ++g) {
                const float * v = x + r * x_stride + 32 * g;   // [32]
                int8_t * q = out.q + r * out.n + 32 * g;
                // The half sums stay in registers: a spill to a two-int array that is
                // read back as one 64-bit value stalled store forwarding, and cost
                // more than the rest of this loop.
                auto half_sum = [&](int64_t k0) {
                    auto s = hn::Zero(di);
                    for (int64_t k = k0; k < k0 + 16; k += N) {
                        const auto xv = hn::LoadU(df, v + k);
                        const auto qi = hn::NearestInt(divide ? hn::Div(xv, vd) : hn::Mul(xv, id));
                        s = hn::Add(s, qi);
                        hn::StoreU(hn::DemoteTo(d8, qi), d8, q + k);
                    }
                    return float(hn::GetLane(hn::SumOfLanes(di, s)));
                };
                const float s0 = half_sum(0), s1 = half_sum(16);
                out.d[r * out.ng8 + g] = d;
                out.s32[r * out.ng8 + g] = d * (s0 + s1);
                out.s16[r * 2 * out.ng8 + 2 * g] = d * s0;
                out.s16[r * 2 * out.ng8 + 2 * g + 1] = d * s1;
            }
        }
        if (ge == n_g) {
            std::fill(out.d + r * out.ng8 + n_g, out.d + (r + 1) * out.ng8, 0.0f);
            std::fill(out.s32 + r * out.ng8 + n_g, out.s32 + (r + 1) * out.ng8, 0.0f);
            std::fill(out.s16 + r * 2 * out.ng8 + 2 * n_g, out.s16 + (r + 1) * 2 * out.ng8, 0.0f);
        }
    }
}

void quantize_acts(const float * x, int64_t x_stride, int64_t r0, int64_t r1, const QuantActs & out) {
    quantize_groups(x, x_stride, r0, r1, 0, out.n / 32, out);
}

// ---- ops ----

void quant_matmul_rows(const moesh_matmul_args & a, const QuantActs & xq, int64_t r0, int64_t r1, int64_t t0,
                       int64_t t1, void * panel) {
    if (a.w_type & MOESH_DTYPE_PACKED) {
        const int32_t base = a.w_type & ~MOESH_DTYPE_PACKED;
        const int64_t n_g = a.n_in / 32;
        with_packed_type(base, [&](auto ty) {
            using Ty = decltype(ty);
            for (int64_t r = r0; r < r1; r += k_pack_rows) {   // r0 is a multiple of 8
                const int64_t n_r = std::min(k_pack_rows, r1 - r);
                const uint8_t * tile = packed_tile(a.w, r / k_pack_rows, n_g, pack_group_bytes(base));
                packed_block<Ty>(&tile, 1, a.n_in, xq, t0, t1, panel, [&](int64_t t, const float * dots) {
                    float * y = a.y + t * a.y_stride + r;   // [n_r]
                    for (int64_t j = 0; j < n_r; ++j) {
                        y[j] = dots[j] + (a.bias ? a.bias[r + j] : 0.0f);
                    }
                });
            }
        });
        return;
    }
    with_type(a.w_type, [&](auto ty) {
        using Ty = decltype(ty);
        for (int64_t r = r0; r < r1; r += k_tile_rows) {
            // A short last block repeats its last row; the extra dots are dropped.
            const int64_t n_r = std::min(k_tile_rows, r1 - r);
            const uint8_t * rows[k_tile_rows];
            for (int64_t j = 0; j < k_tile_rows; ++j) {
                rows[j] = row_at<Ty>(a.w, r + std::min(j, n_r - 1), a.n_in);
            }
            row_block<Ty>(rows, k_tile_rows, a.n_in, xq, t0, t1, panel, [&](int64_t t, const float * dots) {
                float * y = a.y + t * a.y_stride + r;   // [n_r]
                for (int64_t j = 0; j < n_r; ++j) {
                    y[j] = dots[j] + (a.bias ? a.bias[r + j] : 0.0f);
                }
            });
        }
    });
}

HWY_INLINE float silu(float x) { return x / (1.0f + std::exp(-x)); }

// out[j] = silu(g[j]) * u[j] for j < n (a multiple of 4), in SIMD: a scalar exp
// per feature cost ~3% of a prefill. exp's argument is capped at 88 (e^88 is
// finite; silu there is -0 either way); a NaN in g still reaches out.
HWY_INLINE void silu_mul(const float * g, const float * u, float * out, int64_t n) {
    const hn::CappedTag<float, 4> d;
    const auto one = hn::Set(d, 1.0f), cap = hn::Set(d, 88.0f);
    for (int64_t j = 0; j < n; j += 4) {
        const auto vg = hn::LoadU(d, g + j);
        const auto e = hn::Exp(d, hn::Min(hn::Neg(vg), cap));
        hn::StoreU(hn::Div(hn::Mul(vg, hn::LoadU(d, u + j)), hn::Add(one, e)), d, out + j);
    }
}

void quant_gate_up_rows(const moesh_expert_ffn_args & a, const QuantActs & xq, int64_t f0, int64_t f1,
                        void * panel, const QuantActs & hq) {
    if (f0 >= f1) {
        return;   // an empty share: another thread writes the padding of hq
    }
    float * h = a.scratch;   // [n_tokens, n_ff]
    if (a.w_type & MOESH_DTYPE_PACKED) {
        // Gate tile in panel rows 0-7, up tile in 8-15 (n_ff and f0 are multiples of 32).
        const int32_t base = a.w_type & ~MOESH_DTYPE_PACKED;
        const int64_t n_g = a.n_embd / 32;
        with_packed_type(base, [&](auto ty) {
            using Ty = decltype(ty);
            for (int64_t f = f0; f < f1; f += k_pack_rows) {
                const uint8_t * tiles[2] = {packed_tile(a.gate, f / k_pack_rows, n_g, pack_group_bytes(base)),
                                            packed_tile(a.up, f / k_pack_rows, n_g, pack_group_bytes(base))};
                packed_block<Ty>(tiles, 2, a.n_embd, xq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
                    silu_mul(dots, dots + k_pack_rows, h + t * a.n_ff + f, k_pack_rows);
                });
            }
        });
        quantize_groups(h, a.n_ff, 0, a.n_tokens, f0 / 32, (f1 + 31) / 32, hq);
        return;
    }
    with_type(a.w_type, [&](auto ty) {
        using Ty = decltype(ty);
        for (int64_t f = f0; f < f1; f += 4) {
            // Gate rows f..f+3 in panel rows 0-3, up rows in 4-7, through one pass over x.
            const int64_t n_r = std::min<int64_t>(4, f1 - f);
            const uint8_t * rows[8];
            for (int64_t j = 0; j < 4; ++j) {
                rows[j] = row_at<Ty>(a.gate, f + std::min(j, n_r - 1), a.n_embd);
                rows[4 + j] = row_at<Ty>(a.up, f + std::min(j, n_r - 1), a.n_embd);
            }
            row_block<Ty>(rows, 8, a.n_embd, xq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
                float * ht = h + t * a.n_ff + f;   // [n_r]
                if (n_r == 4) {
                    silu_mul(dots, dots + 4, ht, 4);
                    return;
                }
                for (int64_t j = 0; j < n_r; ++j) {
                    ht[j] = silu(dots[j]) * dots[4 + j];
                }
            });
        }
    });
    quantize_groups(h, a.n_ff, 0, a.n_tokens, f0 / 32, (f1 + 31) / 32, hq);
}

void quant_down_rows(const moesh_expert_ffn_args & a, const QuantActs & hq, int64_t e0, int64_t e1, void * panel,
                     const int32_t * out_rows) {
    if (a.w_type & MOESH_DTYPE_PACKED) {
        const int32_t base = a.w_type & ~MOESH_DTYPE_PACKED;
        const int64_t n_g = a.n_ff / 32;
        with_packed_type(base, [&](auto ty) {
            using Ty = decltype(ty);
            for (int64_t e = e0; e < e1; e += k_pack_rows) {   // e0 is a multiple of 8
                const int64_t n_r = std::min(k_pack_rows, e1 - e);
                const uint8_t * tile = packed_tile(a.down, e / k_pack_rows, n_g, pack_group_bytes(base));
                packed_block<Ty>(&tile, 1, a.n_ff, hq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
                    const float scale = a.scale ? a.scale[t] : 1.0f;
                    float * out = a.out + (out_rows ? out_rows[t] : t) * a.n_embd + e;   // [n_r]
                    for (int64_t j = 0; j < n_r; ++j) {
                        out[j] += scale * dots[j];
                    }
                });
            }
        });
        return;
    }
    with_type(a.w_type, [&](auto ty) {
        using Ty = decltype(ty);
        for (int64_t e = e0; e < e1; e += k_tile_rows) {
            const int64_t n_r = std::min(k_tile_rows, e1 - e);
            const uint8_t * rows[k_tile_rows];
            for (int64_t j = 0; j < k_tile_rows; ++j) {
                rows[j] = row_at<Ty>(a.down, e + std::min(j, n_r - 1), a.n_ff);
            }
            row_block<Ty>(rows, k_tile_rows, a.n_ff, hq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
                const float scale = a.scale ? a.scale[t] : 1.0f;
                float * out = a.out + (out_rows ? out_rows[t] : t) * a.n_embd + e;   // [n_r]
                for (int64_t j = 0; j < n_r; ++j) {
                    out[j] += scale * dots[j];
                }
            });
        }
    });
}

} // namespace HWY_NAMESPACE
} // namespace moesh::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace moesh::cpu {

HWY_EXPORT(quantize_acts);
HWY_EXPORT(quant_matmul_rows);
HWY_EXPORT(quant_gate_up_rows);
HWY_EXPORT(quant_down_rows);

bool is_quant_type(int32_t w_type) { return quant_block_elems(w_type) != 0; }

int64_t quant_block_elems(int32_t w_type) {
    if (w_type & MOESH_DTYPE_PACKED) {
        return is_packable(w_type & ~MOESH_DTYPE_PACKED) ? MOESH_QK_BLOCK : 0;
    }
    switch (w_type) {
    case MOESH_DTYPE_Q8_0:
    case MOESH_DTYPE_Q4_0:
    case MOESH_DTYPE_Q4_1: return MOESH_QK_BLOCK;
    case MOESH_DTYPE_Q4_K:
    case MOESH_DTYPE_Q5_K:
    case MOESH_DTYPE_Q6_K: return MOESH_QK_K;
    default: return 0;
    }
}

bool is_packable(int32_t w_type) { return quant::pack_group_bytes(w_type) != 0; }

size_t packed_bytes(int32_t w_type, int64_t n_rows, int64_t n_cols) {
    const size_t gb = quant::pack_group_bytes(w_type);
    if (gb == 0 || n_rows <= 0 || n_cols <= 0 || n_cols % 32 != 0) {
        return 0;
    }
    const uint64_t n_tiles = uint64_t(n_rows + quant::k_pack_rows - 1) / quant::k_pack_rows;
    uint64_t n = 0;
    if (__builtin_mul_overflow(n_tiles, uint64_t(n_cols / 32) * gb, &n) || n > SIZE_MAX - quant::k_pack_header_bytes) {
        return 0;
    }
    return size_t(n) + quant::k_pack_header_bytes;
}

void pack_header(int32_t w_type, int64_t n_rows, int64_t n_cols, void * dst) {
    quant::PackHeader h{};
    std::memcpy(h.magic, quant::k_pack_magic, sizeof h.magic);
    h.w_type = w_type;
    h.n_rows = n_rows;
    h.n_cols = n_cols;
    std::memset(dst, 0, quant::k_pack_header_bytes);
    std::memcpy(dst, &h, sizeof h);
}

bool packed_matches(const void * w, int32_t w_type, int64_t n_rows, int64_t n_cols) {
    quant::PackHeader h;
    std::memcpy(&h, w, sizeof h);
    return std::memcmp(h.magic, quant::k_pack_magic, sizeof h.magic) == 0 && h.w_type == w_type &&
           h.n_rows == n_rows && h.n_cols == n_cols;
}

void pack_tiles(int32_t w_type, const void * w, int64_t n_rows, int64_t n_cols, void * dst, int64_t tile0,
                int64_t tile1) {
    const size_t gb = quant::pack_group_bytes(w_type);
    const bool q4 = w_type == MOESH_DTYPE_Q4_0;
    const size_t block_bytes = q4 ? 18 : 34;
    const int n_pieces = q4 ? 4 : 8;
    const int64_t n_g = n_cols / 32;
    const size_t row_bytes = size_t(n_g) * block_bytes;
    for (int64_t t = tile0; t < tile1; ++t) {
        auto * tile = const_cast<uint8_t *>(quant::packed_tile(dst, t, n_g, gb));
        for (int64_t j = 0; j < quant::k_pack_rows; ++j) {
            const int64_t r = t * quant::k_pack_rows + j;
            const uint8_t * row = static_cast<const uint8_t *>(w) + size_t(r) * row_bytes;
            for (int64_t g = 0; g < n_g; ++g) {
                uint8_t * gp = tile + size_t(g) * gb;
                if (r >= n_rows) {   // padding: scale 0 and values 0
                    std::memset(gp + 2 * j, 0, 2);
                    for (int c = 0; c < n_pieces; ++c) {
                        std::memset(gp + 16 + 32 * c + 4 * j, 0, 4);
                    }
                    continue;
                }
                const uint8_t * b = row + size_t(g) * block_bytes;
                std::memcpy(gp + 2 * j, b, 2);
                for (int c = 0; c < n_pieces; ++c) {
                    std::memcpy(gp + 16 + 32 * c + 4 * j, b + 2 + 4 * c, 4);
                }
            }
        }
    }
}

size_t quant_acts_bytes(int64_t n, int64_t n_rows) {
    const size_t ng8 = size_t((n / 32 + 7) / 8 * 8);
    return size_t(n_rows) * (size_t(n) + 4 * ng8 * 4);
}

QuantActs quant_acts_at(void * mem, int64_t n, int64_t n_rows, int64_t scale_block) {
    QuantActs a;
    a.n = n;
    a.scale_groups = scale_block / 32;
    a.ng8 = (n / 32 + 7) / 8 * 8;
    auto * b = static_cast<uint8_t *>(mem);
    a.d = reinterpret_cast<float *>(b);
    b += n_rows * a.ng8 * 4;
    a.s32 = reinterpret_cast<float *>(b);
    b += n_rows * a.ng8 * 4;
    a.s16 = reinterpret_cast<float *>(b);
    b += n_rows * 2 * a.ng8 * 4;
    a.q = reinterpret_cast<int8_t *>(b);
    return a;
}

size_t quant_panel_bytes(int64_t n_in) { return quant::panel_bytes(n_in / 32); }

void quantize_acts(const float * x, int64_t x_stride, int64_t r0, int64_t r1, const QuantActs & out) {
    HWY_DYNAMIC_DISPATCH(quantize_acts)(x, x_stride, r0, r1, out);
}

void quant_matmul_rows(const moesh_matmul_args & a, const QuantActs & xq, int64_t r0, int64_t r1, int64_t t0,
                       int64_t t1, void * panel) {
    HWY_DYNAMIC_DISPATCH(quant_matmul_rows)(a, xq, r0, r1, t0, t1, panel);
}

void quant_gate_up_rows(const moesh_expert_ffn_args & a, const QuantActs & xq, int64_t f0, int64_t f1,
                        void * panel, const QuantActs & hq) {
    HWY_DYNAMIC_DISPATCH(quant_gate_up_rows)(a, xq, f0, f1, panel, hq);
}

void quant_down_rows(const moesh_expert_ffn_args & a, const QuantActs & hq, int64_t e0, int64_t e1, void * panel,
                     const int32_t * out_rows) {
    HWY_DYNAMIC_DISPATCH(quant_down_rows)(a, hq, e0, e1, panel, out_rows);
}

} // namespace moesh::cpu
#endif // HWY_ONCE
