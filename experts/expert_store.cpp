#include "experts/expert_store.h"

#include "experts/placement.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace moesh {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string mib(double b) { return std::to_string(int64_t(b / (1024.0 * 1024.0) + 0.5)) + " MiB"; }

} // namespace

ExpertStore::ExpertStore(const ExpertTable & experts, std::vector<MappedRegion> files, const StoreOptions & o)
    : table_(experts), files_(std::move(files)), n_layer_(int32_t(experts.n_layer())), n_expert_(int32_t(experts.n_expert())),
      budget_(o.budget), slot_bytes_(o.slot_bytes), direct_(o.direct_io),
      policy_(int32_t(experts.n_layer()), int32_t(experts.n_expert()), o.n_expert_used, o.policy),
      prediction_(int32_t(experts.n_layer()), int32_t(experts.n_expert()), o.prefetch_min_precision) {
    const size_t n_keys = size_t(n_layer_) * size_t(n_expert_);
    where_.assign(n_keys, -1);
    protected_.assign(n_keys, 0);
    homes_.resize(n_keys * 3);

    // Every expert's home: a file offset when its bytes lie in a mapping, else memory.
    size_t largest = 0;
    for (int32_t l = 0; l < n_layer_; ++l)
        for (int32_t e = 0; e < n_expert_; ++e) {
            if (!table_.has({l, e})) continue;
            const ExpertWeights & w = table_.get({l, e});
            largest = std::max(largest, w.n_bytes());
            const WeightMatrix * m[3] = {&w.gate, &w.up, &w.down};
            for (int i = 0; i < 3; ++i) {
                MatrixHome & h = homes_[(size_t(l) * size_t(n_expert_) + size_t(e)) * 3 + size_t(i)];
                h.bytes = m[i]->n_bytes();
                h.memory = m[i]->data;
                const auto * p = static_cast<const uint8_t *>(m[i]->data);
                for (size_t f = 0; f < files_.size(); ++f)
                    if (p >= files_[f].base && p + h.bytes <= files_[f].base + files_[f].size) {
                        h.file = int32_t(f);
                        h.offset = uint64_t(p - files_[f].base);
                        break;
                    }
            }
        }
    if (slot_bytes_ < slot_bytes_for(largest) || slot_bytes_ % k_direct_io_align != 0)
        throw std::runtime_error("expert store: slot of " + std::to_string(slot_bytes_) + " bytes cannot hold an expert of " +
                                 std::to_string(largest) + " bytes read in whole pages");
    const int64_t n_slots = int64_t(budget_ / slot_bytes_);
    const int64_t n_pins = int64_t(o.policy.pinned.size());
    if (n_slots - n_pins < 2)
        throw std::runtime_error("expert store: a budget of " + mib(double(budget_)) + " holds " + std::to_string(n_slots) +
                                 " expert slots of " + mib(double(slot_bytes_)) + " with " + std::to_string(n_pins) +
                                 " pinned; at least 2 unpinned slots are needed (one computing, one loading)");

    for (const MappedRegion & f : files_) {
        int fd = -1;
        bool direct = false;
        if (direct_) {
            fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
            direct = fd >= 0;
        }
        if (fd < 0) fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC);   // e.g. tmpfs refuses O_DIRECT
        if (fd < 0) {
            const int err = errno;
            for (int d : fds_) ::close(d);
            throw std::runtime_error(f.path + ": cannot open for expert reads (" + std::strerror(err) + ")");
        }
        fds_.push_back(fd);
        fd_direct_.push_back(direct);
    }
    direct_ = !fd_direct_.empty() && std::all_of(fd_direct_.begin(), fd_direct_.end(), [](bool b) { return b; });

    // The budget is spent here, once: slots are touched now so a limit that cannot hold them fails at start.
    memory_bytes_ = size_t(n_slots) * slot_bytes_;
    void * mem = ::mmap(nullptr, memory_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        const int err = errno;
        for (int d : fds_) ::close(d);
        throw std::runtime_error("expert store: cannot allocate " + mib(double(memory_bytes_)) + " for " +
                                 std::to_string(n_slots) + " expert slots (" + std::strerror(err) + "); lower the host tier budget");
    }
    memory_ = static_cast<uint8_t *>(mem);
    slots_.resize(size_t(n_slots));
    io_ = std::thread([this] { io_loop(); });

    // Pins: loaded now, never evicted.
    std::unique_lock<std::mutex> lk(mu_);
    size_t total = 0, done = 0;
    for (int64_t key : o.policy.pinned) {
        if (key < 0 || size_t(key) >= n_keys || !table_.has({int32_t(key / n_expert_), int32_t(key % n_expert_)})) {
            lk.unlock();
            shutdown();
            throw std::runtime_error("expert store: pinned key " + std::to_string(key) + " is not a routed expert");
        }
        total += table_.get({int32_t(key / n_expert_), int32_t(key % n_expert_)}).n_bytes();
    }
    for (int64_t key : o.policy.pinned) {
        if (where_[size_t(key)] >= 0) continue;
        const int32_t s = place(lk, key, true);
        slots_[size_t(s)].pinned = true;
        ++n_pinned_;
    }
    for (int64_t key : o.policy.pinned) {
        const int32_t s = where_[size_t(key)];
        cv_.wait(lk, [&] { return slots_[size_t(s)].state == State::Ready || slots_[size_t(s)].state == State::Failed; });
        if (slots_[size_t(s)].state == State::Failed) {
            const std::string err = slots_[size_t(s)].error;
            lk.unlock();
            shutdown();   // the destructor does not run for a constructor that throws
            throw std::runtime_error(err);
        }
        done += slots_[size_t(s)].w.n_bytes();
        if (o.progress) o.progress(done, total);
    }
    stats_ = StoreStats{};   // the pins are set-up, not traffic
    // Admission needs somewhere to put what it declines: one slot, when two others stay free to cache.
    if (policy_admits_selectively(o.policy.policy) && slots() - n_pinned_ >= 3) stream_ = int32_t(slots() - 1);
}

