// Matmul and expert FFN kernels of the CUDA backend: float32 activations and
// outputs, weights f32, f16, bf16, Q8_0, Q4_0 or Q4_K, float32 accumulation.
//
// Decode (<= 8 tokens) is memory-bound, so what matters is that every weight
// byte is read once per launch, coalesced. gemv_kernel gives one warp a
// weight row (two for expert_ffn's gate/up pair, so x is read once for both)
// and walks it in units of 32 elements (quant_math.h), 4 lanes per unit and 8
// units per step, so a warp's loads cover a contiguous stretch of the row. Each
// lane keeps an accumulator per token in registers: the row is read once for
// all tokens. A shuffle reduction finishes the row.
// Prefill reuses each weight across many tokens, so tile_kernel dequantizes a
// 64-row x 32-element weight tile into shared memory per step and multiplies it
// with a 64-token tile, 4 x 4 outputs per thread, plain FMAs.
// Weights are decoded by quant_math.h's piece functions, tested on the host.
// Where the rows and x allow it (checked per launch: "Aligned"), quant bits and
// activations come in wide loads; otherwise a byte or an element at a time,
// since GGUF rows (18- and 34-byte blocks) need not be aligned.
// expert_ffn is two launches on one stream: gate/up -> h (scratch), then
// down . h accumulated into out; stream order makes out == x safe.
#include "plugins/cuda/cuda_kernels.h"

#include "plugins/cuda/quant_math.h"

#include <cstdint>

