#include "experts/prediction.h"

namespace moesh {

PredictionTracker::PredictionTracker(int32_t n_layer, int32_t n_expert, double min_precision)
    : n_layer_(n_layer), n_expert_(n_expert), min_precision_(min_precision),
      predicted_(size_t(n_layer) * size_t(n_expert), 0), layer_predicted_(size_t(n_layer), 0) {}

int64_t PredictionTracker::note(int32_t layer, const int32_t * experts, int64_t n, bool * first) {
    *first = false;
    if (layer < 0 || layer >= n_layer_) return 0;
    *first = !layer_predicted_[size_t(layer)];
    layer_predicted_[size_t(layer)] = 1;
    int64_t added = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (experts[i] < 0 || experts[i] >= n_expert_) continue;
        char & p = predicted_[size_t(int64_t(layer) * n_expert_ + experts[i])];
        added += p ? 0 : 1;
        p = 1;
    }
    return added;
}

PredictionTracker::Visit PredictionTracker::visit(int32_t layer, const int64_t * keys, int64_t n) {
    Visit v;
    if (layer < 0 || layer >= n_layer_ || !layer_predicted_[size_t(layer)]) return v;
    v.wanted = n;
    for (int64_t i = 0; i < n; ++i) v.right += predicted_[size_t(keys[i])];
    int64_t n_pred = 0;
    for (int32_t e = 0; e < n_expert_; ++e) {
        char & p = predicted_[size_t(int64_t(layer) * n_expert_ + e)];
        n_pred += p;
        p = 0;
    }
    layer_predicted_[size_t(layer)] = 0;
    if (n_pred > 0) precision_ = 0.9 * precision_ + 0.1 * double(v.right) / double(n_pred);
    return v;
}

} // namespace moesh
