// libFuzzer target for the OpenAI-compatible HTTP API (transport/openai.h): the
// bytes as a /v1/completions and as a /v1/chat/completions body. A translation
// must be a protocol frame the server can read (and agree on "stream"); a
// refusal must be a 400 or 413 whose body is valid JSON naming the problem,
// never a 500 (which would mean an exception escaped the checks). The bytes as
// text in SSE chunks and bodies must always make valid JSON.
#include "fuzz_targets.h"

#include "transport/openai.h"
#include "transport/protocol.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <variant>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "openai", what); }

nlohmann::json json_of(std::string_view s, const char * what) {
    auto doc = protocol::parse_json(s, 64);
    check(std::holds_alternative<nlohmann::json>(doc), what);
    return std::get<nlohmann::json>(doc);
}

void check_event(const std::string & e) {
    check(e.rfind("data: ", 0) == 0 && e.size() >= 8 && e.substr(e.size() - 2) == "\n\n", "SSE event framing");
    (void)json_of(std::string_view(e).substr(6, e.size() - 8), "SSE event is not JSON");
}

bool translate_one(openai::Endpoint ep, std::string_view bytes) {
    openai::Defaults d;
    d.id = "cmpl-fuzz";
    d.max_body_bytes = 2048;
    auto t = openai::translate(ep, bytes, d);
    if (const auto * e = std::get_if<openai::HttpError>(&t)) {
        check(e->status == 400 || e->status == 413, "refusal is not a 400 or 413");
        check(!e->message.empty(), "refusal without a message");
        const nlohmann::json body = json_of(openai::error_body(*e), "error body is not JSON");
        check(body.at("error").at("message").is_string(), "error body without a message");
        return false;
    }
    const openai::Translated & tr = std::get<openai::Translated>(t);
    protocol::Limits wide;
    wide.max_message_bytes = 1 << 20;
    auto parsed = protocol::parse_request(tr.frame, wide);
    if (const auto * r = std::get_if<protocol::Request>(&parsed)) {
        check(r->type == protocol::RequestType::Generate && r->id == d.id, "translated frame is not a generate with our id");
        check(r->stream == (tr.stream || tr.n > 1), "stream flag differs");   // n > 1: a choice's first token sends the others
        if (const int last_i = tr.choices() - 1; last_i > 0) {   // the last choice's request: the same, with its own id
            check(last_i < openai::max_requests, "more requests than one request may make");
            auto last = protocol::parse_request(openai::choice_frame(tr, last_i), wide);
            if (const auto * lr = std::get_if<protocol::Request>(&last))
                check(lr->id == d.id + "." + std::to_string(last_i) && lr->max_tokens == r->max_tokens, "a choice's request differs");
            else   // its own prompt may be one the protocol refuses
                check(std::get<protocol::ParseError>(last).code == protocol::ErrorCode::BadRequest, "a choice's request refused for its form");
        }
        check(bool(r->messages) == (ep == openai::Endpoint::Chat), "chat endpoint without messages, or the reverse");
    } else {   // the protocol refuses what it checks (ranges, types of passed-through fields): with a readable message
        const auto & e = std::get<protocol::ParseError>(parsed);
        check(e.code == protocol::ErrorCode::BadRequest, "translated frame refused for its size or form");
        const openai::HttpError h = openai::from_protocol_error(e.code, e.message, tr.renames);
        (void)json_of(openai::error_body(h), "protocol error body is not JSON");
    }
    return true;
}

} // namespace

bool openai_one_input(const uint8_t * data, size_t size) {
    const std::string_view bytes(reinterpret_cast<const char *>(data), size);
    const bool a = translate_one(openai::Endpoint::Completions, bytes);
    const bool b = translate_one(openai::Endpoint::Chat, bytes);

    const std::string text(bytes.substr(0, 512));
    const openai::Reply r{"cmpl-" + text, text, 1};
    // log-probabilities whose token texts are the input (as a server frame carries them, valid UTF-8)
    const std::string token_text = nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    const nlohmann::json entry = {{"token", 1}, {"logprob", -0.5}, {"text", nlohmann::json::parse(token_text)},
                                  {"top_logprobs", {{{"token", 2}, {"logprob", nullptr}, {"text", nlohmann::json::parse(token_text)}}}}};
    const nlohmann::json done = {{"tokens", {1}}, {"text", text}, {"finish_reason", "eos"},
                                 {"usage", {{"prompt_tokens", 3}, {"completion_tokens", 1}}}, {"logprobs", {entry, entry}}};
    for (openai::Endpoint ep : {openai::Endpoint::Completions, openai::Endpoint::Chat}) {
        int64_t offset = 0;
        check_event(openai::text_chunk(ep, r, text, true));
        check_event(openai::text_chunk(ep, r, text, false, &entry, &offset));
        check_event(openai::finish_chunk(ep, r, done));
        check_event(openai::usage_chunk(ep, r, done));
        (void)json_of(openai::completion_body(ep, r, done), "completion body is not JSON");
    }
    (void)json_of(openai::models_body(text, 1), "models body is not JSON");
    return a || b;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::openai_one_input(data, size);
    return 0;
}
#endif
