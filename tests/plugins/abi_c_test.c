/* The plugin header must compile as strict C11 (plugins may be built by a C compiler or
 * nvcc in C mode), and its layout must match the C++ side: the same pins as
 * plugins/loader/abi_layout.cpp, checked by the C compiler. */
#include <stddef.h>
#include <stdint.h>

#include "moesh/plugin.h"

_Static_assert(MOESH_PLUGIN_ABI_VERSION == 1u, "update these pins when the ABI version moves");
_Static_assert(sizeof(moesh_status) == sizeof(int32_t), "moesh_status is int32_t");

/* Enum values are ABI too: a stored int32_t means the same thing on both sides */
_Static_assert(MOESH_OK == 0, "MOESH_OK changed value");
_Static_assert(MOESH_ERR_INVALID_ARGUMENT == 1, "MOESH_ERR_INVALID_ARGUMENT changed value");
_Static_assert(MOESH_ERR_UNSUPPORTED == 2, "MOESH_ERR_UNSUPPORTED changed value");
_Static_assert(MOESH_ERR_OUT_OF_MEMORY == 3, "MOESH_ERR_OUT_OF_MEMORY changed value");
_Static_assert(MOESH_ERR_INTERNAL == 4, "MOESH_ERR_INTERNAL changed value");
_Static_assert(MOESH_ERR_ABI_MISMATCH == 5, "MOESH_ERR_ABI_MISMATCH changed value");
_Static_assert(MOESH_DTYPE_F32 == 0, "MOESH_DTYPE_F32 changed value");
_Static_assert(MOESH_DTYPE_F16 == 1, "MOESH_DTYPE_F16 changed value");
_Static_assert(MOESH_DTYPE_BF16 == 2, "MOESH_DTYPE_BF16 changed value");
_Static_assert(MOESH_DTYPE_COUNT_V1 == 3, "MOESH_DTYPE_COUNT_V1 changed value");
_Static_assert(MOESH_DTYPE_Q8_0 == 3, "MOESH_DTYPE_Q8_0 changed value");
_Static_assert(MOESH_DTYPE_Q4_0 == 4, "MOESH_DTYPE_Q4_0 changed value");
_Static_assert(MOESH_DTYPE_Q4_1 == 5, "MOESH_DTYPE_Q4_1 changed value");
_Static_assert(MOESH_DTYPE_Q4_K == 6, "MOESH_DTYPE_Q4_K changed value");
_Static_assert(MOESH_DTYPE_Q5_K == 7, "MOESH_DTYPE_Q5_K changed value");
_Static_assert(MOESH_DTYPE_Q6_K == 8, "MOESH_DTYPE_Q6_K changed value");
_Static_assert(MOESH_OP_MATMUL == 0, "MOESH_OP_MATMUL changed value");
_Static_assert(MOESH_OP_RMS_NORM == 1, "MOESH_OP_RMS_NORM changed value");
_Static_assert(MOESH_OP_ROPE == 2, "MOESH_OP_ROPE changed value");
_Static_assert(MOESH_OP_EXPERT_FFN == 3, "MOESH_OP_EXPERT_FFN changed value");
_Static_assert(MOESH_OP_SOFTMAX == 4, "MOESH_OP_SOFTMAX changed value");
_Static_assert(MOESH_OP_ATTENTION == 5, "MOESH_OP_ATTENTION changed value");
_Static_assert(MOESH_OP_COUNT_V1 == 6, "MOESH_OP_COUNT_V1 changed value");
_Static_assert(MOESH_LOG_DEBUG == 0, "MOESH_LOG_DEBUG changed value");
_Static_assert(MOESH_LOG_INFO == 1, "MOESH_LOG_INFO changed value");
_Static_assert(MOESH_LOG_WARN == 2, "MOESH_LOG_WARN changed value");
_Static_assert(MOESH_LOG_ERROR == 3, "MOESH_LOG_ERROR changed value");
_Static_assert(MOESH_ROPE_NEOX == 0, "MOESH_ROPE_NEOX changed value");
_Static_assert(MOESH_ROPE_NORM == 1, "MOESH_ROPE_NORM changed value");

