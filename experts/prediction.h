// What a tier knows of the forward pass's predictions (the next MoE layer's router applied one
// layer early): which experts each layer's next visit is predicted to want, and how often
// predictions come true. Shared by the host tier (ExpertStore) and the gpu tier (DeviceExperts),
// which differ in what a prefetch moves, not in how a prediction is kept and scored.
//
//   bool first = false;
//   stats.predicted += tracker.note(layer, experts, n, &first);   // first: tell the policy
//   ... tracker.predicted(key) keeps predicted experts from being evicted by a prefetch ...
//   const PredictionTracker::Visit v = tracker.visit(layer, wanted_keys, n_wanted);
//   if (tracker.loads_allowed()) ...prefetch...
//
// Not thread-safe: the tier's own lock (if any) covers it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moesh {

class PredictionTracker {
public:
    // min_precision: loads_allowed() while the running precision is at least this (0: always).
    PredictionTracker(int32_t n_layer, int32_t n_expert, double min_precision);

    // experts[0, n) (ids in [0, n_expert)) are predicted for layer's next visit. Returns how
    // many of them are new to that visit's prediction; *first says there was none before.
    int64_t note(int32_t layer, const int32_t * experts, int64_t n, bool * first);
    bool predicted(int64_t key) const { return predicted_[size_t(key)] != 0; }

    struct Visit {
        int64_t wanted = 0;   // experts the visit wants, when it had a prediction (else 0)
        int64_t right = 0;    // ... of those, predicted
    };
    // layer's visit wanting keys[0, n) (distinct, of that layer) begins: scores its prediction
    // (the running precision moves by 1/10 towards this visit's) and forgets it.
    Visit visit(int32_t layer, const int64_t * keys, int64_t n);

    bool loads_allowed() const { return precision_ >= min_precision_; }
    double precision() const { return precision_; }

private:
    int32_t n_layer_, n_expert_;
    double min_precision_;
    double precision_ = 1.0;
    std::vector<char> predicted_;         // [key] predicted for its layer's next visit
    std::vector<char> layer_predicted_;   // [layer] a prediction of its next visit is pending
};

} // namespace moesh
