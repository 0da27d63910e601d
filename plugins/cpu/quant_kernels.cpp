// Highway compiles this file once per SIMD target (foreach_target.h re-includes
// it) and HWY_DYNAMIC_DISPATCH picks the best one for the CPU at run time. The
// dot-product kernel and the hot unpackers use AVX2 intrinsics on x86 targets
// that have them (AVX2, AVX-512); other targets take the portable C++ below.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "quant_kernels.cpp"
#include <hwy/foreach_target.h>  // must precede highway.h

#include <hwy/highway.h>

#include "quant_kernels.h"

#if HWY_ARCH_X86
#include <immintrin.h>
#endif

// Target-independent layout of the per-thread panel (compiled once).
#ifndef MOESH_QUANT_KERNELS_SHARED
#define MOESH_QUANT_KERNELS_SHARED
namespace moesh::cpu::quant {

// Weight rows one panel holds: two blocks of 4 (expert gate and up rows side by side).
constexpr int64_t k_panel_rows = 8;
// Rows the dot kernel multiplies at once.
constexpr int64_t k_tile_rows = 4;
// Groups of 32 a single token unpacks at a time: 512 columns of 8 rows stay in L1.
constexpr int64_t k_decode_chunk = 16;
// How far ahead of the chunk being unpacked each row's bytes are prefetched in
// decode (a few chunks: 4-8 row streams, each starting a new page every row).
constexpr int64_t k_prefetch_chunks = 3;

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// What the kernel does with a panel, per weight type.
enum class Kind {
    Unsigned,   // bytes 0..31; value = sw * byte + ow per group of 32 (Q4_0, Q4_1, Q4_K, Q5_K)
    Signed,     // int8; value = sw * byte (Q8_0)
    Sub16,      // bytes 0..63; value = sw * sub[half] * byte + ow16[half] per 16 (Q6_K)
};

// Unpacked rows: for each panel row r and group g (32 weights) of the chunk.
struct Panel {
    uint8_t * w;     // [k_panel_rows, n_g, 32] one byte per weight
    float * sw;      // [k_panel_rows, n_g8] scale
    float * ow;      // [k_panel_rows, 2 * n_g8] offset per group (Sub16: per half-group), zero padded
    int16_t * sub;   // [k_panel_rows, n_g, 16] Sub16 only: per-half integer scales, 8 lanes each
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

// out[i] = the fp16 at p + i * stride, for i < n.
HWY_INLINE void f16_scales(const uint8_t * p, size_t stride, int64_t n, float * out) {
    const hn::CappedTag<float, 8> df;
    const hn::Rebind<hwy::float16_t, decltype(df)> dh;
    const int64_t N = int64_t(hn::Lanes(df));
    HWY_ALIGN uint16_t h[8];
    int64_t i = 0;
    for (; i + N <= n; i += N) {
        for (int64_t k = 0; k < N; ++k) {
            h[k] = load_u16(p + size_t(i + k) * stride);
        }
        hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t *>(h))), df, out + i);
    }
    for (; i < n; ++i) {
        out[i] = f16_to_f32(load_u16(p + size_t(i) * stride));
    }
}

// w[0..16) = low nibbles of qs[0..16), w[16..32) = high nibbles.
HWY_INLINE void unpack_nibbles16(const uint8_t * HWY_RESTRICT qs, uint8_t * HWY_RESTRICT w) {
#if MOESH_QK_AVX2
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(w), _mm256_and_si256(v, _mm256_set1_epi8(0x0f)));
#else
    for (int j = 0; j < 16; ++j) {
        w[j] = qs[j] & 0x0f;
        w[j + 16] = qs[j] >> 4;
    }
#endif
}

// lo[l] = qs[l] & 15, hi[l] = qs[l] >> 4 for l < 32.
HWY_INLINE void unpack_nibbles32(const uint8_t * HWY_RESTRICT qs, uint8_t * HWY_RESTRICT lo, uint8_t * HWY_RESTRICT hi) {
#if MOESH_QK_AVX2
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(qs));
    const __m256i m = _mm256_set1_epi8(0x0f);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(lo), _mm256_and_si256(q, m));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(hi), _mm256_and_si256(_mm256_srli_epi16(q, 4), m));
#else
    for (int l = 0; l < 32; ++l) {
        lo[l] = qs[l] & 0x0f;
        hi[l] = qs[l] >> 4;
    }
