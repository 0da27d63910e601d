// Highway compiles this file once per SIMD target (foreach_target.h re-includes
// it) and HWY_DYNAMIC_DISPATCH picks the best one for the CPU at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu_kernels.cpp"
#include <hwy/foreach_target.h>  // must precede highway.h

#include <hwy/cache_control.h>
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "cpu_kernels.h"
#include "reference_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace moesh::cpu {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Lanes of the widest vector of any target: size of the zero-padded tail buffers.
constexpr int64_t k_max_lanes = HWY_MAX_BYTES / sizeof(float);
// Tokens that share one pass over a block of weight rows.
constexpr int64_t k_max_token_block = 64;

const char * target_name() { return hwy::TargetName(HWY_TARGET); }

// Tokens per block such that their activations (n_in floats each) stay in L2
// while every weight row block is multiplied with all of them.
int64_t token_block(int64_t n_in) {
    const int64_t n = (int64_t(256) * 1024 / int64_t(sizeof(float))) / n_in;
    return std::clamp<int64_t>(n, 1, k_max_token_block);
}

// Weights of any dtype, widened to f32 lanes, in their order.
HWY_INLINE VF load_f32(DF d, const float * HWY_RESTRICT p) { return hn::LoadU(d, p); }

HWY_INLINE VF load_f32(DF d, const hwy::bfloat16_t * HWY_RESTRICT p) {
    const hn::Rebind<hwy::bfloat16_t, DF> d_bf16;
    return hn::PromoteTo(d, hn::LoadU(d_bf16, p));
}

HWY_INLINE VF load_f32(DF d, const hwy::float16_t * HWY_RESTRICT p) {
    const hn::Rebind<hwy::float16_t, DF> d_f16;
    return hn::PromoteTo(d, hn::LoadU(d_f16, p));
}

// The dot kernels take 2N weights per step as two f32 vectors, lo and hi,
// multiplied with activations [i, i + N) and [i + N, i + 2N) of the same
// block. For f32 and f16 that is the weights' own order. For bf16 it is
// "kernel layout": one full-width load of 2N bf16 read as N u32 gives the even
// elements by a shift and the odd ones by a mask, half the work of widening
// each half; bf16 matmuls over several tokens, bound by that work, run ~40%
// faster (decode is bound by memory either way). Activations multiplied with
// bf16 weights are therefore stored permuted the same way: within each whole
// block of 2N, the even elements then the odd ones; a last partial block
// stays in order.
template <class WT>
constexpr bool k_permuted_layout = std::is_same_v<WT, hwy::bfloat16_t>;

HWY_INLINE void load_block(DF d, const float * HWY_RESTRICT p, VF & lo, VF & hi) {
    lo = hn::LoadU(d, p);
    hi = hn::LoadU(d, p + hn::Lanes(d));
}

HWY_INLINE void load_block(DF d, const hwy::float16_t * HWY_RESTRICT p, VF & lo, VF & hi) {
    lo = load_f32(d, p);
    hi = load_f32(d, p + hn::Lanes(d));
}

HWY_INLINE void load_block(DF d, const hwy::bfloat16_t * HWY_RESTRICT p, VF & lo, VF & hi) {
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "element 2k is the low half of u32 lane k");
    const hn::RebindToUnsigned<DF> du;
    const auto pairs = hn::LoadU(du, reinterpret_cast<const uint32_t *>(p));
    lo = hn::BitCast(d, hn::ShiftLeft<16>(pairs));                       // elements 0, 2, 4, ...
    hi = hn::BitCast(d, hn::And(pairs, hn::Set(du, 0xFFFF0000u)));      // elements 1, 3, 5, ...
}

// Where element i of a row of n activations lives in the kernel layout of WT.
template <class WT>
HWY_INLINE int64_t kernel_index(int64_t i, int64_t n) {
    if constexpr (!k_permuted_layout<WT>) {
        return i;
    } else {
        const int64_t n_block = 2 * int64_t(hn::Lanes(DF()));
        if (i >= n / n_block * n_block) {
            return i;
        }
        const int64_t j = i % n_block;
        return i - j + (j & 1) * (n_block / 2) + j / 2;
    }
}

HWY_INLINE float reduce_sum(DF d, VF v) { return hn::GetLane(hn::SumOfLanes(d, v)); }

// Hints that the line at p + n_bytes is about to be read. Integer arithmetic,
// as the address may lie past the end of the array.
HWY_INLINE void prefetch_ahead(const void * p, int64_t n_bytes) {
    __builtin_prefetch(reinterpret_cast<const void *>(reinterpret_cast<uintptr_t>(p) + uintptr_t(n_bytes)), 0, 3);
}

// How far ahead in each weight row the matvec kernels prefetch. Measured on
// Zen 3 (A/B runs alternating two builds call by call): the
// hardware prefetcher alone does not keep enough lines in flight for 4
// interleaved row streams that each start a new page every row, least so for
// 16-bit weights (fewer lines per instruction): +10-20% for bf16/f16 matvecs
// and the whole expert FFN, +3-10% for f32. 256 to 512 bytes are alike.
constexpr int64_t k_prefetch_bytes = 384;

// Copies the last n_rest (< 2 lanes) elements of a row into a zero-padded
// buffer, so that tails take the same vector path as the body.
template <class T>
HWY_INLINE void copy_tail(T * HWY_RESTRICT dst, const T * HWY_RESTRICT src, int64_t n_rest) {
    for (int64_t i = 0; i < n_rest; ++i) {
        dst[i] = src[i];
    }
}

// Row r of a [n_rows, n] weight matrix.
template <class WT>
HWY_INLINE const WT * row_at(const WT * w, int64_t r, int64_t n) {
    return w + r * n;
}

