// The gpu tier: a fixed set of expert slots in a device backend's memory (VRAM),
// paid for up front from the tier's budget, holding pinned experts and the ones
// the policy (cache_policy.h) keeps. An expert that is not there is either
// promoted (uploaded into a slot, evicting per policy) or computed in place on
// the host by the forward pass; which one, the cost model decides (cost_model.h).
//
//   DeviceExperts dev(model.experts(), backend, {budget, slot_bytes, policy, k});
//   dev.begin_layer(layer, step, wanted, n_wanted, tokens_per_expert);
//   dev.predict(next_layer, predicted, n_predicted);          // before promoting: evict knowing it
//   if (!dev.resident({layer, e}) && promote) dev.promote({layer, e});   // upload queued
//   dev.prefetch(next_layer, predicted, n_predicted);         // the guess, behind the demand
//   ... compute the resident experts first ...
//   const ExpertWeights * w = dev.ready({layer, e});         // device copy (upload fenced), or nullptr
//   dev.end_layer();
//
// Uploads come from the experts' host copies: the model's mapping, or the host
// tier's slots when experts stream from disk. From the mapping, which stays put,
// they go through the backend's async copy queue when it has one
// (copy_to_device_async): promote() and prefetch() return at once and the copy
// runs beside the compute queued after it; ready() orders later ops after it (the
// device waits for the transfer; the cuda plugin's host thread waits only until the
// bytes are staged into its pinned buffers). From a store slot, which is reused once
// released, the upload is synchronous. Experts wanted by the current layer are never
// evicted while it runs; a prefetch never evicts another prediction (a demand promotion
// may). After an upload error, every expert whose upload was not yet fenced is dropped.
// slots() * slot_bytes() <= the budget, always.
// Thread safety: used by the thread that drives the backend.
#pragma once

