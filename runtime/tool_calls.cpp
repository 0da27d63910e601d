// Tool calls in the formats of runtime/tool_calls.h: splitting output, holding
// back a call's start while streaming, and what forces a call.
#include "runtime/tool_calls.h"

#include "runtime/json_schema.h"
#include "runtime/reasoning.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <functional>
#include <optional>
#include <unordered_set>
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

// Model output is untrusted: JSON nested deeper than this is not read (writing it back, nlohmann's
// dump recurses once per level).
constexpr int k_max_json_depth = 256;

// A scan of JSON's brackets and strings from i: with `one`, where the value starting there (after
// whitespace, an object or array) closes; else the text's end. npos when the value is not whole,
// or anything nests deeper than k_max_json_depth (then *deep). The value is then parsed for real.
size_t json_scan(std::string_view t, size_t i, bool one, bool * deep = nullptr) {
    if (one) {
        while (i < t.size() && space(t[i])) ++i;
        if (i >= t.size() || (t[i] != '{' && t[i] != '[')) return std::string_view::npos;
    }
    int depth = 0;
    for (bool str = false; i < t.size(); ++i) {
        const char c = t[i];
        if (str) {
            if (c == '\\') ++i;
            else if (c == '"') str = false;
        } else if (c == '"') {
            str = true;
        } else if (c == '{' || c == '[') {
            if (++depth > k_max_json_depth) {
                if (deep) *deep = true;
                return std::string_view::npos;
            }
        } else if ((c == '}' || c == ']') && --depth == 0 && one) {
            return i + 1;
        }
    }
    return one ? std::string_view::npos : t.size();
}

// JSON text (its nesting checked) as a value; discarded when it is not JSON or an object repeats a
// key: readers differ on which of the two they keep, and a call streamed as it was written has
// already sent the first.
ojson parse_checked(std::string_view t) {
    std::vector<std::unordered_set<std::string>> keys;   // of each object being read
    bool repeated = false;
    const ojson::parser_callback_t note = [&](int, ojson::parse_event_t e, ojson & parsed) {
        if (e == ojson::parse_event_t::object_start) keys.emplace_back();
        else if (e == ojson::parse_event_t::object_end && !keys.empty()) keys.pop_back();
        else if (e == ojson::parse_event_t::key && !keys.empty() && !keys.back().insert(parsed.get<std::string>()).second) repeated = true;
        return true;
    };
    ojson v = ojson::parse(t, note, /*allow_exceptions=*/false);
    return repeated ? ojson(ojson::value_t::discarded) : v;
}

// JSON text as a value; discarded when it is not JSON, nests deeper than k_max_json_depth or
// repeats a key.
ojson parse_json(std::string_view t) {
    if (json_scan(t, 0, false) == std::string_view::npos) return ojson(ojson::value_t::discarded);
    return parse_checked(t);
}

