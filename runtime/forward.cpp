#include "runtime/forward.h"

#include "runtime/error.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace moesh {
namespace {

double steady_seconds() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Sizes {   // elements of each buffer, B = max_batch
    size_t embd, q, kv, expert, used, ff, vocab, step, moe;
};

// Block-table entries one step may carry: each sequence of the batch (at most max_batch of the
// pool's n_seq_max) once, its table at most the pool's blocks and the model's context. Not the pool's
// blocks alone: with the prefix cache, sequences share blocks, and each table lists them.
size_t table_entries(const ModelConfig & c, int64_t max_batch, const KvCacheSpec & ks) {
    const int64_t per_seq = std::min(ks.n_blocks, (c.max_positions + ks.block_size - 1) / std::max<int64_t>(1, ks.block_size));
    return size_t(std::min(max_batch, ks.n_seq_max)) * size_t(std::max<int64_t>(0, per_seq));
}

Sizes sizes(const ModelConfig & c, int64_t max_batch, const KvCacheSpec & ks) {
    const size_t B = size_t(max_batch);
    Sizes s;
    s.embd = B * size_t(c.n_embd);
    s.q = B * size_t(c.n_head * c.head_dim);
    s.kv = B * size_t(c.n_head_kv * c.head_dim);
    s.expert = B * size_t(std::max<int64_t>(1, c.n_expert));
    s.used = B * size_t(std::max<int64_t>(1, c.n_expert_used));
    s.ff = 2 * B * size_t(std::max({c.n_ff, c.n_ff_expert, c.n_ff_shared}));
    s.vocab = B * size_t(c.n_vocab);
    s.moe = c.n_expert > 0 ? s.used * size_t(std::max<int64_t>(1, c.n_ff_expert)) : 0;
    s.step = 3 * B + table_entries(c, max_batch, ks);
    return s;
}

} // namespace

size_t ForwardPass::scratch_bytes(const ModelConfig & c, int64_t max_batch, const KvCacheSpec & ks) {
    const Sizes s = sizes(c, max_batch, ks);
    const size_t floats = 5 * s.embd + 2 * s.q + 2 * s.kv + s.expert + size_t(max_batch) + s.ff + s.vocab + s.used + s.moe;
    return (floats + s.step + s.used) * 4;
}

ForwardPass::ForwardPass(const Model & model, Backend & backend, KvCache & kv, int64_t max_batch,
                         const BackendWeights * weights)
    : model_(model), be_(backend), weights_(weights), kv_(kv), max_batch_(max_batch),
      heat_(model.config().n_layer, std::max<int64_t>(1, model.config().n_expert)),
      dispatch_(std::max<int64_t>(1, model.config().n_expert), max_batch * std::max<int64_t>(1, model.config().n_expert_used)) {
    const ModelConfig & c = model.config();
    if (max_batch <= 0) throw Error("max_batch must be positive");
    if (!be_.iface().copy_rows)
        throw Error("backend '" + be_.name() + "' has no copy_rows, which the forward pass needs; update the plugin");
    // Refuse up front, naming the weight, rather than fail mid-generation.
    auto need = [&](int32_t op, const WeightMatrix & w, const char * what) {
        if (!w.empty() && !be_.supports(op, w.type))
            throw Error("backend '" + be_.name() + "' cannot compute with " + dtype_name(w.type) + " weights (" + what +
                        "); convert the model to a format it supports or use another backend");
    };
    need(MOESH_OP_MATMUL, model.output(), "output projection");
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = model.layers()[size_t(il)];
        for (const WeightMatrix * w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.router, &L.shared_gate}) need(MOESH_OP_MATMUL, *w, "attention/router");
        for (const ExpertWeights * e : {&L.dense, &L.shared}) need(MOESH_OP_EXPERT_FFN, e->gate, "dense/shared FFN");
        for (int64_t e = 0; e < c.n_expert && L.is_moe; ++e)
            need(MOESH_OP_EXPERT_FFN, model.experts().get({int32_t(il), int32_t(e)}).gate, "routed expert");
    }
    const KvCacheSpec & ks = kv.spec();
    if (ks.n_layer != c.n_layer || ks.n_head_kv != c.n_head_kv || ks.head_dim != c.head_dim)
        throw Error("KV cache shape does not match the model");
    if (weights_ && &weights_->backend() != &be_) throw Error("the weights were prepared for another backend");
    if (!weights_) {
        WeightOptions o;
        o.repack = false;   // on a host backend: read the mapping, no copy
        o.reserve_bytes = scratch_bytes(c, max_batch, ks);
        own_weights_ = std::make_unique<BackendWeights>(model, backend, o);
        weights_ = own_weights_.get();
    }

    const Sizes s = sizes(c, max_batch, ks);
    max_table_entries_ = int64_t(table_entries(c, max_batch, ks));
    auto buf = [&](size_t n) { return BackendBuffer(be_, n * sizeof(float), "buffer_alloc (activations)"); };
    x_ = Staged<float>(be_, s.embd, "buffer_alloc (activations)");
    h_ = buf(s.embd);
    q_ = buf(s.q);
    k_ = buf(s.kv);
    v_ = buf(s.kv);
    attn_ = buf(s.q);
    out_ = buf(s.embd);
    router_ = Staged<float>(be_, s.expert, "buffer_alloc (activations)");
    xe_ = buf(s.embd);
    oe_ = buf(s.embd);
    shared_scale_ = Staged<float>(be_, size_t(max_batch), "buffer_alloc (activations)");
    ffn_tmp_ = buf(s.ff);
    if (be_.iface().moe_ffn && s.moe > 0) {
        moe_tmp_ = buf(s.moe);
        moe_experts_.reserve(size_t(c.n_expert));
    }
    logits_ = Staged<float>(be_, s.vocab, "buffer_alloc (logits)");
    step_ = Staged<int32_t>(be_, s.step, "buffer_alloc (step indices)");
    route_tok_ = Staged<int32_t>(be_, s.used, "buffer_alloc (routing)");
    route_w_ = Staged<float>(be_, s.used, "buffer_alloc (routing)");
    runs_.reserve(size_t(max_batch));

    next_moe_.assign(size_t(c.n_layer), -1);
    for (int64_t il = c.n_layer - 1, next = -1; il >= 0; --il) {
        next_moe_[size_t(il)] = next;
        if (model.layers()[size_t(il)].is_moe) next = il;
        first_moe_ = next;
    }
}

