// Quantizing models and writing them as GGUF. That quantize_row matches gguf
// bit for bit is tests/experts' business; here: the GGUF writer reproduces
// every fixture exactly (layout, llama q/k permutation, rope_freqs, metadata),
// the plan reaches every class it names, and what cannot be quantized is kept
// and reported.
#include "runtime/error.h"
#include "runtime/generate.h"
#include "runtime/gguf.h"
#include "runtime/gguf_writer.h"
#include "runtime/quantize.h"
#include "runtime/run_config.h"
#include "test_support.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

namespace moesh {
namespace {

namespace fs = std::filesystem;

std::vector<float> logits_of(const Model & m, int threads = 2) {
    auto be = test::open_cpu_backend(threads);
    GenerateOptions o;
    o.prompt = {1, 5, 9, 2, 7, 3};
    o.n_generate = 8;
    o.keep_logits = true;
    return generate(m, *be, o).logits;
}

double max_rel_diff(const std::vector<float> & a, const std::vector<float> & b) {
    EXPECT_EQ(a.size(), b.size());
    double d = 0, ref = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
        d = std::max(d, double(std::fabs(a[i] - b[i])));
        ref = std::max(ref, double(std::fabs(b[i])));
    }
    return d / std::max(ref, 1e-30);
}

class GgufRoundTrip : public testing::TestWithParam<std::string> {};

TEST_P(GgufRoundTrip, WrittenFileComputesWhatTheFolderComputes) {
    const Model folder = Model::load_folder((fs::path(test::fixtures_dir()) / GetParam()).string());
    test::TempDir dir;
    const std::string path = (dir.path() / "m.gguf").string();
    write_model_gguf(folder, path, nullptr);
    const Model gguf = Model::load_path(path);
    EXPECT_TRUE(gguf.unused_tensors().empty());
    EXPECT_EQ(gguf.config().arch, folder.config().arch);
    // llama files rotate adjacent pairs of permuted rows: the same products, so (near) identical logits
    EXPECT_LE(max_rel_diff(logits_of(gguf), logits_of(folder)), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GgufRoundTrip,
                         testing::Values("llama_gqa_tied", "llama_mha_linear", "mixtral_top2", "olmoe_clip",
                                         "qwen2_moe_fused_bf16", "qwen2_moe_shared", "qwen3_moe_qknorm"));

TEST(Quantize, YarnModelsAreNotWrittenAsGguf) {
    const Model m = Model::load_folder((fs::path(test::fixtures_dir()) / "qwen3_moe_top3").string());
    test::TempDir dir;
    EXPECT_THROW(write_model_gguf(m, (dir.path() / "m.gguf").string(), nullptr), Error);
    EXPECT_FALSE(fs::exists(dir.path() / "m.gguf"));
}

TEST(Quantize, PlanReachesEveryClassAndQ8_0StaysClose) {
    Model m = Model::load_folder((fs::path(test::fixtures_dir()) / "olmoe_clip").string());
    const std::vector<float> before = logits_of(m);
    QuantizePlan plan;
    plan.experts = MOESH_DTYPE_Q8_0;
    plan.attention = MOESH_DTYPE_Q8_0;
    plan.embeddings = MOESH_DTYPE_Q8_0;
    plan.output = MOESH_DTYPE_Q8_0;
    const QuantizeReport r = quantize_model(m, plan, 2);
    EXPECT_TRUE(r.kept.empty()) << r.kept.front();
    const auto & c = m.config();
    EXPECT_EQ(r.n_quantized, 2 + c.n_layer * 4 + c.n_layer * c.n_expert * 3);
    EXPECT_EQ(m.tok_embd().type, MOESH_DTYPE_Q8_0);
    EXPECT_EQ(m.output().type, MOESH_DTYPE_Q8_0);
    EXPECT_EQ(m.layers()[1].wo.type, MOESH_DTYPE_Q8_0);
    EXPECT_EQ(m.layers()[1].router.type, MOESH_DTYPE_F32); // routers stay
    EXPECT_EQ(m.experts().get({2, 7}).down.type, MOESH_DTYPE_Q8_0);
    EXPECT_NEAR(double(r.bytes_after) / double(r.bytes_before), 34.0 / 128.0, 1e-9);
    // 8-bit weights (embeddings and output too): logits move by a few percent of
    // their range on this random model; a wrong block layout moves them by ~100%
    const double d = max_rel_diff(logits_of(m), before);
    EXPECT_GT(d, 0.0);
    EXPECT_LT(d, 6e-2);

    // a second pass does not requantize
    const QuantizeReport again = quantize_model(m, {MOESH_DTYPE_Q4_0, {}, {}, {}, {}}, 1);
    EXPECT_EQ(again.n_quantized, 0);
    ASSERT_FALSE(again.kept.empty());
    EXPECT_NE(again.kept[0].find("already q8_0"), std::string::npos) << again.kept[0];
}

TEST(Quantize, RowsThatAreNotWholeBlocksAreKeptAndReported) {
    Model m = Model::load_folder((fs::path(test::fixtures_dir()) / "mixtral_top2").string()); // hidden 48
    QuantizePlan plan;
    plan.experts = MOESH_DTYPE_Q4_0;
    const QuantizeReport r = quantize_model(m, plan, 1);
    EXPECT_EQ(r.n_quantized, 0);
    ASSERT_FALSE(r.kept.empty());
    EXPECT_NE(r.kept[0].find("rows of 48 are not whole q4_0 blocks"), std::string::npos) << r.kept[0];
    EXPECT_EQ(m.experts().get({0, 0}).gate.type, MOESH_DTYPE_F32);
}

TEST(Quantize, QuantizedGgufKeepsTheSourceTokenizerAndLoadsBack) {
    Model m = Model::load_folder((fs::path(test::fixtures_dir()) / "olmoe_clip").string());
    quantize_model(m, {MOESH_DTYPE_Q4_0, MOESH_DTYPE_Q4_1, {}, {}, {}}, 2);
    GgufWriter meta;
    meta.add_string("general.architecture", "olmoe");
    meta.add_string("general.name", "tiny");
    meta.add_string("tokenizer.ggml.model", "gpt2");
    meta.add_string_array("tokenizer.ggml.tokens", {"a", "b", "c"});
    meta.add_array<int32_t>("tokenizer.ggml.token_type", {1, 1, 3});
    meta.add_bool("tokenizer.ggml.add_bos_token", false);
    meta.add_string("olmoe.something_else", "not copied");
    const std::vector<uint8_t> image = meta.to_bytes();
    const GgufContents src = parse_gguf(image.data(), image.size(), "meta");

    test::TempDir dir;
    const std::string path = (dir.path() / "q.gguf").string();
    write_model_gguf(m, path, &src);
    const GgufFile f(path);
    EXPECT_EQ(f.get_string("general.name"), "tiny");
    EXPECT_EQ(f.get_array("tokenizer.ggml.tokens").string(2), "c");
    EXPECT_EQ(f.get_array("tokenizer.ggml.token_type").at(2).i, 3);
    EXPECT_FALSE(f.get_bool("tokenizer.ggml.add_bos_token"));
    EXPECT_EQ(f.find("olmoe.something_else"), nullptr);
    EXPECT_EQ(f.get_u32("general.file_type"), 2u); // mostly q4_0
    EXPECT_EQ(f.require_tensor("blk.0.ffn_up_exps.weight").type, GgmlType::Q4_0);
    EXPECT_EQ(f.require_tensor("blk.0.attn_q.weight").type, GgmlType::Q4_1);
    EXPECT_EQ(f.require_tensor("blk.0.ffn_gate_inp.weight").type, GgmlType::F32);

    const Model back = Model::load_path(path);
    EXPECT_EQ(max_rel_diff(logits_of(back), logits_of(m)), 0.0); // the same bytes, the same kernels
}

TEST(Quantize, TomlPlan) {
    const RunConfig rc = parse_run_config("[quantize]\nexperts = 'Q4_0'\nattention = \"q8_0\"\n", "x.toml");
    EXPECT_EQ(rc.quantize.experts, MOESH_DTYPE_Q4_0);
    EXPECT_EQ(rc.quantize.attention, MOESH_DTYPE_Q8_0);
    EXPECT_FALSE(rc.quantize.ffn.has_value());
    auto error = [](const std::string & toml) {
        try {
            parse_run_config(toml, "x.toml");
        } catch (const Error & e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_NE(error("[quantize]\nexperts = 'q3_k'\n").find("x.toml:2:"), std::string::npos);
    EXPECT_NE(error("[quantize]\nexperts = 'q3_k'\n").find("unknown quantization type 'q3_k' (supported: q8_0"),
              std::string::npos);
    EXPECT_NE(error("[quantize]\nrouter = 'q8_0'\n").find("unknown key (known: experts"), std::string::npos);
    EXPECT_NE(error("[quantize]\nexperts = 4\n").find("expected a string"), std::string::npos);
}

} // namespace
} // namespace moesh
