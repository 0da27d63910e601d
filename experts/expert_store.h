// The run-time expert cache: routed experts whose home is the model file,
// copied on demand into a fixed set of host-memory slots that a byte budget
// pays for up front, and evicted by a replacement policy (cache_policy.h).
// The forward pass asks, layer by layer:
//
//   ExpertStore store(model.experts(), files, options);     // slots allocated and touched here
//   store.predict(layer + 1, predicted, n_predicted);         // next layer's guess, for the policy
//   store.begin_layer(layer, step, wanted, n_wanted);         // demand: misses start loading
//   store.prefetch(layer + 1, predicted, n_predicted);        // the guess loaded, lower priority
//   const ExpertWeights & w = store.acquire({layer, e});      // waits for its bytes
//   ... compute with w ...
//   store.release({layer, e});
//   store.end_layer();
//
// Reads run on a background I/O thread with pread, O_DIRECT where the file
// system allows it (otherwise buffered reads followed by POSIX_FADV_DONTNEED),
// so the page cache does not grow past the budget behind our back. Demand
// loads go before prefetches. An expert that is locked (being computed),
// loading, wanted by the current layer or pinned is never evicted; the policy
// picks among the rest. With heat's or lookahead's admission one slot is kept for streaming:
// a missed expert the policy would not keep is read there and used, and the
// cache keeps what it has. Memory: the slots are the only expert memory the
// store ever holds; slots() * slot_bytes() <= the budget, always.
// Thread safety: one thread calls the methods (the forward pass); the I/O
// thread is internal.
#pragma once

