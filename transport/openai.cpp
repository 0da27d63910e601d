#include "transport/openai.h"

#include <new>
#include <optional>
#include <span>

namespace moesh::openai {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;   // bodies keep OpenAI's field order for people reading them

// The body nests object > messages > message > content parts > part: 6 is room to spare.
constexpr int max_body_depth = 64;   // JSON Schemas nest

HttpError bad(std::string message, std::string param = {}) { return HttpError{400, "invalid_request_error", std::move(message), std::move(param), {}}; }

HttpError expected(const std::string & field, const std::string & what, const json & got) {
    return bad("field '" + field + "': expected " + what + ", got " + protocol::describe_json(got), field);
}

// Fields of the OpenAI API that moesh accepts only at the value that means "off".
// Anything else is refused by name rather than silently ignored.
struct OffOnly {
    const char * name;
    bool (*is_off)(const json &);
    const char * off;     // what is accepted, for the message
    const char * why;     // what moesh does instead
};

bool one(const json & v) { return v.is_number_integer() && v.get<int64_t>() == 1; }
bool falsy(const json & v) { return v.is_boolean() && !v.get<bool>(); }
bool empty_array(const json & v) { return v.is_array() && v.empty(); }
bool empty_string(const json & v) { return v.is_string() && v.get_ref<const std::string &>().empty(); }
bool any_string(const json & v) { return v.is_string(); }
bool any_bool(const json & v) { return v.is_boolean(); }
bool any_object(const json & v) { return v.is_object(); }

constexpr OffOnly common_off[] = {
    {"user", any_string, "a string", ""},
};
constexpr OffOnly completion_off[] = {
    {"best_of", one, "1", "one candidate per request"},
    {"suffix", empty_string, "\"\"", "insertion (suffix) is not implemented"},
};
constexpr OffOnly chat_off[] = {
    {"parallel_tool_calls", any_bool, "true or false", ""},
    {"store", falsy, "false", "completions are not stored"},
    {"metadata", any_object, "an object", ""},
};

// Passed through to the protocol, which checks them (and names them in its messages).
constexpr const char * pass_through[] = {"temperature",       "top_p",            "top_k",             "seed", "stop",
                                         "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias",
                                         "priority"};

// A field name from the input, for a message: printable ASCII, others as '?', at most 40 bytes.
std::string printable(std::string_view s) {
    std::string out;
    for (char c : s.substr(0, 40)) out += (c >= 0x20 && c <= 0x7e) ? c : '?';
    if (s.size() > 40) out += "...";
    return out;
}

std::string dump(const ojson & o) { return o.dump(-1, ' ', false, ojson::error_handler_t::replace); }

std::string sse(const ojson & o) { return "data: " + dump(o) + "\n\n"; }

// A chat message's content: a string, null (an assistant turn with no text), or text parts.
std::variant<std::string, HttpError> read_content(const json & c, const std::string & field) {
    if (c.is_null()) return std::string();
    if (c.is_string()) return c.get<std::string>();
    if (!c.is_array()) return expected(field, "a string or an array of {\"type\": \"text\", \"text\"} parts", c);
    std::string text;
    for (size_t i = 0; i < c.size(); ++i) {
        const std::string pf = field + "[" + std::to_string(i) + "]";
        const json & p = c[i];
        if (!p.is_object()) return expected(pf, "an object {\"type\": \"text\", \"text\"}", p);
        const auto type = p.find("type");
        if (type == p.end() || *type != "text")
            return bad("field '" + pf + ".type': only \"text\" parts are accepted (this model reads text), got " +
                           (type == p.end() ? std::string("nothing") : protocol::describe_json(*type)),
                       pf + ".type");
        const auto t = p.find("text");
        if (t == p.end() || !t->is_string()) return expected(pf + ".text", "a string", t == p.end() ? json() : *t);
        text += t->get_ref<const std::string &>();
    }
    return text;
}

std::variant<json, HttpError> read_messages(const json & a) {
    if (!a.is_array() || a.empty()) return expected("messages", "a non-empty array of {\"role\", \"content\"} objects", a);
    json out = json::array();
    for (size_t i = 0; i < a.size(); ++i) {
        const std::string field = "messages[" + std::to_string(i) + "]";
        const json & m = a[i];
        if (!m.is_object()) return expected(field, "an object {\"role\", \"content\"}", m);
        const auto role = m.find("role");
        if (role == m.end()) return bad("field '" + field + ".role': missing", field + ".role");
        std::string r;
        if (*role == "system" || *role == "developer") r = "system";
        else if (*role == "user" || *role == "assistant" || *role == "tool") r = role->get<std::string>();
        else if (*role == "function")
            return bad("field '" + field + ".role': \"function\" messages (the deprecated function calling) are not accepted; use tools", field + ".role");
        else return expected(field + ".role", "one of \"system\", \"developer\", \"user\", \"assistant\", \"tool\"", *role);
        std::string content;
        json msg = {{"role", r}};
        for (const auto & [k, v] : m.items()) {
            if (k == "role" || (k == "name" && r != "tool")) continue;
            if (k == "content") {
                if (v.is_null()) continue;   // an assistant's message with tool calls
                auto c = read_content(v, field + ".content");
                if (auto * e = std::get_if<HttpError>(&c)) return *e;
                content = std::move(std::get<std::string>(c));
            } else if ((k == "tool_calls" && empty_array(v)) || (k == "refusal" && v.is_null()) || v.is_null()) {
                continue;
            } else if ((r == "assistant" && (k == "tool_calls" || k == "reasoning_content")) ||
                       (r == "tool" && (k == "tool_call_id" || k == "name"))) {
                msg[k] = v;   // the protocol checks them
            } else if (k == "function_call" || k == "audio") {
                return bad("field '" + field + "." + k + "': not accepted (the deprecated function calling and audio are not implemented)", field + "." + k);
            } else {
                return bad("unknown field '" + field + "." + printable(k) + "'", field + "." + printable(k));
            }
        }
        if (m.find("content") == m.end() && r != "assistant") return bad("field '" + field + ".content': missing", field + ".content");
        msg["content"] = content;
        out.push_back(std::move(msg));
    }
    return out;
}

bool is_token_array(const json & v) {
    if (!v.is_array() || v.empty()) return false;
    for (const json & t : v)
        if (!t.is_number_integer() && !t.is_number_unsigned()) return false;
    return true;
}

// prompt: a string, an array of token ids, or an array of either (several prompts). The first
// goes into frame; all go into prompts.
std::optional<HttpError> read_prompt(const json & p, json & frame, Translated & t) {
    std::vector<const json *> list{&p};
    if (p.is_array() && !p.empty() && (p[0].is_string() || p[0].is_array())) {
        if (p.size() > size_t(max_requests))
            return bad("field 'prompt': " + std::to_string(p.size()) + " prompts in one request; at most " +
                           std::to_string(max_requests) + " (send the rest in another request: they are batched together)",
                       "prompt");
        list.clear();
        for (const json & one : p) list.push_back(&one);
    }
    for (size_t i = 0; i < list.size(); ++i) {
        const json & one = *list[i];
        if (one.is_string()) t.prompts.push_back({"prompt", one});
        else if (is_token_array(one)) t.prompts.push_back({"prompt_ids", one});
        else
            return expected(list.size() > 1 ? "prompt[" + std::to_string(i) + "]" : "prompt",
                            "a non-empty string or a non-empty array of token ids", one);
        t.prompt_ids = t.prompt_ids || t.prompts.back().first == "prompt_ids";
    }
    frame[t.prompts[0].first] = t.prompts[0].second;
    return std::nullopt;
}

const char * finish_reason(const json & done) {
    const std::string r = done.value("finish_reason", "");
    if (r == "length") return "length";
    if (r == "cancelled") return "cancelled";   // the server drained or the client left: not an OpenAI reason
    if (r == "tool_calls") return "tool_calls";
    return "stop";                              // eos or a stop string
}

// Each prompt counted once (its choices have the same), the completions of all choices.
ojson usage(const std::vector<json> & dones, int per_prompt) {
    int64_t p = 0, c = 0;
    for (size_t i = 0; i < dones.size(); ++i) {
        const json & u = dones[i].at("usage");
        if (i % size_t(std::max(1, per_prompt)) == 0) p += u.value("prompt_tokens", int64_t(0));
        c += u.value("completion_tokens", int64_t(0));
    }
    return {{"prompt_tokens", p}, {"completion_tokens", c}, {"total_tokens", p + c}};
}

ojson head(Endpoint e, const Reply & r, bool chunk) {
    const char * object = e == Endpoint::Completions ? "text_completion" : chunk ? "chat.completion.chunk" : "chat.completion";
    return {{"id", r.id}, {"object", object}, {"created", r.created}, {"model", r.model}};
}

// A protocol logprobs entry's token as text: its text; "bytes:\xNN..." when its bytes are not
// whole UTF-8 characters, i.e. differ from the text the server made valid (OpenAI's form: the
// text would be a U+FFFD shared by many tokens); "token_id:N" from a server without a tokenizer.
std::string token_string(const json & entry) {
    const auto t = entry.find("text"), b = entry.find("bytes");
    if (t != entry.end() && t->is_string() && b != entry.end() && b->is_array()) {
        std::string bytes;   // parse_response checked 0..255
        for (const json & v : *b) bytes += char(uint8_t(v.get<int>()));
        if (bytes != t->get_ref<const std::string &>()) {   // the server replaced invalid UTF-8 in the text
            static constexpr char hex[] = "0123456789abcdef";
            std::string s = "bytes:";
            for (unsigned char c : bytes) s += std::string("\\x") + hex[c >> 4] + hex[c & 15];
            return s;
        }
        return bytes;
    }
    if (t != entry.end() && t->is_string()) return t->get<std::string>();
    return "token_id:" + std::to_string(entry.value("token", 0));
}

ojson logprob_value(const json & entry) {
    const auto l = entry.find("logprob");
    return l != entry.end() && l->is_number() ? ojson(l->get<double>()) : ojson(nullptr);
}

ojson token_bytes(const json & entry) {
    const auto b = entry.find("bytes");
    return b != entry.end() && b->is_array() ? ojson(*b) : ojson(nullptr);
}

// Characters (code points) of valid UTF-8: completions' text_offset counts them, as OpenAI's does.
int64_t code_points(const std::string & s) {
    int64_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

// OpenAI's logprobs object for protocol entries (parse_response checked their shape); offset:
// the completion's characters before the first entry, advanced past the last.
ojson openai_logprobs(Endpoint e, const json & entries, int64_t & offset) {
    if (e == Endpoint::Chat) {
        ojson content = ojson::array();
        for (const json & x : entries) {
            ojson top = ojson::array();
            for (const json & t : x.at("top_logprobs"))
                top.push_back({{"token", token_string(t)}, {"logprob", logprob_value(t)}, {"bytes", token_bytes(t)}});
            content.push_back({{"token", token_string(x)}, {"logprob", logprob_value(x)}, {"bytes", token_bytes(x)},
                               {"top_logprobs", std::move(top)}});
        }
        return {{"content", std::move(content)}, {"refusal", nullptr}};
    }
    ojson tokens = ojson::array(), lps = ojson::array(), tops = ojson::array(), offsets = ojson::array();
    for (const json & x : entries) {
        const std::string text = token_string(x);
        tokens.push_back(text);
        lps.push_back(logprob_value(x));
        // The sampled token is always among them, as in OpenAI's legacy API (up to logprobs + 1).
        const ojson lp = logprob_value(x);
        ojson top = ojson::object();
        for (const json & t : x.at("top_logprobs")) top[token_string(t)] = logprob_value(t);
        if (!top.contains(text) && !lp.is_null()) top[text] = lp;
        tops.push_back(top.empty() ? ojson(nullptr) : std::move(top));   // a prompt's first token: nothing scored it
        offsets.push_back(offset);
        // what the token adds to the text: its text (a bytes form is longer); a special token's is not in it
        const auto t = x.find("text");
        if (!x.value("special", false)) offset += code_points(t != x.end() && t->is_string() ? t->get<std::string>() : text);
    }
    return {{"tokens", std::move(tokens)}, {"token_logprobs", std::move(lps)}, {"top_logprobs", std::move(tops)},
            {"text_offset", std::move(offsets)}};
}

// A done frame's tool_calls in OpenAI's shape ("index" added for stream deltas).
ojson tool_calls(const json & done, bool delta) {
    ojson out = ojson::array();
    const auto it = done.find("tool_calls");
    if (it == done.end()) return out;
    for (size_t i = 0; i < it->size(); ++i) {
        const json & c = (*it)[i];
        ojson call = ojson::object();
        if (delta) call["index"] = i;
        call["id"] = c.at("id");
        call["type"] = "function";
        call["function"] = {{"name", c.at("function").at("name")}, {"arguments", c.at("function").at("arguments")}};
        out.push_back(std::move(call));
    }
    return out;
}

// reasoning: the chat message's reasoning_content (vLLM's and DeepSeek's name), when the model reasoned.
ojson choice(Endpoint e, std::string_view text, const char * finish, bool first, bool whole, ojson logprobs = nullptr,
             ojson calls = ojson::array(), const std::string * reasoning = nullptr, int index = 0) {
    ojson c = {{"index", index}};
    if (e == Endpoint::Completions) {
        c["text"] = std::string(text);
    } else if (whole) {
        c["message"] = {{"role", "assistant"}, {"content", text.empty() && !calls.empty() ? ojson(nullptr) : ojson(std::string(text))}};
        if (reasoning) c["message"]["reasoning_content"] = *reasoning;
        if (!calls.empty()) c["message"]["tool_calls"] = std::move(calls);
    } else if (!calls.empty()) {
        c["delta"] = {{"tool_calls", std::move(calls)}};
    } else {
        ojson delta = ojson::object();
        if (first) delta["role"] = "assistant";
        if (reasoning && !reasoning->empty()) delta["reasoning_content"] = *reasoning;
        if (!text.empty() || (first && !reasoning)) delta["content"] = std::string(text);
        c["delta"] = std::move(delta);
    }
    c["logprobs"] = std::move(logprobs);
    c["finish_reason"] = finish ? ojson(finish) : ojson(nullptr);
    return c;
}

std::variant<Translated, HttpError> translate_checked(Endpoint endpoint, std::string_view body, const Defaults & d) {
    if (int64_t(body.size()) > d.max_body_bytes)
        return HttpError{413, "invalid_request_error",
                         "request body of " + std::to_string(body.size()) + " bytes is larger than the limit of " +
                             std::to_string(d.max_body_bytes) + " bytes",
                         {}, {}};
    auto doc = protocol::parse_json(body, max_body_depth);
    if (auto * m = std::get_if<std::string>(&doc)) return bad(*m);
    const json & o = std::get<json>(doc);
    if (!o.is_object()) return bad("the request body must be a JSON object, got " + protocol::describe_json(o));

    const bool chat = endpoint == Endpoint::Chat;
    Translated t;
    json frame = {{"id", d.id}};
    bool have_max = false, have_seed = false, have_temperature = false;
    const json * stream_options = nullptr;
    bool echo = false;
    const json * response_format = nullptr;
    const char * constraint = nullptr;      // "grammar" or "json_schema" (llama-server's fields)
    const json * chat_logprobs = nullptr;   // chat: "logprobs" (true/false) and "top_logprobs" (how many)
    const json * top_logprobs = nullptr;
    const json * tool_choice = nullptr;
    std::vector<std::string> ordered_fields;   // tools, chat_template_kwargs: taken from the body with their key order
    for (const auto & item : o.items()) {
        const std::string & k = item.key();   // not structured bindings: clang 14's lambdas cannot capture them
        const json & v = item.value();
        if (v.is_null()) continue;   // OpenAI clients send null for "not given"
        if (k == "model") {
            if (!v.is_string()) return expected("model", "a string", v);   // any name: this server has one model
        } else if (k == (chat ? "messages" : "prompt")) {
            if (chat) {
                auto m = read_messages(v);
                if (auto * e = std::get_if<HttpError>(&m)) return *e;
                frame["messages"] = std::move(std::get<json>(m));
            } else if (auto e = read_prompt(v, frame, t)) {
                return *e;
            }
        } else if (k == "n") {
            if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > max_choices)
                return expected("n", "an integer in [1, " + std::to_string(max_choices) + "]", v);
            t.n = int(v.get<int64_t>());
        } else if (k == "max_tokens" || (chat && k == "max_completion_tokens")) {
            if (have_max && frame["max_tokens"] != v)
                return bad("fields 'max_tokens' and 'max_completion_tokens' disagree: give one", k);
            frame["max_tokens"] = v;
            have_max = true;
        } else if (k == "stream") {
            if (!v.is_boolean()) return expected("stream", "true or false", v);
            t.stream = v.get<bool>();
            frame["stream"] = t.stream;
        } else if (k == "stream_options") {
            stream_options = &v;
        } else if (k == "logprobs") {
            if (chat) chat_logprobs = &v;
            else frame["logprobs"] = v;   // how many most likely tokens; the protocol checks it
        } else if (chat && k == "top_logprobs") {
            top_logprobs = &v;
        } else if (k == "response_format") {
            response_format = &v;
        } else if (k == "grammar" || k == "json_schema") {
            if (constraint) return bad("fields 'grammar' and 'json_schema': give one, not both", k);
            constraint = k == "grammar" ? "grammar" : "json_schema";
            if (k == "grammar") frame["grammar"] = v;   // a json_schema keeps its key order: added below
            else if (!v.is_object()) return expected("json_schema", "an object (a JSON Schema)", v);
        } else if (chat && (k == "tools" || k == "chat_template_kwargs")) {
            if (k == "tools" && empty_array(v)) continue;   // some clients send [] for none
            ordered_fields.push_back(k);   // kept in the client's key order: added below
            frame[k] = v;
        } else if (chat && k == "tool_choice") {
            tool_choice = &v;
        } else if (!chat && k == "echo") {
            if (!v.is_boolean()) return expected("echo", "true or false", v);
            echo = v.get<bool>();
        } else {
            bool known = false;
            for (const char * p : pass_through)
                if (k == p) {
                    frame[k] = v;
                    known = true;
                }
            have_seed |= k == "seed";
            have_temperature |= k == "temperature";
            auto check = [&](const OffOnly & f) -> std::optional<HttpError> {
                if (k != f.name) return std::nullopt;
                known = true;
                if (f.is_off(v)) return std::nullopt;
                std::string m = "field '" + k + "': only " + f.off + " is accepted, got " + protocol::describe_json(v);
                if (*f.why) m += std::string(" (") + f.why + ")";
                return bad(std::move(m), k);
            };
            for (const OffOnly & f : common_off)
                if (auto e = check(f)) return *e;
            for (const OffOnly & f : chat ? std::span<const OffOnly>(chat_off) : std::span<const OffOnly>(completion_off))
                if (auto e = check(f)) return *e;
            if (!known)
                return bad("unknown field '" + printable(k) + "' for " + (chat ? "/v1/chat/completions" : "/v1/completions"),
                           printable(k));
        }
    }
    if (chat ? !frame.contains("messages") : t.prompts.empty())
        return bad(std::string("field '") + (chat ? "messages" : "prompt") + "': missing", chat ? "messages" : "prompt");
    if (stream_options) {
        if (!t.stream) return bad("field 'stream_options': only allowed with \"stream\": true", "stream_options");
        if (!stream_options->is_object()) return expected("stream_options", "an object {\"include_usage\"}", *stream_options);
        for (const auto & [k, v] : stream_options->items()) {
            if (k != "include_usage")
                return bad("unknown field 'stream_options." + printable(k) + "'", "stream_options." + printable(k));
            if (!v.is_boolean()) return expected("stream_options.include_usage", "true or false", v);
            t.include_usage = v.get<bool>();
        }
    }
    if (chat_logprobs && !chat_logprobs->is_boolean()) return expected("logprobs", "true or false", *chat_logprobs);
    if (const int64_t hi = protocol::Limits{}.max_logprobs;
        top_logprobs && !(top_logprobs->is_number_integer() && top_logprobs->get<int64_t>() >= 0 && top_logprobs->get<int64_t>() <= hi))
        return expected("top_logprobs", "an integer in [0, " + std::to_string(hi) + "]", *top_logprobs);
    if (chat_logprobs && chat_logprobs->get<bool>()) frame["logprobs"] = top_logprobs ? *top_logprobs : json(0);
    else if (top_logprobs) return bad("field 'top_logprobs': only allowed with \"logprobs\": true", "top_logprobs");
    if (echo) {   // the prompt's text, and its tokens' log-probabilities when logprobs asks for them
        if (t.stream) return bad("field 'echo': only without \"stream\": true (the prompt comes back with the whole answer)", "echo");
        frame["echo"] = true;
        if (const auto lp = frame.find("logprobs"); lp != frame.end() && lp->is_number_integer())
            frame["prompt_logprobs"] = *lp;   // else the protocol refuses 'logprobs' itself
    }
    // tool_choice "none" or "auto" without tools is no choice at all (clients send it by default)
    if (tool_choice && (frame.contains("tools") || (*tool_choice != "none" && *tool_choice != "auto"))) frame["tool_choice"] = *tool_choice;
    // The JSON Schema to follow, as a path in the body (read again with its keys in order).
    std::vector<std::string> schema_path;
    if (constraint && std::string(constraint) == "json_schema") schema_path = {"json_schema"};
    if (response_format) {
        const json & rf = *response_format;
        const auto type = rf.is_object() ? rf.find("type") : rf.end();
        if (!rf.is_object() || type == rf.end() || !type->is_string())
            return expected("response_format", "an object {\"type\": \"text\" | \"json_object\" | \"json_schema\"}", rf);
        for (const auto & [k, v] : rf.items())
            if (k != "type" && !(k == "json_schema" && *type == "json_schema"))
                return bad("unknown field 'response_format." + printable(k) + "'", "response_format." + printable(k));
        if (*type != "text" && constraint)
            return bad(std::string("fields 'response_format' and '") + constraint + "': give one, not both", "response_format");
        if (*type == "json_object") {
            frame["json_schema"] = {{"type", "object"}};
        } else if (*type == "json_schema") {
            const auto js = rf.find("json_schema");
            if (js == rf.end() || !js->is_object())
                return expected("response_format.json_schema", "an object {\"name\", \"schema\", \"strict\", \"description\"}",
                                js == rf.end() ? json() : *js);
            for (const auto & [k, v] : js->items()) {
                if (k == "schema" && !v.is_object() && !v.is_boolean()) return expected("response_format.json_schema.schema", "an object (a JSON Schema)", v);
                if ((k == "name" || k == "description") && !v.is_string()) return expected("response_format.json_schema." + k, "a string", v);
                if (k == "strict" && !v.is_boolean() && !v.is_null()) return expected("response_format.json_schema.strict", "true or false", v);
                if (k != "schema" && k != "name" && k != "description" && k != "strict")
                    return bad("unknown field 'response_format.json_schema." + printable(k) + "'", "response_format.json_schema." + printable(k));
            }
            if (js->contains("schema")) schema_path = {"response_format", "json_schema", "schema"};
            else frame["json_schema"] = {{"type", "object"}};   // OpenAI requires one; any object then
        } else if (*type != "text") {
            return expected("response_format.type", "one of \"text\", \"json_object\", \"json_schema\"", *type);
        }
    }
    if (t.choices() > max_requests)
        return bad("n (" + std::to_string(t.n) + ") times the " + std::to_string(t.prompts.size()) + " prompts is " +
                       std::to_string(t.choices()) + " completions; at most " + std::to_string(max_requests) + " in one request",
                   "n");
    if (t.n > 1) frame["stream"] = true;   // a choice's first token sends the others (they start from its cached prompt)
    if (!have_max) frame["max_tokens"] = d.max_tokens;
    if (!have_temperature) frame["temperature"] = 1.0;   // OpenAI's default: sampling
    if (!have_seed) frame["seed"] = d.seed;
    if (t.prompt_ids) t.renames.push_back({"prompt_ids", "prompt"});
    if (schema_path.size() > 1) t.renames.push_back({"json_schema", "response_format.json_schema.schema"});
    else if (response_format && frame.contains("json_schema")) t.renames.push_back({"json_schema", "response_format"});
    if (!schema_path.empty() || !ordered_fields.empty()) {   // properties are generated, tools shown, in the client's order
        ojson ordered = ojson::parse(frame.dump(-1, ' ', false, json::error_handler_t::replace));
        const ojson body_doc = ojson::parse(body);
        if (!schema_path.empty()) {
            const ojson * schema = &body_doc;
            for (const auto & key : schema_path) schema = &schema->at(key);
            ordered["json_schema"] = *schema;
        }
        for (const std::string & k : ordered_fields) ordered[k] = body_doc.at(k);
        t.frame = dump(ordered);
        return t;
    }
    t.frame = frame.dump(-1, ' ', false, json::error_handler_t::replace);
    return t;
}

} // namespace

