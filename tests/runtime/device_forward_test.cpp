// The forward pass on a device-memory backend, without a GPU: the devsim test
// plugin (tests/plugins/devsim) refuses host pointers in ops and keeps its
// buffers unreadable by the host, so a host-side shortcut fails here. Golden
// fixtures also run on it (golden_test.cpp, "_devsim" cases).
#include "runtime/backend_weights.h"
#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/generate.h"
#include "runtime/quantize.h"
#include "runtime/synthetic_model.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>

namespace moesh {
namespace {

ModelConfig config(const char * arch) {
    nlohmann::json j = {{"architectures", {arch}},
                        {"vocab_size", 97},
                        {"hidden_size", 64},
                        {"intermediate_size", 64},
                        {"moe_intermediate_size", 32},
                        {"shared_expert_intermediate_size", 32},
                        {"num_hidden_layers", 3},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"num_local_experts", 6},
                        {"num_experts", 6},
                        {"num_experts_per_tok", 2},
                        {"max_position_embeddings", 128},
                        {"mlp_only_layers", {1}}};
    return parse_model_config(j.dump(), "synthetic");
}

double max_rel_diff(const std::vector<float> & a, const std::vector<float> & b) {
    double d = 0, m = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        d = std::max(d, double(std::fabs(a[i] - b[i])));
        m = std::max(m, double(std::fabs(b[i])));
    }
    return d / std::max(m, 1e-30);
}

// Sets an environment variable for one scope.
class ScopedEnv {
public:
    ScopedEnv(const char * name, const char * value) : name_(name) { setenv(name, value, 1); }
    ~ScopedEnv() { unsetenv(name_); }

private:
    const char * name_;
};

TEST(DeviceForward, TheSimulatedDeviceRefusesHostPointers) {
    auto be = test::open_devsim_backend();
    ASSERT_NE(be, nullptr);
    EXPECT_FALSE(be->host_memory());
    std::vector<float> host(16, 1.0f);
    BackendBuffer w(*be, 16 * sizeof(float), "test"), y(*be, 4 * sizeof(float), "test");
    be->upload(w.get(), host.data(), 16 * sizeof(float), "test");
    moesh_matmul_args a{};
    a.struct_size = sizeof a;
    a.w_type = MOESH_DTYPE_F32;
    a.w = w.get();
    a.x = host.data();   // host memory: must be refused
    a.y = y.as<float>();
    a.n_in = 4;
    a.n_out = 4;
    a.n_tokens = 1;
    a.x_stride = 4;
    a.y_stride = 4;
    EXPECT_EQ(be->iface().matmul(be->ctx(), &a), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(be->iface().last_error(be->ctx())).find("not inside a buffer_alloc buffer"), std::string::npos);
    a.x = w.as<float>();
    EXPECT_EQ(be->iface().matmul(be->ctx(), &a), MOESH_OK) << be->iface().last_error(be->ctx());
    std::vector<float> out(4);
    be->download(out.data(), y.get(), 4 * sizeof(float), "test");
    EXPECT_EQ(out[0], 4.0f);
}

