#include "runtime/expert_placement.h"

#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"

#include <algorithm>

namespace moesh {

ModelFootprint footprint_of(const Model & model, const std::string & name, int64_t n_ctx, int64_t max_batch) {
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
    const KvCacheSpec ks{c.n_layer, c.n_head_kv, c.head_dim, 16, (std::max<int64_t>(1, n_ctx) + 15) / 16, 1};
    f.kv_bytes = ks.bytes();
    f.activation_bytes = ForwardPass::scratch_bytes(c, std::max<int64_t>(1, max_batch), ks.n_blocks);
    return f;
}

std::unique_ptr<ExpertStore> open_expert_store(const Model & model, const PlacementPlan & plan,
                                               std::function<void(size_t, size_t)> progress) {
    if (plan.all_resident) return nullptr;
    for (const TierPlan & t : plan.tiers)
        if (t.kind == TierKind::Gpu)
            throw Error("tier '" + t.name + "' is a gpu tier: the GPU expert cache is not built yet, so only host and disk "
                        "tiers run; remove it (moesh plan still shows what it would hold)");
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

} // namespace moesh
