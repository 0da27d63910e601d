// Hermes-format tool calls: splitting output, holding back a call's start
// while streaming, and the grammar of a call that must be made.
#include "runtime/tool_calls.h"

#include "runtime/json_schema.h"

#include <nlohmann/json.hpp>

namespace moesh {

namespace {

using ojson = nlohmann::ordered_json;

constexpr std::string_view k_open = "<tool_call>", k_close = "</tool_call>";

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\n' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\n' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
    return s;
}

} // namespace

ToolCallFormat tool_call_format(std::string_view t) {
    // Qwen3-Coder also opens calls with <tool_call>, but writes XML parameters inside
    if (t.find(k_open) != std::string_view::npos && t.find("<function=") == std::string_view::npos) return ToolCallFormat::Hermes;
    return ToolCallFormat::None;
}

ParsedOutput parse_tool_calls(ToolCallFormat format, std::string_view text) {
    ParsedOutput out;
    const size_t first = format == ToolCallFormat::Hermes ? text.find(k_open) : std::string_view::npos;
    if (first == std::string_view::npos) {
        out.content = std::string(text);
        return out;
    }
    for (size_t at = first; at != std::string_view::npos;) {
        const size_t body = at + k_open.size();
        size_t end = text.find(k_close, body);
        const std::string_view inner = trim(text.substr(body, end == std::string_view::npos ? std::string_view::npos : end - body));
        const ojson call = ojson::parse(inner, nullptr, /*allow_exceptions=*/false);
        const bool ok = call.is_object() && call.contains("name") && call["name"].is_string() && !call["name"].get_ref<const std::string &>().empty() &&
                        call.contains("arguments") && call["arguments"].is_object();
        if (!ok) {
            out.calls.clear();
            out.content = std::string(text);
            return out;
        }
        out.calls.push_back({call["name"].get<std::string>(), call["arguments"].dump(-1, ' ', false, ojson::error_handler_t::replace)});
        if (end == std::string_view::npos) break;   // the model ended inside its last call: what it wrote is whole
        at = text.find(k_open, end + k_close.size());
        if (at == std::string_view::npos && !trim(text.substr(end + k_close.size())).empty()) {
            out.calls.clear();   // text after the calls: not a call-only tail, keep it all as content
            out.content = std::string(text);
            return out;
        }
    }
    out.content = std::string(text.substr(0, first));
    return out;
}

size_t tool_call_safe_prefix(ToolCallFormat format, std::string_view text) {
    if (format != ToolCallFormat::Hermes) return text.size();
    if (const size_t p = text.find(k_open); p != std::string_view::npos) return p;
    for (size_t n = std::min(text.size(), k_open.size() - 1); n > 0; --n)   // a tail that may still grow into the marker
        if (text.substr(text.size() - n) == k_open.substr(0, n)) return text.size() - n;
    return text.size();
}

std::string forced_tool_call_grammar(ToolCallFormat format, std::string_view tools_json, const std::string & only,
                                     std::string * error) {
    if (format != ToolCallFormat::Hermes) {
        *error = "this model's chat template writes tool calls in a format moesh does not read";
        return {};
    }
    const ojson tools = ojson::parse(tools_json, nullptr, false);
    if (!tools.is_array()) {
        *error = "tools: not a JSON array";
        return {};
    }
    ojson any = ojson::array();
    std::vector<size_t> index;   // anyOf position -> tools index
    for (size_t i = 0; i < tools.size(); ++i) {
        const ojson & fn = tools[i].at("function");
        const std::string name = fn.at("name").get<std::string>();
        if (!only.empty() && name != only) continue;
        ojson call = ojson::object();
        call["type"] = "object";
        call["properties"] = ojson::object();
        call["properties"]["name"] = {{"const", name}};
        call["properties"]["arguments"] = fn.contains("parameters") ? fn["parameters"] : ojson{{"type", "object"}};
        call["required"] = {"name", "arguments"};
        any.push_back(std::move(call));
        index.push_back(i);
    }
    if (any.empty()) {
        *error = "tool_choice: no such tool '" + only + "'";
        return {};
    }
    std::string why;
    std::string g = json_schema_to_grammar(ojson{{"anyOf", any}}.dump(), &why);
    if (g.empty()) {
        // "... at /anyOf/K/properties/arguments/P: what" is tools[index[K]].function.parameters at /P
        const std::string_view args = "/properties/arguments";
        if (const size_t p = why.find("/anyOf/"); p != std::string::npos) {
            const size_t k = std::strtoul(why.c_str() + p + 7, nullptr, 10);
            const size_t at = why.find(args, p);
            if (k < index.size() && at != std::string::npos) {
                const std::string rest = why.substr(at + args.size());
                why = "tools[" + std::to_string(index[k]) + "].function.parameters" + (rest.rfind('/', 0) == 0 ? " at " + rest : rest);
            }
        }
        *error = why;
        return {};
    }
    // the schema's grammar starts with "root ::= <its top>"; the call wraps that top
    const size_t eol = g.find('\n');
    const std::string top = g.substr(std::string("root ::= ").size(), eol - std::string("root ::= ").size());
    return "root ::= \"<tool_call>\\n\" (" + top + ") \"\\n</tool_call>\"" + g.substr(eol);
}

} // namespace moesh