// The simulated device's async copies land as late as the ABI allows, so a host that computes
// with an upload it has not waited for, or reuses its source too early, sees it fail here.
TEST(DeviceForward, TheSimulatedDeviceEnforcesAsyncCopyRules) {
    auto be = test::open_devsim_backend();
    ASSERT_NE(be, nullptr);
    ASSERT_TRUE(be->has_async_upload());
    const auto err = [&] { return std::string(be->iface().last_error(be->ctx())); };
    BackendBuffer w(*be, 16 * sizeof(float), "test"), x(*be, 4 * sizeof(float), "test"), y(*be, 4 * sizeof(float), "test");
    std::vector<float> ones(16, 1.0f), twos(16, 2.0f), xs(4, 1.0f), out(4);
    be->upload(x.get(), xs.data(), 4 * sizeof(float), "test");
    moesh_matmul_args a{};
    a.struct_size = sizeof a;
    a.w_type = MOESH_DTYPE_F32;
    a.w = w.get();
    a.x = x.as<float>();
    a.y = y.as<float>();
    a.n_in = a.n_out = 4;
    a.n_tokens = 1;
    a.x_stride = a.y_stride = 4;

    const uint64_t t1 = be->upload_async(w.get(), ones.data(), 16 * sizeof(float), "test");
    EXPECT_GT(t1, 0u);
    EXPECT_EQ(be->iface().matmul(be->ctx(), &a), MOESH_ERR_INVALID_ARGUMENT);   // not waited for
    EXPECT_NE(err().find("no copy_wait has covered yet"), std::string::npos) << err();
    be->wait_upload(t1, /*host=*/false, "test");
    ones.assign(16, 3.0f);   // too early: the copy reads its source when it runs
    ASSERT_EQ(be->iface().matmul(be->ctx(), &a), MOESH_OK) << err();
    be->download(out.data(), y.get(), 4 * sizeof(float), "test");
    EXPECT_EQ(out[0], 12.0f);   // 3 * 4: the late source; a GPU might give either

    const uint64_t t2 = be->upload_async(w.get(), twos.data(), 16 * sizeof(float), "test");
    EXPECT_GT(t2, t1);
    be->wait_upload(t2, /*host=*/true, "test");
    twos.assign(16, 5.0f);   // allowed now: the copy is done
    ASSERT_EQ(be->iface().matmul(be->ctx(), &a), MOESH_OK) << err();
    be->download(out.data(), y.get(), 4 * sizeof(float), "test");
    EXPECT_EQ(out[0], 8.0f);

    EXPECT_EQ(be->iface().copy_wait(be->ctx(), t2 + 1, 0), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("was never issued"), std::string::npos) << err();
    EXPECT_EQ(be->iface().copy_wait(be->ctx(), 0, 1), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(be->iface().copy_to_device_async(be->ctx(), xs.data(), xs.data(), 4, nullptr), MOESH_ERR_INVALID_ARGUMENT);
    uint64_t t = 0;
    EXPECT_EQ(be->iface().copy_to_device_async(be->ctx(), xs.data(), xs.data(), 4, &t), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("not inside a buffer_alloc buffer"), std::string::npos) << err();
}

// An f16 KV cache only from a plugin that answers supports() per KV type: one built before the
// type existed says yes to anything, and would read the pools as f32 (twice past their end).
TEST(KvCacheType, OnlyAPluginThatAnswersPerTypeGetsAnF16Cache) {
    auto cpu = test::open_cpu_backend(1);
    auto dev = test::open_devsim_backend();
    ASSERT_TRUE(cpu && dev);
    EXPECT_TRUE(backend_offers_kv_type(*cpu, MOESH_DTYPE_F16));
    EXPECT_TRUE(backend_offers_kv_type(*dev, MOESH_DTYPE_F16));
    auto old = test::open_test_plugin("says_yes");
    ASSERT_NE(old, nullptr);
    EXPECT_TRUE(old->supports(MOESH_OP_ATTENTION, MOESH_DTYPE_F16));
    EXPECT_FALSE(backend_offers_kv_type(*old, MOESH_DTYPE_F16));
    EXPECT_TRUE(backend_offers_kv_type(*old, MOESH_DTYPE_F32));
    KvCacheSpec ks;
    ks.n_layer = ks.n_head_kv = ks.n_blocks = 1;
    ks.head_dim = 4;
    ks.type = MOESH_DTYPE_F16;
    try {
        KvCache kv(ks, *old);
        FAIL() << "an f16 cache on a plugin that cannot say";
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("cannot keep the KV cache in f16"), std::string::npos) << e.what();
    }
}

