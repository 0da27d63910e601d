// The forward pass of a loaded model over a Batch, on one backend plugin.
//
//   KvCache kv(spec, backend);
//   ForwardPass fwd(model, backend, kv, /*max_batch=*/64);
//   kv.reserve(seq, n_prompt + n_generate);
//   std::string err;
//   const float * logits = fwd.run(batch, &err);  // [batch.n_logits(), n_vocab], host memory
//
// Every activation lives in the backend's memory (VRAM on a GPU backend) and
// every op runs there, including the glue between kernels (residual adds,
// gathering an expert's tokens, KV writes: copy_rows). The host keeps what it
// decides with: per step it uploads positions, KV rows and block tables; per
// MoE layer it reads the router logits back, picks the experts, and uploads
// the grouping of tokens by expert and their weights. On a host-memory
// backend those transfers are no-ops (the staging memory is the buffer).
// All buffers are sized in the constructor from max_batch; run() does not
// allocate. Activation counts go to heat().
// With an ExpertStore (set_expert_store), routed experts come from its slots
// instead of the model's mapping: each MoE layer tells the store what it
// wants, computes the experts in the order they become ready, and (prefetch)
// applies the next MoE layer's norm and router to the residual stream as it
// is before this layer's FFN, to start loading what that layer will probably
// want; the first MoE layer's guess comes from the token embeddings.
// Thread safety: one thread drives a ForwardPass; the backend may use workers.
#pragma once

#include "experts/cost_model.h"
#include "experts/device_experts.h"
#include "experts/expert_store.h"
#include "plugins/loader/plugin_loader.h"
#include "router/router.h"
#include "runtime/backend_weights.h"
#include "runtime/batch.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moesh {

// Data the host writes or reads, in backend memory. On a host-memory backend
// host() is the buffer itself and upload/download do nothing.
template <class T>
class Staged {
public:
    Staged() = default;
    Staged(const Backend & backend, size_t n, const char * what)
        : backend_(&backend), buf_(backend, n * sizeof(T), what) {
        if (!backend.host_memory()) host_.resize(n);
    }
    T * host() { return host_.empty() ? buf_.as<T>() : host_.data(); }
    T * dev() const { return buf_.as<T>(); }
    void upload(size_t first, size_t count) {
        if (!host_.empty()) backend_->upload(dev() + first, host_.data() + first, count * sizeof(T), "copy_to_device");
    }
    void download(size_t first, size_t count) {
        if (!host_.empty()) backend_->download(host_.data() + first, dev() + first, count * sizeof(T), "copy_to_host");
    }

private:
    const Backend * backend_ = nullptr;
    BackendBuffer buf_;
    std::vector<T> host_;   // empty on a host-memory backend
};

// Where the routed experts come from, when not the model's own memory (all optional; must
// outlive the ForwardPass; the weights must then be prepared without routed experts):
struct ExpertPlacement {
    ExpertStore * store = nullptr;           // host slots filled from disk (experts/expert_store.h)
    bool prefetch = true;                    // with store: predict and prefetch the next layer's
    int32_t prefetch_extra = 0;              // ... predicting k + this many per token
    DeviceExperts * device = nullptr;        // the gpu tier (experts/device_experts.h), with:
    Backend * host = nullptr;                //   where the experts it lacks run in place
    CostModel * cost = nullptr;              //   what decides promote vs in place
};

class ForwardPass {
public:
    // weights (may be null; must outlive this): the weights as the backend reads
    // them. When null, the model's own memory is used on a host-memory backend,
    // and a device-memory backend gets a private upload (BackendWeights).
    ForwardPass(const Model & model, Backend & backend, KvCache & kv, int64_t max_batch,
                const BackendWeights * weights = nullptr);

    // Backend memory a ForwardPass allocates besides the weights and the KV cache.
    static size_t scratch_bytes(const ModelConfig & config, int64_t max_batch, const KvCacheSpec & kv);

