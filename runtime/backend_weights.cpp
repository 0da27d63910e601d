#include "runtime/backend_weights.h"

#include "runtime/error.h"

#include <chrono>
#include <cstdio>
#include <initializer_list>
#include <map>
#include <unordered_set>

namespace moesh {
namespace {

std::string gib(double bytes) {
    char b[32];
    std::snprintf(b, sizeof b, "%.2f GiB", bytes / double(1u << 30));
    return b;
}

// One copy to make: a matrix (packed or as is) or a float vector.
struct Copy {
    const void * src = nullptr;
    size_t src_bytes = 0;
    const WeightMatrix * w = nullptr;   // null for a float vector
    bool pack = false;
    size_t bytes = 0;                   // of the copy
    const char * what = "";             // class, for the breakdown
};

} // namespace

BackendWeights::BackendWeights(const Model & model, Backend & backend, const WeightOptions & o)
    : backend_(&backend), device_(!backend.host_memory()) {
    const moesh_backend_iface & be = backend.iface();
    const bool can_pack = o.repack && be.packed_size && be.pack_weights;
    std::vector<Copy> todo;
    std::unordered_set<const void *> seen;

    auto packed_bytes = [&](const WeightMatrix & w, int32_t op, size_t * n) {
        return can_pack && backend.supports(op, int32_t(w.type) | MOESH_DTYPE_PACKED) &&
               be.packed_size(backend.ctx(), w.type, w.n_rows, w.n_cols, n) == MOESH_OK;
    };
    // A set is packed whole or not at all: expert_ffn takes gate, up and down with one w_type.
    auto matrices = [&](std::initializer_list<const WeightMatrix *> set, int32_t op, const char * what) {
        std::vector<Copy> add;
        bool pack = true;
        for (const WeightMatrix * w : set) {
            if (w->empty()) return;
            size_t n = 0;
            pack = pack && w->type == (*set.begin())->type && packed_bytes(*w, op, &n);
            add.push_back({w->data, w->n_bytes(), w, false, n, what});
        }
        for (Copy & c : add) {
            c.pack = pack;
            if (!pack) c.bytes = c.src_bytes;
            if ((pack || device_) && seen.insert(c.src).second) todo.push_back(c);
        }
    };
    auto vector = [&](const std::vector<float> & v) {
        if (device_ && !v.empty() && seen.insert(v.data()).second)
            todo.push_back({v.data(), v.size() * sizeof(float), nullptr, false, v.size() * sizeof(float), "norms, biases, RoPE"});
    };
    auto ffn = [&](const ExpertWeights & e, const char * what) { matrices({&e.gate, &e.up, &e.down}, MOESH_OP_EXPERT_FFN, what); };

    const ModelConfig & c = model.config();
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = model.layers()[size_t(il)];
        for (const WeightMatrix * w : {&L.wq, &L.wk, &L.wv, &L.wo}) matrices({w}, MOESH_OP_MATMUL, "attention");
        for (const WeightMatrix * w : {&L.router, &L.shared_gate}) matrices({w}, MOESH_OP_MATMUL, "routers");
        ffn(L.dense, "dense and shared FFN");
        ffn(L.shared, "dense and shared FFN");
        for (int64_t e = 0; L.is_moe && o.routed_experts && e < c.n_expert; ++e)
            ffn(model.experts().get({int32_t(il), int32_t(e)}), "routed experts");
        for (const std::vector<float> * v : {&L.attn_norm, &L.ffn_norm, &L.q_norm, &L.k_norm, &L.bq, &L.bk, &L.bv, &L.bo})
            vector(*v);
    }
    matrices({&model.output()}, MOESH_OP_MATMUL, "output");
    vector(model.output_norm());
    vector(model.rope().inv_freq);

    size_t total = 0;
    for (const Copy & k : todo) total += k.bytes;
    uint64_t free_bytes = 0, total_bytes = 0;
    const bool known = be.memory_info(backend.ctx(), &free_bytes, &total_bytes) == MOESH_OK;
    if (device_) {
        if (known && double(total) + double(o.reserve_bytes) > double(free_bytes)) {
            std::map<std::string, size_t> by_class;
            for (const Copy & k : todo) by_class[k.what] += k.bytes;
            std::string parts;
            for (const auto & [what, n] : by_class) parts += (parts.empty() ? "" : ", ") + what + " " + gib(double(n));
            throw Error("the model does not fit in backend '" + backend.name() + "' memory: weights " + gib(double(total)) +
                        " (" + parts + ") + KV cache and activations " + gib(double(o.reserve_bytes)) + " > " +
                        gib(double(free_bytes)) + " free of " + gib(double(total_bytes)) +
                        "; use a shorter context (--ctx), a smaller quantization (moesh quantize), or --backend cpu");
        }
    } else if (todo.empty()) {
        summary_ = !o.repack ? "weights not packed (turned off)"
                   : !can_pack ? "weights not packed: backend '" + backend.name() + "' has no packed layout"
                               : "weights not packed: backend '" + backend.name() + "' packs none of this model's weight types";
        return;
    } else if (known && double(total) > double(free_bytes) * (1.0 - o.keep_free_fraction)) {
        summary_ = "weights not packed: the packed copy (" + gib(double(total)) + ") would not leave " +
                   std::to_string(int(o.keep_free_fraction * 100)) + "% of the " + gib(double(free_bytes)) +
                   " free; kernels read the file's layout (slower)";
        return;
    }

    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0, last_report = 0;
    buffers_.reserve(todo.size());
    for (const Copy & k : todo) {
        BackendBuffer & buf = buffers_.emplace_back(backend, k.bytes, k.pack ? "buffer_alloc (packed weights)" : "buffer_alloc (weights)");
        if (k.pack) {
            backend.check(be.pack_weights(backend.ctx(), k.w->type, k.src, k.w->n_rows, k.w->n_cols, buf.get(), k.bytes),
                          "pack_weights");
            ++n_packed_;
        } else {
            backend.upload(buf.get(), k.src, k.bytes, "copy_to_device (weights)");
        }
        copies_[k.src] = {buf.get(), k.w ? int32_t(k.w->type) | (k.pack ? MOESH_DTYPE_PACKED : 0) : 0};
        done += k.bytes;
        if (o.progress && (done - last_report >= total / 20 || done == total)) {
            o.progress(done, total);
            last_report = done;
        }
    }
    bytes_ = total;
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[200];
    if (device_)
        std::snprintf(line, sizeof line, "uploaded %zu weights (%s, %lld packed) to backend '%s' in %.2f s", todo.size(),
                      gib(double(total)).c_str(), static_cast<long long>(n_packed_), backend.name().c_str(), seconds_);
    else
        std::snprintf(line, sizeof line, "packed %zu weight matrices (%s) for backend '%s' in %.2f s", todo.size(),
                      gib(double(total)).c_str(), backend.name().c_str(), seconds_);
    summary_ = line;
}

WeightRef BackendWeights::get(const WeightMatrix & w) const {
    auto it = copies_.find(w.data);
    if (it != copies_.end()) return it->second;
    if (device_) throw Error("internal: a weight matrix was not uploaded to backend '" + backend_->name() + "'");
    return {w.data, int32_t(w.type)};
}

const float * BackendWeights::get(const std::vector<float> & v) const {
    if (v.empty()) return nullptr;
    if (!device_) return v.data();
    auto it = copies_.find(v.data());
    if (it == copies_.end()) throw Error("internal: a float vector was not uploaded to backend '" + backend_->name() + "'");
    return static_cast<const float *>(it->second.data);
}

} // namespace moesh
