// RMSNorm, RoPE, softmax and paged attention for the CUDA backend. These are
// small next to the weight matrices; they aim at being exact enough for the
// conformance bounds (sums in float with tree reductions, cos/sin in double as
// the reference does) and at keeping every row's work inside one block.
#include "cuda_kernels.h"

#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

namespace moesh::cuda {
namespace {

constexpr int k_block = 256;

// Sum over the block; every thread gets the result. shared: k_block / 32 floats.
__device__ float block_sum(float v, float * shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();   // shared may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_max(float v, float * shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? shared[lane] : -FLT_MAX;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__global__ void rms_norm_kernel(const float * __restrict__ x, const float * __restrict__ w, float * y, int64_t n,
                                float eps) {
    __shared__ float shared[k_block / 32];
    const float * xr = x + blockIdx.x * n;
    float * yr = y + blockIdx.x * n;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s = fmaf(xr[i], xr[i], s);
    s = block_sum(s, shared);
    const float inv = float(1.0 / sqrt(double(s) / double(n) + double(eps)));
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * w[i];   // y may be x
}

// One thread per (token, head, rotated pair).
__global__ void rope_kernel(float * x, const int32_t * __restrict__ pos, const float * __restrict__ inv_freq,
                            int64_t n_tokens, int64_t n_head, int64_t head_dim, int64_t n_half, int32_t mode,
                            float attn_factor) {
    const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k >= n_tokens * n_head * n_half) return;
    const int64_t i = k % n_half;
    const int64_t th = k / n_half;   // token * n_head + head
    const int64_t t = th / n_head;
    // The angle is a float32 product, as in HF transformers; cos/sin in double.
    const float theta = float(pos[t]) * inv_freq[i];
    double s, c;
    sincos(double(theta), &s, &c);
    c *= attn_factor;
    s *= attn_factor;
    const int64_t i0 = mode == MOESH_ROPE_NEOX ? i : 2 * i;
    const int64_t i1 = mode == MOESH_ROPE_NEOX ? i + n_half : 2 * i + 1;
    float * xr = x + th * head_dim;
    const double x0 = xr[i0], x1 = xr[i1];
    xr[i0] = float(x0 * c - x1 * s);
    xr[i1] = float(x0 * s + x1 * c);
}

__global__ void softmax_kernel(float * x, int64_t n) {
    __shared__ float shared[k_block / 32];
    float * xr = x + blockIdx.x * n;
    float m = -FLT_MAX;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += expf(xr[i] - m);
    s = block_sum(s, shared);
    const float inv = 1.0f / s;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) xr[i] = expf(xr[i] - m) * inv;
}

// Attention, flash-decoding style inside one block per (token, head): each warp
// takes every k_warps-th cache position with an online softmax (running max,
// sum and output), lanes splitting head_dim; the warps' partial results are
// merged at the end. Nothing grows with the context but the loop.
constexpr int k_warps = 8;
constexpr int k_max_dims_per_lane = 8;   // head_dim <= 256

