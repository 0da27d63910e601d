// Quantizing a loaded model's weights per tensor class, at load time
// (TOML [quantize]) or into a GGUF file (`moesh quantize`).
//
//   QuantizePlan plan;                       // from [quantize] experts = "q4_0", attention = "q8_0"
//   plan.experts = MOESH_DTYPE_Q4_0;
//   QuantizeReport r = quantize_model(model, plan, n_threads);
//   write_model_gguf(model, "out.gguf", source_gguf_or_null);
//
// Classes: experts (routed), attention (q/k/v/o), ffn (dense and shared-expert
// FFNs), embeddings (token_embd), output (lm_head; with tied embeddings it
// follows `embeddings`). Routers, norms and biases always stay as they are
// (llama.cpp keeps routers unquantized too: top-k is sensitive to them).
// Targets: q8_0, q4_0, q4_1 (the types with a quantizer checked bit-for-bit
// against gguf). A matrix that is already a block type, or whose rows are not
// whole blocks, keeps its type and is listed in the report with the reason.
// Thread safety: quantize_model modifies the model; nothing else may use it meanwhile.
#pragma once

#include "runtime/gguf.h"
#include "runtime/model.h"

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

struct QuantizePlan {
    std::optional<moesh_dtype> experts, attention, ffn, embeddings, output;
    bool empty() const { return !experts && !attention && !ffn && !embeddings && !output; }
};

// "q8_0", "q4_0", "q4_1" (any case) -> dtype; nullopt otherwise. Inline: the
// config parser (and its fuzz target) need it without the model code.
inline std::optional<moesh_dtype> parse_quant_target(std::string_view name) {
    std::string s(name);
    for (char & c : s) c = (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c;
    if (s == "q8_0") return MOESH_DTYPE_Q8_0;
    if (s == "q4_0") return MOESH_DTYPE_Q4_0;
    if (s == "q4_1") return MOESH_DTYPE_Q4_1;
    return std::nullopt;
}
inline constexpr const char * k_quant_targets = "q8_0, q4_0, q4_1";

struct QuantizeReport {
    int64_t n_quantized = 0;
    size_t bytes_before = 0;       // of the matrices the plan covers
    size_t bytes_after = 0;
    std::vector<std::string> kept; // "<tensor>: <why>"
    double seconds = 0.0;
};

// n_threads <= 0: all cores.
QuantizeReport quantize_model(Model & model, const QuantizePlan & plan, int n_threads);

// Writes the model as a GGUF file in llama.cpp's layout (names, 3-D expert
// tensors, llama q/k rows in adjacent-pair order, metadata keys). With
// `source`, the GGUF the model was loaded from, its general.* and tokenizer.*
// metadata are carried over; otherwise the file has no tokenizer. Refuses
// (moesh::Error) what GGUF readers could not reproduce, e.g. YaRN RoPE.
void write_model_gguf(const Model & model, const std::string & path, const GgufContents * source);

} // namespace moesh
