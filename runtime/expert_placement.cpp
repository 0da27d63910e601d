#include "runtime/expert_placement.h"

#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace moesh {

ModelFootprint footprint_of(const Model & model, const std::string & name, int64_t n_ctx, int64_t max_batch, int32_t kv_type) {
    const ModelConfig & c = model.config();
    ModelFootprint f;
    f.name = name;
    f.n_layer = int32_t(c.n_layer);
    f.n_expert = int32_t(std::max<int64_t>(0, c.n_expert));
    f.n_expert_used = int32_t(std::max<int64_t>(0, c.n_expert_used));
    f.embedding_bytes = model.tok_embd().n_bytes();
    f.output_bytes = model.output().data == model.tok_embd().data ? 0 : model.output().n_bytes();
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = model.layers()[size_t(il)];
        f.attention_bytes += L.wq.n_bytes() + L.wk.n_bytes() + L.wv.n_bytes() + L.wo.n_bytes();
        f.other_bytes += L.dense.n_bytes() + L.router.n_bytes() + L.shared.n_bytes() + L.shared_gate.n_bytes();
        for (const std::vector<float> * v : {&L.attn_norm, &L.ffn_norm, &L.q_norm, &L.k_norm, &L.bq, &L.bk, &L.bv, &L.bo})
            f.other_bytes += v->size() * sizeof(float);
        f.expert_bytes.push_back(L.is_moe ? model.experts().bytes_per_expert(int32_t(il)) : 0);
    }
    const KvCacheSpec ks{c.n_layer, c.n_head_kv, c.head_dim, 16, (std::max<int64_t>(1, n_ctx) + 15) / 16, 1, kv_type};
    f.kv_bytes = ks.bytes();
    f.kv_type = kv_type_name(kv_type);
    f.activation_bytes = ForwardPass::scratch_bytes(c, std::max<int64_t>(1, max_batch), ks);
    return f;
}

std::unique_ptr<ExpertStore> open_expert_store(const Model & model, const PlacementPlan & plan,
                                               std::function<void(size_t, size_t)> progress) {
    if (plan.all_resident) return nullptr;
    const TierPlan & h = *plan.host();
    StoreOptions o;
    o.budget = h.budget;
    o.slot_bytes = h.slot_bytes;
    o.n_expert_used = int32_t(std::max<int64_t>(1, model.config().n_expert_used));
    o.policy.policy = plan.policy;
    o.policy.heat_decay = plan.heat_decay;
    o.policy.pinned = h.pinned;
    o.direct_io = plan.direct_io;
    o.prefetch_min_precision = plan.prefetch_min_precision;
    o.progress = std::move(progress);
    std::vector<MappedRegion> files = model.source().mapped_files();
    try {
        return std::make_unique<ExpertStore>(model.experts(), std::move(files), o);
    } catch (const std::runtime_error & e) {
        throw Error(e.what());
    }
}

std::unique_ptr<DeviceExperts> open_device_experts(const Model & model, const PlacementPlan & plan, const Backend & device,
                                                   std::function<void(size_t, size_t)> progress) {
    const TierPlan * gpu = nullptr;
    for (const TierPlan & t : plan.tiers) {
        if (t.kind != TierKind::Gpu) continue;
        if (gpu) throw Error("tiers '" + gpu->name + "' and '" + t.name + "': one gpu tier per run (one device backend) for now");
        gpu = &t;
    }
    if (!gpu) return nullptr;
    DeviceExpertOptions o;
    o.budget = gpu->budget;
    o.n_expert_used = int32_t(std::max<int64_t>(1, model.config().n_expert_used));
    o.policy.policy = plan.policy;
    o.policy.heat_decay = plan.heat_decay;
    o.policy.pinned = gpu->pinned;
    o.prefetch_min_precision = plan.prefetch_min_precision;
    o.progress = std::move(progress);
    try {
        return std::make_unique<DeviceExperts>(model.experts(), device, o);
    } catch (const std::runtime_error & e) {
        throw Error(e.what());
    }
}

CostRates measure_cost_rates(const Model & model, const Backend & device, const Backend & host) {
    CostRates r;
    const ModelConfig & c = model.config();
    int32_t layer = -1;
    for (int64_t il = 0; il < c.n_layer && layer < 0; ++il)
        if (model.layers()[size_t(il)].is_moe) layer = int32_t(il);
    if (layer < 0) return r;
    const ExpertWeights & w = model.experts().get({layer, 0});
    using Clock = std::chrono::steady_clock;
    auto seconds = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    {
        BackendBuffer buf(device, w.gate.n_bytes(), "buffer_alloc (cost probe)");
        device.upload(buf.get(), w.gate.data, w.gate.n_bytes(), "copy_to_device (cost probe)");   // warm
        const auto t0 = Clock::now();
        device.upload(buf.get(), w.gate.data, w.gate.n_bytes(), "copy_to_device (cost probe)");
        const double s = seconds(t0);
        if (s > 0) r.upload_gbps = double(w.gate.n_bytes()) / s / 1e9;
    }
    {
        BackendBuffer x(host, size_t(c.n_embd) * 4, "buffer_alloc (cost probe)");
        BackendBuffer out(host, size_t(c.n_embd) * 4, "buffer_alloc (cost probe)");
        BackendBuffer scratch(host, 2 * size_t(w.n_ff()) * 4, "buffer_alloc (cost probe)");
        std::memset(x.get(), 0, size_t(c.n_embd) * 4);
        moesh_expert_ffn_args a = expert_ffn_args(w, x.as<float>(), nullptr, out.as<float>(), scratch.as<float>(), 1);
        double best = 1e30;
        for (int i = 0; i < 3; ++i) {   // the first pass pages the weights in
            const auto t0 = Clock::now();
            host.check(host.iface().expert_ffn(host.ctx(), &a), "expert_ffn (cost probe)");
            host.check(host.iface().synchronize(host.ctx()), "synchronize (cost probe)");
            best = std::min(best, seconds(t0));
        }
        if (best > 0) r.host_gbps = double(w.n_bytes()) / best / 1e9;
    }
    return r;
}

} // namespace moesh
