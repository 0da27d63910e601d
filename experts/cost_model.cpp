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
    double t = double(bytes) / (r_.upload_gbps * 1e9) + double(n) * r_.device_token_s;
    if (reuse) t -= std::max(0.0, in_place_seconds(bytes, 1, n_embd) - r_.device_token_s);
    return t;
}

Placement CostModel::choose(size_t bytes, int64_t n, int64_t n_embd, bool reuse) const {
    if (mode_ == CostMode::AlwaysPromote) return Placement::Promote;
    if (mode_ == CostMode::AlwaysInPlace) return Placement::InPlace;
    return promote_seconds(bytes, n, n_embd, reuse) < in_place_seconds(bytes, n, n_embd) ? Placement::Promote
                                                                                         : Placement::InPlace;
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
             in_place_seconds(expert_bytes, n_tokens, n_embd), reuse, p);
    return p;
}

std::string CostModel::describe() const {
    char buf[256];
    std::snprintf(buf, sizeof buf, "upload %.2f GB/s, host expert compute %.2f GB/s + %.1f us/token, device %.1f us/token",
                  r_.upload_gbps, r_.host_gbps, r_.host_token_s * 1e6, r_.device_token_s * 1e6);
    return buf;
}

} // namespace moesh
