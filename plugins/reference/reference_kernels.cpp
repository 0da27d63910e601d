#include "reference_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace moesh::ref {

namespace {

uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

} // namespace

float f16_to_f32(uint16_t h) {
    const uint32_t sign = h >> 15;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0x1f) {
        // inf, or NaN with its payload kept
        return bits_float((sign << 31) | 0x7f800000u | (mantissa << 13));
    }
    const float magnitude = exponent == 0
        ? std::ldexp(static_cast<float>(mantissa), -24)                     // subnormal
        : std::ldexp(static_cast<float>(mantissa | 0x400), int(exponent) - 25);
    return sign ? -magnitude : magnitude;
}

float bf16_to_f32(uint16_t b) { return bits_float(uint32_t(b) << 16); }

uint16_t f32_to_bf16(float f) {
    const uint32_t u = float_bits(f);
    if (std::isnan(f)) {
        return static_cast<uint16_t>((u >> 16) | 0x40);
    }
    // Adding 0x7fff plus the lowest kept bit rounds to nearest even; a carry
    // into the exponent is the correct result (up to infinity).
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t f32_to_f16(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return static_cast<uint16_t>(sign | 0x7e00 | ((a >> 13) & 0x3ff));
    }
    const int exponent = int(a >> 23) - 127;
    if (exponent > 15) {
        return static_cast<uint16_t>(sign | 0x7c00);   // inf, or too large
    }
    const uint32_t mantissa = a & 0x7fffff;
    uint32_t h;          // magnitude bits before rounding
    uint32_t rest;       // dropped bits
    uint32_t half;       // value of the dropped bits at exactly one half ulp
    if (exponent >= -14) {
        h = (uint32_t(exponent + 15) << 10) | (mantissa >> 13);
        rest = mantissa & 0x1fff;
        half = 0x1000;
    } else {
        // Subnormal f16: units of 2^-24. The float is (mantissa | 1 << 23) * 2^(exponent - 23).
        const int shift = -1 - exponent;   // >= 14
        if (shift > 24) {
            return sign;   // below a quarter of the smallest subnormal: rounds to zero
        }
        const uint32_t full = mantissa | 0x800000u;
        h = full >> shift;
        rest = full & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    }
    if (rest > half || (rest == half && (h & 1))) {
        ++h;   // a carry out of the mantissa lands in the exponent, as it should
    }
    return static_cast<uint16_t>(sign | h);
}

namespace {

// Elements and bytes of one block of a block dtype; {0, 0} for the others.
struct BlockShape {
    int64_t n_elems;
    size_t n_bytes;
};

BlockShape block_shape(int32_t w_type) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0: return {MOESH_QK_BLOCK, 2 + 32};         // d, int8 q[32]
    case MOESH_DTYPE_Q4_0: return {MOESH_QK_BLOCK, 2 + 16};         // d, qs[16]
    case MOESH_DTYPE_Q4_1: return {MOESH_QK_BLOCK, 2 + 2 + 16};     // d, m, qs[16]
    case MOESH_DTYPE_Q4_K: return {MOESH_QK_K, 2 + 2 + 12 + 128};   // d, dmin, scales[12], qs[128]
    case MOESH_DTYPE_Q5_K: return {MOESH_QK_K, 2 + 2 + 12 + 32 + 128}; // ... qh[32], qs[128]
    case MOESH_DTYPE_Q6_K: return {MOESH_QK_K, 128 + 64 + 16 + 2};  // ql[128], qh[64], scales[16], d
    default: return {0, 0};
    }
}

bool is_block_type(int32_t w_type) { return block_shape(w_type).n_elems != 0; }

float f16_at(const uint8_t * p) { return f16_to_f32(uint16_t(p[0] | (p[1] << 8))); }

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