#endif
}

// ---- unpackers: groups [g0, g0 + n_g) of one weight row into panel row r ----

void unpack_q8_0(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    const uint8_t * b = row + g0 * 34;
    for (int64_t g = 0; g < p.n_g; ++g) {
        std::memcpy(p.w + (r * p.n_g + g) * 32, b + g * 34 + 2, 32);
    }
    f16_scales(b, 34, p.n_g, p.sw + r * p.n_g8);
}

void unpack_q4_0(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    const uint8_t * b = row + g0 * 18;
    for (int64_t g = 0; g < p.n_g; ++g) {
        unpack_nibbles16(b + g * 18 + 2, p.w + (r * p.n_g + g) * 32);
    }
    float * sw = p.sw + r * p.n_g8;
    float * ow = p.ow + r * 2 * p.n_g8;
    f16_scales(b, 18, p.n_g, sw);
    for (int64_t g = 0; g < p.n_g8; ++g) {
        ow[g] = g < p.n_g ? -8.0f * sw[g] : 0.0f;
    }
}

void unpack_q4_1(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    const uint8_t * b = row + g0 * 20;
    for (int64_t g = 0; g < p.n_g; ++g) {
        unpack_nibbles16(b + g * 20 + 4, p.w + (r * p.n_g + g) * 32);
    }
    float * ow = p.ow + r * 2 * p.n_g8;
    f16_scales(b, 20, p.n_g, p.sw + r * p.n_g8);
    f16_scales(b + 2, 20, p.n_g, ow);
    std::fill(ow + p.n_g, ow + p.n_g8, 0.0f);
}

// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K super-block.
HWY_INLINE void k_scales_mins(const uint8_t * s /* [12] */, int * sc, int * mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

// sw = d * sc, ow = -dmin * mn for the 8 groups of the super-block at b.
HWY_INLINE void k_group_scales(const uint8_t * b, float * sw, float * ow) {
    const float d = f16_to_f32(load_u16(b));
    const float dmin = f16_to_f32(load_u16(b + 2));
    int sc[8], mn[8];
    k_scales_mins(b + 4, sc, mn);
    for (int j = 0; j < 8; ++j) {
        sw[j] = d * float(sc[j]);
        ow[j] = -dmin * float(mn[j]);
    }
}

void unpack_q4_k(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    for (int64_t s = 0; s < p.n_g / 8; ++s) {
        const uint8_t * b = row + (g0 / 8 + s) * 144;
        uint8_t * w = p.w + (r * p.n_g + 8 * s) * 32;   // [8, 32]
        for (int k = 0; k < 4; ++k) {
            unpack_nibbles32(b + 16 + 32 * k, w + 64 * k, w + 64 * k + 32);
        }
        k_group_scales(b, p.sw + r * p.n_g8 + 8 * s, p.ow + r * 2 * p.n_g8 + 8 * s);
    }
}

void unpack_q5_k(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    for (int64_t s = 0; s < p.n_g / 8; ++s) {
        const uint8_t * b = row + (g0 / 8 + s) * 176;
        const uint8_t * qh = b + 16;    // [32], bit j: the fifth bit in group j
        const uint8_t * qs = b + 48;    // [128]
        uint8_t * w = p.w + (r * p.n_g + 8 * s) * 32;   // [8, 32]
#if MOESH_QK_AVX2
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(qh));
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        const __m256i b4 = _mm256_set1_epi8(0x10);
        for (int k = 0; k < 4; ++k) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(qs + 32 * k));
            const __m256i bit_lo = _mm256_set1_epi8(char(1 << (2 * k)));
            const __m256i bit_hi = _mm256_set1_epi8(char(1 << (2 * k + 1)));
            const __m256i h_lo = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit_lo), bit_lo), b4);
            const __m256i h_hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit_hi), bit_hi), b4);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(w + 64 * k),
                                _mm256_or_si256(_mm256_and_si256(q, m4), h_lo));
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(w + 64 * k + 32),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h_hi));
        }
#else
        for (int j = 0; j < 8; ++j) {
            for (int l = 0; l < 32; ++l) {
                const int nib = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
                w[32 * j + l] = uint8_t(nib | (((qh[l] >> j) & 1) << 4));
            }
        }
#endif
        k_group_scales(b, p.sw + r * p.n_g8 + 8 * s, p.ow + r * 2 * p.n_g8 + 8 * s);
    }
}