void ForwardPass::set_placement(const ExpertPlacement & p) {
    const ModelConfig & c = model_.config();
    if (p.store && !p.device && !be_.host_memory())
        throw Error("backend '" + be_.name() + "' keeps weights in device memory: experts streamed from disk into host slots "
                    "feed its gpu tier: configure one, or use --backend cpu");
    if (p.device && be_.host_memory())
        throw Error("a gpu tier needs a device-memory backend (cuda); backend '" + be_.name() + "' computes in host memory");
    if (p.device && (!p.host || !p.host->host_memory() || !p.cost))
        throw Error("a gpu tier needs a host-memory backend (cpu) for the experts it does not hold, and a cost model");
    store_ = p.store;
    // Prefetch fills the store, or else the gpu tier when its uploads can run beside the compute.
    prefetch_ = p.prefetch && (p.store || (p.device && p.device->async()));
    prefetch_extra_ = std::max(0, p.prefetch_extra);
    dev_experts_ = p.device;
    host_be_ = p.device ? p.host : nullptr;
    cost_ = p.device ? p.cost : nullptr;
    const size_t E = size_t(std::max<int64_t>(1, c.n_expert)), B = size_t(max_batch_);
    wanted_.reserve(E);
    wanted_n_.reserve(E);
    host_wanted_.reserve(E);
    host_wanted_n_.reserve(E);
    pred_count_.reserve(E);
    pred_list_.reserve(E);
    order_.reserve(E);
    order_rank_.reserve(E);
    declined_.assign(E, 0);
    misses_.reserve(E);
    plan_.resize(E);
    plan_order_.resize(E);
    if (prefetch_) reserve_prediction();
    if (dev_experts_ && !hx_.get()) {
        hx_ = BackendBuffer(*host_be_, B * size_t(c.n_embd) * sizeof(float), "buffer_alloc (host expert input)");
        ho_ = BackendBuffer(*host_be_, B * size_t(c.n_embd) * sizeof(float), "buffer_alloc (host expert output)");
        hscratch_ = BackendBuffer(*host_be_, 2 * B * size_t(std::max({c.n_ff, c.n_ff_expert, int64_t(1)})) * sizeof(float),
                                  "buffer_alloc (host expert scratch)");
    }
}

void ForwardPass::collect_wanted() {
    wanted_.clear();
    wanted_n_.clear();
    for (int64_t e = 0; e < model_.config().n_expert; ++e)
        if (dispatch_.n_tokens_for(e) > 0) {
            wanted_.push_back(int32_t(e));
            wanted_n_.push_back(int32_t(dispatch_.n_tokens_for(e)));
        }
}

void ForwardPass::run_routed(const ExpertWeights & w, int64_t e, int64_t n, const float * h, float * x, bool as_is) {
    const int64_t n_embd = model_.config().n_embd;
    const float * scale = route_w_.dev() + dispatch_.offset(e);
    if (n == 1) {   // decode: no gather/scatter
        run_expert(w, h, scale, x, 1, as_is);
        return;
    }
    const int64_t n_e = dispatch_.n_tokens_for(e);
    const int32_t * tok = route_tok_.dev() + dispatch_.offset(e);
    copy_rows(h, n, tok, xe_.as<float>(), n_e, nullptr, n_e, n_embd, false);           // gather
    copy_rows(nullptr, 0, nullptr, oe_.as<float>(), n_e, nullptr, n_e, n_embd, false);  // zero
    run_expert(w, xe_.as<float>(), scale, oe_.as<float>(), n_e, as_is);
    copy_rows(oe_.as<float>(), n_e, nullptr, x, n, tok, n_e, n_embd, true);            // scatter-add
}

