// GGUF files as models: metadata to ModelConfig, tensors bound without copies,
// and every refusal naming the file's own key or tensor. (That GGUF models
// compute what transformers computes is checked by the golden test's *_gguf cases.)
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/gguf_model.h"
#include "runtime/gguf_writer.h"
#include "runtime/model.h"
#include "test_support.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>

namespace moesh {
namespace {

constexpr int64_t k_embd = 64, k_vocab = 32, k_ff = 32, k_expert = 4, k_head = 4, k_head_kv = 2, k_head_dim = 16;

struct Spec {
    std::string arch = "llama";
    GgmlType attn_q_type = GgmlType::F32;
    std::string drop;                       // a tensor to leave out
    std::map<std::string, std::vector<int64_t>> reshape; // tensor -> other ne
    std::function<void(GgufWriter &)> extra_kv;
};

std::vector<uint8_t> f32_bytes(int64_t n, float v) {
    std::vector<uint8_t> b(size_t(n) * 4);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&b[size_t(i) * 4], &v, 4);
    return b;
}

// A 1-layer llama-architecture MoE (Mixtral layout) with constant weights.
std::string write_model(const test::TempDir & dir, const Spec & s) {
    GgufWriter w;
    const std::string a = s.arch;
    w.add_string("general.architecture", a);
    w.add_u32(a + ".block_count", 1);
    w.add_u32(a + ".embedding_length", k_embd);
    w.add_u32(a + ".feed_forward_length", k_ff);
    w.add_u32(a + ".attention.head_count", k_head);
    w.add_u32(a + ".attention.head_count_kv", k_head_kv);
    w.add_f32(a + ".attention.layer_norm_rms_epsilon", 1e-5f);
    w.add_u32(a + ".expert_count", k_expert);
    w.add_u32(a + ".expert_used_count", 2);
    w.add_u32("tokenizer.ggml.eos_token_id", 2);
    if (s.extra_kv) s.extra_kv(w);
    auto tensor = [&](const std::string & name, std::vector<int64_t> ne, GgmlType type = GgmlType::F32) {
        if (name == s.drop) return;
        if (auto it = s.reshape.find(name); it != s.reshape.end()) ne = it->second;
        int64_t n = 1;
        for (int64_t d : ne) n *= d;
        if (type == GgmlType::F32) {
            w.add_tensor(name, type, ne, f32_bytes(n, 0.01f));
        } else {
            w.add_tensor(name, type, ne, std::vector<uint8_t>(ggml_row_bytes(type, ne[0]) * size_t(n / ne[0])));
        }
    };
    tensor("token_embd.weight", {k_embd, k_vocab});
    tensor("output_norm.weight", {k_embd});
    tensor("blk.0.attn_norm.weight", {k_embd});
    tensor("blk.0.ffn_norm.weight", {k_embd});
    tensor("blk.0.attn_q.weight", {k_embd, k_head * k_head_dim}, s.attn_q_type);
    tensor("blk.0.attn_k.weight", {k_embd, k_head_kv * k_head_dim});
    tensor("blk.0.attn_v.weight", {k_embd, k_head_kv * k_head_dim});
    tensor("blk.0.attn_output.weight", {k_head * k_head_dim, k_embd});
    tensor("blk.0.ffn_gate_inp.weight", {k_embd, k_expert});
    tensor("blk.0.ffn_gate_exps.weight", {k_embd, k_ff, k_expert});
    tensor("blk.0.ffn_up_exps.weight", {k_embd, k_ff, k_expert});
    tensor("blk.0.ffn_down_exps.weight", {k_ff, k_embd, k_expert});
    const std::string path = (dir.path() / "m.gguf").string();
    w.write_file(path);
    return path;
}

std::string load_error(const Spec & s) {
    test::TempDir dir;
    const std::string path = write_model(dir, s);
    try {
        Model::load_path(path);
    } catch (const Error & e) {
        return e.what();
    }
    return "(loaded)";
}

TEST(GgufModel, LlamaWithExpertsIsMixtralWithPerExpertViewsIntoTheMapping) {
    test::TempDir dir;
    const std::string path = write_model(dir, {});
    auto file = std::make_shared<const GgufFile>(path);
    const ModelConfig c = model_config_from_gguf(*file);
    EXPECT_EQ(c.arch, Arch::Mixtral);
    EXPECT_TRUE(c.rope_adjacent_pairs);
    EXPECT_TRUE(c.norm_topk_prob);
    EXPECT_TRUE(c.tie_embeddings);
    EXPECT_EQ(c.n_vocab, k_vocab);
    EXPECT_EQ(c.n_expert, k_expert);
    EXPECT_EQ(c.n_ff_expert, k_ff);
    EXPECT_EQ(c.head_dim, k_head_dim);
    ASSERT_EQ(c.eos_token_ids.size(), 1u);
    EXPECT_EQ(c.eos_token_ids[0], 2);

    const Model m = Model::load(c, gguf_weight_source(file, c.arch));
    const GgufTensor & down = file->require_tensor("blk.0.ffn_down_exps.weight");
    for (int32_t e = 0; e < k_expert; ++e) {
        const ExpertWeights & w = m.experts().get({0, e});
        EXPECT_EQ(w.down.data, down.expert_view(e).data) << "expert " << e << " must be a view, not a copy";
        EXPECT_EQ(w.down.n_rows, k_embd);
        EXPECT_EQ(w.down.n_cols, k_ff);
    }
    EXPECT_TRUE(m.unused_tensors().empty());
}

TEST(GgufModel, QuantizedAttentionIsBoundWithItsType) {
    test::TempDir dir;
    Spec s;
    s.attn_q_type = GgmlType::Q8_0;
    const Model m = Model::load_path(write_model(dir, s));
    EXPECT_EQ(m.layers()[0].wq.type, MOESH_DTYPE_Q8_0);
    EXPECT_EQ(m.layers()[0].wq.n_bytes(), size_t(k_head * k_head_dim) * 34 * size_t(k_embd / 32));
}

TEST(GgufModel, MissingTensorIsNamedAsTheFileWouldNameIt) {
    Spec s;
    s.drop = "blk.0.ffn_up_exps.weight";
    EXPECT_NE(load_error(s).find("missing tensor 'blk.0.ffn_up_exps.weight (expert 0)'"), std::string::npos) << load_error(s);
    s.drop = "blk.0.attn_k.weight";
    EXPECT_NE(load_error(s).find("missing tensor 'blk.0.attn_k.weight'"), std::string::npos) << load_error(s);
    s.drop = "output_norm.weight";
    EXPECT_NE(load_error(s).find("missing tensor 'output_norm.weight'"), std::string::npos) << load_error(s);
}

TEST(GgufModel, WrongShapeNamesTheGgufTensor) {
    Spec s;
    s.reshape["blk.0.attn_v.weight"] = {k_embd, 3 * k_head_dim};
    const std::string e = load_error(s);
    EXPECT_NE(e.find("GGUF tensor 'blk.0.attn_v.weight'"), std::string::npos) << e;
    EXPECT_NE(e.find("expected [32, 64]"), std::string::npos) << e;
}

TEST(GgufModel, UnsupportedTensorTypeIsRefusedByName) {
    Spec s;
    s.attn_q_type = GgmlType::Q5_0;
    const std::string e = load_error(s);
    EXPECT_NE(e.find("Q5_0"), std::string::npos) << e;
    EXPECT_NE(e.find("blk.0.attn_q.weight"), std::string::npos) << e;
}

TEST(GgufModel, UnsupportedArchitectureListsTheSupportedOnes) {
    Spec s;
    s.arch = "gpt2";
    const std::string e = load_error(s);
    EXPECT_NE(e.find("unsupported GGUF architecture 'gpt2'"), std::string::npos) << e;
    EXPECT_NE(e.find("qwen3moe"), std::string::npos) << e;
}

TEST(GgufModel, RefusesWhatItCannotRunNamingTheKey) {
    Spec s;
    s.extra_kv = [](GgufWriter & w) { w.add_array<int32_t>("llama.attention.head_count_kv.x", {1}); };
    EXPECT_EQ(load_error(s), "(loaded)"); // unknown keys are ignored

    s.extra_kv = [](GgufWriter & w) { w.add_string("llama.rope.scaling.type", "yarn"); };
    EXPECT_NE(load_error(s).find("'llama.rope.scaling.type': 'yarn' is not supported"), std::string::npos) << load_error(s);
    s.extra_kv = [](GgufWriter & w) { w.add_u32("llama.rope.dimension_count", 8); };
    EXPECT_NE(load_error(s).find("partial rotary"), std::string::npos) << load_error(s);
    s.extra_kv = [](GgufWriter & w) { w.add_u32("llama.attention.sliding_window", 4096); };
    EXPECT_NE(load_error(s).find("sliding-window"), std::string::npos) << load_error(s);
    s.extra_kv = [](GgufWriter & w) { w.add_u32("llama.vocab_size", 99); };
    EXPECT_NE(load_error(s).find("disagrees with token_embd.weight"), std::string::npos) << load_error(s);
    s.extra_kv = [](GgufWriter & w) { w.add_u32("tokenizer.ggml.bos_token_id", 32); };
    EXPECT_NE(load_error(s).find("'tokenizer.ggml.bos_token_id': expected a token id in [0, 32)"), std::string::npos)
        << load_error(s);
    s.extra_kv = [](GgufWriter & w) { w.add_string("llama.expert_used_count.note", "x"); };
    EXPECT_EQ(load_error(s), "(loaded)");
}

TEST(GgufModel, PerLayerHeadCountsAreRefused) {
    test::TempDir dir;
    GgufWriter w;
    w.add_string("general.architecture", "qwen3moe");
    w.add_u32("qwen3moe.block_count", 1);
    w.add_u32("qwen3moe.embedding_length", 64);
    w.add_u32("qwen3moe.attention.head_count", 4);
    w.add_array<int32_t>("qwen3moe.attention.head_count_kv", {2});
    w.add_tensor("token_embd.weight", GgmlType::F32, {64, 8}, f32_bytes(64 * 8, 0));
    w.write_file(dir.path() / "a.gguf");
    try {
        Model::load_path((dir.path() / "a.gguf").string());
        FAIL() << "loaded";
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("'qwen3moe.attention.head_count_kv': per-layer arrays"), std::string::npos)
            << e.what();
    }
}

TEST(GgufModel, LoadPathExplainsAMissingPath) {
    try {
        Model::load_path("/nonexistent/model.gguf");
        FAIL() << "loaded";
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("no such file or folder"), std::string::npos) << e.what();
    }
}

} // namespace
} // namespace moesh