void unpack_q6_k(const uint8_t * row, int64_t g0, const Panel & p, int64_t r) {
    for (int64_t s = 0; s < p.n_g / 8; ++s) {
        const uint8_t * b = row + (g0 / 8 + s) * 210;
        const uint8_t * ql = b;                                        // [128]
        const uint8_t * qh = b + 128;                                  // [64]
        const auto * scales = reinterpret_cast<const int8_t *>(b + 192);   // [16]
        const float d = f16_to_f32(load_u16(b + 208));
        uint8_t * w = p.w + (r * p.n_g + 8 * s) * 32;   // [8, 32]
        for (int h = 0; h < 2; ++h) {
#if MOESH_QK_AVX2
            const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(qh + 32 * h));
            const __m256i m4 = _mm256_set1_epi8(0x0f);
            auto put = [&](int rr, __m256i lo, __m256i hi2) {
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(w + 32 * (4 * h + rr)), _mm256_or_si256(lo, hi2));
            };
            // Masking before each 16-bit shift keeps bits from crossing bytes.
            put(0, _mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x03)), 4));
            put(1, _mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x0c)), 2));
            put(2, _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
            put(3, _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(char(0xc0))), 2));
#else
            for (int rr = 0; rr < 4; ++rr) {
                for (int l = 0; l < 32; ++l) {
                    const int low = (ql[64 * h + 32 * (rr % 2) + l] >> (4 * (rr / 2))) & 0x0f;
                    const int high = (qh[32 * h + l] >> (2 * rr)) & 3;
                    w[32 * (4 * h + rr) + l] = uint8_t(low | (high << 4));
                }
            }
#endif
        }
        float * sw = p.sw + r * p.n_g8 + 8 * s;
        float * ow = p.ow + r * 2 * p.n_g8 + 16 * s;
        int16_t * sub = p.sub + (r * p.n_g + 8 * s) * 16;   // [8, 16]
        for (int g = 0; g < 8; ++g) {
            sw[g] = d;
            for (int l = 0; l < 8; ++l) {
                sub[16 * g + l] = scales[2 * g];
                sub[16 * g + 8 + l] = scales[2 * g + 1];
            }
        }
        for (int k = 0; k < 16; ++k) {
            ow[k] = -32.0f * d * float(scales[k]);
        }
    }
}

// ---- the dot kernel ----

// Where one token's quantized activations for the chunk start.
struct TokenActs {
    const int8_t * q;   // [n_g, 32]
    const float * d;    // [n_g]
    const float * s;    // [n_g8] s32, or [2 * n_g] s16 for Sub16
};

HWY_INLINE TokenActs token_acts(const QuantActs & a, int64_t t, int64_t g0, Kind kind) {
    return {a.q + t * a.n + g0 * 32, a.d + t * a.ng8 + g0,
            kind == Kind::Sub16 ? a.s16 + t * 2 * a.ng8 + 2 * g0 : a.s32 + t * a.ng8 + g0};
}

