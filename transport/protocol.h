// The client protocol of `moesh serve` (docs/PROTOCOL.md), without sockets:
// requests are parsed and checked here, replies are built here, and clients
// check what the server sends back here. One JSON object per ZeroMQ frame.
//
// Server:
//   protocol::Limits limits;  limits.n_vocab = tok.n_vocab();
//   auto parsed = protocol::parse_request(frame, limits);
//   if (auto * e = std::get_if<protocol::ParseError>(&parsed)) {
//       send(protocol::error_frame(e->id, e->code, e->message));
//   } else {
//       const protocol::Request & r = std::get<protocol::Request>(parsed);
//       ... send(protocol::token_frame(r.id, i, token, text)) per token when r.stream,
//       ... then send(protocol::done_frame(r.id, done));
//   }
// Client:
//   send(protocol::request_frame(request));
//   auto reply = protocol::parse_response(frame);   // never trusts the server either
//
// Every function takes untrusted bytes and never throws (short of running out
// of memory) or crashes on any input; frames are always valid UTF-8 JSON, with
// invalid bytes in text replaced by U+FFFD.
// Thread safety: plain data and pure functions.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace moesh::protocol {

// What the server accepts; every bound is inclusive.
struct Limits {
    int64_t max_message_bytes = 1 << 20;   // a request frame's size
    int64_t max_tokens = 4096;             // the largest max_tokens a request may ask for
    int64_t n_vocab = 0;                   // prompt_ids and top_k are checked against it when > 0
    int64_t max_stop = 16;                 // stop strings per request
    int64_t max_stop_bytes = 256;          // bytes per stop string
    int64_t max_id_bytes = 128;
    int64_t max_messages = 256;            // chat messages per request
    int64_t max_logprobs = 20;             // most likely tokens a request may ask for with each token
    int64_t max_logit_bias = 1024;         // tokens a request's logit_bias may list
    int64_t max_tools = 128;               // functions a request may offer, and calls per message
};

// A function call: one the model made (a done frame's tool_calls) or one a
// client sends back in an assistant message.
struct ToolCall {
    std::string id;          // 1..max_id_bytes printable ASCII
    std::string name;        // the function's name
    std::string arguments;   // its arguments: the JSON text of an object
};

// Not runtime's moesh::ChatMessage: the protocol stays free of the runtime; the
// server turns these into what the chat template reads.
struct ChatMessage {
    std::string role;                 // "system", "user", "assistant" or "tool"
    std::string content;              // may be empty for an assistant's message with tool_calls
    std::vector<ToolCall> tool_calls; // assistant: the calls it made
    std::string tool_call_id;         // tool: the call this message answers (required)
    std::string name;                 // tool: the function's name (optional)
    std::optional<std::string> reasoning_content;   // assistant: its reasoning, for templates that show it
};

// Which tool the model must call: none, any (auto: may; required: must), or one by name.
enum class ToolChoice { Auto, None, Required, Named };

enum class RequestType { Generate, Cancel, Ping };
const char * request_type_name(RequestType);   // "generate", "cancel", "ping"

struct Request {
    RequestType type = RequestType::Generate;
    std::string id;   // generate, cancel: 1..max_id_bytes printable ASCII; ping: may be empty
    // Generate: exactly one of the three is set.
    std::optional<std::string> prompt;                 // raw text, tokenized by the server
    std::optional<std::vector<int32_t>> prompt_ids;    // [n_prompt], each in [0, n_vocab)
    std::optional<std::vector<ChatMessage>> messages;  // rendered by the model's chat template
    int64_t max_tokens = 16;
    float temperature = 0;   // 0 = greedy
    float top_p = 1;
    int32_t top_k = 0;       // 0 = off
    uint64_t seed = 0;
    std::vector<std::string> stop;   // each non-empty
    bool stream = false;
    int32_t logprobs = -1;   // -1: none; k >= 0: each token's log-probability and the k most likely
    int32_t prompt_logprobs = -1;   // as logprobs, for the prompt's tokens; then max_tokens may be 0
    bool echo = false;              // the done frame carries the prompt's text; then max_tokens may be 0
    float repetition_penalty = 1;   // (0, 10]: prompt and output tokens (Hugging Face's)
    float frequency_penalty = 0;    // [-2, 2]: per count in the output (OpenAI's)
    float presence_penalty = 0;     // [-2, 2]: once in the output (OpenAI's)
    std::vector<std::pair<int32_t, float>> logit_bias;   // (token id, [-100, 100]) added to its logit
    int32_t priority = 0;   // [-1000, 1000]: lower runs first (vLLM's); equal ones first come, first served
    // At most one: a GBNF grammar the output must match, or a JSON Schema (its JSON text, keys in
    // the order sent) the output must be an instance of. The server compiles and checks them.
    std::optional<std::string> grammar;
    std::optional<std::string> json_schema;
    // With messages: the functions the model may call (the JSON text of an array of
    // {"type": "function", "function": {"name", "description"?, "parameters"?}}, key order kept),
    // which one it must call, and more variables for the chat template (the JSON text of an object,
    // e.g. {"enable_thinking": false}).
    std::optional<std::string> tools;
    ToolChoice tool_choice = ToolChoice::Auto;
    std::string tool_choice_name;   // ToolChoice::Named
    std::optional<std::string> chat_template_kwargs;
};

