// Where an expert that is not in the fast tier runs this step: copied up (promoted)
// and computed there, or computed in place on the tier that holds it (the host
// CPU), by the time each would take — from rates measured at start-up and
// refined with every observation — and by how many tokens the step routes to it.
//
//   CostModel cm(rates);
//   Choice c = cm.choose(expert_bytes, n_tokens, n_embd, /*reuse=*/store.admits(...));
//   ... after running it: cm.observe_host(expert_bytes, n_tokens, seconds); ...
//
// Times: host compute  t_h(n) = bytes / host_gbps + n * host_token_s   (streams the weights once)
//        device compute t_d(n) = n * device_token_s                   (weights already there)
//        promotion      t_up   = bytes / upload_gbps
//        activations    t_x(n) = 2 * n * n_embd * 4 / upload_gbps + 2 * transfer_latency_s
// In place costs t_h(n) + t_x(n); promoting costs t_up + t_d(n), less one future
// use saved (t_h(1) + t_x(1) - t_d(1)) when the policy would keep it (reuse).
//
// With a copy queue beside the compute (queued uploads), the host and the queue work at
// once, so one layer's misses are placed together (plan_layer): each, most tokens first,
// goes where the layer would end sooner, the queue busy for its backlog plus the uploads
// already given to it, the host for the in-place experts already given to it. Deciding
// each miss alone would send every one up the faster path while the other stands idle.
// Thread safety: one thread uses a CostModel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace moesh {

struct CostRates {
    double upload_gbps = 10.0;          // host -> device, GB/s
    double transfer_latency_s = 20e-6;  // one small copy each way
    double host_gbps = 10.0;            // host expert compute, weight bytes per second (GB/s)
    double host_token_s = 50e-6;        // host compute per routed token beyond streaming the weights
    double device_token_s = 5e-6;       // device compute per routed token
};

enum class Placement { Promote, InPlace };
const char * placement_name(Placement p);   // "promote", "in-place"

enum class CostMode { Auto, AlwaysPromote, AlwaysInPlace };   // the last two for tests and comparisons

// One expert of a layer that the fast tier lacks, as plan_layer() weighs it.
struct LayerMiss {
    int32_t layer = 0, expert = 0;   // for the decision log
    size_t bytes = 0;                // the expert's weights
    int64_t n_tokens = 0;            // routed to it in this step
    bool reuse = false;              // the policy would keep it if promoted
};

class CostModel {
public:
    explicit CostModel(const CostRates & rates, CostMode mode = CostMode::Auto) : r_(rates), mode_(mode) {}

    Placement choose(size_t expert_bytes, int64_t n_tokens, int64_t n_embd, bool reuse) const;
    // The misses of one layer shared between a copy queue that is busy for queue_backlog_s
    // more seconds and the host, both running at once: out[i] for misses[i]. The misses
    // are weighed most tokens first (ties in the given order); order_scratch holds n indices.
    // backlog_needed: the layer computes with something in that backlog (an expert whose upload
    // is still queued), so it ends after the backlog whatever the plan; else only promotions
    // planned here make it wait for the queue. max_promotions: slots free for them now; Auto
    // plans no more promotions than that (AlwaysPromote ignores it). Allocates nothing.
    // Returns the estimated seconds until the queue has done the promotions planned here.
    double plan_layer(const LayerMiss * misses, int64_t n, int64_t n_embd, double queue_backlog_s, bool backlog_needed,
                      int64_t max_promotions, Placement * out, int32_t * order_scratch) const;
    double in_place_seconds(size_t expert_bytes, int64_t n_tokens, int64_t n_embd) const;
    double promote_seconds(size_t expert_bytes, int64_t n_tokens, int64_t n_embd, bool reuse) const;

    // Refine the rates from what a step took (exponentially weighted, weight 0.2).
    void observe_upload(size_t bytes, double seconds);
    void observe_host(size_t expert_bytes, int64_t n_tokens, double seconds);

    const CostRates & rates() const { return r_; }
    std::string describe() const;   // the rates, one line

    // Debug log of every decision (MOESH_LOG=debug): the expert, its tokens, both estimates, the choice.
    // planned: the estimates are when the layer's misses would be done (plan_layer), else the
    // expert's own time.
    using DecisionLog = std::function<void(int32_t layer, int32_t expert, int64_t n_tokens, double promote_s, double in_place_s,
                                           bool reuse, Placement chosen, bool planned)>;
    void set_decision_log(DecisionLog log) { log_ = std::move(log); }
    // choose() for expert (layer, expert), logged when a decision log is set.
    Placement choose_for(int32_t layer, int32_t expert, size_t expert_bytes, int64_t n_tokens, int64_t n_embd, bool reuse) const;

private:
    // What a kept copy saves: one later in-place run of a token, less its device compute.
    double reuse_credit(size_t expert_bytes, int64_t n_embd) const;
    CostRates r_;
    CostMode mode_;
    DecisionLog log_;
};

} // namespace moesh
