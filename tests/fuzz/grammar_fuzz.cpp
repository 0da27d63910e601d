// libFuzzer target for GBNF grammars (runtime/grammar.h): the bytes as grammar text. A refusal
// must be an error naming the grammar; a grammar that parses is matched against the same bytes
// (grammar_check.h).
#include "fuzz_targets.h"
#include "grammar_check.h"

namespace moesh::fuzz {

bool grammar_one_input(const uint8_t * data, size_t size) {
    using namespace grammar_check;
    const std::string_view text(reinterpret_cast<const char *>(data), size);
    std::string err;
    const auto g = Grammar::parse(text, &err);
    if (!g) {
        check(err.rfind("grammar", 0) == 0, "a refusal that does not name the grammar");
        return false;
    }
    walk(g, text);
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::grammar_one_input(data, size);
    return 0;
}
#endif
