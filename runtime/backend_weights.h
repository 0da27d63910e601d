// The weights as one backend reads them, decided once at load time:
//   - a host-memory backend (cpu) reads the model file's mapping directly,
//     except matrices it packs into its own layout (plugin.h: packed_size /
//     pack_weights; the CPU plugin interleaves 8 rows of Q4_0 / Q8_0), which
//     get a packed copy when the copy leaves keep_free_fraction of memory free
//     (otherwise nothing is packed);
//   - a device-memory backend (cuda) gets every weight the forward pass uses
//     uploaded into its memory (packed when it packs that type), norms, biases
//     and RoPE frequencies included; the token embedding stays on the host
//     (the forward pass looks rows up there). The total, plus reserve_bytes
//     for the KV cache and activations, is checked against the backend's free
//     memory before anything is allocated, and a model that does not fit is
//     refused with what it needs, class by class.
//
//   BackendWeights w(model, backend, {.reserve_bytes = kv_and_scratch});
//   std::fprintf(stderr, "%s\n", w.summary().c_str());
//   ForwardPass fwd(model, backend, kv, 64, &w);
//
// Thread safety: read-only after construction; the constructor uses the
// backend (one thread at a time, as plugin.h requires).
#pragma once

#include "plugins/loader/plugin_loader.h"
#include "runtime/model.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace moesh {

struct WeightOptions {
    // Let the backend rewrite weights into its own layout where it can.
    bool repack = true;
    // Host-memory backends: memory to leave free after packing, as a fraction of what is free.
    double keep_free_fraction = 0.1;
    // Device-memory backends: bytes that must stay free after the weights (KV cache, activations).
    size_t reserve_bytes = 0;
    // false: routed experts are left alone (an ExpertStore serves them from their file).
    bool routed_experts = true;
    // Called now and then with the bytes packed or uploaded so far and the total.
    std::function<void(size_t done, size_t total)> progress;
};

// What an op takes for one weight matrix.
struct WeightRef {
    const void * data = nullptr;
    int32_t type = 0;   // moesh_dtype, | MOESH_DTYPE_PACKED when packed
};

class BackendWeights {
public:
    // Throws moesh::Error when a device-memory backend cannot hold the model.
    BackendWeights(const Model & model, Backend & backend, const WeightOptions & options);
    BackendWeights(const BackendWeights &) = delete;
    BackendWeights & operator=(const BackendWeights &) = delete;

    const Backend & backend() const { return *backend_; }
    // w as the backend reads it: its packed or uploaded copy, or w itself.
    WeightRef get(const WeightMatrix & w) const;
    // A float vector of the model (norm, bias, RoPE table): its uploaded copy
    // on a device-memory backend, its own data otherwise; nullptr when empty.
    const float * get(const std::vector<float> & v) const;

    int64_t n_packed() const { return n_packed_; }
    size_t bytes() const { return bytes_; }   // packed or uploaded
    double seconds() const { return seconds_; }
    // One line: what was packed or uploaded, or why nothing was packed.
    const std::string & summary() const { return summary_; }

private:
    Backend * backend_;
    bool device_;
    std::unordered_map<const void *, WeightRef> copies_;   // source data -> copy
    std::vector<BackendBuffer> buffers_;
    int64_t n_packed_ = 0;
    size_t bytes_ = 0;
    double seconds_ = 0.0;
    std::string summary_;
};

} // namespace moesh