// out[j] = w_j . x for 4 weight rows and one activation row (kernel layout)
// of length n. Decode is bound by the weight stream, not by this loop; the
// two accumulators per row keep enough FMAs in flight.
template <class WT>
HWY_INLINE void dot_4x1(const WT * HWY_RESTRICT w0, const WT * HWY_RESTRICT w1,
                        const WT * HWY_RESTRICT w2, const WT * HWY_RESTRICT w3,
                        const float * HWY_RESTRICT x, int64_t n, int64_t next_row, float * HWY_RESTRICT out) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    // Near the end of a row, prefetch the start of the row this stream reads
    // next (next_row elements further on), not the neighbouring row, which
    // another stream is reading already.
    const int64_t pf_wrap = k_prefetch_bytes + (next_row - n) * int64_t(sizeof(WT));
    const int64_t i_wrap = n - k_prefetch_bytes / int64_t(sizeof(WT));
    VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    VF b0 = hn::Zero(d), b1 = hn::Zero(d), b2 = hn::Zero(d), b3 = hn::Zero(d);
    VF lo, hi;
    int64_t i = 0;
    for (; i + 2 * N <= n; i += 2 * N) {
        const int64_t ahead = i < i_wrap ? k_prefetch_bytes : pf_wrap;
        prefetch_ahead(w0 + i, ahead);
        prefetch_ahead(w1 + i, ahead);
        prefetch_ahead(w2 + i, ahead);
        prefetch_ahead(w3 + i, ahead);
        const VF xa = hn::LoadU(d, x + i);
        const VF xb = hn::LoadU(d, x + i + N);
        load_block(d, w0 + i, lo, hi);
        a0 = hn::MulAdd(lo, xa, a0);
        b0 = hn::MulAdd(hi, xb, b0);
        load_block(d, w1 + i, lo, hi);
        a1 = hn::MulAdd(lo, xa, a1);
        b1 = hn::MulAdd(hi, xb, b1);
        load_block(d, w2 + i, lo, hi);
        a2 = hn::MulAdd(lo, xa, a2);
        b2 = hn::MulAdd(hi, xb, b2);
        load_block(d, w3 + i, lo, hi);
        a3 = hn::MulAdd(lo, xa, a3);
        b3 = hn::MulAdd(hi, xb, b3);
    }
    if (i < n) {
        // The partial last block is in weight order on both sides.
        HWY_ALIGN WT tw[4][2 * k_max_lanes] = {};
        HWY_ALIGN float tx[2 * k_max_lanes] = {};
        copy_tail(tw[0], w0 + i, n - i);
        copy_tail(tw[1], w1 + i, n - i);
        copy_tail(tw[2], w2 + i, n - i);
        copy_tail(tw[3], w3 + i, n - i);
        copy_tail(tx, x + i, n - i);
        for (int64_t k = 0; k < n - i; k += N) {
            const VF xa = hn::Load(d, tx + k);
            a0 = hn::MulAdd(load_f32(d, tw[0] + k), xa, a0);
            a1 = hn::MulAdd(load_f32(d, tw[1] + k), xa, a1);
            a2 = hn::MulAdd(load_f32(d, tw[2] + k), xa, a2);
            a3 = hn::MulAdd(load_f32(d, tw[3] + k), xa, a3);
        }
    }
    out[0] = reduce_sum(d, hn::Add(a0, b0));
    out[1] = reduce_sum(d, hn::Add(a1, b1));
    out[2] = reduce_sum(d, hn::Add(a2, b2));
    out[3] = reduce_sum(d, hn::Add(a3, b3));
}

// out[0..3] = w_j . xa, out[4..7] = w_j . xb: each widened weight vector is
// used for two tokens.
template <class WT>
HWY_INLINE void dot_4x2(const WT * HWY_RESTRICT w0, const WT * HWY_RESTRICT w1,
                        const WT * HWY_RESTRICT w2, const WT * HWY_RESTRICT w3,
                        const float * HWY_RESTRICT xa, const float * HWY_RESTRICT xb, int64_t n,
                        float * HWY_RESTRICT out) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    VF b0 = hn::Zero(d), b1 = hn::Zero(d), b2 = hn::Zero(d), b3 = hn::Zero(d);
    VF lo, hi;
    int64_t i = 0;
    for (; i + 2 * N <= n; i += 2 * N) {
        const VF xa_lo = hn::LoadU(d, xa + i);
        const VF xa_hi = hn::LoadU(d, xa + i + N);
        const VF xb_lo = hn::LoadU(d, xb + i);
        const VF xb_hi = hn::LoadU(d, xb + i + N);
        load_block(d, w0 + i, lo, hi);
        a0 = hn::MulAdd(hi, xa_hi, hn::MulAdd(lo, xa_lo, a0));
        b0 = hn::MulAdd(hi, xb_hi, hn::MulAdd(lo, xb_lo, b0));
        load_block(d, w1 + i, lo, hi);
        a1 = hn::MulAdd(hi, xa_hi, hn::MulAdd(lo, xa_lo, a1));
        b1 = hn::MulAdd(hi, xb_hi, hn::MulAdd(lo, xb_lo, b1));
        load_block(d, w2 + i, lo, hi);
        a2 = hn::MulAdd(hi, xa_hi, hn::MulAdd(lo, xa_lo, a2));
        b2 = hn::MulAdd(hi, xb_hi, hn::MulAdd(lo, xb_lo, b2));
        load_block(d, w3 + i, lo, hi);
        a3 = hn::MulAdd(hi, xa_hi, hn::MulAdd(lo, xa_lo, a3));
        b3 = hn::MulAdd(hi, xb_hi, hn::MulAdd(lo, xb_lo, b3));
    }
    if (i < n) {
        HWY_ALIGN WT tw[4][2 * k_max_lanes] = {};
        HWY_ALIGN float txa[2 * k_max_lanes] = {};
        HWY_ALIGN float txb[2 * k_max_lanes] = {};
        copy_tail(tw[0], w0 + i, n - i);
        copy_tail(tw[1], w1 + i, n - i);
        copy_tail(tw[2], w2 + i, n - i);
        copy_tail(tw[3], w3 + i, n - i);
        copy_tail(txa, xa + i, n - i);
        copy_tail(txb, xb + i, n - i);
        for (int64_t k = 0; k < n - i; k += N) {
            const VF va = hn::Load(d, txa + k);
            const VF vb = hn::Load(d, txb + k);
            const VF v0 = load_f32(d, tw[0] + k);
            a0 = hn::MulAdd(v0, va, a0);
            b0 = hn::MulAdd(v0, vb, b0);
            const VF v1 = load_f32(d, tw[1] + k);
            a1 = hn::MulAdd(v1, va, a1);
            b1 = hn::MulAdd(v1, vb, b1);
            const VF v2 = load_f32(d, tw[2] + k);
            a2 = hn::MulAdd(v2, va, a2);
            b2 = hn::MulAdd(v2, vb, b2);
            const VF v3 = load_f32(d, tw[3] + k);
            a3 = hn::MulAdd(v3, va, a3);
            b3 = hn::MulAdd(v3, vb, b3);
        }
    }
    out[0] = reduce_sum(d, a0);
    out[1] = reduce_sum(d, a1);
    out[2] = reduce_sum(d, a2);
    out[3] = reduce_sum(d, a3);
    out[4] = reduce_sum(d, b0);
    out[5] = reduce_sum(d, b1);
    out[6] = reduce_sum(d, b2);
    out[7] = reduce_sum(d, b3);
}

