// Tokenizer against ids recorded from Hugging Face `tokenizers`
// (scripts/make_tokenizer_fixtures.py), plus malformed tokenizer.json
// variants built by editing a valid one.
#include "runtime/error.h"
#include "runtime/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <thread>

namespace moesh {
namespace {

using json = nlohmann::json;

std::string fixture_dir(const std::string & flavour) {
    return std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/tokenizers/" + flavour;
}

std::string read_text(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

bool valid_utf8(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        auto b = uint8_t(s[i]);
        size_t len = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
        if (!len || i + len > s.size()) return false;
        for (size_t k = 1; k < len; ++k)
            if ((uint8_t(s[i + k]) & 0xC0) != 0x80) return false;
        if (b == 0xE0 && uint8_t(s[i + 1]) < 0xA0) return false;
        if (b == 0xED && uint8_t(s[i + 1]) > 0x9F) return false;
        if (b == 0xF0 && uint8_t(s[i + 1]) < 0x90) return false;
        if (b == 0xF4 && uint8_t(s[i + 1]) > 0x8F) return false;
        i += len;
    }
    return true;
}

std::string show(const std::vector<int32_t> & ids) {
    std::string s;
    for (int32_t id : ids) s += std::to_string(id) + " ";
    return s;
}

class TokenizerFixture : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        tok_ = load_tokenizer_json_file(fixture_dir(GetParam()) + "/tokenizer.json");
        cases_ = json::parse(read_text(fixture_dir(GetParam()) + "/cases.json"));
        ASSERT_GE(cases_["cases"].size(), 100u);
    }
    Tokenizer tok_;
    json cases_;
};

TEST_P(TokenizerFixture, EncodesToTheIdsOfHuggingFaceTokenizers) {
    for (const auto & c : cases_["cases"]) {
        const std::string text = c["text"];
        SCOPED_TRACE("text: \"" + text + "\"");
        auto ids = tok_.encode(text, false);
        EXPECT_EQ(ids, c["ids"].get<std::vector<int32_t>>()) << "got " << show(ids);
        auto ids_special = tok_.encode(text, true);
        EXPECT_EQ(ids_special, c["ids_special"].get<std::vector<int32_t>>()) << "got " << show(ids_special);
    }
}

TEST_P(TokenizerFixture, DecodesLikeHuggingFaceAndRoundTrips) {
    size_t n_exact = 0;
    for (const auto & c : cases_["cases"]) {
        const std::string text = c["text"];
        SCOPED_TRACE("text: \"" + text + "\"");
        auto ids_special = c["ids_special"].get<std::vector<int32_t>>();
        EXPECT_EQ(tok_.decode(ids_special, false), c["decoded"].get<std::string>());
        EXPECT_EQ(tok_.decode(ids_special, true), c["decoded_skip"].get<std::string>());
        // Normalization, lstrip/rstrip and add_prefix_space change the text
        // in `tokenizers` too; everything else must come back unchanged.
        const std::string expected = c["roundtrip"];
        std::string round = tok_.decode(tok_.encode(text), false);
        EXPECT_EQ(round, expected);
        if (expected == text) ++n_exact;
    }
    EXPECT_GE(n_exact, GetParam() == "splits" ? 3u : GetParam() == "gpt2_prefix" ? 10u : 90u);
}

TEST_P(TokenizerFixture, StreamDecoderEmitsOnlyCompleteCharactersAndMatchesDecode) {
    for (bool skip : {false, true}) {
        for (const auto & c : cases_["cases"]) {
            const std::string text = c["text"];
            SCOPED_TRACE("text: \"" + text + "\"");
            auto ids = c["ids_special"].get<std::vector<int32_t>>();
            StreamDecoder stream(tok_, skip);
            std::string all;
            for (int32_t id : ids) {
                std::string_view chunk = stream.push(id);
                EXPECT_TRUE(valid_utf8(chunk));
                all += chunk;
            }
            std::string_view tail = stream.flush();
            EXPECT_TRUE(valid_utf8(tail));
            all += tail;
            EXPECT_EQ(all, tok_.decode(ids, skip));
        }
    }
}

