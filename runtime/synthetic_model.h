// Random weights of any supported shape, in memory, named as Hugging Face
// checkpoints name them: for benchmarks of realistic shapes without a
// multi-GB file, and for tests that need a model of a given shape.
//
//   ModelConfig cfg = parse_model_config(json, "synthetic");
//   Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_BF16, 42));
//
// Thread safety: pure function.
#pragma once

#include "runtime/model_config.h"
#include "runtime/weight_source.h"

#include <memory>

namespace moesh {

// Weights ~ uniform(-a, a) with a = 1/sqrt(fan_in) for matrices (keeps
// activations O(1) through many layers), norms ~ 1 +- 0.1.
std::shared_ptr<MemoryWeightSource> make_synthetic_weights(const ModelConfig & cfg, moesh_dtype dtype, uint64_t seed);

} // namespace moesh