void to_kernel_layout(int32_t w_type, const float * x, int64_t x_stride, int64_t n, int64_t n_rows,
                      float * out) {
    const int64_t N = int64_t(hn::Lanes(DF()));
    const int64_t n_full = w_type == MOESH_DTYPE_BF16 ? n / (2 * N) * (2 * N) : 0;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * src = x + r * x_stride;   // [n]
        float * dst = out + r * n;              // [n]
        for (int64_t b = 0; b < n_full; b += 2 * N) {
            for (int64_t j = 0; j < N; ++j) {
                dst[b + j] = src[b + 2 * j];
                dst[b + N + j] = src[b + 2 * j + 1];
            }
        }
        for (int64_t i = n_full; i < n; ++i) {
            dst[i] = src[i];
        }
    }
}

// dots[t, j] = w[j] . x[t] for 4 rows and n_tok (<= k_max_token_block) tokens.
// The 4 rows (8 KiB-44 KiB) stay in L1/L2 while all tokens pass over them.
template <class WT>
HWY_INLINE void dot_rows4(const WT * const * w, const float * x, int64_t x_stride, int64_t n_tok,
                          int64_t n, int64_t next_row, float * dots /* [n_tok, 4] */) {
    int64_t t = 0;
    for (; t + 2 <= n_tok; t += 2) {
        dot_4x2(w[0], w[1], w[2], w[3], x + t * x_stride, x + (t + 1) * x_stride, n, dots + 4 * t);
    }
    if (t < n_tok) {
        dot_4x1(w[0], w[1], w[2], w[3], x + t * x_stride, n, next_row, dots + 4 * t);
    }
}

template <class WT>
void matmul_rows_t(const moesh_matmul_args & a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const WT * w = static_cast<const WT *>(a.w);   // [n_out, n_in]
    const int64_t n_tb = token_block(a.n_in);
    HWY_ALIGN float dots[k_max_token_block * 4];   // [n_tb, 4]
    for (int64_t tb = t0; tb < t1; tb += n_tb) {
        const int64_t n_tok = std::min(n_tb, t1 - tb);
        const float * x = a.x + tb * a.x_stride;   // [n_tok, x_stride]
        for (int64_t r = r0; r < r1; r += 4) {
            // A short last block repeats its last row; the extra dots are dropped.
            const int64_t n_r = std::min<int64_t>(4, r1 - r);
            const WT * rows[4];
            for (int64_t j = 0; j < 4; ++j) {
                rows[j] = row_at(w, r + std::min(j, n_r - 1), a.n_in);
            }
            dot_rows4(rows, x, a.x_stride, n_tok, a.n_in, 4 * a.n_in, dots);
            for (int64_t t = 0; t < n_tok; ++t) {
                float * y = a.y + (tb + t) * a.y_stride + r;   // [n_r]
                for (int64_t j = 0; j < n_r; ++j) {
                    y[j] = dots[4 * t + j] + (a.bias ? a.bias[r + j] : 0.0f);
                }
            }
        }
    }
}

void matmul_rows(const moesh_matmul_args & a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    switch (a.w_type) {
    case MOESH_DTYPE_F32: matmul_rows_t<float>(a, r0, r1, t0, t1); break;
    case MOESH_DTYPE_F16: matmul_rows_t<hwy::float16_t>(a, r0, r1, t0, t1); break;
    case MOESH_DTYPE_BF16: matmul_rows_t<hwy::bfloat16_t>(a, r0, r1, t0, t1); break;
    default: break;   // validated by the caller
    }
}

HWY_INLINE float silu(float x) { return x / (1.0f + std::exp(-x)); }

template <class WT>
void expert_gate_up_rows_t(const moesh_expert_ffn_args & a, int64_t f0, int64_t f1) {
    const WT * gate = static_cast<const WT *>(a.gate);   // [n_ff, n_embd]
    const WT * up = static_cast<const WT *>(a.up);       // [n_ff, n_embd]
    float * h = a.scratch;                               // [n_tokens, n_ff]
    const int64_t n_embd = a.n_embd;   // a.x: [n_tokens, n_embd] in kernel layout
    const int64_t n_tb = token_block(n_embd);
    HWY_ALIGN float dots[k_max_token_block * 4];   // [n_tb, {g_f, g_f+1, u_f, u_f+1}]
    for (int64_t tb = 0; tb < a.n_tokens; tb += n_tb) {
        const int64_t n_tok = std::min(n_tb, a.n_tokens - tb);
        // Gate and up rows of two features go through one pass over x.
        for (int64_t f = f0; f < f1; f += 2) {
            const int64_t f_b = std::min(f + 1, f1 - 1);
            const WT * rows[4] = {row_at(gate, f, n_embd), row_at(gate, f_b, n_embd), row_at(up, f, n_embd),
                                   row_at(up, f_b, n_embd)};
            dot_rows4(rows, a.x + tb * n_embd, n_embd, n_tok, n_embd, 2 * n_embd, dots);
            for (int64_t t = 0; t < n_tok; ++t) {
                float * ht = h + (tb + t) * a.n_ff;   // [n_ff], kernel layout of WT
                ht[kernel_index<WT>(f, a.n_ff)] = silu(dots[4 * t]) * dots[4 * t + 2];
                if (f + 1 < f1) {
                    ht[kernel_index<WT>(f + 1, a.n_ff)] = silu(dots[4 * t + 1]) * dots[4 * t + 3];
                }
            }
        }
    }
}

template <class WT>
void expert_down_rows_t(const moesh_expert_ffn_args & a, int64_t e0, int64_t e1) {
    const WT * down = static_cast<const WT *>(a.down);   // [n_embd, n_ff]
    const float * h = a.scratch;                         // [n_tokens, n_ff]
    const int64_t n_ff = a.n_ff;
    const int64_t n_tb = token_block(n_ff);
    HWY_ALIGN float dots[k_max_token_block * 4];   // [n_tb, 4]
    for (int64_t tb = 0; tb < a.n_tokens; tb += n_tb) {
        const int64_t n_tok = std::min(n_tb, a.n_tokens - tb);
        for (int64_t e = e0; e < e1; e += 4) {
            const int64_t n_r = std::min<int64_t>(4, e1 - e);
            const WT * rows[4];
            for (int64_t j = 0; j < 4; ++j) {
                rows[j] = row_at(down, e + std::min(j, n_r - 1), n_ff);
            }
            dot_rows4(rows, h + tb * n_ff, n_ff, n_tok, n_ff, 4 * n_ff, dots);
            for (int64_t t = 0; t < n_tok; ++t) {
                const float scale = a.scale ? a.scale[tb + t] : 1.0f;
                float * out = a.out + (tb + t) * a.n_embd + e;   // [n_r]
                for (int64_t j = 0; j < n_r; ++j) {
                    out[j] += scale * dots[4 * t + j];
                }
            }
        }
    }
}