namespace moesh::cuda {

namespace {

// What a kernel does with a row's dot products.
enum class Epilogue {
    kStore,        // y = w . x + bias
    kSwiGlu,       // y = silu(gate . x) * (up . x)
    kAccumulate,   // y += scale * (w . x)
};

struct MatArgs {
    const uint8_t * w;      // [n_out, row_bytes]; kSwiGlu: the gate rows
    const uint8_t * w_up;   // kSwiGlu: [n_out, row_bytes], the up rows
    const float * x;        // [n_tokens, x_stride]
    float * y;              // [n_tokens, y_stride]
    const float * bias;     // kStore: [n_out] or null
    const float * scale;    // kAccumulate: [n_tokens] or null
    int64_t row_bytes;
    int64_t n_in;
    int64_t n_out;
    int64_t n_tokens;
    int64_t x_stride;
    int64_t y_stride;
};

constexpr int kMaxDecodeTokens = 8;
constexpr int kGemvWarps = 4;         // rows per gemv block
constexpr int kTileRows = 64;
constexpr int kTileTokens = 64;
constexpr int kTileThreads = 256;     // (kTileRows / 4) x (kTileTokens / 4)
constexpr int kTilePad = 4;           // keeps float4 rows of the tiles aligned

MOESH_HD constexpr int n_rows_of(Epilogue e) { return e == Epilogue::kSwiGlu ? 2 : 1; }

// Piece q of unit u of a row (see quant_math.h). Aligned: the row meets
// row_aligned's conditions, so the quant bits come in 2-, 8- or 16-byte loads.
template <int T, bool Aligned>
__device__ __forceinline__ void load_piece(const uint8_t * row, int64_t u, int q, float (&w)[8]) {
    if constexpr (!Aligned) {
        load_piece_bytes(T, row, u, q, w);
    } else if constexpr (T == MOESH_DTYPE_F32) {
        const float4 * p = reinterpret_cast<const float4 *>(row) + (u * kUnit + 8 * q) / 4;
        const float4 a = __ldg(p);
        const float4 b = __ldg(p + 1);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
        w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else if constexpr (T == MOESH_DTYPE_F16 || T == MOESH_DTYPE_BF16) {
        const uint4 v = __ldg(reinterpret_cast<const uint4 *>(row) + (u * kUnit + 8 * q) / 8);
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
        for (int i = 0; i < 4; ++i) {
            const uint16_t lo = uint16_t(words[i] & 0xffff);
            const uint16_t hi = uint16_t(words[i] >> 16);
            w[2 * i] = T == MOESH_DTYPE_F16 ? f16_bits_to_f32(lo) : bf16_bits_to_f32(lo);
            w[2 * i + 1] = T == MOESH_DTYPE_F16 ? f16_bits_to_f32(hi) : bf16_bits_to_f32(hi);
        }
    } else {
        const uint8_t * blk = row + unit_block_offset(T, u);
        const uint8_t * qs = blk + piece_quant_offset(T, u, q);
        if constexpr (T == MOESH_DTYPE_Q4_K) {
            float dl = 0.0f, ml = 0.0f;
            q4_k_sub_scales(blk, int(u % 8), dl, ml);
            const uint2 v = __ldg(reinterpret_cast<const uint2 *>(qs));
            q4_k_piece(dl, ml, v.x, v.y, 4 * int(u % 2), w);
        } else {
            const auto * h = reinterpret_cast<const unsigned short *>(qs);
            const float d = f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short *>(blk)));
            const uint32_t lo = uint32_t(__ldg(h)) | uint32_t(__ldg(h + 1)) << 16;
            if constexpr (T == MOESH_DTYPE_Q8_0) {
                q8_0_piece(d, lo, uint32_t(__ldg(h + 2)) | uint32_t(__ldg(h + 3)) << 16, w);
            } else {
                q4_0_piece(d, lo, w);
            }
        }
    }
}

template <bool Aligned>
__device__ __forceinline__ float4 load_x4(const float * p) {
    if constexpr (Aligned) {
        return __ldg(reinterpret_cast<const float4 *>(p));
    } else {
        return make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
    }
}

__device__ __forceinline__ float dot4(const float * w /* [4] */, float4 x, float acc) {
    acc = fmaf(w[0], x.x, acc);
    acc = fmaf(w[1], x.y, acc);
    acc = fmaf(w[2], x.z, acc);
    return fmaf(w[3], x.w, acc);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// v: row o's dot product with token t (gate's for kSwiGlu); v_up: up's.
template <Epilogue E>
__device__ __forceinline__ void store(const MatArgs & a, int64_t t, int64_t o, float v, float v_up) {
    float * y = a.y + t * a.y_stride + o;
    if constexpr (E == Epilogue::kStore) {
        *y = v + (a.bias ? a.bias[o] : 0.0f);
    } else if constexpr (E == Epilogue::kSwiGlu) {
        *y = v / (1.0f + expf(-v)) * v_up;
    } else {
        *y += (a.scale ? a.scale[t] : 1.0f) * v;
    }
}

// One warp per output row, NT >= n_tokens accumulators per lane.
template <int T, bool Aligned, int NT, Epilogue E>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const MatArgs a) {
    constexpr int R = n_rows_of(E);
    const int lane = int(threadIdx.x % 32);
    const int64_t o = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
    if (o >= a.n_out) {
        return;   // the whole warp: no shuffle waits for it
    }
    const uint8_t * rows[R];
    rows[0] = a.w + o * a.row_bytes;
    if constexpr (R == 2) {
        rows[1] = a.w_up + o * a.row_bytes;
    }
    float acc[R][NT] = {};
    const int q = lane % kPieces;
    const int64_t n_units = a.n_in / kUnit;
    for (int64_t u = lane / kPieces; u < n_units; u += 32 / kPieces) {
        float w[R][8];
        for (int r = 0; r < R; ++r) {
            load_piece<T, Aligned>(rows[r], u, q, w[r]);
        }
        for (int t = 0; t < NT; ++t) {
            if (t < a.n_tokens) {
                const float * xu = a.x + t * a.x_stride + u * kUnit;   // [32]
                for (int g = 0; g < 2; ++g) {
                    const float4 xv = load_x4<Aligned>(xu + piece_offset(T, q, g));
                    for (int r = 0; r < R; ++r) {
                        acc[r][t] = dot4(w[r] + 4 * g, xv, acc[r][t]);
                    }
                }
            }
        }
    }
    if constexpr (!is_block_type(T)) {
        // plain rows need not be whole units
        for (int64_t i = n_units * kUnit + lane; i < a.n_in; i += 32) {
            float w[R];
            for (int r = 0; r < R; ++r) {
                w[r] = row_element(T, rows[r], i);
            }
            for (int t = 0; t < NT; ++t) {
                if (t < a.n_tokens) {
                    const float xi = __ldg(a.x + t * a.x_stride + i);
                    for (int r = 0; r < R; ++r) {
                        acc[r][t] = fmaf(w[r], xi, acc[r][t]);
                    }
                }
            }
        }
    }
    for (int t = 0; t < NT; ++t) {
        for (int r = 0; r < R; ++r) {
            acc[r][t] = warp_sum(acc[r][t]);
        }
    }
    if (lane == 0) {
        for (int t = 0; t < NT; ++t) {
            if (t < a.n_tokens) {
                store<E>(a, t, o, acc[0][t], acc[R - 1][t]);
            }
        }
    }
}

// A kTileRows x kTileTokens block of outputs per thread block, 32 inputs per step.
template <int T, bool Aligned, Epilogue E>
__global__ void __launch_bounds__(kTileThreads) tile_kernel(const MatArgs a) {
    constexpr int R = n_rows_of(E);
    __shared__ __align__(16) float ws[R][kUnit][kTileRows + kTilePad];   // weights, [k][row]
    __shared__ __align__(16) float xs[kUnit][kTileTokens + kTilePad];    // activations, [k][token]

    const int tid = int(threadIdx.x);
    const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
    const int64_t tok0 = int64_t(blockIdx.y) * kTileTokens;

    // Loading: thread (tid / 4, tid % 4) fetches piece tid % 4 of weight row
    // tid / 4 and 8 inputs of token tid / 4.
    const int lr = tid / kPieces;
    const int lq = tid % kPieces;
    const bool row_ok = row0 + lr < a.n_out;
    const bool tok_ok = tok0 + lr < a.n_tokens;
    const int64_t lrow = row_ok ? row0 + lr : 0;
    const uint8_t * rows[R];
    rows[0] = a.w + lrow * a.row_bytes;
    if constexpr (R == 2) {
        rows[1] = a.w_up + lrow * a.row_bytes;
    }
    const float * xrow = a.x + (tok_ok ? tok0 + lr : 0) * a.x_stride;   // [n_in]

    // Computing: rows fastest across threads, so a warp's output stores are contiguous.
    const int cr = (tid % (kTileRows / 4)) * 4;
    const int ct = (tid / (kTileRows / 4)) * 4;
    float acc[R][4][4] = {};

    for (int64_t k0 = 0; k0 < a.n_in; k0 += kUnit) {
        const bool full = is_block_type(T) || k0 + kUnit <= a.n_in;
        for (int r = 0; r < R; ++r) {
            float w[8];
            if (row_ok && full) {
                load_piece<T, Aligned>(rows[r], k0 / kUnit, lq, w);
            } else {
                for (int i = 0; i < 8; ++i) {
                    const int64_t e = k0 + piece_offset(T, lq, i / 4) + i % 4;
                    w[i] = row_ok && e < a.n_in ? row_element(T, rows[r], e) : 0.0f;
                }
            }
            for (int i = 0; i < 8; ++i) {
                ws[r][piece_offset(T, lq, i / 4) + i % 4][lr] = w[i];
            }
        }
        for (int g = 0; g < 2; ++g) {
            const int k = 8 * lq + 4 * g;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (tok_ok && full) {
                v = load_x4<Aligned>(xrow + k0 + k);
            } else if (tok_ok) {
                const float * p = xrow + k0 + k;
                const int64_t left = a.n_in - (k0 + k);
                v.x = left > 0 ? __ldg(p) : 0.0f;
                v.y = left > 1 ? __ldg(p + 1) : 0.0f;
                v.z = left > 2 ? __ldg(p + 2) : 0.0f;
                v.w = left > 3 ? __ldg(p + 3) : 0.0f;
            }
            xs[k][lr] = v.x;
            xs[k + 1][lr] = v.y;
            xs[k + 2][lr] = v.z;
            xs[k + 3][lr] = v.w;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kUnit; ++k) {
            const float4 xv = *reinterpret_cast<const float4 *>(&xs[k][ct]);
            const float xk[4] = {xv.x, xv.y, xv.z, xv.w};
            for (int r = 0; r < R; ++r) {
                const float4 wv = *reinterpret_cast<const float4 *>(&ws[r][k][cr]);
                const float wk[4] = {wv.x, wv.y, wv.z, wv.w};
                for (int i = 0; i < 4; ++i) {
                    for (int j = 0; j < 4; ++j) {
                        acc[r][i][j] = fmaf(wk[i], xk[j], acc[r][i][j]);
                    }
                }
            }
        }
        __syncthreads();
    }

    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
            const int64_t o = row0 + cr + i;
            const int64_t t = tok0 + ct + j;
            if (o < a.n_out && t < a.n_tokens) {
                store<E>(a, t, o, acc[0][i][j], acc[R - 1][i][j]);
            }
        }
    }
}

