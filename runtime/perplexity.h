// Perplexity of a token stream, defined as llama.cpp's perplexity tool defines
// it, so the two numbers compare:
//   - the stream is cut into n_chunk = n_tokens / n_ctx chunks of n_ctx tokens
//     (the rest is dropped; at least 2 * n_ctx tokens are required);
//   - each chunk is evaluated from an empty context; with add_bos its first
//     token is replaced by BOS;
//   - only the second half is scored: positions j in [n_ctx/2, n_ctx - 1)
//     predict token j + 1, with nll = -log softmax(logits_j)[token_{j+1}]
//     (max-subtracted, the sum of exponentials in double);
//   - PPL = exp(mean nll), reported running after each chunk; the uncertainty
//     is PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).
//
//   PerplexityOptions o; o.n_ctx = 512;
//   PerplexityResult r = perplexity(model, backend, tokens, o);   // r.ppl, r.ppl_error
//
// Thread safety: one call at a time per Backend.
#pragma once

#include "plugins/loader/plugin_loader.h"
#include "runtime/model.h"
#include "runtime/backend_weights.h"
#include "runtime/forward.h"
#include "runtime/route_trace.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace moesh {

struct PerplexityOptions {
    int64_t n_ctx = 512;
    int64_t n_batch = 512;        // tokens per forward step (capped at n_ctx)
    int64_t n_chunks = -1;        // at most this many chunks; <= 0: all
    bool add_bos = false;
    int32_t bos_id = -1;          // required when add_bos
    int32_t kv_type = MOESH_DTYPE_F32;   // KV cache elements: MOESH_DTYPE_F32, MOESH_DTYPE_F16 or MOESH_DTYPE_Q8_0
    // Called after each chunk with its index (0-based) and the running PPL.
    std::function<void(int64_t, double)> on_chunk;
    const BackendWeights * weights = nullptr; // weights as the backend reads them (runtime/backend_weights.h); null: the model as is
    RouteTraceWriter * trace = nullptr;       // gets every evaluated token's routing (runtime/route_trace.h)
    ExpertPlacement placement;                // routed experts from budgeted tiers (runtime/forward.h)
};

struct PerplexityResult {
    double ppl = 0.0;
    double ppl_error = 0.0;
    int64_t n_chunks = 0;
    int64_t n_scored = 0;          // predictions counted
    std::vector<double> running;   // [n_chunks] PPL after each chunk
    double seconds = 0.0;
    int64_t n_evaluated = 0;       // tokens run through the model
};

// Throws moesh::Error for too few tokens, n_ctx < 4 or beyond the model's
// context, a token outside the vocabulary, or add_bos without a BOS id.
PerplexityResult perplexity(const Model & model, Backend & backend, const std::vector<int32_t> & tokens,
                            const PerplexityOptions & options);

} // namespace moesh