bool ForwardPass::run_moe(int64_t il, const float * h, float * x, int64_t n) {
    if (!moe_tmp_.get()) return false;
    const ModelConfig & c = model_.config();
    moe_experts_.clear();
    int32_t type = -1;
    int64_t end = 0, n_ff = 0;
    for (int64_t e = 0; e < c.n_expert; ++e) {
        const int64_t n_e = dispatch_.n_tokens_for(e);
        if (n_e == 0) {
            moe_experts_.push_back({nullptr, nullptr, nullptr, end, 0});
            continue;
        }
        const ExpertWeights & w = model_.experts().get({int32_t(il), int32_t(e)});
        const WeightRef gate = weights_->get(w.gate);
        if (type < 0) {
            type = gate.type;
            n_ff = w.n_ff();
        }
        if (gate.type != type || w.n_ff() != n_ff) return false;   // experts of mixed types or sizes
        moe_experts_.push_back({gate.data, weights_->get(w.up).data, weights_->get(w.down).data, dispatch_.offset(e), n_e});
        end = dispatch_.offset(e) + n_e;
    }
    if (type < 0 || n_ff > std::max<int64_t>(1, c.n_ff_expert) || !be_.supports(MOESH_OP_MOE_FFN, type)) return false;
    moesh_moe_ffn_args a{};
    a.struct_size = sizeof a;
    a.w_type = type;
    a.experts = moe_experts_.data();
    a.token = route_tok_.dev();
    a.weight = route_w_.dev();
    a.x = h;
    a.out = x;
    a.scratch = moe_tmp_.as<float>();
    a.n_embd = c.n_embd;
    a.n_ff = n_ff;
    a.n_tokens = n;
    a.n_experts = c.n_expert;
    a.n_pairs = dispatch_.n_pairs();
    be_.check(be_.iface().moe_ffn(be_.ctx(), &a), "moe_ffn");
    return true;
}

// An expert the gpu tier does not hold, computed on the host backend from the model's own copy:
// its tokens' rows go down, its weighted output comes back up and is added to the residual.
void ForwardPass::run_expert_on_host(const ExpertWeights & w, int64_t e, int64_t n, const float * h, float * x) {
    const ModelConfig & c = model_.config();
    const int64_t n_e = dispatch_.n_tokens_for(e);
    const size_t row_bytes = size_t(c.n_embd) * sizeof(float);
    const int32_t * tok = route_tok_.dev() + dispatch_.offset(e);
    const float * src = h;
    if (n > 1) {
        copy_rows(h, n, tok, xe_.as<float>(), n_e, nullptr, n_e, c.n_embd, false);   // gather on the device
        src = xe_.as<float>();
    }
    be_.download(hx_.get(), src, size_t(n_e) * row_bytes, "copy_to_host (in-place expert input)");
    std::memset(ho_.get(), 0, size_t(n_e) * row_bytes);
    // the routing weights from their host copy
    moesh_expert_ffn_args a = expert_ffn_args(w, hx_.as<float>(), route_w_.host() + dispatch_.offset(e), ho_.as<float>(),
                                              hscratch_.as<float>(), n_e);
    host_be_->check(host_be_->iface().expert_ffn(host_be_->ctx(), &a), "expert_ffn (host, in place)");
    host_be_->check(host_be_->iface().synchronize(host_be_->ctx()), "synchronize (host)");
    be_.upload(oe_.as<float>(), ho_.get(), size_t(n_e) * row_bytes, "copy_to_device (in-place expert output)");
    copy_rows(oe_.as<float>(), n_e, nullptr, x, n, n > 1 ? tok : nullptr, n_e, c.n_embd, true);   // scatter-add
}

template <class Rank>
void ForwardPass::order_wanted(int32_t n_ranks, Rank rank) {
    order_rank_.clear();
    for (int32_t e : wanted_) order_rank_.push_back(rank(e));   // once: a store's answer changes as reads finish
    order_.clear();
    for (int32_t r = 0; r < n_ranks; ++r)
        for (size_t i = 0; i < wanted_.size(); ++i)
            if (order_rank_[i] == r) order_.push_back(wanted_[i]);
    wanted_.swap(order_);
}