void expert_gate_up_rows(const moesh_expert_ffn_args & a, int64_t f0, int64_t f1) {
    switch (a.w_type) {
    case MOESH_DTYPE_F32: expert_gate_up_rows_t<float>(a, f0, f1); break;
    case MOESH_DTYPE_F16: expert_gate_up_rows_t<hwy::float16_t>(a, f0, f1); break;
    case MOESH_DTYPE_BF16: expert_gate_up_rows_t<hwy::bfloat16_t>(a, f0, f1); break;
    default: break;
    }
}

void expert_down_rows(const moesh_expert_ffn_args & a, int64_t e0, int64_t e1) {
    switch (a.w_type) {
    case MOESH_DTYPE_F32: expert_down_rows_t<float>(a, e0, e1); break;
    case MOESH_DTYPE_F16: expert_down_rows_t<hwy::float16_t>(a, e0, e1); break;
    case MOESH_DTYPE_BF16: expert_down_rows_t<hwy::bfloat16_t>(a, e0, e1); break;
    default: break;
    }
}

void rms_norm_rows(const moesh_rms_norm_args & a, int64_t r0, int64_t r1) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    const int64_t n = a.n;
    for (int64_t r = r0; r < r1; ++r) {
        const float * x = a.x + r * n;   // [n]
        float * y = a.y + r * n;         // [n], may be x
        VF s0 = hn::Zero(d), s1 = hn::Zero(d);
        int64_t i = 0;
        for (; i + 2 * N <= n; i += 2 * N) {
            const VF v0 = hn::LoadU(d, x + i);
            const VF v1 = hn::LoadU(d, x + i + N);
            s0 = hn::MulAdd(v0, v0, s0);
            s1 = hn::MulAdd(v1, v1, s1);
        }
        for (; i + N <= n; i += N) {
            const VF v0 = hn::LoadU(d, x + i);
            s0 = hn::MulAdd(v0, v0, s0);
        }
        float sum_sq = reduce_sum(d, hn::Add(s0, s1));
        for (; i < n; ++i) {
            sum_sq += x[i] * x[i];
        }
        const float inv_rms = 1.0f / std::sqrt(sum_sq / float(n) + a.eps);
        const VF v_inv_rms = hn::Set(d, inv_rms);
        i = 0;
        for (; i + N <= n; i += N) {
            hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), v_inv_rms), hn::LoadU(d, a.weight + i)), d, y + i);
        }
        for (; i < n; ++i) {
            y[i] = x[i] * inv_rms * a.weight[i];
        }
    }
}

void softmax_rows(const moesh_softmax_args & a, int64_t r0, int64_t r1) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    const int64_t n = a.n;
    for (int64_t r = r0; r < r1; ++r) {
        float * x = a.x + r * n;   // [n]
        VF v_max = hn::Set(d, -std::numeric_limits<float>::infinity());
        int64_t i = 0;
        for (; i + N <= n; i += N) {
            v_max = hn::Max(v_max, hn::LoadU(d, x + i));
        }
        float max = hn::GetLane(hn::MaxOfLanes(d, v_max));
        for (; i < n; ++i) {
            max = std::max(max, x[i]);
        }
        v_max = hn::Set(d, max);
        VF v_sum = hn::Zero(d);
        i = 0;
        for (; i + N <= n; i += N) {
            const VF e = hn::Exp(d, hn::Sub(hn::LoadU(d, x + i), v_max));
            hn::StoreU(e, d, x + i);
            v_sum = hn::Add(v_sum, e);
        }
        float sum = reduce_sum(d, v_sum);
        for (; i < n; ++i) {
            x[i] = std::exp(x[i] - max);
            sum += x[i];
        }
        const float inv_sum = 1.0f / sum;
        const VF v_inv_sum = hn::Set(d, inv_sum);
        i = 0;
        for (; i + N <= n; i += N) {
            hn::StoreU(hn::Mul(hn::LoadU(d, x + i), v_inv_sum), d, x + i);
        }
        for (; i < n; ++i) {
            x[i] *= inv_sum;
        }
    }
}

void rope_tokens(const moesh_rope_args & a, int64_t t0, int64_t t1, float * cos_sin) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    const int64_t n_half = a.rot_dim / 2;
    float * c = cos_sin;            // [n_half]
    float * s = cos_sin + n_half;   // [n_half]
    for (int64_t t = t0; t < t1; ++t) {
        // float32 angle, then float32 cos/sin, as HF transformers computes them.
        const float p = static_cast<float>(a.pos[t]);
        for (int64_t i = 0; i < n_half; ++i) {
            const float theta = p * a.inv_freq[i];
            c[i] = std::cos(theta) * a.attn_factor;
            s[i] = std::sin(theta) * a.attn_factor;
        }
        for (int64_t h = 0; h < a.n_head; ++h) {
            float * x = a.x + (t * a.n_head + h) * a.head_dim;   // [head_dim]
            if (a.mode == MOESH_ROPE_NEOX) {
                float * x_hi = x + n_half;
                int64_t i = 0;
                for (; i + N <= n_half; i += N) {
                    const VF x0 = hn::LoadU(d, x + i);
                    const VF x1 = hn::LoadU(d, x_hi + i);
                    const VF vc = hn::LoadU(d, c + i);
                    const VF vs = hn::LoadU(d, s + i);
                    hn::StoreU(hn::NegMulAdd(x1, vs, hn::Mul(x0, vc)), d, x + i);
                    hn::StoreU(hn::MulAdd(x0, vs, hn::Mul(x1, vc)), d, x_hi + i);
                }
                for (; i < n_half; ++i) {
                    const float x0 = x[i];
                    const float x1 = x_hi[i];
                    x[i] = x0 * c[i] - x1 * s[i];
                    x_hi[i] = x0 * s[i] + x1 * c[i];
                }
            } else {
                for (int64_t i = 0; i < n_half; ++i) {
                    const float x0 = x[2 * i];
                    const float x1 = x[2 * i + 1];
                    x[2 * i] = x0 * c[i] - x1 * s[i];
                    x[2 * i + 1] = x0 * s[i] + x1 * c[i];
                }
            }
        }
    }
}

// x86 targets with F16C convert f16 in hardware, exactly (round to nearest even going down, every
// value including inf and NaN going up); Highway 1.0's emulation elsewhere reads inf and NaN as
// finite numbers and truncates when it rounds, so those targets convert as below.
#undef MOESH_CPU_HW_F16   // this file is compiled once per target
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
#define MOESH_CPU_HW_F16 1
#else
#define MOESH_CPU_HW_F16 0
#endif

