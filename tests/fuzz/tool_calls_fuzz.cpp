// libFuzzer target for reading tool calls from model output (runtime/tool_calls.h): the bytes
// as generated text, read in every format. Accepted means some format read a call. A call's
// arguments must be a JSON object and its name not empty; the content must be pieces of the text in
// order (before, between and after the runs of calls); what streaming lets out of a prefix must be
// the final content's start; the
// calls streamed from a prefix, when the whole text reads as calls, must be those calls' names
// with starts of their arguments, a longer prefix's extending a shorter one's.
#include "fuzz_targets.h"

#include "runtime/tool_calls.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "tool_calls", what); }

// typed XML values
constexpr std::string_view k_tools = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
    "properties": {"s": {"type": "string"}, "i": {"type": "integer"}, "b": {"type": "boolean"}, "o": {"type": "object"}}}}}])";

} // namespace

bool tool_calls_one_input(const uint8_t * data, size_t size) {
    const std::string_view text(reinterpret_cast<const char *>(data), size);
    bool any = false;
    for (ToolCallFormat f : {ToolCallFormat::Hermes, ToolCallFormat::Llama3, ToolCallFormat::Mistral, ToolCallFormat::MistralArgs,
                             ToolCallFormat::DeepSeekV31, ToolCallFormat::DeepSeekR1, ToolCallFormat::KimiK2, ToolCallFormat::Harmony,
                             ToolCallFormat::QwenXml, ToolCallFormat::GlmXml, ToolCallFormat::MiniMaxXml, ToolCallFormat::DsmlV32,
                             ToolCallFormat::DsmlV4}) {
        const ParsedOutput out = parse_tool_calls(f, text, k_tools);
        for (const ParsedCall & c : out.calls) {
            check(!c.name.empty(), "a call without a name");
            const auto args = nlohmann::ordered_json::parse(c.arguments, nullptr, false);
            check(args.is_object(), "arguments that are not a JSON object");
        }
        any = any || !out.calls.empty();
        std::vector<PartialCall> last;
        for (size_t cut : {size / 3, size / 2, size - size / 4, size}) {
            const std::vector<PartialCall> now = tool_call_prefix(f, text.substr(0, cut), k_tools);
            // a stream that turns out malformed (all of it, or a later run of calls, whose text is then
            // content with its markers): the done frame says so
            if (out.calls.empty() || tool_call_safe_prefix(f, out.content) < out.content.size()) continue;
            check(now.size() <= out.calls.size(), "more calls streamed than read");
            check(now.size() >= last.size(), "a streamed call that went away");
            for (size_t i = 0; i < now.size(); ++i) {
                check(now[i].name == out.calls[i].name, "a streamed call's name that is not the call's");
                check(out.calls[i].arguments.compare(0, now[i].arguments.size(), now[i].arguments) == 0,
                      "streamed arguments that are not the start of the call's");
                check(i >= last.size() || now[i].arguments.compare(0, last[i].arguments.size(), last[i].arguments) == 0,
                      "streamed arguments that do not extend those streamed before");
            }
            last = now;
        }
        if (f == ToolCallFormat::Harmony) continue;   // content is rebuilt from its channels
        size_t at = 0;   // content: pieces of the text, in order (the text around and between the calls)
        for (char ch : out.content) {
            while (at < text.size() && text[at] != ch) ++at;
            check(at < text.size(), "content that is not pieces of the text in order");
            ++at;
        }
        check(out.calls.empty() || out.content.size() < text.size(), "calls and all the text as content");
        for (size_t cut : {size / 3, size / 2, size - size / 4}) {
            const size_t safe = tool_call_safe_prefix(f, text.substr(0, cut));
            check(safe <= cut, "a safe prefix longer than the text");
            check(safe <= out.content.size() && text.substr(0, safe) == std::string_view(out.content).substr(0, safe),
                  "streamed text that is not the final content's start");
        }
    }
    return any;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::tool_calls_one_input(data, size);
    return 0;
}
#endif