// acc[(r * NT + t) * 8 + lane] += lanes of (panel row r0 + r) . (token t), for
// r < 4 and t < NT; the row's dot product is the sum of its 8 lanes.
template <int NT, Kind K>
HWY_INLINE void tile(const Panel & p, int64_t r0, const TokenActs * x, float * HWY_RESTRICT acc) {
    const int64_t n_g = p.n_g;
#if MOESH_QK_AVX2
    __m256 a[k_tile_rows][NT];
    for (int r = 0; r < k_tile_rows; ++r) {
        for (int t = 0; t < NT; ++t) {
            a[r][t] = _mm256_loadu_ps(acc + (r * NT + t) * 8);
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t * w0 = p.w + r0 * n_g * 32;
    const float * sw0 = p.sw + r0 * p.n_g8;
    const int16_t * sub0 = p.sub + r0 * n_g * 16;
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
            __m256i m = ones;
            if constexpr (K == Kind::Sub16) {
                m = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(sub0 + (r * n_g + g) * 16));
            }
            // maddubs takes unsigned x signed bytes; Q8_0's signs move to the activations.
            const __m256i wu = K == Kind::Signed ? _mm256_sign_epi8(w, w) : w;
            for (int t = 0; t < NT; ++t) {
                const __m256i xs = K == Kind::Signed ? _mm256_sign_epi8(xq[t], w) : xq[t];
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), m);
                a[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, xd[t]), a[r][t]);
            }
        }
    }
    if constexpr (K != Kind::Signed) {
        // Offsets times activation sums, 8 (half-)groups per vector: the lanes are summed anyway.
        const int64_t n_off = K == Kind::Sub16 ? 2 * n_g : p.n_g8;
        const float * ow0 = p.ow + r0 * 2 * p.n_g8;
        for (int64_t k = 0; k < n_off; k += 8) {
            for (int t = 0; t < NT; ++t) {
                const __m256 sv = _mm256_loadu_ps(x[t].s + k);
                for (int r = 0; r < k_tile_rows; ++r) {
                    a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(ow0 + r * 2 * p.n_g8 + k), sv, a[r][t]);
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
                if constexpr (K == Kind::Sub16) {
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
            acc[(r * NT + t) * 8] += sum;
        }
    }
#endif
}

HWY_INLINE float lanes_sum(const float * v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// One weight type: its kernel kind, block geometry and unpacker.
struct TypeInfo {
    Kind kind;
    int64_t block_elems;
    size_t block_bytes;
    void (*unpack)(const uint8_t * row, int64_t g0, const Panel & p, int64_t r);
};

HWY_INLINE TypeInfo type_info(int32_t w_type) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0: return {Kind::Signed, 32, 34, unpack_q8_0};
    case MOESH_DTYPE_Q4_0: return {Kind::Unsigned, 32, 18, unpack_q4_0};
    case MOESH_DTYPE_Q4_1: return {Kind::Unsigned, 32, 20, unpack_q4_1};
    case MOESH_DTYPE_Q4_K: return {Kind::Unsigned, 256, 144, unpack_q4_k};
    case MOESH_DTYPE_Q5_K: return {Kind::Unsigned, 256, 176, unpack_q5_k};
    default: return {Kind::Sub16, 256, 210, unpack_q6_k};   // MOESH_DTYPE_Q6_K, validated by the caller
    }
}

// dots[t, j] = rows[j] . x[t] for n_rows (4 or 8) weight rows of n_in values
// and tokens [t0, t1) of xq; out(t, dots) receives each token's n_rows dots.
template <Kind K, class Out>
HWY_INLINE void row_block_t(const TypeInfo & ti, const uint8_t * const * rows, int64_t n_rows, int64_t n_in,
                            const QuantActs & xq, int64_t t0, int64_t t1, void * mem, Out && out) {
    const int64_t n_g = n_in / 32;
    const int64_t n_tiles = n_rows / k_tile_rows;
    HWY_ALIGN float acc[k_panel_rows * 2 * 8];   // [n_rows, NT, 8]
    HWY_ALIGN float dots[2][k_panel_rows];
    if (t1 - t0 == 1) {
        // Decode: unpack a chunk of columns and use it at once, while it is in L1.
        std::fill(acc, acc + n_rows * 8, 0.0f);
        const size_t row_bytes = size_t(n_in / ti.block_elems) * ti.block_bytes;
        const size_t chunk_bytes = size_t(k_decode_chunk * 32 / ti.block_elems) * ti.block_bytes;
        for (int64_t g0 = 0; g0 < n_g; g0 += k_decode_chunk) {
            const Panel p = panel_at(mem, std::min(k_decode_chunk, n_g - g0));
            const size_t off = size_t(g0 * 32 / ti.block_elems) * ti.block_bytes;
            for (int64_t r = 0; r < n_rows; ++r) {
                // Within the row (whole lines past its end would be the next row's, wasted here).
                for (size_t pf = off + k_prefetch_chunks * chunk_bytes;
                     pf < std::min(row_bytes, off + (k_prefetch_chunks + 1) * chunk_bytes); pf += 64) {
                    __builtin_prefetch(rows[r] + pf, 0, 3);
                }
                ti.unpack(rows[r], g0, p, r);
            }
            const TokenActs x = token_acts(xq, t0, g0, K);
            for (int64_t tr = 0; tr < n_tiles; ++tr) {
                tile<1, K>(p, tr * k_tile_rows, &x, acc + tr * k_tile_rows * 8);
            }
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            dots[0][j] = lanes_sum(acc + j * 8);
        }
        out(t0, dots[0]);
        return;
    }
    // Several tokens: unpack whole rows once, then every token pair reads them.
    const Panel p = panel_at(mem, n_g);
    for (int64_t r = 0; r < n_rows; ++r) {
        ti.unpack(rows[r], 0, p, r);
    }
    int64_t t = t0;
    for (; t + 2 <= t1; t += 2) {
        const TokenActs x[2] = {token_acts(xq, t, 0, K), token_acts(xq, t + 1, 0, K)};
        std::fill(acc, acc + n_rows * 2 * 8, 0.0f);
        for (int64_t tr = 0; tr < n_tiles; ++tr) {
            tile<2, K>(p, tr * k_tile_rows, x, acc + tr * k_tile_rows * 2 * 8);
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            dots[0][j] = lanes_sum(acc + (2 * j) * 8);
            dots[1][j] = lanes_sum(acc + (2 * j + 1) * 8);
        }
        out(t, dots[0]);
        out(t + 1, dots[1]);
    }
    if (t < t1) {
        const TokenActs x = token_acts(xq, t, 0, K);
        std::fill(acc, acc + n_rows * 8, 0.0f);
        for (int64_t tr = 0; tr < n_tiles; ++tr) {
            tile<1, K>(p, tr * k_tile_rows, &x, acc + tr * k_tile_rows * 8);
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            dots[0][j] = lanes_sum(acc + j * 8);
        }
        out(t, dots[0]);
    }
}