TEST_P(TokenizerFixture, EncodesConcurrentlyFromSeveralThreads) {
    std::vector<std::vector<int32_t>> expected;
    for (const auto & c : cases_["cases"]) expected.push_back(c["ids"].get<std::vector<int32_t>>());
    std::vector<int> mismatches(4, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            size_t i = 0;
            for (const auto & c : cases_["cases"]) {
                if (tok_.encode(c["text"].get<std::string>()) != expected[i++]) ++mismatches[t];
            }
        });
    for (auto & th : threads) th.join();
    for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST_P(TokenizerFixture, InvalidUtf8InputIsTokenizedByteByByte) {
    const std::string bad = std::string("ok \xff\xfe bad \xe4\xb8 cut \xed\xa0\x80 surrogate \xf0\x9f\x98", 35) + "\x80";
    for (const std::string & text : {bad, std::string("\xc3"), std::string("\x80\x80\x80"), std::string("a\xff") }) {
        auto ids = tok_.encode(text);
        std::string bytes;
        for (int32_t id : ids) bytes += tok_.token_to_piece(id);
        if (GetParam() == "gpt2_prefix") {
            EXPECT_EQ(bytes, " " + text);
        } else if (GetParam() == "gpt2" || GetParam() == "llama3") {
            EXPECT_EQ(bytes, text);
        }
        EXPECT_TRUE(valid_utf8(tok_.decode(ids)));
    }
}

TEST_P(TokenizerFixture, EncodesLongInputsWithoutQuadraticBlowUp) {
    std::string text;
    for (const auto & c : cases_["cases"]) text += c["text"].get<std::string>();
    std::string big;
    while (big.size() < (1u << 20)) big += text;
    big += std::string(100000, ' ') + "x" + std::string(100000, 'a') + std::string(50000, '\n') + std::string(30000, '7');
    auto ids = tok_.encode(big);
    EXPECT_GT(ids.size(), big.size() / 16);
    // (EXPECT_TRUE: a failing EXPECT_EQ would diff two megabytes)
    if (GetParam() == "llama3") {
        EXPECT_TRUE(tok_.decode(ids) == big);
    }
}

INSTANTIATE_TEST_SUITE_P(Flavours, TokenizerFixture,
                         ::testing::Values("gpt2", "gpt2_prefix", "llama3", "qwen2", "splits", "smollm", "spm",
                                           "spm_metaspace"));

TEST(Tokenizer, ReportsSpecialTokensAndBosFromTheTemplate) {
    Tokenizer llama = load_tokenizer_json_file(fixture_dir("llama3") + "/tokenizer.json");
    int32_t bos = llama.token_id("<|begin_of_text|>");
    ASSERT_GE(bos, 0);
    EXPECT_EQ(llama.bos_id(), bos);
    EXPECT_EQ(llama.eos_id(), -1);
    EXPECT_TRUE(llama.is_special(bos));
    EXPECT_EQ(llama.token_text(bos), "<|begin_of_text|>");
    EXPECT_EQ(llama.n_vocab(), bos + 6);
    EXPECT_EQ(llama.encode("hi", true).front(), bos);

    Tokenizer qwen = load_tokenizer_json_file(fixture_dir("qwen2") + "/tokenizer.json");
    EXPECT_EQ(qwen.bos_id(), -1);
    EXPECT_EQ(qwen.added_tokens().size(), 3u);
    EXPECT_EQ(qwen.encode("<|im_start|>", true), std::vector<int32_t>{qwen.token_id("<|im_start|>")});
    EXPECT_EQ(qwen.token_to_piece(qwen.token_id("Ġ")), " ");
    EXPECT_EQ(qwen.token_to_piece(-1), "");
    EXPECT_EQ(qwen.decode({-5, 1 << 30}), "");
}

// A chat's special tokens are not text, except those kept (a tool-call format's markers).
TEST(Tokenizer, StreamDecoderKeepsTheSpecialTokensItIsToldTo) {
    Tokenizer tok = load_tokenizer_json_file(fixture_dir("qwen2") + "/tokenizer.json");
    const int32_t end = tok.token_id("<|im_end|>"), start = tok.token_id("<|im_start|>"), a = tok.token_id("a");
    ASSERT_TRUE(end >= 0 && start >= 0 && a >= 0 && tok.is_special(end) && tok.is_special(start));
    StreamDecoder skip(tok, true), keep(tok, true, {end});
    std::string skipped, kept;
    for (int32_t id : {a, end, start, a}) skipped += skip.push(id), kept += keep.push(id);
    EXPECT_EQ(skipped, "aa");
    EXPECT_EQ(kept, "a<|im_end|>a");
}