// Routed experts with a gpu tier: resident ones on the device; the others promoted or computed on
// the host, per expert and per step, by the cost model. Their host copies come from the model's
// mapping, or, with a host tier that cannot hold every expert, from the store, which reads the
// missing ones from disk (and prefetches the next layer's that the gpu tier lacks).
void ForwardPass::device_tier_experts(int64_t il, int64_t n, const float * h, float * x) {
    const ModelConfig & c = model_.config();
    collect_wanted();
    struct Layer {
        DeviceExperts & d;
        ExpertStore * s;
        ExpertId held{0, -1};
        ~Layer() {
            if (s && held.index >= 0) s->release(held);
            if (s) s->end_layer();
            d.end_layer();
        }
    } layer{*dev_experts_, store_};
    // Uploads from the mapping go on the copy queue; from a store slot they stay synchronous.
    const bool queued_uploads = !store_ && dev_experts_->async();
    dev_experts_->begin_layer(int32_t(il), n_steps_, wanted_.data(), int64_t(wanted_.size()), wanted_n_.data());
    if (store_) {   // the store is asked only for what the device lacks: resident first, then as the store has them
        host_wanted_.clear();
        host_wanted_n_.clear();
        for (size_t i = 0; i < wanted_.size(); ++i)
            if (!dev_experts_->resident({int32_t(il), wanted_[i]})) {
                host_wanted_.push_back(wanted_[i]);
                host_wanted_n_.push_back(wanted_n_[i]);
            }
        // The next layer's prediction before this layer's misses are placed: the policy evicts knowing it.
        const int64_t next = prefetch_ ? next_moe_[size_t(il)] : -1;
        if (next >= 0) predict(next, n);
        store_->begin_layer(int32_t(il), n_steps_, host_wanted_.data(), int64_t(host_wanted_.size()), host_wanted_n_.data());
        if (next >= 0) store_->prefetch(int32_t(next), pred_list_.data(), int64_t(pred_list_.size()));
        order_wanted(4, [&](int32_t e) {   // resident, then as the store has them
            const ExpertId id{int32_t(il), e};
            return dev_experts_->resident(id) ? 0 : 1 + store_->order(id);
        });
    } else if (queued_uploads) {
        // Every promotion is decided and queued before anything computes, then the next layer's
        // prefetch behind them (its prediction made first, so that the policy evicts knowing it).
        // Then: the resident experts (GPU), the misses the cost model keeps on the host (while the
        // copy queue runs), the uploads just queued (each fenced by ready()), and last the experts
        // that found no slot (done() frees slots: they may be promoted then). The misses are
        // planned together: the host and the copy queue share them (CostModel::plan_layer).
        const int64_t next = prefetch_ ? next_moe_[size_t(il)] : -1;
        if (next >= 0) predict(next, n);
        misses_.clear();
        bool waits = false;   // a resident expert's upload is still on the queue
        for (int32_t e : wanted_) {
            const ExpertId id{int32_t(il), e};
            declined_[size_t(e)] = 0;
            waits = waits || dev_experts_->pending(id);
            if (dev_experts_->resident(id)) continue;
            misses_.push_back({id.layer, e, model_.experts().get(id).n_bytes(), dispatch_.n_tokens_for(e), dev_experts_->admits(id)});
        }
        const uint64_t b0 = dev_experts_->stats().bytes_uploaded;
        cost_->plan_layer(misses_.data(), int64_t(misses_.size()), c.n_embd, queue_free_at_ - steady_seconds(), waits,
                          dev_experts_->n_promotable(), plan_.data(), plan_order_.data());
        // Queued in the plan's order (most tokens first), which is also the order they compute in below.
        order_.clear();
        for (size_t k = 0; k < misses_.size(); ++k) {
            const size_t i = size_t(plan_order_[k]);
            const ExpertId id{int32_t(il), misses_[i].expert};
            order_.push_back(id.index);
            if (plan_[i] == Placement::InPlace)
                declined_[size_t(id.index)] = 1;
            else if (dev_experts_->can_promote())   // else no slot now: asked again below
                dev_experts_->promote(id);
        }
        for (int32_t e : wanted_)   // the misses in plan order, then the resident experts
            if (dev_experts_->resident({int32_t(il), e}) && std::find(order_.begin(), order_.end(), e) == order_.end())
                order_.push_back(e);
        wanted_.swap(order_);
        note_queued(b0);
        if (next >= 0) prefetch_predicted(next);
        order_wanted(4, [&](int32_t e) {
            const ExpertId id{int32_t(il), e};
            if (!dev_experts_->resident(id)) return declined_[size_t(e)] ? 1 : 3;
            return dev_experts_->pending(id) ? 2 : 0;
        });
    }
    for (int32_t e : wanted_) {
        const ExpertId id{int32_t(il), e};
        const int64_t n_e = dispatch_.n_tokens_for(e);
        const ExpertWeights * w = dev_experts_->ready(id);
        if (w) {
            run_routed(*w, e, n, h, x, /*as_is=*/true);
            dev_experts_->done(id);
            continue;
        }
        const ExpertWeights & host_w = store_ ? store_->acquire(id) : model_.experts().get(id);
        if (store_) layer.held = id;
        // With queued uploads, only the experts that found no slot above are asked (once done()
        // has freed slots, one may now).
        if (!(queued_uploads && declined_[size_t(e)]) && dev_experts_->can_promote() &&
            cost_->choose_for(id.layer, e, host_w.n_bytes(), n_e, c.n_embd, dev_experts_->admits(id)) == Placement::Promote) {
            const double t0 = dev_experts_->stats().upload_seconds;
            const uint64_t b0 = dev_experts_->stats().bytes_uploaded;
            dev_experts_->promote(id, queued_uploads ? nullptr : &host_w);   // a store slot is reused once released: synchronous
            if (queued_uploads)   // its time is taken from the device after the step
                note_queued(b0);
            else
                cost_->observe_upload(size_t(dev_experts_->stats().bytes_uploaded - b0), dev_experts_->stats().upload_seconds - t0);
            w = dev_experts_->ready(id);
        }
        if (w) {
            run_routed(*w, e, n, h, x, /*as_is=*/true);
        } else {
            const auto t0 = std::chrono::steady_clock::now();
            run_expert_on_host(host_w, e, n, h, x);
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            dev_experts_->note_in_place(secs);
            cost_->observe_host(host_w.n_bytes(), n_e, secs);
        }
        if (store_) {
            store_->release(id);
            layer.held.index = -1;
        }
        dev_experts_->done(id);
    }
}