// Arguments: a JSON object, as compact text in its own key order.
std::optional<std::string> arguments_of(const ojson & v) {
    if (!v.is_object()) return std::nullopt;
    return v.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

std::optional<std::string> arguments_text(std::string_view t) { return arguments_of(parse_json(t)); }

// A function's name as requests may give it (transport/protocol.cpp): letters, digits, _ - .
bool good_name(std::string_view n) {
    if (n.empty() || n.size() > 64) return false;
    for (const char c : n)
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.')) return false;
    return true;
}

// {"name": N, <args_key>: {...}} (Llama 3 writes "parameters", the others "arguments").
std::optional<ParsedCall> call_object(const ojson & v, bool parameters_too) {
    if (!v.is_object()) return std::nullopt;
    const auto n = v.find("name");
    if (n == v.end() || !n->is_string() || !good_name(n->get_ref<const std::string &>())) return std::nullopt;
    auto a = v.find("arguments");
    if (parameters_too && v.contains("parameters")) {
        if (a != v.end()) return std::nullopt;   // both: which one counts is anyone's guess (and a stream sent the first)
        a = v.find("parameters");
    }
    if (a == v.end()) return std::nullopt;
    std::optional<std::string> args = arguments_of(*a);
    if (!args && a->is_string()) args = arguments_text(a->get_ref<const std::string &>());   // arguments as JSON text
    if (!args) return std::nullopt;
    return ParsedCall{n->get<std::string>(), std::move(*args)};
}

// Reads the calls of `t`, which starts where they start. nullopt when they are not well formed.
using Calls = std::optional<std::vector<ParsedCall>>;

// Partial reading (a growing text): the text ended where more of it may still complete a call.
struct End {};

// A cursor over the call text: markers, names and JSON values in order. The readers keep what
// they have read in it, so that a partial read (`partial`) that reaches the text's end (End) still
// has it: the calls read whole, and how far the one being read got (`open`).
struct Reader {
    Reader(std::string_view text, bool partial_read) : t(text), partial(partial_read) {}
    std::string_view t;
    size_t i = 0;
    bool partial = false;
    std::vector<ParsedCall> calls;
    ojson xml_args;          // XML formats: the parameters of the call being read
    struct Open {
        std::string name;       // the call's name, once it is certain
        bool json_call = false; // the JSON being read is the call's object (or a list of them): the name is in it
        bool xml = false;       // xml_args holds its parameters so far
        std::string key;        // XML: the parameter whose value is being read
        bool text = false;      // ... its value is text (any other is known only whole)
        bool newlines = false;  // ... written between newlines (Qwen3-Coder)
        std::string_view close; // ... the marker that ends it
    } open;
    std::string_view tail;   // at End: the unread text from where the value or name being read starts
    void end() {
        tail = t.substr(std::min(i, t.size()));
        throw End{};
    }
    void skip_space() {
        while (i < t.size() && space(t[i])) ++i;
    }
    bool eat(std::string_view s) {
        if (t.compare(i, s.size(), s) != 0) {
            if (partial && t.size() - i < s.size() && s.substr(0, t.size() - i) == t.substr(i)) end();   // it may still come
            return false;
        }
        i += s.size();
        return true;
    }
    bool done() {
        skip_space();
        if (partial && i >= t.size()) end();
        return i >= t.size();
    }
    // After the last call: what follows is the message's text too (a model that calls, then says
    // more), content after what came before the calls (`after`). No calls: not well formed.
    std::optional<std::vector<ParsedCall>> finish() {
        skip_space();
        if (partial && i >= t.size()) end();   // another call may still come
        if (calls.empty()) return std::nullopt;
        after = t.substr(i);
        return std::move(calls);
    }
    std::string_view after;
    // text up to the first of the markers (or the end), and the cursor at that marker; one pass
    // to it, not a search per marker to the end of the text
    std::string_view until(std::initializer_list<std::string_view> markers) {
        size_t stop = i;
        for (; stop < t.size(); ++stop) {
            bool at = false;
            for (std::string_view m : markers)
                if (t[stop] == m[0] && t.compare(stop, m.size(), m) == 0) {
                    at = true;
                    break;
                }
            if (at) break;
        }
        if (partial && stop == t.size()) end();   // none of the markers yet: what comes before it is not known
        const std::string_view s = t.substr(i, stop - i);
        i = stop;
        return s;
    }
    // where the JSON value starting at i (after whitespace) ends; npos when it is not one
    size_t json_end() {
        bool deep = false;
        const size_t e = json_scan(t, i, true, &deep);
        if (e == std::string_view::npos && partial && !deep) {   // the text ended inside it, or before it
            size_t j = i;
            while (j < t.size() && space(t[j])) ++j;
            if (j == t.size() || t[j] == '{' || t[j] == '[') end();
        }
        return e;
    }
    std::optional<std::string> args() {
        const size_t e = json_end();
        if (e == std::string_view::npos) return std::nullopt;
        std::optional<std::string> a = arguments_of(parse_checked(t.substr(i, e - i)));   // depth checked
        i = e;
        return a;
    }
    std::optional<ojson> value() {
        const size_t e = json_end();
        if (e == std::string_view::npos) return std::nullopt;
        ojson v = parse_checked(t.substr(i, e - i));   // depth checked
        i = e;
        if (v.is_discarded()) return std::nullopt;
        return v;
    }
};

// Each reader takes the text from where its calls start and keeps what it reads in the Reader
// (see Reader). `r.open` says how far the call being read got, for a partial read.

Calls hermes_calls(Reader & r) {
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(k_hermes_open)) {
        r.open = {};
        r.open.json_call = true;
        const std::optional<ojson> v = r.value();
        std::optional<ParsedCall> c = v ? call_object(*v, false) : std::nullopt;
        if (!c) return std::nullopt;
        calls.push_back(std::move(*c));
        r.open = {};
        r.skip_space();
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;   // ended inside its last call
        r.skip_space();
    }
    return r.finish();
}

Calls llama3_calls(Reader & r) {
    std::vector<ParsedCall> & calls = r.calls;
    r.skip_space();
    r.eat(k_python_tag);
    do {
        r.open = {};
        r.open.json_call = true;
        const std::optional<ojson> v = r.value();
        std::optional<ParsedCall> c = v ? call_object(*v, true) : std::nullopt;
        if (!c) return std::nullopt;
        calls.push_back(std::move(*c));
        r.open = {};
        r.skip_space();
    } while (r.eat(";") || (!r.done() && r.t[r.i] == '{'));   // several, as some fine-tunes write them
    return r.done() ? Calls(std::move(calls)) : std::nullopt;
}

