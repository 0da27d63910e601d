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
    case Policy::Belady: return "belady";
    }
    return "?";
}

bool parse_policy(const std::string & name, Policy * out) {
    for (Policy p : {Policy::Static, Policy::Lru, Policy::Lfu, Policy::Heat, Policy::Belady})
        if (name == policy_name(p)) {
            *out = p;
            return true;
        }
    return false;
}

namespace {

int64_t key_of(const ExpertRequest & r, int32_t n_expert) {
    if (r.layer < 0 || r.expert < 0 || r.expert >= n_expert)
        throw std::invalid_argument("expert request (layer " + std::to_string(r.layer) + ", expert " +
                                    std::to_string(r.expert) + ") outside [0, " + std::to_string(n_expert) + ")");
    return int64_t(r.layer) * n_expert + r.expert;
}

// What is known about one expert: its statistics persist across evictions
// (the heat of an expert is the expert's, not its cache entry's).
struct Stat {
    int64_t count = 0;      // uses so far
    int64_t last_use = 0;   // request index of the last use
    int64_t next = 0;       // belady: request index of the next use
    double heat = 0;        // decayed count as of heat_step
    int64_t heat_step = 0;
};

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

CacheStats simulate_cache(const std::vector<ExpertRequest> & requests, int32_t n_expert, int64_t capacity,
                          const PolicyParams & p) {
    if (n_expert <= 0) throw std::invalid_argument("n_expert must be positive");
    if (capacity < 0) throw std::invalid_argument("capacity must be >= 0");
    if (int64_t(p.pinned.size()) > capacity)
        throw std::invalid_argument(std::to_string(p.pinned.size()) + " pinned experts do not fit in " +
                                    std::to_string(capacity) + " slots");
    if (!(p.heat_decay > 0.0 && p.heat_decay <= 1.0)) throw std::invalid_argument("heat decay must be in (0, 1]");

    const size_t n = requests.size();
    std::vector<int64_t> keys(n);
    for (size_t i = 0; i < n; ++i) keys[i] = key_of(requests[i], n_expert);
    // Belady: for each request, the index of the next request of the same key.
    std::vector<int64_t> next_use;
    if (p.policy == Policy::Belady) {
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
    std::unordered_map<int64_t, Stat> stats;
    // Residents in eviction order: (rank, last use, key) ascending, the first goes.
    using Rank = std::tuple<double, int64_t, int64_t>;
    std::set<Rank> order;
    std::unordered_map<int64_t, Rank> resident;
    auto heat_now = [&](const Stat & e, int64_t step) { return e.heat * std::pow(p.heat_decay, double(step - e.heat_step)); };
    auto rank = [&](int64_t key, const Stat & e) -> Rank {
        switch (p.policy) {
        case Policy::Lru: return {double(e.last_use), e.last_use, key};
        case Policy::Lfu: return {double(e.count), e.last_use, key};
        case Policy::Belady: return {-double(e.next), e.last_use, key};
        default: return {0.0, e.last_use, key};   // heat: ranked by a scan at eviction time
        }
    };
    const int64_t slots = capacity - int64_t(pinned.size());

    for (size_t i = 0; i < n; ++i) {
        const int64_t k = keys[i];
        const int64_t step = requests[i].step;
        Stat & e = stats[k];
        e.heat = heat_now(e, step) + 1.0;
        e.heat_step = step;
        ++e.count;
        e.last_use = int64_t(i);
        if (p.policy == Policy::Belady) e.next = next_use[i];
        ++s.requests;
        if (pinned.count(k)) {
            ++s.hits;
            continue;
        }
        if (p.policy == Policy::Static || slots <= 0) continue;   // served from the slower tier, not cached
        auto it = resident.find(k);
        if (it != resident.end()) {
            ++s.hits;
            order.erase(it->second);
            it->second = rank(k, e);
            order.insert(it->second);
            continue;
        }
        if (int64_t(resident.size()) >= slots) {
            Rank victim = *order.begin();
            // Belady may bypass: an expert needed later than every resident is not worth a slot.
            if (p.policy == Policy::Belady && -std::get<0>(victim) <= double(e.next)) continue;
            if (p.policy == Policy::Heat) {   // heat decays with time: compare everyone's as of now
                double best = std::numeric_limits<double>::infinity();
                for (const auto & [key, r] : resident) {
                    const Stat & o = stats[key];
                    const double h = heat_now(o, step);
                    if (h < best || (h == best && std::make_pair(o.last_use, key) <
                                                      std::make_pair(std::get<1>(victim), std::get<2>(victim)))) {
                        best = h;
                        victim = r;
                    }
                }
                // Admission: a slot goes to the incoming expert only if it is now hotter than the coldest
                // resident; otherwise it is served from the slower tier this time (no copy).
                if (e.heat <= best) continue;
            }
            order.erase(victim);
            resident.erase(std::get<2>(victim));
            ++s.evictions;
        }
        resident[k] = rank(k, e);
        order.insert(resident[k]);
        ++s.loads;
    }
    return s;
}

} // namespace moesh
