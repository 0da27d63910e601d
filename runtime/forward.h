// The forward pass of a loaded model over a Batch, on one backend plugin.
//
//   ForwardPass fwd(model, backend, kv, /*max_batch=*/64);
//   kv.reserve(seq, n_prompt + n_generate);
//   std::string err;
//   const float * logits = fwd.run(batch, &err);  // [batch.n_logits(), n_vocab]
//
// All scratch buffers are sized in the constructor from max_batch; run() does
// not allocate. Per layer: attention over the paged KV cache, then the router
// picks experts, tokens are grouped by expert and each expert's FFN runs once
// over its tokens, weighted and accumulated. Activation counts go to heat().
// Thread safety: one thread drives a ForwardPass; the backend may use workers.
#pragma once

#include "plugins/loader/plugin_loader.h"
#include "router/router.h"
#include "runtime/batch.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/packed_weights.h"

#include <string>
#include <vector>

namespace moesh {

class ForwardPass {
public:
    // packed (may be null, must outlive this): copies of weights in the backend's own layout.
    ForwardPass(const Model & model, Backend & backend, KvCache & kv, int64_t max_batch,
                const PackedWeights * packed = nullptr);

    // Returns the logits of the tokens with want_logits set, in batch order,
    // or nullptr with *error set when the batch is invalid (token outside the
    // vocabulary, position beyond the sequence's reserved KV capacity, ...).
    const float * run(const Batch & batch, std::string * error);

    int64_t max_batch() const { return max_batch_; }
    const ExpertHeat & heat() const { return heat_; }
    ExpertHeat & heat() { return heat_; }

private:
    void attention(int64_t il, const Batch & batch, int64_t n);
    void ffn(int64_t il, int64_t n);
    void run_expert(const ExpertWeights & w, const float * x, const float * scale, float * out, int64_t n);
    void matmul(const WeightMatrix & w, const std::vector<float> & bias, const float * x, float * y, int64_t n);
    void rms_norm(const float * x, const std::vector<float> & w, float * y, int64_t n_rows, int64_t n);

    const Model & model_;
    Backend & be_;
    const PackedWeights * packed_;
    KvCache & kv_;
    int64_t max_batch_;
    ExpertHeat heat_;
    ExpertDispatch dispatch_;

    std::vector<float> x_;        // [max_batch, n_embd] residual stream
    std::vector<float> h_;        // [max_batch, n_embd] normed input of a block
    std::vector<float> q_;        // [max_batch, n_head * head_dim]
    std::vector<float> k_;        // [max_batch, n_head_kv * head_dim]
    std::vector<float> v_;        // [max_batch, n_head_kv * head_dim]
    std::vector<float> attn_;     // [max_batch, n_head * head_dim]
    std::vector<float> out_;      // [max_batch, n_embd] block output
    std::vector<float> router_;   // [max_batch, n_expert]
    std::vector<int32_t> ids_;    // [max_batch, n_expert_used]
    std::vector<float> weights_;  // [max_batch, n_expert_used]
    std::vector<float> xe_;       // [max_batch, n_embd] tokens gathered for one expert
    std::vector<float> oe_;       // [max_batch, n_embd] that expert's output
    std::vector<float> scale_;    // [max_batch]
    std::vector<float> ffn_tmp_;  // [2, max_batch, max n_ff]
    std::vector<int32_t> run_pos_;// [max_batch] positions of one attention run
    std::vector<float> logits_;   // [max_batch, n_vocab]
    std::vector<int64_t> out_rows_; // [max_batch] batch rows that want logits
};

} // namespace moesh