TEST(Tokenizer, StreamDecoderHoldsBackSplitCharacters) {
    Tokenizer tok = load_tokenizer_json_file(fixture_dir("gpt2") + "/tokenizer.json");
    // "€" is E2 82 AC: feed it one byte token at a time.
    const auto & alphabet_token = [&](uint8_t b) {
        for (int32_t id = 0; id < tok.n_vocab(); ++id)
            if (tok.token_to_piece(id) == std::string(1, char(b))) return id;
        return -1;
    };
    int32_t e2 = alphabet_token(0xE2), x82 = alphabet_token(0x82), xac = alphabet_token(0xAC);
    ASSERT_GE(e2, 0);
    StreamDecoder s(tok);
    EXPECT_EQ(s.push(e2), "");
    EXPECT_EQ(s.push(x82), "");
    EXPECT_EQ(s.push(xac), "\xe2\x82\xac");
    EXPECT_EQ(s.push(e2), "");
    EXPECT_EQ(s.push(tok.token_id("a")), "\xef\xbf\xbd" "a");   // broken sequence becomes U+FFFD
    EXPECT_EQ(s.push(e2), "");
    EXPECT_EQ(s.flush(), "\xef\xbf\xbd");
    EXPECT_EQ(s.flush(), "");
}

TEST(Tokenizer, EmptyTokenizerEncodesNothing) {
    Tokenizer tok;
    EXPECT_TRUE(tok.encode("abc").empty());
    EXPECT_EQ(tok.decode({1, 2}), "");
    EXPECT_EQ(tok.n_vocab(), 0);
}

// ---- malformed tokenizer.json -------------------------------------------------

class MalformedTokenizer : public ::testing::Test {
protected:
    void SetUp() override { base_ = json::parse(read_text(fixture_dir("llama3") + "/tokenizer.json")); }