bool is_aligned(const void * p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// Whether every row of a [n_out, n_in] matrix of type t at w allows
// load_piece<t, true>'s wide loads.
bool row_aligned(int32_t t, const void * w, int64_t n_in) {
    switch (t) {
    case MOESH_DTYPE_F32: return is_aligned(w, 16) && n_in % 4 == 0;
    case MOESH_DTYPE_F16:
    case MOESH_DTYPE_BF16: return is_aligned(w, 16) && n_in % 8 == 0;
    case MOESH_DTYPE_Q8_0:
    case MOESH_DTYPE_Q4_0: return is_aligned(w, 2);
    default: return is_aligned(w, 8);   // Q4_K: 144-byte blocks keep 8-byte alignment
    }
}

// Whether every row of x allows float4 loads at multiples of 4 elements.
bool x_aligned(const float * x, int64_t x_stride) { return is_aligned(x, 16) && x_stride % 4 == 0; }

template <int T, bool Aligned, Epilogue E>
void launch_gemv(const MatArgs & a, cudaStream_t stream) {
    const dim3 grid(unsigned((a.n_out + kGemvWarps - 1) / kGemvWarps));
    const dim3 block(kGemvWarps * 32);
    if (a.n_tokens <= 1) {
        gemv_kernel<T, Aligned, 1, E><<<grid, block, 0, stream>>>(a);
    } else if (a.n_tokens <= 2) {
        gemv_kernel<T, Aligned, 2, E><<<grid, block, 0, stream>>>(a);
    } else if (a.n_tokens <= 4) {
        gemv_kernel<T, Aligned, 4, E><<<grid, block, 0, stream>>>(a);
    } else {
        gemv_kernel<T, Aligned, kMaxDecodeTokens, E><<<grid, block, 0, stream>>>(a);
    }
}

template <int T, bool Aligned, Epilogue E>
void launch_aligned(const MatArgs & a, cudaStream_t stream) {
    if (a.n_tokens <= kMaxDecodeTokens) {
        launch_gemv<T, Aligned, E>(a, stream);
        return;
    }
    const dim3 grid(unsigned((a.n_out + kTileRows - 1) / kTileRows),
                    unsigned((a.n_tokens + kTileTokens - 1) / kTileTokens));
    tile_kernel<T, Aligned, E><<<grid, kTileThreads, 0, stream>>>(a);
}

template <int T, Epilogue E>
void launch_typed(const MatArgs & a, bool aligned, cudaStream_t stream) {
    if (aligned) {
        launch_aligned<T, true, E>(a, stream);
    } else {
        launch_aligned<T, false, E>(a, stream);
    }
}

template <Epilogue E>
cudaError_t launch(int32_t w_type, const MatArgs & a, cudaStream_t stream) {
    const bool aligned = row_aligned(w_type, a.w, a.n_in) && (!a.w_up || row_aligned(w_type, a.w_up, a.n_in)) &&
                         x_aligned(a.x, a.x_stride);
    switch (w_type) {
    case MOESH_DTYPE_F32: launch_typed<MOESH_DTYPE_F32, E>(a, aligned, stream); break;
    case MOESH_DTYPE_F16: launch_typed<MOESH_DTYPE_F16, E>(a, aligned, stream); break;
    case MOESH_DTYPE_BF16: launch_typed<MOESH_DTYPE_BF16, E>(a, aligned, stream); break;
    case MOESH_DTYPE_Q8_0: launch_typed<MOESH_DTYPE_Q8_0, E>(a, aligned, stream); break;
    case MOESH_DTYPE_Q4_0: launch_typed<MOESH_DTYPE_Q4_0, E>(a, aligned, stream); break;
    case MOESH_DTYPE_Q4_K: launch_typed<MOESH_DTYPE_Q4_K, E>(a, aligned, stream); break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

} // namespace

bool matmul_supports(int32_t w_type) {
    switch (w_type) {
    case MOESH_DTYPE_F32:
    case MOESH_DTYPE_F16:
    case MOESH_DTYPE_BF16:
    case MOESH_DTYPE_Q8_0:
    case MOESH_DTYPE_Q4_0:
    case MOESH_DTYPE_Q4_K: return true;
    default: return false;
    }
}

cudaError_t launch_matmul(const moesh_matmul_args & a, cudaStream_t stream) {
    MatArgs m{};
    m.w = static_cast<const uint8_t *>(a.w);
    m.x = a.x;
    m.y = a.y;
    m.bias = a.bias;
    m.row_bytes = row_bytes(a.w_type, a.n_in);
    m.n_in = a.n_in;
    m.n_out = a.n_out;
    m.n_tokens = a.n_tokens;
    m.x_stride = a.x_stride;
    m.y_stride = a.y_stride;
    return launch<Epilogue::kStore>(a.w_type, m, stream);
}

cudaError_t launch_expert_ffn(const moesh_expert_ffn_args & a, cudaStream_t stream) {
    float * h = a.scratch;   // [n_tokens, n_ff], the first half of scratch

    MatArgs gate_up{};
    gate_up.w = static_cast<const uint8_t *>(a.gate);
    gate_up.w_up = static_cast<const uint8_t *>(a.up);
    gate_up.x = a.x;
    gate_up.y = h;
    gate_up.row_bytes = row_bytes(a.w_type, a.n_embd);
    gate_up.n_in = a.n_embd;
    gate_up.n_out = a.n_ff;
    gate_up.n_tokens = a.n_tokens;
    gate_up.x_stride = a.n_embd;
    gate_up.y_stride = a.n_ff;
    const cudaError_t err = launch<Epilogue::kSwiGlu>(a.w_type, gate_up, stream);
    if (err != cudaSuccess) {
        return err;
    }

    MatArgs down{};
    down.w = static_cast<const uint8_t *>(a.down);
    down.x = h;
    down.y = a.out;
    down.scale = a.scale;
    down.row_bytes = row_bytes(a.w_type, a.n_ff);
    down.n_in = a.n_ff;
    down.n_out = a.n_embd;
    down.n_tokens = a.n_tokens;
    down.x_stride = a.n_ff;
    down.y_stride = a.n_embd;
    return launch<Epilogue::kAccumulate>(a.w_type, down, stream);
}

} // namespace moesh::cuda