std::variant<Translated, HttpError> translate(Endpoint endpoint, std::string_view body, const Defaults & defaults) {
    try {
        return translate_checked(endpoint, body, defaults);
    } catch (const std::bad_alloc &) {
        throw;
    } catch (const std::exception & e) {   // a library type error: a bug here, not the client's
        return HttpError{500, "server_error", std::string("internal error reading the request: ") + e.what(), {}, {}};
    }
}

std::string error_body(const HttpError & e) {
    ojson err = {{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? ojson(nullptr) : ojson(e.param)},
                 {"code", e.code.empty() ? ojson(nullptr) : ojson(e.code)}};
    return dump(ojson{{"error", std::move(err)}});
}

HttpError from_protocol_error(protocol::ErrorCode code, std::string message,
                              const std::vector<std::pair<std::string, std::string>> & renames) {
    using protocol::ErrorCode;
    for (const auto & [ours, theirs] : renames)   // "field 'prompt_ids[2]'" -> "field 'prompt[2]'"
        for (size_t p = 0; (p = message.find("'" + ours, p)) != std::string::npos; p += theirs.size() + 1)
            message.replace(p, ours.size() + 1, "'" + theirs);
    std::string param;   // "field 'max_tokens': ..." names it
    if (message.rfind("field '", 0) == 0)
        if (size_t end = message.find('\'', 7); end != std::string::npos) param = message.substr(7, end - 7);
    switch (code) {
    case ErrorCode::BadRequest: return {400, "invalid_request_error", std::move(message), std::move(param), {}};
    case ErrorCode::TooLarge: return {413, "invalid_request_error", std::move(message), {}, {}};
    case ErrorCode::TooLong: return {400, "invalid_request_error", std::move(message), {}, "context_length_exceeded"};
    case ErrorCode::Busy: return {503, "server_overloaded", std::move(message), {}, "busy"};
    case ErrorCode::NotFound: return {404, "not_found_error", std::move(message), {}, {}};
    case ErrorCode::ShuttingDown: return {503, "server_shutting_down", std::move(message), {}, "shutting_down"};
    case ErrorCode::Internal: break;
    }
    return {500, "server_error", std::move(message), {}, {}};
}

