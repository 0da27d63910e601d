// Tokenizers loaded from GGUF metadata against the ids Hugging Face
// `tokenizers` (and, for the SentencePiece family, `sentencepiece` itself)
// gives the same vocabulary: tests/fixtures/tokenizers/<flavour>/tokenizer.gguf
// is written by scripts/make_tokenizer_fixtures.py as llama.cpp's
// convert_hf_to_gguf.py writes it. Malformed metadata is built in memory.
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/gguf_writer.h"
#include "runtime/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <sstream>

namespace moesh {
namespace {

using json = nlohmann::json;

std::string fixture_dir(const std::string & flavour) {
    return std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/tokenizers/" + flavour;
}

json read_cases(const std::string & flavour) {
    std::ifstream in(fixture_dir(flavour) + "/cases.json", std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return json::parse(ss.str());
}

std::string show(const std::vector<int32_t> & ids) {
    std::string s;
    for (int32_t id : ids) s += std::to_string(id) + " ";
    return s;
}

// GGUF keeps no added-token flags (lstrip, rstrip, single_word,
// normalized): llama.cpp matches control and user-defined tokens anywhere,
// so only texts with gpt2's flagged tokens (<mask>, [NEW], hello_world)
// may tokenize differently from tokenizers'.
bool uses_added_token_flags(const std::string & flavour, const std::string & text) {
    if (flavour != "gpt2") return false;
    for (const char * t : {"<mask>", "[NEW]", "hello_world"})
        if (text.find(t) != std::string::npos) return true;
    return false;
}

class GgufTokenizerFixture : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        file_ = std::make_unique<GgufFile>(fixture_dir(GetParam()) + "/tokenizer.gguf");
        tok_ = load_tokenizer_gguf(*file_, "tokenizer.gguf");
        cases_ = read_cases(GetParam());
        ASSERT_GE(cases_["cases"].size(), 100u);
    }
    std::unique_ptr<GgufFile> file_;
    Tokenizer tok_;
    json cases_;
};

TEST_P(GgufTokenizerFixture, EncodesToTheIdsOfHuggingFaceTokenizers) {
    size_t n_compared = 0;
    for (const auto & c : cases_["cases"]) {
        const std::string text = c["text"];
        if (uses_added_token_flags(GetParam(), text)) continue;
        SCOPED_TRACE("text: \"" + text + "\"");
        auto ids = tok_.encode(text, false);
        EXPECT_EQ(ids, c["ids"].get<std::vector<int32_t>>()) << "got " << show(ids);
        auto ids_special = tok_.encode(text, true);
        EXPECT_EQ(ids_special, c["ids_special"].get<std::vector<int32_t>>()) << "got " << show(ids_special);
        ++n_compared;
    }
    EXPECT_GE(n_compared, cases_["cases"].size() - 6);
}

TEST_P(GgufTokenizerFixture, DecodesLikeHuggingFaceAndRoundTrips) {
    for (const auto & c : cases_["cases"]) {
        const std::string text = c["text"];
        if (uses_added_token_flags(GetParam(), text)) continue;
        SCOPED_TRACE("text: \"" + text + "\"");
        auto ids_special = c["ids_special"].get<std::vector<int32_t>>();
        EXPECT_EQ(tok_.decode(ids_special, false), c["decoded"].get<std::string>());
        EXPECT_EQ(tok_.decode(ids_special, true), c["decoded_skip"].get<std::string>());
        EXPECT_EQ(tok_.decode(tok_.encode(text)), c["roundtrip"].get<std::string>());
        StreamDecoder stream(tok_, true);
        std::string streamed;
        for (int32_t id : ids_special) streamed += stream.push(id);
        streamed += stream.flush();
        EXPECT_EQ(streamed, c["decoded_skip"].get<std::string>());
    }
}

INSTANTIATE_TEST_SUITE_P(Flavours, GgufTokenizerFixture, ::testing::Values("gpt2", "llama3", "qwen2", "smollm", "spm"));

// llama.cpp's SPM tokenizer is SentencePiece's BPE encoder; tokenizers' BPE
// over LlamaConverter's merges gives the same ids on this corpus. The one
// difference: control tokens written in the text ("<s>") are special tokens
// to tokenizers and to this loader, plain text to SentencePiece.
TEST(GgufTokenizer, SentencePieceFamilyEncodesAsSentencePieceItself) {
    GgufFile f(fixture_dir("spm") + "/tokenizer.gguf");
    Tokenizer tok = load_tokenizer_gguf(f, "spm");
    const json cases = read_cases("spm");
    size_t n_compared = 0;
    for (const auto & c : cases["cases"]) {
        const std::string text = c["text"];
        if (text.find("<s>") != std::string::npos || text.find("</s>") != std::string::npos) continue;
        SCOPED_TRACE("text: \"" + text + "\"");
        EXPECT_EQ(tok.encode(text), c["sp_ids"].get<std::vector<int32_t>>());
        ++n_compared;
    }
    EXPECT_GE(n_compared, 100u);
}

TEST(GgufTokenizer, ReadsSpecialIdsAndAddBosFromMetadata) {
    GgufFile spm_file(fixture_dir("spm") + "/tokenizer.gguf");
    Tokenizer spm = load_tokenizer_gguf(spm_file, "spm");
    EXPECT_EQ(spm.bos_id(), 1);
    EXPECT_EQ(spm.eos_id(), 2);
    EXPECT_EQ(spm.unk_id(), 0);
    EXPECT_EQ(spm.encode("hi", true).front(), 1);
    EXPECT_NE(spm.encode("hi", false).front(), 1);
    EXPECT_TRUE(spm.is_special(1));
    EXPECT_EQ(spm.token_to_piece(spm.token_id("<0x41>")), "A");
    EXPECT_EQ(spm.decode(spm.encode("  two spaces")), "  two spaces");

    GgufFile smol_file(fixture_dir("smollm") + "/tokenizer.gguf");
    Tokenizer smol = load_tokenizer_gguf(smol_file, "smollm");
    EXPECT_EQ(smol.bos_id(), 1);   // <|im_start|>, as SmolLM2's GGUF says
    EXPECT_EQ(smol.eos_id(), 2);
    EXPECT_EQ(smol.unk_id(), 0);
    EXPECT_EQ(smol.encode("hi", true), smol.encode("hi", false));   // add_bos_token false
    EXPECT_EQ(smol.encode("<|im_start|>user").front(), 1);

    GgufFile llama_file(fixture_dir("llama3") + "/tokenizer.gguf");
    Tokenizer llama = load_tokenizer_gguf(llama_file, "llama3");
    EXPECT_EQ(llama.bos_id(), llama.token_id("<|begin_of_text|>"));
    EXPECT_EQ(llama.encode("hi", true).front(), llama.bos_id());

    GgufFile qwen_file(fixture_dir("qwen2") + "/tokenizer.gguf");
    Tokenizer qwen = load_tokenizer_gguf(qwen_file, "qwen2");
    EXPECT_EQ(qwen.bos_id(), -1);
    EXPECT_EQ(qwen.pad_id(), qwen.token_id("<|endoftext|>"));
}

// ---- malformed metadata ---------------------------------------------------------

// A valid byte-level tokenizer ("a", "b", "ab", "<|x|>"), with each part replaceable.
struct Meta {
    std::function<void(GgufWriter &)> model = [](GgufWriter & w) { w.add_string("tokenizer.ggml.model", "gpt2"); };
    std::function<void(GgufWriter &)> pre = [](GgufWriter & w) { w.add_string("tokenizer.ggml.pre", "gpt-2"); };
    std::function<void(GgufWriter &)> tokens = [](GgufWriter & w) {
        w.add_string_array("tokenizer.ggml.tokens", {"a", "b", "ab", "<|x|>"});
    };
    std::function<void(GgufWriter &)> types = [](GgufWriter & w) {
        w.add_array<int32_t>("tokenizer.ggml.token_type", {1, 1, 1, 3});
    };
    std::function<void(GgufWriter &)> merges = [](GgufWriter & w) {
        w.add_string_array("tokenizer.ggml.merges", {"a b"});
    };
    std::function<void(GgufWriter &)> extra = [](GgufWriter & w) { w.add_u32("tokenizer.ggml.bos_token_id", 3); };

