// Pins the plugin ABI layout: a reordered, resized or inserted member of any table or
// argument struct breaks the build here instead of breaking every plugin built before it.
// The numbers are for LP64 (Linux/macOS on x86-64 and AArch64); members are only appended,
// so a new member adds lines and a new size, never changes an existing line.
// tests/plugins/abi_c_test.c holds the same pins for the C compiler.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moesh/plugin.h"

// No enum in the ABI's storage or signatures: these are int32_t.
static_assert(std::is_same_v<moesh_status, int32_t>, "moesh_status must be int32_t");
static_assert(std::is_same_v<decltype(moesh_matmul_args::w_type), int32_t> &&
                  std::is_same_v<decltype(moesh_expert_ffn_args::w_type), int32_t> &&
                  std::is_same_v<decltype(moesh_rope_args::mode), int32_t>,
              "enum-valued members must be int32_t");
static_assert(std::is_same_v<decltype(moesh_backend_iface::supports),
                             int32_t (*)(moesh_backend *, int32_t, int32_t)> &&
                  std::is_same_v<decltype(moesh_host_api::log), void (*)(void *, int32_t, const char *)>,
              "enum-valued parameters must be int32_t");

// Enum values are ABI too: a stored int32_t means the same thing on both sides
static_assert(MOESH_OK == 0, "MOESH_OK changed value");
static_assert(MOESH_ERR_INVALID_ARGUMENT == 1, "MOESH_ERR_INVALID_ARGUMENT changed value");
static_assert(MOESH_ERR_UNSUPPORTED == 2, "MOESH_ERR_UNSUPPORTED changed value");
static_assert(MOESH_ERR_OUT_OF_MEMORY == 3, "MOESH_ERR_OUT_OF_MEMORY changed value");
static_assert(MOESH_ERR_INTERNAL == 4, "MOESH_ERR_INTERNAL changed value");
static_assert(MOESH_ERR_ABI_MISMATCH == 5, "MOESH_ERR_ABI_MISMATCH changed value");
static_assert(MOESH_DTYPE_F32 == 0, "MOESH_DTYPE_F32 changed value");
static_assert(MOESH_DTYPE_F16 == 1, "MOESH_DTYPE_F16 changed value");
static_assert(MOESH_DTYPE_BF16 == 2, "MOESH_DTYPE_BF16 changed value");
static_assert(MOESH_DTYPE_COUNT_V1 == 3, "MOESH_DTYPE_COUNT_V1 changed value");
static_assert(MOESH_DTYPE_Q8_0 == 3, "MOESH_DTYPE_Q8_0 changed value");
static_assert(MOESH_DTYPE_Q4_0 == 4, "MOESH_DTYPE_Q4_0 changed value");
static_assert(MOESH_DTYPE_Q4_1 == 5, "MOESH_DTYPE_Q4_1 changed value");
static_assert(MOESH_DTYPE_Q4_K == 6, "MOESH_DTYPE_Q4_K changed value");
static_assert(MOESH_DTYPE_Q5_K == 7, "MOESH_DTYPE_Q5_K changed value");
static_assert(MOESH_DTYPE_Q6_K == 8, "MOESH_DTYPE_Q6_K changed value");
static_assert(MOESH_OP_MATMUL == 0, "MOESH_OP_MATMUL changed value");
static_assert(MOESH_OP_RMS_NORM == 1, "MOESH_OP_RMS_NORM changed value");
static_assert(MOESH_OP_ROPE == 2, "MOESH_OP_ROPE changed value");
static_assert(MOESH_OP_EXPERT_FFN == 3, "MOESH_OP_EXPERT_FFN changed value");
static_assert(MOESH_OP_SOFTMAX == 4, "MOESH_OP_SOFTMAX changed value");
static_assert(MOESH_OP_ATTENTION == 5, "MOESH_OP_ATTENTION changed value");
static_assert(MOESH_OP_COUNT_V1 == 6, "MOESH_OP_COUNT_V1 changed value");
static_assert(MOESH_LOG_DEBUG == 0, "MOESH_LOG_DEBUG changed value");
static_assert(MOESH_LOG_INFO == 1, "MOESH_LOG_INFO changed value");
static_assert(MOESH_LOG_WARN == 2, "MOESH_LOG_WARN changed value");
static_assert(MOESH_LOG_ERROR == 3, "MOESH_LOG_ERROR changed value");
static_assert(MOESH_ROPE_NEOX == 0, "MOESH_ROPE_NEOX changed value");
static_assert(MOESH_ROPE_NORM == 1, "MOESH_ROPE_NORM changed value");

#if defined(__LP64__)

