// The model shipped in models/moesh-tiny-py against Hugging Face transformers'
// outputs on it (tests/fixtures/shipped/moesh-tiny-py, written by
// scripts/make_shipped_model_references.py): tokenizer ids, greedy tokens,
// logits, log-probabilities of served tokens, and llama.cpp-style perplexity on
// its held-out text.
// MOESH_SHIPPED_MODEL / MOESH_SHIPPED_REFERENCE point it at another pair.
#include "runtime/generate.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "runtime/perplexity.h"
#include "runtime/scheduler.h"
#include "runtime/tokenizer.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
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
    for (const int32_t kv_type : {MOESH_DTYPE_F32, MOESH_DTYPE_F16, MOESH_DTYPE_Q8_0})
    for (size_t i = 0; i < ref.at("prompts").size(); ++i) {
        SCOPED_TRACE("prompt " + std::to_string(i) + ", " + kv_type_name(kv_type) + " KV cache");
        const auto & p = ref.at("prompts")[i];
        GenerateOptions o;
        o.prompt = p.at("ids").get<std::vector<int32_t>>();
        const auto expected = p.at("generated").get<std::vector<int32_t>>();
        o.n_generate = int64_t(expected.size());
        o.keep_logits = true;
        o.kv_type = kv_type;
        const GenerateResult r = generate(model, *be, o);
        const NpyArray want = read_npy_f32(k_ref / ("prompt" + std::to_string(i) + ".logits.npy"));
        ASSERT_EQ(want.shape.size(), 2u);
        ASSERT_EQ(want.shape[0], r.n_logit_rows);
        ASSERT_EQ(want.shape[1], n_vocab);
        // Rows compared: all of them, or with a q8_0 cache up to a step where transformers' best two
        // logits are within 1% of the row's largest and moesh took the second (a near tie that the
        // cache's rounding may flip; the rows after it continue another text).
        int64_t n_rows = r.n_logit_rows;
        ASSERT_EQ(r.tokens.size(), expected.size());
        const size_t first_diff = size_t(std::mismatch(r.tokens.begin(), r.tokens.end(), expected.begin()).first - r.tokens.begin());
        if (first_diff < expected.size()) {
            ASSERT_EQ(kv_type, MOESH_DTYPE_Q8_0) << "generated token " << first_diff << " differs";
            const int64_t row = int64_t(o.prompt.size()) - 1 + int64_t(first_diff);
            const float * w = want.data.data() + size_t(row * n_vocab);
            const int32_t best = int32_t(std::max_element(w, w + n_vocab) - w);
            float second = -INFINITY, top = 0;
            for (int64_t v = 0; v < n_vocab; ++v) {
                top = std::max(top, std::fabs(w[v]));
                if (v != best) second = std::max(second, w[v]);
            }
            EXPECT_EQ(w[r.tokens[first_diff]], second) << "step " << first_diff << ": moesh took neither of the best two";
            EXPECT_LT(w[best] - second, 0.01f * top) << "step " << first_diff << " is no near tie";
            std::printf("[ shipped  ] prompt %zu, q8_0 KV cache: token %zu of %zu took transformers' second best "
                        "(logits %.4f apart of %.2f)\n", i, first_diff, expected.size(), double(w[best] - second), double(top));
            n_rows = row + 1;
        }
        double worst = 0;
        for (int64_t row = 0; row < n_rows; ++row) {
            double diff = 0, scale = 0;
            for (int64_t v = 0; v < n_vocab; ++v) {
                const size_t k = size_t(row * n_vocab + v);
                diff = std::max(diff, double(std::fabs(r.logits[k] - want.data[k])));
                scale = std::max(scale, double(std::fabs(want.data[k])));
            }
            worst = std::max(worst, diff / std::max(scale, 1e-30));
        }
        // q8_0 keeps 8 bits a value and a scale per 32 (a relative step of 1/127 of the block's largest)
        EXPECT_LE(worst, kv_type == MOESH_DTYPE_Q8_0 ? 1e-2 : kv_type == MOESH_DTYPE_F16 ? 1e-3 : 1e-4);
        std::printf("[ shipped  ] prompt %zu, %s KV cache: %lld rows, max relative logit error %.3g\n", i,
                    kv_type_name(kv_type), (long long)n_rows, worst);
    }
}

// log(sum(exp(row))) in double: a reference log-softmax is row[t] minus this.
double log_sum_exp(const float * row, int64_t n) {
    double mx = row[0], z = 0;
    for (int64_t v = 1; v < n; ++v) mx = std::max(mx, double(row[v]));
    for (int64_t v = 0; v < n; ++v) z += std::exp(double(row[v]) - mx);
    return mx + std::log(z);
}