ExpertStore::~ExpertStore() { shutdown(); }

void ExpertStore::shutdown() noexcept {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    if (io_.joinable()) io_.join();
    for (int d : fds_) ::close(d);
    fds_.clear();
    if (memory_) ::munmap(memory_, memory_bytes_);
    memory_ = nullptr;
}

int64_t ExpertStore::key_of(ExpertId id) const {
    if (id.layer < 0 || id.layer >= n_layer_ || id.index < 0 || id.index >= n_expert_ || !table_.has(id))
        throw std::runtime_error("expert store: (layer " + std::to_string(id.layer) + ", expert " + std::to_string(id.index) +
                                 ") is not a routed expert");
    return int64_t(id.layer) * n_expert_ + id.index;
}

int32_t ExpertStore::place(std::unique_lock<std::mutex> &, int64_t key, bool demand, bool force) {
    int32_t chosen = -1;
    for (size_t i = 0; i < slots_.size() && chosen < 0; ++i)
        if (slots_[i].state == State::Free && int32_t(i) != stream_) chosen = int32_t(i);
    // The streaming slot takes a demand load the policy does not admit: it is read and used
    // without evicting anything the cache chose to keep.
    auto stream_idle = [&] {
        if (stream_ < 0 || !demand) return false;
        const Slot & s = slots_[size_t(stream_)];
        return s.state == State::Free ||
               ((s.state == State::Ready || s.state == State::Failed) && s.locks == 0 && !protected_[size_t(s.key)]);
    };
    if (chosen < 0) {
        // Evictable: ready (or, for demand, a prefetch not started yet), unlocked, unpinned, not wanted now.
        // A demand may take what was predicted; a prefetch may not.
        std::vector<int64_t> cand;
        std::vector<int32_t> cand_slot;
        for (size_t i = 0; i < slots_.size(); ++i) {
            const Slot & s = slots_[i];
            const bool idle = s.state == State::Ready || s.state == State::Failed || (demand && s.state == State::Queued);
            if (!idle || s.locks > 0 || s.pinned || int32_t(i) == stream_ || (protected_[size_t(s.key)] && !force)) continue;
            if (!demand && prediction_.predicted(s.key)) continue;
            cand.push_back(s.key);
            cand_slot.push_back(int32_t(i));
        }
        if (!cand.empty()) {
            const size_t v = policy_.victim(cand.data(), cand.size(), step_, layer_);
            chosen = cand_slot[v];
            if (stream_idle() && !policy_.admit(key, cand[v], step_, layer_)) {
                chosen = stream_;
                ++stats_.streamed;
            }
        } else if (stream_idle()) {
            chosen = stream_;
        } else {
            return -1;
        }
        Slot & s = slots_[size_t(chosen)];
        if (s.state != State::Free) {
            if (s.prefetched) ++stats_.prefetch_unused;
            where_[size_t(s.key)] = -1;
            ++stats_.evictions;
        }
    }
    Slot & s = slots_[size_t(chosen)];
    s.key = key;
    s.state = State::Queued;
    ++s.generation;
    s.locks = 0;
    s.pinned = false;
    s.prefetched = !demand;
    s.error.clear();
    where_[size_t(key)] = chosen;
    (demand ? demand_jobs_ : prefetch_jobs_).push_back({chosen, s.generation});
    cv_.notify_all();
    return chosen;
}