void ForwardPass::reserve_prediction() {
    if (!pred_ids_.empty()) return;
    const size_t E = size_t(std::max<int64_t>(1, model_.config().n_expert)), B = size_t(max_batch_);
    router_next_ = Staged<float>(be_, B * E, "buffer_alloc (activations)");
    pred_ids_.resize(B * E);
    pred_w_.resize(pred_ids_.size());
}

void ForwardPass::set_predict_observer(PredictObserver observer, int64_t n_ranked) {
    predict_observer_ = std::move(observer);
    predict_n_ranked_ = std::clamp<int64_t>(n_ranked, 1, std::max<int64_t>(1, model_.config().n_expert));
    if (predict_observer_) reserve_prediction();
}

void ForwardPass::predict(int64_t il, int64_t n) {
    const ModelConfig & c = model_.config();
    // The target layer's router on the residual stream as it is now, normed as that layer will norm it.
    rms_norm(x_.dev(), model_.layers()[size_t(il)].ffn_norm, xe_.as<float>(), n, c.n_embd);
    matmul(model_.layers()[size_t(il)].router, {}, xe_.as<float>(), router_next_.dev(), n);
    router_next_.download(0, size_t(n * c.n_expert));
    const int64_t k_store = std::min<int64_t>(c.n_expert, c.n_expert_used + prefetch_extra_);
    const int64_t kk = std::max(prefetch_ ? k_store : 0, predict_observer_ ? predict_n_ranked_ : 0);
    route_softmax_topk(router_next_.host(), n, RouterSpec{c.n_expert, kk, c.norm_topk_prob}, pred_ids_.data(),
                       pred_w_.data());
    if (predict_observer_) predict_observer_(il, n, kk, pred_ids_.data());
    if (!prefetch_) return;
    // Most-wanted first: the store stops prefetching when it runs out of evictable slots.
    pred_count_.clear();
    for (int64_t e = 0; e < c.n_expert; ++e) pred_count_.push_back({0, int32_t(e)});
    for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < k_store; ++j) --pred_count_[size_t(pred_ids_[size_t(t * kk + j)])].first;
    std::sort(pred_count_.begin(), pred_count_.end());
    pred_list_.clear();
    for (const auto & [neg, e] : pred_count_)   // what the gpu tier holds needs no host copy
        if (neg < 0 && !(store_ && dev_experts_ && dev_experts_->resident({int32_t(il), e}))) pred_list_.push_back(e);
    if (store_)
        store_->predict(int32_t(il), pred_list_.data(), int64_t(pred_list_.size()));
    else
        dev_experts_->predict(int32_t(il), pred_list_.data(), int64_t(pred_list_.size()));
}

void ForwardPass::prefetch_predicted(int64_t il) {
    if (store_) {
        store_->prefetch(int32_t(il), pred_list_.data(), int64_t(pred_list_.size()));
        return;
    }
    const uint64_t b0 = dev_experts_->stats().bytes_uploaded;
    dev_experts_->prefetch(int32_t(il), pred_list_.data(), int64_t(pred_list_.size()));
    note_queued(b0);
}

void ForwardPass::note_queued(uint64_t bytes_before) {
    const uint64_t bytes = dev_experts_->stats().bytes_uploaded - bytes_before;
    if (!bytes || !cost_ || !dev_experts_->async()) return;
    queue_free_at_ = std::max(queue_free_at_, steady_seconds()) + double(bytes) / (cost_->rates().upload_gbps * 1e9);
}

// Routed experts from the store: ask for all of the layer's, prefetch the next layer's, compute in
// the order they arrive. A failure anywhere leaves the store consistent (Layer's destructor).
void ForwardPass::stored_experts(int64_t il, int64_t n, const float * h, float * x) {
    collect_wanted();
    struct Layer {
        ExpertStore & s;
        ExpertId held{0, -1};
        ~Layer() {
            if (held.index >= 0) s.release(held);
            s.end_layer();
        }
    } layer{*store_};
    // The next layer's prediction before this layer's misses are placed: the policy evicts knowing it.
    const int64_t next = prefetch_ ? next_moe_[size_t(il)] : -1;
    if (next >= 0) predict(next, n);
    store_->begin_layer(int32_t(il), n_steps_, wanted_.data(), int64_t(wanted_.size()), wanted_n_.data());
    if (next >= 0) store_->prefetch(int32_t(next), pred_list_.data(), int64_t(pred_list_.size()));
    order_wanted(3, [&](int32_t e) { return store_->order({int32_t(il), e}); });
    for (int32_t e : wanted_) {
        const ExpertWeights & w = store_->acquire({int32_t(il), e});
        layer.held = {int32_t(il), e};
        run_routed(w, e, n, h, x, /*as_is=*/true);
        layer.held.index = -1;
        store_->release({int32_t(il), e});
    }
}

void ForwardPass::matmul(const WeightMatrix & w, const std::vector<float> & bias, const float * x, float * y,
                         int64_t n) {
    const WeightRef r = weights_->get(w);
    moesh_matmul_args a{};
    a.struct_size = sizeof a;
    a.w = r.data;
    a.w_type = r.type;
    a.bias = weights_->get(bias);
    a.x = x;
    a.y = y;
    a.n_in = w.n_cols;
    a.n_out = w.n_rows;
    a.n_tokens = n;
    a.x_stride = w.n_cols;
    a.y_stride = w.n_rows;
    be_.check(be_.iface().matmul(be_.ctx(), &a), "matmul");
}

