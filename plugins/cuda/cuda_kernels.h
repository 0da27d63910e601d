// Kernel launchers of the CUDA backend plugin. Each enqueues its work on
// `stream` and returns the launch's status (cudaGetLastError); nothing here
// allocates or synchronizes. Arguments are validated by cuda_backend.cpp
// before these are called: every pointer is device memory of the right size,
// shapes are positive, block-type rows are whole blocks, strides >= widths.
#pragma once

#include <moesh/plugin.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace moesh::cuda {

// ---- matmul_kernels.cu ----
// Weight types matmul and expert_ffn take: f32, f16, bf16, q8_0, q4_0, q4_K.
bool matmul_supports(int32_t w_type);
// y[t, o] = x[t, :] . w[o, :] (+ bias[o]), as moesh_matmul_args documents.
cudaError_t launch_matmul(const moesh_matmul_args & a, cudaStream_t stream);
// out[t, :] += scale[t] * down(silu(gate . x[t]) * (up . x[t])); a.scratch
// holds [2, n_tokens, n_ff] floats. out may equal x.
cudaError_t launch_expert_ffn(const moesh_expert_ffn_args & a, cudaStream_t stream);

// ---- elementwise_kernels.cu ----
cudaError_t launch_rms_norm(const moesh_rms_norm_args & a, cudaStream_t stream);
cudaError_t launch_rope(const moesh_rope_args & a, cudaStream_t stream);
cudaError_t launch_softmax(const moesh_softmax_args & a, cudaStream_t stream);
// pos and block_table are device memory too, so they are checked in the
// kernel: a position outside [0, n_kv) or a block id outside [0, n_blocks)
// sets *error_flag (device memory) to 1 and makes that output NaN.
cudaError_t launch_attention(const moesh_attention_args & a, int32_t * error_flag, cudaStream_t stream);
// Every run as launch_attention would do it, in a launch per 64 runs; runs (host memory) are
// checked by the caller: ordered, not overlapping, n_tokens * n_head of a launch fits in 32 bits.
cudaError_t launch_attention_batch(const moesh_attention_batch_args & a, int32_t * error_flag, cudaStream_t stream);
// dst rows (=|+=) src rows as moesh_copy_rows_args says; n_rows > 0. Indices
// are checked in the kernel: a bad one skips its row and sets *error_flag.
cudaError_t launch_copy_rows(const moesh_copy_rows_args & a, int32_t * error_flag, cudaStream_t stream);
// Largest head_dim launch_attention handles.
int64_t attention_max_head_dim();

} // namespace moesh::cuda
