// Routing traces: which experts the router chose, per token and per layer, with
// their weights. The input of the placement work (policies, `moesh sim`).
//
// Format: JSON lines, UTF-8. The first line is the header:
//   {"moesh_route_trace": 1, "model": "NAME", "n_layer": L, "n_expert": E,
//    "n_expert_used": K, "moe_layers": [true, false, ...]}
// then one line per token, in the order the forward pass saw them:
//   {"seq": 0, "pos": 5, "token": 123, "step": 2,    // step: optional, see below
//    "experts": [[3, 7], null, [1, 2], ...],      // per layer: K expert ids, null for a dense layer
//    "weights": [[0.61, 0.39], null, [0.5, 0.5], ...],   // the router weights of those experts
//    "predicted": [[3, 1, 7, 0], null, [2, 5, 1, 6], ...]}  // optional, see below
// Expert ids of a layer are in the router's order (highest weight first).
// Optional (since the header carried "n_predicted"): the header's "n_predicted": P > 0, and
// per token "predicted": per layer the P experts the prefetch prediction ranked first for that
// layer (its router on the residual stream one layer earlier, or on the embeddings for the first
// MoE layer; most likely first), or null for a dense layer or a layer no prediction was made for.
// Optional (written since traces carried it; all token lines or none): "step", the index of the
// forward pass that computed the token (0, 1, ...; never decreasing). Tokens of one step were
// routed together, so each expert a layer wanted was fetched once for all of them.
// Traces without them stay valid; readers that ignore unknown keys read the new ones.
//
//   RouteTraceWriter w("trace.jsonl", model.config(), "moesh-tiny-py");
//   GenerateOptions o; o.trace = &w; generate(model, backend, o);
//   RouteTrace t = read_route_trace("trace.jsonl");   // checks every field
#pragma once

#include "experts/cache_policy.h"
#include "runtime/batch.h"
#include "runtime/model_config.h"

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace moesh {

class RouteTraceWriter {
public:
    // Creates (truncates) path and writes the header; throws moesh::Error. n_predicted: how many
    // ranked predicted experts to record per layer (clamped to n_expert; 0: none).
    RouteTraceWriter(const std::string & path, const ModelConfig & config, const std::string & model_name,
                     int64_t n_predicted = 0);

    // Around each forward pass: begin with its batch, route() from the
    // ForwardPass's route observer, end() writes one line per token.
    void begin(const Batch & batch);
    void route(int64_t layer, int64_t n_tokens, const int32_t * ids, const float * weights);
    // From the ForwardPass's predict observer: ids [n_tokens, n_ranked], n_ranked >= n_predicted().
    void predict(int64_t layer, int64_t n_tokens, int64_t n_ranked, const int32_t * ids);
    void end();   // throws moesh::Error when the write fails
    int64_t n_tokens() const { return n_written_; }
    int64_t n_predicted() const { return n_pred_; }

private:
    std::string path_;
    std::ofstream out_;
    int64_t n_layer_, k_, n_pred_;
    std::vector<bool> moe_;
    Batch batch_;
    std::vector<int32_t> ids_;     // [n_tokens, n_layer, k]
    std::vector<float> weights_;   // [n_tokens, n_layer, k]
    std::vector<int32_t> pred_;    // [n_tokens, n_layer, n_pred]; -1: no prediction
    int64_t n_written_ = 0;
    int64_t n_steps_ = 0;   // forward passes written
};

struct RouteTrace {
    std::string model;
    int64_t n_layer = 0, n_expert = 0, n_expert_used = 0;
    int64_t n_predicted = 0;        // 0: the trace carries no predictions
    std::vector<bool> moe_layers;   // [n_layer]
    bool has_steps = false;         // the token lines carry "step"
    struct Token {
        int32_t seq = 0, pos = 0, token = 0;
        int64_t step = 0;           // its forward pass; without "step", its own index
    };
    std::vector<Token> tokens;
    std::vector<int32_t> experts;   // [n_tokens, n_layer, k]; -1 in dense layers
    std::vector<float> weights;     // [n_tokens, n_layer, k]; 0 in dense layers
    std::vector<int32_t> predicted; // [n_tokens, n_layer, n_predicted]; -1 where none was made

    const int32_t * experts_of(size_t token, int64_t layer) const {
        return experts.data() + (token * size_t(n_layer) + size_t(layer)) * size_t(n_expert_used);
    }
    // The ranked prediction for (token, layer): n_predicted ids, or nullptr when there is none.
    const int32_t * predicted_of(size_t token, int64_t layer) const {
        if (n_predicted == 0) return nullptr;
        const int32_t * p = predicted.data() + (token * size_t(n_layer) + size_t(layer)) * size_t(n_predicted);
        return p[0] < 0 ? nullptr : p;
    }
};

// A trace as the cache simulator (simulate_cache) replays it.
struct TraceReplay {
    std::vector<ExpertRequest> requests;        // per layer visit, the experts it wants
    std::vector<LayerPrediction> predictions;   // per visit that had one (n_predicted > 0)
    int64_t n_steps = 0;                        // visits per MoE layer
};
// by_step false: every token visits each MoE layer alone (step = its index) with its k experts
// and its first n_predicted predicted ones. by_step true (a trace with steps): the tokens of one
// step visit together, each distinct expert once (most wanted first, then by id), and the visit's
// prediction is their first n_predicted predicted experts ranked by votes, as the forward pass
// ranks a batch's prediction.
TraceReplay trace_requests(const RouteTrace & t, bool by_step, int64_t n_predicted);

// Reads and checks a trace (every field, type and range; ids < n_expert, no
// repeats within a token's layer or prediction); throws moesh::Error naming the line and field.
RouteTrace read_route_trace(const std::string & path);
RouteTrace parse_route_trace(const std::string & text, const std::string & name);

} // namespace moesh