    Tokenizer load() const {
        GgufWriter w;
        for (const auto * part : {&model, &pre, &tokens, &types, &merges, &extra}) (*part)(w);
        bytes = w.to_bytes();
        GgufContents g = parse_gguf(bytes.data(), bytes.size(), "m.gguf");
        return load_tokenizer_gguf(g, "m.gguf");
    }
    mutable std::vector<uint8_t> bytes;
};

void expect_refused(const Meta & m, std::initializer_list<std::string> fragments) {
    try {
        m.load();
        ADD_FAILURE() << "accepted";
    } catch (const Error & e) {
        std::string msg = e.what();
        EXPECT_NE(msg.find("m.gguf"), std::string::npos) << msg;
        for (const auto & f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
    }
}

auto none = [](GgufWriter &) {};

TEST(MalformedGgufTokenizer, AcceptsTheBaseMetadata) {
    Tokenizer tok = Meta{}.load();
    EXPECT_EQ(tok.encode("ab<|x|>"), (std::vector<int32_t>{2, 3}));
    EXPECT_EQ(tok.bos_id(), 3);
}

TEST(MalformedGgufTokenizer, RejectsAnUnknownPreTokenizerListingTheKnownOnes) {
    Meta m;
    m.pre = [](GgufWriter & w) { w.add_string("tokenizer.ggml.pre", "my-new-model"); };
    expect_refused(m, {"tokenizer.ggml.pre", "my-new-model", "gpt-2", "llama-bpe", "qwen2", "smollm"});
}

TEST(MalformedGgufTokenizer, RejectsUnsupportedOrMissingModel) {
    Meta m;
    m.model = [](GgufWriter & w) { w.add_string("tokenizer.ggml.model", "bert"); };
    expect_refused(m, {"tokenizer.ggml.model", "bert", "gpt2, llama"});
    m.model = none;
    expect_refused(m, {"tokenizer.ggml.model", "missing"});
    m.model = [](GgufWriter & w) { w.add_u32("tokenizer.ggml.model", 2); };
    expect_refused(m, {"tokenizer.ggml.model", "expected a string", "u32"});
}

TEST(MalformedGgufTokenizer, RejectsMergesNamingUnknownTokensOrWithoutASpace) {
    Meta m;
    m.merges = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.merges", {"a b", "a zz"}); };
    expect_refused(m, {"tokenizer.ggml.merges[1]", "zz", "tokenizer.ggml.tokens"});
    m.merges = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.merges", {"b a"}); };
    expect_refused(m, {"tokenizer.ggml.merges[0]", "'ba'"});
    m.merges = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.merges", {"ab"}); };
    expect_refused(m, {"tokenizer.ggml.merges", "merge 0", "<left> <right>"});
    m.merges = none;
    expect_refused(m, {"tokenizer.ggml.merges", "missing"});
}

TEST(MalformedGgufTokenizer, RejectsTokenTypesOfTheWrongLengthTypeOrValue) {
    Meta m;
    m.types = [](GgufWriter & w) { w.add_array<int32_t>("tokenizer.ggml.token_type", {1, 1, 1}); };
    expect_refused(m, {"tokenizer.ggml.token_type", "3 types for 4 tokens"});
    m.types = [](GgufWriter & w) { w.add_array<float>("tokenizer.ggml.token_type", {1, 1, 1, 1}); };
    expect_refused(m, {"tokenizer.ggml.token_type", "expected an array of i32", "f32"});
    m.types = [](GgufWriter & w) { w.add_array<int32_t>("tokenizer.ggml.token_type", {1, 9, 1, 1}); };
    expect_refused(m, {"tokenizer.ggml.token_type", "token 1 has type 9"});
    m.types = [](GgufWriter & w) { w.add_array<int32_t>("tokenizer.ggml.token_type", {6, 1, 1, 1}); };
    expect_refused(m, {"tokenizer.ggml.token_type", "token 0", "<0xNN>"});
}

TEST(MalformedGgufTokenizer, RejectsBadSpecialIds) {
    Meta m;
    m.extra = [](GgufWriter & w) { w.add_u32("tokenizer.ggml.bos_token_id", 4); };
    expect_refused(m, {"tokenizer.ggml.bos_token_id", "token id 4", "4 tokens"});
    m.extra = [](GgufWriter & w) { w.add_i32("tokenizer.ggml.eos_token_id", -1); };
    expect_refused(m, {"tokenizer.ggml.eos_token_id", "-1"});
    m.extra = [](GgufWriter & w) { w.add_string("tokenizer.ggml.padding_token_id", "0"); };
    expect_refused(m, {"tokenizer.ggml.padding_token_id", "expected a token id"});
    m.extra = [](GgufWriter & w) { w.add_bool("tokenizer.ggml.add_bos_token", true); };
    expect_refused(m, {"tokenizer.ggml.add_bos_token", "no tokenizer.ggml.bos_token_id"});
    m.extra = [](GgufWriter & w) { w.add_u8("tokenizer.ggml.add_eos_token", 1); };
    expect_refused(m, {"tokenizer.ggml.add_eos_token", "expected a bool"});
}

TEST(MalformedGgufTokenizer, RejectsEmptyDuplicateOrWronglyTypedVocabularies) {
    Meta m;
    m.tokens = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string_view>{}); };
    m.types = m.merges = m.extra = none;
    expect_refused(m, {"tokenizer.ggml.tokens", "empty vocabulary"});
    m = Meta{};
    m.tokens = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.tokens", {"a", "b", "a", "<|x|>"}); };
    expect_refused(m, {"tokenizer.ggml.tokens", "duplicate token 'a'"});
    m.tokens = [](GgufWriter & w) { w.add_array<int32_t>("tokenizer.ggml.tokens", {1, 2, 3, 4}); };
    expect_refused(m, {"tokenizer.ggml.tokens", "expected an array of strings", "array of i32"});
    m.tokens = none;
    expect_refused(m, {"tokenizer.ggml.tokens", "missing"});
}