std::string choice_id(const std::string & id, int i) { return i == 0 ? id : id + "." + std::to_string(i); }

std::string choice_frame(const Translated & t, int i) {
    if (i == 0) return t.frame;
    ojson f = ojson::parse(t.frame);
    f["id"] = choice_id(f["id"].get<std::string>(), i);
    if (const size_t p = size_t(i / t.n); p > 0 && p < t.prompts.size()) {
        f.erase("prompt");
        f.erase("prompt_ids");
        f[t.prompts[p].first] = ojson::parse(t.prompts[p].second.dump());
    }
    const uint64_t j = uint64_t(i % t.n);
    if (f["seed"].is_number_unsigned()) f["seed"] = f["seed"].get<uint64_t>() + j;   // wraps at 2^64
    else if (f["seed"].is_number_integer()) f["seed"] = uint64_t(f["seed"].get<int64_t>()) + j;
    return dump(f);
}

std::string completion_body(Endpoint e, const Reply & r, const std::vector<json> & dones, int per_prompt) {
    ojson o = head(e, r, false);
    o["choices"] = ojson::array();
    for (size_t i = 0; i < dones.size(); ++i) {
        const json & done = dones[i];
        ojson lp = nullptr;
        int64_t offset = 0;
        std::string text = done.value("text", "");
        const auto prompt = done.find("prompt_logprobs");
        if (auto it = done.find("logprobs"); it != done.end()) {
            json entries = prompt != done.end() ? *prompt : json::array();   // echo: the prompt's tokens first
            // chat's content lists the message's tokens: not the end of turn (completions keep it, for scorers)
            const auto toks = done.find("tokens");
            const size_t n = e == Endpoint::Chat && toks != done.end() ? std::min(it->size(), toks->size()) : it->size();
            entries.insert(entries.end(), it->begin(), it->begin() + std::ptrdiff_t(n));
            lp = openai_logprobs(e, entries, offset);
        }
        if (auto p = done.find("prompt_text"); p != done.end()) text = p->get<std::string>() + text;   // echo
        const auto rs = done.find("reasoning");
        const std::string reasoning = rs != done.end() ? rs->get<std::string>() : std::string();
        o["choices"].push_back(choice(e, text, finish_reason(done), false, true, std::move(lp), tool_calls(done, false),
                                      rs != done.end() ? &reasoning : nullptr, int(i)));
    }
    o["usage"] = usage(dones, per_prompt);
    if (auto t = dones.at(0).find("timings"); t != dones[0].end()) o["timings"] = *t;   // moesh's (the first choice's): queue, first token, total
    return dump(o);
}

