// Routing traces: what generate() saw, written as documented and read back with
// every field checked; malformed traces are refused with the line and the field.
#include "runtime/error.h"
#include "runtime/generate.h"
#include "runtime/route_trace.h"
#include "runtime/synthetic_model.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <set>

namespace moesh {
namespace {

ModelConfig config() {
    nlohmann::json j = {{"architectures", {"Qwen2MoeForCausalLM"}},
                        {"vocab_size", 97},
                        {"hidden_size", 32},
                        {"intermediate_size", 32},
                        {"moe_intermediate_size", 16},
                        {"shared_expert_intermediate_size", 16},
                        {"num_hidden_layers", 3},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"num_experts", 6},
                        {"num_experts_per_tok", 2},
                        {"norm_topk_prob", true},
                        {"max_position_embeddings", 64},
                        {"mlp_only_layers", {1}}};
    return parse_model_config(j.dump(), "synthetic");
}

TEST(RouteTrace, GenerateWritesEveryTokensRoutingAndItReadsBack) {
    const ModelConfig cfg = config();
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 3));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    test::TempDir dir;
    const std::string path = (dir.path() / "trace.jsonl").string();
    GenerateOptions o;
    o.prompt = {4, 8, 15, 16, 23, 42, 7};
    o.n_generate = 6;
    o.max_batch = 3;
    GenerateResult r;
    {
        RouteTraceWriter w(path, cfg, "tiny");
        o.trace = &w;
        r = generate(m, *be, o);
        EXPECT_EQ(w.n_tokens(), 7 + 5);
    }
    const RouteTrace t = read_route_trace(path);
    EXPECT_EQ(t.model, "tiny");
    EXPECT_EQ(t.n_layer, 3);
    EXPECT_EQ(t.n_expert, 6);
    EXPECT_EQ(t.n_expert_used, 2);
    EXPECT_EQ(t.moe_layers, (std::vector<bool>{true, false, true}));
    ASSERT_EQ(t.tokens.size(), 12u);
    ASSERT_TRUE(t.has_steps);
    for (size_t i = 0; i < t.tokens.size(); ++i) {
        EXPECT_EQ(t.tokens[i].pos, int32_t(i));
        EXPECT_EQ(t.tokens[i].token, i < 7 ? o.prompt[i] : r.tokens[i - 7]);
        // the prompt in chunks of max_batch 3 (steps 0-2), then one token per step
        EXPECT_EQ(t.tokens[i].step, i < 7 ? int64_t(i / 3) : int64_t(3 + i - 7)) << "token " << i;
    }
    // The trace's expert counts are the forward pass's heat; normalised weights sum to 1.
    for (int64_t l = 0; l < 3; ++l) {
        std::vector<uint64_t> counts(6, 0);
        for (size_t i = 0; i < t.tokens.size(); ++i) {
            const int32_t * e = t.experts_of(i, l);
            if (!t.moe_layers[size_t(l)]) {
                EXPECT_EQ(e[0], -1);
                continue;
            }
            EXPECT_NE(e[0], e[1]);
            for (int k = 0; k < 2; ++k) ++counts[size_t(e[k])];
            const float * w = t.weights.data() + (i * 3 + size_t(l)) * 2;
            EXPECT_NEAR(w[0] + w[1], 1.0f, 1e-5f);
            EXPECT_GE(w[0], w[1]);   // the router's order
        }
        if (t.moe_layers[size_t(l)]) {
            EXPECT_EQ(counts, r.heat.counts(l)) << "layer " << l;
        }
    }
}

