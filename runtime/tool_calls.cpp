// Tool calls in the formats of runtime/tool_calls.h: splitting output, holding
// back a call's start while streaming, and what forces a call.
#include "runtime/tool_calls.h"

#include "runtime/json_schema.h"
#include "runtime/reasoning.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <functional>
#include <optional>
#include <utility>

namespace moesh {

namespace {

using ojson = nlohmann::ordered_json;

constexpr std::string_view k_hermes_open = "<tool_call>", k_hermes_close = "</tool_call>";
constexpr std::string_view k_python_tag = "<|python_tag|>";
constexpr std::string_view k_mistral_calls = "[TOOL_CALLS]", k_mistral_args = "[ARGS]", k_mistral_id = "[CALL_ID]";
// DeepSeek's markers: fullwidth bars (U+FF5C) and lower one-eighth blocks (U+2581) for spaces
constexpr std::string_view k_ds_calls_begin = "<\uff5ctool\u2581calls\u2581begin\uff5c>";
constexpr std::string_view k_ds_calls_end = "<\uff5ctool\u2581calls\u2581end\uff5c>";
constexpr std::string_view k_ds_call_begin = "<\uff5ctool\u2581call\u2581begin\uff5c>";
constexpr std::string_view k_ds_call_end = "<\uff5ctool\u2581call\u2581end\uff5c>";
constexpr std::string_view k_ds_sep = "<\uff5ctool\u2581sep\uff5c>";
constexpr std::string_view k_ds_json_open = "\n```json\n", k_ds_json_close = "\n```";
constexpr std::string_view k_kimi_begin = "<|tool_calls_section_begin|>", k_kimi_end = "<|tool_calls_section_end|>";
constexpr std::string_view k_kimi_call_begin = "<|tool_call_begin|>", k_kimi_args = "<|tool_call_argument_begin|>";
constexpr std::string_view k_kimi_call_end = "<|tool_call_end|>";
constexpr std::string_view k_function = "<function=", k_function_end = "</function>";
constexpr std::string_view k_parameter = "<parameter=", k_parameter_end = "</parameter>";
constexpr std::string_view k_arg_key = "<arg_key>", k_arg_key_end = "</arg_key>", k_arg_value = "<arg_value>", k_arg_value_end = "</arg_value>";
constexpr std::string_view k_minimax = "<minimax:tool_call>", k_minimax_end = "</minimax:tool_call>";
constexpr std::string_view k_invoke = "<invoke name=\"", k_invoke_end = "</invoke>", k_mm_parameter = "<parameter name=\"";
// DeepSeek V3.2's and V4's DSML: tags whose names start with ｜DSML｜ (fullwidth bars)
constexpr std::string_view k_dsml_open = "<\uff5cDSML\uff5c", k_dsml_close = "</\uff5cDSML\uff5c";
constexpr std::string_view k_dsml_function_calls = "<\uff5cDSML\uff5cfunction_calls>", k_dsml_function_calls_end = "</\uff5cDSML\uff5cfunction_calls>";
constexpr std::string_view k_dsml_tool_calls = "<\uff5cDSML\uff5ctool_calls>", k_dsml_tool_calls_end = "</\uff5cDSML\uff5ctool_calls>";
constexpr std::string_view k_dsml_invoke = "<\uff5cDSML\uff5cinvoke name=\"", k_dsml_invoke_end = "</\uff5cDSML\uff5cinvoke>";
constexpr std::string_view k_dsml_parameter = "<\uff5cDSML\uff5cparameter name=\"", k_dsml_parameter_end = "</\uff5cDSML\uff5cparameter>";

bool space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

std::string_view trim(std::string_view s) {
    while (!s.empty() && space(s.front())) s.remove_prefix(1);
    while (!s.empty() && space(s.back())) s.remove_suffix(1);
    return s;
}

bool contains(std::string_view t, std::string_view s) { return t.find(s) != std::string_view::npos; }

// Where the JSON value starting at i (after whitespace) ends, or npos when it is not whole: a
// scan of brackets and strings only; the value is then parsed for real.
size_t json_end(std::string_view t, size_t i) {
    while (i < t.size() && space(t[i])) ++i;
    if (i >= t.size() || (t[i] != '{' && t[i] != '[')) return std::string_view::npos;
    int depth = 0;
    for (bool str = false; i < t.size(); ++i) {
        const char c = t[i];
        if (str) {
            if (c == '\\') ++i;
            else if (c == '"') str = false;
        } else if (c == '"') {
            str = true;
        } else if (c == '{' || c == '[') {
            if (++depth > 512) return std::string_view::npos;
        } else if ((c == '}' || c == ']') && --depth == 0) {
            return i + 1;
        }
    }
    return std::string_view::npos;
}

// Arguments: a JSON object, as compact text in its own key order.
std::optional<std::string> arguments_of(const ojson & v) {
    if (!v.is_object()) return std::nullopt;
    return v.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

std::optional<std::string> arguments_text(std::string_view t) {
    const ojson v = ojson::parse(t, nullptr, /*allow_exceptions=*/false);
    return arguments_of(v);
}

bool good_name(std::string_view n) {
    if (n.empty() || n.size() > 256) return false;
    for (const char c : n)
        if (space(c) || c == '<' || c == '[' || c == '{' || c == '"') return false;
    return true;
}

// {"name": N, <args_key>: {...}} (Llama 3 writes "parameters", the others "arguments").
std::optional<ParsedCall> call_object(const ojson & v, bool parameters_too) {
    if (!v.is_object()) return std::nullopt;
    const auto n = v.find("name");
    if (n == v.end() || !n->is_string() || !good_name(n->get_ref<const std::string &>())) return std::nullopt;
    auto a = v.find("arguments");
    if (a == v.end() && parameters_too) a = v.find("parameters");
    if (a == v.end()) return std::nullopt;
    std::optional<std::string> args = arguments_of(*a);
    if (!args && a->is_string()) args = arguments_text(a->get_ref<const std::string &>());   // arguments as JSON text
    if (!args) return std::nullopt;
    return ParsedCall{n->get<std::string>(), std::move(*args)};
}

// Reads the calls of `t`, which starts where they start. nullopt when they are not well formed.
using Calls = std::optional<std::vector<ParsedCall>>;

// A cursor over the call text: markers, names and JSON values in order.
struct Reader {
    std::string_view t;
    size_t i = 0;
    void skip_space() {
        while (i < t.size() && space(t[i])) ++i;
    }
    bool eat(std::string_view s) {
        if (t.compare(i, s.size(), s) != 0) return false;
        i += s.size();
        return true;
    }
    bool done() {
        skip_space();
        return i >= t.size();
    }
    // text up to the first of the markers (or the end), and the cursor at that marker
    std::string_view until(std::initializer_list<std::string_view> markers) {
        size_t end = t.size();
        for (std::string_view m : markers) end = std::min(end, t.find(m, i));
        const std::string_view s = t.substr(i, end - i);
        i = end;
        return s;
    }
    std::optional<std::string> args() {
        const size_t e = json_end(t, i);
        if (e == std::string_view::npos) return std::nullopt;
        std::optional<std::string> a = arguments_text(t.substr(i, e - i));
        i = e;
        return a;
    }
    std::optional<ojson> value() {
        const size_t e = json_end(t, i);
        if (e == std::string_view::npos) return std::nullopt;
        ojson v = ojson::parse(t.substr(i, e - i), nullptr, false);
        i = e;
        if (v.is_discarded()) return std::nullopt;
        return v;
    }
};

Calls hermes_calls(std::string_view t) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_hermes_open)) {
        const std::optional<ojson> v = r.value();
        std::optional<ParsedCall> c = v ? call_object(*v, false) : std::nullopt;
        if (!c) return std::nullopt;
        calls.push_back(std::move(*c));
        r.skip_space();
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;   // ended inside its last call
        r.skip_space();
    }
    return r.done() ? Calls(std::move(calls)) : std::nullopt;
}

