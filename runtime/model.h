// A loaded model: validated hyper-parameters and views of every weight.
//
//   Model model = Model::load_folder("tests/fixtures/mixtral_top2");
//   model.config().n_layer; model.experts().get({0, 3}).gate;
//
// Large matrices stay where the WeightSource keeps them (mmap'd files); small
// vectors (norms, biases) are converted to float32 once at load. Every tensor's
// presence, dtype and shape is checked here, so the forward pass can trust them.
// Thread safety: read-only after loading.
#pragma once

#include "experts/expert.h"
#include "experts/quant.h"
#include "runtime/model_config.h"
#include "runtime/weight_source.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moesh {

struct LayerWeights {
    std::vector<float> attn_norm;   // [n_embd]
    WeightMatrix wq;                // [n_head * head_dim, n_embd]
    WeightMatrix wk;                // [n_head_kv * head_dim, n_embd]
    WeightMatrix wv;                // [n_head_kv * head_dim, n_embd]
    WeightMatrix wo;                // [n_embd, n_head * head_dim]
    std::vector<float> bq, bk, bv, bo; // empty when the architecture has none
    std::vector<float> q_norm;      // [head_dim] (per head) or [n_head * head_dim] (full)
    std::vector<float> k_norm;      // [head_dim] or [n_head_kv * head_dim]
    std::vector<float> ffn_norm;    // [n_embd]

    bool is_moe = false;
    ExpertWeights dense;            // dense MLP when !is_moe
    WeightMatrix router;            // [n_expert, n_embd] when is_moe
    ExpertWeights shared;           // Qwen2-MoE shared expert, may be empty
    WeightMatrix shared_gate;       // [1, n_embd]
};

struct QuantizePlan;
struct QuantizeReport;

class Model {
public:
    static Model load_folder(const std::string & folder);
    // A Hugging Face folder or a .gguf file.
    static Model load_path(const std::string & path);
    static Model load(ModelConfig config, std::shared_ptr<WeightSource> source);

    const ModelConfig & config() const { return config_; }
    const std::vector<LayerWeights> & layers() const { return layers_; }
    const ExpertTable & experts() const { return experts_; }
    const WeightMatrix & tok_embd() const { return tok_embd_; }   // [n_vocab, n_embd]
    const WeightMatrix & output() const { return output_; }       // [n_vocab, n_embd]
    const std::vector<float> & output_norm() const { return output_norm_; } // [n_embd]
    const RopeTables & rope() const { return rope_; }
    const WeightSource & source() const { return *source_; }

    size_t weight_bytes() const;                 // all matrices
    size_t active_bytes_per_token() const;       // matrices read per decoded token
    std::vector<std::string> unused_tensors() const;

private:
    friend QuantizeReport quantize_model(Model & model, const QuantizePlan & plan, int n_threads);

    ModelConfig config_;
    std::shared_ptr<WeightSource> source_;
    std::vector<LayerWeights> layers_;
    ExpertTable experts_;
    WeightMatrix tok_embd_;
    WeightMatrix output_;
    std::vector<float> output_norm_;
    RopeTables rope_;
    std::vector<std::string> used_;
    std::vector<std::unique_ptr<uint8_t[]>> owned_; // weights made at load time (quantized copies)
};

// Converts n values of `type` to float32 (a block type: whole blocks only).
void convert_to_f32(const void * src, moesh_dtype type, float * dst, int64_t n);
// The quant.h format of a block dtype; nullopt for the element types.
std::optional<QuantType> quant_type_of(moesh_dtype type);

} // namespace moesh