// With n_predicted, every MoE layer of every token carries the prefetch prediction made for it (its
// router one layer early, the embeddings for the first), dense layers none; the routing is unchanged.
TEST(RouteTrace, RecordsThePredictionOfEveryMoeLayer) {
    const ModelConfig cfg = config();
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 3));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    test::TempDir dir;
    GenerateOptions o;
    o.prompt = {4, 8, 15, 16, 23, 42, 7};
    o.n_generate = 4;
    o.max_batch = 3;
    GenerateResult r0, r1;
    {
        RouteTraceWriter w((dir.path() / "plain.jsonl").string(), cfg, "tiny");
        o.trace = &w;
        r0 = generate(m, *be, o);
        EXPECT_EQ(w.n_predicted(), 0);
    }
    {
        RouteTraceWriter w((dir.path() / "pred.jsonl").string(), cfg, "tiny", 3);
        o.trace = &w;
        r1 = generate(m, *be, o);
        EXPECT_EQ(w.n_predicted(), 3);
    }
    EXPECT_EQ(r0.tokens, r1.tokens);
    const RouteTrace t0 = read_route_trace((dir.path() / "plain.jsonl").string());
    const RouteTrace t = read_route_trace((dir.path() / "pred.jsonl").string());
    EXPECT_EQ(t0.n_predicted, 0);
    EXPECT_TRUE(t0.predicted.empty());
    EXPECT_EQ(t0.predicted_of(0, 0), nullptr);
    EXPECT_EQ(t.experts, t0.experts);
    ASSERT_EQ(t.n_predicted, 3);
    ASSERT_EQ(t.tokens.size(), 10u);
    int64_t right = 0;
    for (size_t i = 0; i < t.tokens.size(); ++i)
        for (int64_t l = 0; l < 3; ++l) {
            const int32_t * p = t.predicted_of(i, l);
            if (!t.moe_layers[size_t(l)]) {
                EXPECT_EQ(p, nullptr);
                continue;
            }
            ASSERT_NE(p, nullptr) << "token " << i << " layer " << l;
            std::set<int32_t> distinct(p, p + 3);
            EXPECT_EQ(distinct.size(), 3u);
            const int32_t * e = t.experts_of(i, l);
            for (int k = 0; k < 2; ++k) right += distinct.count(e[k]);
        }
    EXPECT_GT(right, 0);   // 3 of 6 experts ranked: chance alone gets half of them
}

TEST(RouteTrace, MalformedTracesNameTheLineAndTheProblem) {
    const std::string header =
        R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":2,"moe_layers":[true,false]})";
    const std::string good = R"({"seq":0,"pos":0,"token":5,"experts":[[1,2],null],"weights":[[0.6,0.4],null]})";
    EXPECT_EQ(parse_route_trace(header + "\n" + good + "\n", "t").tokens.size(), 1u);
    const std::string pheader =
        R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":2,"n_predicted":3,"moe_layers":[true,false]})";
    const std::string pgood =
        R"({"seq":0,"pos":0,"token":5,"experts":[[1,2],null],"weights":[[0.6,0.4],null],"predicted":[[2,0,1],null]})";
    auto stepped = [&](int64_t step) {
        return good.substr(0, good.size() - 1) + ",\"step\":" + std::to_string(step) + "}";
    };
    EXPECT_EQ(parse_route_trace(header + "\n" + stepped(0) + "\n" + stepped(0) + "\n" + stepped(4) + "\n", "t").tokens.back().step, 4);
    const RouteTrace pt = parse_route_trace(pheader + "\n" + pgood + "\n" + pgood.substr(0, pgood.find("[[2,0,1]")) + "[null,null]}", "t");
    ASSERT_EQ(pt.tokens.size(), 2u);
    EXPECT_EQ(pt.predicted, (std::vector<int32_t>{2, 0, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1}));
    EXPECT_EQ(pt.predicted_of(1, 0), nullptr);
    struct Bad {
        std::string text, want;
    };
    const Bad bad[] = {
        {"", "no header"},
        {"not json\n", "t:1: not a JSON object"},
        {R"({"moesh_route_trace":2})", "outside [1, 1]"},
        {R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":9,"moe_layers":[true,false]})",
         "n_expert_used"},
        {R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":2,"moe_layers":[true]})", "moe_layers"},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,9],null],"weights":[[0.6,0.4],null]})",
         "t:2: layer 0: expert ids must be integers in [0, n_expert)"},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,1],null],"weights":[[0.6,0.4],null]})", "chosen twice"},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,2],[0,1]],"weights":[[0.6,0.4],null]})",
         "a dense layer must be null"},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,2],null],"weights":[[0.6,-1],null]})", "finite and >= 0"},
        {header + "\n" + R"({"seq":-1,"pos":0,"token":5,"experts":[[1,2],null],"weights":[[0.6,0.4],null]})", "\"seq\""},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,2]],"weights":[[0.6,0.4],null]})", "n_layer entries"},
        {header + "\n" + good + "\n" + "[1,2]", "t:3: not a JSON object"},
        {header + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[1,2],null],"weights":[[0.6,0.4],null],"predicted":[[1,2],null]})",
         "\"predicted\" without \"n_predicted\""},
        {pheader + "\n" + good, "t:2: \"predicted\" must be an array of n_layer entries"},
        {pheader + "\n" + pgood.substr(0, pgood.find("\"predicted\"")) + R"("predicted":[[1,2,3],[0,1,2]]})",
         "a dense layer's prediction must be null"},
        {pheader + "\n" + pgood.substr(0, pgood.find("\"predicted\"")) + R"("predicted":[[1,2],null]})", "hold n_predicted"},
        {pheader + "\n" + pgood.substr(0, pgood.find("\"predicted\"")) + R"("predicted":[[1,2,4],null]})",
         "predicted expert ids must be integers in [0, n_expert)"},
        {pheader + "\n" + pgood.substr(0, pgood.find("\"predicted\"")) + R"("predicted":[[1,2,1],null]})", "predicted twice"},
        {R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":2,"n_predicted":5,"moe_layers":[true,false]})",
         "\"n_predicted\" is 5"},
        {header + "\n" + stepped(1) + "\n" + good, "t:3: \"step\" is missing (earlier token lines have it)"},
        {header + "\n" + good + "\n" + stepped(1), "t:3: \"step\" appears, but the first token line has none"},
        {header + "\n" + stepped(2) + "\n" + stepped(1), "t:3: \"step\" is 1, before the previous line's 2"},
        {header + "\n" + stepped(-1), "t:2: \"step\" is -1, outside"},
    };
    for (const Bad & b : bad) {
        try {
            parse_route_trace(b.text, "t");
            ADD_FAILURE() << "accepted: " << b.text;
        } catch (const Error & e) {
            EXPECT_NE(std::string(e.what()).find(b.want), std::string::npos) << e.what() << "\nwanted: " << b.want;
        }
    }
    EXPECT_THROW(read_route_trace("/nonexistent/trace.jsonl"), Error);
}