template <class Out>
HWY_INLINE void row_block(const TypeInfo & ti, const uint8_t * const * rows, int64_t n_rows, int64_t n_in,
                          const QuantActs & xq, int64_t t0, int64_t t1, void * mem, Out && out) {
    switch (ti.kind) {
    case Kind::Signed: row_block_t<Kind::Signed>(ti, rows, n_rows, n_in, xq, t0, t1, mem, out); break;
    case Kind::Unsigned: row_block_t<Kind::Unsigned>(ti, rows, n_rows, n_in, xq, t0, t1, mem, out); break;
    case Kind::Sub16: row_block_t<Kind::Sub16>(ti, rows, n_rows, n_in, xq, t0, t1, mem, out); break;
    }
}

// Row r of a weight matrix of rows of n_in values.
HWY_INLINE const uint8_t * row_at(const TypeInfo & ti, const void * w, int64_t r, int64_t n_in) {
    return static_cast<const uint8_t *>(w) + size_t(r) * size_t(n_in / ti.block_elems) * ti.block_bytes;
}

// ---- activation quantization ----

void quantize_groups(const float * x, int64_t x_stride, int64_t r0, int64_t r1, int64_t gb, int64_t ge,
                     const QuantActs & out) {
    // At most 8 lanes, so that a half-group of 16 is whole vectors on every target.
    const hn::CappedTag<float, 8> df;
    const hn::Rebind<int32_t, decltype(df)> di;
    const hn::Rebind<int8_t, decltype(df)> d8;
    const int64_t N = int64_t(hn::Lanes(df));
    const int64_t n_g = out.n / 32;
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = gb; g < ge; ++g) {
            const float * v = x + r * x_stride + 32 * g;   // [32]
            auto amax_v = hn::Zero(df);
            for (int64_t k = 0; k < 32; k += N) {
                amax_v = hn::Max(amax_v, hn::Abs(hn::LoadU(df, v + k)));
            }
            const float amax = hn::GetLane(hn::MaxOfLanes(df, amax_v));
            const float d = amax / 127.0f;
            const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            // Below ~1e-36 the inverse overflows; those rare groups divide instead.
            const bool divide = std::isinf(inv) && d != 0.0f;
            const auto id = hn::Set(df, inv);
            const auto vd = hn::Set(df, d);
            int8_t * q = out.q + r * out.n + 32 * g;
            int32_t sums[2];
            for (int h = 0; h < 2; ++h) {
                auto s = hn::Zero(di);
                for (int64_t k = 16 * h; k < 16 * h + 16; k += N) {
                    const auto xv = hn::LoadU(df, v + k);
                    const auto qi = hn::NearestInt(divide ? hn::Div(xv, vd) : hn::Mul(xv, id));
                    s = hn::Add(s, qi);
                    hn::StoreU(hn::DemoteTo(d8, qi), d8, q + k);
                }
                sums[h] = hn::GetLane(hn::SumOfLanes(di, s));
            }
            out.d[r * out.ng8 + g] = d;
            out.s32[r * out.ng8 + g] = d * float(sums[0] + sums[1]);
            out.s16[r * 2 * out.ng8 + 2 * g] = d * float(sums[0]);
            out.s16[r * 2 * out.ng8 + 2 * g + 1] = d * float(sums[1]);
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
    const TypeInfo ti = type_info(a.w_type);
    for (int64_t r = r0; r < r1; r += k_tile_rows) {
        // A short last block repeats its last row; the extra dots are dropped.
        const int64_t n_r = std::min(k_tile_rows, r1 - r);
        const uint8_t * rows[k_tile_rows];
        for (int64_t j = 0; j < k_tile_rows; ++j) {
            rows[j] = row_at(ti, a.w, r + std::min(j, n_r - 1), a.n_in);
        }
        row_block(ti, rows, k_tile_rows, a.n_in, xq, t0, t1, panel, [&](int64_t t, const float * dots) {
            float * y = a.y + t * a.y_stride + r;   // [n_r]
            for (int64_t j = 0; j < n_r; ++j) {
                y[j] = dots[j] + (a.bias ? a.bias[r + j] : 0.0f);
            }
        });
    }
}

