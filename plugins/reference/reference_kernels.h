// Reference kernels: one plain scalar function per backend op, taking the same
// argument structs as the plugin ABI (moesh/plugin.h). Sums are accumulated in
// double and rounded to float once, so these are the oracle every backend is
// compared against (tests/plugins/conformance), not something to run fast.
//
//     moesh_matmul_args a = {sizeof a, MOESH_DTYPE_BF16, w, nullptr, x, y, n_in, n_out, 1, n_in, n_out};
//     moesh::ref::matmul(a);
//     uint16_t h = moesh::ref::f32_to_f16(0.1f);  // round-to-nearest-even
//
// The functions assume valid arguments (the plugins validate theirs; struct_size
// and reserved are not looked at); an unknown weight dtype or rope mode throws
// std::invalid_argument.
// Thread safety: no shared state; concurrent calls on disjoint outputs are fine.
#pragma once

#include <moesh/plugin.h>

#include <cstdint>

namespace moesh::ref {

// IEEE binary16 and bfloat16 <-> float. Narrowing rounds to nearest, ties to
// even; overflow gives infinity; NaN stays NaN (quiet) with its sign.
float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_f16(float f);
uint16_t f32_to_bf16(float f);

// Element i of a weight matrix of the given dtype, widened to float.
float load_weight(const void * w, int32_t w_type /* moesh_dtype */, int64_t i);

void matmul(const moesh_matmul_args & args);
void rms_norm(const moesh_rms_norm_args & args);
void rope(const moesh_rope_args & args);
// Does not touch args.scratch.
void expert_ffn(const moesh_expert_ffn_args & args);
void softmax(const moesh_softmax_args & args);
void attention(const moesh_attention_args & args);

} // namespace moesh::ref
