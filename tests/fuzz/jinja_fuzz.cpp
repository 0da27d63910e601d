// libFuzzer target for Jinja chat templates (runtime/jinja.h): the bytes as a
// template, rendered with a small conversation under tight limits. Accepted
// means parsed. Any error must name the template line (or be the template's
// own raise_exception); a render must give the same text twice.
#include "fuzz_targets.h"

#include "runtime/jinja.h"

#include <cstdio>
#include <cstdlib>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "jinja", what); }

const nlohmann::ordered_json & conversation() {
    static const nlohmann::ordered_json vars = nlohmann::ordered_json::parse(R"({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9"},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                      "function": {"name": "f", "arguments": {"x": 1}}}], "reasoning_content": "hm"},
                     {"role": "tool", "tool_call_id": "c1", "content": "{\"y\": 2}"}, {"role": "user", "content": [{"type": "text", "text": "t"}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
        "documents": null, "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"})");
    return vars;
}

} // namespace

bool jinja_one_input(const uint8_t * data, size_t size) {
    const std::string_view text(reinterpret_cast<const char *>(data), size);
    jinja::RenderOptions o;
    o.limits.max_steps = 200000;
    o.limits.max_output = 1 << 20;
    o.limits.max_range = 10000;
    o.limits.max_alloc = 32u << 20;
    o.now = std::tm{};
    std::optional<jinja::Template> t;
    try {
        t.emplace(text);
    } catch (const Error & e) {
        check(std::string_view(e.what()).rfind("template line ", 0) == 0, "a syntax error that does not name the line");
        return false;
    }
    std::string first;
    try {
        first = t->render(conversation(), o);
    } catch (const jinja::RaisedError &) {
        return true;
    } catch (const Error & e) {
        check(std::string_view(e.what()).rfind("template line ", 0) == 0, "a render error that does not name the line");
        return true;
    }
    check(t->render(conversation(), o) == first, "two renders differ");
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::jinja_one_input(data, size);
    return 0;
}
#endif
