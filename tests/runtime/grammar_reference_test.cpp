// The grammar engine against llama.cpp's (tests/fixtures/grammar/masks.json, made by
// scripts/make_grammar_references.py): for 15 grammars and two vocabularies, the set of tokens
// allowed at every step of text and random walks; and the shipped model's greedy tokens under a
// grammar (transformers' logits masked by llama.cpp) through generate() and the scheduler.
//
// Where moesh differs on purpose, the expected set is llama.cpp's minus: control tokens that do
// not end generation (llama.cpp matches their text; those a grammar references by <[id]> or
// <text> are compared), the walk's `lax` ids (bytes strict UTF-8
// refuses) and pieces holding a NUL (llama.cpp refuses them too); and end tokens while the text
// ends inside a UTF-8 character (llama.cpp allows the end if the grammar was complete before it).
#include "runtime/generate.h"
#include "runtime/gguf.h"
#include "runtime/grammar.h"
#include "runtime/model.h"
#include "runtime/scheduler.h"
#include "runtime/tokenizer.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>

namespace moesh {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const json & masks() {
    static const json j = [] {
        std::ifstream in(fs::path(MOESH_SOURCE_DIR) / "tests/fixtures/grammar/masks.json");
        return json::parse(in);
    }();
    return j;
}

std::vector<uint8_t> expand_ranges(const json & ranges, int64_t n) {
    std::vector<uint8_t> out(size_t(n), 0);
    for (const auto & r : ranges)
        for (int64_t i = r.at(0).get<int64_t>(); i < r.at(1).get<int64_t>(); ++i) out[size_t(i)] = 1;
    return out;
}

std::string hex(const std::string & bytes) {
    static const char * d = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) out += d[c >> 4], out += d[c & 15];
    return out;
}

// Whether bytes end with a UTF-8 character still missing continuation bytes.
bool ends_mid_character(const std::string & bytes) {
    size_t i = bytes.size(), k = 0;
    while (i > 0 && k < 3 && (uint8_t(bytes[i - 1]) & 0xC0) == 0x80) --i, ++k;
    if (i == 0) return false;
    const auto lead = uint8_t(bytes[i - 1]);
    const size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    return k < need;
}

void check_vocab(const std::string & name, const Tokenizer & tok) {
    const json * vocab = nullptr;
    for (const auto & v : masks().at("vocabs"))
        if (v.at("name") == name) vocab = &v;
    ASSERT_NE(vocab, nullptr) << name;
    const int64_t n = vocab->at("n_vocab").get<int64_t>();
    ASSERT_EQ(tok.n_vocab(), n);
    const auto eog = vocab->at("eog").get<std::vector<int32_t>>();
    std::vector<uint8_t> skip(size_t(n), 0);   // control tokens that do not end generation, NUL pieces
    for (int32_t id : vocab->at("control").get<std::vector<int32_t>>())
        if (std::find(eog.begin(), eog.end(), id) == eog.end()) skip[size_t(id)] = 1;
    for (int32_t id : vocab->at("nul_pieces").get<std::vector<int32_t>>()) skip[size_t(id)] = 1;
    std::vector<std::vector<uint8_t>> table;
    for (const auto & m : vocab->at("mask_table")) table.push_back(expand_ranges(m, n));

    const auto shared = std::make_shared<const GrammarVocab>(tok);
    int64_t steps = 0, compared_allowed = 0;
    for (const auto & g : masks().at("grammars")) {
        std::string err;
        const auto grammar = Grammar::parse(g.at("text").get<std::string>(), &err);
        ASSERT_TRUE(grammar) << g.at("name") << ": " << err;
        if (!g.at("walks").contains(name)) continue;   // a grammar for the other vocabulary
        // the control tokens the grammar references are compared too: both engines let them through
        std::vector<uint8_t> skip_here = skip;
        if (g.contains("token_refs") && g.at("token_refs").contains(name))
            for (int32_t id : g.at("token_refs").at(name).get<std::vector<int32_t>>()) skip_here[size_t(id)] = 0;
        for (const auto & w : g.at("walks").at(name)) {
            const std::string where = g.at("name").get<std::string>() + " " + w.at("kind").get<std::string>() + " walk";
            GrammarMatcher m(grammar, shared, eog);
            const auto tokens = w.at("tokens").get<std::vector<int32_t>>();
            const auto & steps_masks = w.at("masks");
            ASSERT_EQ(steps_masks.size(), tokens.size() + 1) << where;
            std::vector<uint8_t> got;
            std::string text;
            for (size_t i = 0; i <= tokens.size(); ++i) {
                const bool mid_character = ends_mid_character(text);
                std::vector<uint8_t> want = table[steps_masks.at(i).get<size_t>()];
                if (w.contains("lax"))
                    for (size_t id = 0; const uint8_t x : expand_ranges(w.at("lax").at(i), n)) want[id++] &= uint8_t(!x);
                m.fill_allowed(&got);
                int64_t diffs = 0;
                std::string first;
                for (int64_t id = 0; id < n; ++id) {
                    if (skip_here[size_t(id)]) continue;
                    if (mid_character && std::find(eog.begin(), eog.end(), id) != eog.end()) continue;
                    if (bool(got[size_t(id)]) != bool(want[size_t(id)])) {
                        if (diffs++ == 0)
                            first = "token " + std::to_string(id) + " '" + hex(tok.token_to_piece(int32_t(id))) + "' moesh " +
                                    (got[size_t(id)] ? "allows" : "refuses");
                    }
                    compared_allowed += want[size_t(id)];
                }
                ASSERT_EQ(diffs, 0) << where << ", step " << i << ": " << diffs << " tokens differ, first " << first;
                ++steps;
                if (i == tokens.size()) break;
                ASSERT_EQ(hex(tok.token_to_piece(tokens[i])), w.at("pieces").at(i).get<std::string>()) << where << ", step " << i;
                ASSERT_TRUE(m.accept(tokens[i])) << where << ", step " << i;
                text += tok.token_to_piece(tokens[i]);
            }
        }
    }
    EXPECT_GT(steps, 300);
    EXPECT_GT(compared_allowed, 100000);
}