#if defined(__LP64__)
/* moesh_backend_iface */
_Static_assert(offsetof(moesh_backend_iface, abi_version) == 0, "moesh_backend_iface.abi_version moved");
_Static_assert(offsetof(moesh_backend_iface, struct_size) == 4, "moesh_backend_iface.struct_size moved");
_Static_assert(offsetof(moesh_backend_iface, name) == 8, "moesh_backend_iface.name moved");
_Static_assert(offsetof(moesh_backend_iface, host_memory) == 16, "moesh_backend_iface.host_memory moved");
_Static_assert(offsetof(moesh_backend_iface, create) == 24, "moesh_backend_iface.create moved");
_Static_assert(offsetof(moesh_backend_iface, destroy) == 32, "moesh_backend_iface.destroy moved");
_Static_assert(offsetof(moesh_backend_iface, last_error) == 40, "moesh_backend_iface.last_error moved");
_Static_assert(offsetof(moesh_backend_iface, memory_info) == 48, "moesh_backend_iface.memory_info moved");
_Static_assert(offsetof(moesh_backend_iface, buffer_alloc) == 56, "moesh_backend_iface.buffer_alloc moved");
_Static_assert(offsetof(moesh_backend_iface, buffer_free) == 64, "moesh_backend_iface.buffer_free moved");
_Static_assert(offsetof(moesh_backend_iface, copy_to_device) == 72, "moesh_backend_iface.copy_to_device moved");
_Static_assert(offsetof(moesh_backend_iface, copy_to_host) == 80, "moesh_backend_iface.copy_to_host moved");
_Static_assert(offsetof(moesh_backend_iface, synchronize) == 88, "moesh_backend_iface.synchronize moved");
_Static_assert(offsetof(moesh_backend_iface, supports) == 96, "moesh_backend_iface.supports moved");
_Static_assert(offsetof(moesh_backend_iface, matmul) == 104, "moesh_backend_iface.matmul moved");
_Static_assert(offsetof(moesh_backend_iface, rms_norm) == 112, "moesh_backend_iface.rms_norm moved");
_Static_assert(offsetof(moesh_backend_iface, rope) == 120, "moesh_backend_iface.rope moved");
_Static_assert(offsetof(moesh_backend_iface, expert_ffn) == 128, "moesh_backend_iface.expert_ffn moved");
_Static_assert(offsetof(moesh_backend_iface, softmax) == 136, "moesh_backend_iface.softmax moved");
_Static_assert(offsetof(moesh_backend_iface, attention) == 144, "moesh_backend_iface.attention moved");
_Static_assert(offsetof(moesh_backend_iface, packed_size) == 152, "moesh_backend_iface.packed_size moved");
_Static_assert(offsetof(moesh_backend_iface, pack_weights) == 160, "moesh_backend_iface.pack_weights moved");
_Static_assert(offsetof(moesh_backend_iface, copy_rows) == 168, "moesh_backend_iface.copy_rows moved");
_Static_assert(offsetof(moesh_backend_iface, moe_ffn) == 176, "moesh_backend_iface.moe_ffn moved");
_Static_assert(offsetof(moesh_backend_iface, attention_batch) == 184, "moesh_backend_iface.attention_batch moved");
_Static_assert(offsetof(moesh_backend_iface, copy_to_device_async) == 192, "moesh_backend_iface.copy_to_device_async moved");
_Static_assert(offsetof(moesh_backend_iface, copy_wait) == 200, "moesh_backend_iface.copy_wait moved");
_Static_assert(offsetof(moesh_backend_iface, copy_elapsed) == 208, "moesh_backend_iface.copy_elapsed moved");
_Static_assert(sizeof(moesh_backend_iface) == 216, "moesh_backend_iface changed size");
_Static_assert(sizeof(moesh_attention_run) == 32, "moesh_attention_run changed size");
_Static_assert(offsetof(moesh_attention_batch_args, runs) == 56, "moesh_attention_batch_args.runs moved");
_Static_assert(offsetof(moesh_attention_batch_args, kv_type) == 128, "moesh_attention_batch_args.kv_type moved");
_Static_assert(sizeof(moesh_attention_batch_args) == 136, "moesh_attention_batch_args changed size");
_Static_assert(sizeof(moesh_moe_expert) == 40, "moesh_moe_expert changed size");
_Static_assert(offsetof(moesh_moe_ffn_args, experts) == 8, "moesh_moe_ffn_args.experts moved");
_Static_assert(offsetof(moesh_moe_ffn_args, n_pairs) == 88, "moesh_moe_ffn_args.n_pairs moved");
_Static_assert(sizeof(moesh_moe_ffn_args) == 96, "moesh_moe_ffn_args changed size");

