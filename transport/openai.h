// The OpenAI-compatible HTTP API of `moesh serve`, without sockets: request
// bodies of /v1/completions and /v1/chat/completions are translated into
// protocol request frames (transport/protocol.h), which the server then checks
// like any ZeroMQ request; the server's frames are translated back into OpenAI
// response bodies and server-sent-event chunks. docs/PROTOCOL.md lists what is
// honoured, what is refused and why.
//
//   auto t = openai::translate(openai::Endpoint::Chat, body, defaults);
//   if (auto * e = std::get_if<openai::HttpError>(&t)) reply(e->status, openai::error_body(*e));
//   else port.send(client, std::get<openai::Translated>(t).frame);
//
// Every function takes untrusted bytes and never throws (short of running out
// of memory) or crashes on any input.
// Thread safety: plain data and pure functions.
#pragma once

#include "transport/protocol.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace moesh::openai {

enum class Endpoint { Completions, Chat };

struct Defaults {
    std::string id;              // the request id to use ("cmpl-..." / "chatcmpl-...")
    int64_t max_tokens = 16;     // when the request gives none
    uint64_t seed = 0;           // when the request gives none (sampling only)
    int64_t max_body_bytes = 1 << 20;
};

struct Translated {
    std::string frame;           // a protocol generate request (the first choice's, when n > 1)
    int n = 1;                   // choices asked for, per prompt
    // Completions: each prompt of the request as the frame's field and value ("prompt" and a
    // string, or "prompt_ids" and token ids); the first is in frame. Empty for chat.
    std::vector<std::pair<std::string, nlohmann::json>> prompts;
    // choice_frame(t, i) is the request of choice i, i < choices(): prompt i / n, its choice i % n
    int choices() const { return n * std::max(1, int(prompts.size())); }
    bool stream = false;
    bool include_usage = false;  // stream_options.include_usage: a last chunk with usage
    bool prompt_ids = false;     // the prompt was token ids
    // The protocol's names for fields the client named otherwise ("prompt_ids" for "prompt"),
    // so that a protocol error names what the client sent.
    std::vector<std::pair<std::string, std::string>> renames;
};

struct HttpError {
    int status = 400;
    std::string type = "invalid_request_error";
    std::string message;
    std::string param;           // the field at fault, or empty
    std::string code;            // e.g. "context_length_exceeded", or empty
};

std::variant<Translated, HttpError> translate(Endpoint endpoint, std::string_view body, const Defaults & defaults);

// {"error":{"message","type","param","code"}}
std::string error_body(const HttpError & e);
// A protocol error frame's code and message as the HTTP error a client of this API expects.
// renames: Translated::renames of the request.
HttpError from_protocol_error(protocol::ErrorCode code, std::string message,
                              const std::vector<std::pair<std::string, std::string>> & renames = {});

struct Reply {
    std::string id, model;
    int64_t created = 0;         // Unix seconds
};

// The most choices (`n`) one request may ask for, and the most generate requests one request
// may make (prompts x n: each takes a queue place).
inline constexpr int max_choices = 16;
inline constexpr int max_requests = 64;

// Choice i's request id: the request's own for the first, "<id>.<i>" after it.
std::string choice_id(const std::string & id, int i);

// Choice i's generate request: the first's with the id "<id>.<i>", its prompt (i / n) and the seed
// plus i % n (the same prompt as the prompt's first choice, so it starts from that one's cached KV
// blocks when it follows it).
std::string choice_frame(const Translated & t, int i);

// The whole answer, from the server's done frames (a parse_response "done"), one per choice in
// order; per_prompt: choices per prompt (usage counts each prompt once).
std::string completion_body(Endpoint endpoint, const Reply & r, const std::vector<nlohmann::json> & dones, int per_prompt);
inline std::string completion_body(Endpoint endpoint, const Reply & r, const nlohmann::json & done) {
    return completion_body(endpoint, r, std::vector<nlohmann::json>{done}, 1);
}
// One SSE event "data: {...}\n\n": a text delta (first: the chat chunk also carries the role),
// with the log-probabilities of its token when logprobs is a token frame's "logprobs";
// text_offset: completions' characters so far, advanced past the token; reasoning: the token's
// reasoning text (chat: delta.reasoning_content).
std::string text_chunk(Endpoint endpoint, const Reply & r, std::string_view text, bool first,
                       const nlohmann::json * logprobs = nullptr, int64_t * text_offset = nullptr, std::string_view reasoning = {},
                       int index = 0);
// The tool calls a chat stream has sent as they were written: each call's id and arguments so far.
struct StreamedCalls {
    std::vector<std::string> ids, arguments;
    void add(const nlohmann::json & deltas);   // a token frame's tool_calls
};
// A chat chunk with a token frame's tool_calls (OpenAI's delta.tool_calls, the same shape).
std::string calls_chunk(const Reply & r, const nlohmann::json & deltas, int index = 0);
// The closing chunk with the finish reason, after one with what the done frame's tool calls add to
// those streamed (each call's rest, or the whole call).
std::string finish_chunk(Endpoint endpoint, const Reply & r, const nlohmann::json & done, const StreamedCalls & streamed = {},
                         int index = 0);
// stream_options.include_usage: the chunk with no choices and the usage (of all choices' done frames).
std::string usage_chunk(Endpoint endpoint, const Reply & r, const std::vector<nlohmann::json> & dones, int per_prompt);
inline std::string usage_chunk(Endpoint endpoint, const Reply & r, const nlohmann::json & done) {
    return usage_chunk(endpoint, r, std::vector<nlohmann::json>{done}, 1);
}
inline constexpr std::string_view done_event = "data: [DONE]\n\n";

// GET /v1/models
std::string models_body(const std::string & model, int64_t created);

} // namespace moesh::openai