// moesh_backend_iface
static_assert(offsetof(moesh_backend_iface, abi_version) == 0, "moesh_backend_iface.abi_version moved");
static_assert(offsetof(moesh_backend_iface, struct_size) == 4, "moesh_backend_iface.struct_size moved");
static_assert(offsetof(moesh_backend_iface, name) == 8, "moesh_backend_iface.name moved");
static_assert(offsetof(moesh_backend_iface, host_memory) == 16, "moesh_backend_iface.host_memory moved");
static_assert(offsetof(moesh_backend_iface, create) == 24, "moesh_backend_iface.create moved");
static_assert(offsetof(moesh_backend_iface, destroy) == 32, "moesh_backend_iface.destroy moved");
static_assert(offsetof(moesh_backend_iface, last_error) == 40, "moesh_backend_iface.last_error moved");
static_assert(offsetof(moesh_backend_iface, memory_info) == 48, "moesh_backend_iface.memory_info moved");
static_assert(offsetof(moesh_backend_iface, buffer_alloc) == 56, "moesh_backend_iface.buffer_alloc moved");
static_assert(offsetof(moesh_backend_iface, buffer_free) == 64, "moesh_backend_iface.buffer_free moved");
static_assert(offsetof(moesh_backend_iface, copy_to_device) == 72, "moesh_backend_iface.copy_to_device moved");
static_assert(offsetof(moesh_backend_iface, copy_to_host) == 80, "moesh_backend_iface.copy_to_host moved");
static_assert(offsetof(moesh_backend_iface, synchronize) == 88, "moesh_backend_iface.synchronize moved");
static_assert(offsetof(moesh_backend_iface, supports) == 96, "moesh_backend_iface.supports moved");
static_assert(offsetof(moesh_backend_iface, matmul) == 104, "moesh_backend_iface.matmul moved");
static_assert(offsetof(moesh_backend_iface, rms_norm) == 112, "moesh_backend_iface.rms_norm moved");
static_assert(offsetof(moesh_backend_iface, rope) == 120, "moesh_backend_iface.rope moved");
static_assert(offsetof(moesh_backend_iface, expert_ffn) == 128, "moesh_backend_iface.expert_ffn moved");
static_assert(offsetof(moesh_backend_iface, softmax) == 136, "moesh_backend_iface.softmax moved");
static_assert(offsetof(moesh_backend_iface, attention) == 144, "moesh_backend_iface.attention moved");
// Optional slots appended in ABI v1 (a v1 table may end at attention).
static_assert(offsetof(moesh_backend_iface, packed_size) == 152, "moesh_backend_iface.packed_size moved");
static_assert(offsetof(moesh_backend_iface, pack_weights) == 160, "moesh_backend_iface.pack_weights moved");
static_assert(offsetof(moesh_backend_iface, copy_rows) == 168, "moesh_backend_iface.copy_rows moved");
static_assert(offsetof(moesh_backend_iface, moe_ffn) == 176, "moesh_backend_iface.moe_ffn moved");
static_assert(offsetof(moesh_backend_iface, attention_batch) == 184, "moesh_backend_iface.attention_batch moved");
static_assert(offsetof(moesh_backend_iface, copy_to_device_async) == 192, "moesh_backend_iface.copy_to_device_async moved");
static_assert(offsetof(moesh_backend_iface, copy_wait) == 200, "moesh_backend_iface.copy_wait moved");
static_assert(offsetof(moesh_backend_iface, copy_elapsed) == 208, "moesh_backend_iface.copy_elapsed moved");
static_assert(sizeof(moesh_backend_iface) == 216, "moesh_backend_iface changed size");
static_assert(sizeof(moesh_attention_run) == 32, "moesh_attention_run changed size");
static_assert(offsetof(moesh_attention_batch_args, scale) == 4, "moesh_attention_batch_args.scale moved");
static_assert(offsetof(moesh_attention_batch_args, q) == 8, "moesh_attention_batch_args.q moved");
static_assert(offsetof(moesh_attention_batch_args, runs) == 56, "moesh_attention_batch_args.runs moved");
static_assert(offsetof(moesh_attention_batch_args, n_tokens) == 64, "moesh_attention_batch_args.n_tokens moved");
static_assert(offsetof(moesh_attention_batch_args, n_blocks) == 120, "moesh_attention_batch_args.n_blocks moved");
static_assert(offsetof(moesh_attention_batch_args, kv_type) == 128, "moesh_attention_batch_args.kv_type moved");
static_assert(sizeof(moesh_attention_batch_args) == 136, "moesh_attention_batch_args changed size");