// Element j of the block at p, with GGUF's dequantize_row arithmetic (an fp16
// scale times a small integer is exact in float; K-quants round d * sc once,
// then the product, as gguf does).
float block_element(int32_t w_type, const uint8_t * p, int64_t j) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0:
        return float(int8_t(p[2 + j])) * f16_at(p);
    case MOESH_DTYPE_Q4_0:
    case MOESH_DTYPE_Q4_1: {
        const int off = w_type == MOESH_DTYPE_Q4_0 ? 2 : 4;
        const uint8_t q = p[off + j % 16];
        const int nibble = j < 16 ? (q & 0x0f) : (q >> 4);
        return w_type == MOESH_DTYPE_Q4_0 ? f16_at(p) * float(nibble - 8) : f16_at(p) * float(nibble) + f16_at(p + 2);
    }
    case MOESH_DTYPE_Q4_K:
    case MOESH_DTYPE_Q5_K: {
        const int sub = int(j / 32);
        const int l = int(j % 32);
        int sc = 0, mn = 0;
        k_scale_min(p + 4, sub, sc, mn);
        const uint8_t * qs = p + (w_type == MOESH_DTYPE_Q4_K ? 16 : 48);   // [128]
        int q = (qs[32 * (sub / 2) + l] >> (4 * (sub % 2))) & 0x0f;
        if (w_type == MOESH_DTYPE_Q5_K) {
            q |= ((p[16 + l] >> sub) & 1) << 4;   // qh[l], bit sub
        }
        return f16_at(p) * float(sc) * float(q) - f16_at(p + 2) * float(mn);
    }
    case MOESH_DTYPE_Q6_K: {
        const uint8_t * ql = p;        // [128]
        const uint8_t * qh = p + 128;  // [64]
        const auto * scales = reinterpret_cast<const int8_t *>(p + 192);   // [16]
        const int64_t h = j / 128, r = (j % 128) / 32, l = j % 32;
        const int low = (ql[64 * h + 32 * (r % 2) + l] >> (4 * (r / 2))) & 0x0f;
        const int high = (qh[32 * h + l] >> (2 * r)) & 3;
        return f16_at(p + 208) * float(scales[j / 16]) * float((low | (high << 4)) - 32);
    }
    default:
        throw std::invalid_argument("moesh::ref: not a block dtype");
    }
}

void check_row_length(int32_t w_type, int64_t n) {
    if (is_block_type(w_type) && n % block_shape(w_type).n_elems != 0) {
        throw std::invalid_argument("moesh::ref: a row of a block dtype must be a whole number of blocks");
    }
}

} // namespace

float load_weight(const void * w, int32_t w_type /* moesh_dtype */, int64_t i) {
    switch (w_type) {
    case MOESH_DTYPE_F32:
        return static_cast<const float *>(w)[i];
    case MOESH_DTYPE_F16:
        return f16_to_f32(static_cast<const uint16_t *>(w)[i]);
    case MOESH_DTYPE_BF16:
        return bf16_to_f32(static_cast<const uint16_t *>(w)[i]);
    default:
        break;
    }
    const BlockShape b = block_shape(w_type);
    if (b.n_elems == 0) {
        throw std::invalid_argument("moesh::ref: unknown weight dtype");
    }
    return block_element(w_type, static_cast<const uint8_t *>(w) + size_t(i / b.n_elems) * b.n_bytes, i % b.n_elems);
}

size_t weight_row_bytes(int32_t w_type /* moesh_dtype */, int64_t n) {
    switch (w_type) {
    case MOESH_DTYPE_F32: return size_t(n) * 4;
    case MOESH_DTYPE_F16:
    case MOESH_DTYPE_BF16: return size_t(n) * 2;
    default: break;
    }
    const BlockShape b = block_shape(w_type);
    return b.n_elems != 0 && n % b.n_elems == 0 ? size_t(n / b.n_elems) * b.n_bytes : 0;
}

void load_weight_row(const void * w, int32_t w_type /* moesh_dtype */, int64_t row, int64_t n, float * out) {
    check_row_length(w_type, n);
    if (is_block_type(w_type)) {
        const BlockShape b = block_shape(w_type);
        const uint8_t * p = static_cast<const uint8_t *>(w) + size_t(row) * weight_row_bytes(w_type, n);
        for (int64_t k = 0; k < n / b.n_elems; ++k, p += b.n_bytes) {
            for (int64_t j = 0; j < b.n_elems; ++j) {
                out[k * b.n_elems + j] = block_element(w_type, p, j);
            }
        }
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        out[i] = load_weight(w, w_type, row * n + i);
    }
}

void matmul(const moesh_matmul_args & a) {
    std::vector<float> w(size_t(a.n_in));   // one weight row, widened
    for (int64_t o = 0; o < a.n_out; ++o) {
        load_weight_row(a.w, a.w_type, o, a.n_in, w.data());
        for (int64_t t = 0; t < a.n_tokens; ++t) {
            const float * x = a.x + t * a.x_stride;   // [n_in]
            double sum = a.bias ? a.bias[o] : 0.0;
            for (int64_t i = 0; i < a.n_in; ++i) {
                sum += double(w[size_t(i)]) * x[i];
            }
            a.y[t * a.y_stride + o] = static_cast<float>(sum);
        }
    }
}

