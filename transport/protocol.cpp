#include "transport/protocol.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <new>
#include <set>
#include <utility>

namespace moesh::protocol {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;   // frames keep "type" and "id" first for people reading them

// A request nests three deep (object, messages, message); anything deeper is
// refused while parsing, before it costs memory. Pong info is the server's own.
constexpr int max_request_depth = 64;   // JSON Schemas nest (an object's properties' items' ...)
constexpr int max_response_depth = 64;

constexpr uint64_t max_seed = std::numeric_limits<uint64_t>::max();
constexpr int64_t max_priority = 1000;

// Stops the parser from inside its callback; caught in parse_json.
struct Refused {
    std::string message;
};

// Untrusted bytes as a short, printable, valid UTF-8 (ASCII) JSON string literal for a message.
std::string quote(std::string_view s, size_t max_bytes = 40) {
    std::string q = json(std::string(s.substr(0, max_bytes))).dump(-1, ' ', true, json::error_handler_t::replace);
    if (s.size() > max_bytes) q.insert(q.size() - 1, "...");
    return q;
}

// A field name from the input, for 'name' in a message.
std::string name_of(std::string_view key) { return escaped(key); }

std::string describe(const json & v) {
    switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case json::value_t::number_integer: return std::to_string(v.get<int64_t>());
    case json::value_t::number_unsigned: return std::to_string(v.get<uint64_t>());
    case json::value_t::number_float: {
        const double d = v.get<double>();
        if (!std::isfinite(d)) return "a number too large to represent";
        return v.dump();
    }
    case json::value_t::string: return "a string " + quote(v.get_ref<const std::string &>());
    case json::value_t::array: return v.empty() ? "an empty array" : "an array";
    case json::value_t::object: return "an object";
    default: return "a value of another type";
    }
}

std::string expected(std::string_view field, std::string_view what, const json & got) {
    return "field '" + std::string(field) + "': expected " + std::string(what) + ", got " + describe(got);
}

std::string range(int64_t lo, int64_t hi) {
    std::string s = "[";   // appended, not operator+: GCC 12 warns falsely (-Wrestrict) on "[" + to_string
    s += std::to_string(lo);
    s += ", ";
    s += std::to_string(hi);
    s += "]";
    return s;
}

// A library message for a ParseError: printable ASCII, short.
std::string printable(std::string_view s, size_t max_bytes = 200) {
    std::string out;
    for (char c : s.substr(0, max_bytes)) out += (c >= 0x20 && c <= 0x7e) ? c : '?';
    if (s.size() > max_bytes) out += "...";
    return out;
}

// nlohmann's message ("parse error at line 1, column 5: syntax error while
// parsing value - invalid literal; last read: '<token>'; expected ...") without
// its "[json.exception...]" prefix and without the token it echoes, which holds
// raw input and can itself contain "'; expected": the input shown comes from
// the input, quoted, and the expected part only from nlohmann's fixed names.
std::string describe_parse_error(const json::parse_error & e, std::string_view input) {
    std::string what = e.what();
    if (size_t p = what.find("] "); p != std::string::npos) what.erase(0, p + 2);
    std::string expected;
    static constexpr std::string_view names[] = {"true literal", "false literal", "null literal", "string literal",
                                                 "number literal", "'['", "'{'", "']'", "'}'", "':'", "','",
                                                 "end of input", "'[', '{', or a literal"};
    for (std::string_view name : names) {
        const std::string suffix = "; expected " + std::string(name);
        if (what.size() >= suffix.size() && what.compare(what.size() - suffix.size(), suffix.size(), suffix) == 0) {
            expected = suffix;
            what.erase(what.size() - suffix.size());
            break;
        }
    }
    if (size_t p = what.find("; last read: "); p != std::string::npos) what.erase(p);
    std::string message = "invalid JSON: " + printable(what);
    const size_t end = std::min<size_t>(e.byte, input.size()), begin = end > 24 ? end - 24 : 0;
    if (end > begin) message += "; near '" + escaped(input.substr(begin, end - begin)) + "'";
    return message + expected;
}

