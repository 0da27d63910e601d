// Which experts a fast tier keeps when it cannot hold them all: replacement
// policies as pure functions of the access history, and a simulator that
// replays a sequence of expert requests through one of them.
//
//   std::vector<ExpertRequest> reqs = ...;          // in the order the forward pass asks
//   CacheStats s = simulate_cache(reqs, n_experts_total, /*capacity=*/16, {Policy::Lru});
//   s.hit_rate();                                   // beside simulate_cache(..., {Policy::Belady})
//
// A request is one (token, layer) needing one expert; the k experts a token
// chooses in a layer are k requests with the same step. Every expert has the
// same size (one slot). A miss always loads the expert (evicting one when the
// cache is full); pinned experts are loaded first and never evicted.
// Policies:
//   static  only the pins are resident; misses are served from the slower tier
//           without caching (the llama.cpp "-ot" / ktransformers rule style)
//   lru     evict the least recently used
//   lfu     evict the least frequently used so far (ties: least recent)
//   heat    evict the expert expected to be needed last: layers are visited
//           in order, so an expert of layer l is next wanted when the forward
//           pass comes back to l (d layers from now) and then with probability
//           p per visit, p from decayed counts (heat = heat * decay^(steps
//           since its last update) + 1 per use; decay per step, e.g. 0.95),
//           p = min(1, k * (heat + 1) / (layer's heat + n_expert)). Expected
//           next use: d + n_layer * (1/p - 1); the largest goes. Unlike LRU it
//           does not throw out the layer that comes next. Admission: a missed
//           expert expected back later than that victim is not cached (the
//           run-time store reads it into its one streaming slot instead).
//   lookahead  heat's rule with two more things it knows at run time, so
//           expected next use = d + (1 - p1) * n_layer / p0, where p1 is the
//           chance of use at the expert's next visit and p0 at a later one:
//           - the prefetch prediction: when the forward pass has predicted the
//             layer's next visit (predict()), p1 is the prediction's running
//             precision at the expert's rank (or the running rate at which
//             unpredicted experts were wanted anyway);
//           - reuse: per expert, decayed counts (per visit of its layer,
//             lookahead_decay) of whether a visit that followed a use / a
//             non-use used it, so p1 depends on whether its last visit used it;
//             these rates are averaged with heat's p (p0 from the non-use side).
//           Without predictions (a tier that is not prefetched) it is the reuse
//           part alone. Admission as heat.
//   window  a yardstick, not an online policy (simulator only): an oracle that
//           knows every request of the next `window` layer visits and uses
//           Belady's rule on them; an expert not wanted within them counts as
//           window + 1 visits away or lookahead's estimate, whichever is more.
//           Shows how much lookahead (in visits) a policy would need to come
//           near Belady: window = n_layer is the whole next token known.
//   belady  evict the one needed again farthest in the future, or do not
//           cache the requested one when it is needed later than all of them
//           (the offline optimum for unit-size items; the yardstick). Pins
//           are loaded before the first request and the others are not, so a
//           static policy can beat it by at most the capacity (cold misses).
// PolicyState is the online part, shared by the simulator and the run-time
// cache (experts/expert_store.h): statistics per expert and the victim choice.
// Thread safety: pure functions; a PolicyState is used by one thread at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moesh {

struct ExpertRequest {
    int64_t step = 0;      // token index in the sequence (decay and recency are per step)
    int32_t layer = 0;
    int32_t expert = 0;
};

// The forward pass's guess of which experts one visit (step, layer) will want, most likely
// first; it is known from the start of the visit before it in the same step (the prefetch
// prediction: that layer's router on the residual stream one layer earlier).
struct LayerPrediction {
    int64_t step = 0;
    int32_t layer = 0;
    std::vector<int32_t> experts;   // [n] expert ids of `layer`, ranked
};

enum class Policy { Static, Lru, Lfu, Heat, Lookahead, Window, Belady };
const char * policy_name(Policy p);
// "static", "lru", "lfu", "heat", "lookahead", "window", "belady"; false if unknown.
bool parse_policy(const std::string & name, Policy * out);
// Whether PolicyState::admit can decline (heat, lookahead): a cache then keeps a streaming slot.
// (window and belady are yardsticks of the simulator; a run-time cache refuses them.)
inline bool policy_admits_selectively(Policy p) { return p == Policy::Heat || p == Policy::Lookahead; }

struct PolicyParams {
    Policy policy = Policy::Lru;
    double heat_decay = 0.95;               // per step, in (0, 1]
    std::vector<int64_t> pinned;            // expert keys (layer * n_expert + expert), at most capacity
    double lookahead_decay = 0.99;          // lookahead's reuse and precision counts, per visit, in (0, 1]
    int64_t window = 0;                     // window: layer visits the oracle sees ahead (>= 0)
};

