// Forward-pass properties that need no reference: batching must not change
// results, and invalid batches are refused, not crashed on.
#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/generate.h"
#include "runtime/synthetic_model.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <cmath>

namespace moesh {
namespace {

ModelConfig small_config(const char * arch) {
    nlohmann::json j = {{"architectures", {arch}},
                        {"vocab_size", 97},
                        {"hidden_size", 48},
                        {"intermediate_size", 40},
                        {"moe_intermediate_size", 24},
                        {"shared_expert_intermediate_size", 20},
                        {"num_hidden_layers", 3},
                        {"num_attention_heads", 6},
                        {"num_key_value_heads", 2},
                        {"num_local_experts", 6},
                        {"num_experts", 6},
                        {"num_experts_per_tok", 2},
                        {"max_position_embeddings", 128},
                        {"mlp_only_layers", {1}}};
    return parse_model_config(j.dump(), "synthetic");
}

double max_abs_diff(const float * a, const float * b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
    return m;
}

class ForwardBatching : public testing::TestWithParam<const char *> {};

TEST_P(ForwardBatching, ChunkedPrefillEqualsTokenByToken) {
    Model m = Model::load(small_config(GetParam()), make_synthetic_weights(small_config(GetParam()), MOESH_DTYPE_F32, 7));
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    GenerateOptions o;
    o.prompt = {5, 17, 3, 88, 42, 1, 0, 96, 12};
    o.n_generate = 4;
    o.keep_logits = true;
    o.max_batch = 64;
    GenerateResult whole = generate(m, *be, o);
    o.max_batch = 1;
    GenerateResult single = generate(m, *be, o);
    ASSERT_EQ(whole.logits.size(), single.logits.size());
    EXPECT_LT(max_abs_diff(whole.logits.data(), single.logits.data(), whole.logits.size()), 1e-4);
    EXPECT_EQ(whole.tokens, single.tokens);
}

TEST_P(ForwardBatching, TwoSequencesInOneBatchMatchSeparateRuns) {
    const ModelConfig cfg = small_config(GetParam());
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 11));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    const std::vector<int32_t> a = {1, 2, 3, 4, 5}, b = {9, 8, 7};
    const size_t V = size_t(cfg.n_vocab);

    auto run_alone = [&](const std::vector<int32_t> & p) {
        KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 4, 8, 1}, *be);
        EXPECT_TRUE(kv.reserve(0, int64_t(p.size())));
        ForwardPass f(m, *be, kv, 8);
        Batch batch;
        for (size_t i = 0; i < p.size(); ++i) batch.add(p[i], int32_t(i), 0, true);
        std::string err;
        const float * l = f.run(batch, &err);
        EXPECT_NE(l, nullptr) << err;
        return std::vector<float>(l, l + p.size() * V);
    };
    const auto la = run_alone(a), lb = run_alone(b);

    // interleaved: a0 b0 a1 b1 ... in one batch, sequences in separate KV slots
    KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 4, 8, 2}, *be);
    ASSERT_TRUE(kv.reserve(1, 3));
    ASSERT_TRUE(kv.reserve(0, 5));
    ForwardPass f(m, *be, kv, 8);
    Batch batch;
    std::vector<std::pair<int, size_t>> order;
    for (size_t i = 0; i < 5; ++i) {
        batch.add(a[i], int32_t(i), 0, true);
        order.push_back({0, i});
        if (i < 3) {
            batch.add(b[i], int32_t(i), 1, true);
            order.push_back({1, i});
        }
    }
    std::string err;
    const float * l = f.run(batch, &err);
    ASSERT_NE(l, nullptr) << err;
    for (size_t r = 0; r < order.size(); ++r) {
        const auto & ref = order[r].first == 0 ? la : lb;
        EXPECT_LT(max_abs_diff(l + r * V, ref.data() + order[r].second * V, V), 1e-4) << "row " << r;
    }
}

INSTANTIATE_TEST_SUITE_P(Archs, ForwardBatching,
                         testing::Values("MixtralForCausalLM", "Qwen2MoeForCausalLM", "LlamaForCausalLM"));

TEST(Forward, RefusesInvalidBatches) {
    const ModelConfig cfg = small_config("MixtralForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_BF16, 3));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 4, 2, 1}, *be);
    ASSERT_TRUE(kv.reserve(0, 8));
    ForwardPass f(m, *be, kv, 4);
    std::string err;
    Batch b;
    EXPECT_EQ(f.run(b, &err), nullptr);
    b.add(97, 0, 0, true);
    EXPECT_EQ(f.run(b, &err), nullptr);
    EXPECT_NE(err.find("vocabulary"), std::string::npos) << err;
    b.clear();
    b.add(1, 8, 0, true);
    EXPECT_EQ(f.run(b, &err), nullptr);
    EXPECT_NE(err.find("KV capacity"), std::string::npos) << err;
    b.clear();
    b.add(1, 0, 3, true);
    EXPECT_EQ(f.run(b, &err), nullptr);
    EXPECT_NE(err.find("sequence id"), std::string::npos) << err;
    b.clear();
    for (int i = 0; i < 5; ++i) b.add(1, i, 0, true);
    EXPECT_EQ(f.run(b, &err), nullptr);
    EXPECT_NE(err.find("max_batch"), std::string::npos) << err;
    // a valid batch still runs after the refusals
    b.clear();
    b.add(1, 0, 0, true);
    EXPECT_NE(f.run(b, &err), nullptr) << err;
}

TEST(Forward, KvCacheRefusesWhenPoolIsExhausted) {
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    KvCache kv({2, 2, 8, 4, 3, 2}, *be);
    EXPECT_TRUE(kv.reserve(0, 8));  // 2 blocks
    EXPECT_FALSE(kv.reserve(1, 8)); // needs 2, 1 left
    EXPECT_EQ(kv.capacity(1), 0);
    EXPECT_TRUE(kv.reserve(1, 4));
    kv.release(0);
    EXPECT_EQ(kv.n_free_blocks(), 2);
    EXPECT_TRUE(kv.reserve(1, 12));
    EXPECT_FALSE(kv.reserve(5, 1));
}

TEST(Generate, RejectsBadOptions) {
    const ModelConfig cfg = small_config("MixtralForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F16, 3));
    auto be = test::open_cpu_backend(1);
    ASSERT_NE(be, nullptr);
    GenerateOptions o;
    EXPECT_THROW(generate(m, *be, o), Error);
    o.prompt = {1, 200};
    EXPECT_THROW(generate(m, *be, o), Error);
    o.prompt = {1};
    o.n_generate = 500;
    EXPECT_THROW(generate(m, *be, o), Error); // beyond max_position_embeddings
    o.n_generate = 3;
    o.sampling.top_p = 0.0f;
    EXPECT_THROW(generate(m, *be, o), Error);
    o.sampling = {0.8f, 5, 0.9f, 123};
    GenerateResult r1 = generate(m, *be, o), r2 = generate(m, *be, o);
    EXPECT_EQ(r1.tokens, r2.tokens); // a seed reproduces its tokens
}

} // namespace
} // namespace moesh
