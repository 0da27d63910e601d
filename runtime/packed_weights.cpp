#include "runtime/packed_weights.h"

#include <chrono>
#include <cstdio>
#include <initializer_list>
#include <unordered_set>

namespace moesh {
namespace {

std::string gib(double bytes) {
    char b[32];
    std::snprintf(b, sizeof b, "%.2f GiB", bytes / double(1u << 30));
    return b;
}

struct Candidate {
    const WeightMatrix * w;
    size_t bytes;
};

} // namespace

PackedWeights::PackedWeights(const Model & model, Backend & backend, const PackOptions & o) : backend_(&backend) {
    const moesh_backend_iface & be = backend.iface();
    if (!o.enabled) {
        summary_ = "weights not packed (turned off)";
        return;
    }
    if (!be.packed_size || !be.pack_weights) {
        summary_ = "weights not packed: backend '" + backend.name() + "' has no packed layout";
        return;
    }
    // Every block matrix the backend takes packed, once (experts may share storage).
    std::vector<Candidate> todo;
    std::unordered_set<const void *> seen;
    auto packable = [&](const WeightMatrix & w, int32_t op, size_t * n) {
        return !w.empty() && backend.supports(op, int32_t(w.type) | MOESH_DTYPE_PACKED) &&
               be.packed_size(backend.ctx(), w.type, w.n_rows, w.n_cols, n) == MOESH_OK;
    };
    auto consider = [&](std::initializer_list<const WeightMatrix *> set, int32_t op) {
        // All of a set or none: expert_ffn takes gate, up and down with one w_type.
        std::vector<Candidate> add;
        for (const WeightMatrix * w : set) {
            size_t n = 0;
            if (w->type != (*set.begin())->type || !packable(*w, op, &n)) return;
            add.push_back({w, n});
        }
        for (const Candidate & k : add)
            if (seen.insert(k.w->data).second) todo.push_back(k);
    };
    auto consider_ffn = [&](const ExpertWeights & e) { consider({&e.gate, &e.up, &e.down}, MOESH_OP_EXPERT_FFN); };
    const ModelConfig & c = model.config();
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = model.layers()[size_t(il)];
        for (const WeightMatrix * w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.router, &L.shared_gate}) consider({w}, MOESH_OP_MATMUL);
        consider_ffn(L.dense);
        consider_ffn(L.shared);
        for (int64_t e = 0; L.is_moe && e < c.n_expert; ++e) consider_ffn(model.experts().get({int32_t(il), int32_t(e)}));
    }
    consider({&model.output()}, MOESH_OP_MATMUL);
    if (todo.empty()) {
        summary_ = "weights not packed: backend '" + backend.name() + "' packs none of this model's weight types";
        return;
    }
    size_t total = 0;
    for (const Candidate & k : todo) total += k.bytes;
    uint64_t free_bytes = 0, total_bytes = 0;
    if (be.memory_info(backend.ctx(), &free_bytes, &total_bytes) == MOESH_OK) {
        const double budget = double(free_bytes) * (1.0 - o.keep_free_fraction);
        if (double(total) > budget) {
            summary_ = "weights not packed: the packed copy (" + gib(double(total)) + ") would not leave " +
                       std::to_string(int(o.keep_free_fraction * 100)) + "% of the " + gib(double(free_bytes)) +
                       " free; kernels read the file's layout (slower)";
            return;
        }
    }
    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0, last_report = 0;
    buffers_.reserve(todo.size());
    try {
        for (const Candidate & k : todo) {
            void * buf = nullptr;
            backend.check(be.buffer_alloc(backend.ctx(), k.bytes, &buf), "buffer_alloc (packed weights)");
            buffers_.push_back(buf);
            backend.check(be.pack_weights(backend.ctx(), k.w->type, k.w->data, k.w->n_rows, k.w->n_cols, buf, k.bytes),
                          "pack_weights");
            packed_[k.w->data] = buf;
            done += k.bytes;
            if (o.progress && (done - last_report >= total / 20 || done == total)) {
                o.progress(done, total);
                last_report = done;
            }
        }
    } catch (...) {
        release();   // the destructor does not run when a constructor throws
        throw;
    }
    bytes_ = total;
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[160];
    std::snprintf(line, sizeof line, "packed %zu weight matrices (%s) for backend '%s' in %.2f s", todo.size(),
                  gib(double(total)).c_str(), backend.name().c_str(), seconds_);
    summary_ = line;
}

PackedWeights::~PackedWeights() { release(); }

void PackedWeights::release() noexcept {
    for (void * b : buffers_) backend_->iface().buffer_free(backend_->ctx(), b);
    buffers_.clear();
    packed_.clear();
}

const void * PackedWeights::find(const WeightMatrix & w) const {
    if (packed_.empty()) return nullptr;
    auto it = packed_.find(w.data);
    return it == packed_.end() ? nullptr : it->second;
}

} // namespace moesh