// The scheduler's logprobs (every prompt in one batch) are the log-softmax of transformers'
// logits at each generated position: the sampled token's value and the 5 most likely, in order.
TEST(ShippedModel, ServedLogprobsEqualTransformersLogSoftmax) {
    const nlohmann::json ref = reference();
    const Model model = Model::load_folder(k_model.string());
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    const int64_t n_vocab = model.config().n_vocab;
    SchedulerOptions so;
    so.max_batch = 48;   // prompts in chunks beside the others' decodes
    so.kv_blocks = 64;
    Scheduler sched(model, *be, so);
    const size_t n_prompts = ref.at("prompts").size();
    std::vector<std::vector<std::pair<int32_t, TokenLogprobs>>> got(n_prompts);
    std::map<uint64_t, size_t> which;
    constexpr int32_t k_top = 5;
    for (size_t i = 0; i < n_prompts; ++i) {
        GenRequest r;
        r.prompt = ref.at("prompts")[i].at("ids").get<std::vector<int32_t>>();
        r.max_tokens = int64_t(ref.at("prompts")[i].at("generated").size());
        r.logprobs = k_top;
        r.on_token = [&got, &which](uint64_t h, int32_t t, const TokenLogprobs * lp) {
            EXPECT_NE(lp, nullptr);
            if (lp) got[which.at(h)].push_back({t, *lp});
            return true;
        };
        uint64_t h = 0;
        ASSERT_EQ(sched.submit(std::move(r), &h), Admit::Queued);
        which[h] = i;
    }
    while (!sched.idle()) sched.step();
    double worst = 0;
    for (size_t i = 0; i < n_prompts; ++i) {
        SCOPED_TRACE("prompt " + std::to_string(i));
        const auto & p = ref.at("prompts")[i];
        const auto expected = p.at("generated").get<std::vector<int32_t>>();
        const int64_t n_prompt = int64_t(p.at("ids").size());
        const NpyArray logits = read_npy_f32(k_ref / ("prompt" + std::to_string(i) + ".logits.npy"));
        ASSERT_EQ(got[i].size(), expected.size());
        for (size_t j = 0; j < expected.size(); ++j) {
            const auto & [tok, lp] = got[i][j];
            EXPECT_EQ(tok, expected[j]);
            const float * row = logits.data.data() + size_t(n_prompt - 1 + int64_t(j)) * size_t(n_vocab);
            const double lse = log_sum_exp(row, n_vocab);
            auto ref_lp = [&](int32_t t) { return double(row[t]) - lse; };
            std::vector<int32_t> order(static_cast<size_t>(n_vocab));
            for (int64_t v = 0; v < n_vocab; ++v) order[size_t(v)] = int32_t(v);
            std::partial_sort(order.begin(), order.begin() + k_top + 1, order.end(),
                              [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
            worst = std::max(worst, std::fabs(lp.logprob - ref_lp(tok)));
            ASSERT_EQ(lp.n_top, k_top);
            for (int32_t k = 0; k < k_top; ++k) {
                worst = std::max(worst, std::fabs(lp.top_logprobs[k] - ref_lp(order[size_t(k)])));
                // the same ids, unless two candidates are too close for float logits to order
                const bool clear = (k == 0 || ref_lp(order[size_t(k - 1)]) - ref_lp(order[size_t(k)]) > 1e-3) &&
                                   ref_lp(order[size_t(k)]) - ref_lp(order[size_t(k + 1)]) > 1e-3;
                if (clear) {
                    EXPECT_EQ(lp.top_ids[k], order[size_t(k)]) << "step " << j << ", rank " << k;
                }
            }
        }
    }
    EXPECT_LE(worst, 2e-4);
    std::printf("[ shipped  ] served logprobs: max |moesh - transformers| %.3g\n", worst);
}

// Scoring a prompt (max_tokens 0) gives each of its tokens the log-softmax of transformers'
// logits at the position before: the fixture's whole sequence, in chunks beside another request
// that generates, twice over (the second time its blocks are cached: it computes them anyway).
TEST(ShippedModel, PromptLogprobsEqualTransformersLogSoftmax) {
    const nlohmann::json ref = reference();
    const Model model = Model::load_folder(k_model.string());
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    const int64_t n_vocab = model.config().n_vocab;
    SchedulerOptions so;
    so.max_batch = 16;
    so.prefill_chunk = 7;
    so.kv_blocks = 64;
    Scheduler sched(model, *be, so);
    const auto & p = ref.at("prompts")[1];
    std::vector<int32_t> seq = p.at("ids").get<std::vector<int32_t>>();
    const auto generated = p.at("generated").get<std::vector<int32_t>>();
    seq.insert(seq.end(), generated.begin(), generated.end() - 1);   // the fixture's logits rows cover these
    const NpyArray logits = read_npy_f32(k_ref / "prompt1.logits.npy");
    ASSERT_EQ(logits.shape.at(0), int64_t(seq.size()));
    double worst = 0;
    for (int round = 0; round < 2; ++round) {
        GenRequest other;   // decodes while the prompt is scored
        other.prompt = ref.at("prompts")[0].at("ids").get<std::vector<int32_t>>();
        other.max_tokens = 12;
        uint64_t h_other = 0, h = 0;
        ASSERT_EQ(sched.submit(std::move(other), &h_other), Admit::Queued);
        std::vector<std::pair<int64_t, TokenLogprobs>> got;
        int done = 0;
        GenRequest r;
        r.prompt = seq;
        r.max_tokens = 0;
        r.prompt_logprobs = 3;
        r.on_token = [](uint64_t, int32_t, const TokenLogprobs *) {
            ADD_FAILURE() << "a scoring request generated a token";
            return true;
        };
        r.on_prompt_logprobs = [&got](uint64_t, int64_t pos, const TokenLogprobs & lp) { got.push_back({pos, lp}); };
        r.on_done = [&done](uint64_t, FinishReason why, const std::vector<int32_t> & toks, const RequestTimings &) {
            EXPECT_EQ(why, FinishReason::Length);
            EXPECT_TRUE(toks.empty());
            ++done;
        };
        ASSERT_EQ(sched.submit(std::move(r), &h), Admit::Queued);
        while (!sched.idle()) sched.step();
        EXPECT_EQ(done, 1);
        ASSERT_EQ(got.size(), seq.size() - 1);
        for (size_t k = 0; k < got.size(); ++k) {
            const auto & [pos, lp] = got[k];
            ASSERT_EQ(pos, int64_t(k + 1));
            const float * row = logits.data.data() + size_t(pos - 1) * size_t(n_vocab);
            const double lse = log_sum_exp(row, n_vocab);
            const double want = double(row[seq[size_t(pos)]]) - lse;
            worst = std::max(worst, std::fabs(lp.logprob - want));
            ASSERT_EQ(lp.n_top, 3);
            EXPECT_NEAR(lp.top_logprobs[0], double(row[lp.top_ids[0]]) - lse, 2e-4);
        }
    }
    EXPECT_LE(worst, 2e-4);
    std::printf("[ shipped  ] prompt logprobs over %zu tokens: max |moesh - transformers| %.3g\n", seq.size(), worst);
}

// Greedy tokens under penalties and a logit bias equal those of transformers' logits with its
// sequence-bias and repetition-penalty processors and llama.cpp's frequency/presence sampler (penalties.json, written by
// scripts/make_penalty_references.py), through generate() and through the scheduler, every
// case and prompt in one batch.
TEST(ShippedModel, PenalisedGreedyTokensEqualTransformersAndLlamaCpp) {
    std::ifstream in(k_ref / "penalties.json");
    ASSERT_TRUE(in.good()) << k_ref / "penalties.json";
    const nlohmann::json ref = nlohmann::json::parse(in);
    const Model model = Model::load_folder(k_model.string());
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 64;
    so.kv_blocks = 128;
    Scheduler sched(model, *be, so);
    std::map<uint64_t, std::pair<std::vector<int32_t>, std::string>> want, got;
    for (const auto & c : ref.at("cases")) {
        SamplerParams sp;
        sp.repetition_penalty = c.at("repetition_penalty").get<float>();
        sp.frequency_penalty = c.at("frequency_penalty").get<float>();
        sp.presence_penalty = c.at("presence_penalty").get<float>();
        for (const auto & b : c.at("logit_bias")) sp.logit_bias.push_back({b.at(0).get<int32_t>(), b.at(1).get<float>()});
        const std::string name = c.dump().substr(0, 90);
        for (const auto & p : c.at("prompts")) {
            const auto ids = p.at("ids").get<std::vector<int32_t>>();
            const auto expected = p.at("generated").get<std::vector<int32_t>>();
            GenerateOptions o;
            o.prompt = ids;
            o.n_generate = int64_t(expected.size());
            o.sampling = sp;
            EXPECT_EQ(generate(model, *be, o).tokens, expected) << "generate(), " << name;
            GenRequest r;
            r.prompt = ids;
            r.max_tokens = int64_t(expected.size());
            r.sampling = sp;
            r.on_done = [&got](uint64_t h, FinishReason, const std::vector<int32_t> & toks, const RequestTimings &) {
                got[h].first = toks;
            };
            uint64_t h = 0;
            ASSERT_EQ(sched.submit(std::move(r), &h), Admit::Queued);
            want[h] = {expected, name};
        }
    }
    while (!sched.idle()) sched.step();
    for (const auto & [h, w] : want) EXPECT_EQ(got[h].first, w.first) << "scheduler, " << w.second;
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
