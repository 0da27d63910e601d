// The placement engine's view of a loaded model: its footprint for the plan
// (experts/placement.h) and, when the plan streams experts, the ExpertStore
// that serves them from the model's files.
//
//   ModelFootprint f = footprint_of(model, "olmoe", n_ctx, max_batch);
//   PlacementPlan plan = plan_placement(f, rc.placement);
//   std::unique_ptr<ExpertStore> store = open_expert_store(model, plan, progress);   // null: all resident
//
// Thread safety: plain functions.
#pragma once

#include "experts/cost_model.h"
#include "experts/device_experts.h"
#include "experts/expert_store.h"
#include "experts/placement.h"
#include "runtime/model.h"

#include <functional>
#include <memory>
#include <string>

namespace moesh {

// n_ctx and max_batch size the KV cache and the activations the plan reports.
ModelFootprint footprint_of(const Model & model, const std::string & name, int64_t n_ctx, int64_t max_batch,
                            int32_t kv_type = MOESH_DTYPE_F32);

// The host/disk part: nullptr when the plan keeps every expert resident on the
// host. Throws moesh::Error when the store cannot be set up (ExpertStore's message).
std::unique_ptr<ExpertStore> open_expert_store(const Model & model, const PlacementPlan & plan,
                                               std::function<void(size_t done, size_t total)> progress = {});

// The gpu tier on a device-memory backend: nullptr when the plan has none.
// Throws moesh::Error for more than one gpu tier, or what DeviceExperts throws.
std::unique_ptr<DeviceExperts> open_device_experts(const Model & model, const PlacementPlan & plan, const Backend & device,
                                                   std::function<void(size_t done, size_t total)> progress = {});

// Start-up rates for the cost model: one expert uploaded to device, and computed on host
// with one token, timed (the model's first MoE layer's expert 0).
CostRates measure_cost_rates(const Model & model, const Backend & device, const Backend & host);

} // namespace moesh