TEST(MalformedGgufTokenizer, RejectsSentencePieceScoresOfTheWrongLengthOrValue) {
    Meta m;
    m.model = [](GgufWriter & w) { w.add_string("tokenizer.ggml.model", "llama"); };
    m.merges = [](GgufWriter & w) { w.add_array<float>("tokenizer.ggml.scores", {0, -1, -2}); };
    expect_refused(m, {"tokenizer.ggml.scores", "3 scores for 4 tokens"});
    m.merges = [](GgufWriter & w) { w.add_array<float>("tokenizer.ggml.scores", {0, -1, NAN, 0}); };
    expect_refused(m, {"tokenizer.ggml.scores", "token 2", "finite"});
    m.merges = [](GgufWriter & w) { w.add_string_array("tokenizer.ggml.scores", {"a", "b", "c", "d"}); };
    expect_refused(m, {"tokenizer.ggml.scores", "expected an array of f32"});
    m.merges = [](GgufWriter & w) { w.add_bool("tokenizer.ggml.remove_extra_whitespaces", true); };
    expect_refused(m, {"tokenizer.ggml.remove_extra_whitespaces"});
}

TEST(GgufTokenizer, SentencePieceMergesByScoreAndFallsBackToBytes) {
    // "▁ab" can form as (▁a)(b) or (▁)(ab): the higher-scoring intermediate
    // wins, then the whole; "é" is not in the vocabulary: two byte tokens.
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens",
                       {"<unk>", "<s>", "</s>", "<0xC3>", "<0xA9>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"});
    w.add_array<float>("tokenizer.ggml.scores", {0, 0, 0, 0, 0, -9, -9, -9, -2, -1, -3});
    w.add_array<int32_t>("tokenizer.ggml.token_type", {2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1});
    auto bytes = w.to_bytes();
    GgufContents g = parse_gguf(bytes.data(), bytes.size(), "mini");
    Tokenizer tok = load_tokenizer_gguf(g, "mini");
    EXPECT_EQ(tok.encode("ab"), (std::vector<int32_t>{10}));
    EXPECT_EQ(tok.encode("aab"), (std::vector<int32_t>{8, 9}));
    EXPECT_EQ(tok.encode("\u00e9", true), (std::vector<int32_t>{1, 5, 3, 4}));   // BOS by default, as llama.cpp
    EXPECT_EQ(tok.decode({1, 5, 3, 4, 10}), "<s> \u00e9 ab");
    EXPECT_EQ(tok.decode({5, 3, 4, 10}), "\u00e9 ab");
}

} // namespace
} // namespace moesh
