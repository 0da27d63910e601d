// A GGUF file as a model: its metadata as a ModelConfig and its tensors as a
// WeightSource under the names Model::load binds, so GGUF and Hugging Face
// folders share one loader and one set of shape checks.
//
//   auto file = std::make_shared<GgufFile>("olmoe-q4_0.gguf");
//   Model m = Model::load(model_config_from_gguf(*file), gguf_weight_source(file, cfg.arch));
//   // or simply: Model m = Model::load_path("olmoe-q4_0.gguf");
//
// Architectures (general.architecture): "llama" (dense; with
// llama.expert_count it is Mixtral), "qwen2moe", "qwen3moe", "olmoe".
// A layer's routed experts, one 3-D tensor in the file (ffn_gate_exps ...), are
// exposed as one view per expert into the mapping, never copied; the older
// Mixtral layout with a tensor per expert (blk.N.ffn_gate.E.weight) works too.
// llama-architecture files store q/k rows permuted for adjacent-pair RoPE
// (llama.cpp's converter does it), so such configs set rope_adjacent_pairs.
// Errors name the file, the key or GGUF tensor, and what is supported.
#pragma once

#include "runtime/gguf.h"
#include "runtime/model_config.h"
#include "runtime/weight_source.h"

#include <memory>
#include <optional>

namespace moesh {

ModelConfig model_config_from_gguf(const GgufContents & file);

// The file's tensors under Hugging Face names for `arch` (expert tensors split
// into per-expert views); tensors with no counterpart keep their GGUF names.
// A GgufFile converts to the shared_ptr<const GgufContents> taken here.
std::unique_ptr<WeightSource> gguf_weight_source(std::shared_ptr<const GgufContents> file, Arch arch);

// The moesh dtype of a ggml type, or -1 when no backend computes with it; and back.
int gguf_type_to_dtype(GgmlType type);
std::optional<GgmlType> dtype_to_gguf_type(moesh_dtype type);
// general.architecture for a moesh architecture ("llama" for Llama and Mixtral).
const char * gguf_arch_name(Arch arch);

} // namespace moesh