// moesh_host_api
static_assert(offsetof(moesh_host_api, abi_version) == 0, "moesh_host_api.abi_version moved");
static_assert(offsetof(moesh_host_api, struct_size) == 4, "moesh_host_api.struct_size moved");
static_assert(offsetof(moesh_host_api, ctx) == 8, "moesh_host_api.ctx moved");
static_assert(offsetof(moesh_host_api, log) == 16, "moesh_host_api.log moved");
static_assert(sizeof(moesh_host_api) == 24, "moesh_host_api changed size");

// moesh_backend_params
static_assert(offsetof(moesh_backend_params, struct_size) == 0, "moesh_backend_params.struct_size moved");
static_assert(offsetof(moesh_backend_params, n_threads) == 4, "moesh_backend_params.n_threads moved");
static_assert(offsetof(moesh_backend_params, activations) == 8, "moesh_backend_params.activations moved");
static_assert(sizeof(moesh_backend_params) == 12, "moesh_backend_params changed size");
static_assert(MOESH_ACTIVATIONS_FAST == 0 && MOESH_ACTIVATIONS_PRECISE == 1, "moesh_activations changed value");

// moesh_matmul_args
static_assert(offsetof(moesh_matmul_args, struct_size) == 0, "moesh_matmul_args.struct_size moved");
static_assert(offsetof(moesh_matmul_args, w_type) == 4, "moesh_matmul_args.w_type moved");
static_assert(offsetof(moesh_matmul_args, w) == 8, "moesh_matmul_args.w moved");
static_assert(offsetof(moesh_matmul_args, bias) == 16, "moesh_matmul_args.bias moved");
static_assert(offsetof(moesh_matmul_args, x) == 24, "moesh_matmul_args.x moved");
static_assert(offsetof(moesh_matmul_args, y) == 32, "moesh_matmul_args.y moved");
static_assert(offsetof(moesh_matmul_args, n_in) == 40, "moesh_matmul_args.n_in moved");
static_assert(offsetof(moesh_matmul_args, n_out) == 48, "moesh_matmul_args.n_out moved");
static_assert(offsetof(moesh_matmul_args, n_tokens) == 56, "moesh_matmul_args.n_tokens moved");
static_assert(offsetof(moesh_matmul_args, x_stride) == 64, "moesh_matmul_args.x_stride moved");
static_assert(offsetof(moesh_matmul_args, y_stride) == 72, "moesh_matmul_args.y_stride moved");
static_assert(sizeof(moesh_matmul_args) == 80, "moesh_matmul_args changed size");

// moesh_rms_norm_args
static_assert(offsetof(moesh_rms_norm_args, struct_size) == 0, "moesh_rms_norm_args.struct_size moved");
static_assert(offsetof(moesh_rms_norm_args, eps) == 4, "moesh_rms_norm_args.eps moved");
static_assert(offsetof(moesh_rms_norm_args, x) == 8, "moesh_rms_norm_args.x moved");
static_assert(offsetof(moesh_rms_norm_args, weight) == 16, "moesh_rms_norm_args.weight moved");
static_assert(offsetof(moesh_rms_norm_args, y) == 24, "moesh_rms_norm_args.y moved");
static_assert(offsetof(moesh_rms_norm_args, n) == 32, "moesh_rms_norm_args.n moved");
static_assert(offsetof(moesh_rms_norm_args, n_rows) == 40, "moesh_rms_norm_args.n_rows moved");
static_assert(sizeof(moesh_rms_norm_args) == 48, "moesh_rms_norm_args changed size");

// moesh_rope_args
static_assert(offsetof(moesh_rope_args, struct_size) == 0, "moesh_rope_args.struct_size moved");
static_assert(offsetof(moesh_rope_args, mode) == 4, "moesh_rope_args.mode moved");
static_assert(offsetof(moesh_rope_args, attn_factor) == 8, "moesh_rope_args.attn_factor moved");
static_assert(offsetof(moesh_rope_args, reserved) == 12, "moesh_rope_args.reserved moved");
static_assert(offsetof(moesh_rope_args, x) == 16, "moesh_rope_args.x moved");
static_assert(offsetof(moesh_rope_args, pos) == 24, "moesh_rope_args.pos moved");
static_assert(offsetof(moesh_rope_args, inv_freq) == 32, "moesh_rope_args.inv_freq moved");
static_assert(offsetof(moesh_rope_args, n_tokens) == 40, "moesh_rope_args.n_tokens moved");
static_assert(offsetof(moesh_rope_args, n_head) == 48, "moesh_rope_args.n_head moved");
static_assert(offsetof(moesh_rope_args, head_dim) == 56, "moesh_rope_args.head_dim moved");
static_assert(offsetof(moesh_rope_args, rot_dim) == 64, "moesh_rope_args.rot_dim moved");
static_assert(sizeof(moesh_rope_args) == 72, "moesh_rope_args changed size");

