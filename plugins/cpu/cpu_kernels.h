// SIMD kernels of the CPU backend (Google Highway, dispatched at run time to
// the best target the CPU offers). Each function does the share of one thread:
// a range of rows, tokens or (token, head) items; cpu_backend.cpp validates the
// arguments and splits the work. Nothing here allocates or throws. These take
// f32, f16 and bf16 weights; the block types are in quant_kernels.h.
#pragma once

#include <moesh/plugin.h>

#include <cstdint>

namespace moesh::cpu {

// Name of the Highway target the kernels dispatch to on this CPU ("AVX2", ...).
const char * simd_target_name();

// With MOESH_CPU_SIMD=portable in the environment, turns off the x86 targets
// from AVX2 up for the whole process, so that the portable code paths run
// (tests use it); returns whether it did. Call before any kernel.
bool apply_simd_limit_from_env();

// Whether activations multiplied with weights of w_type must first be put in
// "kernel layout" (an order that makes widening those weights cheaper; see
// cpu_kernels.cpp). Then matmul's a.x and expert_ffn's a.x must be in it.
bool needs_kernel_layout(int32_t w_type);

// out[r, :] = x[r, :] in the kernel layout for w_type, for r < n_rows.
void to_kernel_layout(int32_t w_type, const float * x, int64_t x_stride, int64_t n, int64_t n_rows,
                      float * out /* [n_rows, n] */);

// y[t, r] for t in [t0, t1), r in [r0, r1).
void matmul_rows(const moesh_matmul_args & a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

// First half of a.scratch, h[n_tokens, n_ff]: h[t, f] = silu(gate[f] . x[t]) * (up[f] . x[t])
// for f in [f0, f1), stored in the kernel layout for the down weights.
void expert_gate_up_rows(const moesh_expert_ffn_args & a, int64_t f0, int64_t f1);

// out[t, e] += scale[t] * (down[e] . h[t]) for e in [e0, e1); h as left by expert_gate_up_rows.
void expert_down_rows(const moesh_expert_ffn_args & a, int64_t e0, int64_t e1);

void rms_norm_rows(const moesh_rms_norm_args & a, int64_t r0, int64_t r1);

void softmax_rows(const moesh_softmax_args & a, int64_t r0, int64_t r1);

// cos_sin: scratch of rot_dim floats for this thread.
void rope_tokens(const moesh_rope_args & a, int64_t t0, int64_t t1, float * cos_sin);

// Items i = t * (n_head / heads_per_item) + g in [i0, i1): token t's query heads
// g * heads_per_item ... (heads_per_item of 1, 2, 4 or 8 dividing n_head / n_head_kv, so
// that they share one kv head and each cache row is read once for them all).
// scores: scratch of heads_per_item * n_kv floats for this thread.
void attention_items(const moesh_attention_args & a, int heads_per_item, int64_t i0, int64_t i1, float * scores);
// The most query heads per item (of 8, 4, 2, 1) that still leaves two items per thread.
int attention_heads_per_item(int64_t n_head, int64_t n_head_kv, int64_t n_tokens, int n_threads);

// copy_rows into an f16 dst (dst_type F16), rows [r0, r1) of the call.
void copy_rows_f16(const moesh_copy_rows_args & a, int64_t r0, int64_t r1);
// copy_rows into a Q8_0 dst (dst_type Q8_0; accumulate 0), rows [r0, r1): each 32 values, clamped,
// quantized by the reference's quantize_q8_0_block, so that both write the same bytes.
void copy_rows_q8_0(const moesh_copy_rows_args & a, int64_t r0, int64_t r1);

} // namespace moesh::cpu
