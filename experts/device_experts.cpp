#include "experts/device_experts.h"

#include "experts/placement.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace moesh {
namespace {

constexpr size_t k_align = 256;   // device kernels read whole cache lines and vectors
constexpr size_t k_untimed = 64;   // copy_elapsed keeps at least the last 64 tickets

size_t round_up(size_t n) { return (n + k_align - 1) / k_align * k_align; }

std::string mib(double b) { return std::to_string(int64_t(b / (1024.0 * 1024.0) + 0.5)) + " MiB"; }

} // namespace

size_t DeviceExperts::slot_bytes_for(size_t expert_bytes) { return device_slot_bytes_for(expert_bytes); }

DeviceExperts::DeviceExperts(const ExpertTable & experts, const Backend & device, const DeviceExpertOptions & o)
    : table_(experts), dev_(device), n_layer_(int32_t(experts.n_layer())), n_expert_(int32_t(experts.n_expert())),
      budget_(o.budget), policy_(int32_t(experts.n_layer()), int32_t(experts.n_expert()), o.n_expert_used, o.policy),
      prediction_(int32_t(experts.n_layer()), int32_t(experts.n_expert()), o.prefetch_min_precision) {
    size_t largest = 0;
    for (int32_t l = 0; l < n_layer_; ++l) largest = std::max(largest, table_.bytes_per_expert(l));
    slot_bytes_ = slot_bytes_for(largest);
    const int64_t n_slots = largest ? int64_t(budget_ / slot_bytes_) : 0;
    const int64_t n_pins = int64_t(o.policy.pinned.size());
    if (n_slots - n_pins < 1)
        throw std::runtime_error("gpu tier: a budget of " + mib(double(budget_)) + " holds " + std::to_string(n_slots) +
                                 " expert slots of " + mib(double(slot_bytes_)) + " with " + std::to_string(n_pins) +
                                 " pinned; at least 1 unpinned slot is needed to promote experts");
    memory_ = BackendBuffer(dev_, size_t(n_slots) * slot_bytes_, "buffer_alloc (gpu tier expert slots)");
    const size_t n_keys = size_t(n_layer_) * size_t(n_expert_);
    where_.assign(n_keys, -1);
    wanted_now_.assign(n_keys, 0);
    slots_.resize(size_t(n_slots));
    untimed_.reserve(k_untimed);
    cand_.reserve(slots_.size());
    cand_slot_.reserve(slots_.size());

    size_t total = 0, done = 0;
    for (int64_t key : o.policy.pinned) {
        if (key < 0 || size_t(key) >= n_keys || !table_.has({int32_t(key / n_expert_), int32_t(key % n_expert_)}))
            throw std::runtime_error("gpu tier: pinned key " + std::to_string(key) + " is not a routed expert");
        total += table_.get({int32_t(key / n_expert_), int32_t(key % n_expert_)}).n_bytes();
    }
    for (int64_t key : o.policy.pinned) {
        if (where_[size_t(key)] >= 0) continue;
        const ExpertWeights & w = promote({int32_t(key / n_expert_), int32_t(key % n_expert_)});   // synchronous: async_ is set below
        slots_[size_t(where_[size_t(key)])].pinned = true;
        ++n_pinned_;
        done += w.n_bytes();
        if (o.progress) o.progress(done, total);
    }
    stats_ = DeviceExpertStats{};   // pins are set-up, not traffic
    async_ = o.async_uploads && dev_.has_async_upload();
}

int64_t DeviceExperts::key_of(ExpertId id) const {
    if (id.layer < 0 || id.layer >= n_layer_ || id.index < 0 || id.index >= n_expert_ || !table_.has(id))
        throw std::runtime_error("gpu tier: (layer " + std::to_string(id.layer) + ", expert " + std::to_string(id.index) +
                                 ") is not a routed expert");
    return int64_t(id.layer) * n_expert_ + id.index;
}