std::string text_chunk(Endpoint e, const Reply & r, std::string_view text, bool first, const nlohmann::json * logprobs,
                       int64_t * text_offset, std::string_view reasoning, int index) {
    ojson o = head(e, r, true);
    ojson lp = nullptr;
    int64_t unused = 0;
    if (logprobs) lp = openai_logprobs(e, json::array({*logprobs}), text_offset ? *text_offset : unused);
    const std::string thought(reasoning);
    o["choices"] = ojson::array(
        {choice(e, text, nullptr, first, false, std::move(lp), ojson::array(), reasoning.empty() ? nullptr : &thought, index)});
    return sse(o);
}

void StreamedCalls::add(const json & deltas) {
    for (const json & d : deltas) {   // calls come in order: a delta is for a call seen, or the next one
        const auto index = d.is_object() ? d.find("index") : d.end();
        if (!d.is_object() || index == d.end() || !index->is_number_unsigned() || index->get<uint64_t>() > ids.size()) continue;
        const auto i = size_t(index->get<uint64_t>());
        if (i == ids.size()) ids.emplace_back(), arguments.emplace_back();
        if (auto id = d.find("id"); id != d.end() && id->is_string()) ids[i] = id->get<std::string>();
        if (auto f = d.find("function"); f != d.end() && f->is_object())
            if (auto a = f->find("arguments"); a != f->end() && a->is_string()) arguments[i] += a->get<std::string>();
    }
}