// moesh_expert_ffn_args
static_assert(offsetof(moesh_expert_ffn_args, struct_size) == 0, "moesh_expert_ffn_args.struct_size moved");
static_assert(offsetof(moesh_expert_ffn_args, w_type) == 4, "moesh_expert_ffn_args.w_type moved");
static_assert(offsetof(moesh_expert_ffn_args, gate) == 8, "moesh_expert_ffn_args.gate moved");
static_assert(offsetof(moesh_expert_ffn_args, up) == 16, "moesh_expert_ffn_args.up moved");
static_assert(offsetof(moesh_expert_ffn_args, down) == 24, "moesh_expert_ffn_args.down moved");
static_assert(offsetof(moesh_expert_ffn_args, x) == 32, "moesh_expert_ffn_args.x moved");
static_assert(offsetof(moesh_expert_ffn_args, scale) == 40, "moesh_expert_ffn_args.scale moved");
static_assert(offsetof(moesh_expert_ffn_args, out) == 48, "moesh_expert_ffn_args.out moved");
static_assert(offsetof(moesh_expert_ffn_args, scratch) == 56, "moesh_expert_ffn_args.scratch moved");
static_assert(offsetof(moesh_expert_ffn_args, n_embd) == 64, "moesh_expert_ffn_args.n_embd moved");
static_assert(offsetof(moesh_expert_ffn_args, n_ff) == 72, "moesh_expert_ffn_args.n_ff moved");
static_assert(offsetof(moesh_expert_ffn_args, n_tokens) == 80, "moesh_expert_ffn_args.n_tokens moved");
static_assert(sizeof(moesh_expert_ffn_args) == 88, "moesh_expert_ffn_args changed size");

// moesh_softmax_args
static_assert(offsetof(moesh_softmax_args, struct_size) == 0, "moesh_softmax_args.struct_size moved");
static_assert(offsetof(moesh_softmax_args, reserved) == 4, "moesh_softmax_args.reserved moved");
static_assert(offsetof(moesh_softmax_args, x) == 8, "moesh_softmax_args.x moved");
static_assert(offsetof(moesh_softmax_args, n) == 16, "moesh_softmax_args.n moved");
static_assert(offsetof(moesh_softmax_args, n_rows) == 24, "moesh_softmax_args.n_rows moved");
static_assert(sizeof(moesh_softmax_args) == 32, "moesh_softmax_args changed size");

// moesh_attention_args
static_assert(offsetof(moesh_attention_args, struct_size) == 0, "moesh_attention_args.struct_size moved");
static_assert(offsetof(moesh_attention_args, scale) == 4, "moesh_attention_args.scale moved");
static_assert(offsetof(moesh_attention_args, q) == 8, "moesh_attention_args.q moved");
static_assert(offsetof(moesh_attention_args, k_pool) == 16, "moesh_attention_args.k_pool moved");
static_assert(offsetof(moesh_attention_args, v_pool) == 24, "moesh_attention_args.v_pool moved");
static_assert(offsetof(moesh_attention_args, block_table) == 32, "moesh_attention_args.block_table moved");
static_assert(offsetof(moesh_attention_args, pos) == 40, "moesh_attention_args.pos moved");
static_assert(offsetof(moesh_attention_args, out) == 48, "moesh_attention_args.out moved");
static_assert(offsetof(moesh_attention_args, n_tokens) == 56, "moesh_attention_args.n_tokens moved");
static_assert(offsetof(moesh_attention_args, n_head) == 64, "moesh_attention_args.n_head moved");
static_assert(offsetof(moesh_attention_args, n_head_kv) == 72, "moesh_attention_args.n_head_kv moved");
static_assert(offsetof(moesh_attention_args, head_dim) == 80, "moesh_attention_args.head_dim moved");
static_assert(offsetof(moesh_attention_args, block_size) == 88, "moesh_attention_args.block_size moved");
static_assert(offsetof(moesh_attention_args, n_blocks) == 96, "moesh_attention_args.n_blocks moved");
static_assert(offsetof(moesh_attention_args, n_kv) == 104, "moesh_attention_args.n_kv moved");
static_assert(offsetof(moesh_attention_args, kv_type) == 112, "moesh_attention_args.kv_type moved");
static_assert(sizeof(moesh_attention_args) == 120, "moesh_attention_args changed size");