// KV pools and copy_rows destinations hold f32 or f16 (kv_type / dst_type, checked by the host side).
__device__ __forceinline__ float kv_load(const float * p, int64_t i) { return p[i]; }
__device__ __forceinline__ float kv_load(const __half * p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void kv_store(float * p, int64_t i, float v) { p[i] = v; }
// Rounded to nearest even as the reference rounds, NaN included: the reference keeps a NaN's sign
// and top payload bits (quiet), where __float2half_rn gives one canonical NaN.
__device__ __forceinline__ void kv_store(__half * p, int64_t i, float v) {
    const uint32_t u = __float_as_uint(v), mag = u & 0x7fffffffu;
    p[i] = mag > 0x7f800000u ? __ushort_as_half((unsigned short)(((u >> 16) & 0x8000u) | 0x7e00u | ((mag >> 13) & 0x3ffu)))
                             : __float2half_rn(v);
}

// One (token t, head h) item of the attention call a, by one block: the body of both kernels, so
// that a run of attention_batch gives the bits its single call gives.
template <class KV>
__device__ __forceinline__ void attend(const moesh_attention_args & a, int64_t t, int64_t h, int32_t * error_flag) {
    const int64_t h_kv = h / (a.n_head / a.n_head_kv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float * q = a.q + (t * a.n_head + h) * a.head_dim;
    const int n_dims = int((a.head_dim + 31) / 32);   // dims per lane: lane + 32 * j
    float qv[k_max_dims_per_lane], acc[k_max_dims_per_lane];
#pragma unroll
    for (int j = 0; j < k_max_dims_per_lane; ++j) {
        const int64_t d = lane + 32 * j;
        qv[j] = j < n_dims && d < a.head_dim ? q[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -FLT_MAX, l = 0.0f;
    const int32_t p_last = a.pos[t];
    const bool bad_pos = p_last < 0 || p_last >= a.n_kv;
    for (int64_t p = warp; !bad_pos && p <= p_last; p += k_warps) {
        const int32_t block = a.block_table[p / a.block_size];
        if (block < 0 || block >= a.n_blocks) {
            if (lane == 0) atomicExch(error_flag, 1);
            break;
        }
        const int64_t row = (int64_t(block) * a.block_size + p % a.block_size) * a.n_head_kv + h_kv;
        const KV * k = static_cast<const KV *>(a.k_pool) + row * a.head_dim;
        const KV * v = static_cast<const KV *>(a.v_pool) + row * a.head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < k_max_dims_per_lane; ++j) {   // unrolled: qv and acc stay in registers
            const int64_t d = lane + 32 * j;
            if (j < n_dims && d < a.head_dim) dot = fmaf(qv[j], kv_load(k, d), dot);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const float s = dot * a.scale;
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new), e = expf(s - m_new);
        l = l * alpha + e;
#pragma unroll
        for (int j = 0; j < k_max_dims_per_lane; ++j) {
            const int64_t d = lane + 32 * j;
            if (j < n_dims) acc[j] = acc[j] * alpha + (d < a.head_dim ? e * kv_load(v, d) : 0.0f);
        }
        m = m_new;
    }
    if (bad_pos && threadIdx.x == 0) atomicExch(error_flag, 1);
    // Merge the warps: scale each to the common max.
    __shared__ float s_m[k_warps], s_l[k_warps];
    __shared__ float s_acc[k_warps][k_max_dims_per_lane * 32];
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < k_max_dims_per_lane; ++j) s_acc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float m_all = -FLT_MAX;
    for (int w = 0; w < k_warps; ++w) m_all = fmaxf(m_all, s_m[w]);
    float l_all = 0.0f;
    for (int w = 0; w < k_warps; ++w) l_all += s_l[w] * expf(s_m[w] - m_all);
    float * out = a.out + (t * a.n_head + h) * a.head_dim;
    for (int64_t d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < k_warps; ++w) o += s_acc[w][d] * expf(s_m[w] - m_all);
        out[d] = bad_pos ? NAN : o / l_all;
    }
}

template <class KV>
__global__ void __launch_bounds__(k_warps * 32)
attention_kernel(moesh_attention_args a, int32_t * error_flag) {
    attend<KV>(a, blockIdx.x / a.n_head, blockIdx.x % a.n_head, error_flag);
}

// attention_batch: the runs travel in the kernel's parameters (4 KiB of them), at most
// k_batch_runs per launch; a block finds its row's run and attends as that run's single call.
constexpr int k_batch_runs = 64;
struct BatchLaunch {
    moesh_attention_args base;        // scale, pools, shape and kv_type of every run
    const float * q;                  // the batch's rows
    const int32_t * pos;
    float * out;
    const int32_t * block_tables;
    int64_t row0;                     // the launch covers rows [row0, row0 + grid / n_head)
    int32_t n_runs;
    moesh_attention_run runs[k_batch_runs];
};
static_assert(sizeof(BatchLaunch) + sizeof(int32_t *) <= 4096, "kernel parameters are limited to 4 KiB");

template <class KV>
__global__ void __launch_bounds__(k_warps * 32)
attention_batch_kernel(BatchLaunch b, int32_t * error_flag) {
    const int64_t row = b.row0 + blockIdx.x / b.base.n_head, h = blockIdx.x % b.base.n_head;
    int r = 0;
    while (r < b.n_runs && b.runs[r].first + b.runs[r].n_tokens <= row) ++r;
    if (r == b.n_runs || row < b.runs[r].first) return;   // a row between runs: no call covers it (the whole block leaves)
    const moesh_attention_run & u = b.runs[r];
    moesh_attention_args a = b.base;
    const int64_t q_row = a.n_head * a.head_dim;
    a.q = b.q + u.first * q_row;
    a.pos = b.pos + u.first;
    a.out = b.out + u.first * q_row;
    a.block_table = b.block_tables + u.table;
    a.n_tokens = u.n_tokens;
    a.n_kv = u.n_kv;
    attend<KV>(a, row - u.first, h, error_flag);
}

// One block per row (the grid strides over rows past 65535); a bad index skips the row and sets the flag.
template <class Dst>
__global__ void copy_rows_kernel(moesh_copy_rows_args a, int32_t * error_flag) {
    for (int64_t i = blockIdx.x; i < a.n_rows; i += gridDim.x) {
        const int64_t s = a.src_rows ? a.src_rows[i] : i;
        const int64_t d = a.dst_rows ? a.dst_rows[i] : i;
        if ((a.src && (s < 0 || s >= a.src_n_rows)) || d < 0 || d >= a.dst_n_rows) {
            if (threadIdx.x == 0) atomicExch(error_flag, 1);
            continue;
        }
        const float * src = a.src ? a.src + s * a.src_stride : nullptr;
        Dst * dst = static_cast<Dst *>(a.dst) + d * a.dst_stride;
        for (int64_t j = threadIdx.x; j < a.n_cols; j += blockDim.x) {
            const float o = a.accumulate ? kv_load(dst, j) : 0.0f, x = src ? src[j] : 0.0f;
            float v = o + x;
            // GPU arithmetic returns one canonical NaN; the host's keeps the NaN operand, as the reference sees it.
            if (v != v) v = o != o ? o : x != x ? x : v;
            // as std::clamp: a NaN stays NaN (fminf/fmaxf would turn it into the bound)
            if (a.clamp > 0.0f) v = v < -a.clamp ? -a.clamp : a.clamp < v ? a.clamp : v;
            kv_store(dst, j, v);
        }
    }
}

} // namespace