void DeviceExperts::begin_layer(int32_t layer, int64_t step, const int32_t * experts, int64_t n, const int32_t * tokens) {
    layer_ = layer;
    step_ = step;
    if (layer >= 0 && layer < n_layer_) policy_.begin_visit(layer, experts, n);   // a bad id throws below
    for (int64_t i = 0; i < n; ++i) {
        const int64_t key = key_of({layer, experts[i]});
        for (int32_t t = 0, nt = tokens ? std::max(1, tokens[i]) : 1; t < nt; ++t) policy_.use(key, step);
        ++stats_.requests;
        if (const int32_t sl = where_[size_t(key)]; sl >= 0) {
            ++stats_.hits;
            if (slots_[size_t(sl)].prefetched) ++stats_.prefetch_hits;
            slots_[size_t(sl)].prefetched = false;
        }
        wanted_now_[size_t(key)] = 1;
        wanted_.push_back(key);
    }
    // This layer's prediction is used up: what it uploaded and the layer did not want is unused.
    for (Slot & sl : slots_)
        if (sl.prefetched && sl.key / n_expert_ == layer) {
            sl.prefetched = false;
            ++stats_.prefetch_unused;
        }
    const PredictionTracker::Visit v = prediction_.visit(layer, wanted_.data(), int64_t(wanted_.size()));
    stats_.wanted_predicted_layers += v.wanted;
    stats_.predicted_wanted += v.right;
}

void DeviceExperts::predict(int32_t layer, const int32_t * experts, int64_t n) {
    if (layer < 0 || layer >= n_layer_) return;
    for (int64_t i = 0; i < n; ++i) key_of({layer, experts[i]});   // a bad id throws
    bool first = false;
    stats_.predicted += prediction_.note(layer, experts, n, &first);
    if (first) policy_.predict(layer, experts, n);
}

void DeviceExperts::prefetch(int32_t layer, const int32_t * experts, int64_t n) {
    if (layer < 0 || layer >= n_layer_) return;
    predict(layer, experts, n);
    // Without a copy queue an upload would stall the compute it should hide behind; below the
    // bar a wrong guess would take the bus from the next layer's demand.
    if (!async_) return;
    if (!prediction_.loads_allowed()) {
        ++stats_.prefetch_skipped;
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        const ExpertId id{layer, experts[i]};
        const int64_t key = key_of(id);
        if (where_[size_t(key)] >= 0) continue;
        const int32_t v = victim(/*for_prefetch=*/true);
        if (v < 0) break;   // nothing evictable: the rest would not fit either
        upload_into(v, key, table_.get(id), true);
        slots_[size_t(v)].prefetched = true;
        ++stats_.prefetches;
    }
}

void DeviceExperts::done(ExpertId id) { wanted_now_[size_t(key_of(id))] = 0; }

void DeviceExperts::end_layer() {
    for (int64_t key : wanted_) wanted_now_[size_t(key)] = 0;
    wanted_.clear();
}

const ExpertWeights * DeviceExperts::resident(ExpertId id) const {
    const int32_t s = where_[size_t(key_of(id))];
    return s < 0 ? nullptr : &slots_[size_t(s)].w;
}

const ExpertWeights * DeviceExperts::ready(ExpertId id) {
    const int32_t s = where_[size_t(key_of(id))];
    if (s < 0) return nullptr;
    Slot & sl = slots_[size_t(s)];
    if (sl.ticket) {
        try {
            dev_.wait_upload(sl.ticket, /*host=*/false, "copy_wait (gpu tier upload)");
        } catch (...) {
            drop_unfenced();
            throw;
        }
        sl.ticket = 0;
    }
    return &sl.w;
}

bool DeviceExperts::pending(ExpertId id) const {
    const int32_t s = where_[size_t(key_of(id))];
    return s >= 0 && slots_[size_t(s)].ticket != 0;
}

void DeviceExperts::drop_unfenced() {
    for (Slot & sl : slots_) {
        if (!sl.ticket) continue;
        if (sl.key >= 0) where_[size_t(sl.key)] = -1;
        sl.key = -1;
        sl.ticket = 0;
        sl.prefetched = false;
    }
}

int32_t DeviceExperts::victim(bool for_prefetch) const {
    std::vector<int64_t> & cand = cand_;
    std::vector<int32_t> & cand_slot = cand_slot_;
    cand.clear();
    cand_slot.clear();
    for (size_t i = 0; i < slots_.size(); ++i) {
        const Slot & s = slots_[i];
        if (s.key < 0) return int32_t(i);   // a free slot
        if (s.pinned || wanted_now_[size_t(s.key)]) continue;
        if (for_prefetch && prediction_.predicted(s.key)) continue;   // a demand may take a prediction; a prefetch may not
        cand.push_back(s.key);
        cand_slot.push_back(int32_t(i));
    }
    if (cand.empty()) return -1;
    return cand_slot[policy_.victim(cand.data(), cand.size(), step_, layer_)];
}

int64_t DeviceExperts::n_promotable() const {
    int64_t n = 0;
    for (const Slot & s : slots_) n += s.key < 0 || (!s.pinned && !wanted_now_[size_t(s.key)]) ? 1 : 0;
    return n;
}

