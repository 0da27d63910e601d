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

#include "experts/expert_store.h"
#include "experts/placement.h"
#include "runtime/model.h"

#include <functional>
#include <memory>
#include <string>

namespace moesh {

// n_ctx and max_batch size the KV cache and the activations the plan reports.
ModelFootprint footprint_of(const Model & model, const std::string & name, int64_t n_ctx, int64_t max_batch);

// nullptr when the plan keeps every expert resident. Throws moesh::Error when
// the store cannot be set up (message from ExpertStore), or for a gpu tier
// (the GPU expert cache is not built yet).
std::unique_ptr<ExpertStore> open_expert_store(const Model & model, const PlacementPlan & plan,
                                               std::function<void(size_t done, size_t total)> progress = {});

} // namespace moesh
