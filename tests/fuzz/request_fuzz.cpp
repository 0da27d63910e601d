// libFuzzer target for the client protocol (transport/protocol.h): the bytes
// as a request (the server's side; the return value), as a server frame (the
// client's side) and as text, ids and messages in frames, which must always
// read back. Small limits so that the seeds reach every bound.
#include "fuzz_targets.h"

#include "transport/protocol.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <string>
#include <string_view>
#include <variant>

namespace moesh::fuzz {

namespace {

using namespace moesh::protocol;

void check(bool ok, const char * what) { require(ok, "protocol", what); }

Limits fuzz_limits() {
    Limits l;
    l.max_message_bytes = 2048;
    l.n_vocab = 32000;
    l.max_stop = 4;
    l.max_stop_bytes = 16;
    l.max_id_bytes = 16;
    l.max_messages = 8;
    return l;
}

bool valid_utf8(const std::string & s) {
    try {
        (void)nlohmann::json(s).dump();   // the strict handler throws on invalid UTF-8
        return true;
    } catch (const nlohmann::json::exception &) {
        return false;
    }
}

bool id_ok(const std::string & id, const Limits & l) {
    if (int64_t(id.size()) > l.max_id_bytes) return false;
    for (unsigned char c : id)
        if (c < 0x20 || c > 0x7e) return false;
    return true;
}

void check_request(const Request & r, const Limits & l) {
    check(id_ok(r.id, l), "id accepted outside its limits");
    check(r.type == RequestType::Ping || !r.id.empty(), "generate or cancel without an id");
    if (r.type != RequestType::Generate) return;
    check(int(bool(r.prompt)) + int(bool(r.prompt_ids)) + int(bool(r.messages)) == 1, "not exactly one prompt");
    if (r.prompt) check(!r.prompt->empty() && valid_utf8(*r.prompt), "empty or invalid prompt accepted");
    if (r.prompt_ids) {
        check(!r.prompt_ids->empty(), "empty prompt_ids accepted");
        for (int32_t t : *r.prompt_ids) check(t >= 0 && t < l.n_vocab, "token id out of range");
    }
    if (r.messages) {
        check(!r.messages->empty() && int64_t(r.messages->size()) <= l.max_messages, "message count");
        for (const ChatMessage & m : *r.messages) {
            check(m.role == "system" || m.role == "user" || m.role == "assistant" || m.role == "tool", "unknown role accepted");
            check(valid_utf8(m.content), "invalid content accepted");
            check(m.tool_calls.empty() || m.role == "assistant", "tool calls on a message that is not the assistant's");
            check((m.role == "tool") == !m.tool_call_id.empty(), "a tool message without its call's id, or an id elsewhere");
            check(int64_t(m.tool_calls.size()) <= l.max_tools, "too many tool calls");
            for (const ToolCall & c : m.tool_calls)
                check(id_ok(c.id, l) && !c.id.empty() && !c.name.empty() && valid_utf8(c.arguments), "a tool call out of limits");
        }
    }
    check(r.max_tokens >= (r.prompt_logprobs >= 0 || r.echo ? 0 : 1) && r.max_tokens <= l.max_tokens, "max_tokens out of range");
    check(r.logprobs >= -1 && r.logprobs <= l.max_logprobs && r.prompt_logprobs >= -1 && r.prompt_logprobs <= l.max_logprobs,
          "logprobs out of range");
    check(r.repetition_penalty > 0 && r.repetition_penalty <= 10 && std::fabs(r.frequency_penalty) <= 2 &&
              std::fabs(r.presence_penalty) <= 2,
          "penalty out of range");
    check(int64_t(r.logit_bias.size()) <= l.max_logit_bias, "too many logit biases");
    for (size_t i = 0; i < r.logit_bias.size(); ++i)
        check(r.logit_bias[i].first >= 0 && r.logit_bias[i].first < l.n_vocab && std::fabs(r.logit_bias[i].second) <= 100 &&
                  (i == 0 || r.logit_bias[i - 1].first < r.logit_bias[i].first),
              "logit bias out of range, or a token twice");
    check(r.temperature >= 0 && r.temperature <= 100, "temperature out of range");
    check(r.top_p > 0 && r.top_p <= 1, "top_p out of range");
    check(r.top_k >= 0 && r.top_k <= l.n_vocab, "top_k out of range");
    check(int64_t(r.stop.size()) <= l.max_stop, "too many stop strings");
    for (const std::string & s : r.stop)
        check(!s.empty() && int64_t(s.size()) <= l.max_stop_bytes, "stop string out of limits");

    // what a client would send for it reads back as the same request
    Limits wide = l;
    wide.max_message_bytes = l.max_message_bytes * 2;   // request_frame writes every default out
    auto again = parse_request(request_frame(r), wide);
    check(std::holds_alternative<Request>(again), "request_frame of an accepted request is refused");
    const Request & b = std::get<Request>(again);
    check(b.id == r.id && b.prompt == r.prompt && b.prompt_ids == r.prompt_ids, "round trip: prompt or id");
    check(bool(b.messages) == bool(r.messages), "round trip: messages");
    if (r.messages)
        for (size_t i = 0; i < r.messages->size(); ++i)
            check(b.messages->at(i).role == r.messages->at(i).role &&
                      b.messages->at(i).content == r.messages->at(i).content,
                  "round trip: a message");
    check(b.max_tokens == r.max_tokens && b.temperature == r.temperature && b.top_p == r.top_p &&
              b.top_k == r.top_k && b.seed == r.seed && b.stop == r.stop && b.stream == r.stream &&
              b.logprobs == r.logprobs && b.prompt_logprobs == r.prompt_logprobs && b.echo == r.echo &&
              b.repetition_penalty == r.repetition_penalty && b.frequency_penalty == r.frequency_penalty &&
              b.presence_penalty == r.presence_penalty && b.logit_bias == r.logit_bias,
          "round trip: sampling fields");
    check(!(r.grammar && r.json_schema) && (!r.grammar || !r.grammar->empty()), "grammar and json_schema together, or empty");
    check(b.grammar == r.grammar && b.json_schema == r.json_schema, "round trip: grammar or json_schema (its key order too)");
    check((!r.tools && !r.chat_template_kwargs && r.tool_choice == ToolChoice::Auto) || r.messages, "tools without messages");
    check(r.tool_choice != ToolChoice::Required || r.tools, "a required call without tools");
    check(b.tools == r.tools && b.chat_template_kwargs == r.chat_template_kwargs && b.tool_choice == r.tool_choice &&
              b.tool_choice_name == r.tool_choice_name,
          "round trip: tools, tool_choice or chat_template_kwargs (their key order too)");
    if (r.messages)
        for (size_t i = 0; i < r.messages->size(); ++i) {
            const ChatMessage & x = r.messages->at(i);
            const ChatMessage & y = b.messages->at(i);
            check(x.tool_call_id == y.tool_call_id && x.name == y.name && x.reasoning_content == y.reasoning_content &&
                      x.tool_calls.size() == y.tool_calls.size(),
                  "round trip: a message's tool fields");
            for (size_t k = 0; k < x.tool_calls.size(); ++k)
                check(x.tool_calls[k].id == y.tool_calls[k].id && x.tool_calls[k].name == y.tool_calls[k].name &&
                          x.tool_calls[k].arguments == y.tool_calls[k].arguments,
                      "round trip: a tool call");
        }
}

// A logprobs entry as a client reads it (with its alternatives when top).
void read_entry(const nlohmann::json & e, bool top) {
    (void)e.at("token").get<int32_t>();
    if (!e.at("logprob").is_null()) (void)e.at("logprob").get<double>();
    if (e.contains("text")) (void)e.at("text").get<std::string>();
    if (e.contains("bytes")) (void)e.at("bytes").get<std::vector<uint8_t>>();
    if (top)
        for (const auto & t : e.at("top_logprobs")) read_entry(t, false);
}

// A client reads every documented field of an accepted frame with its type.
void check_response(const Response & r) {
    const nlohmann::json & b = r.body;
    try {
        if (r.type == "token") {
            (void)b.at("index").get<int64_t>();
            (void)b.at("token").get<int32_t>();
            (void)b.at("text").get<std::string>();
            if (b.contains("logprobs")) read_entry(b.at("logprobs"), true);
        } else if (r.type == "done") {
            (void)b.at("tokens").get<std::vector<int32_t>>();
            for (const char * k : {"logprobs", "prompt_logprobs"})
                if (b.contains(k))
                    for (const auto & e : b.at(k)) read_entry(e, true);
            if (b.contains("prompt_text")) (void)b.at("prompt_text").get<std::string>();
            (void)b.at("text").get<std::string>();
            (void)b.at("finish_reason").get<std::string>();
            (void)b.at("usage").at("prompt_tokens").get<int64_t>();
            (void)b.at("usage").at("completion_tokens").get<int64_t>();
            for (const char * k : {"queue_ms", "ttft_ms", "total_ms", "decode_tokens_per_second"}) {
                const auto & v = b.at("timings").at(k);
                if (!v.is_null()) (void)v.get<double>();
            }
        } else if (r.type == "error") {
            (void)b.at("code").get<std::string>();
            (void)b.at("message").get<std::string>();
            if (b.contains("retry_after_ms")) (void)b.at("retry_after_ms").get<int64_t>();
        } else {
            check(r.type == "pong", "unknown response type accepted");
        }
    } catch (const nlohmann::json::exception &) {
        check(false, "an accepted response lacks a documented field or its type");
    }
}

Response read_frame(const std::string & frame, const char * what) {
    check(valid_utf8(frame), what);
    auto parsed = parse_response(frame);
    check(std::holds_alternative<Response>(parsed), what);
    check_response(std::get<Response>(parsed));
    return std::get<Response>(parsed);
}

} // namespace

bool request_one_input(const uint8_t * data, size_t size) {
    const std::string_view bytes(reinterpret_cast<const char *>(data), size);
    const Limits limits = fuzz_limits();

    auto as_response = parse_response(bytes);
    if (const auto * r = std::get_if<Response>(&as_response)) check_response(*r);
    else check(valid_utf8(std::get<ParseError>(as_response).message), "response error message is not UTF-8");

    // the bytes as text, an id and a message in frames: always valid JSON that reads back
    const std::string text(bytes.substr(0, 512));
    const std::string id = text.empty() ? "x" : text;
    read_frame(token_frame(id, 0, 1, text), "token frame");
    Done done;
    done.text = text;
    read_frame(done_frame(id, done), "done frame");
    read_frame(error_frame(text, ErrorCode::Busy, text, 5), "error frame");
    read_frame(pong_frame(text, {{"echo", text}}), "pong frame");

    auto parsed = parse_request(bytes, limits);
    if (const auto * e = std::get_if<ParseError>(&parsed)) {
        check(e->code == ErrorCode::BadRequest || e->code == ErrorCode::TooLarge, "unexpected error code");
        check(!e->message.empty() && valid_utf8(e->message), "error message empty or not UTF-8");
        check(id_ok(e->id, limits), "error carries an id outside the limits");
        const Response r = read_frame(error_frame(e->id, e->code, e->message), "error frame of a ParseError");
        check(r.body["message"] == e->message && r.id == e->id, "error frame changed the message or id");
        return false;
    }
    check_request(std::get<Request>(parsed), limits);
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::request_one_input(data, size);
    return 0;
}
#endif