void ForwardPass::rms_norm(const float * x, const std::vector<float> & w, float * y, int64_t n_rows, int64_t n) {
    moesh_rms_norm_args a{};
    a.struct_size = sizeof a;
    a.x = x;
    a.weight = weights_->get(w);
    a.y = y;
    a.n = n;
    a.n_rows = n_rows;
    a.eps = float(model_.config().rms_eps);
    be_.check(be_.iface().rms_norm(be_.ctx(), &a), "rms_norm");
}

void ForwardPass::copy_rows(const float * src, int64_t src_n_rows, const int32_t * src_rows, void * dst,
                            int64_t dst_n_rows, const int32_t * dst_rows, int64_t n_rows, int64_t n_cols, bool accumulate,
                            float clamp, int32_t dst_type) {
    moesh_copy_rows_args a{};
    a.struct_size = sizeof a;
    a.dst_type = dst_type;
    a.accumulate = accumulate ? 1 : 0;
    a.clamp = clamp;
    a.src = src;
    a.dst = dst;
    a.src_rows = src_rows;
    a.dst_rows = dst_rows;
    a.n_rows = n_rows;
    a.n_cols = n_cols;
    a.src_stride = n_cols;
    a.dst_stride = n_cols;
    a.src_n_rows = src_n_rows;
    a.dst_n_rows = dst_n_rows;
    be_.check(be_.iface().copy_rows(be_.ctx(), &a), "copy_rows");
}

void ForwardPass::run_expert(const ExpertWeights & w, const float * x, const float * scale, float * out, int64_t n,
                             bool as_is) {
    // gate, up and down are packed (or not) as a set; as_is: a cache slot's copy, not the model's
    const WeightRef gate = as_is ? WeightRef{w.gate.data, int32_t(w.gate.type)} : weights_->get(w.gate);
    moesh_expert_ffn_args a{};
    a.struct_size = sizeof a;
    a.gate = gate.data;
    a.up = as_is ? w.up.data : weights_->get(w.up).data;
    a.down = as_is ? w.down.data : weights_->get(w.down).data;
    a.w_type = gate.type;
    a.x = x;
    a.scale = scale;
    a.out = out;
    a.scratch = ffn_tmp_.as<float>();
    a.n_embd = w.gate.n_cols;
    a.n_ff = w.gate.n_rows;
    a.n_tokens = n;
    be_.check(be_.iface().expert_ffn(be_.ctx(), &a), "expert_ffn");
}

void ForwardPass::attention(int64_t il, int64_t n) {
    const ModelConfig & c = model_.config();
    const LayerWeights & L = model_.layers()[size_t(il)];
    const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
    float * q = q_.as<float>();
    float * k = k_.as<float>();
    float * v = v_.as<float>();

    rms_norm(x_.dev(), L.attn_norm, h_.as<float>(), n, c.n_embd);
    matmul(L.wq, L.bq, h_.as<float>(), q, n);
    matmul(L.wk, L.bk, h_.as<float>(), k, n);
    matmul(L.wv, L.bv, h_.as<float>(), v, n);

    if (c.qk_norm == QkNorm::Full) {
        rms_norm(q, L.q_norm, q, n, q_dim);
        rms_norm(k, L.k_norm, k, n, kv_dim);
    } else if (c.qk_norm == QkNorm::PerHead) {
        rms_norm(q, L.q_norm, q, n * c.n_head, c.head_dim);
        rms_norm(k, L.k_norm, k, n * c.n_head_kv, c.head_dim);
    }
    if (c.clip_qkv > 0) {   // in place
        const float lim = float(c.clip_qkv);
        copy_rows(q, n, nullptr, q, n, nullptr, n, q_dim, false, lim);
        copy_rows(k, n, nullptr, k, n, nullptr, n, kv_dim, false, lim);
        copy_rows(v, n, nullptr, v, n, nullptr, n, kv_dim, false, lim);
    }

    const int32_t * pos = step_.dev();   // step layout: see run()
    const int32_t * pool_rows = pos + max_batch_;
    const int32_t * tables = pos + 3 * max_batch_;
    const RopeTables & rt = model_.rope();
    moesh_rope_args r{};
    r.struct_size = sizeof r;
    r.pos = pos;
    r.inv_freq = weights_->get(rt.inv_freq);
    r.n_tokens = n;
    r.head_dim = c.head_dim;
    r.rot_dim = c.head_dim;
    r.attn_factor = rt.attn_factor;
    r.mode = c.rope_adjacent_pairs ? MOESH_ROPE_NORM : MOESH_ROPE_NEOX;
    r.x = q;
    r.n_head = c.n_head;
    be_.check(be_.iface().rope(be_.ctx(), &r), "rope");
    r.x = k;
    r.n_head = c.n_head_kv;
    be_.check(be_.iface().rope(be_.ctx(), &r), "rope");

    const int64_t n_pool_rows = kv_.spec().n_blocks * kv_.spec().block_size;
    const int32_t kv_type = kv_.spec().type;   // the write rounds to it (f16: to nearest even)
    copy_rows(k, n, nullptr, kv_.k_pool(il), n_pool_rows, pool_rows, n, kv_dim, false, 0.0f, kv_type);
    copy_rows(v, n, nullptr, kv_.v_pool(il), n_pool_rows, pool_rows, n, kv_dim, false, 0.0f, kv_type);

    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    if (be_.iface().attention_batch) {   // every sequence's queries in one call
        moesh_attention_batch_args a{};
        a.struct_size = sizeof a;
        a.scale = scale;
        a.q = q;
        a.k_pool = kv_.k_pool(il);
        a.v_pool = kv_.v_pool(il);
        a.block_tables = tables;
        a.pos = pos;
        a.out = attn_.as<float>();
        a.runs = runs_.data();
        a.n_tokens = n;
        a.n_runs = int64_t(runs_.size());
        a.n_table = n_tables_;
        a.n_head = c.n_head;
        a.n_head_kv = c.n_head_kv;
        a.head_dim = c.head_dim;
        a.block_size = kv_.spec().block_size;
        a.n_blocks = kv_.spec().n_blocks;
        a.kv_type = kv_type;
        be_.check(be_.iface().attention_batch(be_.ctx(), &a), "attention_batch");
    } else {
        for (const moesh_attention_run & run : runs_) {
            moesh_attention_args a{};
            a.struct_size = sizeof a;
            a.q = q + run.first * q_dim;
            a.k_pool = kv_.k_pool(il);
            a.v_pool = kv_.v_pool(il);
            a.block_table = tables + run.table;
            a.pos = pos + run.first;
            a.out = attn_.as<float>() + run.first * q_dim;
            a.n_tokens = run.n_tokens;
            a.n_head = c.n_head;
            a.n_head_kv = c.n_head_kv;
            a.head_dim = c.head_dim;
            a.block_size = kv_.spec().block_size;
            a.n_blocks = kv_.spec().n_blocks;
            a.n_kv = run.n_kv;
            a.scale = scale;
            a.kv_type = kv_type;
            be_.check(be_.iface().attention(be_.ctx(), &a), "attention");
        }
    }

    matmul(L.wo, L.bo, attn_.as<float>(), out_.as<float>(), n);
    copy_rows(out_.as<float>(), n, nullptr, x_.dev(), n, nullptr, n, c.n_embd, true);   // residual
}