// KV cache elements widened to f32 lanes.
HWY_INLINE VF load_kv(DF d, const float * HWY_RESTRICT p) { return hn::LoadU(d, p); }
HWY_INLINE VF load_kv(DF d, const hwy::float16_t * HWY_RESTRICT p) {
#if MOESH_CPU_HW_F16
    return load_f32(d, p);
#else
    // The bits rebuilt: sign, exponent 31 (inf, NaN), normal, and subnormal (mantissa * 2^-24).
    const hn::RebindToUnsigned<DF> du;
    const hn::RebindToSigned<DF> di;
    const hn::Rebind<uint16_t, DF> du16;
    const auto h = hn::PromoteTo(du, hn::LoadU(du16, reinterpret_cast<const uint16_t *>(p)));
    const auto sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
    const auto exp = hn::And(hn::ShiftRight<10>(h), hn::Set(du, 0x1fu));
    const auto mant = hn::And(h, hn::Set(du, 0x3ffu));
    const auto normal = hn::Or(hn::ShiftLeft<23>(hn::Add(exp, hn::Set(du, 112u))), hn::ShiftLeft<13>(mant));
    const auto special = hn::Or(hn::Set(du, 0x7f800000u), hn::ShiftLeft<13>(mant));
    const VF sub = hn::Mul(hn::ConvertTo(d, hn::BitCast(di, mant)), hn::Set(d, 5.9604644775390625e-8f));
    VF v = hn::BitCast(d, hn::IfThenElse(hn::Eq(exp, hn::Set(du, 31u)), special, normal));
    v = hn::IfThenElse(hn::RebindMask(d, hn::Eq(exp, hn::Zero(du))), sub, v);
    return hn::BitCast(d, hn::Or(hn::BitCast(du, v), sign));
#endif
}

// One KV cache element as f32 (the tails of the loops below).
HWY_INLINE float kv_at(const float * p) { return *p; }
HWY_INLINE float kv_at(const hwy::float16_t * p) {
    uint16_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return moesh::ref::f16_to_f32(bits);
}

// A Q8_0 KV pool (the pool type's tag): rows of head_dim / 32 blocks of 34 bytes.
struct KvQ8 {};

// A KV pool read by element offsets, as the ABI counts a pool's elements: f32 and f16 pools are
// arrays; in a Q8_0 pool element e is value e % 32 of block e / 32. load() reads the lanes from e,
// which a caller starts at a multiple of the lane count within a row.
template <class T>
struct KvPool {
    const T * base;
    explicit KvPool(const void * p) : base(static_cast<const T *>(p)) {}
    HWY_INLINE VF load(DF d, int64_t e) const { return load_kv(d, base + e); }
    HWY_INLINE float at(int64_t e) const { return kv_at(base + e); }
    HWY_INLINE const char * bytes(int64_t e) const { return reinterpret_cast<const char *>(base + e); }
    static int64_t row_bytes(int64_t n) { return n * int64_t(sizeof(T)); }
};

template <>
struct KvPool<KvQ8> {
    const uint8_t * base;
    explicit KvPool(const void * p) : base(static_cast<const uint8_t *>(p)) {}
    // e >= 0: unsigned shifts, not a signed division's fix-ups, on every load
    HWY_INLINE const uint8_t * block(int64_t e) const { return base + (uint64_t(e) / MOESH_QK_BLOCK) * 34; }
    HWY_INLINE static size_t in_block(int64_t e) { return uint64_t(e) % MOESH_QK_BLOCK; }
    HWY_INLINE static float scale(const uint8_t * b) {
        uint16_t h;
        std::memcpy(&h, b, sizeof h);
        return moesh::ref::f16_to_f32(h);
    }
    // Whether a vector's lanes lie in one block (every fixed-width target): the attention loops
    // then take raw() and scale_of() a block at a time; otherwise load() a value at a time.
    static bool blockwise(DF d) { return MOESH_QK_BLOCK % hn::Lanes(d) == 0; }
    // float(q) of lanes e.. (blockwise), without the block's scale.
    HWY_INLINE VF raw(DF d, int64_t e) const {
        const hn::Rebind<int8_t, DF> d8;
        const hn::RebindToSigned<DF> di;
        return hn::ConvertTo(d, hn::PromoteTo(di, hn::LoadU(d8, reinterpret_cast<const int8_t *>(block(e) + 2 + in_block(e)))));
    }
    // The scale of e's block, widened as load_kv widens f16 (F16C where there is one; exact, as
    // scale()), from the block's first lanes when a vector's halves fit in its 34 bytes.
    HWY_INLINE float scale_of(DF d, int64_t e) const {
        const uint8_t * b = block(e);
        return hn::Lanes(d) * 2 <= 34 ? hn::GetLane(load_kv(d, reinterpret_cast<const hwy::float16_t *>(b))) : scale(b);
    }
    // float(q) * d in every lane, a value at a time: only where !blockwise (the loops take raw()
    // and scale_of() a block at a time otherwise).
    HWY_INLINE VF load(DF d, int64_t e) const {
        HWY_ALIGN float lanes[HWY_MAX_BYTES / sizeof(float)];
        for (size_t l = 0; l < hn::Lanes(d); ++l) lanes[l] = at(e + int64_t(l));
        return hn::Load(d, lanes);
    }
    HWY_INLINE float at(int64_t e) const {
        const uint8_t * b = block(e);
        return float(int8_t(b[2 + in_block(e)])) * scale(b);
    }
    HWY_INLINE const char * bytes(int64_t e) const { return reinterpret_cast<const char *>(block(e)); }
    static int64_t row_bytes(int64_t n) { return n / MOESH_QK_BLOCK * 34; }
};

// A Q8_0 row's dot product with q, a block at a time: the products with float(q) summed over the
// block, then times its scale into the total (a multiply per block instead of per value). The
// attention loops below do exactly this per row, grouped or not.
HWY_INLINE VF dot_q8_blocks(DF d, const float * HWY_RESTRICT q, const KvPool<KvQ8> & k, int64_t e, int64_t n, VF acc) {
    const int64_t N = int64_t(hn::Lanes(d));
    for (int64_t b0 = 0; b0 < n; b0 += MOESH_QK_BLOCK) {
        VF part = hn::Zero(d);
        for (int64_t i = b0; i < b0 + MOESH_QK_BLOCK; i += N) part = hn::MulAdd(hn::LoadU(d, q + i), k.raw(d, e + i), part);
        acc = hn::MulAdd(part, hn::Set(d, k.scale_of(d, e + b0)), acc);
    }
    return acc;
}

