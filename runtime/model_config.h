// Hyper-parameters of a Hugging Face model folder's config.json, validated.
//
//   ModelConfig cfg = parse_model_config(json_text, "model/config.json");
//   cfg.arch == Arch::Mixtral; cfg.n_expert_used == 2; ...
//
// Every value that the forward pass depends on is checked here (type, range,
// consistency); anything unsupported is refused with a moesh::Error naming the
// file, the key and what is supported. Thread safety: plain data.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

enum class Arch { Llama, Mixtral, Qwen2Moe, Qwen3Moe, Olmoe };

const char * arch_name(Arch arch);          // "MixtralForCausalLM", ...
std::string supported_architectures();      // comma-separated list for messages

enum class RopeType { Default, Linear, Llama3, Yarn };
const char * rope_type_name(RopeType type);

struct RopeConfig {
    RopeType type = RopeType::Default;
    double theta = 10000.0;
    double factor = 1.0;                    // linear, llama3, yarn
    double low_freq_factor = 1.0;           // llama3
    double high_freq_factor = 4.0;          // llama3
    int64_t original_max_positions = 0;     // llama3, yarn
    double attention_factor = 0.0;          // yarn; 0 = derived from factor/mscale
    double beta_fast = 32.0;                // yarn
    double beta_slow = 1.0;                 // yarn
    double mscale = 0.0;                    // yarn
    double mscale_all_dim = 0.0;            // yarn
    bool truncate = true;                   // yarn
    std::vector<float> freq_factors;        // [head_dim / 2] divisors of each frequency (GGUF rope_freqs); empty = none
};

enum class QkNorm { None, PerHead, Full };  // Qwen3: per head; OLMoE: whole projection

struct ModelConfig {
    Arch arch = Arch::Llama;
    std::string source;                     // file the config came from

    int64_t n_vocab = 0;
    int64_t n_embd = 0;                     // hidden_size
    int64_t n_layer = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;
    int64_t n_ff = 0;                       // dense MLP width (intermediate_size)
    int64_t max_positions = 0;
    double rms_eps = 1e-6;
    RopeConfig rope;
    bool rope_adjacent_pairs = false;       // rotate (2i, 2i+1) instead of (i, i + d/2): GGUF llama q/k are permuted
    bool tie_embeddings = false;

    bool q_bias = false, k_bias = false, v_bias = false, o_bias = false;
    QkNorm qk_norm = QkNorm::None;
    double clip_qkv = 0.0;                  // OLMoE; 0 = off

    // MoE; n_expert == 0 for a dense model
    int64_t n_expert = 0;
    int64_t n_expert_used = 0;
    int64_t n_ff_expert = 0;
    bool norm_topk_prob = false;
    int64_t n_ff_shared = 0;                // Qwen2-MoE shared expert; 0 = none
    std::vector<bool> layer_is_moe;         // [n_layer]

    int64_t bos_token_id = -1;
    std::vector<int64_t> eos_token_ids;
    std::string torch_dtype;                // informational

    int64_t n_moe_layers() const;
};

// Parses and validates config.json text. Throws moesh::Error naming
// source_name and the offending key.
ModelConfig parse_model_config(std::string_view json_text, std::string_view source_name);

// RoPE inverse frequencies [head_dim / 2] as Hugging Face computes them (in
// float32), plus the factor that multiplies cos and sin (YaRN).
struct RopeTables {
    std::vector<float> inv_freq;            // [rot_dim / 2]
    float attn_factor = 1.0f;
};
RopeTables compute_rope_tables(const ModelConfig & cfg);

} // namespace moesh
