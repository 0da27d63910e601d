#include "runtime/error.h"
#include "runtime/model_config.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace moesh {
namespace {

using json = nlohmann::json;

json mixtral() {
    return json{{"architectures", {"MixtralForCausalLM"}},
                {"vocab_size", 100},
                {"hidden_size", 32},
                {"intermediate_size", 64},
                {"num_hidden_layers", 2},
                {"num_attention_heads", 4},
                {"num_key_value_heads", 2},
                {"num_local_experts", 4},
                {"num_experts_per_tok", 2},
                {"rms_norm_eps", 1e-5},
                {"rope_theta", 1e6},
                {"max_position_embeddings", 256},
                {"sliding_window", nullptr},
                {"tie_word_embeddings", false}};
}

// Expects a moesh::Error whose message contains every fragment.
void expect_error(const json & j, std::initializer_list<const char *> fragments) {
    try {
        parse_model_config(j.dump(), "model/config.json");
        FAIL() << "accepted: " << j.dump();
    } catch (const Error & e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("model/config.json"), std::string::npos) << msg;
        for (const char * f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "missing '" << f << "' in: " << msg;
    }
}

TEST(ModelConfig, ParsesMixtral) {
    ModelConfig c = parse_model_config(mixtral().dump(), "x");
    EXPECT_EQ(c.arch, Arch::Mixtral);
    EXPECT_EQ(c.n_embd, 32);
    EXPECT_EQ(c.head_dim, 8);
    EXPECT_EQ(c.n_expert, 4);
    EXPECT_EQ(c.n_expert_used, 2);
    EXPECT_EQ(c.n_ff_expert, 64);
    EXPECT_TRUE(c.norm_topk_prob);
    EXPECT_EQ(c.n_moe_layers(), 2);
    EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
}

TEST(ModelConfig, RejectsInvalidJson) { 
    EXPECT_THROW(parse_model_config("{\"a\": ", "c.json"), Error);
    EXPECT_THROW(parse_model_config("[1, 2]", "c.json"), Error);
    EXPECT_THROW(parse_model_config("", "c.json"), Error);
    EXPECT_THROW(parse_model_config("1e300700011", "c.json"), Error); // past double: out_of_range, not parse_error
    EXPECT_THROW(parse_model_config(std::string_view("{}\0{\"a\":1}", 11), "c.json"), Error);
}

TEST(ModelConfig, RejectsUnknownArchitectureNamingSupportedOnes) {
    json j = mixtral();
    j["architectures"] = {"GPT2LMHeadModel"};
    expect_error(j, {"GPT2LMHeadModel", "MixtralForCausalLM", "OlmoeForCausalLM"});
}

TEST(ModelConfig, RejectsMissingArchitectures) {
    json j = mixtral();
    j.erase("architectures");
    expect_error(j, {"architectures"});
}

TEST(ModelConfig, RejectsWrongTypes) {
    json j = mixtral();
    j["hidden_size"] = "32";
    expect_error(j, {"hidden_size", "integer"});
    j = mixtral();
    j["hidden_size"] = 32.5;
    expect_error(j, {"hidden_size", "integer"});
    j = mixtral();
    j["rms_norm_eps"] = "small";
    expect_error(j, {"rms_norm_eps", "number"});
    j = mixtral();
    j["tie_word_embeddings"] = 1;
    expect_error(j, {"tie_word_embeddings"});
}

TEST(ModelConfig, RejectsOutOfRangeValues) {
    json j = mixtral();
    j["hidden_size"] = 0;
    expect_error(j, {"hidden_size", "out of range"});
    j = mixtral();
    j["num_experts_per_tok"] = 5;
    expect_error(j, {"num_experts_per_tok", "out of range"});
    j = mixtral();
    j["vocab_size"] = -3;
    expect_error(j, {"vocab_size"});
    j = mixtral();
    j["hidden_size"] = 1e300;
    expect_error(j, {"hidden_size"});
}

TEST(ModelConfig, RejectsMissingRequiredKey) {
    json j = mixtral();
    j.erase("num_local_experts");
    expect_error(j, {"num_experts", "missing"});
    j["num_experts"] = 4; // the alias transformers also accepts
    EXPECT_EQ(parse_model_config(j.dump(), "x").n_expert, 4);
    j["num_local_experts"] = 6;
    expect_error(j, {"num_local_experts", "disagrees"});
}

TEST(ModelConfig, RejectsHeadsNotDividingKvHeads) {
    json j = mixtral();
    j["num_key_value_heads"] = 3;
    expect_error(j, {"num_key_value_heads"});
}

TEST(ModelConfig, RejectsUnsupportedActivationAndRope) {
    json j = mixtral();
    j["hidden_act"] = "gelu";
    expect_error(j, {"hidden_act", "gelu", "silu"});
    j = mixtral();
    j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 2.0}};
    expect_error(j, {"rope_scaling", "longrope", "llama3"});
    j = mixtral();
    j["rope_scaling"] = {{"rope_type", "linear"}};
    expect_error(j, {"factor", "missing"});
}