HWY_INLINE float silu(float x) { return x / (1.0f + std::exp(-x)); }

void quant_gate_up_rows(const moesh_expert_ffn_args & a, const QuantActs & xq, int64_t f0, int64_t f1,
                        void * panel, const QuantActs & hq) {
    if (f0 >= f1) {
        return;   // an empty share: another thread writes the padding of hq
    }
    const TypeInfo ti = type_info(a.w_type);
    float * h = a.scratch;   // [n_tokens, n_ff]
    for (int64_t f = f0; f < f1; f += 4) {
        // Gate rows f..f+3 in panel rows 0-3, up rows in 4-7, through one pass over x.
        const int64_t n_r = std::min<int64_t>(4, f1 - f);
        const uint8_t * rows[k_panel_rows];
        for (int64_t j = 0; j < 4; ++j) {
            rows[j] = row_at(ti, a.gate, f + std::min(j, n_r - 1), a.n_embd);
            rows[4 + j] = row_at(ti, a.up, f + std::min(j, n_r - 1), a.n_embd);
        }
        row_block(ti, rows, k_panel_rows, a.n_embd, xq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
            float * ht = h + t * a.n_ff + f;   // [n_r]
            for (int64_t j = 0; j < n_r; ++j) {
                ht[j] = silu(dots[j]) * dots[4 + j];
            }
        });
    }
    quantize_groups(h, a.n_ff, 0, a.n_tokens, f0 / 32, (f1 + 31) / 32, hq);
}

void quant_down_rows(const moesh_expert_ffn_args & a, const QuantActs & hq, int64_t e0, int64_t e1, void * panel) {
    const TypeInfo ti = type_info(a.w_type);
    for (int64_t e = e0; e < e1; e += k_tile_rows) {
        const int64_t n_r = std::min(k_tile_rows, e1 - e);
        const uint8_t * rows[k_tile_rows];
        for (int64_t j = 0; j < k_tile_rows; ++j) {
            rows[j] = row_at(ti, a.down, e + std::min(j, n_r - 1), a.n_ff);
        }
        row_block(ti, rows, k_tile_rows, a.n_ff, hq, 0, a.n_tokens, panel, [&](int64_t t, const float * dots) {
            const float scale = a.scale ? a.scale[t] : 1.0f;
            float * out = a.out + t * a.n_embd + e;   // [n_r]
            for (int64_t j = 0; j < n_r; ++j) {
                out[j] += scale * dots[j];
            }
        });
    }
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

size_t quant_acts_bytes(int64_t n, int64_t n_rows) {
    const size_t ng8 = size_t((n / 32 + 7) / 8 * 8);
    return size_t(n_rows) * (size_t(n) + 4 * ng8 * 4);
}

QuantActs quant_acts_at(void * mem, int64_t n, int64_t n_rows) {
    QuantActs a;
    a.n = n;
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

void quant_down_rows(const moesh_expert_ffn_args & a, const QuantActs & hq, int64_t e0, int64_t e1, void * panel) {
    HWY_DYNAMIC_DISPATCH(quant_down_rows)(a, hq, e0, e1, panel);
}

} // namespace moesh::cpu
#endif // HWY_ONCE