TEST(GrammarReference, MasksEqualLlamaCppOnTheShippedVocabulary) {
    check_vocab("moesh-tiny-py", load_tokenizer_json_file(std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py/tokenizer.json"));
}

TEST(GrammarReference, MasksEqualLlamaCppOnSmolLM2sVocabulary) {
    const std::string path = std::string(MOESH_SOURCE_DIR) + "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    ASSERT_TRUE(fs::exists(path)) << path << " is missing: run scripts/fetch_test_models (scripts/setup does)";
    const GgufFile f(path);
    check_vocab("SmolLM2-135M-Instruct", load_tokenizer_gguf(f, path));
}

// transformers' logits, llama.cpp's masks, argmax: the tokens moesh generates under the grammar.
TEST(GrammarReference, ShippedModelGreedyUnderAGrammarEqualsTransformersWithLlamaCppMasks) {
    const json & greedy = masks().at("greedy");
    const std::string dir = std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py";
    const Model model = Model::load_folder(dir);
    const Tokenizer tok = load_tokenizer_json_file(dir + "/tokenizer.json");
    const auto vocab = std::make_shared<const GrammarVocab>(tok);
    std::map<std::string, std::shared_ptr<const Grammar>> grammars;
    for (const auto & g : masks().at("grammars")) {
        std::string err;
        grammars[g.at("name").get<std::string>()] = Grammar::parse(g.at("text").get<std::string>(), &err);
    }
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 64;
    so.kv_blocks = 128;
    Scheduler sched(model, *be, so);
    struct Want { std::vector<int32_t> tokens; FinishReason why; std::string name; };
    std::map<uint64_t, Want> want;
    std::map<uint64_t, std::pair<std::vector<int32_t>, FinishReason>> got;
    const std::vector<int32_t> eos = {0};
    for (const auto & run : greedy.at("runs")) {
        const auto & grammar = grammars.at(run.at("grammar").get<std::string>());
        const auto prompt = run.at("prompt_ids").get<std::vector<int32_t>>();
        const auto expected = run.at("tokens").get<std::vector<int32_t>>();
        const std::string ended = run.at("ended").get<std::string>();
        const int64_t n = greedy.at("n_generate").get<int64_t>();
        const std::string name = run.at("grammar").get<std::string>() + " after " + std::to_string(prompt.size()) + " prompt tokens";

        GenerateOptions o;
        o.prompt = prompt;
        o.n_generate = n;
        o.stop_at_eos = true;
        o.grammar = std::make_shared<GrammarMatcher>(grammar, vocab, eos);
        EXPECT_EQ(generate(model, *be, o).tokens, expected) << "generate(), " << name;

        GenRequest r;
        r.prompt = prompt;
        r.max_tokens = n;
        r.stop_ids = eos;
        r.grammar = std::make_shared<GrammarMatcher>(grammar, vocab, eos);
        r.on_done = [&got](uint64_t h, FinishReason why, const std::vector<int32_t> & toks, const RequestTimings &) {
            got[h] = {toks, why};
        };
        uint64_t h = 0;
        ASSERT_EQ(sched.submit(std::move(r), &h), Admit::Queued);
        // eog_only: the grammar was complete with nothing to follow, so moesh ends the request there.
        want[h] = {expected, ended == "length" ? FinishReason::Length : ended == "eog_only" ? FinishReason::Stop : FinishReason::Eos, name};
    }
    while (!sched.idle()) sched.step();
    for (const auto & [h, w] : want) {
        EXPECT_EQ(got[h].first, w.tokens) << "scheduler, " << w.name;
        EXPECT_EQ(int(got[h].second), int(w.why)) << "scheduler, " << w.name;
    }
}

} // namespace
} // namespace moesh