// moesh_copy_rows_args
static_assert(offsetof(moesh_copy_rows_args, struct_size) == 0, "moesh_copy_rows_args.struct_size moved");
static_assert(offsetof(moesh_copy_rows_args, accumulate) == 4, "moesh_copy_rows_args.accumulate moved");
static_assert(offsetof(moesh_copy_rows_args, clamp) == 8, "moesh_copy_rows_args.clamp moved");
static_assert(offsetof(moesh_copy_rows_args, reserved) == 12, "moesh_copy_rows_args.reserved moved");
static_assert(offsetof(moesh_copy_rows_args, src) == 16, "moesh_copy_rows_args.src moved");
static_assert(offsetof(moesh_copy_rows_args, dst) == 24, "moesh_copy_rows_args.dst moved");
static_assert(offsetof(moesh_copy_rows_args, src_rows) == 32, "moesh_copy_rows_args.src_rows moved");
static_assert(offsetof(moesh_copy_rows_args, dst_rows) == 40, "moesh_copy_rows_args.dst_rows moved");
static_assert(offsetof(moesh_copy_rows_args, n_rows) == 48, "moesh_copy_rows_args.n_rows moved");
static_assert(offsetof(moesh_copy_rows_args, n_cols) == 56, "moesh_copy_rows_args.n_cols moved");
static_assert(offsetof(moesh_copy_rows_args, src_stride) == 64, "moesh_copy_rows_args.src_stride moved");
static_assert(offsetof(moesh_copy_rows_args, dst_stride) == 72, "moesh_copy_rows_args.dst_stride moved");
static_assert(offsetof(moesh_copy_rows_args, src_n_rows) == 80, "moesh_copy_rows_args.src_n_rows moved");
static_assert(offsetof(moesh_copy_rows_args, dst_n_rows) == 88, "moesh_copy_rows_args.dst_n_rows moved");
static_assert(offsetof(moesh_copy_rows_args, dst_type) == 96, "moesh_copy_rows_args.dst_type moved");
static_assert(sizeof(moesh_copy_rows_args) == 104, "moesh_copy_rows_args changed size");

// moesh_moe_expert, moesh_moe_ffn_args
static_assert(offsetof(moesh_moe_expert, gate) == 0, "moesh_moe_expert.gate moved");
static_assert(offsetof(moesh_moe_expert, up) == 8, "moesh_moe_expert.up moved");
static_assert(offsetof(moesh_moe_expert, down) == 16, "moesh_moe_expert.down moved");
static_assert(offsetof(moesh_moe_expert, first) == 24, "moesh_moe_expert.first moved");
static_assert(offsetof(moesh_moe_expert, n) == 32, "moesh_moe_expert.n moved");
static_assert(sizeof(moesh_moe_expert) == 40, "moesh_moe_expert changed size");
static_assert(offsetof(moesh_moe_ffn_args, struct_size) == 0, "moesh_moe_ffn_args.struct_size moved");
static_assert(offsetof(moesh_moe_ffn_args, w_type) == 4, "moesh_moe_ffn_args.w_type moved");
static_assert(offsetof(moesh_moe_ffn_args, experts) == 8, "moesh_moe_ffn_args.experts moved");
static_assert(offsetof(moesh_moe_ffn_args, token) == 16, "moesh_moe_ffn_args.token moved");
static_assert(offsetof(moesh_moe_ffn_args, weight) == 24, "moesh_moe_ffn_args.weight moved");
static_assert(offsetof(moesh_moe_ffn_args, x) == 32, "moesh_moe_ffn_args.x moved");
static_assert(offsetof(moesh_moe_ffn_args, out) == 40, "moesh_moe_ffn_args.out moved");
static_assert(offsetof(moesh_moe_ffn_args, scratch) == 48, "moesh_moe_ffn_args.scratch moved");
static_assert(offsetof(moesh_moe_ffn_args, n_embd) == 56, "moesh_moe_ffn_args.n_embd moved");
static_assert(offsetof(moesh_moe_ffn_args, n_ff) == 64, "moesh_moe_ffn_args.n_ff moved");
static_assert(offsetof(moesh_moe_ffn_args, n_tokens) == 72, "moesh_moe_ffn_args.n_tokens moved");
static_assert(offsetof(moesh_moe_ffn_args, n_experts) == 80, "moesh_moe_ffn_args.n_experts moved");
static_assert(offsetof(moesh_moe_ffn_args, n_pairs) == 88, "moesh_moe_ffn_args.n_pairs moved");
static_assert(sizeof(moesh_moe_ffn_args) == 96, "moesh_moe_ffn_args changed size");
#endif // __LP64__