void rms_norm(const moesh_rms_norm_args & a) {
    for (int64_t r = 0; r < a.n_rows; ++r) {
        const float * x = a.x + r * a.n;   // [n]
        float * y = a.y + r * a.n;         // [n]
        double sum_sq = 0.0;
        for (int64_t i = 0; i < a.n; ++i) {
            sum_sq += double(x[i]) * x[i];
        }
        const double inv_rms = 1.0 / std::sqrt(sum_sq / double(a.n) + a.eps);
        for (int64_t i = 0; i < a.n; ++i) {
            y[i] = static_cast<float>(x[i] * inv_rms * a.weight[i]);
        }
    }
}

void rope(const moesh_rope_args & a) {
    if (a.mode != MOESH_ROPE_NEOX && a.mode != MOESH_ROPE_NORM) {
        throw std::invalid_argument("moesh::ref: unknown rope mode");
    }
    const int64_t n_half = a.rot_dim / 2;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        for (int64_t i = 0; i < n_half; ++i) {
            // The angle is a float32 product, as in HF transformers; only cos/sin
            // and the rotation are done in double.
            const float theta = static_cast<float>(a.pos[t]) * a.inv_freq[i];
            const double c = std::cos(double(theta)) * a.attn_factor;
            const double s = std::sin(double(theta)) * a.attn_factor;
            const int64_t i0 = a.mode == MOESH_ROPE_NEOX ? i : 2 * i;
            const int64_t i1 = a.mode == MOESH_ROPE_NEOX ? i + n_half : 2 * i + 1;
            for (int64_t h = 0; h < a.n_head; ++h) {
                float * x = a.x + (t * a.n_head + h) * a.head_dim;   // [head_dim]
                const double x0 = x[i0];
                const double x1 = x[i1];
                x[i0] = static_cast<float>(x0 * c - x1 * s);
                x[i1] = static_cast<float>(x0 * s + x1 * c);
            }
        }
    }
}

void expert_ffn(const moesh_expert_ffn_args & a) {
    check_row_length(a.w_type, a.n_embd);
    check_row_length(a.w_type, a.n_ff);
    std::vector<double> h(size_t(a.n_tokens * a.n_ff));   // [n_tokens, n_ff]
    std::vector<float> wg(size_t(a.n_embd));               // one gate row, widened
    std::vector<float> wu(size_t(a.n_embd));               // one up row
    std::vector<float> wd(size_t(a.n_ff));                 // one down row
    for (int64_t f = 0; f < a.n_ff; ++f) {
        load_weight_row(a.gate, a.w_type, f, a.n_embd, wg.data());
        load_weight_row(a.up, a.w_type, f, a.n_embd, wu.data());
        for (int64_t t = 0; t < a.n_tokens; ++t) {
            const float * x = a.x + t * a.n_embd;   // [n_embd]
            double g = 0.0;
            double u = 0.0;
            for (int64_t i = 0; i < a.n_embd; ++i) {
                g += double(wg[size_t(i)]) * x[i];
                u += double(wu[size_t(i)]) * x[i];
            }
            h[size_t(t * a.n_ff + f)] = silu(g) * u;
        }
    }
    // Only now write out, so that out may alias x.
    for (int64_t e = 0; e < a.n_embd; ++e) {
        load_weight_row(a.down, a.w_type, e, a.n_ff, wd.data());
        for (int64_t t = 0; t < a.n_tokens; ++t) {
            const double scale = a.scale ? a.scale[t] : 1.0;
            double d = 0.0;
            for (int64_t f = 0; f < a.n_ff; ++f) {
                d += double(wd[size_t(f)]) * h[size_t(t * a.n_ff + f)];
            }
            float & o = a.out[t * a.n_embd + e];
            o = static_cast<float>(o + scale * d);
        }
    }
}

void softmax(const moesh_softmax_args & a) {
    for (int64_t r = 0; r < a.n_rows; ++r) {
        float * x = a.x + r * a.n;   // [n]
        double max = -std::numeric_limits<double>::infinity();
        for (int64_t i = 0; i < a.n; ++i) {
            max = std::max(max, double(x[i]));
        }
        double sum = 0.0;
        for (int64_t i = 0; i < a.n; ++i) {
            sum += std::exp(double(x[i]) - max);
        }
        for (int64_t i = 0; i < a.n; ++i) {
            x[i] = static_cast<float>(std::exp(double(x[i]) - max) / sum);
        }
    }
}

