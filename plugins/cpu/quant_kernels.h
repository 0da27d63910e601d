// Integer kernels of the CPU backend for block-quantized weights (MOESH_DTYPE_Q8_0
// ... Q6_K): activations are quantized on the fly to 8 bits, one scale per
// weight block (32 values, as ggml's Q8_0 activations; 256 for the K-quants,
// as ggml's Q8_K), and multiplied with the weights' small integers in
// 8/16-bit SIMD arithmetic (AVX2 maddubs/madd), scaled to float once per 32
// values (K-quants with several tokens: once per 256). Results differ from a
// float dot product by the rounding of the activations (at most 1/254 of the
// largest magnitude in each activation block, per element).
//
//     // buf: quant_acts_bytes(n_in, n_tokens); panel: quant_panel_bytes(n_in), one per thread
//     QuantActs xq = quant_acts_at(buf, n_in, n_tokens, quant_block_elems(w_type));
//     quantize_acts(x, x_stride, 0, n_tokens, xq);
//     quant_matmul_rows(args, xq, r0, r1, t0, t1, panel);
//
// Decode (one token) multiplies 4 weight rows at a time straight from their
// bytes, unpacking in registers (AVX2). Several tokens first unpack each block
// of 4 rows into a per-thread "panel" (one byte per weight, plus scales and
// offsets), which a 4-row x 2-token kernel then reads for every token pair.
// Nothing here allocates or throws.
// Thread safety: distinct threads need distinct panels and disjoint outputs.
#pragma once

#include <moesh/plugin.h>

#include <cstddef>
#include <cstdint>

namespace moesh::cpu {

// Whether w_type is one of the block types these kernels take (packed ones too).
bool is_quant_type(int32_t w_type);
// Elements per block of w_type (32 or 256); 0 when not a block type.
int64_t quant_block_elems(int32_t w_type);

// Packed weights (w_type | MOESH_DTYPE_PACKED; layout in quant_kernels.cpp):
// Q4_0 and Q8_0 rows interleaved 8 at a time, so one SIMD multiply serves 8
// rows. A 64-byte header records the type and shape, checked by every op.
bool is_packable(int32_t w_type);
// Bytes of a packed [n_rows, n_cols] matrix; 0 when w_type is not packed or
// the shape is invalid (n_cols not a multiple of 32, overflow).
size_t packed_bytes(int32_t w_type, int64_t n_rows, int64_t n_cols);
void pack_header(int32_t w_type, int64_t n_rows, int64_t n_cols, void * dst);
// Tiles [tile0, tile1) of the 8-row tiles of w into dst (after its header).
void pack_tiles(int32_t w_type, const void * w, int64_t n_rows, int64_t n_cols, void * dst, int64_t tile0,
                int64_t tile1);
// Whether the header at w says w_type (without the flag) and this shape.
bool packed_matches(const void * w, int32_t w_type, int64_t n_rows, int64_t n_cols);

// Quantized activations, rows of n values (n a multiple of 32), with
// ng8 = n / 32 rounded up to a multiple of 8 (the padding is zero). Each run
// of scale_groups groups of 32 (1, or 8 for K-quant weights) shares a scale.
struct QuantActs {
    int8_t * q;     // [n_rows, n], round(x / d) in [-127, 127]
    float * d;      // [n_rows, ng8] scale of each group of 32
    float * s32;    // [n_rows, ng8] d * (sum of q over the group)
    float * s16;    // [n_rows, 2 * ng8] d * (sum of q over each half-group of 16)
    int64_t n;
    int64_t ng8;
    int64_t scale_groups;
};

// The rows from r on of a, as a QuantActs of its own (no copy).
inline QuantActs quant_rows_from(const QuantActs & a, int64_t r) {
    QuantActs v = a;
    v.q += r * a.n;
    v.d += r * a.ng8;
    v.s32 += r * a.ng8;
    v.s16 += r * 2 * a.ng8;
    return v;
}

size_t quant_acts_bytes(int64_t n, int64_t n_rows);
// Lays a QuantActs over mem (4-byte aligned, quant_acts_bytes(n, n_rows) bytes)
// for weights of scale_block values per block (32 or 256; n a multiple of it).
QuantActs quant_acts_at(void * mem, int64_t n, int64_t n_rows, int64_t scale_block);

// Rows r0..r1 of x (row r at x + r * x_stride, n values) into rows r0..r1 of out.
void quantize_acts(const float * x, int64_t x_stride, int64_t r0, int64_t r1, const QuantActs & out);

// Bytes of one thread's panel for rows of n_in values.
size_t quant_panel_bytes(int64_t n_in);

// y[t, r] = w[r] . x[t] (+ bias[r]) for r in [r0, r1), t in [t0, t1); xq holds
// a.x quantized (all a.n_tokens rows).
void quant_matmul_rows(const moesh_matmul_args & a, const QuantActs & xq, int64_t r0, int64_t r1, int64_t t0,
                       int64_t t1, void * panel);

// For features f in [f0, f1), f0 and f1 multiples of hq's scale block (or f1 = n_ff):
// h[t, f] = silu(gate[f] . x[t]) * (up[f] . x[t]) into the first half of
// a.scratch, then those groups of h quantized into hq.
void quant_gate_up_rows(const moesh_expert_ffn_args & a, const QuantActs & xq, int64_t f0, int64_t f1,
                        void * panel, const QuantActs & hq);

// out[o, e] += scale[t] * (down[e] . h[t]) for e in [e0, e1), h as quantized in hq,
// o = out_rows[t] (t when out_rows is null).
void quant_down_rows(const moesh_expert_ffn_args & a, const QuantActs & hq, int64_t e0, int64_t e1, void * panel,
                     const int32_t * out_rows = nullptr);

} // namespace moesh::cpu
