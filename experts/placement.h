// Where experts live: the placement settings ([[tier]], [placement] in the
// TOML, parsed by runtime/run_config) and the plan made from them before any
// weight is read — which tier holds which expert, how many cache slots each
// tier has, and what does not fit and why.
//
//   ModelFootprint f = footprint_of(model, kv_bytes, scratch_bytes);   // runtime/placement_footprint.h
//   PlacementPlan p = plan_placement(f, config.placement);              // throws PlacementError
//   std::printf("%s", describe_plan(f, p).c_str());
//
// Tiers hold copies; the model file is every expert's home. A `host` tier's
// budget is the RAM for expert copies (pins + the policy-managed cache); a
// `disk` tier says experts may be read from the model file on demand (pread,
// O_DIRECT where the file system allows it) into that cache instead of all
// being resident. Attention, embeddings, norms, the KV cache and activations
// stay in host RAM outside the expert budget; the plan prints them.
// Thread safety: plain data and pure functions.
#pragma once

#include "experts/cache_policy.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace moesh {

// An inclusive range of layer or expert indices; "*" is every index.
struct IndexRange {
    int64_t first = 0;
    int64_t last = -1;   // -1 with first 0: every index
    bool all() const { return first == 0 && last == -1; }
    bool contains(int64_t i) const { return all() || (i >= first && i <= last); }
};

enum class TierKind { Gpu, Host, Disk };
const char * tier_kind_name(TierKind k);

struct TierConfig {
    std::string name;
    TierKind kind = TierKind::Host;
    uint64_t budget = 0;   // bytes; a disk tier has none (the file holds every expert)
    int32_t device = 0;    // gpu
};

struct PinConfig {
    std::string tier;
    IndexRange layers, experts;
};

struct PlacementConfig {
    std::vector<TierConfig> tiers;   // fastest first, as written
    std::string policy = "lookahead";
    double heat_decay = 0.95;
    bool prefetch = true;
    double prefetch_min_precision = 0.75;   // load predictions only while they are this often right
    int32_t prefetch_extra = 0;      // predict the router's top k + this many per token
    bool direct_io = true;           // O_DIRECT reads from the disk tier where the file system allows it
    std::vector<PinConfig> pins;
};

// What the plan needs to know about a model and a run, in bytes.
struct ModelFootprint {
    std::string name;
    int32_t n_layer = 0;
    int32_t n_expert = 0;                 // routed experts per MoE layer
    int32_t n_expert_used = 0;
    std::vector<size_t> expert_bytes;     // [n_layer]: one routed expert of that layer; 0 in a dense layer
    size_t attention_bytes = 0;           // q/k/v/o
    size_t embedding_bytes = 0;           // token embedding
    size_t output_bytes = 0;              // output projection
    size_t other_bytes = 0;               // routers, dense and shared FFNs, norms
    size_t kv_bytes = 0;                  // KV cache for the run's context
    std::string kv_type = "f32";          // ... its elements: "f32", "f16" or "q8_0"
    size_t activation_bytes = 0;          // forward-pass buffers

    size_t routed_expert_bytes() const;   // all of them
    int64_t n_routed() const;             // experts in MoE layers
    size_t max_expert_bytes() const;
};

struct TierPlan {
    std::string name;
    TierKind kind = TierKind::Host;
    uint64_t budget = 0;
    size_t slot_bytes = 0;              // one expert copy (largest expert, aligned for direct reads)
    int64_t n_slots = 0;                // copies the budget holds
    std::vector<int64_t> pinned;        // expert keys (layer * n_expert + index) pinned here
};

struct PlacementPlan {
    std::vector<TierPlan> tiers;        // the config's, fastest first
    // true: every routed expert is read from the mapping as it is (no budget binds);
    // false: the host tier's slots cache experts read from the disk tier.
    bool all_resident = true;
    int32_t host_tier = -1;             // index in tiers, -1 when none
    Policy policy = Policy::Lookahead;
    double heat_decay = 0.95;
    bool prefetch = true;
    double prefetch_min_precision = 0.75;
    bool direct_io = true;

    const TierPlan * host() const { return host_tier < 0 ? nullptr : &tiers[size_t(host_tier)]; }
};

class PlacementError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// The expert keys (layer * n_expert + expert, sorted, no repeats) that the pins
// on `tier` name in a model with these MoE layers. Dense layers inside a pin's
// range have no experts and are passed over; a range past the model's layers or
// experts is a config written for another model: PlacementError names the pin.
std::vector<int64_t> pinned_expert_keys(const PlacementConfig & placement, const std::string & tier,
                                        const std::vector<bool> & moe_layers, int64_t n_expert);

// Bytes a slot takes for an expert of `bytes`: its three matrices may each
// start and end mid-page in the file, and direct reads need whole pages.
size_t slot_bytes_for(size_t expert_bytes);
constexpr size_t k_direct_io_align = 4096;
// A gpu tier's slot: the three matrices each aligned to 256 bytes (no page rounding: no direct reads).
size_t device_slot_bytes_for(size_t expert_bytes);

// Throws PlacementError when the settings cannot work for this model: an
// unknown policy, pins outside the model, more pins than a tier holds, experts
// that exceed the host budget with no disk tier to read them from, a budget
// below the two slots streaming needs. A gpu tier is planned like the others;
// the run time refuses it until the GPU expert cache exists (ExpertStore).
PlacementPlan plan_placement(const ModelFootprint & model, const PlacementConfig & config);

// The plan as a table for people: every tier's bytes, slots and pins, where
// the attention weights and KV cache live, and the totals.
std::string describe_plan(const ModelFootprint & model, const PlacementPlan & plan);

} // namespace moesh
