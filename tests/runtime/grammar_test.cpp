// The GBNF grammar engine on the shipped model's byte-level vocabulary (every byte is a token).
// llama.cpp's masks for the same grammars: grammar_reference_test.cpp.
#include "runtime/grammar.h"
#include "runtime/tokenizer.h"

#include <gtest/gtest.h>

#include <string>

namespace moesh {
namespace {

const Tokenizer & shipped_tokenizer() {
    static const Tokenizer tok = load_tokenizer_json_file(std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py/tokenizer.json");
    return tok;
}

constexpr int32_t k_eos = 0;   // <|endoftext|> (generation_config.json's eos_token_id)

std::shared_ptr<const GrammarVocab> shipped_vocab() {
    static const auto v = std::make_shared<const GrammarVocab>(shipped_tokenizer());
    return v;
}

std::shared_ptr<const Grammar> parse_ok(const std::string & text) {
    std::string err;
    auto g = Grammar::parse(text, &err);
    EXPECT_TRUE(g) << err;
    return g;
}

std::string parse_error(const std::string & text) {
    std::string err;
    EXPECT_FALSE(Grammar::parse(text, &err)) << "accepted: " << text;
    return err;
}

// The token whose bytes are exactly b.
int32_t byte_token(uint8_t b) {
    const auto & v = *shipped_vocab();
    for (int32_t id = 0; id < v.n_vocab(); ++id)
        if (v.piece(id) == std::string(1, char(b))) return id;
    ADD_FAILURE() << "no token for byte " << int(b);
    return -1;
}

// Feeds text one byte-token at a time; false at the first byte refused.
bool feed_bytes(GrammarMatcher & m, const std::string & text) {
    for (char c : text)
        if (!m.accept(byte_token(uint8_t(c)))) return false;
    return true;
}

GrammarMatcher matcher(const std::string & grammar) {
    return GrammarMatcher(parse_ok(grammar), shipped_vocab(), {k_eos});
}

TEST(Grammar, KeywordsSharingAPrefixEndWhereTheyCan) {
    auto m = matcher("root ::= \"yes\" | \"yesterday\" | \"no\"\n");
    EXPECT_FALSE(m.can_end());
    ASSERT_TRUE(feed_bytes(m, "yes"));
    EXPECT_TRUE(m.can_end());
    EXPECT_FALSE(m.must_end());   // "yesterday" goes on
    EXPECT_TRUE(m.allows(k_eos));
    ASSERT_TRUE(feed_bytes(m, "terday"));
    EXPECT_TRUE(m.must_end());
    EXPECT_FALSE(m.accept(byte_token('x')));
    auto n = matcher("root ::= \"yes\" | \"no\"");
    EXPECT_FALSE(n.allows(k_eos));
    EXPECT_FALSE(feed_bytes(n, "nope"));
}

TEST(Grammar, RepetitionCountsAreExact) {
    auto m = matcher("root ::= \"a\"{2,3} [0-9]{0,2}");
    ASSERT_TRUE(feed_bytes(m, "a"));
    EXPECT_FALSE(m.can_end());
    ASSERT_TRUE(feed_bytes(m, "a"));
    EXPECT_TRUE(m.can_end());
    ASSERT_TRUE(feed_bytes(m, "a"));
    EXPECT_FALSE(m.allows(byte_token('a')));
    ASSERT_TRUE(feed_bytes(m, "42"));
    EXPECT_TRUE(m.must_end());

    auto plus = matcher("root ::= (\"ab\" | \"c\")+ \"!\"");
    EXPECT_TRUE(feed_bytes(plus, "abcab!"));
    EXPECT_TRUE(plus.must_end());
    auto star = matcher("root ::= [^x]* \"x\"");
    EXPECT_TRUE(feed_bytes(star, "hello, world x"));
    EXPECT_TRUE(star.must_end());
}

TEST(Grammar, CharacterSplitAcrossTokensIsCompletedByTheNext) {
    auto m = matcher("root ::= \"\\u00e9\" [\\u0400-\\u04FF] \"\xe6\x97\xa5\"");   // é, a Cyrillic letter, 日
    EXPECT_TRUE(m.allows(byte_token(0xC3)));
    EXPECT_FALSE(m.allows(byte_token(0xC4)));   // begins U+0100.., not é
    ASSERT_TRUE(m.accept(byte_token(0xC3)));
    EXPECT_FALSE(m.can_end());
    EXPECT_FALSE(m.allows(byte_token('A')));    // not a continuation byte
    ASSERT_TRUE(m.accept(byte_token(0xA9)));
    EXPECT_FALSE(m.allows(byte_token(0xC3)));   // U+00C0..: not Cyrillic
    EXPECT_TRUE(feed_bytes(m, "\xd0\x96\xe6\x97\xa5"));   // Ж 日
    EXPECT_TRUE(m.must_end());
}

TEST(Grammar, BytesThatAreNeverUtf8AreRefused) {
    auto m = matcher("root ::= .*");
    for (int b : {0x00, 0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF}) EXPECT_FALSE(m.allows(byte_token(uint8_t(b)))) << b;
    for (int b : {0x01, 0x41, 0xC2, 0xE0, 0xF0, 0xF4}) EXPECT_TRUE(m.allows(byte_token(uint8_t(b)))) << b;
}

TEST(Grammar, SpecialTokensAreNeverText) {
    auto m = matcher("root ::= .*");
    EXPECT_TRUE(m.can_end());
    std::vector<uint8_t> allowed;
    const int64_t n = m.fill_allowed(&allowed);
    EXPECT_TRUE(allowed[0]);   // <|endoftext|> is the end token here
    auto no_end = GrammarMatcher(parse_ok("root ::= .*"), shipped_vocab(), {});
    std::vector<uint8_t> without;
    EXPECT_EQ(no_end.fill_allowed(&without), n - 1);
    EXPECT_FALSE(without[0]);   // special, and not an end token: never allowed
}

// Token references (llama.cpp's <[id]> and <text>) let exactly that token through, special ones
// included, between characters.
TEST(Grammar, TokenReferencesLetThatTokenThrough) {
    std::vector<std::string> pieces(260);   // bytes, 256 the end, 257..259 special (no text)
    for (int b = 0; b < 256; ++b) pieces[size_t(b)] = std::string(1, char(b));
    const auto vocab = std::make_shared<const GrammarVocab>(std::move(pieces));
    GrammarMatcher m(parse_ok("root ::= \"a\" <[257]> (\"b\" | <[258]>) <[97]>?"), vocab, {256});
    std::vector<uint8_t> allowed;
    ASSERT_TRUE(m.accept('a'));
    EXPECT_EQ(m.fill_allowed(&allowed), 1);
    EXPECT_TRUE(allowed[257]);
    EXPECT_FALSE(m.allows(258));
    ASSERT_TRUE(m.accept(257));
    EXPECT_EQ(m.fill_allowed(&allowed), 2);
    EXPECT_TRUE(allowed['b'] && allowed[258]);
    ASSERT_TRUE(m.accept(258));
    EXPECT_TRUE(m.can_end());
    EXPECT_TRUE(m.allows('a'));   // <[97]>: the token "a" by its id
    ASSERT_TRUE(m.accept('a'));
    EXPECT_TRUE(m.must_end());
    // a token the grammar takes both by reference and as text: both readings go on
    GrammarMatcher both(parse_ok("root ::= <[97]> \"x\" | \"a\" \"y\""), vocab, {256});
    ASSERT_TRUE(both.accept('a'));
    EXPECT_TRUE(both.allows('x') && both.allows('y'));
    // never inside a character: after the first byte of "é" only its second byte
    GrammarMatcher split(parse_ok("root ::= (\"\u00e9\" | [\u00c3] <[257]>)"), vocab, {256});
    ASSERT_TRUE(split.accept(0xC3));
    EXPECT_FALSE(split.allows(257));
    // a reference the vocabulary does not have
    GrammarMatcher bad(parse_ok("root ::= <nope>"), vocab, {256});
    EXPECT_EQ(bad.error(), "grammar token <nope>: not one token of this vocabulary");
    GrammarMatcher far(parse_ok("root ::= <[5000]>"), vocab, {256});
    EXPECT_EQ(far.error(), "grammar token <[5000]>: past the vocabulary's 260 tokens");
    // <text> by a tokenizer's special token: the shipped model's <|endoftext|>, not an end token here
    GrammarMatcher special(parse_ok("root ::= <|endoftext|> \"a\""), shipped_vocab(), {});
    EXPECT_EQ(special.error(), "");
    EXPECT_EQ(special.fill_allowed(&allowed), 1);
    EXPECT_TRUE(allowed[0]);
    ASSERT_TRUE(special.accept(0));
    EXPECT_TRUE(special.allows(byte_token('a')));
    // an end token ends the text: a reference to it never matches
    GrammarMatcher end(parse_ok("root ::= <|endoftext|> \"a\""), shipped_vocab(), {0});
    EXPECT_FALSE(end.allows(0));
}

// fill_allowed (the trie walk) says what allows (one token's walk) says, in every state met.
TEST(Grammar, MaskEqualsTokenByTokenChecks) {
    const std::string json = R"(root ::= object
value ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
ws ::= | " " | "\n" [ \t]{0,20}
)";
    auto m = matcher(json);
    const Tokenizer & tok = shipped_tokenizer();
    const std::vector<int32_t> ids = tok.encode(R"({"name": "Ada", "tags": [1, -2.5e3, true, null], "x": {}})");
    std::vector<uint8_t> allowed;
    for (size_t i = 0; i <= ids.size(); ++i) {
        const int64_t n = m.fill_allowed(&allowed);
        int64_t count = 0;
        for (int32_t id = 0; id < tok.n_vocab(); ++id) {
            ASSERT_EQ(bool(allowed[size_t(id)]), m.allows(id)) << "token " << id << " after " << i << " tokens";
            count += allowed[size_t(id)];
        }
        ASSERT_EQ(n, count);
        if (i < ids.size()) {
            ASSERT_TRUE(m.accept(ids[i])) << "token " << i << " '" << tok.token_to_piece(ids[i]) << "'";
        }
    }
    EXPECT_TRUE(m.can_end());
}

TEST(Grammar, RecursionNestsAndCompactionKeepsTheState) {
    auto m = matcher("root ::= p\np ::= \"(\" p* \")\"");
    std::string text;
    for (int i = 0; i < 300; ++i) text += "(()";
    for (int i = 0; i < 300; ++i) text += ")";
    ASSERT_TRUE(feed_bytes(m, text));
    EXPECT_TRUE(m.must_end());
    EXPECT_TRUE(m.error().empty());
}

TEST(Grammar, LongTextsCompactTheStackNodesAndKeepMatching) {
    // Every position of a bounded repetition is its own rule, so 30000 bytes make more stack
    // nodes than a matcher keeps before compacting.
    auto m = matcher("root ::= x{0,10000} y{0,10000} z{0,10000}\nx ::= \"a\" | \"b\"\ny ::= \"c\"\nz ::= \"d\"");
    const std::string text = std::string(10000, 'a') + std::string(10000, 'c') + std::string(9999, 'd');
    ASSERT_TRUE(feed_bytes(m, text));
    EXPECT_TRUE(m.can_end());
    EXPECT_FALSE(m.must_end());
    EXPECT_TRUE(m.allows(byte_token('d')));
    EXPECT_FALSE(m.allows(byte_token('c')));
    ASSERT_TRUE(feed_bytes(m, "d"));
    EXPECT_TRUE(m.must_end());
    EXPECT_TRUE(m.error().empty());
}

TEST(Grammar, ADeadEndSaysSoAndAllowsNothing) {
    auto m = matcher("root ::= \"ok\" [\\x00]");   // NUL is never text
    ASSERT_TRUE(feed_bytes(m, "ok"));
    std::vector<uint8_t> allowed;
    EXPECT_EQ(m.fill_allowed(&allowed), 0);
    EXPECT_EQ(m.error(), "no token of the vocabulary can continue the text here");
    EXPECT_FALSE(m.can_end());
    EXPECT_FALSE(m.allows(byte_token('a')));
}

TEST(Grammar, NestingPastTheDepthLimitIsRefusedNotCrashed) {
    auto m = matcher("root ::= p\np ::= \"(\" p? \")\"");
    int opened = 0;
    while (opened < 5000 && m.accept(byte_token('('))) ++opened;
    EXPECT_GT(opened, 100);
    EXPECT_LT(opened, 5000);
}

TEST(Grammar, ErrorsNameTheLineAndColumn) {
    EXPECT_EQ(parse_error("root ::= a\n"), "grammar line 1, column 10: rule 'a' is used but never defined");
    EXPECT_NE(parse_error("root ::= \"a\"\nx ::= y\n").find("'y' is used but never defined"), std::string::npos);
    EXPECT_EQ(parse_error("root ::= \"a\"\n  x = \"b\"\n"), "grammar line 2, column 5: expected '::=' after the rule name 'x'");
    EXPECT_EQ(parse_error("root ::= \"\\q\""), "grammar line 1, column 11: unknown escape '\\q'");
    EXPECT_EQ(parse_error("root ::= (\"a\""), "grammar line 1, column 14: a '(' is never closed");
    EXPECT_EQ(parse_error("root ::= []"), "grammar line 1, column 11: an empty character class []");
    EXPECT_EQ(parse_error("root ::= [z-a]"), "grammar line 1, column 11: range z-a runs backwards");
    EXPECT_EQ(parse_error("root ::= *"), "grammar line 1, column 10: '*' follows nothing it could repeat");
    EXPECT_EQ(parse_error("root ::= \"a\"\nroot ::= \"b\""), "grammar line 2, column 1: rule 'root' is defined twice");
    EXPECT_EQ(parse_error("x ::= \"a\""), "grammar: no rule named root");
    EXPECT_EQ(parse_error("root ::= \"a\"{3,1}"), "grammar line 1, column 18: a repetition {3,1} with max < min");
    EXPECT_NE(parse_error("root ::= \"a\"{99999}").find("repetition count over 10000"), std::string::npos);
    EXPECT_EQ(parse_error("root ::= !<[12]>"), "grammar line 1, column 10: negated token references (!<...>) are not supported");
    EXPECT_EQ(parse_error("root ::= <think\n"), "grammar line 1, column 10: a token reference '<' is never closed with '>' on its line");
    EXPECT_EQ(parse_error("root ::= <[x]>"), "grammar line 1, column 10: expected a token id as <[123]>");
    EXPECT_NE(parse_error("root ::= <[99999999999]>").find("a token id past"), std::string::npos);
    EXPECT_NE(parse_error("root ::= \"a\" )").find("unexpected ')'"), std::string::npos);
    EXPECT_NE(parse_error("root ::= \"\xff\"").find("invalid UTF-8"), std::string::npos);
    EXPECT_NE(parse_error("root ::= " + std::string(300, '(')).find("nested over 200"), std::string::npos);
    EXPECT_NE(parse_error("root ::= \"a\"{10000}{10000}").find("'{' follows nothing"), std::string::npos);
    EXPECT_NE(parse_error("root ::= (\"a\"{1000}){1000}{1000}").find("'{' follows nothing"), std::string::npos);
    std::string big = "root ::= r0";
    for (int r = 0; r < 11; ++r) big += "\nr" + std::to_string(r) + " ::= \"0123456789\"{10000}";
    EXPECT_NE(parse_error(big).find("too large"), std::string::npos);
}

TEST(Grammar, LeftRecursionIsRefusedWithTheCycle) {
    EXPECT_EQ(parse_error("root ::= root \"a\" | \"b\""),
              "grammar: rule 'root' is left-recursive (root -> root); write it with repetition instead");
    EXPECT_NE(parse_error("root ::= e? x\ne ::= \"\"\nx ::= root \"a\" | \"b\"").find("left-recursive"), std::string::npos);
    EXPECT_NE(parse_error("root ::= (\"a\"*)*").find("left-recursive"), std::string::npos);
    parse_ok("root ::= \"a\" root | \"b\"");   // right recursion is fine
}

TEST(Grammar, CommentsAndMultiLineGroups) {
    auto m = matcher("# a comment\nroot ::= ( # opens\n  \"a\" |\n  \"b\" # two ways\n) x  # then x\nx ::= \"!\"\n");
    EXPECT_TRUE(feed_bytes(m, "b!"));
    EXPECT_TRUE(m.must_end());
}

} // namespace
} // namespace moesh