void ExpertStore::begin_layer(int32_t layer, int64_t step, const int32_t * experts, int64_t n, const int32_t * tokens) {
    std::unique_lock<std::mutex> lk(mu_);
    layer_ = layer;
    step_ = step;
    if (layer >= 0 && layer < n_layer_) policy_.begin_visit(layer, experts, n);   // a bad id throws below
    for (int64_t i = 0; i < n; ++i) {
        const int64_t key = key_of({layer, experts[i]});
        for (int32_t t = 0, nt = tokens ? std::max(1, tokens[i]) : 1; t < nt; ++t) policy_.use(key, step);
        ++stats_.requests;
        protected_[size_t(key)] = 1;
        wanted_.push_back(key);
        const int32_t s = where_[size_t(key)];
        if (s >= 0) {
            ++stats_.hits;
            if (slots_[size_t(s)].prefetched) ++stats_.prefetch_hits;
            if (slots_[size_t(s)].state == State::Queued) {   // promote a prefetch not yet started
                auto it = std::find_if(prefetch_jobs_.begin(), prefetch_jobs_.end(), [&](const Job & j) { return j.slot == s; });
                if (it != prefetch_jobs_.end()) {
                    demand_jobs_.push_back(*it);
                    prefetch_jobs_.erase(it);
                }
            }
            continue;
        }
        ++stats_.misses;
        place(lk, key, true);   // may find no slot now; acquire will wait for one
    }
    // This layer's prediction is used up. Prefetches it did not want count as unused now, and
    // those not yet read are dropped: reading them would only take the disk from demand.
    for (size_t i = 0; i < slots_.size(); ++i) {
        Slot & sl = slots_[i];
        if (!sl.prefetched || sl.key / n_expert_ != layer || protected_[size_t(sl.key)]) continue;
        sl.prefetched = false;
        ++stats_.prefetch_unused;
        if (sl.state == State::Queued) {
            where_[size_t(sl.key)] = -1;
            sl.key = -1;
            sl.state = State::Free;
            ++sl.generation;   // its job is skipped
            ++stats_.prefetch_dropped;
        }
    }
    const PredictionTracker::Visit v = prediction_.visit(layer, wanted_.data(), int64_t(wanted_.size()));
    stats_.wanted_predicted_layers += v.wanted;
    stats_.predicted_wanted += v.right;
}

void ExpertStore::note_prediction(int32_t layer, const int32_t * experts, int64_t n) {
    for (int64_t i = 0; i < n; ++i) key_of({layer, experts[i]});   // a bad id throws
    bool first = false;
    stats_.predicted += prediction_.note(layer, experts, n, &first);
    if (first) policy_.predict(layer, experts, n);
}