// What the online policies know: per expert, its uses so far, and where the
// forward pass is (token step, layer).
class PolicyState {
public:
    // n_layer: layers that route (keys are layer * n_expert + expert, layer < n_layer).
    PolicyState(int32_t n_layer, int32_t n_expert, int32_t n_expert_used, const PolicyParams & params);

    // A visit of `layer` begins: experts[0, n) are the ones it wants (distinct). Updates the
    // reuse counts and scores, then forgets, the layer's prediction. Call before its use()s.
    void begin_visit(int32_t layer, const int32_t * experts, int64_t n);
    // The forward pass predicts layer's next visit: experts[0, n), most likely first
    // (replaces an earlier prediction of that layer; ids out of range are ignored).
    void predict(int32_t layer, const int32_t * experts, int64_t n);
    void use(int64_t key, int64_t step);   // one use by the token at `step`
    // Which of candidates[0, n) to evict when the forward pass is at (step, layer); n > 0.
    size_t victim(const int64_t * candidates, size_t n, int64_t step, int32_t layer) const;
    // Whether incoming deserves victim's slot; heat: only if it is expected back sooner (the
    // others always admit). A declined expert is used from where it is, not cached.
    bool admit(int64_t incoming, int64_t victim, int64_t step, int32_t layer) const;
    // heat, lookahead: the expected number of layer visits until key is needed again.
    double expected_next_use(int64_t key, int64_t step, int32_t layer) const;
    double heat(int64_t key, int64_t step) const;
    // lookahead: the chance that key's next visit wants it, from reuse counts (and heat) alone.
    double reuse_probability(int64_t key, int64_t step) const;
    // lookahead: the running share of rank r's predictions (0: the first) that came true;
    // r = -1: the share of the layer's unpredicted experts that were wanted anyway.
    double prediction_precision(int32_t rank) const;
    // The rank of key in its layer's pending prediction, -1 when unpredicted, -2 when none is pending.
    int32_t predicted_rank(int64_t key) const;

private:
    struct Stat {
        int64_t count = 0;
        int64_t last_use = 0;   // use counter, for recency
        double heat = 0;        // as of heat_step
        int64_t heat_step = 0;
        // lookahead: decayed visits after a visit that used it / did not, and how many of them used it
        double after_use = 0, used_after_use = 0, after_idle = 0, used_after_idle = 0;
        bool used_last = false;   // its layer's last visit wanted it
        int32_t rank = -1;        // in the pending prediction of its layer, -1: not predicted
    };
    double heat_p(int64_t key, int64_t step) const;
    int32_t n_layer_, n_expert_, k_;
    PolicyParams params_;
    std::vector<Stat> stats_;                  // [n_layer * n_expert]
    std::vector<double> layer_heat_;           // [n_layer] sum of the layer's heat, as of layer_step_
    std::vector<int64_t> layer_step_;
    std::vector<char> layer_predicted_;        // [n_layer] a prediction of its next visit is pending
    std::vector<char> visit_wants_;            // [n_expert] scratch of begin_visit
    std::vector<double> rank_right_, rank_n_;  // [n_expert + 1] decayed; the last entry: unpredicted experts
    int64_t clock_ = 0;
};

struct CacheStats {
    int64_t requests = 0;
    int64_t hits = 0;
    int64_t loads = 0;        // misses that brought the expert in
    int64_t evictions = 0;
    double hit_rate() const { return requests ? double(hits) / double(requests) : 0.0; }
};

// n_expert: experts per layer (keys are layer * n_expert + expert); n_expert_used:
// the router's k (heat's estimate of p). capacity:
// slots in the cache (0..). Throws std::invalid_argument for an expert or layer
// out of range, more pins than capacity, a decay outside (0, 1], or predictions
// out of order or naming an expert out of range.
// A visit is a run of requests with the same (step, layer); the policy's begin_visit sees each.
// predictions (optional; sorted by step, then layer): each is revealed (PolicyState::predict)
// at the start of the visit before its own, when that one is of the same step; one for a
// visit that no request makes, or that is the first of its step, is never revealed.
CacheStats simulate_cache(const std::vector<ExpertRequest> & requests, int32_t n_expert, int32_t n_expert_used,
                          int64_t capacity, const PolicyParams & params,
                          const std::vector<LayerPrediction> * predictions = nullptr);

// The capacity experts used most often in requests (ties: lower key), as pins
// for Policy::Static: the best any frequency-based static rule could do.
std::vector<int64_t> most_used_experts(const std::vector<ExpertRequest> & requests, int32_t n_expert, int64_t capacity);

} // namespace moesh