// A q8_0 KV cache: the cpu plugin offers it (devsim, standing in for a device plugin, does not,
// nor does cuda), it takes 34 bytes per 32 values, and a head_dim that is not a multiple of 32 is
// refused with what to do instead.
TEST(KvCacheType, AQ8_0CacheNeedsAPluginThatOffersItAndWholeBlocks) {
    auto cpu = test::open_cpu_backend(1);
    auto dev = test::open_devsim_backend();
    auto old = test::open_test_plugin("says_yes");
    ASSERT_TRUE(cpu && dev && old);
    EXPECT_TRUE(backend_offers_kv_type(*cpu, MOESH_DTYPE_Q8_0));
    EXPECT_FALSE(backend_offers_kv_type(*dev, MOESH_DTYPE_Q8_0));
    EXPECT_FALSE(backend_offers_kv_type(*old, MOESH_DTYPE_Q8_0));
    EXPECT_EQ(KvCacheSpec::row_bytes(MOESH_DTYPE_Q8_0, 128), 4u * 34u);
    EXPECT_EQ(KvCacheSpec::row_bytes(MOESH_DTYPE_F16, 128), 256u);
    KvCacheSpec ks;
    ks.n_layer = 2;
    ks.n_head_kv = 2;
    ks.n_blocks = 3;
    ks.head_dim = 64;
    ks.type = MOESH_DTYPE_Q8_0;
    EXPECT_EQ(ks.bytes(), size_t(2 * 2 * 3 * 16 * 2 * 2 * 34));
    EXPECT_EQ(KvCacheSpec::blocks_for_budget(ks.bytes(), 2, 2, 64, 16, MOESH_DTYPE_Q8_0), 3);
    EXPECT_NO_THROW(KvCache(ks, *cpu));
    EXPECT_THROW(KvCache(ks, *dev), Error);
    // A q8_0 call is valid by the ABI: devsim must refuse it itself (UNSUPPORTED), not run as f32.
    void * buf = nullptr;
    ASSERT_EQ(dev->iface().buffer_alloc(dev->ctx(), 4096, &buf), MOESH_OK);
    const moesh_copy_rows_args c = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = 0, .clamp = 0.0f, .reserved = 0,
                                    .src = static_cast<const float *>(buf), .dst = static_cast<char *>(buf) + 2048,
                                    .src_rows = nullptr, .dst_rows = nullptr, .n_rows = 1, .n_cols = 32, .src_stride = 32,
                                    .dst_stride = 32, .src_n_rows = 1, .dst_n_rows = 1, .dst_type = MOESH_DTYPE_Q8_0, .reserved2 = 0};
    EXPECT_EQ(dev->iface().copy_rows(dev->ctx(), &c), MOESH_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(dev->iface().last_error(dev->ctx())).find("not q8_0"), std::string::npos);
    dev->iface().buffer_free(dev->ctx(), buf);
    ks.head_dim = 80;
    try {
        KvCache kv(ks, *cpu);
        FAIL() << "a q8_0 cache of 80-value rows";
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("head_dim (80) to be a multiple of 32"), std::string::npos) << e.what();
    }
}

class DeviceArch : public testing::TestWithParam<const char *> {};

// Prefill in chunks, then decode: logits equal the cpu backend's (f32 weights:
// only the summation order differs), greedy tokens identical. The same with an f16 KV cache
// (--kv-type f16), whose keys and values each backend rounds as it writes them: within 1e-3 of
// each other, and within a few 1e-3 of the f32 cache's logits.
TEST_P(DeviceArch, GenerateEqualsTheCpuBackend) {
    const ModelConfig cfg = config(GetParam());
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 21));
    auto cpu = test::open_cpu_backend(1);
    auto dev = test::open_devsim_backend();
    ASSERT_TRUE(cpu && dev);
    const BackendWeights weights(m, *dev, {});
    EXPECT_NE(weights.summary().find("uploaded"), std::string::npos) << weights.summary();
    std::vector<float> f32_logits;
    for (const int32_t kv_type : {MOESH_DTYPE_F32, MOESH_DTYPE_F16}) {
        SCOPED_TRACE(kv_type == MOESH_DTYPE_F16 ? "f16 KV cache" : "f32 KV cache");
        GenerateOptions o;
        o.prompt = {5, 17, 3, 88, 42, 1, 0, 96, 12, 7, 7};
        o.n_generate = 10;
        o.keep_logits = true;
        o.max_batch = 4;   // chunked prefill: gather/scatter by expert
        o.kv_type = kv_type;
        const GenerateResult want = generate(m, *cpu, o);
        o.weights = &weights;
        const GenerateResult got = generate(m, *dev, o);
        EXPECT_EQ(got.tokens, want.tokens);
        EXPECT_LT(max_rel_diff(got.logits, want.logits), kv_type == MOESH_DTYPE_F16 ? 1e-3 : 1e-5);
        if (kv_type == MOESH_DTYPE_F32) {
            f32_logits = want.logits;
        } else {
            EXPECT_LT(max_rel_diff(want.logits, f32_logits), 5e-3);
            EXPECT_GT(max_rel_diff(want.logits, f32_logits), 0.0) << "the f16 cache was not used";
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Archs, DeviceArch,
                         testing::Values("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                         "OlmoeForCausalLM", "LlamaForCausalLM"));

TEST(DeviceForward, QuantizedWeightsGiveTheCpuBackendsTokens) {
    const ModelConfig cfg = config("MixtralForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 8));
    QuantizePlan plan;
    plan.experts = MOESH_DTYPE_Q4_0;
    plan.attention = plan.output = MOESH_DTYPE_Q8_0;
    quantize_model(m, plan, 1);
    auto cpu = test::open_cpu_backend(1, /*precise_activations=*/true);
    auto dev = test::open_devsim_backend();
    ASSERT_TRUE(cpu && dev);
    GenerateOptions o;
    o.prompt = {3, 1, 4, 1, 5, 9, 2, 6};
    o.n_generate = 12;
    o.keep_logits = true;
    const GenerateResult want = generate(m, *cpu, o), got = generate(m, *dev, o);   // devsim: its own upload
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_LT(max_rel_diff(got.logits, want.logits), 1e-3);
}

// Sequences interleaved in one batch, some rows without logits: the same as each alone.
TEST(DeviceForward, InterleavedSequencesMatchSeparateRuns) {
    const ModelConfig cfg = config("Qwen2MoeForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 4));
    auto dev = test::open_devsim_backend();
    ASSERT_NE(dev, nullptr);
    const BackendWeights weights(m, *dev, {});
    const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6}, b = {9, 8, 7};
    const size_t V = size_t(cfg.n_vocab);
    auto alone = [&](const std::vector<int32_t> & p) {
        KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 4, 8, 1}, *dev);
        EXPECT_TRUE(kv.reserve(0, int64_t(p.size())));
        ForwardPass f(m, *dev, kv, 8, &weights);
        Batch batch;
        for (size_t i = 0; i < p.size(); ++i) batch.add(p[i], int32_t(i), 0, true);
        std::string err;
        const float * l = f.run(batch, &err);
        EXPECT_NE(l, nullptr) << err;
        return l ? std::vector<float>(l, l + p.size() * V) : std::vector<float>();
    };
    const auto la = alone(a), lb = alone(b);
    KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 4, 8, 3}, *dev);
    ASSERT_TRUE(kv.reserve(2, 3));
    ASSERT_TRUE(kv.reserve(0, 6));
    ForwardPass f(m, *dev, kv, 9, &weights);
    Batch batch;
    std::vector<std::pair<int, size_t>> rows;   // (sequence, position) of rows with logits
    for (size_t i = 0; i < 6; ++i) {
        const bool want = i % 2 == 1;
        batch.add(a[i], int32_t(i), 0, want);
        if (want) rows.push_back({0, i});
        if (i < 3) {
            batch.add(b[i], int32_t(i), 2, true);
            rows.push_back({2, i});
        }
    }
    std::string err;
    const float * l = f.run(batch, &err);
    ASSERT_NE(l, nullptr) << err;
    for (size_t r = 0; r < rows.size(); ++r) {
        const auto & ref = rows[r].first == 0 ? la : lb;
        const std::vector<float> got(l + r * V, l + (r + 1) * V), want(ref.begin() + long(rows[r].second * V),
                                                                       ref.begin() + long((rows[r].second + 1) * V));
        EXPECT_LT(max_rel_diff(got, want), 1e-5) << "row " << r;
    }
}