bool DeviceExperts::admits(ExpertId id) const {
    const int64_t key = key_of(id);
    const int32_t v = victim();
    if (v < 0) return false;
    const Slot & s = slots_[size_t(v)];
    return s.key < 0 || policy_.admit(key, s.key, step_, layer_);
}

const ExpertWeights & DeviceExperts::promote(ExpertId id, const ExpertWeights * from) {
    const int64_t key = key_of(id);
    if (where_[size_t(key)] >= 0) return slots_[size_t(where_[size_t(key)])].w;
    const int32_t v = victim();
    if (v < 0)
        throw std::runtime_error("gpu tier: no slot to promote (layer " + std::to_string(id.layer) + ", expert " +
                                 std::to_string(id.index) + ") into: every slot is pinned or wanted by this layer");
    const ExpertWeights & w = upload_into(v, key, from ? *from : table_.get(id), async_ && !from);
    ++stats_.promotions;
    return w;
}

const ExpertWeights & DeviceExperts::upload_into(int32_t v, int64_t key, const ExpertWeights & from, bool async) {
    Slot & s = slots_[size_t(v)];
    if (s.key >= 0) {
        where_[size_t(s.key)] = -1;
        ++stats_.evictions;
        if (s.prefetched) ++stats_.prefetch_unused;
    }
    // A synchronous copy is not ordered after the async queue: let an earlier upload into this slot land first.
    if (s.ticket && !async) dev_.wait_upload(s.ticket, /*host=*/true, "copy_wait (gpu tier slot reuse)");
    s.key = -1;   // until the upload is queued or done
    s.prefetched = false;
    s.ticket = 0;
    const auto t0 = std::chrono::steady_clock::now();
    ExpertWeights w = from;
    auto * base = static_cast<uint8_t *>(memory_.get()) + size_t(v) * slot_bytes_;
    size_t off = 0;
    for (WeightMatrix * m : {&w.gate, &w.up, &w.down}) {
        // The copy queue runs in order: the last matrix's ticket covers the expert.
        if (async) {
            try {
                s.ticket = dev_.upload_async(base + off, m->data, m->n_bytes(), "copy_to_device_async (gpu tier upload)");
            } catch (...) {
                drop_unfenced();   // the error may be an earlier upload's
                throw;
            }
            // The backend keeps the times of its last k_untimed tickets at least: older ones are let go.
            if (untimed_.size() == k_untimed) untimed_.erase(untimed_.begin());
            untimed_.push_back({s.ticket, m->n_bytes()});
        } else
            dev_.upload(base + off, m->data, m->n_bytes(), "copy_to_device (gpu tier upload)");
        m->data = base + off;
        off += round_up(m->n_bytes());
    }
    s.key = key;
    s.w = w;
    s.pinned = false;
    where_[size_t(key)] = v;
    stats_.bytes_uploaded += w.n_bytes();
    if (async)
        ++stats_.async_uploads;
    else
        stats_.upload_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return s.w;
}

std::pair<uint64_t, double> DeviceExperts::take_upload_times() {
    uint64_t bytes = 0;
    double seconds = 0;
    for (const Untimed & u : untimed_) {
        const double t = dev_.upload_seconds(u.ticket, "copy_elapsed (gpu tier upload)");
        if (t < 0) continue;
        bytes += u.bytes;
        seconds += t;
    }
    untimed_.clear();
    stats_.async_upload_seconds += seconds;
    stats_.async_bytes_timed += bytes;
    return {bytes, seconds};
}

void DeviceExperts::note_in_place(double seconds) {
    ++stats_.in_place;
    stats_.host_seconds += seconds;
}

std::string DeviceExperts::check() const {
    if (uint64_t(slots_.size()) * slot_bytes_ > budget_) return "slots exceed the budget";
    int64_t resident = 0, pinned = 0;
    for (size_t i = 0; i < slots_.size(); ++i) {
        const Slot & s = slots_[i];
        if (s.key < 0) continue;
        ++resident;
        pinned += s.pinned ? 1 : 0;
        if (where_[size_t(s.key)] != int32_t(i)) return "slot " + std::to_string(i) + " is not indexed by its key";
    }
    int64_t indexed = 0;
    for (int32_t s : where_) indexed += s >= 0 ? 1 : 0;
    if (indexed != resident) return "index and slots disagree";
    if (pinned != n_pinned_) return "a pinned expert is not resident";
    return "";
}

} // namespace moesh
