// moesh's logits and greedy tokens against Hugging Face transformers' for every
// fixture in tests/fixtures (made by scripts/make_fixtures.py).
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <ostream>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

namespace moesh {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> fixture_names() {
    std::vector<std::string> out;
    if (!fs::exists(test::fixtures_dir())) return out;
    for (const auto & e : fs::directory_iterator(test::fixtures_dir()))
        if (e.is_directory() && fs::exists(e.path() / "reference.json")) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
}

// Each fixture folder is checked as it is and, where scripts/make_gguf_model_fixtures.py
// converted it as llama.cpp's converter would, as model.gguf.
// threads == 0: the devsim backend (tests/plugins/devsim), i.e. the forward
// pass's device-memory path, on the reference kernels.
struct GoldenCase {
    std::string fixture;
    int threads;
    bool gguf;
};

void PrintTo(const GoldenCase & c, std::ostream * os) {
    *os << c.fixture << (c.gguf ? " (gguf)" : "") << " with "
        << (c.threads ? std::to_string(c.threads) + " thread(s)" : std::string("the device-memory path"));
}

std::string case_name(const testing::TestParamInfo<GoldenCase> & info) {
    return info.param.fixture + (info.param.gguf ? "_gguf" : "") +
           (info.param.threads ? "_threads" + std::to_string(info.param.threads) : std::string("_devsim"));
}

std::vector<GoldenCase> golden_cases() {
    std::vector<GoldenCase> out;
    for (const auto & f : fixture_names())
        for (bool gguf : {false, true})
            if (!gguf || fs::exists(fs::path(test::fixtures_dir()) / f / "model.gguf"))
                for (int t : {1, 2, 0}) out.push_back({f, t, gguf});
    return out;
}

class GoldenTest : public testing::TestWithParam<GoldenCase> {};

// Relative error of a logits row: max |ours - ref| / max |ref|. Logits of
// random tiny models are O(1..10); this compares on the row's scale rather
// than per element, where values near zero make relative error meaningless.
TEST_P(GoldenTest, LogitsAndGreedyTokensMatchTransformers) {
    const fs::path dir = fs::path(test::fixtures_dir()) / GetParam().fixture;
    std::ifstream in(dir / "reference.json");
    const nlohmann::json ref = nlohmann::json::parse(in);

    Model model = GetParam().gguf ? Model::load_path((dir / "model.gguf").string()) : Model::load_folder(dir.string());
    auto backend = GetParam().threads ? test::open_cpu_backend(GetParam().threads) : test::open_devsim_backend();
    ASSERT_NE(backend, nullptr);
    const int64_t n_vocab = model.config().n_vocab;

    const auto & prompts = ref.at("prompts");
    ASSERT_FALSE(prompts.empty());
    for (size_t p = 0; p < prompts.size(); ++p) {
        SCOPED_TRACE("prompt " + std::to_string(p));
        GenerateOptions o;
        o.prompt = prompts[p].get<std::vector<int32_t>>();
        const auto expected = ref.at("generated")[p].get<std::vector<int32_t>>();
        ASSERT_GE(expected.size(), 32u);
        o.n_generate = int64_t(expected.size());
        o.keep_logits = true;
        o.max_batch = 5; // prompts longer than 5 exercise chunked prefill
        GenerateResult r = generate(model, *backend, o);

        EXPECT_EQ(r.tokens, expected);

        NpyArray want = read_npy_f32(dir / ("prompt" + std::to_string(p) + ".logits.npy"));
        ASSERT_EQ(want.shape.size(), 2u);
        ASSERT_EQ(want.shape[1], n_vocab);
        ASSERT_EQ(want.shape[0], r.n_logit_rows);
        double worst = 0.0;
        int64_t worst_row = -1;
        for (int64_t row = 0; row < r.n_logit_rows; ++row) {
            const float * a = r.logits.data() + row * n_vocab;
            const float * b = want.data.data() + row * n_vocab;
            double max_diff = 0.0, max_ref = 0.0;
            for (int64_t i = 0; i < n_vocab; ++i) {
                max_diff = std::max(max_diff, double(std::fabs(a[i] - b[i])));
                max_ref = std::max(max_ref, double(std::fabs(b[i])));
            }
            const double rel = max_diff / std::max(max_ref, 1e-30);
            if (rel > worst) {
                worst = rel;
                worst_row = row;
            }
        }
        EXPECT_LE(worst, 1e-4) << "worst logits row " << worst_row << " of " << r.n_logit_rows;
        RecordProperty("max_rel_error_prompt" + std::to_string(p), std::to_string(worst));
        std::printf("[ golden   ] %s%s threads=%d prompt=%zu rows=%lld max_rel_error=%.3g\n", GetParam().fixture.c_str(),
                    GetParam().gguf ? " (gguf)" : "", GetParam().threads, p, (long long)r.n_logit_rows, worst);
    }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, testing::ValuesIn(golden_cases()), case_name);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(GoldenTest);

TEST(GoldenFixtures, EveryArchitectureHasAFixture) {
    std::set<std::string> archs;
    for (const auto & f : fixture_names()) {
        std::ifstream in(fs::path(test::fixtures_dir()) / f / "config.json");
        archs.insert(nlohmann::json::parse(in).at("architectures")[0].get<std::string>());
    }
    for (const char * a : {"LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                           "OlmoeForCausalLM"})
        EXPECT_TRUE(archs.count(a)) << "no fixture for " << a;
}

} // namespace
} // namespace moesh
