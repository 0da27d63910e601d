#include "experts/placement.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <set>

namespace moesh {

const char * tier_kind_name(TierKind k) {
    switch (k) {
    case TierKind::Gpu: return "gpu";
    case TierKind::Host: return "host";
    case TierKind::Disk: return "disk";
    }
    return "?";
}

size_t ModelFootprint::routed_expert_bytes() const {
    size_t s = 0;
    for (size_t b : expert_bytes) s += b * size_t(n_expert);
    return s;
}

int64_t ModelFootprint::n_routed() const {
    int64_t n = 0;
    for (size_t b : expert_bytes) n += b ? n_expert : 0;
    return n;
}

size_t ModelFootprint::max_expert_bytes() const {
    size_t m = 0;
    for (size_t b : expert_bytes) m = std::max(m, b);
    return m;
}

size_t slot_bytes_for(size_t expert_bytes) {
    // three matrices, each widened by at most one page at either end, then whole pages
    const size_t a = k_direct_io_align;
    return (expert_bytes + a - 1) / a * a + 6 * a;
}

size_t device_slot_bytes_for(size_t expert_bytes) { return (expert_bytes + 255) / 256 * 256 + 3 * 256; }

namespace {

std::string gib(double bytes) {
    char buf[32];
    if (bytes >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
    else if (bytes >= 1024.0 * 1024) std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
    else std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
    return buf;
}

std::string range_text(const IndexRange & r) {
    if (r.all()) return "*";
    return r.first == r.last ? std::to_string(r.first) : std::to_string(r.first) + "-" + std::to_string(r.last);
}

} // namespace

std::vector<int64_t> pinned_expert_keys(const PlacementConfig & placement, const std::string & tier,
                                        const std::vector<bool> & moe_layers, int64_t n_expert) {
    const int64_t n_layer = int64_t(moe_layers.size());
    std::vector<int64_t> keys;
    for (size_t i = 0; i < placement.pins.size(); ++i) {
        const PinConfig & pin = placement.pins[i];
        if (pin.tier != tier) continue;
        const std::string which = "[[placement.pin]] " + std::to_string(i + 1) + " (tier '" + pin.tier + "')";
        if (!pin.layers.all() && pin.layers.last >= n_layer)
            throw PlacementError(which + ": layers " + range_text(pin.layers) + " go past the model's " + std::to_string(n_layer) +
                                 " layers (0-" + std::to_string(n_layer - 1) + ")");
        if (!pin.experts.all() && pin.experts.last >= n_expert)
            throw PlacementError(which + ": experts " + range_text(pin.experts) + " go past the model's " +
                                 std::to_string(n_expert) + " experts per layer (0-" + std::to_string(n_expert - 1) + ")");
        for (int64_t l = 0; l < n_layer; ++l)
            if (moe_layers[size_t(l)] && pin.layers.contains(l))
                for (int64_t e = 0; e < n_expert; ++e)
                    if (pin.experts.contains(e)) keys.push_back(l * n_expert + e);
    }
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    return keys;
}

PlacementPlan plan_placement(const ModelFootprint & m, const PlacementConfig & c) {
    PlacementPlan p;
    if (!parse_policy(c.policy, &p.policy) || p.policy == Policy::Belady || p.policy == Policy::Window)
        throw PlacementError("placement policy '" + c.policy + "' is not one of static, lru, lfu, heat, lookahead");
    if (!(c.heat_decay > 0.0 && c.heat_decay <= 1.0))
        throw PlacementError("placement heat_decay " + std::to_string(c.heat_decay) + " is outside (0, 1]");
    p.heat_decay = c.heat_decay;
    p.prefetch = c.prefetch;
    if (!(c.prefetch_min_precision >= 0.0 && c.prefetch_min_precision <= 1.0))
        throw PlacementError("placement prefetch_min_precision " + std::to_string(c.prefetch_min_precision) + " is outside [0, 1]");
    p.prefetch_min_precision = c.prefetch_min_precision;
    p.direct_io = c.direct_io;
    if (m.expert_bytes.size() != size_t(m.n_layer)) throw PlacementError("model footprint has no per-layer expert sizes");

    const size_t slot = slot_bytes_for(m.max_expert_bytes());
    bool have_disk = false;
    for (const TierConfig & t : c.tiers) {
        TierPlan tp;
        tp.name = t.name;
        tp.kind = t.kind;
        tp.budget = t.budget;
        if (t.kind == TierKind::Disk) {
            have_disk = true;
        } else {
            if (t.kind == TierKind::Host) {
                if (p.host_tier >= 0) throw PlacementError("a second host tier '" + t.name + "': RAM is one tier");
                p.host_tier = int32_t(p.tiers.size());
            }
            tp.slot_bytes = t.kind == TierKind::Gpu ? device_slot_bytes_for(m.max_expert_bytes()) : slot;
            tp.n_slots = tp.slot_bytes ? int64_t(t.budget / tp.slot_bytes) : 0;
        }
        p.tiers.push_back(tp);
    }

    // Pins: each expert on at most one tier, a tier with slots.
    std::vector<bool> moe_layers;
    for (size_t b : m.expert_bytes) moe_layers.push_back(b > 0);
    for (const PinConfig & pin : c.pins) {
        auto it = std::find_if(p.tiers.begin(), p.tiers.end(), [&](const TierPlan & t) { return t.name == pin.tier; });
        if (it == p.tiers.end()) throw PlacementError("pin names tier '" + pin.tier + "', which is not configured");
        if (it->kind == TierKind::Disk)
            throw PlacementError("pin on disk tier '" + pin.tier + "': the disk holds every expert anyway; pin to a faster tier");
    }
    std::set<int64_t> seen;
    for (TierPlan & t : p.tiers) {
        if (t.kind == TierKind::Disk) continue;
        t.pinned = pinned_expert_keys(c, t.name, moe_layers, m.n_expert);
        for (int64_t key : t.pinned)
            if (!seen.insert(key).second)
                throw PlacementError("expert (layer " + std::to_string(key / m.n_expert) + ", expert " +
                                     std::to_string(key % m.n_expert) + ") is pinned to two tiers");
        if (int64_t(t.pinned.size()) > t.n_slots)
            throw PlacementError(std::to_string(t.pinned.size()) + " experts pinned to tier '" + t.name + "' need " +
                                 gib(double(t.pinned.size()) * double(t.slot_bytes)) + ", its budget holds " +
                                 std::to_string(t.n_slots) + " (" + gib(double(t.budget)) + ")");
    }

    // Without a host tier, everything stays in the mapping as before (no budget was asked for).
    if (p.host_tier < 0) {
        if (have_disk) throw PlacementError("a disk tier needs a host tier: its budget is the RAM that caches experts read from disk");
        return p;
    }
    const TierPlan & h = p.tiers[size_t(p.host_tier)];
    const int64_t n_routed = m.n_routed();
    int64_t faster = 0;   // slots of tiers above host
    for (size_t i = 0; i < size_t(p.host_tier); ++i) faster += p.tiers[i].n_slots;
    if (h.n_slots + faster >= n_routed) return p;   // every expert has a place: nothing streams
    if (!have_disk)
        throw PlacementError("the routed experts need " + gib(double(m.routed_expert_bytes())) + " but host tier '" + h.name +
                             "' holds " + std::to_string(h.n_slots) + " of " + std::to_string(n_routed) + " (" +
                             gib(double(h.budget)) + "); add a [[tier]] with kind = \"disk\" to read the rest from the model "
                             "file on demand, or raise the budget");
    const int64_t free_slots = h.n_slots - int64_t(h.pinned.size());
    if (free_slots < 2)
        throw PlacementError("host tier '" + h.name + "' has " + std::to_string(free_slots) + " unpinned slot" +
                             (free_slots == 1 ? "" : "s") + " of " + gib(double(slot)) +
                             "; reading experts from disk needs at least 2 (one computing, one loading): raise its budget to " +
                             gib(double(slot) * double(h.pinned.size() + 2)) + " or more, or pin fewer experts");
    p.all_resident = false;
    return p;
}

std::string describe_plan(const ModelFootprint & m, const PlacementPlan & p) {
    std::string out;
    char line[512];
    const size_t fixed = m.attention_bytes + m.embedding_bytes + m.output_bytes + m.other_bytes;
    std::snprintf(line, sizeof line, "model %s: %d layers, %" PRId64 " routed experts (%d per layer, top-%d), %s of routed experts\n",
                  m.name.c_str(), m.n_layer, m.n_routed(), m.n_expert, m.n_expert_used, gib(double(m.routed_expert_bytes())).c_str());
    out += line;
    std::snprintf(line, sizeof line, "host RAM outside the expert budget: %s\n", gib(double(fixed + m.kv_bytes + m.activation_bytes)).c_str());
    out += line;
    auto row = [&](const char * what, size_t bytes) {
        std::snprintf(line, sizeof line, "  %-34s %12s\n", what, gib(double(bytes)).c_str());
        out += line;
    };
    row("attention (q, k, v, o)", m.attention_bytes);
    row("token embedding", m.embedding_bytes);
    row(m.output_bytes ? "output projection" : "output projection (tied: the embedding)", m.output_bytes);
    row("routers, dense/shared FFN, norms", m.other_bytes);
    row(("KV cache (" + m.kv_type + ")").c_str(), m.kv_bytes);
    row("activations", m.activation_bytes);

    if (p.tiers.empty()) {
        out += "experts: all " + std::to_string(m.n_routed()) + " read from the model file's mapping (no [[tier]] configured: "
               "no budget binds; the page cache holds what the OS keeps)\n";
        return out;
    }
    out += "expert tiers, fastest first:\n";
    for (const TierPlan & t : p.tiers) {
        if (t.kind == TierKind::Disk) {
            std::snprintf(line, sizeof line, "  %-8s disk   home of every expert; misses are read on demand%s\n", t.name.c_str(),
                          p.direct_io ? " with O_DIRECT where the file system allows it" : " (buffered, page cache dropped after each read)");
            out += line;
            continue;
        }
        std::snprintf(line, sizeof line, "  %-8s %-6s budget %s = %" PRId64 " slots of %s; pinned %zu%s\n", t.name.c_str(),
                      tier_kind_name(t.kind), gib(double(t.budget)).c_str(), t.n_slots, gib(double(t.slot_bytes)).c_str(),
                      t.pinned.size(), t.kind == TierKind::Gpu ? " (experts it lacks: promoted or computed on the host, by the cost model)" : "");
        out += line;
        // Pinned experts per layer, as ranges: "layer 0: 0-7".
        std::string pins;
        for (size_t i = 0; i < t.pinned.size();) {
            const int64_t layer = t.pinned[i] / std::max(1, m.n_expert);
            std::string ranges;
            while (i < t.pinned.size() && t.pinned[i] / std::max(1, m.n_expert) == layer) {
                size_t j = i;
                while (j + 1 < t.pinned.size() && t.pinned[j + 1] == t.pinned[j] + 1 && t.pinned[j + 1] / std::max(1, m.n_expert) == layer) ++j;
                const int64_t a = t.pinned[i] % std::max(1, m.n_expert), b = t.pinned[j] % std::max(1, m.n_expert);
                if (!ranges.empty()) ranges += ',';   // appended piece by piece: GCC 12 warns falsely (-Wrestrict) on "," + to_string
                ranges += std::to_string(a);
                if (a != b) {
                    ranges += '-';
                    ranges += std::to_string(b);
                }
                i = j + 1;
            }
            pins += (pins.empty() ? "" : "; ") + std::string("layer ") + std::to_string(layer) + ": " + ranges;
        }
        if (!pins.empty()) out += "           pinned " + pins + "\n";
    }
    const bool gpu = std::any_of(p.tiers.begin(), p.tiers.end(), [](const TierPlan & t) { return t.kind == TierKind::Gpu; });
    if (gpu)
        out += std::string("gpu tier: uploads go on the backend's copy queue when it has one (beside the compute)") +
               (p.prefetch && p.host_tier < 0 ? ", and the next layer's predicted experts are prefetched into it" : "") + "\n";
    if (p.host_tier < 0) {
        out += "host copies of the experts: the model file's mapping (no host tier: no budget binds; the page cache holds "
               "what the OS keeps)\n";
        return out;
    }
    const TierPlan & h = *p.host();
    if (p.all_resident) {
        out += "every routed expert fits: all are resident (read from the mapping), the policy never evicts\n";
    } else {
        std::snprintf(line, sizeof line,
                      "streaming: %" PRId64 " of %" PRId64 " experts fit in '%s' (%.0f%%), %" PRId64 " pinned; the rest are read "
                      "from disk on a miss and cached by policy '%s'%s\n",
                      std::min<int64_t>(h.n_slots, m.n_routed()), m.n_routed(), h.name.c_str(),
                      100.0 * double(std::min<int64_t>(h.n_slots, m.n_routed())) / double(std::max<int64_t>(1, m.n_routed())),
                      int64_t(h.pinned.size()), policy_name(p.policy),
                      p.prefetch ? ", the next layer's experts prefetched from the router's prediction" : "");
        out += line;
    }
    return out;
}

} // namespace moesh
