// libFuzzer target for parse_route_trace (routing traces: `moesh run --trace`, `moesh sim`).
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/route_trace.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace moesh::fuzz {

bool route_trace_one_input(const uint8_t * data, size_t size) {
    RouteTrace t;
    try {
        t = parse_route_trace(std::string(reinterpret_cast<const char *>(data), size), "fuzz.jsonl");
    } catch (const Error &) {
        return false;
    }
    const size_t per_token = size_t(t.n_layer) * size_t(t.n_expert_used);
    if (t.moe_layers.size() != size_t(t.n_layer) || t.experts.size() != t.tokens.size() * per_token ||
        t.weights.size() != t.experts.size()) {
        std::fprintf(stderr, "route trace invariant violated: array sizes\n");
        std::abort();
    }
    for (int32_t e : t.experts)
        if (e < -1 || e >= t.n_expert) std::abort();
    if (t.predicted.size() != t.tokens.size() * size_t(t.n_layer) * size_t(t.n_predicted)) {
        std::fprintf(stderr, "route trace invariant violated: predicted size\n");
        std::abort();
    }
    for (size_t i = 0; i < t.tokens.size(); ++i)
        for (int64_t l = 0; l < t.n_layer; ++l)
            if (const int32_t * p = t.predicted_of(i, l))
                for (int64_t k = 0; k < t.n_predicted; ++k)
                    if (p[k] < 0 || p[k] >= t.n_expert || !t.moe_layers[size_t(l)]) std::abort();
    for (size_t i = 1; i < t.tokens.size(); ++i)
        if (t.tokens[i].step < t.tokens[i - 1].step) std::abort();
    // The simulator's replay: ids in range, and by step never more requests than token by token.
    const TraceReplay by_token = trace_requests(t, false, t.n_predicted);
    const TraceReplay by_step = trace_requests(t, true, t.n_predicted);
    for (const TraceReplay * r : {&by_token, &by_step}) {
        for (const ExpertRequest & q : r->requests)
            if (q.expert < 0 || q.expert >= t.n_expert || q.layer < 0 || q.layer >= t.n_layer || !t.moe_layers[size_t(q.layer)])
                std::abort();
        for (const LayerPrediction & p : r->predictions)
            for (int32_t e : p.experts)
                if (e < 0 || e >= t.n_expert) std::abort();
    }
    if (by_step.requests.size() > by_token.requests.size() || by_step.n_steps > by_token.n_steps) {
        std::fprintf(stderr, "route trace invariant violated: replay by step\n");
        std::abort();
    }
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::route_trace_one_input(data, size);
    return 0;
}
#endif