cudaError_t launch_copy_rows(const moesh_copy_rows_args & a, int32_t * error_flag, cudaStream_t stream) {
    const int64_t n_grid = a.n_rows < 65535 ? a.n_rows : 65535;
    if (a.dst_type == MOESH_DTYPE_F16)
        copy_rows_kernel<__half><<<unsigned(n_grid), k_block, 0, stream>>>(a, error_flag);
    else
        copy_rows_kernel<float><<<unsigned(n_grid), k_block, 0, stream>>>(a, error_flag);
    return cudaGetLastError();
}

cudaError_t launch_rms_norm(const moesh_rms_norm_args & a, cudaStream_t stream) {
    rms_norm_kernel<<<unsigned(a.n_rows), k_block, 0, stream>>>(a.x, a.weight, a.y, a.n, a.eps);
    return cudaGetLastError();
}

cudaError_t launch_rope(const moesh_rope_args & a, cudaStream_t stream) {
    const int64_t n_half = a.rot_dim / 2;
    const int64_t n = a.n_tokens * a.n_head * n_half;
    if (n == 0) return cudaSuccess;
    rope_kernel<<<unsigned((n + k_block - 1) / k_block), k_block, 0, stream>>>(
        a.x, a.pos, a.inv_freq, a.n_tokens, a.n_head, a.head_dim, n_half, a.mode, a.attn_factor);
    return cudaGetLastError();
}

cudaError_t launch_softmax(const moesh_softmax_args & a, cudaStream_t stream) {
    softmax_kernel<<<unsigned(a.n_rows), k_block, 0, stream>>>(a.x, a.n);
    return cudaGetLastError();
}

int64_t attention_max_head_dim() { return 32 * k_max_dims_per_lane; }

cudaError_t launch_attention_batch(const moesh_attention_batch_args & a, int32_t * error_flag, cudaStream_t stream) {
    BatchLaunch b{};
    b.base.struct_size = sizeof(moesh_attention_args);
    b.base.scale = a.scale;
    b.base.k_pool = a.k_pool;
    b.base.v_pool = a.v_pool;
    b.base.n_head = a.n_head;
    b.base.n_head_kv = a.n_head_kv;
    b.base.head_dim = a.head_dim;
    b.base.block_size = a.block_size;
    b.base.n_blocks = a.n_blocks;
    b.base.kv_type = a.kv_type;
    b.q = a.q;
    b.pos = a.pos;
    b.out = a.out;
    b.block_tables = a.block_tables;
    for (int64_t r0 = 0; r0 < a.n_runs; r0 += k_batch_runs) {
        const int64_t n = a.n_runs - r0 < k_batch_runs ? a.n_runs - r0 : k_batch_runs;
        b.n_runs = int32_t(n);
        for (int64_t i = 0; i < n; ++i) b.runs[i] = a.runs[r0 + i];
        b.row0 = b.runs[0].first;
        const int64_t n_rows = b.runs[n - 1].first + b.runs[n - 1].n_tokens - b.row0;
        const unsigned grid = unsigned(n_rows * a.n_head);   // the host side checked it fits
        if (a.kv_type == MOESH_DTYPE_F16)
            attention_batch_kernel<__half><<<grid, k_warps * 32, 0, stream>>>(b, error_flag);
        else
            attention_batch_kernel<float><<<grid, k_warps * 32, 0, stream>>>(b, error_flag);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

cudaError_t launch_attention(const moesh_attention_args & a, int32_t * error_flag, cudaStream_t stream) {
    if (a.kv_type == MOESH_DTYPE_F16)
        attention_kernel<__half><<<unsigned(a.n_tokens * a.n_head), k_warps * 32, 0, stream>>>(a, error_flag);
    else
        attention_kernel<float><<<unsigned(a.n_tokens * a.n_head), k_warps * 32, 0, stream>>>(a, error_flag);
    return cudaGetLastError();
}

} // namespace moesh::cuda