std::string calls_chunk(const Reply & r, const json & deltas, int index) {
    ojson o = head(Endpoint::Chat, r, true);
    o["choices"] = ojson::array({choice(Endpoint::Chat, "", nullptr, false, false, nullptr, ojson(deltas), nullptr, index)});
    return sse(o);
}

std::string finish_chunk(Endpoint e, const Reply & r, const nlohmann::json & done, const StreamedCalls & streamed, int index) {
    std::string out;
    if (ojson calls = tool_calls(done, true); e == Endpoint::Chat && !calls.empty()) {   // what the stream lacks, before the end
        ojson rest = ojson::array();
        size_t next = streamed.ids.size();   // a call not streamed goes after those that were, never onto one
        for (ojson & c : calls) {
            const size_t i = c["index"].get<size_t>();
            if (i >= streamed.ids.size() || streamed.ids[i] != c["id"].get<std::string>()) {
                c["index"] = next++;   // not streamed: whole
                rest.push_back(std::move(c));
                continue;
            }
            const std::string & whole = c["function"]["arguments"].get_ref<const std::string &>();
            const std::string & sent = streamed.arguments[i];
            if (whole.size() > sent.size() && whole.compare(0, sent.size(), sent) == 0)
                rest.push_back({{"index", i}, {"function", {{"arguments", whole.substr(sent.size())}}}});
        }
        if (!rest.empty()) {
            ojson o = head(e, r, true);
            o["choices"] = ojson::array({choice(e, "", nullptr, false, false, nullptr, std::move(rest), nullptr, index)});
            out = sse(o);
        }
    }
    ojson o = head(e, r, true);
    o["choices"] = ojson::array({choice(e, "", finish_reason(done), false, false, nullptr, ojson::array(), nullptr, index)});
    return out + sse(o);
}

std::string usage_chunk(Endpoint e, const Reply & r, const std::vector<json> & dones, int per_prompt) {
    ojson o = head(e, r, true);
    o["choices"] = ojson::array();
    o["usage"] = usage(dones, per_prompt);
    return sse(o);
}

std::string models_body(const std::string & model, int64_t created) {
    return dump(ojson{{"object", "list"},
                      {"data", ojson::array({ojson{{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "moesh"}}})}});
}

} // namespace moesh::openai
