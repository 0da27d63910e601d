// moesh::perplexity against transformers' logits: the first chunk of a token
// stream sees exactly what the golden fixtures' reference run saw, so its
// score follows from the committed logits (llama.cpp's definition, spelled out
// in perplexity.h). The end-to-end check against llama.cpp's own tool is the
// SmolLM2 test.
#include "runtime/error.h"
#include "runtime/npy.h"
#include "runtime/perplexity.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

namespace moesh {
namespace {

namespace fs = std::filesystem;

TEST(Perplexity, FirstChunkMatchesTransformersLogits) {
    const fs::path dir = fs::path(test::fixtures_dir()) / "mixtral_top2";
    std::ifstream in(dir / "reference.json");
    const nlohmann::json ref = nlohmann::json::parse(in);
    // prompt 2 and its greedy continuation: the sequence the reference logits belong to
    std::vector<int32_t> seq = ref.at("prompts")[2].get<std::vector<int32_t>>();
    for (int32_t t : ref.at("generated")[2].get<std::vector<int32_t>>()) seq.push_back(t);
    const NpyArray logits = read_npy_f32(dir / "prompt2.logits.npy");
    const int64_t n_vocab = logits.shape[1];
    const int64_t n_ctx = 20;
    ASSERT_GE(int64_t(seq.size()), 2 * n_ctx);

    double nll = 0;
    int64_t count = 0;
    for (int64_t j = n_ctx / 2; j < n_ctx - 1; ++j) {
        const float * row = logits.data.data() + j * n_vocab;
        double mx = row[0], sum = 0;
        for (int64_t v = 1; v < n_vocab; ++v) mx = std::max<double>(mx, row[v]);
        for (int64_t v = 0; v < n_vocab; ++v) sum += std::exp(row[v] - mx);
        nll -= row[seq[size_t(j + 1)]] - mx - std::log(sum);
        ++count;
    }
    const double want = std::exp(nll / double(count));

    Model model = Model::load_folder(dir.string());
    auto be = test::open_cpu_backend(2);
    PerplexityOptions o;
    o.n_ctx = n_ctx;
    o.n_batch = 7; // several forward steps per chunk
    int64_t calls = 0;
    o.on_chunk = [&](int64_t, double) { ++calls; };
    const PerplexityResult r = perplexity(model, *be, seq, o);
    ASSERT_EQ(r.n_chunks, int64_t(seq.size()) / n_ctx);
    EXPECT_EQ(calls, r.n_chunks);
    EXPECT_EQ(r.n_scored, r.n_chunks * (n_ctx / 2 - 1));
    EXPECT_EQ(r.n_evaluated, r.n_chunks * n_ctx);
    EXPECT_NEAR(r.running[0], want, 1e-4 * want);
    EXPECT_GT(r.ppl_error, 0);
    std::printf("[ ppl      ] first chunk %.6f (from transformers logits %.6f), all %lld chunks %.4f +/- %.4f\n",
                r.running[0], want, (long long)r.n_chunks, r.ppl, r.ppl_error);

    o.n_chunks = 1;
    EXPECT_EQ(perplexity(model, *be, seq, o).n_chunks, 1);
}

TEST(Perplexity, RefusesWhatItCannotScore) {
    Model model = Model::load_folder((fs::path(test::fixtures_dir()) / "mixtral_top2").string());
    auto be = test::open_cpu_backend(1);
    auto error = [&](std::vector<int32_t> toks, PerplexityOptions o) -> std::string {
        try {
            perplexity(model, *be, toks, o);
        } catch (const Error & e) {
            return e.what();
        }
        return "(ok)";
    };
    PerplexityOptions o;
    o.n_ctx = 8;
    EXPECT_NE(error(std::vector<int32_t>(15, 1), o).find("at least 16"), std::string::npos);
    EXPECT_NE(error(std::vector<int32_t>(16, 999), o).find("outside the vocabulary"), std::string::npos);
    o.add_bos = true;
    EXPECT_NE(error(std::vector<int32_t>(16, 1), o).find("BOS"), std::string::npos);
    o.add_bos = false;
    o.n_ctx = 100000;
    EXPECT_NE(error(std::vector<int32_t>(16, 1), o).find("exceeds the model"), std::string::npos);
    o.n_ctx = 8;
    EXPECT_EQ(error(std::vector<int32_t>(16, 1), o), "(ok)");
}

} // namespace
} // namespace moesh
