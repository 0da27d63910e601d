// What every fuzz target that builds a Tokenizer checks about it: encode only
// yields ids in the vocabulary, and streaming decode equals decode.
#pragma once

#include "runtime/error.h"
#include "runtime/tokenizer.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace moesh::fuzz {

inline void tokenizer_check(bool ok, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "tokenizer invariant violated: %s\n", what);
        std::abort();
    }
}

// text: a short string mixing ASCII, whitespace runs, multi-byte text, special-token text and invalid UTF-8.
inline void exercise_tokenizer(const Tokenizer & tok, std::string_view text) {
    std::vector<int32_t> ids;
    try {
        ids = tok.encode(text, true);
    } catch (const Error &) {
        return; // a regex over PCRE2's match limits
    }
    for (int32_t id : ids) tokenizer_check(id >= 0 && id < tok.n_vocab(), "encode produced an id outside [0, n_vocab)");
    const std::string decoded = tok.decode(ids, false);
    StreamDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    tokenizer_check(streamed == decoded, "StreamDecoder output differs from decode");
}

} // namespace moesh::fuzz