Calls llama3_calls(std::string_view t) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    r.skip_space();
    r.eat(k_python_tag);
    do {
        const std::optional<ojson> v = r.value();
        std::optional<ParsedCall> c = v ? call_object(*v, true) : std::nullopt;
        if (!c) return std::nullopt;
        calls.push_back(std::move(*c));
        r.skip_space();
    } while (r.eat(";") || (!r.done() && r.t[r.i] == '{'));   // several, as some fine-tunes write them
    return r.done() ? Calls(std::move(calls)) : std::nullopt;
}

Calls mistral_calls(std::string_view t) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_mistral_calls)) {
        const std::optional<ojson> v = r.value();
        if (!v) return std::nullopt;
        const ojson list = v->is_array() ? *v : ojson::array({*v});
        for (const ojson & o : list) {
            std::optional<ParsedCall> c = call_object(o, false);
            if (!c) return std::nullopt;
            calls.push_back(std::move(*c));
        }
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

Calls mistral_args_calls(std::string_view t) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_mistral_calls)) {
        const std::string_view name = trim(r.until({k_mistral_args, k_mistral_id}));
        if (r.eat(k_mistral_id)) r.until({k_mistral_args});
        std::optional<std::string> args = r.eat(k_mistral_args) ? r.args() : std::nullopt;
        if (!good_name(name) || !args) return std::nullopt;
        calls.push_back({std::string(name), std::move(*args)});
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

// DeepSeek V3.1 (r1 false) and R1 / V3 (r1 true); the model may end inside its last call.
Calls deepseek_calls(std::string_view t, bool r1) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    r.eat(k_ds_calls_begin);
    r.skip_space();
    while (r.eat(k_ds_call_begin)) {
        std::string_view name;
        if (r1) {
            r.until({k_ds_sep});   // the call's type, "function"
            if (!r.eat(k_ds_sep)) return std::nullopt;
            name = trim(r.until({k_ds_json_open}));
            if (!r.eat(k_ds_json_open)) return std::nullopt;
        } else {
            name = trim(r.until({k_ds_sep}));
            if (!r.eat(k_ds_sep)) return std::nullopt;
        }
        std::optional<std::string> args = r.args();
        if (!good_name(name) || !args) return std::nullopt;
        calls.push_back({std::string(name), std::move(*args)});
        if (r1 && !r.eat(k_ds_json_close) && !r.done()) return std::nullopt;
        r.skip_space();
        if (!r.eat(k_ds_call_end)) break;
        r.skip_space();
    }
    r.eat(k_ds_calls_end);
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

Calls kimi_calls(std::string_view t) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    r.eat(k_kimi_begin);
    r.skip_space();
    while (r.eat(k_kimi_call_begin)) {
        std::string_view id = trim(r.until({k_kimi_args}));   // functions.get_weather:0
        if (!r.eat(k_kimi_args)) return std::nullopt;
        if (id.substr(0, 10) == "functions.") id.remove_prefix(10);
        if (const size_t colon = id.rfind(':'); colon != std::string_view::npos) id = id.substr(0, colon);
        std::optional<std::string> args = r.args();
        if (!good_name(id) || !args) return std::nullopt;
        calls.push_back({std::string(id), std::move(*args)});
        r.skip_space();
        if (!r.eat(k_kimi_call_end)) break;
        r.skip_space();
    }
    r.eat(k_kimi_end);
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

// ---- XML formats: values are text, typed by the tool's schema ----

// The schema of parameter `key` of the tool `name` in tools (a request's tools), or null.
const ojson * param_schema(const ojson & tools, std::string_view name, const std::string & key) {
    if (!tools.is_array()) return nullptr;
    for (const ojson & t : tools) {
        const auto fn = t.find("function");
        if (fn == t.end() || !fn->is_object() || fn->value("name", std::string()) != name) continue;
        const auto params = fn->find("parameters");
        if (params == fn->end() || !params->is_object()) return nullptr;
        const auto props = params->find("properties");
        if (props == params->end() || !props->is_object()) return nullptr;
        const auto p = props->find(key);
        return p == props->end() ? nullptr : &*p;
    }
    return nullptr;
}

bool has_type(const ojson * schema, std::string_view type) {
    if (!schema || !schema->is_object()) return false;
    const auto t = schema->find("type");
    if (t == schema->end()) return false;
    if (t->is_string()) return t->get_ref<const std::string &>() == type;
    if (t->is_array())
        for (const ojson & x : *t)
            if (x.is_string() && x.get_ref<const std::string &>() == type) return true;
    return false;
}

// A value written as text, as JSON of the type its schema gives (JSON or Python's str() of it);
// text when it is a string, the schema says nothing, or the text is not of the type.
ojson typed_value(std::string_view raw, const ojson * schema) {
    if (!schema || !schema->is_object()) return std::string(raw);   // not a parameter of the schema: text
    const bool typed = schema->contains("type");
    if (typed ? has_type(schema, "string") : !(schema->contains("anyOf") || schema->contains("oneOf"))) return std::string(raw);
    const std::string_view t = trim(raw);
    if (!typed || has_type(schema, "boolean")) {
        if (t == "True") return true;
        if (t == "False") return false;
    }
    if ((!typed || has_type(schema, "null")) && t == "None") return nullptr;
    ojson v = ojson::parse(t, nullptr, false);
    if (!v.is_discarded() && !v.is_string()) return v;
    return std::string(raw);
}

// Qwen3-Coder writes a value between newlines: one on each side is the format's.
std::string_view between_newlines(std::string_view v) {
    if (!v.empty() && v.front() == '\n') v.remove_prefix(1);
    if (!v.empty() && v.back() == '\n') v.remove_suffix(1);
    return v;
}

Calls qwen_xml_calls(std::string_view t, const ojson & tools) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_hermes_open)) {
        r.skip_space();
        if (!r.eat(k_function)) return std::nullopt;
        const std::string_view name = r.until({">"});
        if (!r.eat(">") || !good_name(name)) return std::nullopt;
        ojson args = ojson::object();
        for (r.skip_space(); r.eat(k_parameter); r.skip_space()) {
            const std::string key(r.until({">"}));
            if (!r.eat(">") || key.empty()) return std::nullopt;
            const std::string_view value = r.until({k_parameter_end});
            if (!r.eat(k_parameter_end)) return std::nullopt;
            args[key] = typed_value(between_newlines(value), param_schema(tools, name, key));
        }
        calls.push_back({std::string(name), *arguments_of(args)});
        if (!r.eat(k_function_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;   // ended inside its last call
        r.skip_space();
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

Calls glm_calls(std::string_view t, const ojson & tools) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_hermes_open)) {
        const std::string_view name = trim(r.until({k_arg_key, k_hermes_close}));
        if (!good_name(name)) return std::nullopt;
        ojson args = ojson::object();
        for (r.skip_space(); r.eat(k_arg_key); r.skip_space()) {
            const std::string key(trim(r.until({k_arg_key_end})));
            if (!r.eat(k_arg_key_end) || key.empty()) return std::nullopt;
            r.skip_space();
            if (!r.eat(k_arg_value)) return std::nullopt;
            const std::string_view value = r.until({k_arg_value_end});
            if (!r.eat(k_arg_value_end)) return std::nullopt;
            args[key] = typed_value(value, param_schema(tools, name, key));
        }
        calls.push_back({std::string(name), *arguments_of(args)});
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

Calls minimax_calls(std::string_view t, const ojson & tools) {
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(k_minimax)) {
        for (r.skip_space(); r.eat(k_invoke); r.skip_space()) {
            const std::string_view name = r.until({"\""});
            if (!r.eat("\">") || !good_name(name)) return std::nullopt;
            ojson args = ojson::object();
            for (r.skip_space(); r.eat(k_mm_parameter); r.skip_space()) {
                const std::string key(r.until({"\""}));
                if (!r.eat("\">") || key.empty()) return std::nullopt;
                const std::string_view value = r.until({k_parameter_end});
                if (!r.eat(k_parameter_end)) return std::nullopt;
                args[key] = typed_value(value, param_schema(tools, name, key));
            }
            calls.push_back({std::string(name), *arguments_of(args)});
            if (!r.eat(k_invoke_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        }
        if (!r.eat(k_minimax_end)) return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

// DSML: each value says whether it is a string (string="true": as written) or JSON ("false").
Calls dsml_calls(std::string_view t, bool v4, const ojson & tools) {
    const std::string_view block = v4 ? k_dsml_tool_calls : k_dsml_function_calls, block_end = v4 ? k_dsml_tool_calls_end : k_dsml_function_calls_end;
    std::vector<ParsedCall> calls;
    Reader r{t};
    while (r.eat(block)) {
        for (r.skip_space(); r.eat(k_dsml_invoke); r.skip_space()) {
            const std::string_view name = r.until({"\""});
            if (!r.eat("\">") || !good_name(name)) return std::nullopt;
            ojson args = ojson::object();
            for (r.skip_space(); r.eat(k_dsml_parameter); r.skip_space()) {
                const std::string key(r.until({"\""}));
                if (!r.eat("\"") || key.empty()) return std::nullopt;
                r.skip_space();
                std::string_view is_string;
                if (r.eat("string=\"")) {
                    is_string = r.until({"\""});
                    if (!r.eat("\"")) return std::nullopt;
                }
                if (!r.eat(">")) return std::nullopt;
                const std::string_view value = r.until({k_dsml_parameter_end});
                if (!r.eat(k_dsml_parameter_end)) return std::nullopt;
                if (is_string == "true") {
                    args[key] = std::string(value);
                } else if (is_string == "false") {
                    const ojson v = ojson::parse(trim(value), nullptr, false);
                    args[key] = v.is_discarded() ? ojson(std::string(value)) : v;
                } else {
                    args[key] = typed_value(value, param_schema(tools, name, key));
                }
            }
            calls.push_back({std::string(name), *arguments_of(args)});
            if (!r.eat(k_dsml_invoke_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        }
        if (!r.eat(block_end)) return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
}

// Where the calls start in `text` (npos: none), for every format but harmony.
size_t calls_start(ToolCallFormat f, std::string_view text) {
    switch (f) {
    case ToolCallFormat::Hermes: return text.find(k_hermes_open);
    case ToolCallFormat::Llama3: {   // the whole reply is the call
        const std::string_view t = trim(text);
        const bool call = !t.empty() && (t.front() == '{' || t.substr(0, k_python_tag.size()) == k_python_tag);
        return call ? size_t(t.data() - text.data()) : std::string_view::npos;
    }
    case ToolCallFormat::Mistral:
    case ToolCallFormat::MistralArgs: return text.find(k_mistral_calls);
    case ToolCallFormat::DeepSeekV31:
    case ToolCallFormat::DeepSeekR1: return std::min(text.find(k_ds_calls_begin), text.find(k_ds_call_begin));
    case ToolCallFormat::KimiK2: return std::min(text.find(k_kimi_begin), text.find(k_kimi_call_begin));
    case ToolCallFormat::QwenXml:
    case ToolCallFormat::GlmXml: return text.find(k_hermes_open);
    case ToolCallFormat::MiniMaxXml: return text.find(k_minimax);
    case ToolCallFormat::DsmlV32: return text.find(k_dsml_function_calls);
    case ToolCallFormat::DsmlV4: return text.find(k_dsml_tool_calls);
    case ToolCallFormat::None:
    case ToolCallFormat::Harmony: break;
    }
    return std::string_view::npos;
}

Calls read_calls(ToolCallFormat f, std::string_view t, const ojson & tools) {
    switch (f) {
    case ToolCallFormat::Hermes: return hermes_calls(t);
    case ToolCallFormat::Llama3: return llama3_calls(t);
    case ToolCallFormat::Mistral: return mistral_calls(t);
    case ToolCallFormat::MistralArgs: return mistral_args_calls(t);
    case ToolCallFormat::DeepSeekV31: return deepseek_calls(t, false);
    case ToolCallFormat::DeepSeekR1: return deepseek_calls(t, true);
    case ToolCallFormat::KimiK2: return kimi_calls(t);
    case ToolCallFormat::QwenXml: return qwen_xml_calls(t, tools);
    case ToolCallFormat::GlmXml: return glm_calls(t, tools);
    case ToolCallFormat::MiniMaxXml: return minimax_calls(t, tools);
    case ToolCallFormat::DsmlV32: return dsml_calls(t, false, tools);
    case ToolCallFormat::DsmlV4: return dsml_calls(t, true, tools);
    case ToolCallFormat::None:
    case ToolCallFormat::Harmony: break;
    }
    return std::nullopt;
}

// ---- forced calls ----

// A GBNF string literal.
std::string literal(std::string_view s) {
    std::string out = "\"";
    for (const char c : s) {
        if (c == '"' || c == '\\') out += '\\', out += c;
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else out += c;
    }
    return out + "\"";
}

// A schema's grammar with its top wrapped: root ::= before (top) after (both GBNF), the schema's
// other rules kept.
std::string wrap(const std::string & g, const std::string & before, const std::string & after) {
    constexpr std::string_view k_root = "root ::= ";
    const size_t eol = g.find('\n');
    const std::string top = g.substr(k_root.size(), eol - k_root.size());
    return "root ::= " + before + " (" + top + ") " + after + g.substr(eol);
}

// The schema converter's "... at /anyOf/K/properties/<key>/P: what" is tools[index[K]].function.parameters at /P.
std::string tools_error(std::string why, const std::vector<size_t> & index, std::string_view key) {
    if (const size_t p = why.find("/anyOf/"); p != std::string::npos) {
        const size_t k = std::strtoul(why.c_str() + p + 7, nullptr, 10);
        const std::string args = "/properties/" + std::string(key);
        const size_t at = why.find(args, p);
        if (k < index.size() && at != std::string::npos) {
            const std::string rest = why.substr(at + args.size());
            why = "tools[" + std::to_string(index[k]) + "].function.parameters" + (rest.rfind('/', 0) == 0 ? " at " + rest : rest);
        }
    }
    return why;
}

// The XML formats' pieces: a call's opening up to its parameters, a parameter's around its value,
// and what closes the call.
bool is_xml(ToolCallFormat f) {
    return f == ToolCallFormat::QwenXml || f == ToolCallFormat::GlmXml || f == ToolCallFormat::MiniMaxXml || f == ToolCallFormat::DsmlV32 ||
           f == ToolCallFormat::DsmlV4;
}

std::string xml_open(ToolCallFormat f, const std::string & name) {
    if (f == ToolCallFormat::QwenXml) return std::string(k_hermes_open) + "\n" + std::string(k_function) + name + ">\n";
    if (f == ToolCallFormat::GlmXml) return std::string(k_hermes_open) + name + "\n";
    if (f == ToolCallFormat::DsmlV32 || f == ToolCallFormat::DsmlV4)
        return std::string(f == ToolCallFormat::DsmlV4 ? k_dsml_tool_calls : k_dsml_function_calls) + "\n" + std::string(k_dsml_invoke) + name + "\">\n";
    return std::string(k_minimax) + "\n" + std::string(k_invoke) + name + "\">\n";
}

// `text`: the value is a string, written as it is (DSML says so in the tag; the others do not say).
std::pair<std::string, std::string> xml_param(ToolCallFormat f, const std::string & key, bool text) {
    if (f == ToolCallFormat::QwenXml) return {std::string(k_parameter) + key + ">\n", "\n" + std::string(k_parameter_end) + "\n"};
    if (f == ToolCallFormat::GlmXml)
        return {std::string(k_arg_key) + key + std::string(k_arg_key_end) + "\n" + std::string(k_arg_value), std::string(k_arg_value_end) + "\n"};
    if (f == ToolCallFormat::DsmlV32 || f == ToolCallFormat::DsmlV4)
        return {std::string(k_dsml_parameter) + key + "\" string=\"" + (text ? "true" : "false") + "\">", std::string(k_dsml_parameter_end) + "\n"};
    return {std::string(k_mm_parameter) + key + "\">", std::string(k_parameter_end) + "\n"};
}

std::string xml_close(ToolCallFormat f) {
    if (f == ToolCallFormat::QwenXml) return std::string(k_function_end) + "\n" + std::string(k_hermes_close);
    if (f == ToolCallFormat::GlmXml) return std::string(k_hermes_close);
    if (f == ToolCallFormat::DsmlV32 || f == ToolCallFormat::DsmlV4)
        return std::string(k_dsml_invoke_end) + "\n" + std::string(f == ToolCallFormat::DsmlV4 ? k_dsml_tool_calls_end : k_dsml_function_calls_end);
    return std::string(k_invoke_end) + "\n" + std::string(k_minimax_end);
}

// Values as the XML formats write them: text for strings (not holding "</"), JSON for the rest.
constexpr std::string_view k_xml_value_rules = R"(
xv-text ::= ([^<] | "<" [^/])*
xv-int ::= "-"? [0-9]{1,18}
xv-num ::= "-"? [0-9]{1,18} ("." [0-9]{1,18})? ([eE] [-+]? [0-9]{1,4})?
xv-str ::= "\"" ([^"\\\x00-\x1f] | "\\" ["\\/bfnrt] | "\\u" [0-9a-fA-F]{4})* "\""
xv-ws ::= [ \t\n]{0,8}
xv-json ::= xv-obj | xv-arr | xv-str | xv-num | "true" | "false" | "null"
xv-obj ::= "{" xv-ws (xv-str xv-ws ":" xv-ws xv-json xv-ws ("," xv-ws xv-str xv-ws ":" xv-ws xv-json xv-ws)*)? "}"
xv-arr ::= "[" xv-ws (xv-json xv-ws ("," xv-ws xv-json xv-ws)*)? "]"
)";

// A grammar for an XML call's parameters, to its close: the required ones, then the optional ones,
// each at most once, in the schema's order; values by type. `seq` writes the format's text.
template <class Seq>
std::string xml_params_grammar(ToolCallFormat f, const ojson & schema, const Seq & seq) {
    std::string root = "root ::=";
    const ojson props = schema.is_object() && schema.contains("properties") && schema["properties"].is_object() ? schema["properties"] : ojson::object();
    const ojson required = schema.is_object() && schema.contains("required") && schema["required"].is_array() ? schema["required"] : ojson::array();
    for (const auto & [key, p] : props.items()) {
        std::string value = "xv-text";
        bool text = true;   // written as it is (a string), not as JSON
        if (p.is_object() && p.contains("enum") && p["enum"].is_array() && !p["enum"].empty()) {
            for (const ojson & e : p["enum"]) text = text && e.is_string();
            value = "(";
            for (const ojson & e : p["enum"]) value += (value.size() > 1 ? " | " : "") + literal(e.is_string() ? e.get<std::string>() : e.dump());
            value += ")";
        } else if (has_type(&p, "string")) {
        } else if (has_type(&p, "integer")) {
            value = "xv-int", text = false;
        } else if (has_type(&p, "number")) {
            value = "xv-num", text = false;
        } else if (has_type(&p, "boolean")) {
            value = "(\"true\" | \"false\")", text = false;
        } else if (p.is_object() && p.contains("type")) {
            value = "xv-json", text = false;
        }
        const auto [open, close] = xml_param(f, key, text);
        const bool needed = std::find(required.begin(), required.end(), ojson(key)) != required.end();
        root += " (" + seq(open) + " " + value + " " + seq(close) + ")" + (needed ? "" : "?");
    }
    return root + " " + seq(xml_close(f)) + std::string(k_xml_value_rules);
}

// A grammar's rules renamed with a prefix, so that several can live in one grammar: every rule
// name (a bare word outside literals, classes, token references, repetition counts and comments).
std::string prefix_rules(std::string_view g, const std::string & prefix) {
    std::string out;
    auto word = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'; };
    for (size_t i = 0; i < g.size();) {
        const char c = g[i];
        if (c == '"' || c == '[' || c == '<' || c == '{') {   // copied through their close, escapes kept
            const char end = c == '"' ? '"' : c == '[' ? ']' : c == '<' ? '>' : '}';
            size_t j = i + 1;
            while (j < g.size() && g[j] != end) j += (g[j] == '\\' && c != '<' && c != '{') ? 2 : 1;
            out.append(g.substr(i, std::min(j + 1, g.size()) - i));
            i = j + 1;
        } else if (c == '#') {
            const size_t j = std::min(g.find('\n', i), g.size());
            out.append(g.substr(i, j - i));
            i = j;
        } else if (word(c)) {
            size_t j = i;
            while (j < g.size() && word(g[j])) ++j;
            out += prefix;
            out.append(g.substr(i, j - i));
            i = j;
        } else {
            out += c;
            ++i;
        }
    }
    return out;
}

} // namespace

ToolCallFormat tool_call_format(std::string_view t) {
    if (template_uses_harmony(t) && contains(t, "functions.")) return ToolCallFormat::Harmony;
    if (contains(t, "\uff5cDSML\uff5c")) return contains(t, "function_calls>") ? ToolCallFormat::DsmlV32 : ToolCallFormat::DsmlV4;
    if (contains(t, k_minimax) && contains(t, k_invoke)) return ToolCallFormat::MiniMaxXml;
    if (contains(t, k_hermes_open) && contains(t, k_function) && contains(t, k_parameter)) return ToolCallFormat::QwenXml;
    if (contains(t, k_hermes_open) && contains(t, k_arg_key) && contains(t, k_arg_value)) return ToolCallFormat::GlmXml;
    if (contains(t, k_ds_call_begin)) return contains(t, "```json") ? ToolCallFormat::DeepSeekR1 : ToolCallFormat::DeepSeekV31;
    if (contains(t, k_kimi_call_begin)) return ToolCallFormat::KimiK2;
    if (contains(t, k_mistral_calls)) return contains(t, k_mistral_args) ? ToolCallFormat::MistralArgs : ToolCallFormat::Mistral;
    // Qwen3-Coder and Nemotron write XML parameters inside <tool_call>, GLM <arg_key> pairs
    if (contains(t, k_hermes_open) && !contains(t, "<function=") && !contains(t, "<arg_key>") &&
        (contains(t, "\"arguments\": ") || contains(t, "\\\"arguments\\\": ")))
        return ToolCallFormat::Hermes;
    if (contains(t, "function name, \"parameters\"")) return ToolCallFormat::Llama3;
    return ToolCallFormat::None;
}

std::string_view tool_call_format_name(ToolCallFormat f) {
    switch (f) {
    case ToolCallFormat::None: return "none";
    case ToolCallFormat::Hermes: return "hermes";
    case ToolCallFormat::Llama3: return "llama3";
    case ToolCallFormat::Mistral: return "mistral";
    case ToolCallFormat::MistralArgs: return "mistral-args";
    case ToolCallFormat::DeepSeekV31: return "deepseek-v3.1";
    case ToolCallFormat::DeepSeekR1: return "deepseek-r1";
    case ToolCallFormat::KimiK2: return "kimi-k2";
    case ToolCallFormat::Harmony: return "harmony";
    case ToolCallFormat::QwenXml: return "qwen3-coder";
    case ToolCallFormat::GlmXml: return "glm";
    case ToolCallFormat::MiniMaxXml: return "minimax";
    case ToolCallFormat::DsmlV32: return "deepseek-v3.2";
    case ToolCallFormat::DsmlV4: return "deepseek-v4";
    }
    return "none";
}

std::vector<std::string_view> tool_call_markers(ToolCallFormat f) {
    switch (f) {
    case ToolCallFormat::Hermes: return {k_hermes_open, k_hermes_close};
    case ToolCallFormat::Llama3: return {k_python_tag};
    case ToolCallFormat::Mistral: return {k_mistral_calls};
    case ToolCallFormat::MistralArgs: return {k_mistral_calls, k_mistral_args, k_mistral_id};
    case ToolCallFormat::DeepSeekV31:
    case ToolCallFormat::DeepSeekR1: return {k_ds_calls_begin, k_ds_calls_end, k_ds_call_begin, k_ds_call_end, k_ds_sep};
    case ToolCallFormat::KimiK2: return {k_kimi_begin, k_kimi_end, k_kimi_call_begin, k_kimi_args, k_kimi_call_end};
    case ToolCallFormat::Harmony: return {"<|channel|>", "<|message|>", "<|constrain|>", "<|start|>", "<|end|>", "<|call|>"};
    case ToolCallFormat::QwenXml: return {k_hermes_open, k_hermes_close};
    case ToolCallFormat::GlmXml: return {k_hermes_open, k_hermes_close, k_arg_key, k_arg_key_end, k_arg_value, k_arg_value_end};
    case ToolCallFormat::MiniMaxXml: return {k_minimax, k_minimax_end};
    case ToolCallFormat::DsmlV32: return {k_dsml_function_calls, k_dsml_function_calls_end, k_dsml_open, k_dsml_close};
    case ToolCallFormat::DsmlV4: return {k_dsml_tool_calls, k_dsml_tool_calls_end, k_dsml_open, k_dsml_close};
    case ToolCallFormat::None: break;
    }
    return {};
}

ParsedOutput parse_tool_calls(ToolCallFormat format, std::string_view text, std::string_view tools_json) {
    ParsedOutput out;
    if (format == ToolCallFormat::Harmony) {
        HarmonySplit h = split_harmony(text, true);
        out.content = std::move(h.content);
        for (HarmonySplit::Call & c : h.calls) {
            const std::string_view to = c.recipient;
            std::optional<std::string> args = arguments_text(trim(c.body));
            if (to.substr(0, 10) == "functions." && good_name(to.substr(10)) && args) {
                out.calls.push_back({std::string(to.substr(10)), std::move(*args)});
            } else {   // not a call this reads: the model's words stay
                out.content += (out.content.empty() ? "" : "\n\n") + c.body;
            }
        }
        return out;
    }
    const size_t first = calls_start(format, text);
    if (first != std::string_view::npos)
        if (Calls calls = read_calls(format, text.substr(first),
                                     tools_json.empty() ? ojson() : ojson::parse(tools_json, nullptr, false))) {
            out.calls = std::move(*calls);
            out.content = std::string(text.substr(0, first));
            return out;
        }
    out.content = std::string(text);
    return out;
}

size_t tool_call_safe_prefix(ToolCallFormat format, std::string_view text) {
    if (format == ToolCallFormat::None || format == ToolCallFormat::Harmony) return text.size();
    if (format == ToolCallFormat::Llama3) {   // a reply that is, or may still become, a call is held back whole
        const std::string_view t = trim(text);
        if (t.empty() || t.front() == '{') return 0;
        const size_t n = std::min(t.size(), k_python_tag.size());
        return t.substr(0, n) == k_python_tag.substr(0, n) ? 0 : text.size();
    }
    if (const size_t p = calls_start(format, text); p != std::string_view::npos) return p;
    size_t safe = text.size();
    for (std::string_view m : tool_call_markers(format))   // a tail that may still grow into an opening marker
        for (size_t n = std::min(text.size(), m.size() - 1); n > 0; --n)
            if (text.substr(text.size() - n) == m.substr(0, n)) {
                safe = std::min(safe, text.size() - n);
                break;
            }
    return safe;
}

std::string write_tool_call(ToolCallFormat f, const std::string & name, const std::string & args) {
    const std::string n = ojson(name).dump();
    switch (f) {
    case ToolCallFormat::Hermes: return "<tool_call>\n{\"name\": " + n + ", \"arguments\": " + args + "}\n</tool_call>";
    case ToolCallFormat::Llama3: return "{\"name\": " + n + ", \"parameters\": " + args + "}";
    case ToolCallFormat::Mistral: return std::string(k_mistral_calls) + "[{\"name\": " + n + ", \"arguments\": " + args + "}]";
    case ToolCallFormat::MistralArgs: return std::string(k_mistral_calls) + name + std::string(k_mistral_args) + args;
    case ToolCallFormat::DeepSeekV31:
        return std::string(k_ds_calls_begin) + std::string(k_ds_call_begin) + name + std::string(k_ds_sep) + args +
               std::string(k_ds_call_end) + std::string(k_ds_calls_end);
    case ToolCallFormat::DeepSeekR1:
        return std::string(k_ds_calls_begin) + std::string(k_ds_call_begin) + "function" + std::string(k_ds_sep) + name +
               std::string(k_ds_json_open) + args + std::string(k_ds_json_close) + std::string(k_ds_call_end) + std::string(k_ds_calls_end);
    case ToolCallFormat::KimiK2:
        return std::string(k_kimi_begin) + std::string(k_kimi_call_begin) + "functions." + name + ":0" + std::string(k_kimi_args) + args +
               std::string(k_kimi_call_end) + std::string(k_kimi_end);
    case ToolCallFormat::Harmony: return "<|channel|>commentary to=functions." + name + " <|constrain|>json<|message|>" + args + "<|call|>";
    case ToolCallFormat::QwenXml:
    case ToolCallFormat::GlmXml:
    case ToolCallFormat::MiniMaxXml:
    case ToolCallFormat::DsmlV32:
    case ToolCallFormat::DsmlV4: {
        const ojson a = ojson::parse(args, nullptr, false);
        std::string out = xml_open(f, name);
        if (a.is_object())
            for (const auto & [k, v] : a.items()) {
                const auto [open, close] = xml_param(f, k, v.is_string());
                out += open + (v.is_string() ? v.get<std::string>() : v.dump()) + close;
            }
        return out + xml_close(f);
    }
    case ToolCallFormat::None: break;
    }
    return {};
}

std::string tools_system_prompt(ToolCallFormat format, std::string_view tools_json) {
    const ojson tools = ojson::parse(tools_json, nullptr, false);
    std::string out = "You can call these tools, given as JSON, one per line:\n";
    if (tools.is_array())
        for (const ojson & t : tools) out += (t.contains("function") ? t["function"] : t).dump(-1, ' ', false, ojson::error_handler_t::replace) + "\n";
    out += "\nTo call a tool, reply with the call in exactly this form, with the tool's name and a JSON object of arguments "
           "that follows its parameters schema:\n" +
           write_tool_call(format, "tool_name", "{\"argument\": \"value\"}") +
           "\nTo call several tools, write one call after the other. Answer in text when no tool is needed.";
    return out;
}

std::string force_tool_call(ToolCallFormat format, std::string_view tools_json, const std::string & only,
                            const std::function<int32_t(std::string_view)> & special_id, std::string * error) {
    if (format == ToolCallFormat::None) {
        *error = "this model's chat template writes tool calls in a format moesh does not read";
        return {};
    }
    const ojson tools = ojson::parse(tools_json, nullptr, false);
    if (!tools.is_array()) {
        *error = "tools: not a JSON array";
        return {};
    }
    std::vector<size_t> index;   // the candidates, as tools indices
    for (size_t i = 0; i < tools.size(); ++i)
        if (only.empty() || tools[i].at("function").at("name") == only) index.push_back(i);
    if (index.empty()) {
        *error = "tool_choice: no such tool '" + only + "'";
        return {};
    }
    auto params = [&](size_t i) -> ojson {
        const ojson & fn = tools[i].at("function");
        return fn.contains("parameters") ? fn["parameters"] : ojson{{"type", "object"}};
    };
    // Text of the format as grammar: its markers as token references where the vocabulary holds
    // them as special tokens (a grammar never lets a special token through as text), the rest literal.
    std::vector<std::string_view> markers = tool_call_markers(format);
    std::sort(markers.begin(), markers.end(), [](std::string_view a, std::string_view b) { return a.size() > b.size(); });
    auto seq = [&](std::string_view s) {
        std::string out, text;
        auto flush = [&] {
            if (!text.empty()) out += (out.empty() ? "" : " ") + literal(text);
            text.clear();
        };
        for (size_t i = 0; i < s.size();) {
            bool marked = false;
            for (std::string_view m : markers)
                if (s.compare(i, m.size(), m) == 0) {
                    if (const int32_t id = special_id ? special_id(m) : -1; id >= 0) {
                        flush();
                        out += (out.empty() ? "<[" : " <[") + std::to_string(id) + "]>";
                        i += m.size();
                        marked = true;
                    }
                    break;
                }
            if (!marked) text += s[i++];
        }
        flush();
        return out.empty() ? std::string("\"\"") : out;
    };
    // Formats whose call is plain JSON: one schema for every candidate, name included.
    if (format == ToolCallFormat::Hermes || format == ToolCallFormat::Llama3 || format == ToolCallFormat::Mistral) {
        const char * key = format == ToolCallFormat::Llama3 ? "parameters" : "arguments";
        ojson any = ojson::array();
        for (const size_t i : index) {
            ojson call = ojson::object();
            call["type"] = "object";
            call["properties"] = ojson::object();
            call["properties"]["name"] = {{"const", tools[i]["function"]["name"]}};
            call["properties"][key] = params(i);
            call["required"] = {"name", key};
            any.push_back(std::move(call));
        }
        std::string why;
        const std::string g = json_schema_to_grammar(ojson{{"anyOf", any}}.dump(), &why);
        if (g.empty()) {
            *error = tools_error(why, index, key);
            return {};
        }
        if (format == ToolCallFormat::Hermes) return wrap(g, seq("<tool_call>\n"), seq("\n</tool_call>"));
        if (format == ToolCallFormat::Llama3) return g;
        return wrap(g, seq(k_mistral_calls) + " \"[\"", "\"]\"");
    }
    // The others write the name outside the arguments: a rule per candidate, its arguments' grammar
    // (the schema's, or the XML parameters') under names of its own.
    const bool xml = is_xml(format);
    std::string before, after, alternatives, rules;
    switch (format) {
    case ToolCallFormat::MistralArgs: before = seq(k_mistral_calls); break;
    case ToolCallFormat::DeepSeekV31:
    case ToolCallFormat::DeepSeekR1:
        before = seq(std::string(k_ds_calls_begin) + std::string(k_ds_call_begin));
        after = seq(std::string(k_ds_call_end) + std::string(k_ds_calls_end));
        break;
    case ToolCallFormat::KimiK2:
        before = seq(std::string(k_kimi_begin) + std::string(k_kimi_call_begin));
        after = seq(std::string(k_kimi_call_end) + std::string(k_kimi_end));
        break;
    case ToolCallFormat::Harmony: before = seq("<|channel|>commentary to=functions."); break;
    default: break;
    }
    for (size_t k = 0; k < index.size(); ++k) {
        const std::string name = tools[index[k]]["function"]["name"].get<std::string>();
        const std::string prefix = "t" + std::to_string(k) + "-";
        std::string g, open, close;
        if (xml) {
            g = xml_params_grammar(format, params(index[k]), seq);
            open = seq(xml_open(format, name));
        } else {
            std::string why;
            g = json_schema_to_grammar(params(index[k]).dump(), &why);
            if (g.empty()) {
                const std::string at = why.find(" at /") != std::string::npos ? why.substr(why.find(" at /")) : ": " + why;
                *error = "tools[" + std::to_string(index[k]) + "].function.parameters" + at;
                return {};
            }
            switch (format) {
            case ToolCallFormat::MistralArgs: open = seq(name + std::string(k_mistral_args)); break;
            case ToolCallFormat::DeepSeekV31: open = seq(name + std::string(k_ds_sep)); break;
            case ToolCallFormat::DeepSeekR1:
                open = seq("function" + std::string(k_ds_sep) + name + std::string(k_ds_json_open));
                close = seq(k_ds_json_close);
                break;
            case ToolCallFormat::KimiK2: open = seq("functions." + name + ":0" + std::string(k_kimi_args)); break;
            case ToolCallFormat::Harmony: open = seq(name + " <|constrain|>json<|message|>"); break;
            default: break;
            }
        }
        alternatives += (k ? " | (" : "(") + open + " " + prefix + "root" + (close.empty() ? "" : " " + close) + ")";
        rules += "\n" + prefix_rules(g, prefix);
    }
    return "root ::= " + before + " (" + alternatives + ")" + (after.empty() ? "" : " " + after) + rules;
}

} // namespace moesh
