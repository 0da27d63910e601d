// Block weights rewritten once, at load time, into a backend's own layout
// (plugin.h: packed_size / pack_weights), so that its kernels read them faster
// (the CPU plugin interleaves 8 rows of Q4_0 / Q8_0 for its SIMD kernels, as
// llama.cpp's "repack" does). Every matrix the backend packs gets one packed
// copy in a backend buffer; the total is decided up front against the
// backend's free memory, and nothing is packed when it does not fit.
//
//   PackedWeights packed(model, backend, {});        // or {.enabled = false}
//   std::fprintf(stderr, "%s\n", packed.summary().c_str());
//   ForwardPass fwd(model, backend, kv, 64, &packed);  // uses the packed copies
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

struct PackOptions {
    bool enabled = true;
    // Memory to leave free after packing, as a fraction of the backend's free memory.
    double keep_free_fraction = 0.1;
    // Called now and then with the bytes packed so far and the total.
    std::function<void(size_t done, size_t total)> progress;
};

class PackedWeights {
public:
    PackedWeights() = default;   // packs nothing
    PackedWeights(const Model & model, Backend & backend, const PackOptions & options);
    PackedWeights(const PackedWeights &) = delete;
    PackedWeights & operator=(const PackedWeights &) = delete;
    ~PackedWeights();

    // The packed copy of w (to be passed with w.type | MOESH_DTYPE_PACKED), or nullptr.
    const void * find(const WeightMatrix & w) const;

    int64_t n_matrices() const { return int64_t(buffers_.size()); }
    size_t bytes() const { return bytes_; }
    double seconds() const { return seconds_; }
    // One line: what was packed, or why nothing was.
    const std::string & summary() const { return summary_; }

private:
    void release() noexcept;

    Backend * backend_ = nullptr;
    std::unordered_map<const void *, void *> packed_;   // source data -> packed buffer
    std::vector<void *> buffers_;
    size_t bytes_ = 0;
    double seconds_ = 0.0;
    std::string summary_ = "weights not packed";
};

} // namespace moesh