void quantize_q8_0_block(const float * x, uint8_t * out) {
    float amax = 0.0f;
    for (int j = 0; j < MOESH_QK_BLOCK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16(d);
    std::memcpy(out, &dh, sizeof dh);
    for (int j = 0; j < MOESH_QK_BLOCK; ++j) {
        const float v = std::round(x[j] * id);
        out[2 + j] = uint8_t(int8_t(std::isnan(v) ? 0 : v <= -127.0f ? -127 : v >= 127.0f ? 127 : int(v)));
    }
}

void copy_rows(const moesh_copy_rows_args & a) {
    const bool f16 = a.dst_type == MOESH_DTYPE_F16;
    if (a.dst_type == MOESH_DTYPE_Q8_0) {   // accumulate is 0 (the ABI)
        std::vector<float> row(size_t(a.n_cols));
        for (int64_t i = 0; i < a.n_rows; ++i) {
            const int64_t s = a.src_rows ? a.src_rows[i] : i, d = a.dst_rows ? a.dst_rows[i] : i;
            for (int64_t j = 0; j < a.n_cols; ++j) {
                const float v = a.src ? a.src[s * a.src_stride + j] : 0.0f;
                row[size_t(j)] = a.clamp > 0.0f ? std::clamp(v, -a.clamp, a.clamp) : v;
            }
            uint8_t * dst = static_cast<uint8_t *>(a.dst) + d * (a.dst_stride / MOESH_QK_BLOCK) * 34;
            for (int64_t b = 0; b < a.n_cols / MOESH_QK_BLOCK; ++b) quantize_q8_0_block(row.data() + b * MOESH_QK_BLOCK, dst + b * 34);
        }
        return;
    }
    for (int64_t i = 0; i < a.n_rows; ++i) {
        const int64_t s = a.src_rows ? a.src_rows[i] : i, d = a.dst_rows ? a.dst_rows[i] : i;
        float * dst = f16 ? nullptr : static_cast<float *>(a.dst) + d * a.dst_stride;
        uint16_t * dst16 = f16 ? static_cast<uint16_t *>(a.dst) + d * a.dst_stride : nullptr;
        for (int64_t j = 0; j < a.n_cols; ++j) {
            const float old = !a.accumulate ? 0.0f : f16 ? f16_to_f32(dst16[j]) : dst[j];
            float v = old + (a.src ? a.src[s * a.src_stride + j] : 0.0f);
            if (a.clamp > 0.0f) v = std::clamp(v, -a.clamp, a.clamp);
            if (f16)
                dst16[j] = f32_to_f16(v);
            else
                dst[j] = v;
        }
    }
}

void attention(const moesh_attention_args & a) {
    const int64_t n_group = a.n_head / a.n_head_kv;
    std::vector<double> p(size_t(a.n_kv));   // [n_kv] scores, then weights
    std::vector<double> o(size_t(a.head_dim));
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        const int64_t n_ctx = int64_t(a.pos[t]) + 1;
        for (int64_t h = 0; h < a.n_head; ++h) {
            const int64_t h_kv = h / n_group;
            const float * q = a.q + (t * a.n_head + h) * a.head_dim;   // [head_dim]
            // Element d of the [head_dim] row of pool at cache position pos, as f32.
            auto kv = [&](const void * pool, int64_t pos, int64_t d) {
                const int64_t block = a.block_table[pos / a.block_size];
                const int64_t row = block * a.block_size + pos % a.block_size;
                const int64_t i = (row * a.n_head_kv + h_kv) * a.head_dim + d;
                return a.kv_type == MOESH_DTYPE_F16    ? f16_to_f32(static_cast<const uint16_t *>(pool)[i])
                       : a.kv_type == MOESH_DTYPE_Q8_0 ? load_weight(pool, MOESH_DTYPE_Q8_0, i)
                                                       : static_cast<const float *>(pool)[i];
            };
            double max = -std::numeric_limits<double>::infinity();
            for (int64_t j = 0; j < n_ctx; ++j) {
                double dot = 0.0;
                for (int64_t d = 0; d < a.head_dim; ++d) {
                    dot += double(q[d]) * kv(a.k_pool, j, d);
                }
                p[size_t(j)] = dot * a.scale;
                max = std::max(max, p[size_t(j)]);
            }
            double sum = 0.0;
            for (int64_t j = 0; j < n_ctx; ++j) {
                p[size_t(j)] = std::exp(p[size_t(j)] - max);
                sum += p[size_t(j)];
            }
            std::fill(o.begin(), o.end(), 0.0);
            for (int64_t j = 0; j < n_ctx; ++j) {
                for (int64_t d = 0; d < a.head_dim; ++d) {
                    o[size_t(d)] += p[size_t(j)] * kv(a.v_pool, j, d);
                }
            }
            float * out = a.out + (t * a.n_head + h) * a.head_dim;   // [head_dim]
            for (int64_t d = 0; d < a.head_dim; ++d) {
                out[d] = static_cast<float>(o[size_t(d)] / sum);
            }
        }
    }
}

} // namespace moesh::ref