void ExpertStore::predict(int32_t layer, const int32_t * experts, int64_t n) {
    std::unique_lock<std::mutex> lk(mu_);
    if (layer < 0 || layer >= n_layer_) return;
    note_prediction(layer, experts, n);
}

void ExpertStore::prefetch(int32_t layer, const int32_t * experts, int64_t n) {
    std::unique_lock<std::mutex> lk(mu_);
    if (layer < 0 || layer >= n_layer_) return;
    note_prediction(layer, experts, n);
    // A wrong prefetch costs a read the disk may not have to spare; below the bar, only predict
    // (the precision keeps being measured, and loads resume when it recovers).
    if (!prediction_.loads_allowed()) {
        ++stats_.prefetch_skipped;
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t key = int64_t(layer) * n_expert_ + experts[i];
        if (where_[size_t(key)] >= 0) continue;
        if (place(lk, key, false) < 0) break;   // nothing evictable: the rest would not fit either
        ++stats_.prefetches;
    }
}

bool ExpertStore::ready(ExpertId id) const {
    const int64_t key = key_of(id);
    std::lock_guard<std::mutex> lk(mu_);
    const int32_t s = where_[size_t(key)];
    return s >= 0 && slots_[size_t(s)].state == State::Ready;
}

bool ExpertStore::resident(ExpertId id) const { return ready(id); }

int ExpertStore::order(ExpertId id) const {
    const int64_t key = key_of(id);
    std::lock_guard<std::mutex> lk(mu_);
    const int32_t s = where_[size_t(key)];
    if (s < 0) return 2;
    return slots_[size_t(s)].state == State::Ready ? 0 : 1;
}

const ExpertWeights & ExpertStore::acquire(ExpertId id) {
    const int64_t key = key_of(id);
    std::unique_lock<std::mutex> lk(mu_);
    const auto t0 = Clock::now();
    bool waited = false;
    for (;;) {
        int32_t s = where_[size_t(key)];
        if (s < 0) s = place(lk, key, true);
        // Every slot holds an expert this layer still wants and none is loading or locked: take one
        // of them (it is read again later) rather than wait forever.
        if (s < 0 && std::none_of(slots_.begin(), slots_.end(), [](const Slot & x) { return x.state == State::Loading || x.locks > 0; }))
            s = place(lk, key, true, true);
        if (s >= 0) {
            Slot & slot = slots_[size_t(s)];
            if (slot.state == State::Ready) {
                ++slot.locks;
                slot.prefetched = false;
                if (waited) stats_.stall_seconds += since(t0);
                return slot.w;
            }
            if (slot.state == State::Failed) {
                const std::string err = slot.error;
                slot.state = State::Free;   // a later acquire retries the read
                where_[size_t(key)] = -1;
                slot.key = -1;
                throw std::runtime_error(err);
            }
        }
        waited = true;
        cv_.wait(lk);
    }
}

void ExpertStore::release(ExpertId id) {
    const int64_t key = key_of(id);
    std::lock_guard<std::mutex> lk(mu_);
    const int32_t s = where_[size_t(key)];
    if (s < 0 || slots_[size_t(s)].locks <= 0) throw std::logic_error("expert store: release without acquire");
    --slots_[size_t(s)].locks;
    protected_[size_t(key)] = 0;
    cv_.notify_all();
}

void ExpertStore::end_layer() {
    std::lock_guard<std::mutex> lk(mu_);
    for (int64_t key : wanted_) protected_[size_t(key)] = 0;
    wanted_.clear();
    cv_.notify_all();
}

