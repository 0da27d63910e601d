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
// std::invalid_argument, as does a block dtype (Q8_0 ... Q6_K) with a row
// length that is not a whole number of blocks (32 or 256 elements).
// Thread safety: no shared state; concurrent calls on disjoint outputs are fine.
#pragma once

#include <moesh/plugin.h>

#include <cstddef>
#include <cstdint>

namespace moesh::ref {

// IEEE binary16 and bfloat16 <-> float. Narrowing rounds to nearest, ties to
// even; overflow gives infinity; NaN stays NaN (quiet) with its sign.
float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_f16(float f);
uint16_t f32_to_bf16(float f);

// Element i of a weight matrix of the given dtype, widened to float. For the
// block types i counts elements of the whole matrix, whose rows are whole
// numbers of blocks, so element i is element i % B of block i / B (B = 32 or
// 256, MOESH_QK_BLOCK or MOESH_QK_K).
float load_weight(const void * w, int32_t w_type /* moesh_dtype */, int64_t i);

// Row `row` of a [n_rows, n] weight matrix, widened (dequantized) to float:
// out[0..n). Block types need n to be a whole number of blocks (else
// std::invalid_argument); the values are bit-identical to GGUF's
// dequantize_row (tests/experts checks them against experts/quant.cpp).
void load_weight_row(const void * w, int32_t w_type /* moesh_dtype */, int64_t row, int64_t n, float * out);

// One GGUF Q8_0 block (34 bytes at out) of x[0..32), as GGUF's quantizer writes it:
// d = max|x| / 127 stored as f16, q = round(x / d) (halves away from zero), 0 where d is 0.
void quantize_q8_0_block(const float * x, uint8_t * out);

// Bytes of one row of n elements of w_type (0 for an unknown dtype or for a
// block type when n is not a whole number of blocks).
size_t weight_row_bytes(int32_t w_type /* moesh_dtype */, int64_t n);

void matmul(const moesh_matmul_args & args);
void rms_norm(const moesh_rms_norm_args & args);
void rope(const moesh_rope_args & args);
// Does not touch args.scratch.
void expert_ffn(const moesh_expert_ffn_args & args);
void softmax(const moesh_softmax_args & args);
void attention(const moesh_attention_args & args);
// Indices must be in range (callers check them).
void copy_rows(const moesh_copy_rows_args & args);

} // namespace moesh::ref
