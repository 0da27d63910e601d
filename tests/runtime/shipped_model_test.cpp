// The model shipped in models/moesh-tiny-py against Hugging Face transformers'
// outputs on it (tests/fixtures/shipped/moesh-tiny-py, written by
// scripts/make_shipped_model_references.py): tokenizer ids, greedy tokens,
// logits, and llama.cpp-style perplexity on its held-out text.
// MOESH_SHIPPED_MODEL / MOESH_SHIPPED_REFERENCE point it at another pair.
#include "runtime/generate.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "runtime/perplexity.h"
#include "runtime/tokenizer.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace moesh {
namespace {

namespace fs = std::filesystem;

fs::path env_or(const char * name, const std::string & fallback) {
    const char * v = std::getenv(name);
    return v && *v ? fs::path(v) : fs::path(fallback);
}

const fs::path k_model = env_or("MOESH_SHIPPED_MODEL", std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py");
const fs::path k_ref = env_or("MOESH_SHIPPED_REFERENCE", std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/shipped/moesh-tiny-py");

nlohmann::json reference() {
    std::ifstream in(k_ref / "reference.json");
    EXPECT_TRUE(in.good()) << k_ref / "reference.json";
    return nlohmann::json::parse(in);
}

std::string read_bytes(const fs::path & p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

TEST(ShippedModel, TokenizerGivesTransformersIds) {
    const nlohmann::json ref = reference();
    const Tokenizer tok = load_tokenizer_json_file((k_model / "tokenizer.json").string());
    for (const auto & p : ref.at("prompts"))
        EXPECT_EQ(tok.encode(p.at("text").get<std::string>(), /*add_special=*/true), p.at("ids").get<std::vector<int32_t>>())
            << p.at("text");
}

// With the f32 KV cache within 1e-4 of transformers' logits; with an f16 one (--kv-type f16),
// whose keys and values are rounded to 11 significant bits, within 1e-3, and the same tokens.
TEST(ShippedModel, GreedyTokensAndLogitsEqualTransformers) {
    const nlohmann::json ref = reference();
    const Model model = Model::load_folder(k_model.string());
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    const int64_t n_vocab = model.config().n_vocab;
    for (const int32_t kv_type : {MOESH_DTYPE_F32, MOESH_DTYPE_F16})
    for (size_t i = 0; i < ref.at("prompts").size(); ++i) {
        SCOPED_TRACE("prompt " + std::to_string(i) + (kv_type == MOESH_DTYPE_F16 ? ", f16 KV cache" : ""));
        const auto & p = ref.at("prompts")[i];
        GenerateOptions o;
        o.prompt = p.at("ids").get<std::vector<int32_t>>();
        const auto expected = p.at("generated").get<std::vector<int32_t>>();
        o.n_generate = int64_t(expected.size());
        o.keep_logits = true;
        o.kv_type = kv_type;
        const GenerateResult r = generate(model, *be, o);
        EXPECT_EQ(r.tokens, expected);
        const NpyArray want = read_npy_f32(k_ref / ("prompt" + std::to_string(i) + ".logits.npy"));
        ASSERT_EQ(want.shape.size(), 2u);
        ASSERT_EQ(want.shape[0], r.n_logit_rows);
        ASSERT_EQ(want.shape[1], n_vocab);
        double worst = 0;
        for (int64_t row = 0; row < r.n_logit_rows; ++row) {
            double diff = 0, scale = 0;
            for (int64_t v = 0; v < n_vocab; ++v) {
                const size_t k = size_t(row * n_vocab + v);
                diff = std::max(diff, double(std::fabs(r.logits[k] - want.data[k])));
                scale = std::max(scale, double(std::fabs(want.data[k])));
            }
            worst = std::max(worst, diff / std::max(scale, 1e-30));
        }
        EXPECT_LE(worst, kv_type == MOESH_DTYPE_F16 ? 1e-3 : 1e-4);
        std::printf("[ shipped  ] prompt %zu, %s KV cache: %lld rows, max relative logit error %.3g\n", i,
                    kv_type_name(kv_type), (long long)r.n_logit_rows, worst);
    }
}

TEST(ShippedModel, PerplexityOnHeldOutTextEqualsTransformers) {
    const nlohmann::json ref = reference();
    const auto & pr = ref.at("perplexity");
    const Model model = Model::load_folder(k_model.string());
    const Tokenizer tok = load_tokenizer_json_file((k_model / "tokenizer.json").string());
    std::string text = read_bytes(k_model / pr.at("file").get<std::string>());
    if (!text.empty() && text.back() == '\n') text.pop_back();   // as llama.cpp's tool
    PerplexityOptions o;
    o.n_ctx = pr.at("n_ctx").get<int64_t>();
    o.n_chunks = pr.at("n_chunks").get<int64_t>();
    o.add_bos = pr.at("bos_added").get<bool>();
    o.bos_id = tok.bos_id();
    const std::vector<int32_t> tokens = tok.encode(text, o.add_bos);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    const PerplexityResult r = perplexity(model, *be, tokens, o);
    EXPECT_EQ(r.n_scored, pr.at("n_scored").get<int64_t>());
    const double want = pr.at("ppl").get<double>();
    EXPECT_NEAR(r.ppl, want, 1e-4 * want);
    std::printf("[ shipped  ] perplexity %.6f, transformers %.6f\n", r.ppl, want);
}

} // namespace
} // namespace moesh