    // Expects the edited document to be refused with a message containing every fragment.
    void expect_refused(const json & doc, std::initializer_list<std::string> fragments) {
        try {
            load_tokenizer_json(doc.dump(), "m/tokenizer.json");
            ADD_FAILURE() << "accepted";
        } catch (const Error & e) {
            std::string msg = e.what();
            EXPECT_NE(msg.find("m/tokenizer.json"), std::string::npos) << msg;
            for (const auto & f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
        }
    }
    json base_;
};

TEST_F(MalformedTokenizer, AcceptsTheUneditedFile) { EXPECT_NO_THROW(load_tokenizer_json(base_.dump(), "m")); }

TEST_F(MalformedTokenizer, RejectsNonJsonAndNonObjects) {
    EXPECT_THROW(load_tokenizer_json("{\"model\":", "m/tokenizer.json"), Error);
    EXPECT_THROW(load_tokenizer_json("[1, 2]", "m/tokenizer.json"), Error);
    expect_refused(json::object(), {"'model'", "missing"});
}

TEST_F(MalformedTokenizer, RejectsUnknownModelType) {
    base_["model"]["type"] = "WordPiece";
    expect_refused(base_, {"model.type", "WordPiece", "supported: BPE"});
}

TEST_F(MalformedTokenizer, RejectsVocabIdOfWrongType) {
    base_["model"]["vocab"]["a"] = "seven";
    expect_refused(base_, {"model.vocab.a", "expected a token id"});
}

TEST_F(MalformedTokenizer, RejectsNegativeAndHugeIds) {
    json doc = base_;
    doc["model"]["vocab"]["a"] = -1;
    expect_refused(doc, {"model.vocab.a", "out of range"});
    doc = base_;
    doc["model"]["vocab"]["a"] = 1 << 30;
    expect_refused(doc, {"model.vocab", "outside"});
    doc = base_;
    doc["added_tokens"][0]["id"] = int64_t(1) << 40;
    expect_refused(doc, {"added_tokens[0].id", "out of range"});
}

TEST_F(MalformedTokenizer, RejectsDuplicateIds) {
    int32_t id_a = base_["model"]["vocab"]["a"];
    base_["model"]["vocab"]["b"] = id_a;
    expect_refused(base_, {"model.vocab", "id " + std::to_string(id_a), "more than one token"});
}

TEST_F(MalformedTokenizer, RejectsAddedTokenIdCollisions) {
    json doc = base_;
    doc["added_tokens"][1]["id"] = doc["added_tokens"][0]["id"];
    expect_refused(doc, {"added_tokens[1].id", "two added tokens"});
    doc = base_;
    doc["added_tokens"][0]["id"] = doc["model"]["vocab"]["a"];
    expect_refused(doc, {"added_tokens[0].id", "in model.vocab"});
}

TEST_F(MalformedTokenizer, RejectsMergesNamingUnknownTokens) {
    json doc = base_;
    doc["model"]["merges"][3] = "nosuchtoken a";
    expect_refused(doc, {"model.merges[3]", "nosuchtoken", "not in model.vocab"});
    doc = base_;
    doc["model"]["merges"][0] = json::array({"a", "zzzzqq"});
    expect_refused(doc, {"model.merges[0]", "zzzzqq"});
    doc = base_;
    doc["model"]["merges"][1] = "nospace";
    expect_refused(doc, {"model.merges[1]", "<left> <right>"});
    doc = base_;
    doc["model"]["merges"][2] = 5;
    expect_refused(doc, {"model.merges[2]"});
}

TEST_F(MalformedTokenizer, RejectsUnsupportedBpeOptions) {
    json doc = base_;
    doc["model"]["dropout"] = 0.1;
    expect_refused(doc, {"model.dropout"});
    doc = base_;
    doc["model"]["continuing_subword_prefix"] = "##";
    expect_refused(doc, {"model.continuing_subword_prefix"});
    doc = base_;
    doc["model"]["unk_token"] = "<unk>";
    expect_refused(doc, {"model.unk_token", "<unk>"});
}

TEST_F(MalformedTokenizer, RejectsUnknownPreTokenizerAndInvalidRegex) {
    json doc = base_;
    doc["pre_tokenizer"]["pretokenizers"][0]["type"] = "Whitespace";
    expect_refused(doc, {"pre_tokenizer.pretokenizers[0].type", "Whitespace", "supported: ByteLevel, Split"});
    doc = base_;
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(?i:'s|\\p{L";
    expect_refused(doc, {"pre_tokenizer.pretokenizers[0].pattern", "invalid regex"});
    doc = base_;
    doc["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
    expect_refused(doc, {"pre_tokenizer.pretokenizers[0].behavior", "Sideways", "Isolated"});
    doc = base_;
    doc["pre_tokenizer"] = nullptr;
    expect_refused(doc, {"'pre_tokenizer'", "ByteLevel"});
    doc = base_;
    std::swap(doc["pre_tokenizer"]["pretokenizers"][0], doc["pre_tokenizer"]["pretokenizers"][1]);
    expect_refused(doc, {"pre_tokenizer.pretokenizers[0]", "last"});
}

TEST_F(MalformedTokenizer, RejectsUnknownNormalizerDecoderAndPostProcessor) {
    json doc = base_;
    doc["normalizer"] = {{"type", "Lowercase"}};
    expect_refused(doc, {"normalizer.type", "Lowercase", "NFC"});
    doc = base_;
    doc["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}, {{"type", "Strip"}}})}};
    expect_refused(doc, {"normalizer.normalizers[1].type", "Strip"});
    doc = base_;
    doc["decoder"] = {{"type", "WordPiece"}};
    expect_refused(doc, {"decoder.type", "WordPiece", "ByteLevel, Metaspace"});
    doc = base_;
    doc["decoder"] = {{"type", "Metaspace"}};   // a ByteLevel pre-tokenizer with a SentencePiece-style decoder
    expect_refused(doc, {"pre_tokenizer.pretokenizers[1]", "needs the ByteLevel decoder"});
    doc = base_;
    doc["decoder"] = {{"type", "Sequence"}, {"decoders", json::array({{{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}, {{"type", "Fuse"}}})}};
    expect_refused(doc, {"decoder.decoders[0]", "Strip before Fuse"});
    doc = base_;
    doc["post_processor"] = {{"type", "RobertaProcessing"}};
    expect_refused(doc, {"post_processor.type", "RobertaProcessing", "TemplateProcessing"});
    doc = base_;
    doc["post_processor"]["processors"][1]["single"][0]["SpecialToken"]["id"] = "<nope>";
    expect_refused(doc, {"post_processor.processors[1].single[0].SpecialToken.id", "<nope>"});
}

TEST_F(MalformedTokenizer, RejectsAddedTokensOfWrongShape) {
    json doc = base_;
    doc["added_tokens"][0]["content"] = 3;
    expect_refused(doc, {"added_tokens[0].content"});
    doc = base_;
    doc["added_tokens"][0]["lstrip"] = "yes";
    expect_refused(doc, {"added_tokens[0].lstrip", "true or false"});
    doc = base_;
    doc["added_tokens"] = 7;
    expect_refused(doc, {"'added_tokens'", "array"});
}

TEST_F(MalformedTokenizer, AcceptsOtherSplitBehavioursAndNormalizers) {
    for (const char * behavior : {"Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"}) {
        json doc = base_;
        doc["pre_tokenizer"]["pretokenizers"][0]["behavior"] = behavior;
        doc["pre_tokenizer"]["pretokenizers"][0]["invert"] = true;
        doc["normalizer"] = {{"type", "NFKC"}};
        Tokenizer tok = load_tokenizer_json(doc.dump(), "m");
        EXPECT_FALSE(tok.encode("Hello  world 123 ﬁ\n").empty()) << behavior;
    }
}

} // namespace
} // namespace moesh