template <class T>
HWY_INLINE float dot_q_1(const float * HWY_RESTRICT q, const KvPool<T> & k, int64_t e, int64_t n) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    if constexpr (std::is_same_v<T, KvQ8>) {
        if (KvPool<KvQ8>::blockwise(d)) return reduce_sum(d, dot_q8_blocks(d, q, k, e, n, hn::Zero(d)));
    }
    VF acc = hn::Zero(d);
    int64_t i = 0;
    for (; i + N <= n; i += N) {
        acc = hn::MulAdd(hn::LoadU(d, q + i), k.load(d, e + i), acc);
    }
    float sum = reduce_sum(d, acc);
    for (; i < n; ++i) {
        sum = std::fma(q[i], k.at(e + i), sum);
    }
    return sum;
}

// o += p v for one cache row (f32, f16 or Q8_0, widened in registers).
template <class T>
HWY_INLINE void accumulate_v(float * HWY_RESTRICT o, const KvPool<T> & v, int64_t e, float p, int64_t n) {
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    if constexpr (std::is_same_v<T, KvQ8>) {
        if (KvPool<KvQ8>::blockwise(d)) {   // o += (p d) float(q): p times the block's scale once
            for (int64_t b0 = 0; b0 < n; b0 += MOESH_QK_BLOCK) {
                const VF pd = hn::Set(d, p * v.scale_of(d, e + b0));
                for (int64_t i = b0; i < b0 + MOESH_QK_BLOCK; i += N)
                    hn::StoreU(hn::MulAdd(pd, v.raw(d, e + i), hn::LoadU(d, o + i)), d, o + i);
            }
            return;
        }
    }
    const VF vp = hn::Set(d, p);
    int64_t i = 0;
    for (; i + N <= n; i += N) {
        hn::StoreU(hn::MulAdd(vp, v.load(d, e + i), hn::LoadU(d, o + i)), d, o + i);
    }
    for (; i < n; ++i) {   // fma, as the vector lanes
        o[i] = std::fma(p, v.at(e + i), o[i]);
    }
}