Calls mistral_calls(Reader & r) {
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(k_mistral_calls)) {
        r.open = {};
        r.open.json_call = true;
        const std::optional<ojson> v = r.value();
        if (!v) return std::nullopt;
        const ojson list = v->is_array() ? *v : ojson::array({*v});
        for (const ojson & o : list) {
            std::optional<ParsedCall> c = call_object(o, false);
            if (!c) return std::nullopt;
            calls.push_back(std::move(*c));
        }
        r.open = {};
        r.skip_space();
    }
    return r.finish();
}

// A call whose name is known and whose arguments, a JSON object, come next.
bool json_args_call(Reader & r, std::string_view name) {
    if (!good_name(name)) return false;
    r.open = {};
    r.open.name = std::string(name);
    std::optional<std::string> args = r.args();
    if (!args) return false;
    r.calls.push_back({std::string(name), std::move(*args)});
    r.open = {};
    return true;
}

Calls mistral_args_calls(Reader & r) {
    while (r.eat(k_mistral_calls)) {
        const std::string_view name = trim(r.until({k_mistral_args, k_mistral_id}));
        if (r.eat(k_mistral_id)) r.until({k_mistral_args});
        if (!r.eat(k_mistral_args) || !json_args_call(r, name)) return std::nullopt;
        r.skip_space();
    }
    return r.finish();
}

// DeepSeek V3.1 (r1 false) and R1 / V3 (r1 true); the model may end inside its last call.
Calls deepseek_calls(Reader & r, bool r1) {
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
        if (!json_args_call(r, name)) return std::nullopt;
        if (r1 && !r.eat(k_ds_json_close) && !r.done()) return std::nullopt;
        r.skip_space();
        if (!r.eat(k_ds_call_end)) break;
        r.skip_space();
    }
    r.eat(k_ds_calls_end);
    return r.finish();
}

