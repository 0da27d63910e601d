#include "experts/cost_model.h"

#include <algorithm>
#include <cstdio>

namespace moesh {

const char * placement_name(Placement p) { return p == Placement::Promote ? "promote" : "in-place"; }

namespace {

constexpr double k_weight = 0.2;   // of a new observation in the running rates

double blend(double old_value, double observed) { return (1.0 - k_weight) * old_value + k_weight * observed; }

} // namespace

double CostModel::in_place_seconds(size_t bytes, int64_t n, int64_t n_embd) const {
    const double act = 2.0 * double(n) * double(n_embd) * 4.0 / (r_.upload_gbps * 1e9) + 2.0 * r_.transfer_latency_s;
    return double(bytes) / (r_.host_gbps * 1e9) + double(n) * r_.host_token_s + act;
}

double CostModel::promote_seconds(size_t bytes, int64_t n, int64_t n_embd, bool reuse) const {
    return double(bytes) / (r_.upload_gbps * 1e9) + double(n) * r_.device_token_s - (reuse ? reuse_credit(bytes, n_embd) : 0.0);
}

double CostModel::reuse_credit(size_t bytes, int64_t n_embd) const {
    return std::max(0.0, in_place_seconds(bytes, 1, n_embd) - r_.device_token_s);
}

Placement CostModel::choose(size_t bytes, int64_t n, int64_t n_embd, bool reuse) const {
    if (mode_ == CostMode::AlwaysPromote) return Placement::Promote;
    if (mode_ == CostMode::AlwaysInPlace) return Placement::InPlace;
    return promote_seconds(bytes, n, n_embd, reuse) < in_place_seconds(bytes, n, n_embd) ? Placement::Promote
                                                                                         : Placement::InPlace;
}

double CostModel::plan_layer(const LayerMiss * misses, int64_t n, int64_t n_embd, double queue_backlog_s,
                             bool backlog_needed, int64_t max_promotions, Placement * out, int32_t * order) const {
    for (int64_t i = 0; i < n; ++i) order[i] = int32_t(i);
    // std::sort with the index as tie-break: stable_sort may allocate, and this runs every layer.
    std::sort(order, order + n, [&](int32_t a, int32_t b) {
        return misses[a].n_tokens != misses[b].n_tokens ? misses[a].n_tokens > misses[b].n_tokens : a < b;
    });
    // The compute queue runs in order: promoted experts compute after the in-place ones have been
    // added back (their outputs come up behind them) and after their own upload.
    double queue = std::max(0.0, queue_backlog_s), host = 0, device = 0;
    double needed = backlog_needed ? queue : 0.0;   // until the queue has done what this layer computes with
    for (int64_t k = 0; k < n; ++k) {
        const LayerMiss & m = misses[order[k]];
        Placement p = mode_ == CostMode::AlwaysPromote ? Placement::Promote : Placement::InPlace;
        const double up = double(m.bytes) / (r_.upload_gbps * 1e9);
        const double dev = double(m.n_tokens) * r_.device_token_s;
        const double here = in_place_seconds(m.bytes, m.n_tokens, n_embd);
        const double credit = m.reuse ? reuse_credit(m.bytes, n_embd) : 0.0;
        const double end_promote = std::max(host, queue + up) + device + dev - credit;
        const double end_in_place = std::max(host + here, needed) + device;
        if (mode_ == CostMode::Auto)
            p = max_promotions > 0 && end_promote < end_in_place ? Placement::Promote : Placement::InPlace;
        if (log_) log_(m.layer, m.expert, m.n_tokens, end_promote, end_in_place, m.reuse, p, true);
        if (p == Placement::Promote) {
            queue += up;
            needed = queue;
            device += dev;
            --max_promotions;
        } else {
            host += here;
        }
        out[order[k]] = p;
    }
    return queue;
}

void CostModel::observe_upload(size_t bytes, double seconds) {
    if (bytes < (1u << 16) || seconds <= 0) return;   // too small to say anything about bandwidth
    r_.upload_gbps = blend(r_.upload_gbps, double(bytes) / seconds / 1e9);
}

void CostModel::observe_host(size_t bytes, int64_t n, double seconds) {
    if (seconds <= 0 || n <= 0) return;
    // Attribute the time to streaming the weights first (what dominates at decode), the rest to tokens.
    const double stream = double(bytes) / (r_.host_gbps * 1e9);
    if (n == 1) r_.host_gbps = blend(r_.host_gbps, double(bytes) / std::max(1e-9, seconds - r_.host_token_s) / 1e9);
    else r_.host_token_s = blend(r_.host_token_s, std::max(0.0, seconds - stream) / double(n));
}

Placement CostModel::choose_for(int32_t layer, int32_t expert, size_t expert_bytes, int64_t n_tokens, int64_t n_embd,
                                bool reuse) const {
    const Placement p = choose(expert_bytes, n_tokens, n_embd, reuse);
    if (log_)
        log_(layer, expert, n_tokens, promote_seconds(expert_bytes, n_tokens, n_embd, reuse),
             in_place_seconds(expert_bytes, n_tokens, n_embd), reuse, p, false);
    return p;
}

std::string CostModel::describe() const {
    char buf[256];
    std::snprintf(buf, sizeof buf, "upload %.2f GB/s, host expert compute %.2f GB/s + %.1f us/token, device %.1f us/token",
                  r_.upload_gbps, r_.host_gbps, r_.host_token_s * 1e6, r_.device_token_s * 1e6);
    return buf;
}

} // namespace moesh