#include "experts/cache_policy.h"
#include "experts/prediction.h"
#include "experts/expert.h"

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace moesh {

// A read-only mapping of a file that expert weights may point into: an
// expert inside it is read from the file at (pointer - base).
struct MappedRegion {
    std::string path;
    const uint8_t * base = nullptr;
    size_t size = 0;
};

struct StoreOptions {
    uint64_t budget = 0;        // bytes of host memory for expert copies
    size_t slot_bytes = 0;      // one copy; placement.h's slot_bytes_for(largest expert)
    int32_t n_expert_used = 1;  // the router's k (the heat policy's estimate)
    PolicyParams policy;        // pins (keys) are loaded at construction and never evicted
    bool direct_io = true;
    // Prefetch loads only while the prediction's running precision (per layer visit,
    // exponentially weighted, starting at 1) is at least this; 0: always.
    double prefetch_min_precision = 0.75;
    // Called while the pins load, with bytes done and total.
    std::function<void(size_t done, size_t total)> progress;
};

struct StoreStats {
    int64_t requests = 0;       // (layer, expert) wanted by a layer
    int64_t hits = 0;           // resident, or already on its way, when wanted
    int64_t prefetch_hits = 0;  // of those, brought in by a prefetch
    int64_t misses = 0;         // demand loads
    int64_t prefetches = 0;     // loads started by prefetch
    int64_t prefetch_unused = 0;   // prefetched, then not wanted by its layer (or evicted before)
    int64_t prefetch_dropped = 0;  // of those, dropped before being read
    int64_t prefetch_skipped = 0;  // layer predictions not loaded: running precision below the bar
    int64_t evictions = 0;
    int64_t streamed = 0;       // misses the policy did not admit: read into the streaming slot
    int64_t predicted = 0;      // experts predicted for a layer
    int64_t predicted_wanted = 0;  // ... that the layer then wanted
    int64_t wanted_predicted_layers = 0;   // experts wanted by layers that had a prediction
    uint64_t bytes_read = 0;    // from the files (whole pages)
    double read_seconds = 0;    // I/O thread busy reading
    double stall_seconds = 0;   // forward pass waiting in acquire
    double hit_rate() const { return requests ? double(hits) / double(requests) : 0.0; }
    double prefetch_precision() const { return predicted ? double(predicted_wanted) / double(predicted) : 0.0; }
    double prefetch_recall() const {
        return wanted_predicted_layers ? double(predicted_wanted) / double(wanted_predicted_layers) : 0.0;
    }
};

class ExpertStore {
public:
    // Throws std::runtime_error when the budget holds fewer than 2 unpinned
    // slots, a slot is smaller than an expert, memory cannot be had, a file
    // cannot be opened, or a pin cannot be read.
    ExpertStore(const ExpertTable & experts, std::vector<MappedRegion> files, const StoreOptions & options);
    ~ExpertStore();
    ExpertStore(const ExpertStore &) = delete;
    ExpertStore & operator=(const ExpertStore &) = delete;

    void begin_layer(int32_t layer, int64_t step, const int32_t * experts, int64_t n, const int32_t * tokens_per_expert = nullptr);
    // The next visit of layer will likely want experts[0, n) (most likely first): the policy
    // (lookahead) evicts knowing it. Made before begin_layer of the layer before, so that its
    // demand misses see it. Calling it again for the same visit, or prefetch with the same
    // list, changes nothing.
    void predict(int32_t layer, const int32_t * experts, int64_t n);
    // predict(), and the experts not resident start loading behind the demand loads.
    void prefetch(int32_t layer, const int32_t * experts, int64_t n);
    bool ready(ExpertId id) const;   // acquire would not wait
    // The order to compute a layer's experts in: 0 ready, 1 on its way, 2 no slot yet.
    // Taking them in this order never waits on a slot that a later expert holds.
    int order(ExpertId id) const;
    // The expert's weights in a slot (valid until release). Throws
    // std::runtime_error naming the file and offset when its read failed.
    const ExpertWeights & acquire(ExpertId id);
    void release(ExpertId id);
    void end_layer();

    int64_t slots() const { return int64_t(slots_.size()); }
    size_t slot_bytes() const { return slot_bytes_; }
    uint64_t budget() const { return budget_; }
    int64_t n_pinned() const { return n_pinned_; }
    bool resident(ExpertId id) const;
    StoreStats stats() const;
    // "" when every invariant holds: residents distinct and indexed, pins resident,
    // slots within the budget, no lock left outside a layer; else what is wrong.
    std::string check() const;
    bool direct_io() const { return direct_; }

private:
    enum class State { Free, Queued, Loading, Ready, Failed };
    struct MatrixHome {
        int32_t file = -1;          // index in files_, or -1: copy from memory
        uint64_t offset = 0;
        const void * memory = nullptr;
        size_t bytes = 0;
    };
    struct Slot {
        int64_t key = -1;
        State state = State::Free;
        uint64_t generation = 0;    // bumped on every reassignment; stale jobs are skipped
        int32_t locks = 0;
        bool pinned = false;
        bool prefetched = false;    // brought in by a prefetch and not used yet
        ExpertWeights w;            // pointing into the slot once Ready
        std::string error;
    };
    struct Job {
        int32_t slot;
        uint64_t generation;
    };

    int64_t key_of(ExpertId id) const;
    void note_prediction(int32_t layer, const int32_t * experts, int64_t n);   // under mu_
    // A slot for key (state Queued, job enqueued), or -1 when every slot is busy or protected.
    // force: a demand may take a slot the current layer still wants (last resort against deadlock).
    int32_t place(std::unique_lock<std::mutex> & lk, int64_t key, bool demand, bool force = false);
    void shutdown() noexcept;
    void io_loop();
    void read_into(int32_t slot, int64_t key, ExpertWeights * w, uint64_t * bytes) const;

    const ExpertTable & table_;
    std::vector<MappedRegion> files_;
    std::vector<int> fds_;
    std::vector<bool> fd_direct_;
    int32_t n_layer_, n_expert_;
    std::vector<MatrixHome> homes_;   // [key * 3 + matrix]
    uint64_t budget_;
    size_t slot_bytes_;
    uint8_t * memory_ = nullptr;
    size_t memory_bytes_ = 0;
    bool direct_;
    int32_t stream_ = -1;             // the streaming slot (heat's admission), -1 when none

    mutable std::mutex mu_;
    std::condition_variable cv_;      // slot state changes, new jobs
    std::vector<Slot> slots_;
    std::vector<int32_t> where_;      // [key] slot or -1
    std::deque<Job> demand_jobs_, prefetch_jobs_;
    PolicyState policy_;
    std::vector<char> protected_;     // [key] wanted by the current layer, not yet released
    std::vector<int64_t> wanted_;     // keys protected now
    PredictionTracker prediction_;
    int32_t layer_ = 0;
    int64_t step_ = 0;
    int64_t n_pinned_ = 0;
    StoreStats stats_;
    bool stop_ = false;
    std::thread io_;
};

} // namespace moesh