TEST(ModelConfig, RejectsSlidingWindow) {
    json j = mixtral();
    j["sliding_window"] = 4096;
    expect_error(j, {"sliding_window"});
}

TEST(ModelConfig, Qwen2MoeLayerPattern) {
    json j = mixtral();
    j["architectures"] = {"Qwen2MoeForCausalLM"};
    j.erase("num_local_experts");
    j["num_experts"] = 8;
    j["moe_intermediate_size"] = 16;
    j["shared_expert_intermediate_size"] = 24;
    j["num_hidden_layers"] = 4;
    j["decoder_sparse_step"] = 2;
    j["mlp_only_layers"] = {3};
    ModelConfig c = parse_model_config(j.dump(), "x");
    EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{false, true, false, false}));
    EXPECT_EQ(c.n_ff, 64);
    EXPECT_EQ(c.n_ff_shared, 24);
    EXPECT_TRUE(c.q_bias);
    EXPECT_FALSE(c.o_bias);
    j["mlp_only_layers"] = {7};
    expect_error(j, {"mlp_only_layers", "7"});
}

TEST(ModelConfig, ReadsRopeParametersOfTransformers5AndRopeScalingOfTheHub) {
    json j = mixtral();
    j.erase("rope_theta");
    j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 5000.0}};
    ModelConfig c = parse_model_config(j.dump(), "x");
    EXPECT_EQ(c.rope.type, RopeType::Linear);
    EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
    EXPECT_DOUBLE_EQ(c.rope.theta, 5000.0);
    j = mixtral();
    j["rope_scaling"] = {{"type", "llama3"}, {"factor", 8.0}, {"original_max_position_embeddings", 64}};
    c = parse_model_config(j.dump(), "x");
    EXPECT_EQ(c.rope.type, RopeType::Llama3);
    EXPECT_EQ(c.rope.original_max_positions, 64);
}

TEST(ModelConfig, RopeTablesDefaultAndLinear) {
    json j = mixtral();
    j["rope_theta"] = 10000.0;
    ModelConfig c = parse_model_config(j.dump(), "x");
    RopeTables t = compute_rope_tables(c);
    ASSERT_EQ(t.inv_freq.size(), 4u);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(t.inv_freq[i], std::pow(10000.0, -double(2 * i) / 8.0), 1e-7);
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
    RopeTables l = compute_rope_tables(parse_model_config(j.dump(), "x"));
    for (size_t i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(l.inv_freq[i], t.inv_freq[i] / 2.0f);
    EXPECT_EQ(l.attn_factor, 1.0f);
}

TEST(ModelConfig, YarnAttentionFactor) {
    json j = mixtral();
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 64}};
    RopeTables t = compute_rope_tables(parse_model_config(j.dump(), "x"));
    EXPECT_NEAR(t.attn_factor, 0.1 * std::log(4.0) + 1.0, 1e-6);
}

} // namespace
} // namespace moesh