// Items (token, HPI query heads of one kv head): the HPI heads share each K and V
// row's load (and f16 widening) instead of reading it once per head. Rows per pass:
// QK keeps R * HPI <= 4 dot products going (then 8 for HPI = 8), V keeps RV * HPI
// weights in registers. Every HPI adds the same products in the same order (rows in
// order, fma tails), so a head's output has the same bits however it is grouped.
template <class T, int HPI>
void attention_items_t(const moesh_attention_args & a, int64_t i0, int64_t i1, float * scores) {
    constexpr int R = HPI >= 4 ? 1 : 4 / HPI;
    constexpr int RV = HPI >= 8 ? 1 : 8 / HPI > 4 ? 4 : 8 / HPI;
    const DF d;
    const int64_t N = int64_t(hn::Lanes(d));
    const int64_t n_group = a.n_head / a.n_head_kv;
    const int64_t n_items_token = a.n_head / HPI;
    const int64_t n_dim = a.head_dim;
    const int64_t bs = a.block_size;
    const int64_t row_stride = a.n_head_kv * n_dim;   // elements between cache rows of one kv head
    const int64_t row_bytes = KvPool<T>::row_bytes(n_dim);
    const KvPool<T> kp(a.k_pool), vp(a.v_pool);
    constexpr bool kQ8 = std::is_same_v<T, KvQ8>;
    bool q8_blocks = false;   // Q8_0 rows a block at a time (see dot_q8_blocks)
    if constexpr (kQ8) q8_blocks = KvPool<KvQ8>::blockwise(d);
    for (int64_t item = i0; item < i1; ++item) {
        const int64_t t = item / n_items_token;
        const int64_t h0 = (item % n_items_token) * HPI;   // first query head
        const int64_t h_kv = h0 / n_group;
        const int64_t n_ctx = int64_t(a.pos[t]) + 1;
        const float * q[HPI];
        float * o[HPI];
        float * sc[HPI];   // scores of head h0 + h: [n_ctx]
        for (int h = 0; h < HPI; ++h) {
            q[h] = a.q + (t * a.n_head + h0 + h) * n_dim;
            o[h] = a.out + (t * a.n_head + h0 + h) * n_dim;
            sc[h] = scores + h * n_ctx;
        }
        auto block_base = [&](int64_t p0) {
            // Row 0 of the cache block holding position p0, for kv head h_kv (an element offset).
            return (int64_t(a.block_table[p0 / bs]) * bs * a.n_head_kv + h_kv) * n_dim;
        };
        // Cache blocks lie anywhere in the pool, and the hardware prefetcher follows a stream
        // only within a page: the next block's K rows are asked for while this block's are
        // read, and this block's V rows while its scores are computed (the V pass reads them).
        auto prefetch_rows = [&](const KvPool<T> & pool, int64_t rows, int64_t n_rows) {
            for (int64_t r = 0; r < n_rows; ++r) {
                const char * row = pool.bytes(rows + r * row_stride);
                for (int64_t b = 0; b < row_bytes; b += 64) hwy::Prefetch(row + b);
            }
        };
        prefetch_rows(kp, block_base(0), std::min(bs, n_ctx));

        for (int64_t p0 = 0; p0 < n_ctx; p0 += bs) {
            const int64_t k = block_base(p0);   // [bs, row_stride]
            const int64_t n_r = std::min(bs, n_ctx - p0);
            if (p0 + bs < n_ctx) prefetch_rows(kp, block_base(p0 + bs), std::min(bs, n_ctx - p0 - bs));
            prefetch_rows(vp, k, n_r);
            int64_t r = 0;
            for (; r + R <= n_r; r += R) {
                VF acc[R][HPI];
                for (int j = 0; j < R; ++j) {
                    for (int h = 0; h < HPI; ++h) {
                        acc[j][h] = hn::Zero(d);
                    }
                }
                int64_t i = 0;
                if constexpr (kQ8) {
                    if (q8_blocks) {   // per row and block as dot_q8_blocks, the rows' loads interleaved
                        for (int64_t b0 = 0; b0 < n_dim; b0 += MOESH_QK_BLOCK) {
                            VF part[R][HPI];
                            for (int j = 0; j < R; ++j) {
                                for (int h = 0; h < HPI; ++h) part[j][h] = hn::Zero(d);
                            }
                            for (int64_t ib = b0; ib < b0 + MOESH_QK_BLOCK; ib += N) {
                                for (int j = 0; j < R; ++j) {
                                    const VF vk = kp.raw(d, k + (r + j) * row_stride + ib);
                                    for (int h = 0; h < HPI; ++h) part[j][h] = hn::MulAdd(hn::LoadU(d, q[h] + ib), vk, part[j][h]);
                                }
                            }
                            for (int j = 0; j < R; ++j) {
                                const VF dv = hn::Set(d, kp.scale_of(d, k + (r + j) * row_stride + b0));
                                for (int h = 0; h < HPI; ++h) acc[j][h] = hn::MulAdd(part[j][h], dv, acc[j][h]);
                            }
                        }
                        i = n_dim;
                    }
                }
                for (; i + N <= n_dim; i += N) {
                    for (int j = 0; j < R; ++j) {
                        const VF vk = kp.load(d, k + (r + j) * row_stride + i);
                        for (int h = 0; h < HPI; ++h) {
                            acc[j][h] = hn::MulAdd(hn::LoadU(d, q[h] + i), vk, acc[j][h]);
                        }
                    }
                }
                for (int j = 0; j < R; ++j) {
                    for (int h = 0; h < HPI; ++h) {
                        float sum = reduce_sum(d, acc[j][h]);
                        for (int64_t ii = i; ii < n_dim; ++ii) {
                            sum = std::fma(q[h][ii], kp.at(k + (r + j) * row_stride + ii), sum);
                        }
                        sc[h][p0 + r + j] = sum;
                    }
                }
            }
            for (; r < n_r; ++r) {
                for (int h = 0; h < HPI; ++h) {
                    sc[h][p0 + r] = dot_q_1(q[h], kp, k + r * row_stride, n_dim);
                }
            }
        }

        float inv_sum[HPI];
        for (int h = 0; h < HPI; ++h) {
            float * s = sc[h];
            float max = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < n_ctx; ++j) {
                s[j] *= a.scale;
                max = std::max(max, s[j]);
            }
            const VF v_max = hn::Set(d, max);
            VF v_sum = hn::Zero(d);
            int64_t j = 0;
            for (; j + N <= n_ctx; j += N) {
                const VF e = hn::Exp(d, hn::Sub(hn::LoadU(d, s + j), v_max));
                hn::StoreU(e, d, s + j);
                v_sum = hn::Add(v_sum, e);
            }
            float sum = reduce_sum(d, v_sum);
            for (; j < n_ctx; ++j) {
                s[j] = std::exp(s[j] - max);
                sum += s[j];
            }
            inv_sum[h] = 1.0f / sum;
            std::fill(o[h], o[h] + n_dim, 0.0f);
        }

        for (int64_t p0 = 0; p0 < n_ctx; p0 += bs) {
            const int64_t v = block_base(p0);   // [bs, row_stride]
            const int64_t n_r = std::min(bs, n_ctx - p0);
            int64_t r = 0;
            for (; r + RV <= n_r; r += RV) {
                VF p[RV][HPI];
                for (int j = 0; j < RV; ++j) {
                    for (int h = 0; h < HPI; ++h) {
                        p[j][h] = hn::Set(d, sc[h][p0 + r + j]);
                    }
                }
                int64_t i = 0;
                if constexpr (kQ8) {
                    if (q8_blocks) {   // as accumulate_v: each row's weight times its block's scale, once
                        for (int64_t b0 = 0; b0 < n_dim; b0 += MOESH_QK_BLOCK) {
                            VF pd[RV][HPI];
                            for (int j = 0; j < RV; ++j) {
                                const float dj = vp.scale_of(d, v + (r + j) * row_stride + b0);
                                for (int h = 0; h < HPI; ++h) pd[j][h] = hn::Set(d, sc[h][p0 + r + j] * dj);
                            }
                            for (int64_t ib = b0; ib < b0 + MOESH_QK_BLOCK; ib += N) {
                                VF vv[RV];
                                for (int j = 0; j < RV; ++j) vv[j] = vp.raw(d, v + (r + j) * row_stride + ib);
                                for (int h = 0; h < HPI; ++h) {
                                    VF acc = hn::LoadU(d, o[h] + ib);
                                    for (int j = 0; j < RV; ++j) acc = hn::MulAdd(pd[j][h], vv[j], acc);
                                    hn::StoreU(acc, d, o[h] + ib);
                                }
                            }
                        }
                        i = n_dim;
                    }
                }
                for (; i + N <= n_dim; i += N) {
                    VF vv[RV];
                    for (int j = 0; j < RV; ++j) {
                        vv[j] = vp.load(d, v + (r + j) * row_stride + i);
                    }
                    for (int h = 0; h < HPI; ++h) {
                        VF acc = hn::LoadU(d, o[h] + i);
                        for (int j = 0; j < RV; ++j) {
                            acc = hn::MulAdd(p[j][h], vv[j], acc);
                        }
                        hn::StoreU(acc, d, o[h] + i);
                    }
                }
                for (; i < n_dim; ++i) {
                    for (int h = 0; h < HPI; ++h) {
                        float x = o[h][i];
                        for (int j = 0; j < RV; ++j) {
                            x = std::fma(sc[h][p0 + r + j], vp.at(v + (r + j) * row_stride + i), x);
                        }
                        o[h][i] = x;
                    }
                }
            }
            for (; r < n_r; ++r) {
                for (int h = 0; h < HPI; ++h) {
                    accumulate_v(o[h], vp, v + r * row_stride, sc[h][p0 + r], n_dim);
                }
            }
        }
        for (int h = 0; h < HPI; ++h) {
            const VF v_inv_sum = hn::Set(d, inv_sum[h]);
            int64_t i = 0;
            for (; i + N <= n_dim; i += N) {
                hn::StoreU(hn::Mul(hn::LoadU(d, o[h] + i), v_inv_sum), d, o[h] + i);
            }
            for (; i < n_dim; ++i) {
                o[h][i] *= inv_sum[h];
            }
        }
    }
}

// copy_rows with an f16 dst (KV cache writes): rows [r0, r1). Rounding to nearest even, as the
// reference: F16C's conversion on x86 targets that have it, the reference's elsewhere.
void copy_rows_f16(const moesh_copy_rows_args & a, int64_t r0, int64_t r1) {
    const DF d;
    const hn::Rebind<hwy::float16_t, DF> dh;
    const int64_t N = int64_t(hn::Lanes(d));
    (void)dh;
    (void)N;
    for (int64_t i = r0; i < r1; ++i) {
        const int64_t k = a.src_rows ? a.src_rows[i] : i;
        const float * src = a.src ? a.src + k * a.src_stride : nullptr;
        uint16_t * dst = static_cast<uint16_t *>(a.dst) + (a.dst_rows ? a.dst_rows[i] : i) * a.dst_stride;
        int64_t j = 0;
#if MOESH_CPU_HW_F16
        auto * dst16 = reinterpret_cast<hwy::float16_t *>(dst);
        const VF lo = hn::Set(d, -a.clamp), hi = hn::Set(d, a.clamp);
        for (; j + N <= a.n_cols; j += N) {
            VF v = src ? hn::LoadU(d, src + j) : hn::Zero(d);
            if (a.accumulate) v = hn::Add(hn::PromoteTo(d, hn::LoadU(dh, dst16 + j)), v);
            if (a.clamp > 0.0f) v = hn::IfThenElse(hn::IsNaN(v), v, hn::Min(hn::Max(v, lo), hi));   // NaN stays, as std::clamp
            hn::StoreU(hn::DemoteTo(dh, v), dh, dst16 + j);
        }
#endif
        for (; j < a.n_cols; ++j) {
            float v = (a.accumulate ? moesh::ref::f16_to_f32(dst[j]) : 0.0f) + (src ? src[j] : 0.0f);
            if (a.clamp > 0.0f) v = std::clamp(v, -a.clamp, a.clamp);
            dst[j] = moesh::ref::f32_to_f16(v);
        }
    }
}