    // Returns the logits of the tokens with want_logits set, in batch order
    // (host memory, valid until the next run), or nullptr with *error set when
    // the batch is invalid (token outside the vocabulary, position beyond the
    // sequence's reserved KV capacity, ...). Backend failures throw BackendError.
    const float * run(const Batch & batch, std::string * error);

    // Called in every MoE layer with the router's choice for the batch's tokens:
    // ids and weights are [n_tokens, n_expert_used], valid during the call.
    using RouteObserver = std::function<void(int64_t layer, int64_t n_tokens, const int32_t * ids, const float * weights)>;
    void set_route_observer(RouteObserver observer) { observer_ = std::move(observer); }
    // Called before each MoE layer with the prediction made for it, as prefetch makes it (that
    // layer's norm and router applied to the residual stream one layer earlier; for the first
    // MoE layer, to the embeddings): ids are [n_tokens, n_ranked], most likely first, with
    // n_ranked >= the n_ranked asked for here (at most n_expert). Valid during the call.
    using PredictObserver = std::function<void(int64_t layer, int64_t n_tokens, int64_t n_ranked, const int32_t * ids)>;
    void set_predict_observer(PredictObserver observer, int64_t n_ranked);
    // Routed experts from p.store (a host-memory backend) or p.device (the gpu tier of a
    // device-memory backend: an expert it lacks is promoted into it or computed on p.host,
    // as p.cost decides), or both: the gpu tier's missing experts then come from the store,
    // read from disk when the host tier lacks them too. Throws for a combination that is not
    // built (a store alone on a device backend, a gpu tier on a host backend).
    void set_placement(const ExpertPlacement & p);

    int64_t max_batch() const { return max_batch_; }
    const ExpertHeat & heat() const { return heat_; }
    ExpertHeat & heat() { return heat_; }

private:
    void attention(int64_t il, int64_t n);
    void stored_experts(int64_t il, int64_t n, const float * h, float * x);
    void collect_wanted();   // the layer's experts with tokens, and their counts, into wanted_ / wanted_n_
    // Expert e's tokens through w (gather, FFN, scatter-add into x; in place at decode).
    void run_routed(const ExpertWeights & w, int64_t e, int64_t n, const float * h, float * x, bool as_is);
    // Every routed expert of layer il in one moe_ffn call; false (nothing done) when the backend
    // cannot take this layer's experts that way.
    bool run_moe(int64_t il, const float * h, float * x, int64_t n);
    // Layer il's likely experts: to the predict observer, and prefetched when prefetch_ (uses xe_ as scratch).
    void predict(int64_t il, int64_t n);
    void prefetch_predicted(int64_t il);   // pred_list_ into the store, or else the gpu tier
    void note_queued(uint64_t bytes_before);   // the gpu tier's uploads since then went on the copy queue
    // wanted_ reordered by rank(e) in [0, n_ranks), stable, without allocating (order_ is reserved).
    template <class Rank>
    void order_wanted(int32_t n_ranks, Rank rank);
    void reserve_prediction();
    void device_tier_experts(int64_t il, int64_t n, const float * h, float * x);
    void run_expert_on_host(const ExpertWeights & w, int64_t e, int64_t n, const float * h, float * x);
    void ffn(int64_t il, int64_t n);
    void run_expert(const ExpertWeights & w, const float * x, const float * scale, float * out, int64_t n, bool as_is = false);
    void matmul(const WeightMatrix & w, const std::vector<float> & bias, const float * x, float * y, int64_t n);
    void rms_norm(const float * x, const std::vector<float> & w, float * y, int64_t n_rows, int64_t n);
    // dst[dst_rows[i]] (+)= src[src_rows[i]] over n_cols; see moesh_copy_rows_args.
    void copy_rows(const float * src, int64_t src_n_rows, const int32_t * src_rows, void * dst, int64_t dst_n_rows,
                   const int32_t * dst_rows, int64_t n_rows, int64_t n_cols, bool accumulate, float clamp = 0.0f,
                   int32_t dst_type = MOESH_DTYPE_F32);

