#include "experts/cache_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

namespace moesh {

const char * policy_name(Policy p) {
    switch (p) {
    case Policy::Static: return "static";
    case Policy::Lru: return "lru";
    case Policy::Lfu: return "lfu";
    case Policy::Heat: return "heat";
    case Policy::Lookahead: return "lookahead";
    case Policy::Window: return "window";
    case Policy::Belady: return "belady";
    }
    return "?";
}

bool parse_policy(const std::string & name, Policy * out) {
    for (Policy p : {Policy::Static, Policy::Lru, Policy::Lfu, Policy::Heat, Policy::Lookahead, Policy::Window, Policy::Belady})
        if (name == policy_name(p)) {
            *out = p;
            return true;
        }
    return false;
}

namespace {

constexpr double kPriorVisits = 4.0;

int64_t key_of(const ExpertRequest & r, int32_t n_expert) {
    if (r.layer < 0 || r.expert < 0 || r.expert >= n_expert)
        throw std::invalid_argument("expert request (layer " + std::to_string(r.layer) + ", expert " +
                                    std::to_string(r.expert) + ") outside [0, " + std::to_string(n_expert) + ")");
    return int64_t(r.layer) * n_expert + r.expert;
}

} // namespace

std::vector<int64_t> most_used_experts(const std::vector<ExpertRequest> & requests, int32_t n_expert, int64_t capacity) {
    std::unordered_map<int64_t, int64_t> counts;
    for (const ExpertRequest & r : requests) ++counts[key_of(r, n_expert)];
    std::vector<std::pair<int64_t, int64_t>> v(counts.begin(), counts.end());   // (key, count)
    std::sort(v.begin(), v.end(), [](const auto & a, const auto & b) { return a.second != b.second ? a.second > b.second : a.first < b.first; });
    std::vector<int64_t> out;
    for (size_t i = 0; i < v.size() && int64_t(i) < capacity; ++i) out.push_back(v[i].first);
    return out;
}

PolicyState::PolicyState(int32_t n_layer, int32_t n_expert, int32_t n_expert_used, const PolicyParams & params)
    : n_layer_(std::max(1, n_layer)), n_expert_(std::max(1, n_expert)), k_(std::max(1, n_expert_used)), params_(params),
      stats_(size_t(n_layer_) * size_t(n_expert_)), layer_heat_(size_t(n_layer_)), layer_step_(size_t(n_layer_)),
      layer_predicted_(size_t(n_layer_)), visit_wants_(size_t(n_expert_)), rank_right_(size_t(n_expert_) + 1),
      rank_n_(size_t(n_expert_) + 1) {
    if (!(params.heat_decay > 0.0 && params.heat_decay <= 1.0)) throw std::invalid_argument("heat decay must be in (0, 1]");
    if (!(params.lookahead_decay > 0.0 && params.lookahead_decay <= 1.0))
        throw std::invalid_argument("lookahead decay must be in (0, 1]");
    // Priors worth a few visits: an expert is wanted at the layer's average rate k / n_expert, a
    // prediction's first k ranks come true 3 times in 4, the others and the unpredicted at that rate.
    const double base = std::min(1.0, double(k_) / double(n_expert_));
    for (Stat & e : stats_) {
        e.after_use = e.after_idle = kPriorVisits;
        e.used_after_use = e.used_after_idle = kPriorVisits * base;
    }
    for (size_t r = 0; r < rank_n_.size(); ++r) {
        rank_n_[r] = kPriorVisits;
        rank_right_[r] = kPriorVisits * (int64_t(r) < k_ && r < size_t(n_expert_) ? 0.75 : base);
    }
}

void PolicyState::begin_visit(int32_t layer, const int32_t * experts, int64_t n) {
    if (layer < 0 || layer >= n_layer_) throw std::invalid_argument("layer " + std::to_string(layer) + " out of range");
    std::fill(visit_wants_.begin(), visit_wants_.end(), 0);
    for (int64_t i = 0; i < n; ++i)
        if (experts[i] >= 0 && experts[i] < n_expert_) visit_wants_[size_t(experts[i])] = 1;
    const double dec = params_.lookahead_decay;
    const bool predicted = layer_predicted_[size_t(layer)];
    for (size_t r = 0; r < rank_n_.size() && predicted; ++r) {
        rank_n_[r] *= dec;
        rank_right_[r] *= dec;
    }
    for (int32_t x = 0; x < n_expert_; ++x) {
        Stat & e = stats_[size_t(layer) * size_t(n_expert_) + size_t(x)];
        const double wanted = visit_wants_[size_t(x)] ? 1.0 : 0.0;
        e.after_use *= dec;
        e.used_after_use *= dec;
        e.after_idle *= dec;
        e.used_after_idle *= dec;
        if (e.used_last) {
            e.after_use += 1.0;
            e.used_after_use += wanted;
        } else {
            e.after_idle += 1.0;
            e.used_after_idle += wanted;
        }
        e.used_last = wanted > 0;
        if (predicted) {
            const size_t r = e.rank >= 0 ? size_t(e.rank) : size_t(n_expert_);
            rank_n_[r] += 1.0;
            rank_right_[r] += wanted;
        }
        e.rank = -1;
    }
    layer_predicted_[size_t(layer)] = 0;
}

void PolicyState::predict(int32_t layer, const int32_t * experts, int64_t n) {
    if (layer < 0 || layer >= n_layer_) return;
    Stat * row = stats_.data() + size_t(layer) * size_t(n_expert_);
    for (int32_t x = 0; x < n_expert_; ++x) row[x].rank = -1;
    int32_t rank = 0;
    for (int64_t i = 0; i < n; ++i)
        if (experts[i] >= 0 && experts[i] < n_expert_ && row[experts[i]].rank < 0) row[experts[i]].rank = rank++;
    layer_predicted_[size_t(layer)] = 1;
}

int32_t PolicyState::predicted_rank(int64_t key) const {
    if (!layer_predicted_[size_t(key / n_expert_)]) return -2;
    return stats_[size_t(key)].rank;
}

double PolicyState::prediction_precision(int32_t rank) const {
    const size_t r = rank >= 0 && rank < n_expert_ ? size_t(rank) : size_t(n_expert_);
    return rank_right_[r] / rank_n_[r];
}

double PolicyState::reuse_probability(int64_t key, int64_t step) const {
    const Stat & e = stats_[size_t(key)];
    const double reuse = e.used_last ? e.used_after_use / e.after_use : e.used_after_idle / e.after_idle;
    return 0.5 * reuse + 0.5 * heat_p(key, step);
}

double PolicyState::heat(int64_t key, int64_t step) const {
    const Stat & e = stats_[size_t(key)];
    return e.heat * std::pow(params_.heat_decay, double(step - e.heat_step));
}

void PolicyState::use(int64_t key, int64_t step) {
    if (key < 0 || key >= int64_t(stats_.size())) throw std::invalid_argument("expert key " + std::to_string(key) + " out of range");
    Stat & e = stats_[size_t(key)];
    e.heat = heat(key, step) + 1.0;
    e.heat_step = step;
    ++e.count;
    e.last_use = ++clock_;
    const size_t l = size_t(key / n_expert_);
    layer_heat_[l] = layer_heat_[l] * std::pow(params_.heat_decay, double(step - layer_step_[l])) + 1.0;
    layer_step_[l] = step;
}

double PolicyState::heat_p(int64_t key, int64_t step) const {
    const size_t l = size_t(key / n_expert_);
    const double lh = layer_heat_[l] * std::pow(params_.heat_decay, double(step - layer_step_[l]));
    // +1 per expert: an expert never seen is as likely as any other in its layer
    return std::min(1.0, double(k_) * (heat(key, step) + 1.0) / (lh + double(n_expert_)));
}

double PolicyState::expected_next_use(int64_t key, int64_t step, int32_t layer) const {
    const int32_t l = int32_t(key / n_expert_);
    const int32_t d = l > layer ? l - layer : l - layer + n_layer_;
    if (params_.policy != Policy::Lookahead) return double(d) + double(n_layer_) * (1.0 / heat_p(key, step) - 1.0);
    const Stat & e = stats_[size_t(key)];
    const double hp = heat_p(key, step);
    // Next visit: the prediction when one is pending for it (a pending prediction of the layer being
    // visited is for its visit after this one, which the reuse counts estimate better).
    double p1 = reuse_probability(key, step);
    if (layer_predicted_[size_t(l)] && l != layer) p1 = prediction_precision(e.rank);
    const double p0 = std::max(1e-3, 0.5 * e.used_after_idle / e.after_idle + 0.5 * hp);
    return double(d) + (1.0 - p1) * double(n_layer_) / p0;
}

bool PolicyState::admit(int64_t incoming, int64_t victim, int64_t step, int32_t layer) const {
    if (!policy_admits_selectively(params_.policy)) return true;
    return expected_next_use(incoming, step, layer) < expected_next_use(victim, step, layer);
}

size_t PolicyState::victim(const int64_t * cand, size_t n, int64_t step, int32_t layer) const {
    size_t best = 0;
    auto worse = [&](size_t i, size_t j) {   // is candidate i a better victim than j?
        const Stat & a = stats_[size_t(cand[i])];
        const Stat & b = stats_[size_t(cand[j])];
        switch (params_.policy) {
        case Policy::Lfu:
            if (a.count != b.count) return a.count < b.count;
            break;
        case Policy::Heat:
        case Policy::Lookahead: {
            const double x = expected_next_use(cand[i], step, layer), y = expected_next_use(cand[j], step, layer);
            if (x != y) return x > y;
            break;
        }
        default: break;
        }
        return a.last_use < b.last_use;   // lru, and every tie
    };
    for (size_t i = 1; i < n; ++i)
        if (worse(i, best)) best = i;
    return best;
}

CacheStats simulate_cache(const std::vector<ExpertRequest> & requests, int32_t n_expert, int32_t n_expert_used,
                          int64_t capacity, const PolicyParams & p, const std::vector<LayerPrediction> * predictions) {
    if (n_expert <= 0) throw std::invalid_argument("n_expert must be positive");
    if (capacity < 0) throw std::invalid_argument("capacity must be >= 0");
    if (int64_t(p.pinned.size()) > capacity)
        throw std::invalid_argument(std::to_string(p.pinned.size()) + " pinned experts do not fit in " +
                                    std::to_string(capacity) + " slots");
    if (!(p.heat_decay > 0.0 && p.heat_decay <= 1.0)) throw std::invalid_argument("heat decay must be in (0, 1]");

    if (!(p.lookahead_decay > 0.0 && p.lookahead_decay <= 1.0)) throw std::invalid_argument("lookahead decay must be in (0, 1]");
    const size_t n = requests.size();
    std::vector<int64_t> keys(n);
    for (size_t i = 0; i < n; ++i) keys[i] = key_of(requests[i], n_expert);
    if (predictions)
        for (size_t i = 0; i < predictions->size(); ++i) {
            const LayerPrediction & q = (*predictions)[i];
            for (int32_t e : q.experts) key_of({q.step, q.layer, e}, n_expert);
            if (i > 0 && std::make_pair(q.step, q.layer) <= std::make_pair((*predictions)[i - 1].step, (*predictions)[i - 1].layer))
                throw std::invalid_argument("predictions must be sorted by step, then layer, one per visit");
        }
    if (p.window < 0) throw std::invalid_argument("window must be >= 0");
    // Belady, window: for each request, the index of the next request of the same key.
    std::vector<int64_t> next_use;
    if (p.policy == Policy::Belady || p.policy == Policy::Window) {
        next_use.assign(n, std::numeric_limits<int64_t>::max());
        std::unordered_map<int64_t, int64_t> seen;
        for (size_t i = n; i-- > 0;) {
            auto it = seen.find(keys[i]);
            if (it != seen.end()) next_use[i] = it->second;
            seen[keys[i]] = int64_t(i);
        }
    }

    CacheStats s;
    const std::set<int64_t> pinned(p.pinned.begin(), p.pinned.end());
    const int64_t slots = capacity - int64_t(pinned.size());
    if (p.policy == Policy::Static || slots <= 0) {   // misses are served from the slower tier, not cached
        for (int64_t k : keys) s.hits += pinned.count(k) ? 1 : 0;
        s.requests = int64_t(n);
        return s;
    }

    if (p.policy == Policy::Belady) {
        // Residents by next use, latest first; an expert needed later than every resident is not cached.
        std::set<std::pair<int64_t, int64_t>, std::greater<>> order;   // (next use, key)
        std::unordered_map<int64_t, int64_t> resident;                 // key -> next use
        for (size_t i = 0; i < n; ++i) {
            const int64_t k = keys[i];
            ++s.requests;
            if (pinned.count(k)) {
                ++s.hits;
                continue;
            }
            auto it = resident.find(k);
            if (it != resident.end()) {
                ++s.hits;
                order.erase({it->second, k});
                it->second = next_use[i];
                order.insert({next_use[i], k});
                continue;
            }
            if (int64_t(resident.size()) >= slots) {
                const auto victim = *order.begin();
                if (victim.first <= next_use[i]) continue;
                order.erase(order.begin());
                resident.erase(victim.second);
                ++s.evictions;
            }
            resident[k] = next_use[i];
            order.insert({next_use[i], k});
            ++s.loads;
        }
        return s;
    }

    int32_t n_layer = 1;
    for (const ExpertRequest & r : requests) n_layer = std::max(n_layer, r.layer + 1);
    PolicyParams online = p;
    if (p.policy == Policy::Window) online.policy = Policy::Lookahead;   // its estimate beyond the window
    PolicyState state(n_layer, n_expert, n_expert_used, online);
    std::vector<int64_t> resident;   // keys, unordered
    std::vector<char> is_resident(size_t(n_layer) * size_t(n_expert));
    // window: the visit of each request, and each key's next request from now on
    std::vector<int64_t> visit_of, key_next;
    if (p.policy == Policy::Window) {
        visit_of.assign(n, 0);
        for (size_t i = 1; i < n; ++i)
            visit_of[i] = visit_of[i - 1] + (requests[i].step != requests[i - 1].step || requests[i].layer != requests[i - 1].layer);
        key_next.assign(size_t(n_layer) * size_t(n_expert), std::numeric_limits<int64_t>::max());
    }
    auto window_score = [&](int64_t key, size_t i) {
        const int64_t at = key_next[size_t(key)];
        if (at != std::numeric_limits<int64_t>::max() && visit_of[size_t(at)] - visit_of[i] <= p.window)
            return double(visit_of[size_t(at)] - visit_of[i]);
        return std::max(double(p.window + 1), state.expected_next_use(key, requests[i].step, requests[i].layer));
    };
    std::vector<int32_t> visit;      // experts of the visit beginning at request i
    size_t next_pred = 0;
    auto same_visit = [&](size_t a, size_t b) { return requests[a].step == requests[b].step && requests[a].layer == requests[b].layer; };
    for (size_t i = 0; i < n; ++i) {
        const int64_t k = keys[i];
        if (i == 0 || !same_visit(i, i - 1)) {
            size_t end = i;
            visit.clear();
            for (; end < n && same_visit(end, i); ++end)
                if (std::find(visit.begin(), visit.end(), requests[end].expert) == visit.end()) visit.push_back(requests[end].expert);
            // The next visit's prediction, when that visit is of this step, is known from now on.
            if (predictions && end < n && requests[end].step == requests[i].step) {
                const auto at = std::make_pair(requests[end].step, requests[end].layer);
                while (next_pred < predictions->size() &&
                       std::make_pair((*predictions)[next_pred].step, (*predictions)[next_pred].layer) < at)
                    ++next_pred;
                if (next_pred < predictions->size() &&
                    std::make_pair((*predictions)[next_pred].step, (*predictions)[next_pred].layer) == at) {
                    const LayerPrediction & q = (*predictions)[next_pred];
                    state.predict(q.layer, q.experts.data(), int64_t(q.experts.size()));
                }
            }
            state.begin_visit(requests[i].layer, visit.data(), int64_t(visit.size()));
        }
        state.use(k, requests[i].step);
        if (p.policy == Policy::Window) key_next[size_t(k)] = next_use[i];
        ++s.requests;
        if (pinned.count(k) || is_resident[size_t(k)]) {
            ++s.hits;
            continue;
        }
        if (int64_t(resident.size()) >= slots && p.policy == Policy::Window) {
            size_t v = 0;
            double worst = -1;
            for (size_t c = 0; c < resident.size(); ++c) {
                const double x = window_score(resident[c], i);
                if (x > worst) {
                    worst = x;
                    v = c;
                }
            }
            if (!(window_score(k, i) < worst)) continue;
            is_resident[size_t(resident[v])] = 0;
            resident[v] = resident.back();
            resident.pop_back();
            ++s.evictions;
        } else if (int64_t(resident.size()) >= slots) {
            const size_t v = state.victim(resident.data(), resident.size(), requests[i].step, requests[i].layer);
            if (!state.admit(k, resident[v], requests[i].step, requests[i].layer)) continue;   // used from the slower tier
            is_resident[size_t(resident[v])] = 0;
            resident[v] = resident.back();
            resident.pop_back();
            ++s.evictions;
        }
        resident.push_back(k);
        is_resident[size_t(k)] = 1;
        ++s.loads;
    }
    return s;
}

} // namespace moesh