// Every FFN output accumulates straight into the residual stream x.
void ForwardPass::ffn(int64_t il, int64_t n) {
    const ModelConfig & c = model_.config();
    const LayerWeights & L = model_.layers()[size_t(il)];
    float * h = h_.as<float>();
    float * x = x_.dev();

    rms_norm(x, L.ffn_norm, h, n, c.n_embd);
    if (!L.is_moe) {
        run_expert(L.dense, h, nullptr, x, n);
        return;
    }
    matmul(L.router, {}, h, router_.dev(), n);
    router_.download(0, size_t(n * c.n_expert));
    int32_t * ids = route_tok_.host();   // borrowed for the (token, slot) ids; overwritten below
    float * wts = route_w_.host();
    const RouterSpec spec{c.n_expert, c.n_expert_used, c.norm_topk_prob};
    route_softmax_topk(router_.host(), n, spec, ids, wts);
    heat_.add(il, ids, n * c.n_expert_used);
    if (observer_) observer_(il, n, ids, wts);
    dispatch_.build(ids, wts, n, c.n_expert_used);
    const int64_t n_pairs = dispatch_.n_pairs();
    std::memcpy(route_w_.host(), dispatch_.weights(), size_t(n_pairs) * sizeof(float));
    route_w_.upload(0, size_t(n_pairs));
    if (n > 1 || moe_tmp_.get()) {
        std::memcpy(route_tok_.host(), dispatch_.tokens(), size_t(n_pairs) * sizeof(int32_t));
        route_tok_.upload(0, size_t(n_pairs));
    }

    if (!store_ && !dev_experts_ && !run_moe(il, h, x, n))
        for (int64_t e = 0; e < c.n_expert; ++e)
            if (dispatch_.n_tokens_for(e) > 0) run_routed(model_.experts().get({int32_t(il), int32_t(e)}), e, n, h, x, /*as_is=*/false);
    if (!prefetch_ && predict_observer_ && next_moe_[size_t(il)] >= 0) predict(next_moe_[size_t(il)], n);   // before the FFN, as stored_experts
    if (dev_experts_) device_tier_experts(il, n, h, x);   // with a store: it feeds the gpu tier
    else if (store_) stored_experts(il, n, h, x);
    if (!L.shared.empty()) {
        matmul(L.shared_gate, {}, h, shared_scale_.dev(), n);
        shared_scale_.download(0, size_t(n));
        shared_expert_gate(shared_scale_.host(), n);
        shared_scale_.upload(0, size_t(n));
        run_expert(L.shared, h, shared_scale_.dev(), x, n);
    }
}

