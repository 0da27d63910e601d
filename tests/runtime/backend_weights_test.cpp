// Weights packed into the backend's layout must not change what the model
// computes: greedy tokens equal, logits equal up to float summation order.
#include "runtime/generate.h"
#include "runtime/backend_weights.h"
#include "runtime/quantize.h"
#include "runtime/synthetic_model.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <cmath>

namespace moesh {
namespace {

// Every matrix dimension a multiple of 32 (block types); 97 output rows, not a
// multiple of the packed 8-row tiles.
ModelConfig config(const char * arch) {
    nlohmann::json j = {{"architectures", {arch}},
                        {"vocab_size", 97},
                        {"hidden_size", 64},
                        {"intermediate_size", 96},
                        {"moe_intermediate_size", 64},
                        {"shared_expert_intermediate_size", 32},
                        {"num_hidden_layers", 2},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"num_local_experts", 4},
                        {"num_experts", 4},
                        {"num_experts_per_tok", 2},
                        {"max_position_embeddings", 64}};
    return parse_model_config(j.dump(), "synthetic");
}

struct Case {
    const char * arch;
    moesh_dtype type;
};

class PackedWeightsCase : public testing::TestWithParam<Case> {};

TEST_P(PackedWeightsCase, GreedyRunEqualsTheFileLayout) {
    const ModelConfig cfg = config(GetParam().arch);
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 5));
    QuantizePlan plan;
    plan.experts = plan.attention = plan.ffn = plan.output = GetParam().type;
    quantize_model(m, plan, 1);
    for (int threads : {1, 2}) {
        for (bool precise : {false, true}) {
            SCOPED_TRACE(testing::Message() << threads << " threads, precise " << precise);
            auto be = test::open_cpu_backend(threads, precise);
            ASSERT_NE(be, nullptr);
            const BackendWeights packed(m, *be, {});
            // attention 4 + (router 1 when MoE) + FFN matrices, per layer, and the output
            EXPECT_GE(packed.n_packed(), 2 * 4 + 1) << packed.summary();
            EXPECT_GT(packed.bytes(), 0u);
            GenerateOptions o;
            o.prompt = {5, 17, 3, 88, 42, 1, 0, 96, 12};
            o.n_generate = 12;
            o.keep_logits = true;
            const GenerateResult file = generate(m, *be, o);
            o.weights = &packed;
            const GenerateResult pk = generate(m, *be, o);
            EXPECT_EQ(file.tokens, pk.tokens);
            ASSERT_EQ(file.logits.size(), pk.logits.size());
            double worst = 0, scale = 0;
            for (size_t i = 0; i < file.logits.size(); ++i) {
                worst = std::max(worst, double(std::fabs(file.logits[i] - pk.logits[i])));
                scale = std::max(scale, double(std::fabs(file.logits[i])));
            }
            EXPECT_LT(worst, 1e-4 * scale + 1e-5) << "largest logit " << scale;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Archs, PackedWeightsCase,
                         testing::Values(Case{"MixtralForCausalLM", MOESH_DTYPE_Q4_0},
                                         Case{"MixtralForCausalLM", MOESH_DTYPE_Q8_0},
                                         Case{"Qwen2MoeForCausalLM", MOESH_DTYPE_Q4_0},
                                         Case{"LlamaForCausalLM", MOESH_DTYPE_Q8_0}));

TEST(BackendWeights, PacksNothingWhenOffOrWithoutRoom) {
    const ModelConfig cfg = config("MixtralForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 5));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    {
        const BackendWeights p(m, *be, {});   // f32 weights: nothing the backend packs
        EXPECT_EQ(p.n_packed(), 0);
        EXPECT_NE(p.summary().find("packs none"), std::string::npos) << p.summary();
    }
    QuantizePlan plan;
    plan.experts = MOESH_DTYPE_Q4_0;
    quantize_model(m, plan, 1);
    WeightOptions off;
    off.repack = false;
    const BackendWeights p_off(m, *be, off);
    EXPECT_EQ(p_off.n_packed(), 0);
    EXPECT_NE(p_off.summary().find("turned off"), std::string::npos) << p_off.summary();
    WeightOptions no_room;
    no_room.keep_free_fraction = 1.0;   // leave all free memory free
    const BackendWeights p_full(m, *be, no_room);
    EXPECT_EQ(p_full.n_packed(), 0);
    EXPECT_NE(p_full.summary().find("would not leave"), std::string::npos) << p_full.summary();
    EXPECT_EQ(p_full.get(m.experts().get({0, 0}).gate).data, m.experts().get({0, 0}).gate.data);   // the file's bytes
    size_t last = 0, calls = 0;
    WeightOptions on;
    on.progress = [&](size_t done, size_t total) {
        EXPECT_GE(done, last);
        EXPECT_LE(done, total);
        last = done;
        ++calls;
    };
    const BackendWeights p(m, *be, on);
    EXPECT_EQ(p.n_packed(), 2 * 4 * 3);   // the experts' gate, up and down
    EXPECT_NE(p.get(m.experts().get({1, 3}).down).type & MOESH_DTYPE_PACKED, 0);
    EXPECT_EQ(p.get(m.layers()[0].wq).data, m.layers()[0].wq.data);   // still f32, read in place
    EXPECT_EQ(p.get(m.layers()[0].attn_norm), m.layers()[0].attn_norm.data());
    EXPECT_GT(calls, 0u);
    EXPECT_EQ(last, p.bytes());
}

} // namespace
} // namespace moesh