/* moesh_host_api */
_Static_assert(offsetof(moesh_host_api, abi_version) == 0, "moesh_host_api.abi_version moved");
_Static_assert(offsetof(moesh_host_api, struct_size) == 4, "moesh_host_api.struct_size moved");
_Static_assert(offsetof(moesh_host_api, ctx) == 8, "moesh_host_api.ctx moved");
_Static_assert(offsetof(moesh_host_api, log) == 16, "moesh_host_api.log moved");
_Static_assert(sizeof(moesh_host_api) == 24, "moesh_host_api changed size");

/* moesh_backend_params */
_Static_assert(offsetof(moesh_backend_params, struct_size) == 0, "moesh_backend_params.struct_size moved");
_Static_assert(offsetof(moesh_backend_params, n_threads) == 4, "moesh_backend_params.n_threads moved");
_Static_assert(sizeof(moesh_backend_params) == 12, "moesh_backend_params changed size");

/* moesh_matmul_args */
_Static_assert(offsetof(moesh_matmul_args, struct_size) == 0, "moesh_matmul_args.struct_size moved");
_Static_assert(offsetof(moesh_matmul_args, w_type) == 4, "moesh_matmul_args.w_type moved");
_Static_assert(offsetof(moesh_matmul_args, w) == 8, "moesh_matmul_args.w moved");
_Static_assert(offsetof(moesh_matmul_args, bias) == 16, "moesh_matmul_args.bias moved");
_Static_assert(offsetof(moesh_matmul_args, x) == 24, "moesh_matmul_args.x moved");
_Static_assert(offsetof(moesh_matmul_args, y) == 32, "moesh_matmul_args.y moved");
_Static_assert(offsetof(moesh_matmul_args, n_in) == 40, "moesh_matmul_args.n_in moved");
_Static_assert(offsetof(moesh_matmul_args, n_out) == 48, "moesh_matmul_args.n_out moved");
_Static_assert(offsetof(moesh_matmul_args, n_tokens) == 56, "moesh_matmul_args.n_tokens moved");
_Static_assert(offsetof(moesh_matmul_args, x_stride) == 64, "moesh_matmul_args.x_stride moved");
_Static_assert(offsetof(moesh_matmul_args, y_stride) == 72, "moesh_matmul_args.y_stride moved");
_Static_assert(sizeof(moesh_matmul_args) == 80, "moesh_matmul_args changed size");

