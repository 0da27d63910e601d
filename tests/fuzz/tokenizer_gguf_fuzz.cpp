// libFuzzer target for load_tokenizer_gguf (tokenizer.ggml.* metadata of a
// GGUF image) and, for any accepted tokenizer, encode/decode/stream of a short
// string that mixes ASCII, whitespace runs, multi-byte text, special-token
// text and invalid UTF-8.
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "tokenizer invariant violated: %s\n", what);
        std::abort();
    }
}

} // namespace

bool tokenizer_gguf_one_input(const uint8_t * data, size_t size) {
    Tokenizer tok;
    try {
        GgufContents g = parse_gguf(data, size, "fuzz.gguf");
        tok = load_tokenizer_gguf(g, "fuzz.gguf");
    } catch (const Error &) {
        return false;
    }
    static const std::string_view k_text =
        "Hello,  world!\n\t 12345 it's caf\xc3\xa9 \xe4\xb8\xad\xf0\x9f\x98\x80 \xff\xc3 <s><|x|>\xe2\x96\x81 ab  ";
    std::vector<int32_t> ids;
    try {
        ids = tok.encode(k_text, true);
    } catch (const Error &) {
        return true;   // a regex over PCRE2's match limits
    }
    for (int32_t id : ids) check(id >= 0 && id < tok.n_vocab(), "encode produced an id outside [0, n_vocab)");
    std::string text = tok.decode(ids, false);
    StreamDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    check(streamed == text, "StreamDecoder output differs from decode");
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::tokenizer_gguf_one_input(data, size);
    return 0;
}
#endif
