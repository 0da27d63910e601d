// libFuzzer target for JSON Schema to grammar (runtime/json_schema.h): the bytes as a schema.
// Whatever the converter writes must be a grammar that parses (then matched against the bytes,
// grammar_check.h); a refusal must name where in the schema.
#include "fuzz_targets.h"
#include "grammar_check.h"

#include "runtime/json_schema.h"

namespace moesh::fuzz {

bool json_schema_one_input(const uint8_t * data, size_t size) {
    using namespace grammar_check;
    const std::string_view text(reinterpret_cast<const char *>(data), size);
    std::string err;
    const std::string gbnf = json_schema_to_grammar(text, &err);
    if (gbnf.empty()) {
        check(err.rfind("json_schema", 0) == 0, "a refusal that does not name the schema");
        return false;
    }
    const auto g = Grammar::parse(gbnf, &err);
    if (!g) std::fprintf(stderr, "%s\n%s\n", err.c_str(), gbnf.c_str());
    check(g != nullptr, "the converter wrote a grammar that does not parse");
    walk(g, text);
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::json_schema_one_input(data, size);
    return 0;
}
#endif
