// libFuzzer target for load_tokenizer_gguf (tokenizer.ggml.* metadata of a
// GGUF image) and, for any accepted tokenizer, encode/decode/stream of a short
// string that mixes ASCII, whitespace runs, multi-byte text, special-token
// text and invalid UTF-8.
#include "fuzz_targets.h"
#include "tokenizer_check.h"

#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

#include <string_view>

namespace moesh::fuzz {

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
    exercise_tokenizer(tok, k_text);
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::tokenizer_gguf_one_input(data, size);
    return 0;
}
#endif