/* moesh_rms_norm_args */
_Static_assert(offsetof(moesh_rms_norm_args, struct_size) == 0, "moesh_rms_norm_args.struct_size moved");
_Static_assert(offsetof(moesh_rms_norm_args, eps) == 4, "moesh_rms_norm_args.eps moved");
_Static_assert(offsetof(moesh_rms_norm_args, x) == 8, "moesh_rms_norm_args.x moved");
_Static_assert(offsetof(moesh_rms_norm_args, weight) == 16, "moesh_rms_norm_args.weight moved");
_Static_assert(offsetof(moesh_rms_norm_args, y) == 24, "moesh_rms_norm_args.y moved");
_Static_assert(offsetof(moesh_rms_norm_args, n) == 32, "moesh_rms_norm_args.n moved");
_Static_assert(offsetof(moesh_rms_norm_args, n_rows) == 40, "moesh_rms_norm_args.n_rows moved");
_Static_assert(sizeof(moesh_rms_norm_args) == 48, "moesh_rms_norm_args changed size");

/* moesh_rope_args */
_Static_assert(offsetof(moesh_rope_args, struct_size) == 0, "moesh_rope_args.struct_size moved");
_Static_assert(offsetof(moesh_rope_args, mode) == 4, "moesh_rope_args.mode moved");
_Static_assert(offsetof(moesh_rope_args, attn_factor) == 8, "moesh_rope_args.attn_factor moved");
_Static_assert(offsetof(moesh_rope_args, reserved) == 12, "moesh_rope_args.reserved moved");
_Static_assert(offsetof(moesh_rope_args, x) == 16, "moesh_rope_args.x moved");
_Static_assert(offsetof(moesh_rope_args, pos) == 24, "moesh_rope_args.pos moved");
_Static_assert(offsetof(moesh_rope_args, inv_freq) == 32, "moesh_rope_args.inv_freq moved");
_Static_assert(offsetof(moesh_rope_args, n_tokens) == 40, "moesh_rope_args.n_tokens moved");
_Static_assert(offsetof(moesh_rope_args, n_head) == 48, "moesh_rope_args.n_head moved");
_Static_assert(offsetof(moesh_rope_args, head_dim) == 56, "moesh_rope_args.head_dim moved");
_Static_assert(offsetof(moesh_rope_args, rot_dim) == 64, "moesh_rope_args.rot_dim moved");
_Static_assert(sizeof(moesh_rope_args) == 72, "moesh_rope_args changed size");

/* moesh_expert_ffn_args */
_Static_assert(offsetof(moesh_expert_ffn_args, struct_size) == 0, "moesh_expert_ffn_args.struct_size moved");
_Static_assert(offsetof(moesh_expert_ffn_args, w_type) == 4, "moesh_expert_ffn_args.w_type moved");
_Static_assert(offsetof(moesh_expert_ffn_args, gate) == 8, "moesh_expert_ffn_args.gate moved");
_Static_assert(offsetof(moesh_expert_ffn_args, up) == 16, "moesh_expert_ffn_args.up moved");
_Static_assert(offsetof(moesh_expert_ffn_args, down) == 24, "moesh_expert_ffn_args.down moved");
_Static_assert(offsetof(moesh_expert_ffn_args, x) == 32, "moesh_expert_ffn_args.x moved");
_Static_assert(offsetof(moesh_expert_ffn_args, scale) == 40, "moesh_expert_ffn_args.scale moved");
_Static_assert(offsetof(moesh_expert_ffn_args, out) == 48, "moesh_expert_ffn_args.out moved");
_Static_assert(offsetof(moesh_expert_ffn_args, scratch) == 56, "moesh_expert_ffn_args.scratch moved");
_Static_assert(offsetof(moesh_expert_ffn_args, n_embd) == 64, "moesh_expert_ffn_args.n_embd moved");
_Static_assert(offsetof(moesh_expert_ffn_args, n_ff) == 72, "moesh_expert_ffn_args.n_ff moved");
_Static_assert(offsetof(moesh_expert_ffn_args, n_tokens) == 80, "moesh_expert_ffn_args.n_tokens moved");
_Static_assert(sizeof(moesh_expert_ffn_args) == 88, "moesh_expert_ffn_args changed size");