TEST(DeviceForward, AModelThatDoesNotFitIsRefusedWithWhatItNeeds) {
    const ModelConfig cfg = config("MixtralForCausalLM");
    Model m = Model::load(cfg, make_synthetic_weights(cfg, MOESH_DTYPE_F32, 2));
    {
        ScopedEnv small("MOESH_DEVSIM_MEMORY", "200000");   // the weights alone need ~1 MB
        auto dev = test::open_devsim_backend();
        ASSERT_NE(dev, nullptr);
        try {
            BackendWeights w(m, *dev, {});
            FAIL() << "expected the model to be refused";
        } catch (const Error & e) {
            const std::string msg = e.what();
            EXPECT_NE(msg.find("does not fit in backend 'devsim' memory"), std::string::npos) << msg;
            EXPECT_NE(msg.find("routed experts"), std::string::npos) << msg;
            EXPECT_NE(msg.find("--ctx"), std::string::npos) << msg;
        }
        // generate() uploads for itself and says the same.
        GenerateOptions o;
        o.prompt = {1, 2};
        o.n_generate = 2;
        EXPECT_THROW(generate(m, *dev, o), Error);
    }
    {
        ScopedEnv small("MOESH_DEVSIM_MEMORY", "3000000");
        auto dev = test::open_devsim_backend();
        ASSERT_NE(dev, nullptr);
        // The weights fit, but not with this reserve for KV and activations.
        WeightOptions o;
        o.reserve_bytes = 2500000;
        EXPECT_THROW(BackendWeights(m, *dev, o), Error);
        // A KV cache that cannot be allocated names itself.
        try {
            KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 16, 4096, 1}, *dev);
            FAIL() << "expected the KV cache to be refused";
        } catch (const Error & e) {
            EXPECT_NE(std::string(e.what()).find("KV cache"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("--ctx"), std::string::npos) << e.what();
        }
    }
}

} // namespace
} // namespace moesh