const float * ForwardPass::run(const Batch & batch, std::string * error) {
    const ModelConfig & c = model_.config();
    const int64_t n = batch.size();
    auto fail = [&](const std::string & msg) -> const float * {
        if (error) *error = msg;
        return nullptr;
    };
    if (n == 0) return fail("empty batch");
    if (n > max_batch_) return fail("batch of " + std::to_string(n) + " tokens exceeds max_batch " + std::to_string(max_batch_));
    if (batch.pos.size() != size_t(n) || batch.seq.size() != size_t(n) || batch.want_logits.size() != size_t(n))
        return fail("batch arrays have different lengths");
    for (int64_t t = 0; t < n; ++t) {
        const int32_t tok = batch.token[size_t(t)], pos = batch.pos[size_t(t)], seq = batch.seq[size_t(t)];
        if (tok < 0 || tok >= c.n_vocab)
            return fail("token " + std::to_string(tok) + " at batch row " + std::to_string(t) + " is outside the vocabulary [0, " +
                        std::to_string(c.n_vocab) + ")");
        if (seq < 0 || seq >= kv_.spec().n_seq_max)
            return fail("sequence id " + std::to_string(seq) + " outside [0, " + std::to_string(kv_.spec().n_seq_max) + ")");
        if (pos < 0 || pos >= kv_.capacity(seq))
            return fail("position " + std::to_string(pos) + " of sequence " + std::to_string(seq) +
                        " is beyond its reserved KV capacity (" + std::to_string(kv_.capacity(seq)) + ")");
    }

    // Step indices: [0, B) positions, [B, 2B) KV pool rows, [2B, 3B) rows that want logits,
    // then the block table of each sequence in the batch, once.
    int32_t * step = step_.host();
    int32_t * pool_rows = step + max_batch_;
    int32_t * out_rows = step + 2 * max_batch_;
    int64_t n_out = 0, n_tables = 0;
    runs_.clear();
    for (int64_t t = 0; t < n; ++t) {
        const int32_t seq = batch.seq[size_t(t)], pos = batch.pos[size_t(t)];
        step[t] = pos;
        pool_rows[t] = kv_.pool_row(seq, pos);
        if (batch.want_logits[size_t(t)]) out_rows[n_out++] = int32_t(t);
        if (!runs_.empty() && batch.seq[size_t(runs_.back().first)] == seq) {
            runs_.back().n_tokens = t + 1 - runs_.back().first;
            runs_.back().n_kv = std::max(runs_.back().n_kv, int64_t(pos) + 1);
        } else {
            runs_.push_back({t, 1, -1, int64_t(pos) + 1});
        }
    }
    for (size_t i = 0; i < runs_.size(); ++i) {
        const int32_t seq = batch.seq[size_t(runs_[i].first)];
        for (size_t j = 0; j < i && runs_[i].table < 0; ++j)
            if (batch.seq[size_t(runs_[j].first)] == seq) runs_[i].table = runs_[j].table;
        if (runs_[i].table >= 0) continue;
        const int64_t len = kv_.capacity(seq) / kv_.spec().block_size;   // the whole table: later runs may need more
        if (n_tables + len > max_table_entries_)   // a reservation beyond the model's context: refused, never overrun
            return fail("the batch's block tables (" + std::to_string(n_tables + len) + " entries) exceed the " +
                        std::to_string(max_table_entries_) + " this pass holds: a sequence reserved beyond the model's context");
        std::memcpy(step + 3 * max_batch_ + n_tables, kv_.block_table(seq), size_t(len) * sizeof(int32_t));
        runs_[i].table = n_tables;
        n_tables += len;
    }
    n_tables_ = n_tables;
    step_.upload(0, size_t(3 * max_batch_ + n_tables));

    const size_t n_embd = size_t(c.n_embd);
    const WeightMatrix & E = model_.tok_embd();   // stays in host memory
    for (int64_t t = 0; t < n; ++t) {
        const auto * row = static_cast<const uint8_t *>(E.data) + size_t(batch.token[size_t(t)]) * dtype_row_bytes(E.type, c.n_embd);
        convert_to_f32(row, E.type, x_.host() + size_t(t) * n_embd, c.n_embd);
    }
    x_.upload(0, size_t(n) * n_embd);
    ++n_steps_;
    if ((prefetch_ || predict_observer_) && first_moe_ >= 0) {   // the first MoE layer's guess, from the embeddings
        predict(first_moe_, n);
        if (prefetch_) prefetch_predicted(first_moe_);
    }

    for (int64_t il = 0; il < c.n_layer; ++il) {
        attention(il, n);
        ffn(il, n);
    }

    if (n_out > 0) {
        float * h = h_.as<float>();
        if (n_out == n) {
            rms_norm(x_.dev(), model_.output_norm(), h, n, c.n_embd);
        } else {
            copy_rows(x_.dev(), n, step_.dev() + 2 * max_batch_, h, n_out, nullptr, n_out, c.n_embd, false);
            rms_norm(h, model_.output_norm(), h, n_out, c.n_embd);
        }
        matmul(model_.output(), {}, h, logits_.dev(), n_out);
        logits_.download(0, size_t(n_out * c.n_vocab));
    }
    be_.check(be_.iface().synchronize(be_.ctx()), "synchronize");
    queue_free_at_ = 0;   // the copy queue is empty too
    if (dev_experts_ && dev_experts_->async()) {   // its rate, as the device timed it, for the cost model
        const auto [bytes, seconds] = dev_experts_->take_upload_times();
        if (cost_) cost_->observe_upload(size_t(bytes), seconds);
    }
    return logits_.host();
}

} // namespace moesh