Calls kimi_calls(Reader & r) {
    r.eat(k_kimi_begin);
    r.skip_space();
    while (r.eat(k_kimi_call_begin)) {
        std::string_view id = trim(r.until({k_kimi_args}));   // functions.get_weather:0
        if (!r.eat(k_kimi_args)) return std::nullopt;
        if (id.substr(0, 10) == "functions.") id.remove_prefix(10);
        if (const size_t colon = id.rfind(':'); colon != std::string_view::npos) id = id.substr(0, colon);
        if (!json_args_call(r, id)) return std::nullopt;
        r.skip_space();
        if (!r.eat(k_kimi_call_end)) break;
        r.skip_space();
    }
    r.eat(k_kimi_end);
    return r.finish();
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

// Whether v is of one of the schema's types (no type: of any).
bool of_type(const ojson & v, const ojson * schema) {
    if (!schema->contains("type")) return true;
    return (v.is_number_integer() && has_type(schema, "integer")) || (v.is_number() && has_type(schema, "number")) ||
           (v.is_boolean() && has_type(schema, "boolean")) || (v.is_null() && has_type(schema, "null")) ||
           (v.is_object() && has_type(schema, "object")) || (v.is_array() && has_type(schema, "array"));
}

// Whether a value of this schema is read as text, whatever it is (else it is read as JSON first).
bool text_param(const ojson * schema) {
    if (!schema || !schema->is_object()) return true;   // not a parameter of the schema
    if (schema->contains("type")) return has_type(schema, "string");
    return !(schema->contains("anyOf") || schema->contains("oneOf") || schema->contains("enum") || schema->contains("const"));
}

// A value written as text, as JSON of the type its schema gives (JSON or Python's str() of it);
// text when it is a string, the schema says nothing, or the text is not of the type.
ojson typed_value(std::string_view raw, const ojson * schema) {
    if (text_param(schema)) return std::string(raw);
    const bool listed = schema->contains("enum") || schema->contains("const");
    const std::string_view t = trim(raw);
    ojson v = parse_json(t);
    if (v.is_discarded()) {   // Python's str() of True, False, None
        if (t == "True" || t == "False") v = t == "True";
        else if (t == "None") v = nullptr;
    }
    if (listed && !v.is_discarded()) {   // the value must be one listed, else it is the text
        const auto e = schema->find("enum");
        const bool in = (e != schema->end() && e->is_array() && std::find(e->begin(), e->end(), v) != e->end()) ||
                        (schema->contains("const") && (*schema)["const"] == v);
        return in ? v : ojson(std::string(raw));
    }
    if (!v.is_discarded() && !v.is_string() && of_type(v, schema)) return v;
    return std::string(raw);
}

// Qwen3-Coder writes a value between newlines: one on each side is the format's.
std::string_view between_newlines(std::string_view v) {
    if (!v.empty() && v.front() == '\n') v.remove_prefix(1);
    if (!v.empty() && v.back() == '\n') v.remove_suffix(1);
    return v;
}

// An XML call's opening is read: its parameters come next.
void xml_call_open(Reader & r, std::string_view name) {
    r.open = {};
    r.open.name = std::string(name);
    r.open.xml = true;
    r.xml_args = ojson::object();
}

// The text of parameter `key`'s value, to `close` (the cursor then at it): the parameter of the
// call being read, for a partial read.
std::string_view xml_value(Reader & r, const std::string & key, bool text, bool newlines, std::string_view close) {
    r.open.key = key;
    r.open.text = text;
    r.open.newlines = newlines;
    r.open.close = close;
    const std::string_view v = r.until({close});
    r.open.key.clear();
    return v;
}

void xml_call_close(Reader & r) {
    r.calls.push_back({r.open.name, *arguments_of(r.xml_args)});
    r.open = {};
}

Calls qwen_xml_calls(Reader & r, const ojson & tools) {
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(k_hermes_open)) {
        r.skip_space();
        if (!r.eat(k_function)) return std::nullopt;
        const std::string_view name = r.until({">"});
        if (!r.eat(">") || !good_name(name)) return std::nullopt;
        xml_call_open(r, name);
        for (r.skip_space(); r.eat(k_parameter); r.skip_space()) {
            const std::string key(r.until({">"}));
            if (!r.eat(">") || key.empty()) return std::nullopt;
            const ojson * schema = param_schema(tools, name, key);
            const std::string_view value = xml_value(r, key, text_param(schema), true, k_parameter_end);
            if (!r.eat(k_parameter_end) || r.xml_args.contains(key)) return std::nullopt;   // (a parameter given twice)
            r.xml_args[key] = typed_value(between_newlines(value), schema);
        }
        xml_call_close(r);
        if (!r.eat(k_function_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;   // ended inside its last call
        r.skip_space();
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.finish();
}

Calls glm_calls(Reader & r, const ojson & tools) {
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(k_hermes_open)) {
        const std::string_view name = trim(r.until({k_arg_key, k_hermes_close}));
        if (!good_name(name)) return std::nullopt;
        xml_call_open(r, name);
        for (r.skip_space(); r.eat(k_arg_key); r.skip_space()) {
            const std::string key(trim(r.until({k_arg_key_end})));
            if (!r.eat(k_arg_key_end) || key.empty()) return std::nullopt;
            r.skip_space();
            if (!r.eat(k_arg_value)) return std::nullopt;
            const ojson * schema = param_schema(tools, name, key);
            const std::string_view value = xml_value(r, key, text_param(schema), false, k_arg_value_end);
            if (!r.eat(k_arg_value_end) || r.xml_args.contains(key)) return std::nullopt;
            r.xml_args[key] = typed_value(value, schema);
        }
        xml_call_close(r);
        if (!r.eat(k_hermes_close)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.finish();
}

Calls minimax_calls(Reader & r, const ojson & tools) {
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(k_minimax)) {
        for (r.skip_space(); r.eat(k_invoke); r.skip_space()) {
            const std::string_view name = r.until({"\""});
            if (!r.eat("\">") || !good_name(name)) return std::nullopt;
            xml_call_open(r, name);
            for (r.skip_space(); r.eat(k_mm_parameter); r.skip_space()) {
                const std::string key(r.until({"\""}));
                if (!r.eat("\">") || key.empty()) return std::nullopt;
                const ojson * schema = param_schema(tools, name, key);
                const std::string_view value = xml_value(r, key, text_param(schema), false, k_parameter_end);
                if (!r.eat(k_parameter_end) || r.xml_args.contains(key)) return std::nullopt;
                r.xml_args[key] = typed_value(value, schema);
            }
            xml_call_close(r);
            if (!r.eat(k_invoke_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        }
        if (!r.eat(k_minimax_end)) return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.finish();
}

// DSML: each value says whether it is a string (string="true": as written) or JSON ("false").
Calls dsml_calls(Reader & r, bool v4, const ojson & tools) {
    const std::string_view block = v4 ? k_dsml_tool_calls : k_dsml_function_calls, block_end = v4 ? k_dsml_tool_calls_end : k_dsml_function_calls_end;
    std::vector<ParsedCall> & calls = r.calls;
    while (r.eat(block)) {
        for (r.skip_space(); r.eat(k_dsml_invoke); r.skip_space()) {
            const std::string_view name = r.until({"\""});
            if (!r.eat("\">") || !good_name(name)) return std::nullopt;
            xml_call_open(r, name);
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
                const ojson * schema = param_schema(tools, name, key);
                const bool text = is_string == "true" || (is_string != "false" && text_param(schema));
                const std::string_view value = xml_value(r, key, text, false, k_dsml_parameter_end);
                if (!r.eat(k_dsml_parameter_end) || r.xml_args.contains(key)) return std::nullopt;
                if (is_string == "true") {
                    r.xml_args[key] = std::string(value);
                } else if (is_string == "false") {
                    const ojson v = parse_json(trim(value));
                    r.xml_args[key] = v.is_discarded() ? ojson(std::string(value)) : v;
                } else {
                    r.xml_args[key] = typed_value(value, schema);
                }
            }
            xml_call_close(r);
            if (!r.eat(k_dsml_invoke_end)) return r.done() ? Calls(std::move(calls)) : std::nullopt;
        }
        if (!r.eat(block_end)) return r.done() && !calls.empty() ? Calls(std::move(calls)) : std::nullopt;
        r.skip_space();
    }
    return r.finish();
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

Calls read_calls(ToolCallFormat f, Reader & r, const ojson & tools) {
    switch (f) {
    case ToolCallFormat::Hermes: return hermes_calls(r);
    case ToolCallFormat::Llama3: return llama3_calls(r);
    case ToolCallFormat::Mistral: return mistral_calls(r);
    case ToolCallFormat::MistralArgs: return mistral_args_calls(r);
    case ToolCallFormat::DeepSeekV31: return deepseek_calls(r, false);
    case ToolCallFormat::DeepSeekR1: return deepseek_calls(r, true);
    case ToolCallFormat::KimiK2: return kimi_calls(r);
    case ToolCallFormat::QwenXml: return qwen_xml_calls(r, tools);
    case ToolCallFormat::GlmXml: return glm_calls(r, tools);
    case ToolCallFormat::MiniMaxXml: return minimax_calls(r, tools);
    case ToolCallFormat::DsmlV32: return dsml_calls(r, false, tools);
    case ToolCallFormat::DsmlV4: return dsml_calls(r, true, tools);
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

// A schema's conversion error ("json_schema at /p: what") as the tool's: "tools[i].function.parameters at /p: what".
std::string schema_error(const std::string & why, size_t tool, const std::string & under = "") {
    constexpr std::string_view k_at = "json_schema at ", k_plain = "json_schema: ";
    std::string rest = why;
    if (why.rfind(k_at, 0) == 0) rest = " at " + under + why.substr(k_at.size());
    else if (why.rfind(k_plain, 0) == 0) rest = (under.empty() ? ": " : " at " + under + ": ") + why.substr(k_plain.size());
    else rest = (under.empty() ? ": " : " at " + under + ": ") + why;
    return "tools[" + std::to_string(tool) + "].function.parameters" + rest;
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
)";

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

// A grammar for an XML call's parameters of tool `tool`, to its close: each parameter at most once
// (the required ones always), in the schema's order. A string is text (an enum or const of strings
// its literals; min/maxLength bound it, without "<"); any other value is JSON, the parameter's
// schema through the JSON Schema converter. `seq` writes the format's text. "" and *error when a
// parameter cannot be written in the format or its schema cannot be followed.
template <class Seq>
std::string xml_params_grammar(ToolCallFormat f, const ojson & schema, size_t tool, const Seq & seq, std::string * error) {
    std::string root = "root ::=", rules;
    const ojson props = schema.is_object() && schema.contains("properties") && schema["properties"].is_object() ? schema["properties"] : ojson::object();
    const ojson required = schema.is_object() && schema.contains("required") && schema["required"].is_array() ? schema["required"] : ojson::array();
    size_t j = 0;
    for (const auto & [key, p] : props.items()) {
        const std::string at = "/properties/" + key;
        if (key.empty() || key.find_first_of("<>\"\r\n") != std::string::npos) {
            *error = "tools[" + std::to_string(tool) + "].function.parameters at " + at + ": a name this model's call format cannot write";
            return {};
        }
        const ojson * ps = p.is_object() ? &p : nullptr;
        bool all_strings = ps && (ps->contains("enum") || ps->contains("const"));
        if (ps && ps->contains("enum") && (*ps)["enum"].is_array())
            for (const ojson & e : (*ps)["enum"]) all_strings = all_strings && e.is_string();
        if (ps && ps->contains("const")) all_strings = all_strings && (*ps)["const"].is_string();
        const bool typed = ps && ps->contains("type");
        const bool text = all_strings || (typed && has_type(ps, "string")) ||
                          (!typed && ps && !ps->contains("enum") && !ps->contains("const") && !ps->contains("anyOf") && !ps->contains("oneOf") &&
                           !ps->contains("$ref") && !ps->contains("allOf"));
        std::string value;
        if (text && all_strings) {
            std::vector<std::string> options;
            if (ps->contains("const")) options.push_back((*ps)["const"].get<std::string>());
            else for (const ojson & e : (*ps)["enum"]) options.push_back(e.get<std::string>());
            value = "(";
            for (const std::string & o : options) value += (value.size() > 1 ? " | " : "") + (o.empty() ? std::string("\"\"") : literal(o));
            value += ")";
        } else if (text) {
            for (const char * k : {"pattern", "format"})
                if (ps && ps->contains(k)) {
                    *error = "tools[" + std::to_string(tool) + "].function.parameters at " + at + ": '" + k +
                             "' is not supported in this model's call format (its strings are plain text)";
                    return {};
                }
            const int64_t lo = ps ? ps->value("minLength", int64_t(0)) : 0, hi = ps ? ps->value("maxLength", int64_t(-1)) : -1;
            if (lo < 0 || lo > 10000 || hi > 10000 || (hi >= 0 && hi < lo)) {
                *error = "tools[" + std::to_string(tool) + "].function.parameters at " + at + ": string lengths past 10000";
                return {};
            }
            value = lo == 0 && hi < 0 ? "xv-text" : "[^<]{" + std::to_string(lo) + "," + (hi < 0 ? "" : std::to_string(hi)) + "}";
        } else {   // JSON: the parameter's schema, with the tool's $defs for its references
            ojson sub = p;
            for (const char * defs : {"$defs", "definitions"})
                if (schema.contains(defs) && sub.is_object() && !sub.contains(defs)) sub[defs] = schema[defs];
            std::string why;
            const std::string g = json_schema_to_grammar(sub.dump(), &why);
            if (g.empty()) {
                *error = schema_error(why, tool, at);
                return {};
            }
            const std::string prefix = "p" + std::to_string(j) + "-";
            value = prefix + "root";
            rules += "\n" + prefix_rules(g, prefix);
        }
        const auto [open, close] = xml_param(f, key, text);
        const bool needed = std::find(required.begin(), required.end(), ojson(key)) != required.end();
        root += " (" + seq(open) + " " + value + " " + seq(close) + ")" + (needed ? "" : "?");
        ++j;
    }
    return root + " " + seq(xml_close(f)) + "\nxv-text ::= ([^<] | \"<\" [^/])*" + rules;
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
    const ojson tools = tools_json.empty() ? ojson() : ojson::parse(tools_json, nullptr, false);
    Reader r(text.substr(std::min(first, text.size())), false);
    Calls calls = first != std::string_view::npos ? read_calls(format, r, tools) : std::nullopt;
    if (!calls) {
        out.content = std::string(text);
        return out;
    }
    out.calls = std::move(*calls);
    out.content = std::string(text.substr(0, first));
    // Calls, text, more calls: the text between is content too, and so is a later run that is
    // not well formed (the calls before it stand).
    std::string_view rest = r.after;
    for (size_t next; (next = calls_start(format, rest)) != std::string_view::npos;) {
        Reader more(rest.substr(next), false);
        Calls c = read_calls(format, more, tools);
        if (!c) break;
        out.content += rest.substr(0, next);
        for (ParsedCall & call : *c) out.calls.push_back(std::move(call));
        rest = more.after;
    }
    out.content += rest;
    return out;
}

namespace {

// ---- partial calls: what of a growing text's calls is certain ----

// A text's start without an unfinished UTF-8 character at its end.
std::string_view whole_utf8(std::string_view v) {
    for (size_t back = 1; back <= std::min<size_t>(4, v.size()); ++back) {
        const auto c = static_cast<unsigned char>(v[v.size() - back]);
        if ((c & 0xC0) == 0x80) continue;   // a continuation byte: look further back
        const size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return n > back ? v.substr(0, v.size() - back) : v;
    }
    return v;
}

// JSON text cut off anywhere (a value from its first non-space character), made whole with `mark`
// where what is certain ends: in a string value being written, or as a member (a key in an
// object, an element in a list) where the next one would go. Keys, numbers and literals being
// written are left out whole: they may still grow. "" when it starts no object or list.
std::string heal_json(std::string_view t, const std::string & mark) {
    struct Frame {
        bool object;
        int expect;   // 0: a member (or the close), 1: a colon, 2: a value, 3: a comma or the close
    };
    std::vector<Frame> stack;
    size_t keep = 0;    // t[0, keep) is certain, and then the innermost container expects keep_expect
    int keep_expect = 0;
    auto close_all = [&](std::string & out) {
        for (auto it = stack.rbegin(); it != stack.rend(); ++it) out += it->object ? '}' : ']';
    };
    size_t i = 0;
    while (i < t.size()) {
        const char c = t[i];
        if (space(c)) {
            ++i;
        } else if (c == '{' || c == '[') {
            if (stack.size() >= size_t(k_max_json_depth)) return {};
            stack.push_back({c == '{', 0});
            keep = ++i, keep_expect = 0;
        } else if (stack.empty()) {
            return {};   // not an object or a list
        } else if (c == '}' || c == ']') {
            stack.pop_back();
            if (stack.empty()) return std::string(t.substr(0, i + 1));   // whole
            stack.back().expect = 3;
            keep = ++i, keep_expect = 3;
        } else if (c == ':') {
            stack.back().expect = 2;
            ++i;
        } else if (c == ',') {
            stack.back().expect = 0;
            keep = ++i, keep_expect = 0;
        } else if (c == '"') {
            const bool key = stack.back().object && stack.back().expect == 0;
            size_t j = i + 1, safe = j;   // safe: after the string's last whole character
            bool closed = false;
            while (j < t.size()) {
                const auto d = static_cast<unsigned char>(t[j]);
                size_t n = 1;
                if (d == '"') {
                    closed = true;
                    break;
                }
                if (d == '\\') {
                    n = j + 1 < t.size() && t[j + 1] == 'u' ? 6 : 2;
                    if (n == 6 && j + 6 <= t.size()) {   // a high surrogate is whole with its low one
                        const std::string_view hex = t.substr(j + 2, 4);
                        if ((hex[0] == 'd' || hex[0] == 'D') && std::string_view("89abAB").find(hex[1]) != std::string_view::npos) n = 12;
                    }
                } else if (d >= 0xC0) {
                    n = d >= 0xF0 ? 4 : d >= 0xE0 ? 3 : 2;
                }
                if (j + n > t.size()) break;
                j += n;
                safe = j;
            }
            if (closed) {
                i = j + 1;
                stack.back().expect = key ? 1 : 3;
                if (!key) keep = i, keep_expect = 3;
            } else if (key) {
                break;
            } else {   // the text ends in a string value: what of it is written is certain
                std::string out(t.substr(0, safe));
                out += mark;
                out += '"';
                close_all(out);
                return out;
            }
        } else {   // a number or a literal: whole once something follows it
            size_t j = i;
            while (j < t.size() && !space(t[j]) && std::string_view(",]}:\"").find(t[j]) == std::string_view::npos) ++j;
            if (j == t.size()) break;
            i = j;
            stack.back().expect = 3;
            keep = i, keep_expect = 3;
        }
    }
    if (stack.empty()) return {};
    std::string out(t.substr(0, keep));
    if (keep_expect == 3) out += ',';
    out += '"' + mark + (stack.back().object ? "\":0" : "\"");
    close_all(out);
    return out;
}

// A mark no text of t holds, so that healed JSON cut at it is cut where the healing began.
std::string mark_for(std::string_view t) {
    std::string mark = "~moesh~";
    while (t.find(mark) != std::string_view::npos) mark += '~';
    return mark;
}

// A value healed with `mark`, written as arguments are, up to the mark. A mark that stands for a
// whole member goes with its quotes and the comma before it. nullopt when the mark is not there
// exactly once (the text spelled it with escapes).
std::optional<std::string> cut_at_mark(const ojson & v, const std::string & mark) {
    const std::string d = v.dump(-1, ' ', false, ojson::error_handler_t::replace);
    size_t p = d.find(mark);
    if (p == std::string::npos) return d;
    if (d.find(mark, p + 1) != std::string::npos) return std::nullopt;
    const bool member = p >= 2 && d[p - 1] == '"' && std::string_view("{[,:").find(d[p - 2]) != std::string_view::npos &&
                        d.compare(p + mark.size(), 1, "\"") == 0;
    if (member) {
        --p;
        if (d[p - 1] == ',') --p;
    }
    return d.substr(0, p);
}

// The certain start of an arguments object being written as JSON; "" when none is.
std::string json_args_prefix(std::string_view t) {
    const std::string mark = mark_for(t);
    const std::string healed = heal_json(t, mark);
    if (healed.empty()) return {};
    const ojson v = parse_json(healed);
    if (!v.is_object()) return {};
    return cut_at_mark(v, mark).value_or(std::string());
}

// The calls in JSON call objects being written (hermes, llama3, mistral): each whose name is whole.
void json_calls_prefix(std::string_view t, bool parameters_too, std::vector<PartialCall> & out) {
    const std::string mark = mark_for(t);
    const std::string healed = heal_json(t, mark);
    if (healed.empty()) return;
    const ojson v = parse_json(healed);
    if (v.is_discarded()) return;
    for (const ojson & o : v.is_array() ? v : ojson::array({v})) {
        const auto n = o.is_object() ? o.find("name") : o.end();
        if (!o.is_object() || n == o.end() || !n->is_string() || !good_name(n->get_ref<const std::string &>())) return;
        PartialCall c{n->get<std::string>(), {}};
        auto a = o.find("arguments");
        if (parameters_too && o.contains("parameters")) {
            if (a != o.end()) return;   // both: not a call (call_object)
            a = o.find("parameters");
        }
        if (a != o.end() && a->is_object()) {
            const std::optional<std::string> args = cut_at_mark(*a, mark);
            if (!args) return;
            c.arguments = *args;
        } else if (a != o.end() && a->is_string() && a->get_ref<const std::string &>().find(mark) == std::string::npos) {
            c.arguments = arguments_text(a->get_ref<const std::string &>()).value_or(std::string());   // arguments as JSON text: whole
        }
        out.push_back(std::move(c));
    }
}

// The call an XML reader was in when the text ended: its parameters so far, and the text of one
// being written.
std::string xml_args_prefix(const Reader & r) {
    ojson args = r.xml_args;
    const std::string mark = mark_for(r.t);
    if (!r.open.key.empty() && r.open.text && !args.contains(r.open.key)) {
        std::string_view v = r.tail;
        const std::string_view close = r.open.close;
        for (size_t n = std::min(v.size(), close.size() - 1); n > 0; --n)   // what may still become the close
            if (v.substr(v.size() - n) == close.substr(0, n)) {
                v.remove_suffix(n);
                break;
            }
        if (r.open.newlines) v = between_newlines(v);   // a last newline may be the format's
        args[r.open.key] = std::string(whole_utf8(v)) + mark;
    } else {
        args[mark] = 0;
    }
    return cut_at_mark(args, mark).value_or(std::string());
}

} // namespace

std::vector<PartialCall> tool_call_prefix(ToolCallFormat format, std::string_view text, std::string_view tools_json) {
    std::vector<PartialCall> out;
    if (format == ToolCallFormat::None) return out;
    if (format == ToolCallFormat::Harmony) {
        for (const HarmonySplit::Call & c : split_harmony(text, false).calls) {
            const std::string_view to = c.recipient;
            if (to.substr(0, 10) != "functions." || !good_name(to.substr(10))) break;
            std::string_view body = c.body;
            if (c.whole) {
                std::optional<std::string> args = arguments_text(trim(body));
                if (!args) break;
                out.push_back({std::string(to.substr(10)), std::move(*args)});
                continue;
            }
            for (std::string_view e : {"<|end|>", "<|return|>", "<|call|>"})   // what may still become its end
                for (size_t n = std::min(body.size(), e.size() - 1); n > 0; --n)
                    if (body.substr(body.size() - n) == e.substr(0, n)) {
                        body.remove_suffix(n);
                        break;
                    }
            out.push_back({std::string(to.substr(10)), json_args_prefix(body)});
            break;
        }
        return out;
    }
    const ojson tools = is_xml(format) && !tools_json.empty() ? ojson::parse(tools_json, nullptr, false) : ojson();
    // Each run of calls, as parse_tool_calls reads them: the text between runs is content.
    for (std::string_view rest = text; !rest.empty();) {
        const size_t next = calls_start(format, rest);
        if (next == std::string_view::npos) break;
        Reader r(rest.substr(next), true);
        try {
            Calls calls = read_calls(format, r, tools);
            if (!calls) break;
            for (ParsedCall & c : *calls) out.push_back({std::move(c.name), std::move(c.arguments)});
            rest = r.after;
        } catch (const End &) {
            for (ParsedCall & c : r.calls) out.push_back({std::move(c.name), std::move(c.arguments)});
            if (r.open.json_call) json_calls_prefix(r.tail, format == ToolCallFormat::Llama3, out);
            else if (r.open.xml) out.push_back({r.open.name, xml_args_prefix(r)});
            else if (!r.open.name.empty()) out.push_back({r.open.name, json_args_prefix(r.tail)});
            break;
        }
    }
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
    // What comes before and after the one call, and per candidate its opening, its arguments'
    // grammar (the schema's, or the XML parameters'; rules renamed apart) and its close.
    std::string before = "\"\"", after = "\"\"";
    switch (format) {
    case ToolCallFormat::Hermes:
        before = seq("<tool_call>\n");
        after = seq("\n</tool_call>");
        break;
    case ToolCallFormat::Mistral:
        before = seq(k_mistral_calls) + " \"[\"";
        after = "\"]\"";
        break;
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
    std::string alternatives, rules;
    for (size_t k = 0; k < index.size(); ++k) {
        const ojson & fn = tools[index[k]].at("function");
        const std::string name = fn.at("name").get<std::string>();
        const ojson params = fn.contains("parameters") ? fn["parameters"] : ojson{{"type", "object"}};
        std::string g, open, close;
        if (is_xml(format)) {
            g = xml_params_grammar(format, params, index[k], seq, error);
            if (g.empty()) return {};
            open = seq(xml_open(format, name));
        } else {
            std::string why;
            g = json_schema_to_grammar(params.dump(), &why);
            if (g.empty()) {
                *error = schema_error(why, index[k]);
                return {};
            }
            const std::string json_name = ojson(name).dump();
            switch (format) {
            case ToolCallFormat::Hermes:
            case ToolCallFormat::Mistral:
                open = literal("{\"name\": " + json_name + ", \"arguments\": ");
                close = "\"}\"";
                break;
            case ToolCallFormat::Llama3:
                open = literal("{\"name\": " + json_name + ", \"parameters\": ");
                close = "\"}\"";
                break;
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
        const std::string prefix = "t" + std::to_string(k) + "-";
        alternatives += (k ? " | (" : "(") + open + " " + prefix + "root" + (close.empty() ? "" : " " + close) + ")";
        rules += "\n" + prefix_rules(g, prefix);
    }
    return "root ::= " + before + " (" + alternatives + ") " + after + rules;
}

} // namespace moesh