// The simulator's view of a trace, hand-worked: token by token, or a step's tokens together with
// each expert once (most wanted first) and their predictions ranked by votes.
TEST(RouteTrace, ReplaysTokenByTokenOrStepByStep) {
    const std::string text =
        R"({"moesh_route_trace":1,"model":"m","n_layer":2,"n_expert":4,"n_expert_used":2,"n_predicted":2,"moe_layers":[true,true]})"
        "\n"
        R"({"seq":0,"pos":0,"token":1,"step":0,"experts":[[1,2],[0,3]],"weights":[[0.5,0.5],[0.5,0.5]],"predicted":[[1,0],[3,2]]})"
        "\n"
        R"({"seq":0,"pos":1,"token":1,"step":0,"experts":[[2,3],[3,1]],"weights":[[0.5,0.5],[0.5,0.5]],"predicted":[[2,1],null]})"
        "\n"
        R"({"seq":0,"pos":2,"token":1,"step":1,"experts":[[0,1],[2,3]],"weights":[[0.5,0.5],[0.5,0.5]],"predicted":[[0,3],[2,3]]})"
        "\n";
    const RouteTrace t = parse_route_trace(text, "t");
    auto keys = [](const TraceReplay & r) {
        std::vector<std::vector<int64_t>> out;
        for (const ExpertRequest & q : r.requests) out.push_back({q.step, q.layer, q.expert});
        return out;
    };
    const TraceReplay tokens = trace_requests(t, false, 2);
    EXPECT_EQ(tokens.n_steps, 3);
    EXPECT_EQ(keys(tokens), (std::vector<std::vector<int64_t>>{{0, 0, 1}, {0, 0, 2}, {0, 1, 0}, {0, 1, 3}, {1, 0, 2}, {1, 0, 3},
                                                                {1, 1, 3}, {1, 1, 1}, {2, 0, 0}, {2, 0, 1}, {2, 1, 2}, {2, 1, 3}}));
    ASSERT_EQ(tokens.predictions.size(), 5u);   // token 1's layer 1 has none
    EXPECT_EQ(tokens.predictions[2].step, 1);
    EXPECT_EQ(tokens.predictions[2].experts, (std::vector<int32_t>{2, 1}));
    const TraceReplay steps = trace_requests(t, true, 2);
    EXPECT_EQ(steps.n_steps, 2);
    // step 0, layer 0: 2 twice, then 1 and 3 once (by id); layer 1: 3 twice, then 0, 1
    EXPECT_EQ(keys(steps), (std::vector<std::vector<int64_t>>{{0, 0, 2}, {0, 0, 1}, {0, 0, 3}, {0, 1, 3}, {0, 1, 0}, {0, 1, 1},
                                                               {1, 0, 0}, {1, 0, 1}, {1, 1, 2}, {1, 1, 3}}));
    ASSERT_EQ(steps.predictions.size(), 4u);
    EXPECT_EQ(steps.predictions[0].experts, (std::vector<int32_t>{1, 0, 2}));   // votes: 1 twice, 0 and 2 once
    EXPECT_EQ(steps.predictions[1].experts, (std::vector<int32_t>{2, 3}));      // token 1 predicted nothing there
    EXPECT_EQ(trace_requests(t, true, 0).predictions.size(), 0u);
}

} // namespace
} // namespace moesh