/* moesh_softmax_args */
_Static_assert(offsetof(moesh_softmax_args, struct_size) == 0, "moesh_softmax_args.struct_size moved");
_Static_assert(offsetof(moesh_softmax_args, reserved) == 4, "moesh_softmax_args.reserved moved");
_Static_assert(offsetof(moesh_softmax_args, x) == 8, "moesh_softmax_args.x moved");
_Static_assert(offsetof(moesh_softmax_args, n) == 16, "moesh_softmax_args.n moved");
_Static_assert(offsetof(moesh_softmax_args, n_rows) == 24, "moesh_softmax_args.n_rows moved");
_Static_assert(sizeof(moesh_softmax_args) == 32, "moesh_softmax_args changed size");

/* moesh_attention_args */
_Static_assert(offsetof(moesh_attention_args, struct_size) == 0, "moesh_attention_args.struct_size moved");
_Static_assert(offsetof(moesh_attention_args, scale) == 4, "moesh_attention_args.scale moved");
_Static_assert(offsetof(moesh_attention_args, q) == 8, "moesh_attention_args.q moved");
_Static_assert(offsetof(moesh_attention_args, k_pool) == 16, "moesh_attention_args.k_pool moved");
_Static_assert(offsetof(moesh_attention_args, v_pool) == 24, "moesh_attention_args.v_pool moved");
_Static_assert(offsetof(moesh_attention_args, block_table) == 32, "moesh_attention_args.block_table moved");
_Static_assert(offsetof(moesh_attention_args, pos) == 40, "moesh_attention_args.pos moved");
_Static_assert(offsetof(moesh_attention_args, out) == 48, "moesh_attention_args.out moved");
_Static_assert(offsetof(moesh_attention_args, n_tokens) == 56, "moesh_attention_args.n_tokens moved");
_Static_assert(offsetof(moesh_attention_args, n_head) == 64, "moesh_attention_args.n_head moved");
_Static_assert(offsetof(moesh_attention_args, n_head_kv) == 72, "moesh_attention_args.n_head_kv moved");
_Static_assert(offsetof(moesh_attention_args, head_dim) == 80, "moesh_attention_args.head_dim moved");
_Static_assert(offsetof(moesh_attention_args, block_size) == 88, "moesh_attention_args.block_size moved");
_Static_assert(offsetof(moesh_attention_args, n_blocks) == 96, "moesh_attention_args.n_blocks moved");
_Static_assert(offsetof(moesh_attention_args, n_kv) == 104, "moesh_attention_args.n_kv moved");
_Static_assert(offsetof(moesh_attention_args, kv_type) == 112, "moesh_attention_args.kv_type moved");
_Static_assert(sizeof(moesh_attention_args) == 120, "moesh_attention_args changed size");
#endif /* __LP64__ */

/* The enum-valued members and parameters are int32_t: assigning these function pointers
 * fails to compile (-Werror) if a signature goes back to an enum type. */
static int32_t supports_fn(moesh_backend * be, int32_t op, int32_t w_type) {
    (void)be;
    return op == MOESH_OP_MATMUL && w_type == MOESH_DTYPE_F32;
}
static void log_fn(void * ctx, int32_t level, const char * msg) {
    (void)ctx;
    (void)level;
    (void)msg;
}

int main(void) {
    moesh_backend_params params = { /* .struct_size = */ sizeof params, /* .n_threads = */ 1,
                                    /* .activations = */ MOESH_ACTIVATIONS_FAST };
    moesh_backend_iface iface = {0};
    moesh_host_api host = {0};
    moesh_rope_args rope = {0};
    iface.supports = supports_fn;
    host.log = log_fn;
    rope.mode = -7; /* any int32_t can be stored; the plugin says UNSUPPORTED */
    return params.n_threads == 1 && iface.supports(NULL, MOESH_OP_MATMUL, MOESH_DTYPE_F32) == 1 &&
                   host.log != NULL && rope.mode == -7
               ? 0
               : 1;
}