enum class ErrorCode { BadRequest, TooLarge, TooLong, Busy, NotFound, ShuttingDown, Internal };
// "bad_request", "too_large", "too_long", "busy", "not_found", "shutting_down", "internal"
const char * error_code_name(ErrorCode);
std::optional<ErrorCode> error_code_from_name(std::string_view);

struct ParseError {
    ErrorCode code = ErrorCode::BadRequest;
    std::string message;   // names the field and what was expected; valid UTF-8
    std::string id;        // the request's id if it could be read, else empty
};

std::variant<Request, ParseError> parse_request(std::string_view bytes, const Limits & limits);

// Untrusted JSON text, refused when nested deeper than max_depth or when an
// object repeats a key (two readers could otherwise each see another value).
// The document, or why it was refused ("invalid JSON: ... near '...'").
std::variant<nlohmann::json, std::string> parse_json(std::string_view bytes, int max_depth);
// A value for an error message: "null", "5", "a string \"ab...\"", "an array".
std::string describe_json(const nlohmann::json & v);

// The frame a client sends for r (only the fields that apply to r.type);
// parse_request reads it back as r when r is within the limits.
std::string request_frame(const Request & r);

// ToolCalls: the model ended its turn after calling tools (Done::tool_calls).
enum class FinishReason { Length, Stop, Eos, Cancelled, ToolCalls };
const char * finish_reason_name(FinishReason);   // "length", "stop", "eos", "cancelled", "tool_calls"

// A token's log-probability: {"token", "logprob" (null when not finite), "text", "bytes"[, "special"]}
// (text and bytes when the server has a tokenizer: the token's bytes, and them as UTF-8
// with invalid bytes replaced).
struct TokenLogprob {
    int32_t token = 0;
    float logprob = 0;
    std::optional<std::string> bytes;
    bool special = false;   // a special token (BOS, chat markers): "special": true; its text is not in texts
};
// The sampled token's entry with "top_logprobs": [entries], the most likely first.
struct Logprobs {
    TokenLogprob sampled;
    std::vector<TokenLogprob> top;
};

struct Done {
    std::vector<int32_t> tokens;   // [completion_tokens]: the generated ids
    // When the request asked: an entry per token, and one more for the end-of-sequence token when
    // it ended the request (finish_reason eos), which is not in tokens.
    std::optional<std::vector<Logprobs>> logprobs;
    // When the request asked prompt_logprobs: [prompt_tokens] (fewer if cancelled while its prompt
    // was computed), the first with a null logprob.
    std::optional<std::vector<Logprobs>> prompt_logprobs;
    std::optional<std::string> prompt_text;   // echo: the prompt as text (special tokens left out)
    std::optional<std::string> grammar_error;   // why the request's grammar stopped it (finish_reason stop)
    // The calls the model made, when the request gave tools and the chat template's format is
    // one moesh reads; text is then what came before the first call.
    std::vector<ToolCall> tool_calls;
    // When the chat template reasons and the model did: what it wrote in its <think> block; text
    // is then the answer after it.
    std::optional<std::string> reasoning;
    std::string text;              // their text, stop string excluded
    FinishReason finish_reason = FinishReason::Length;
    int64_t prompt_tokens = 0, completion_tokens = 0;
    double queue_ms = 0, ttft_ms = 0, total_ms = 0, decode_tokens_per_second = 0;   // non-finite: null
    int64_t preempted = 0;   // times the request gave its KV blocks back and waited to go on
};

// What a token adds to a tool call being written (OpenAI's stream delta): the call's first delta
// has its id and name, every delta the next piece of its arguments' JSON text.
struct ToolCallDelta {
    int64_t index = 0;       // the call's place among the reply's calls
    std::string id, name;    // the first delta of a call only (empty otherwise)
    std::string arguments;
};

// {"type":"token","id","index","token","text"[,"reasoning"][,"logprobs":{...}][,"tool_calls":[...]]}
std::string token_frame(std::string_view id, int64_t index, int32_t token, std::string_view text,
                        const Logprobs * logprobs = nullptr, std::string_view reasoning = {},
                        const std::vector<ToolCallDelta> & calls = {});
// {"type":"done","id","tokens"[,"logprobs":[...]][,"prompt_logprobs":[...],"prompt_text"],"text","finish_reason",
//  "usage":{...},"timings":{...}}
std::string done_frame(std::string_view id, const Done & done);
// {"type":"error","id" (null when empty),"code","message"[,"retry_after_ms" when >= 0]}
std::string error_frame(std::string_view id, ErrorCode code, std::string_view message, int64_t retry_after_ms = -1);
// {"type":"pong","id" (null when empty),"info":info}
std::string pong_frame(std::string_view id, const nlohmann::json & info);

struct Response {
    std::string type;      // "token", "done", "error" or "pong"
    std::string id;        // empty where the frame's id is null
    nlohmann::json body;   // the whole object, its fields checked as parse_response says
};

// A server frame, checked so that a client can read every documented field of
// its type with the documented JSON type without further checks (unknown
// fields are kept and ignored; unknown error codes are accepted as strings).
std::variant<Response, ParseError> parse_response(std::string_view bytes);

// Untrusted bytes for a message: printable ASCII as is, anything else (and '\\') as \xNN, at
// most max_bytes of them, then "..." when there were more.
std::string escaped(std::string_view s, size_t max_bytes = 40);

} // namespace moesh::protocol
