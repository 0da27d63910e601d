// What the grammar and json_schema fuzz targets check of a grammar that parses: matched against
// a text one byte-token at a time, the trie walk's mask agrees with the token-by-token check.
#pragma once

#include "runtime/grammar.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moesh::fuzz::grammar_check {

inline void check(bool ok, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "grammar invariant violated: %s\n", what);
        std::abort();
    }
}

// The 256 bytes, the end token (256), and 4 special tokens (257..260: no text, reached only by
// token references such as <[258]>).
constexpr int32_t k_vocab = 261;

inline const std::shared_ptr<const GrammarVocab> & byte_vocab() {
    static const auto v = [] {
        std::vector<std::string> pieces(k_vocab);
        for (int b = 0; b < 256; ++b) pieces[size_t(b)] = std::string(1, char(b));
        return std::make_shared<const GrammarVocab>(std::move(pieces));
    }();
    return v;
}

// Matches text against g for at most 256 bytes, checking the mask against allows() each step. A
// byte 0x01 in the text stands for the first special token the grammar allows there, if any.
inline void walk(const std::shared_ptr<const Grammar> & g, std::string_view text) {
    GrammarMatcher m(g, byte_vocab(), {256});
    std::vector<uint8_t> allowed;
    for (size_t i = 0; i <= text.size() && i < 256; ++i) {
        const int64_t n = m.fill_allowed(&allowed);
        int64_t count = 0;
        for (int32_t t = 0; t < k_vocab; ++t) {
            check(bool(allowed[size_t(t)]) == m.allows(t), "the mask and allows() disagree");
            count += allowed[size_t(t)];
        }
        check(n == count, "fill_allowed's count is wrong");
        check(bool(allowed[256]) == m.can_end(), "the end token and can_end() disagree");
        check(!m.must_end() || n == 1, "must_end() but more than the end is allowed");
        if (i == text.size()) break;
        int32_t t = uint8_t(text[i]);
        if (t == 1)
            for (int32_t s = 257; s < k_vocab; ++s)
                if (allowed[size_t(s)]) { t = s; break; }
        const bool ok = m.accept(t);
        check(ok == bool(allowed[size_t(t)]), "accept() and the mask disagree");
        if (!ok) break;
    }
}

} // namespace moesh::fuzz::grammar_check
