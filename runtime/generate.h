// Prompt in, tokens out: prefill in chunks of max_batch, then decode one token
// per step, sampling each. The KV cache is sized for prompt + n_generate up
// front, so the loop itself never allocates.
//
//   GenerateOptions o; o.prompt = {1, 2, 3}; o.n_generate = 16;
//   GenerateResult r = generate(model, backend, o);
//
// Thread safety: one call at a time per Backend.
#pragma once

#include "plugins/loader/plugin_loader.h"
#include "router/router.h"
#include "runtime/model.h"
#include "runtime/backend_weights.h"
#include "runtime/forward.h"
#include "runtime/route_trace.h"
#include "runtime/grammar.h"
#include "runtime/sampler.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace moesh {

struct GenerateOptions {
    std::vector<int32_t> prompt;
    int64_t n_generate = 16;
    SamplerParams sampling;
    bool keep_logits = false;    // keep every prompt position's and every step's logits
    bool stop_at_eos = false;    // stop after the model's EOS ids or any of stop_ids
    std::vector<int32_t> stop_ids; // e.g. a chat template's end-of-turn token
    // Null, or what the output must match (runtime/grammar.h): generation stops once nothing
    // can follow, or where the grammar allows no token.
    std::shared_ptr<GrammarMatcher> grammar;
    int64_t max_batch = 64;      // prefill chunk
    int64_t kv_block_size = 16;
    int32_t kv_type = MOESH_DTYPE_F32;   // KV cache elements: MOESH_DTYPE_F32, MOESH_DTYPE_F16 or MOESH_DTYPE_Q8_0
    std::function<void(int32_t)> on_token; // called with each generated id as soon as it is sampled
    const BackendWeights * weights = nullptr; // weights as the backend reads them (runtime/backend_weights.h); null: the model as is
    RouteTraceWriter * trace = nullptr;       // gets every token's routing (runtime/route_trace.h)
    ExpertPlacement placement;                // routed experts from budgeted tiers (runtime/forward.h)
};

struct GenerateResult {
    std::vector<int32_t> tokens;      // generated ids
    std::vector<float> logits;        // [n_logit_rows, n_vocab] when keep_logits
    int64_t n_logit_rows = 0;
    double prompt_seconds = 0.0;
    double decode_seconds = 0.0;      // steps after the first token
    int64_t n_decode_steps = 0;
    ExpertHeat heat;
    size_t kv_bytes = 0;
};

// Throws moesh::Error for invalid options (empty prompt, token outside the
// vocabulary, prompt + n_generate beyond max_position_embeddings, ...).
GenerateResult generate(const Model & model, Backend & backend, const GenerateOptions & options);

} // namespace moesh