template <class T>
void attention_items_kv(const moesh_attention_args & a, int heads_per_item, int64_t i0, int64_t i1, float * scores) {
    switch (heads_per_item) {
    case 8: return attention_items_t<T, 8>(a, i0, i1, scores);
    case 4: return attention_items_t<T, 4>(a, i0, i1, scores);
    case 2: return attention_items_t<T, 2>(a, i0, i1, scores);
    default: return attention_items_t<T, 1>(a, i0, i1, scores);
    }
}

void attention_items(const moesh_attention_args & a, int heads_per_item, int64_t i0, int64_t i1, float * scores) {
    if (a.kv_type == MOESH_DTYPE_Q8_0)
        attention_items_kv<KvQ8>(a, heads_per_item, i0, i1, scores);
    else if (a.kv_type == MOESH_DTYPE_F16)
        attention_items_kv<hwy::float16_t>(a, heads_per_item, i0, i1, scores);
    else
        attention_items_kv<float>(a, heads_per_item, i0, i1, scores);
}

} // namespace HWY_NAMESPACE
} // namespace moesh::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace moesh::cpu {

HWY_EXPORT(target_name);
HWY_EXPORT(to_kernel_layout);
HWY_EXPORT(matmul_rows);
HWY_EXPORT(expert_gate_up_rows);
HWY_EXPORT(expert_down_rows);
HWY_EXPORT(rms_norm_rows);
HWY_EXPORT(softmax_rows);
HWY_EXPORT(rope_tokens);
HWY_EXPORT(attention_items);
HWY_EXPORT(copy_rows_f16);

const char * simd_target_name() { return HWY_DYNAMIC_DISPATCH(target_name)(); }

bool apply_simd_limit_from_env() {
    const char * v = std::getenv("MOESH_CPU_SIMD");
    if (!v || std::strcmp(v, "portable") != 0) {
        return false;
    }
    int64_t above_sse4 = 0;
#ifdef HWY_AVX2
    above_sse4 |= HWY_AVX2;
#endif
#ifdef HWY_AVX3
    above_sse4 |= HWY_AVX3;
#endif
#ifdef HWY_AVX3_DL
    above_sse4 |= HWY_AVX3_DL;
#endif
#ifdef HWY_AVX3_ZEN4
    above_sse4 |= HWY_AVX3_ZEN4;
#endif
#ifdef HWY_AVX3_SPR
    above_sse4 |= HWY_AVX3_SPR;
#endif
    hwy::DisableTargets(above_sse4);
    return true;
}

bool needs_kernel_layout(int32_t w_type) { return w_type == MOESH_DTYPE_BF16; }

void to_kernel_layout(int32_t w_type, const float * x, int64_t x_stride, int64_t n, int64_t n_rows,
                      float * out) {
    HWY_DYNAMIC_DISPATCH(to_kernel_layout)(w_type, x, x_stride, n, n_rows, out);
}

void matmul_rows(const moesh_matmul_args & a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    HWY_DYNAMIC_DISPATCH(matmul_rows)(a, r0, r1, t0, t1);
}

void expert_gate_up_rows(const moesh_expert_ffn_args & a, int64_t f0, int64_t f1) {
    HWY_DYNAMIC_DISPATCH(expert_gate_up_rows)(a, f0, f1);
}

void expert_down_rows(const moesh_expert_ffn_args & a, int64_t e0, int64_t e1) {
    HWY_DYNAMIC_DISPATCH(expert_down_rows)(a, e0, e1);
}

void rms_norm_rows(const moesh_rms_norm_args & a, int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(rms_norm_rows)(a, r0, r1);
}

void softmax_rows(const moesh_softmax_args & a, int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(softmax_rows)(a, r0, r1);
}

void rope_tokens(const moesh_rope_args & a, int64_t t0, int64_t t1, float * cos_sin) {
    HWY_DYNAMIC_DISPATCH(rope_tokens)(a, t0, t1, cos_sin);
}

void attention_items(const moesh_attention_args & a, int heads_per_item, int64_t i0, int64_t i1, float * scores) {
    HWY_DYNAMIC_DISPATCH(attention_items)(a, heads_per_item, i0, i1, scores);
}

int attention_heads_per_item(int64_t n_head, int64_t n_head_kv, int64_t n_tokens, int n_threads) {
    const int64_t n_group = n_head / n_head_kv;
    for (int h : {8, 4, 2}) {
        if (n_group % h == 0 && n_tokens * (n_head / h) >= 2 * int64_t(n_threads)) {
            return h;
        }
    }
    return 1;
}

void copy_rows_f16(const moesh_copy_rows_args & a, int64_t r0, int64_t r1) { HWY_DYNAMIC_DISPATCH(copy_rows_f16)(a, r0, r1); }

void copy_rows_q8_0(const moesh_copy_rows_args & a, int64_t r0, int64_t r1) {
    float x[MOESH_QK_BLOCK];
    const int64_t row_bytes = a.dst_stride / MOESH_QK_BLOCK * 34;
    for (int64_t i = r0; i < r1; ++i) {
        const int64_t k = a.src_rows ? a.src_rows[i] : i;
        const float * src = a.src ? a.src + k * a.src_stride : nullptr;
        uint8_t * dst = static_cast<uint8_t *>(a.dst) + (a.dst_rows ? a.dst_rows[i] : i) * row_bytes;
        for (int64_t b = 0; b < a.n_cols / MOESH_QK_BLOCK; ++b) {
            for (int j = 0; j < MOESH_QK_BLOCK; ++j) {
                const float v = src ? src[b * MOESH_QK_BLOCK + j] : 0.0f;
                x[j] = a.clamp > 0.0f ? std::clamp(v, -a.clamp, a.clamp) : v;
            }
            moesh::ref::quantize_q8_0_block(x, dst + b * 34);
        }
    }
}

} // namespace moesh::cpu
#endif // HWY_ONCE