void ExpertStore::read_into(int32_t slot, int64_t key, ExpertWeights * w, uint64_t * bytes) const {
    *w = table_.get({int32_t(key / n_expert_), int32_t(key % n_expert_)});
    WeightMatrix * m[3] = {&w->gate, &w->up, &w->down};
    uint8_t * dst = memory_ + size_t(slot) * slot_bytes_;
    size_t used = 0;
    *bytes = 0;
    for (int i = 0; i < 3; ++i) {
        const MatrixHome & h = homes_[size_t(key) * 3 + size_t(i)];
        if (h.file < 0) {
            std::memcpy(dst + used, h.memory, h.bytes);
            m[i]->data = dst + used;
            used += (h.bytes + k_direct_io_align - 1) / k_direct_io_align * k_direct_io_align;
            continue;
        }
        const uint64_t begin = h.offset / k_direct_io_align * k_direct_io_align;
        const uint64_t end = (h.offset + h.bytes + k_direct_io_align - 1) / k_direct_io_align * k_direct_io_align;
        const int fd = fds_[size_t(h.file)];
        uint64_t got = 0;
        while (begin + got < h.offset + h.bytes) {
            const ssize_t r = ::pread(fd, dst + used + got, size_t(end - begin - got), off_t(begin + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0)
                throw std::runtime_error(files_[size_t(h.file)].path + ": cannot read expert (layer " + std::to_string(key / n_expert_) +
                                         ", expert " + std::to_string(key % n_expert_) + ") at offset " + std::to_string(begin + got) +
                                         (r == 0 ? " (the file ends early)" : std::string(" (") + std::strerror(errno) + ")"));
            got += uint64_t(r);
        }
        if (!fd_direct_[size_t(h.file)]) ::posix_fadvise(fd, off_t(begin), off_t(end - begin), POSIX_FADV_DONTNEED);
        m[i]->data = dst + used + (h.offset - begin);
        used += size_t(end - begin);
        *bytes += got;
    }
}

void ExpertStore::io_loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
        cv_.wait(lk, [&] { return stop_ || !demand_jobs_.empty() || !prefetch_jobs_.empty(); });
        if (stop_) return;
        std::deque<Job> & q = demand_jobs_.empty() ? prefetch_jobs_ : demand_jobs_;
        const Job job = q.front();
        q.pop_front();
        Slot & s = slots_[size_t(job.slot)];
        if (s.generation != job.generation || s.state != State::Queued) continue;   // reassigned meanwhile
        s.state = State::Loading;
        const int64_t key = s.key;
        lk.unlock();
        const auto t0 = Clock::now();
        ExpertWeights w;
        uint64_t bytes = 0;
        std::string error;
        try {
            read_into(job.slot, key, &w, &bytes);
        } catch (const std::exception & e) {
            error = e.what();
        }
        const double secs = since(t0);
        lk.lock();
        // Loading slots are never reassigned, so s is still ours.
        s.w = w;
        s.error = error;
        s.state = error.empty() ? State::Ready : State::Failed;
        stats_.bytes_read += bytes;
        stats_.read_seconds += secs;
        cv_.notify_all();
    }
}

StoreStats ExpertStore::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    return stats_;
}

std::string ExpertStore::check() const {
    std::lock_guard<std::mutex> lk(mu_);
    if (uint64_t(slots_.size()) * slot_bytes_ > budget_) return "slots exceed the budget";
    int64_t n_resident = 0;
    for (size_t i = 0; i < slots_.size(); ++i) {
        const Slot & s = slots_[i];
        if (s.state == State::Free) continue;
        ++n_resident;
        if (s.key < 0 || where_[size_t(s.key)] != int32_t(i)) return "slot " + std::to_string(i) + " is not indexed by its key";
        if (wanted_.empty() && s.locks != 0) return "slot " + std::to_string(i) + " locked outside a layer";
        if (s.state == State::Ready) {
            const uint8_t * lo = memory_ + i * slot_bytes_;
            for (const WeightMatrix * m : {&s.w.gate, &s.w.up, &s.w.down}) {
                const auto * p = static_cast<const uint8_t *>(m->data);
                if (p < lo || p + m->n_bytes() > lo + slot_bytes_) return "slot " + std::to_string(i) + " points outside itself";
            }
        }
    }
    int64_t indexed = 0, pinned = 0;
    for (int32_t s : where_) indexed += s >= 0 ? 1 : 0;
    for (const Slot & s : slots_) pinned += s.pinned && s.state != State::Free ? 1 : 0;
    if (indexed != n_resident) return "index and slots disagree";
    if (pinned != n_pinned_) return "a pinned expert is not resident";
    return "";
}

} // namespace moesh