// An integer in [lo, hi]; floats such as 5.0 are not integers here.
bool get_integer(const json & v, int64_t lo, int64_t hi, int64_t & out) {
    if (v.is_number_unsigned()) {
        const uint64_t u = v.get<uint64_t>();
        if (u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
        out = int64_t(u);
    } else if (v.is_number_integer()) {
        out = v.get<int64_t>();
    } else {
        return false;
    }
    return out >= lo && out <= hi;
}

bool get_finite(const json & v, double & out) {
    if (!v.is_number()) return false;
    out = v.get<double>();
    return std::isfinite(out);
}

bool valid_id(const std::string & s, int64_t max_bytes) {
    if (s.empty() || int64_t(s.size()) > max_bytes) return false;
    for (unsigned char c : s)
        if (c < 0x20 || c > 0x7e) return false;
    return true;
}

bool generate_field(std::string_view k) {
    static constexpr std::string_view fields[] = {
        "prompt", "prompt_ids", "messages", "max_tokens", "temperature",        "top_p",             "top_k",
        "seed",   "stop",       "stream",   "logprobs",   "repetition_penalty", "frequency_penalty", "presence_penalty",
        "prompt_logprobs", "logit_bias", "echo", "grammar", "json_schema", "tools", "tool_choice", "chat_template_kwargs",
        "priority"};
    for (std::string_view f : fields)
        if (k == f) return true;
    return false;
}

class RequestParser {
public:
    explicit RequestParser(const Limits & limits) : limits_(limits) {}

    std::variant<Request, ParseError> parse(std::string_view bytes) {
        if (int64_t(bytes.size()) > limits_.max_message_bytes)
            return fail(ErrorCode::TooLarge, "request of " + std::to_string(bytes.size()) +
                                                 " bytes is larger than the limit of " +
                                                 std::to_string(limits_.max_message_bytes) + " bytes");
        auto doc = parse_json(bytes, max_request_depth);
        if (auto * message = std::get_if<std::string>(&doc)) return fail(*message);
        const json & o = std::get<json>(doc);
        if (!o.is_object()) return fail("a request must be a JSON object, got " + describe(o));

        Request r;
        // the id first, so that every later error can name the request
        if (auto it = o.find("id"); it != o.end()) {
            if (!it->is_string() || !valid_id(it->get_ref<const std::string &>(), limits_.max_id_bytes))
                return fail(expected("id", "a string of 1 to " + std::to_string(limits_.max_id_bytes) +
                                               " printable ASCII characters", *it));
            r.id = it->get<std::string>();
            id_ = r.id;
        }
        if (auto it = o.find("type"); it != o.end()) {
            const json & t = *it;
            if (t == "generate") r.type = RequestType::Generate;
            else if (t == "cancel") r.type = RequestType::Cancel;
            else if (t == "ping") r.type = RequestType::Ping;
            else return fail(expected("type", "one of \"generate\", \"cancel\", \"ping\"", t));
        }
        if (r.type != RequestType::Ping && r.id.empty())
            return fail(std::string("field 'id': missing (a ") + request_type_name(r.type) + " request needs one)");
        for (const auto & [k, v] : o.items()) {
            if (k == "id" || k == "type") continue;
            if (!generate_field(k)) return fail("unknown field '" + name_of(k) + "'");
            if (r.type != RequestType::Generate)
                return fail("field '" + k + "' does not apply to a " + request_type_name(r.type) + " request");
        }
        if (r.type != RequestType::Generate) return r;

        if (!read_prompt(o, r)) return fail(error_);
        if (auto it = o.find("logprobs"); it != o.end()) {
            int64_t k = 0;
            if (!get_integer(*it, 0, limits_.max_logprobs, k))
                return fail(expected("logprobs", "an integer in " + range(0, limits_.max_logprobs), *it));
            r.logprobs = int32_t(k);
        }
        if (auto it = o.find("echo"); it != o.end()) {
            if (!it->is_boolean()) return fail(expected("echo", "true or false", *it));
            r.echo = it->get<bool>();
        }
        if (auto it = o.find("prompt_logprobs"); it != o.end()) {
            int64_t k = 0;
            if (!get_integer(*it, 0, limits_.max_logprobs, k))
                return fail(expected("prompt_logprobs", "an integer in " + range(0, limits_.max_logprobs), *it));
            r.prompt_logprobs = int32_t(k);
        }
        // 0 tokens: only scoring or echoing a prompt
        if (const int64_t lo = r.prompt_logprobs >= 0 || r.echo ? 0 : 1; o.contains("max_tokens") &&
                                                                !get_integer(o.at("max_tokens"), lo, limits_.max_tokens, r.max_tokens))
            return fail(expected("max_tokens", "an integer in " + range(lo, limits_.max_tokens), o.at("max_tokens")));
        if (auto it = o.find("temperature"); it != o.end()) {
            double d = 0;
            if (!get_finite(*it, d) || d < 0 || d > 100)
                return fail(expected("temperature", "a number in [0, 100]", *it));
            r.temperature = float(d);
        }
        if (auto it = o.find("top_p"); it != o.end()) {
            double d = 0;
            // checked as float too: a tiny positive double rounds to 0
            if (!get_finite(*it, d) || !(d > 0 && d <= 1) || !(float(d) > 0))
                return fail(expected("top_p", "a number in (0, 1]", *it));
            r.top_p = float(d);
        }
        if (auto it = o.find("top_k"); it != o.end()) {
            const int64_t hi = limits_.n_vocab > 0 ? std::min<int64_t>(limits_.n_vocab, INT32_MAX) : 1 << 20;
            int64_t k = 0;
            if (!get_integer(*it, 0, hi, k)) return fail(expected("top_k", "an integer in " + range(0, hi), *it));
            r.top_k = int32_t(k);
        }
        if (auto it = o.find("seed"); it != o.end()) {
            int64_t i = 0;
            if (it->is_number_unsigned()) r.seed = it->get<uint64_t>();
            else if (get_integer(*it, 0, 0, i)) r.seed = 0;   // "-0"
            else return fail(expected("seed", "an integer in [0, " + std::to_string(max_seed) + "]", *it));
        }
        if (auto it = o.find("stop"); it != o.end() && !read_stop(*it, r.stop)) return fail(error_);
        if (auto it = o.find("stream"); it != o.end()) {
            if (!it->is_boolean()) return fail(expected("stream", "true or false", *it));
            r.stream = it->get<bool>();
        }
        if (auto it = o.find("repetition_penalty"); it != o.end()) {
            double d = 0;
            if (!get_finite(*it, d) || !(d > 0 && d <= 10) || !(float(d) > 0))
                return fail(expected("repetition_penalty", "a number in (0, 10]", *it));
            r.repetition_penalty = float(d);
        }
        if (auto it = o.find("logit_bias"); it != o.end() && !read_logit_bias(*it, r.logit_bias)) return fail(error_);
        if (auto it = o.find("priority"); it != o.end()) {
            int64_t p = 0;
            if (!get_integer(*it, -max_priority, max_priority, p))
                return fail(expected("priority", "an integer in " + range(-max_priority, max_priority) + " (lower runs first)", *it));
            r.priority = int32_t(p);
        }
        if (auto it = o.find("grammar"); it != o.end()) {
            if (!it->is_string() || it->get_ref<const std::string &>().empty())
                return fail(expected("grammar", "a non-empty string (GBNF)", *it));
            r.grammar = it->get<std::string>();
        }
        if (auto it = o.find("json_schema"); it != o.end()) {
            if (!it->is_object() && !it->is_boolean()) return fail(expected("json_schema", "an object (a JSON Schema)", *it));
            if (r.grammar) return fail("fields 'grammar' and 'json_schema': give one, not both");
            // Read again keeping key order: properties are generated in the order the schema gives.
            r.json_schema = nlohmann::ordered_json::parse(bytes).at("json_schema").dump();
        }
        const auto tools = o.find("tools"), choice = o.find("tool_choice"), kwargs = o.find("chat_template_kwargs");
        for (const auto & it : {tools, choice, kwargs})
            if (it != o.end() && !r.messages) return fail("field '" + it.key() + "' needs 'messages' (it is for the chat template)");
        if (tools != o.end() && !check_tools(*tools)) return fail(error_);
        if (choice != o.end() && !read_tool_choice(*choice, tools != o.end() ? &*tools : nullptr, r)) return fail(error_);
        if (r.tool_choice == ToolChoice::Required || r.tool_choice == ToolChoice::Named)
            if (r.grammar || r.json_schema) return fail("field 'tool_choice': a call that must be made is its own grammar; not with 'grammar' or 'json_schema'");
        if (kwargs != o.end()) {
            if (!kwargs->is_object()) return fail(expected("chat_template_kwargs", "an object", *kwargs));
            for (const char * k : {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"})
                if (kwargs->contains(k)) return fail(std::string("field 'chat_template_kwargs.") + k + "': set by the server, not by a request");
        }
        if (tools != o.end() || kwargs != o.end()) {
            // Read again keeping key order: templates print tools and arguments as they were sent.
            const auto ordered = nlohmann::ordered_json::parse(bytes);
            if (tools != o.end()) r.tools = ordered.at("tools").dump();
            if (kwargs != o.end()) r.chat_template_kwargs = ordered.at("chat_template_kwargs").dump();
        }
        for (const char * k : {"frequency_penalty", "presence_penalty"})
            if (auto it = o.find(k); it != o.end()) {
                double d = 0;
                if (!get_finite(*it, d) || d < -2 || d > 2) return fail(expected(k, "a number in [-2, 2]", *it));
                (k[0] == 'f' ? r.frequency_penalty : r.presence_penalty) = float(d);
            }
        return r;
    }

    ParseError fail(ErrorCode code, std::string message) { return ParseError{code, std::move(message), id_}; }
    ParseError fail(std::string message) { return fail(ErrorCode::BadRequest, std::move(message)); }

private:
    bool error(std::string message) {
        error_ = std::move(message);
        return false;
    }

    // {"<token id>": bias, ...}: ids in decimal, as OpenAI's logit_bias.
    bool read_logit_bias(const json & v, std::vector<std::pair<int32_t, float>> & out) {
        if (!v.is_object()) return error(expected("logit_bias", "an object {\"<token id>\": bias}", v));
        if (int64_t(v.size()) > limits_.max_logit_bias)
            return error("field 'logit_bias': " + std::to_string(v.size()) + " tokens, more than the limit of " +
                         std::to_string(limits_.max_logit_bias));
        const int64_t n_vocab = limits_.n_vocab > 0 ? std::min<int64_t>(limits_.n_vocab, INT32_MAX) : INT32_MAX;
        for (const auto & [k, b] : v.items()) {
            int64_t id = 0;
            bool ok = !k.empty() && k.size() <= 10 && (k.size() == 1 || k[0] != '0');   // "05" would repeat "5"
            for (char ch : k) ok = ok && ch >= '0' && ch <= '9';
            if (ok) id = std::stoll(k);
            if (!ok || id >= n_vocab)
                return error("field 'logit_bias': key '" + name_of(k) + "' is not a token id in " + range(0, n_vocab - 1));
            double d = 0;
            if (!get_finite(b, d) || d < -100 || d > 100)
                return error(expected("logit_bias." + name_of(k), "a number in [-100, 100]", b));
            out.push_back({int32_t(id), float(d)});
        }
        std::sort(out.begin(), out.end());   // by id (JSON keys "10" < "9"); keys are distinct
        return true;
    }

    bool read_prompt(const json & o, Request & r) {
        const auto prompt = o.find("prompt"), ids = o.find("prompt_ids"), messages = o.find("messages");
        std::vector<std::string> given;
        if (prompt != o.end()) given.push_back("'prompt'");
        if (ids != o.end()) given.push_back("'prompt_ids'");
        if (messages != o.end()) given.push_back("'messages'");
        if (given.size() != 1) {
            std::string which = given.empty() ? "missing the prompt" : "fields " + given[0] + " and " + given[1] + " both given";
            return error(which + ": give exactly one of 'prompt', 'prompt_ids' or 'messages'");
        }
        if (prompt != o.end()) {
            if (!prompt->is_string() || prompt->get_ref<const std::string &>().empty())
                return error(expected("prompt", "a non-empty string", *prompt));
            r.prompt = prompt->get<std::string>();
        } else if (ids != o.end()) {
            if (!ids->is_array() || ids->empty())
                return error(expected("prompt_ids", "a non-empty array of token ids", *ids));
            const int64_t hi = limits_.n_vocab > 0 ? std::min<int64_t>(limits_.n_vocab - 1, INT32_MAX) : INT32_MAX;
            std::vector<int32_t> out;
            out.reserve(ids->size());
            for (size_t i = 0; i < ids->size(); ++i) {
                int64_t t = 0;
                if (!get_integer((*ids)[i], 0, hi, t))
                    return error(expected("prompt_ids[" + std::to_string(i) + "]", "an integer in " + range(0, hi), (*ids)[i]));
                out.push_back(int32_t(t));
            }
            r.prompt_ids = std::move(out);
        } else {
            return read_messages(*messages, r);
        }
        return true;
    }

    bool read_messages(const json & a, Request & r) {
        if (!a.is_array() || a.empty())
            return error(expected("messages", "a non-empty array of {\"role\", \"content\"} objects", a));
        if (int64_t(a.size()) > limits_.max_messages)
            return error("field 'messages': expected at most " + std::to_string(limits_.max_messages) +
                         " messages, got " + std::to_string(a.size()));
        std::vector<ChatMessage> out;
        out.reserve(a.size());
        for (size_t i = 0; i < a.size(); ++i) {
            const std::string field = "messages[" + std::to_string(i) + "]";
            const json & m = a[i];
            if (!m.is_object()) return error(expected(field, "an object {\"role\", \"content\"}", m));
            const auto role = m.find("role"), content = m.find("content");
            if (role == m.end()) return error("field '" + field + ".role': missing");
            if (*role != "system" && *role != "user" && *role != "assistant" && *role != "tool")
                return error(expected(field + ".role", "one of \"system\", \"user\", \"assistant\", \"tool\"", *role));
            ChatMessage msg;
            msg.role = role->get<std::string>();
            for (const auto & [k, v] : m.items()) {
                const bool ok = k == "role" || k == "content" ||
                                (msg.role == "assistant" && (k == "tool_calls" || k == "reasoning_content")) ||
                                (msg.role == "tool" && (k == "tool_call_id" || k == "name"));
                if (!ok) return error("unknown field '" + field + "." + name_of(k) + "'" +
                                      (k == "tool_calls" || k == "tool_call_id" || k == "reasoning_content" || k == "name"
                                           ? " for a message with role '" + msg.role + "'" : ""));
            }
            const bool calls = m.contains("tool_calls");
            if (content == m.end() && !calls) return error("field '" + field + ".content': missing");
            if (content != m.end()) {
                if (!content->is_string()) return error(expected(field + ".content", "a string", *content));
                msg.content = content->get<std::string>();
            }
            if (calls && !read_tool_calls(m.at("tool_calls"), field + ".tool_calls", msg.tool_calls)) return false;
            if (auto it = m.find("reasoning_content"); it != m.end()) {
                if (!it->is_string()) return error(expected(field + ".reasoning_content", "a string", *it));
                msg.reasoning_content = it->get<std::string>();
            }
            if (msg.role == "tool") {
                const auto id = m.find("tool_call_id");
                if (id == m.end()) return error("field '" + field + ".tool_call_id': missing (the id of the call this answers)");
                if (!id->is_string() || !valid_id(id->get_ref<const std::string &>(), limits_.max_id_bytes))
                    return error(expected(field + ".tool_call_id", "a string of 1 to " + std::to_string(limits_.max_id_bytes) +
                                                                       " printable ASCII characters", *id));
                msg.tool_call_id = id->get<std::string>();
                if (auto it = m.find("name"); it != m.end()) {
                    if (!it->is_string() || it->get_ref<const std::string &>().empty())
                        return error(expected(field + ".name", "a function's name", *it));
                    msg.name = it->get<std::string>();
                }
            }
            out.push_back(std::move(msg));
        }
        r.messages = std::move(out);
        return true;
    }

    // [{"id", "type": "function", "function": {"name", "arguments": JSON text of an object}}]
    bool read_tool_calls(const json & a, const std::string & field, std::vector<ToolCall> & out) {
        if (!a.is_array()) return error(expected(field, "an array of {\"id\", \"type\", \"function\"} objects", a));
        if (int64_t(a.size()) > limits_.max_tools)
            return error("field '" + field + "': more than " + std::to_string(limits_.max_tools) + " calls");
        for (size_t i = 0; i < a.size(); ++i) {
            const std::string f = field + "[" + std::to_string(i) + "]";
            const json & c = a[i];
            if (!c.is_object()) return error(expected(f, "an object {\"id\", \"type\", \"function\"}", c));
            for (const auto & [k, v] : c.items())
                if (k != "id" && k != "type" && k != "function") return error("unknown field '" + f + "." + name_of(k) + "'");
            ToolCall call;
            const auto id = c.find("id"), type = c.find("type"), fn = c.find("function");
            if (id == c.end() || !id->is_string() || !valid_id(id->get_ref<const std::string &>(), limits_.max_id_bytes))
                return error(id == c.end() ? "field '" + f + ".id': missing"
                                           : expected(f + ".id", "a string of 1 to " + std::to_string(limits_.max_id_bytes) +
                                                                     " printable ASCII characters", *id));
            call.id = id->get<std::string>();
            if (type != c.end() && *type != "function") return error(expected(f + ".type", "\"function\"", *type));
            if (fn == c.end() || !fn->is_object()) return error(fn == c.end() ? "field '" + f + ".function': missing"
                                                                             : expected(f + ".function", "an object {\"name\", \"arguments\"}", *fn));
            for (const auto & [k, v] : fn->items())
                if (k != "name" && k != "arguments") return error("unknown field '" + f + ".function." + name_of(k) + "'");
            const auto name = fn->find("name"), args = fn->find("arguments");
            if (name == fn->end() || !name->is_string() || name->get_ref<const std::string &>().empty())
                return error(name == fn->end() ? "field '" + f + ".function.name': missing" : expected(f + ".function.name", "a function's name", *name));
            call.name = name->get<std::string>();
            if (args == fn->end()) return error("field '" + f + ".function.arguments': missing");
            if (!args->is_string()) return error(expected(f + ".function.arguments", "a string (the JSON text of an object)", *args));
            call.arguments = args->get<std::string>();
            out.push_back(std::move(call));
        }
        return true;
    }

    // [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]
    bool check_tools(const json & a) {
        if (!a.is_array() || a.empty()) return error(expected("tools", "a non-empty array of {\"type\": \"function\", \"function\"} objects", a));
        if (int64_t(a.size()) > limits_.max_tools)
            return error("field 'tools': more than " + std::to_string(limits_.max_tools) + " functions");
        for (size_t i = 0; i < a.size(); ++i) {
            const std::string f = "tools[" + std::to_string(i) + "]";
            const json & t = a[i];
            if (!t.is_object()) return error(expected(f, "an object {\"type\": \"function\", \"function\"}", t));
            for (const auto & [k, v] : t.items())
                if (k != "type" && k != "function") return error("unknown field '" + f + "." + name_of(k) + "'");
            if (t.value("type", json()) != "function") return error(expected(f + ".type", "\"function\"", t.value("type", json())));
            const auto fn = t.find("function");
            if (fn == t.end() || !fn->is_object()) return error(fn == t.end() ? "field '" + f + ".function': missing"
                                                                           : expected(f + ".function", "an object {\"name\", ...}", *fn));
            for (const auto & [k, v] : fn->items())
                if (k != "name" && k != "description" && k != "parameters" && k != "strict")
                    return error("unknown field '" + f + ".function." + name_of(k) + "'");
            const auto name = fn->find("name");
            // OpenAI's rule (and dots): every call format can write such a name, and read it back
            auto good = [](const std::string & n) {
                return !n.empty() && n.size() <= 64 && std::all_of(n.begin(), n.end(), [](char c) {
                    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
                });
            };
            if (name == fn->end() || !name->is_string() || !good(name->get_ref<const std::string &>()))
                return error(name == fn->end() ? "field '" + f + ".function.name': missing"
                                               : expected(f + ".function.name", "1 to 64 letters, digits, '_', '-' or '.'", *name));
            for (size_t j = 0; j < i; ++j)
                if (a[j].at("function").at("name") == *name) return error("field '" + f + ".function.name': '" + printable(name->get<std::string>()) + "' is offered twice");
            if (auto d = fn->find("description"); d != fn->end() && !d->is_string())
                return error(expected(f + ".function.description", "a string", *d));
            if (auto pr = fn->find("parameters"); pr != fn->end() && !pr->is_object())
                return error(expected(f + ".function.parameters", "an object (a JSON Schema)", *pr));
            if (auto st = fn->find("strict"); st != fn->end() && !st->is_boolean())
                return error(expected(f + ".function.strict", "true or false", *st));
        }
        return true;
    }

    bool read_tool_choice(const json & v, const json * tools, Request & r) {
        if (v == "auto") r.tool_choice = ToolChoice::Auto;
        else if (v == "none") r.tool_choice = ToolChoice::None;
        else if (v == "required") r.tool_choice = ToolChoice::Required;
        else if (v.is_object() && v.size() == 2 && v.value("type", json()) == "function" && v.contains("function") &&
                 v["function"].is_object() && v["function"].size() == 1 && v["function"].contains("name") &&
                 v["function"]["name"].is_string()) {
            r.tool_choice = ToolChoice::Named;
            r.tool_choice_name = v["function"]["name"].get<std::string>();
            bool found = false;
            for (const json & t : tools ? *tools : json::array()) found = found || t["function"]["name"] == r.tool_choice_name;
            if (!found) return error("field 'tool_choice': '" + printable(r.tool_choice_name) + "' is not one of the request's tools");
            return true;
        } else {
            return error(expected("tool_choice", "\"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\"}}", v));
        }
        if (r.tool_choice == ToolChoice::Required && !tools) return error("field 'tool_choice': \"required\" without 'tools'");
        return true;
    }

    bool read_stop(const json & v, std::vector<std::string> & out) {
        const std::string one = "a non-empty string of at most " + std::to_string(limits_.max_stop_bytes) + " bytes";
        auto good = [&](const json & s) {
            return s.is_string() && !s.get_ref<const std::string &>().empty() &&
                   int64_t(s.get_ref<const std::string &>().size()) <= limits_.max_stop_bytes;
        };
        if (v.is_string()) {
            if (!good(v)) return error(expected("stop", one, v));
            out = {v.get<std::string>()};
            return true;
        }
        if (!v.is_array()) return error(expected("stop", one + " or an array of them", v));
        if (int64_t(v.size()) > limits_.max_stop)
            return error("field 'stop': expected at most " + std::to_string(limits_.max_stop) + " stop strings, got " +
                         std::to_string(v.size()));
        out.clear();
        for (size_t i = 0; i < v.size(); ++i) {
            if (!good(v[i])) return error(expected("stop[" + std::to_string(i) + "]", one, v[i]));
            out.push_back(v[i].get<std::string>());
        }
        return true;
    }

    const Limits & limits_;
    std::string id_;
    std::string error_;
};

// A float as the shortest decimal that reads back as the same float (0.7f as
// 0.7, not 0.699999988079071), or exactly when reading as a double would not.
ojson float_value(float f) {
    char buf[32];
    const auto res = std::to_chars(buf, buf + sizeof buf, f);
    double d = 0;
    std::from_chars(buf, res.ptr, d);   // not strtod: that one follows the locale
    return float(d) == f ? ojson(d) : ojson(double(f));
}

std::string dump(const ojson & o) { return o.dump(-1, ' ', false, ojson::error_handler_t::replace); }

ojson id_or_null(std::string_view id) { return id.empty() ? ojson(nullptr) : ojson(std::string(id)); }

ojson finite_or_null(double d) { return std::isfinite(d) ? ojson(d) : ojson(nullptr); }

// The message of an unexpected exception, made safe to put in a ParseError.
std::string internal_message(const char * what) {
    return "internal error while parsing: " + printable(what ? what : "");
}

class ResponseChecker {
public:
    explicit ResponseChecker(const json & o) : o_(o) {}

    // Empty when every documented field of the frame's type is present with its type.
    std::string check(const std::string & type) {
        if (type == "token") {
            if (!has_integer("index", 0, std::numeric_limits<int64_t>::max())) return error_;
            if (!has_integer("token", 0, INT32_MAX)) return error_;
            if (!has_string("text", true)) return error_;
            if (o_.contains("reasoning") && !has_string("reasoning", true)) return error_;
            if (auto lp = o_.find("logprobs"); lp != o_.end())
                if (std::string e = check_logprobs(*lp, "logprobs", true); !e.empty()) return e;
        } else if (type == "done") {
            const auto tokens = o_.find("tokens");
            if (tokens == o_.end() || !tokens->is_array()) return expected_or_missing("tokens", "an array of token ids");
            for (size_t i = 0; i < tokens->size(); ++i) {
                int64_t t = 0;
                if (!get_integer((*tokens)[i], 0, INT32_MAX, t))
                    return expected("tokens[" + std::to_string(i) + "]", "a token id", (*tokens)[i]);
            }
            if (auto lp = o_.find("logprobs"); lp != o_.end()) {
                // an entry per token, and one for the end-of-sequence token that ended it
                if (!lp->is_array() || (lp->size() != tokens->size() && lp->size() != tokens->size() + 1))
                    return expected("logprobs", "an array with an entry per token", *lp);
                for (size_t i = 0; i < lp->size(); ++i)
                    if (std::string e = check_logprobs((*lp)[i], "logprobs[" + std::to_string(i) + "]", true); !e.empty())
                        return e;
            }
            if (auto lp = o_.find("prompt_logprobs"); lp != o_.end()) {
                if (!lp->is_array()) return expected("prompt_logprobs", "an array with an entry per prompt token", *lp);
                for (size_t i = 0; i < lp->size(); ++i)
                    if (std::string e = check_logprobs((*lp)[i], "prompt_logprobs[" + std::to_string(i) + "]", true); !e.empty())
                        return e;
            }
            if (o_.contains("prompt_text") && !has_string("prompt_text", true)) return error_;
            if (o_.contains("grammar_error") && !has_string("grammar_error", false)) return error_;
            if (o_.contains("reasoning") && !has_string("reasoning", true)) return error_;
            if (auto tc = o_.find("tool_calls"); tc != o_.end()) {
                if (!tc->is_array()) return expected("tool_calls", "an array of calls", *tc);
                for (size_t i = 0; i < tc->size(); ++i) {
                    const json & c = (*tc)[i];
                    const bool ok = c.is_object() && c.contains("id") && c["id"].is_string() && c.contains("function") &&
                                    c["function"].is_object() && c["function"].contains("name") && c["function"]["name"].is_string() &&
                                    c["function"].contains("arguments") && c["function"]["arguments"].is_string();
                    if (!ok) return expected("tool_calls[" + std::to_string(i) + "]", "{\"id\", \"type\", \"function\": {\"name\", \"arguments\"}}", c);
                }
            }
            if (!has_string("text", true) || !has_string("finish_reason", false)) return error_;
            const auto usage = o_.find("usage");
            if (usage == o_.end() || !usage->is_object()) return expected_or_missing("usage", "an object");
            for (const char * k : {"prompt_tokens", "completion_tokens"}) {
                const auto it = usage->find(k);
                int64_t n = 0;
                if (it == usage->end()) return std::string("field 'usage.") + k + "': missing";
                if (!get_integer(*it, 0, std::numeric_limits<int64_t>::max(), n))
                    return expected(std::string("usage.") + k, "a non-negative integer", *it);
            }
            const auto timings = o_.find("timings");
            if (timings == o_.end() || !timings->is_object()) return expected_or_missing("timings", "an object");
            for (const char * k : {"queue_ms", "ttft_ms", "total_ms", "decode_tokens_per_second"}) {
                const auto it = timings->find(k);
                if (it == timings->end()) return std::string("field 'timings.") + k + "': missing";
                if (!it->is_number() && !it->is_null())
                    return expected(std::string("timings.") + k, "a number or null", *it);
            }
            int64_t preempted = 0;   // absent from servers before it
            if (const auto it = timings->find("preempted");
                it != timings->end() && !get_integer(*it, 0, std::numeric_limits<int64_t>::max(), preempted))
                return expected("timings.preempted", "a non-negative integer", *it);
        } else if (type == "error") {
            if (!has_string("code", false) || !has_string("message", true)) return error_;
            if (o_.contains("retry_after_ms") &&
                !has_integer("retry_after_ms", 0, std::numeric_limits<int64_t>::max()))
                return error_;
        }
        return {};
    }

private:
    // A TokenLogprob entry at field f (with its top_logprobs when top): empty when well formed.
    static std::string check_logprobs(const json & e, const std::string & f, bool top) {
        if (!e.is_object()) return expected(f, "an object {\"token\", \"logprob\", ...}", e);
        int64_t t = 0;
        const auto token = e.find("token"), logprob = e.find("logprob");
        if (token == e.end() || !get_integer(*token, 0, INT32_MAX, t))
            return expected(f + ".token", "a token id", token == e.end() ? json() : *token);
        if (logprob == e.end() || !(logprob->is_number() || logprob->is_null()))
            return expected(f + ".logprob", "a number or null", logprob == e.end() ? json() : *logprob);
        if (auto it = e.find("text"); it != e.end() && !it->is_string()) return expected(f + ".text", "a string", *it);
        if (auto it = e.find("special"); it != e.end() && !it->is_boolean()) return expected(f + ".special", "true or false", *it);
        if (auto it = e.find("bytes"); it != e.end()) {
            bool ok = it->is_array();
            for (size_t i = 0; ok && i < it->size(); ++i) ok = get_integer((*it)[i], 0, 255, t);
            if (!ok) return expected(f + ".bytes", "an array of byte values", *it);
        }
        if (!top) return {};
        const auto tl = e.find("top_logprobs");
        if (tl == e.end() || !tl->is_array())
            return expected(f + ".top_logprobs", "an array", tl == e.end() ? json() : *tl);
        for (size_t i = 0; i < tl->size(); ++i)
            if (std::string m = check_logprobs((*tl)[i], f + ".top_logprobs[" + std::to_string(i) + "]", false); !m.empty())
                return m;
        return {};
    }

    std::string expected_or_missing(const std::string & k, std::string_view what) {
        const auto it = o_.find(k);
        return it == o_.end() ? "field '" + k + "': missing" : expected(k, what, *it);
    }
    bool has_integer(const std::string & k, int64_t lo, int64_t hi) {
        const auto it = o_.find(k);
        int64_t v = 0;
        if (it != o_.end() && get_integer(*it, lo, hi, v)) return true;
        error_ = expected_or_missing(k, "an integer in " + range(lo, hi));
        return false;
    }
    bool has_string(const std::string & k, bool may_be_empty) {
        const auto it = o_.find(k);
        if (it != o_.end() && it->is_string() && (may_be_empty || !it->get_ref<const std::string &>().empty()))
            return true;
        error_ = expected_or_missing(k, may_be_empty ? "a string" : "a non-empty string");
        return false;
    }

    const json & o_;
    std::string error_;
};

std::variant<Response, ParseError> parse_response_unchecked(std::string_view bytes) {
    auto doc = parse_json(bytes, max_response_depth);
    if (auto * message = std::get_if<std::string>(&doc)) return ParseError{ErrorCode::BadRequest, *message, {}};
    json & o = std::get<json>(doc);
    if (!o.is_object())
        return ParseError{ErrorCode::BadRequest, "a response must be a JSON object, got " + describe(o), {}};
    Response r;
    const auto type = o.find("type");
    if (type == o.end()) return ParseError{ErrorCode::BadRequest, "field 'type': missing", {}};
    if (*type != "token" && *type != "done" && *type != "error" && *type != "pong")
        return ParseError{ErrorCode::BadRequest,
                          expected("type", "one of \"token\", \"done\", \"error\", \"pong\"", *type), {}};
    r.type = type->get<std::string>();
    // tokens and done frames belong to a request; errors and pongs may not
    const bool id_required = r.type == "token" || r.type == "done";
    const auto id = o.find("id");
    if (id == o.end()) return ParseError{ErrorCode::BadRequest, "field 'id': missing", {}};
    if (id->is_string() && !id->get_ref<const std::string &>().empty()) r.id = id->get<std::string>();
    else if (id_required || !id->is_null())
        return ParseError{ErrorCode::BadRequest,
                          expected("id", id_required ? "a non-empty string" : "a non-empty string or null", *id), {}};
    if (std::string problem = ResponseChecker(o).check(r.type); !problem.empty())
        return ParseError{ErrorCode::BadRequest, std::move(problem), r.id};
    r.body = std::move(o);
    return r;
}

} // namespace

std::string describe_json(const nlohmann::json & v) { return describe(v); }

std::variant<json, std::string> parse_json(std::string_view bytes, int max_depth) {
    std::vector<std::set<std::string>> keys;   // per open object: the keys seen so far
    auto callback = [&](int depth, json::parse_event_t event, json & parsed) -> bool {
        switch (event) {
        case json::parse_event_t::object_start:
        case json::parse_event_t::array_start:
            if (depth >= max_depth)
                throw Refused{"invalid JSON: nested deeper than " + std::to_string(max_depth) + " levels"};
            if (event == json::parse_event_t::object_start) keys.emplace_back();
            break;
        case json::parse_event_t::object_end: keys.pop_back(); break;
        case json::parse_event_t::key:
            if (!keys.back().insert(parsed.get<std::string>()).second)
                throw Refused{"duplicate field '" + name_of(parsed.get_ref<const std::string &>()) + "'"};
            break;
        default: break;
        }
        return true;
    };
    try {
        return json::parse(bytes.begin(), bytes.end(), callback);
    } catch (const Refused & r) {
        return r.message;
    } catch (const json::parse_error & e) {
        return describe_parse_error(e, bytes);
    } catch (const json::exception & e) {   // out_of_range: a number too large for a double
        std::string what = e.what();
        if (size_t p = what.find("] "); p != std::string::npos) what.erase(0, p + 2);
        return "invalid JSON: " + printable(what);
    }
}

const char * request_type_name(RequestType t) {
    switch (t) {
    case RequestType::Generate: return "generate";
    case RequestType::Cancel: return "cancel";
    case RequestType::Ping: return "ping";
    }
    return "?";
}

const char * error_code_name(ErrorCode c) {
    switch (c) {
    case ErrorCode::BadRequest: return "bad_request";
    case ErrorCode::TooLarge: return "too_large";
    case ErrorCode::TooLong: return "too_long";
    case ErrorCode::Busy: return "busy";
    case ErrorCode::NotFound: return "not_found";
    case ErrorCode::ShuttingDown: return "shutting_down";
    case ErrorCode::Internal: return "internal";
    }
    return "internal";
}

std::optional<ErrorCode> error_code_from_name(std::string_view name) {
    for (ErrorCode c : {ErrorCode::BadRequest, ErrorCode::TooLarge, ErrorCode::TooLong, ErrorCode::Busy,
                        ErrorCode::NotFound, ErrorCode::ShuttingDown, ErrorCode::Internal})
        if (name == error_code_name(c)) return c;
    return std::nullopt;
}

const char * finish_reason_name(FinishReason f) {
    switch (f) {
    case FinishReason::Length: return "length";
    case FinishReason::Stop: return "stop";
    case FinishReason::Eos: return "eos";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::ToolCalls: return "tool_calls";
    }
    return "?";
}

std::variant<Request, ParseError> parse_request(std::string_view bytes, const Limits & limits) {
    RequestParser parser(limits);
    try {
        return parser.parse(bytes);
    } catch (const std::bad_alloc &) {
        return parser.fail(ErrorCode::Internal, "out of memory while parsing the request");
    } catch (const std::exception & e) {
        return parser.fail(ErrorCode::Internal, internal_message(e.what()));
    }
}

std::string request_frame(const Request & r) {
    ojson o;
    o["type"] = request_type_name(r.type);
    if (!r.id.empty()) o["id"] = r.id;
    if (r.type != RequestType::Generate) return dump(o);
    if (r.prompt) o["prompt"] = *r.prompt;
    if (r.prompt_ids) o["prompt_ids"] = *r.prompt_ids;
    if (r.messages) {
        ojson & a = o["messages"] = ojson::array();
        for (const ChatMessage & m : *r.messages) {
            ojson msg = {{"role", m.role}, {"content", m.content}};
            if (!m.tool_calls.empty()) {
                ojson & calls = msg["tool_calls"] = ojson::array();
                for (const ToolCall & c : m.tool_calls)
                    calls.push_back({{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
            }
            if (m.reasoning_content) msg["reasoning_content"] = *m.reasoning_content;
            if (m.role == "tool") {
                msg["tool_call_id"] = m.tool_call_id;
                if (!m.name.empty()) msg["name"] = m.name;
            }
            a.push_back(std::move(msg));
        }
    }
    o["max_tokens"] = r.max_tokens;
    o["temperature"] = float_value(r.temperature);
    o["top_p"] = float_value(r.top_p);
    o["top_k"] = r.top_k;
    o["seed"] = r.seed;
    if (!r.stop.empty()) o["stop"] = r.stop;
    o["stream"] = r.stream;
    if (r.logprobs >= 0) o["logprobs"] = r.logprobs;
    if (r.prompt_logprobs >= 0) o["prompt_logprobs"] = r.prompt_logprobs;
    if (r.echo) o["echo"] = true;
    if (r.repetition_penalty != 1) o["repetition_penalty"] = float_value(r.repetition_penalty);
    if (r.frequency_penalty != 0) o["frequency_penalty"] = float_value(r.frequency_penalty);
    if (r.presence_penalty != 0) o["presence_penalty"] = float_value(r.presence_penalty);
    if (r.priority != 0) o["priority"] = r.priority;
    if (!r.logit_bias.empty()) {
        ojson & b = o["logit_bias"] = ojson::object();
        for (const auto & [t, v] : r.logit_bias) b[std::to_string(t)] = float_value(v);
    }
    if (r.grammar) o["grammar"] = *r.grammar;
    if (r.json_schema) o["json_schema"] = ojson::parse(*r.json_schema);
    if (r.tools) o["tools"] = ojson::parse(*r.tools);
    switch (r.tool_choice) {
    case ToolChoice::Auto: break;
    case ToolChoice::None: o["tool_choice"] = "none"; break;
    case ToolChoice::Required: o["tool_choice"] = "required"; break;
    case ToolChoice::Named: o["tool_choice"] = {{"type", "function"}, {"function", {{"name", r.tool_choice_name}}}}; break;
    }
    if (r.chat_template_kwargs) o["chat_template_kwargs"] = ojson::parse(*r.chat_template_kwargs);
    return dump(o);
}

namespace {

ojson logprob_entry(const TokenLogprob & t) {
    ojson o;
    o["token"] = t.token;
    o["logprob"] = std::isfinite(t.logprob) ? float_value(t.logprob) : ojson(nullptr);
    if (t.bytes) {
        o["text"] = *t.bytes;   // dump() replaces invalid UTF-8
        ojson & b = o["bytes"] = ojson::array();
        for (unsigned char c : *t.bytes) b.push_back(int(c));
    }
    if (t.special) o["special"] = true;
    return o;
}

ojson logprobs_object(const Logprobs & l) {
    ojson o = logprob_entry(l.sampled);
    ojson & top = o["top_logprobs"] = ojson::array();
    for (const TokenLogprob & t : l.top) top.push_back(logprob_entry(t));
    return o;
}

} // namespace

std::string token_frame(std::string_view id, int64_t index, int32_t token, std::string_view text, const Logprobs * logprobs,
                        std::string_view reasoning, const std::vector<ToolCallDelta> & calls) {
    ojson o;
    o["type"] = "token";
    o["id"] = id_or_null(id);
    o["index"] = index;
    o["token"] = token;
    o["text"] = std::string(text);
    if (!reasoning.empty()) o["reasoning"] = std::string(reasoning);
    if (logprobs) o["logprobs"] = logprobs_object(*logprobs);
    if (!calls.empty()) {
        ojson & a = o["tool_calls"] = ojson::array();
        for (const ToolCallDelta & c : calls) {
            ojson d = {{"index", c.index}};
            if (!c.id.empty()) d["id"] = c.id, d["type"] = "function";
            d["function"] = ojson::object();
            if (!c.id.empty()) d["function"]["name"] = c.name;
            d["function"]["arguments"] = c.arguments;
            a.push_back(std::move(d));
        }
    }
    return dump(o);
}

std::string done_frame(std::string_view id, const Done & d) {
    ojson o;
    o["type"] = "done";
    o["id"] = id_or_null(id);
    o["tokens"] = d.tokens;
    if (d.logprobs) {
        ojson & a = o["logprobs"] = ojson::array();
        for (const Logprobs & l : *d.logprobs) a.push_back(logprobs_object(l));
    }
    if (d.prompt_logprobs) {
        ojson & a = o["prompt_logprobs"] = ojson::array();
        for (const Logprobs & l : *d.prompt_logprobs) a.push_back(logprobs_object(l));
    }
    if (d.prompt_text) o["prompt_text"] = *d.prompt_text;
    if (d.grammar_error) o["grammar_error"] = *d.grammar_error;
    if (!d.tool_calls.empty()) {
        ojson & calls = o["tool_calls"] = ojson::array();
        for (const ToolCall & c : d.tool_calls)
            calls.push_back({{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
    }
    if (d.reasoning) o["reasoning"] = *d.reasoning;
    o["text"] = d.text;
    o["finish_reason"] = finish_reason_name(d.finish_reason);
    o["usage"] = {{"prompt_tokens", d.prompt_tokens}, {"completion_tokens", d.completion_tokens}};
    ojson & t = o["timings"] = ojson::object();
    t["queue_ms"] = finite_or_null(d.queue_ms);
    t["ttft_ms"] = finite_or_null(d.ttft_ms);
    t["total_ms"] = finite_or_null(d.total_ms);
    t["decode_tokens_per_second"] = finite_or_null(d.decode_tokens_per_second);
    t["preempted"] = d.preempted;
    return dump(o);
}

std::string error_frame(std::string_view id, ErrorCode code, std::string_view message, int64_t retry_after_ms) {
    ojson o;
    o["type"] = "error";
    o["id"] = id_or_null(id);
    o["code"] = error_code_name(code);
    o["message"] = std::string(message);
    if (retry_after_ms >= 0) o["retry_after_ms"] = retry_after_ms;
    return dump(o);
}

std::string pong_frame(std::string_view id, const nlohmann::json & info) {
    ojson o;
    o["type"] = "pong";
    o["id"] = id_or_null(id);
    o["info"] = info;
    return dump(o);
}

std::variant<Response, ParseError> parse_response(std::string_view bytes) {
    try {
        return parse_response_unchecked(bytes);
    } catch (const std::bad_alloc &) {
        return ParseError{ErrorCode::Internal, "out of memory while parsing the response", {}};
    } catch (const std::exception & e) {
        return ParseError{ErrorCode::Internal, internal_message(e.what()), {}};
    }
}

std::string escaped(std::string_view s, size_t max_bytes) {
    std::string out;
    for (unsigned char c : s.substr(0, max_bytes)) {
        if (c >= 0x20 && c <= 0x7e && c != '\\') {
            out += char(c);
        } else {
            char buf[5];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        }
    }
    if (s.size() > max_bytes) out += "...";
    return out;
}

} // namespace moesh::protocol