    const Model & model_;
    Backend & be_;
    std::unique_ptr<BackendWeights> own_weights_;
    const BackendWeights * weights_;
    KvCache & kv_;
    int64_t max_batch_;
    ExpertHeat heat_;
    ExpertDispatch dispatch_;
    RouteObserver observer_;
    PredictObserver predict_observer_;
    int64_t predict_n_ranked_ = 0;
    ExpertStore * store_ = nullptr;
    bool prefetch_ = false;
    int32_t prefetch_extra_ = 0;
    int64_t n_steps_ = 0;                 // forward passes run: the store's clock
    std::vector<int64_t> next_moe_;       // [n_layer] next MoE layer, -1 after the last
    int64_t first_moe_ = -1;
    std::vector<int32_t> wanted_, wanted_n_, pred_ids_, pred_list_, order_, order_rank_;   // host scratch for the tiers, reserved
    std::vector<char> declined_;   // [n_expert] the cost model chose in place for it this layer (queued uploads)
    std::vector<float> pred_w_;
    std::vector<std::pair<int32_t, int32_t>> pred_count_;
    DeviceExperts * dev_experts_ = nullptr;
    std::vector<int32_t> host_wanted_, host_wanted_n_;   // a layer's experts the gpu tier lacks, and their token counts
    Backend * host_be_ = nullptr;
    CostModel * cost_ = nullptr;
    std::vector<LayerMiss> misses_;        // [n_expert] a layer's misses, as the cost model plans them (reserved)
    std::vector<Placement> plan_;          // [n_expert] its plan
    std::vector<int32_t> plan_order_;      // [n_expert] its scratch
    double queue_free_at_ = 0;   // steady-clock seconds when the copy queue should have done what it was given
    BackendBuffer hx_, ho_, hscratch_;   // host backend: an in-place expert's input, output, scratch
    // Runs of consecutive tokens of one sequence (one attention call each, or all in one
    // attention_batch call); table: offset of its block table in the step buffer. Reserved max_batch.
    std::vector<moesh_attention_run> runs_;
    int64_t n_tables_ = 0;        // block-table entries in this step's step_ buffer
    int64_t max_table_entries_ = 0;   // room for them
    std::vector<moesh_moe_expert> moe_experts_;   // [n_expert] a moe_ffn call's experts, reserved

    // Backend memory; B = max_batch.
    Staged<float> x_;             // [B, n_embd] residual stream (embedding rows come from the host)
    BackendBuffer h_;             // [B, n_embd] normed input of a block
    BackendBuffer q_;             // [B, n_head * head_dim]
    BackendBuffer k_;             // [B, n_head_kv * head_dim]
    BackendBuffer v_;             // [B, n_head_kv * head_dim]
    BackendBuffer attn_;          // [B, n_head * head_dim]
    BackendBuffer out_;           // [B, n_embd] attention output
    Staged<float> router_;        // [B, n_expert] router logits, read by the host
    Staged<float> router_next_;   // [B, n_expert] the next layer's router on this layer's input (prefetch)
    BackendBuffer xe_;            // [B, n_embd] tokens gathered for one expert
    BackendBuffer oe_;            // [B, n_embd] that expert's output
    Staged<float> shared_scale_;  // [B] shared expert gate
    BackendBuffer ffn_tmp_;       // [2, B, max n_ff]
    BackendBuffer moe_tmp_;       // [B * n_expert_used, n_ff_expert] moe_ffn's scratch, when the backend has moe_ffn
    Staged<float> logits_;        // [B, n_vocab]
    Staged<int32_t> step_;        // [3B + table entries]: positions, KV pool rows, logit rows, block tables
    Staged<int32_t> route_tok_;   // [B * n_expert_used] token of each (token, slot) pair, grouped by expert
    Staged<float> route_w_;       // [B * n_expert_used] its router weight
};

} // namespace moesh