#include "experts/cache_policy.h"
#include "experts/prediction.h"
#include "experts/expert.h"
#include "plugins/loader/plugin_loader.h"

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace moesh {

struct DeviceExpertOptions {
    uint64_t budget = 0;        // bytes of device memory for expert copies
    int32_t n_expert_used = 1;
    PolicyParams policy;        // pins: uploaded at construction, never evicted
    bool async_uploads = true;  // use the backend's async copy queue when it has one
    // prefetch() uploads only while the prediction's running precision (per layer visit,
    // exponentially weighted, starting at 1) is at least this; 0: always.
    double prefetch_min_precision = 0.75;
    std::function<void(size_t done, size_t total)> progress;   // while the pins upload
};

struct DeviceExpertStats {
    int64_t requests = 0;       // (layer, expert) wanted by a layer
    int64_t hits = 0;           // already on the device
    int64_t promotions = 0;     // uploaded for this step
    int64_t in_place = 0;       // computed on the host instead
    int64_t evictions = 0;
    int64_t async_uploads = 0;  // promotions and prefetches queued beside the compute
    int64_t prefetches = 0;     // uploads started by prefetch()
    int64_t prefetch_hits = 0;  // of those, wanted by their layer
    int64_t prefetch_unused = 0;   // not wanted by their layer
    int64_t prefetch_skipped = 0;  // layer predictions not uploaded: running precision below the bar
    int64_t predicted = 0;      // experts predicted for a layer
    int64_t predicted_wanted = 0;  // ... that the layer then wanted
    int64_t wanted_predicted_layers = 0;   // experts wanted by layers that had a prediction
    uint64_t bytes_uploaded = 0;   // promotions and prefetches
    double upload_seconds = 0;  // synchronous uploads (host clock)
    double async_upload_seconds = 0;   // async uploads, as the device timed them (copy_elapsed)
    uint64_t async_bytes_timed = 0;    // ... their bytes (a backend without copy_elapsed times none)
    double host_seconds = 0;    // host compute of in-place experts, activation copies included
    double hit_rate() const { return requests ? double(hits) / double(requests) : 0.0; }
    double prefetch_precision() const { return predicted ? double(predicted_wanted) / double(predicted) : 0.0; }
    double prefetch_recall() const {
        return wanted_predicted_layers ? double(predicted_wanted) / double(wanted_predicted_layers) : 0.0;
    }
};

class DeviceExperts {
public:
    // Throws std::runtime_error when the budget holds no unpinned slot, memory cannot be had,
    // or a pin is not a routed expert.
    DeviceExperts(const ExpertTable & experts, const Backend & device, const DeviceExpertOptions & options);

    // Bytes of one slot: an expert of `bytes`, its three matrices each aligned to 256 bytes.
    static size_t slot_bytes_for(size_t expert_bytes);

    void begin_layer(int32_t layer, int64_t step, const int32_t * experts, int64_t n, const int32_t * tokens = nullptr);
    const ExpertWeights * resident(ExpertId id) const;
    // Whether the policy would keep id if it were promoted now (a free slot, or it beats the victim).
    bool admits(ExpertId id) const;
    // Uploads id into a slot (evicting per policy) and returns its device weights, from `from`
    // (a host copy of id that may change once this returns, e.g. an ExpertStore slot: uploaded
    // synchronously) or else the table's (queued when async). Compute with ready(), not with the
    // returned weights. Throws std::runtime_error when every slot holds an expert this layer still wants.
    const ExpertWeights & promote(ExpertId id, const ExpertWeights * from = nullptr);
    const ExpertWeights & promote(ExpertId id, const ExpertWeights & from) { return promote(id, &from); }
    bool can_promote() const { return victim() >= 0; }   // a slot that may take an expert now
    // How many promotions in a row would find a slot now (free, or holding an expert that is
    // neither pinned nor wanted by this layer).
    int64_t n_promotable() const;
    // The next visit of layer will likely want experts[0, n) (most likely first): the policy
    // evicts knowing it. Calling it again for the same visit changes nothing.
    void predict(int32_t layer, const int32_t * experts, int64_t n);
    // predict(), and those not resident are uploaded from the table, in order, into
    // slots that this layer and the prediction do not need, while the running precision allows.
    // Call after this layer's promotions, so that their uploads go first.
    void prefetch(int32_t layer, const int32_t * experts, int64_t n);
    // id's device weights with its upload (if any) ordered before the ops queued next; nullptr
    // when id is not resident.
    const ExpertWeights * ready(ExpertId id);
    // id is resident but its upload has not been fenced by ready() yet (still in flight).
    bool pending(ExpertId id) const;
    bool async() const { return async_; }
    void done(ExpertId id);   // id was computed: this layer no longer needs it kept
    void end_layer();
    void note_in_place(double seconds);
    // After the device has synchronized: the async uploads it has timed since the last call
    // (bytes, seconds), for the cost model; uploads it no longer knows are dropped.
    std::pair<uint64_t, double> take_upload_times();

    int64_t slots() const { return int64_t(slots_.size()); }
    size_t slot_bytes() const { return slot_bytes_; }
    uint64_t budget() const { return budget_; }
    int64_t n_pinned() const { return n_pinned_; }
    const DeviceExpertStats & stats() const { return stats_; }
    std::string check() const;   // "" when the invariants hold (see ExpertStore::check)

private:
    struct Slot {
        int64_t key = -1;
        bool pinned = false;
        bool prefetched = false;   // uploaded by prefetch() and not wanted yet
        uint64_t ticket = 0;       // async upload not yet fenced by ready()
        ExpertWeights w;   // device pointers
    };
    int64_t key_of(ExpertId id) const;
    int32_t victim(bool for_prefetch = false) const;   // -1 when none may go
    const ExpertWeights & upload_into(int32_t slot, int64_t key, const ExpertWeights & from, bool async);
    void drop_unfenced();   // after an upload error: slots whose bytes may not have arrived

    const ExpertTable & table_;
    const Backend & dev_;
    int32_t n_layer_, n_expert_;
    uint64_t budget_;
    size_t slot_bytes_ = 0;
    BackendBuffer memory_;
    std::vector<Slot> slots_;
    std::vector<int32_t> where_;      // [key] slot or -1
    std::vector<char> wanted_now_;    // [key] wanted by the current layer
    bool async_ = false;
    mutable std::vector<int64_t> cand_;       // victim()'s scratch, reserved once
    mutable std::vector<int32_t> cand_slot_;
    std::vector<int64_t> wanted_;
    struct Untimed {
        uint64_t ticket, bytes;
    };
    std::vector<Untimed> untimed_;   // async copies not yet timed, oldest first; at most k_untimed (reserved)
    PolicyState policy_;
    PredictionTracker prediction_;
    int32_t layer_ = 0;
    int64_t step_ = 0;
    int64_t n_pinned_ = 0;
    DeviceExpertStats stats_;
};

} // namespace moesh
