// Model::load checks every tensor: presence, dtype, shape.
#include "runtime/error.h"
#include "runtime/model.h"
#include "runtime/synthetic_model.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace moesh {
namespace {

ModelConfig cfg(const char * arch = "MixtralForCausalLM") {
    nlohmann::json j = {{"architectures", {arch}}, {"vocab_size", 50},       {"hidden_size", 16},
                        {"intermediate_size", 24}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                        {"num_key_value_heads", 2}, {"num_local_experts", 4}, {"num_experts", 4},
                        {"moe_intermediate_size", 8}, {"num_experts_per_tok", 2}};
    return parse_model_config(j.dump(), "c.json");
}

std::string load_error(const ModelConfig & c, std::shared_ptr<MemoryWeightSource> src) {
    try {
        Model::load(c, src);
    } catch (const Error & e) {
        return e.what();
    }
    return "";
}

TEST(ModelLoad, LoadsSyntheticMixtralAndCountsBytes) {
    Model m = Model::load(cfg(), make_synthetic_weights(cfg(), MOESH_DTYPE_BF16, 1));
    EXPECT_EQ(m.experts().n_present(), 8);
    EXPECT_EQ(m.experts().bytes_per_expert(0), size_t(3 * 24 * 16 * 2));
    EXPECT_TRUE(m.unused_tensors().empty());
    EXPECT_LT(m.active_bytes_per_token(), m.weight_bytes());
}

TEST(ModelLoad, RejectsMissingTensorNamingIt) {
    auto full = make_synthetic_weights(cfg(), MOESH_DTYPE_F32, 1);
    // rebuild without one expert tensor
    auto partial = std::make_shared<MemoryWeightSource>("partial");
    for (const auto & n : full->names()) {
        if (n == "model.layers.1.block_sparse_moe.experts.3.w2.weight") continue;
        const SourceTensor * t = full->find(n);
        void * d = partial->add(n, moesh_dtype(t->dtype), t->shape);
        (void)d;
    }
    const std::string msg = load_error(cfg(), partial);
    EXPECT_NE(msg.find("missing tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[16, 24]"), std::string::npos) << msg;
}

TEST(ModelLoad, RejectsWrongShapeAndUnsupportedDtype) {
    auto full = make_synthetic_weights(cfg(), MOESH_DTYPE_F32, 1);
    auto bad = std::make_shared<MemoryWeightSource>("bad");
    for (const auto & n : full->names()) {
        const SourceTensor * t = full->find(n);
        auto shape = t->shape;
        if (n == "model.layers.0.self_attn.k_proj.weight") shape = {16, 16};
        bad->add(n, moesh_dtype(t->dtype), shape);
    }
    std::string msg = load_error(cfg(), bad);
    EXPECT_NE(msg.find("k_proj.weight' has shape [16, 16], expected [8, 16]"), std::string::npos) << msg;
}

TEST(ModelLoad, RejectsExpertWithMixedDtypes) {
    auto full = make_synthetic_weights(cfg(), MOESH_DTYPE_F32, 1);
    auto bad = std::make_shared<MemoryWeightSource>("mixed");
    for (const auto & n : full->names()) {
        const SourceTensor * t = full->find(n);
        bad->add(n, n.find("experts.2.w3") != std::string::npos ? MOESH_DTYPE_BF16 : moesh_dtype(t->dtype), t->shape);
    }
    std::string msg = load_error(cfg(), bad);
    EXPECT_NE(msg.find("expert 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("different dtypes"), std::string::npos) << msg;
}

TEST(ModelLoad, ReportsUnusedTensors) {
    auto src = make_synthetic_weights(cfg(), MOESH_DTYPE_F32, 1);
    src->add("model.layers.0.self_attn.rotary_emb.inv_freq", MOESH_DTYPE_F32, {4});
    Model m = Model::load(cfg(), src);
    ASSERT_EQ(m.unused_tensors().size(), 1u);
}

} // namespace
} // namespace moesh
