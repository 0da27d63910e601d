// The client protocol (docs/PROTOCOL.md): every request field's accepted
// values and every way to get one wrong, frames that stay valid UTF-8 JSON
// whatever the text, and frames read back by the client-side parser.
#include "transport/protocol.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <type_traits>
#include <variant>

namespace moesh::protocol {
namespace {

using json = nlohmann::json;

Limits limits() {
    Limits l;
    l.n_vocab = 32000;
    return l;
}

json base() { return {{"id", "r1"}, {"prompt", "Hello"}}; }

json with(const std::string & field, const json & value, json j = base()) {
    j[field] = value;
    return j;
}

json without(const std::string & field, json j = base()) {
    j.erase(field);
    return j;
}

// Inputs are JSON text or a json value (dumped).
template <class T> std::string text_of(const T & input) {
    if constexpr (std::is_same_v<T, json>) return input.dump();
    else return std::string(input);
}

template <class T> Request accept(const T & input, const Limits & l = limits()) {
    const std::string text = text_of(input);
    auto parsed = parse_request(text, l);
    if (auto * e = std::get_if<ParseError>(&parsed)) {
        ADD_FAILURE() << "refused " << text << ": " << e->message;
        return {};
    }
    return std::get<Request>(parsed);
}

template <class T> ParseError refuse(const T & input, const Limits & l = limits()) {
    const std::string text = text_of(input);
    auto parsed = parse_request(text, l);
    if (std::holds_alternative<Request>(parsed)) {
        ADD_FAILURE() << "accepted " << text;
        return {ErrorCode::Internal, "", ""};
    }
    return std::get<ParseError>(parsed);
}

// A bad request whose message contains `says` (the field's name, at least).
#define EXPECT_BAD_REQUEST(input, says)                                                                         \
    do {                                                                                                       \
        const ParseError e_ = refuse(input);                                                                   \
        EXPECT_EQ(e_.code, ErrorCode::BadRequest) << e_.message;                                               \
        EXPECT_NE(e_.message.find(says), std::string::npos) << "message: " << e_.message << "\nwanted: " << says; \
    } while (0)

// --- requests: structure ---

TEST(ProtocolRequest, AcceptsMinimalGenerateWithDefaults) {
    const Request r = accept(base());
    EXPECT_EQ(r.type, RequestType::Generate);
    EXPECT_EQ(r.id, "r1");
    ASSERT_TRUE(r.prompt);
    EXPECT_EQ(*r.prompt, "Hello");
    EXPECT_FALSE(r.prompt_ids);
    EXPECT_FALSE(r.messages);
    EXPECT_EQ(r.max_tokens, 16);
    EXPECT_EQ(r.temperature, 0.0f);
    EXPECT_EQ(r.top_p, 1.0f);
    EXPECT_EQ(r.top_k, 0);
    EXPECT_EQ(r.seed, 0u);
    EXPECT_TRUE(r.stop.empty());
    EXPECT_FALSE(r.stream);
}

TEST(ProtocolRequest, AcceptsEveryGenerateField) {
    const Request r = accept(R"({"type":"generate","id":"abc-1","prompt":"Once","max_tokens":100,"temperature":0.7,
        "top_p":0.9,"top_k":40,"seed":12345,"stop":["\n\n","END"],"stream":true})");
    EXPECT_EQ(r.type, RequestType::Generate);
    EXPECT_EQ(r.id, "abc-1");
    EXPECT_EQ(*r.prompt, "Once");
    EXPECT_EQ(r.max_tokens, 100);
    EXPECT_FLOAT_EQ(r.temperature, 0.7f);
    EXPECT_FLOAT_EQ(r.top_p, 0.9f);
    EXPECT_EQ(r.top_k, 40);
    EXPECT_EQ(r.seed, 12345u);
    EXPECT_EQ(r.stop, (std::vector<std::string>{"\n\n", "END"}));
    EXPECT_TRUE(r.stream);
}

TEST(ProtocolRequest, AcceptsCancelAndPing) {
    const Request c = accept(R"({"type":"cancel","id":"r7"})");
    EXPECT_EQ(c.type, RequestType::Cancel);
    EXPECT_EQ(c.id, "r7");
    const Request p = accept(R"({"type":"ping"})");
    EXPECT_EQ(p.type, RequestType::Ping);
    EXPECT_EQ(p.id, "");
    EXPECT_EQ(accept(R"({"type":"ping","id":"p1"})").id, "p1");
}

TEST(ProtocolRequest, RefusesMessageOverTheSizeLimitAsTooLarge) {
    Limits l = limits();
    l.max_message_bytes = 64;
    std::string text = with("prompt", std::string(64, 'x')).dump();
    const ParseError e = refuse(text, l);
    EXPECT_EQ(e.code, ErrorCode::TooLarge);
    EXPECT_NE(e.message.find("64 bytes"), std::string::npos) << e.message;
    // exactly at the limit is fine
    text = with("prompt", std::string(64 - base().dump().size() + 5, 'x')).dump();
    ASSERT_EQ(text.size(), 64u);
    accept(text, l);
}

TEST(ProtocolRequest, RefusesTextThatIsNotJsonWithTheParsersPosition) {
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":)", "invalid JSON: parse error at line 1, column");
    EXPECT_BAD_REQUEST("", "invalid JSON: parse error at line 1, column 1: ");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"x"} trailing)", "invalid JSON");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"x","max_tokens":NaN})", "invalid JSON");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"x",})", "line 1, column");
}

TEST(ProtocolRequest, RefusesInvalidUtf8AndKeepsTheMessageValidUtf8) {
    for (std::string text : {std::string("{\"id\":\"r1\",\"prompt\":\"a\xff\"}"), std::string("{\"id\":\"r1\",\"prompt\":\"\xc3\"}"),
                             std::string("{\"id\":\"r1\",\"prompt\":\"\xed\xa0\x80\"}"), std::string("\xff{}"),
                             std::string("{\"id\":\"r1\",\"prompt\":\"") + std::string(5000, 'y') + "\xe2\x82\"}"}) {
        const ParseError e = refuse(text);
        EXPECT_EQ(e.code, ErrorCode::BadRequest);
        EXPECT_NE(e.message.find("invalid JSON: parse error at line 1, column"), std::string::npos) << e.message;
        EXPECT_LT(e.message.size(), 300u) << "the message echoes too much input";
        EXPECT_NO_THROW((void)json(e.message).dump()) << "message is not valid UTF-8";
    }
}

TEST(ProtocolRequest, ParseErrorShowsTheInputNearItAndWhatWasExpected) {
    const ParseError e = refuse(R"({"id":"r1","prompt":"x",})");
    EXPECT_EQ(e.message, R"(invalid JSON: parse error at line 1, column 25: syntax error while parsing object key - )"
                         R"(unexpected '}'; near '"id":"r1","prompt":"x",}'; expected string literal)");
}

// Found by the fuzzer: a string that contains nlohmann's own "'; expected "
// made the message echo raw, invalid UTF-8 input.
TEST(ProtocolRequest, ParseErrorMessageStaysValidWhenTheInputMimicsIt) {
    const ParseError e = refuse(std::string("{\"type\":\"x'; expected ") + std::string(100, 'x') + "\xff\"}");
    EXPECT_NO_THROW((void)json(e.message).dump()) << e.message;
    EXPECT_LT(e.message.size(), 300u) << e.message;
    EXPECT_NE(e.message.find("ill-formed UTF-8 byte; near 'xxxx"), std::string::npos) << e.message;
}

TEST(ProtocolRequest, RefusesLoneSurrogateEscape) { EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"\ud800"})", "invalid JSON"); }

TEST(ProtocolRequest, RefusesARequestThatIsNotAnObject) {
    EXPECT_BAD_REQUEST("[]", "must be a JSON object, got an empty array");
    EXPECT_BAD_REQUEST(R"("generate")", "must be a JSON object");
    EXPECT_BAD_REQUEST("42", "must be a JSON object, got 42");
    EXPECT_BAD_REQUEST("null", "must be a JSON object, got null");
}

TEST(ProtocolRequest, RefusesDuplicateFields) {
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","prompt":"b"})", "duplicate field 'prompt'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","messages":[{"role":"user","role":"system","content":""}]})",
                       "duplicate field 'role'");
}

TEST(ProtocolRequest, RefusesDeepNesting) {
    const std::string deep = R"({"id":"r1","prompt":"a","x":)" + std::string(100000, '[') + std::string(100000, ']') + "}";
    EXPECT_BAD_REQUEST(deep, "nested deeper than");
}

TEST(ProtocolRequest, RefusesUnknownFieldsNamingThem) {
    EXPECT_BAD_REQUEST(with("temprature", 0.5), "unknown field 'temprature'");
    EXPECT_BAD_REQUEST(with("n", 2), "unknown field 'n'");
    EXPECT_BAD_REQUEST(with(std::string("bad\x01name"), 2), "unknown field 'bad\\x01name'");
}

TEST(ProtocolRequest, RefusesGenerateFieldsOnCancelAndPing) {
    EXPECT_BAD_REQUEST(R"({"type":"cancel","id":"r1","prompt":"x"})", "field 'prompt' does not apply to a cancel request");
    EXPECT_BAD_REQUEST(R"({"type":"ping","stream":true})", "field 'stream' does not apply to a ping request");
    EXPECT_BAD_REQUEST(R"({"type":"ping","extra":1})", "unknown field 'extra'");
}

// --- type and id ---

TEST(ProtocolRequest, RefusesBadType) {
    EXPECT_BAD_REQUEST(with("type", "complete"), "field 'type': expected one of \"generate\", \"cancel\", \"ping\", got a string \"complete\"");
    EXPECT_BAD_REQUEST(with("type", 1), "field 'type'");
    EXPECT_BAD_REQUEST(with("type", nullptr), "field 'type'");
    EXPECT_BAD_REQUEST(with("type", "Generate"), "field 'type'");
}

TEST(ProtocolRequest, RequiresAnIdForGenerateAndCancel) {
    EXPECT_BAD_REQUEST(without("id"), "field 'id': missing (a generate request needs one)");
    EXPECT_BAD_REQUEST(R"({"type":"cancel"})", "field 'id': missing (a cancel request needs one)");
}

TEST(ProtocolRequest, ChecksTheId) {
    EXPECT_EQ(accept(with("id", std::string(128, 'a'))).id, std::string(128, 'a'));
    EXPECT_EQ(accept(with("id", "a b~!")).id, "a b~!");
    EXPECT_BAD_REQUEST(with("id", std::string(129, 'a')), "field 'id': expected a string of 1 to 128 printable ASCII");
    EXPECT_BAD_REQUEST(with("id", ""), "field 'id'");
    EXPECT_BAD_REQUEST(with("id", 7), "field 'id'");
    EXPECT_BAD_REQUEST(with("id", nullptr), "field 'id'");
    EXPECT_BAD_REQUEST(with("id", "a\nb"), "field 'id'");
    EXPECT_BAD_REQUEST(with("id", "caf\xc3\xa9"), "field 'id'");
    EXPECT_BAD_REQUEST(with("id", std::string("a\0b", 3)), "field 'id'");
}

TEST(ProtocolRequest, ErrorsCarryTheIdOnceItIsRead) {
    EXPECT_EQ(refuse(with("max_tokens", 0)).id, "r1");
    EXPECT_EQ(refuse(with("type", "nope")).id, "r1");
    EXPECT_EQ(refuse(with("bogus", 1)).id, "r1");
    EXPECT_EQ(refuse(with("id", std::string(200, 'a'))).id, "");
    EXPECT_EQ(refuse(R"({"id":"r1","prompt":)").id, "");   // not parsed: unknown
}

// --- the prompt ---

TEST(ProtocolRequest, AcceptsPromptIds) {
    const Request r = accept(without("prompt", with("prompt_ids", {0, 1, 31999})));
    ASSERT_TRUE(r.prompt_ids);
    EXPECT_EQ(*r.prompt_ids, (std::vector<int32_t>{0, 1, 31999}));
    EXPECT_FALSE(r.prompt);
    // no vocabulary known: any int32 id
    Limits l = limits();
    l.n_vocab = 0;
    EXPECT_EQ(accept(without("prompt", with("prompt_ids", {2147483647})), l).prompt_ids->at(0), 2147483647);
    EXPECT_BAD_REQUEST(without("prompt", with("prompt_ids", {2147483648LL})), "prompt_ids[0]");
}

TEST(ProtocolRequest, AcceptsMessagesOfEveryRole) {
    const Request r = accept(without("prompt", with("messages", {{{"role", "system"}, {"content", "Be brief."}},
                                                                 {{"role", "user"}, {"content", "Hi"}},
                                                                 {{"content", ""}, {"role", "assistant"}}})));
    ASSERT_TRUE(r.messages);
    ASSERT_EQ(r.messages->size(), 3u);
    EXPECT_EQ(r.messages->at(0).role, "system");
    EXPECT_EQ(r.messages->at(0).content, "Be brief.");
    EXPECT_EQ(r.messages->at(1).role, "user");
    EXPECT_EQ(r.messages->at(2).role, "assistant");
    EXPECT_EQ(r.messages->at(2).content, "");
}

TEST(ProtocolRequest, NeedsExactlyOnePromptSource) {
    EXPECT_BAD_REQUEST(without("prompt"), "missing the prompt: give exactly one of 'prompt', 'prompt_ids' or 'messages'");
    EXPECT_BAD_REQUEST(with("prompt_ids", {1}), "fields 'prompt' and 'prompt_ids' both given");
    EXPECT_BAD_REQUEST(with("messages", json::array({{{"role", "user"}, {"content", "x"}}})),
                       "fields 'prompt' and 'messages' both given");
}

TEST(ProtocolRequest, ChecksThePrompt) {
    EXPECT_BAD_REQUEST(with("prompt", ""), "field 'prompt': expected a non-empty string, got a string \"\"");
    EXPECT_BAD_REQUEST(with("prompt", 5), "field 'prompt': expected a non-empty string, got 5");
    EXPECT_BAD_REQUEST(with("prompt", {"a"}), "field 'prompt': expected a non-empty string, got an array");
}

TEST(ProtocolRequest, ChecksPromptIds) {
    auto ids = [](const json & v) { return without("prompt", with("prompt_ids", v)); };
    EXPECT_BAD_REQUEST(ids(json::array()), "field 'prompt_ids': expected a non-empty array of token ids, got an empty array");
    EXPECT_BAD_REQUEST(ids("1 2 3"), "field 'prompt_ids'");
    EXPECT_BAD_REQUEST(ids({1, 32000}), "field 'prompt_ids[1]': expected an integer in [0, 31999], got 32000");
    EXPECT_BAD_REQUEST(ids({-1}), "field 'prompt_ids[0]': expected an integer in [0, 31999], got -1");
    EXPECT_BAD_REQUEST(ids({1.0}), "field 'prompt_ids[0]'");
    EXPECT_BAD_REQUEST(ids({"1"}), "field 'prompt_ids[0]'");
    EXPECT_BAD_REQUEST(ids({nullptr}), "field 'prompt_ids[0]'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt_ids":[1,99999999999999999999]})", "field 'prompt_ids[1]'");
}

TEST(ProtocolRequest, ChecksMessages) {
    auto msgs = [](const json & v) { return without("prompt", with("messages", v)); };
    const json user = {{"role", "user"}, {"content", "hi"}};
    EXPECT_BAD_REQUEST(msgs(json::array()), "field 'messages': expected a non-empty array");
    EXPECT_BAD_REQUEST(msgs(user), "field 'messages': expected a non-empty array");
    EXPECT_BAD_REQUEST(msgs({user, "hi"}), "field 'messages[1]': expected an object");
    EXPECT_BAD_REQUEST(msgs({{{"content", "hi"}}}), "field 'messages[0].role': missing");
    EXPECT_BAD_REQUEST(msgs({{{"role", "user"}}}), "field 'messages[0].content': missing");
    EXPECT_BAD_REQUEST(msgs({{{"role", "function"}, {"content", "x"}}}),
                       "field 'messages[0].role': expected one of \"system\", \"user\", \"assistant\", \"tool\", got a string \"function\"");
    EXPECT_BAD_REQUEST(msgs({{{"role", 1}, {"content", "x"}}}), "field 'messages[0].role'");
    EXPECT_BAD_REQUEST(msgs({{{"role", "user"}, {"content", {"x"}}}}), "field 'messages[0].content': expected a string");
    EXPECT_BAD_REQUEST(msgs({{{"role", "user"}, {"content", "x"}, {"name", "bob"}}}), "unknown field 'messages[0].name'");
    json many = json::array();
    for (int i = 0; i < 257; ++i) many.push_back(user);
    EXPECT_BAD_REQUEST(msgs(many), "field 'messages': expected at most 256 messages, got 257");
    many.erase(many.begin());
    EXPECT_EQ(accept(msgs(many)).messages->size(), 256u);
}

// --- sampling and the rest ---

TEST(ProtocolRequest, ChecksMaxTokens) {
    EXPECT_EQ(accept(with("max_tokens", 1)).max_tokens, 1);
    EXPECT_EQ(accept(with("max_tokens", 4096)).max_tokens, 4096);
    EXPECT_BAD_REQUEST(with("max_tokens", -5), "field 'max_tokens': expected an integer in [1, 4096], got -5");
    EXPECT_BAD_REQUEST(with("max_tokens", 0), "field 'max_tokens': expected an integer in [1, 4096], got 0");
    EXPECT_BAD_REQUEST(with("max_tokens", 4097), "got 4097");
    EXPECT_BAD_REQUEST(with("max_tokens", 5.0), "field 'max_tokens': expected an integer in [1, 4096], got 5.0");
    EXPECT_BAD_REQUEST(with("max_tokens", "5"), "field 'max_tokens': expected an integer in [1, 4096], got a string \"5\"");
    EXPECT_BAD_REQUEST(with("max_tokens", true), "got true");
    EXPECT_BAD_REQUEST(with("max_tokens", nullptr), "got null");
    EXPECT_BAD_REQUEST(with("max_tokens", 18446744073709551615ull), "got 18446744073709551615");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","max_tokens":1e999})", "invalid JSON: number overflow");
    Limits l = limits();
    l.max_tokens = 8;
    const ParseError e = refuse(with("max_tokens", 9), l);
    EXPECT_NE(e.message.find("[1, 8]"), std::string::npos) << e.message;
}

TEST(ProtocolRequest, ChecksTemperature) {
    EXPECT_EQ(accept(with("temperature", 0)).temperature, 0.0f);
    EXPECT_EQ(accept(with("temperature", 1)).temperature, 1.0f);
    EXPECT_FLOAT_EQ(accept(with("temperature", 0.25)).temperature, 0.25f);
    EXPECT_EQ(accept(with("temperature", 100)).temperature, 100.0f);
    EXPECT_BAD_REQUEST(with("temperature", -0.1), "field 'temperature': expected a number in [0, 100], got -0.1");
    EXPECT_BAD_REQUEST(with("temperature", 100.5), "field 'temperature'");
    EXPECT_BAD_REQUEST(with("temperature", "0.5"), "field 'temperature'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","temperature":1e999})", "invalid JSON: number overflow");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","temperature":-1e999})", "number overflow");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","temperature":Infinity})", "invalid JSON");
}

TEST(ProtocolRequest, ChecksTopP) {
    EXPECT_EQ(accept(with("top_p", 1)).top_p, 1.0f);
    EXPECT_FLOAT_EQ(accept(with("top_p", 0.5)).top_p, 0.5f);
    EXPECT_BAD_REQUEST(with("top_p", 0), "field 'top_p': expected a number in (0, 1], got 0");
    EXPECT_BAD_REQUEST(with("top_p", 1.01), "field 'top_p'");
    EXPECT_BAD_REQUEST(with("top_p", -0.5), "field 'top_p'");
    EXPECT_BAD_REQUEST(with("top_p", 1e-300), "field 'top_p'");   // 0 as a float
    EXPECT_BAD_REQUEST(with("top_p", {0.5}), "field 'top_p'");
}

TEST(ProtocolRequest, ChecksTopK) {
    EXPECT_EQ(accept(with("top_k", 0)).top_k, 0);
    EXPECT_EQ(accept(with("top_k", 32000)).top_k, 32000);
    EXPECT_BAD_REQUEST(with("top_k", 32001), "field 'top_k': expected an integer in [0, 32000], got 32001");
    EXPECT_BAD_REQUEST(with("top_k", -1), "field 'top_k'");
    EXPECT_BAD_REQUEST(with("top_k", 2.5), "field 'top_k'");
    Limits l = limits();
    l.n_vocab = 0;
    EXPECT_EQ(accept(with("top_k", 1 << 20), l).top_k, 1 << 20);
    const ParseError e = refuse(with("top_k", (1 << 20) + 1), l);
    EXPECT_NE(e.message.find("field 'top_k': expected an integer in [0, 1048576]"), std::string::npos) << e.message;
}

TEST(ProtocolRequest, ChecksSeed) {
    EXPECT_EQ(accept(with("seed", 0)).seed, 0u);
    EXPECT_EQ(accept(with("seed", 18446744073709551615ull)).seed, 18446744073709551615ull);
    EXPECT_EQ(accept(R"({"id":"r1","prompt":"a","seed":-0})").seed, 0u);
    EXPECT_BAD_REQUEST(with("seed", -1), "field 'seed': expected an integer in [0, 18446744073709551615], got -1");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","seed":18446744073709551616})", "field 'seed'");
    EXPECT_BAD_REQUEST(with("seed", 1.5), "field 'seed'");
    EXPECT_BAD_REQUEST(with("seed", "1"), "field 'seed'");
}

TEST(ProtocolRequest, ChecksStop) {
    EXPECT_EQ(accept(with("stop", "\n")).stop, std::vector<std::string>{"\n"});
    EXPECT_EQ(accept(with("stop", json::array())).stop, std::vector<std::string>{});
    EXPECT_EQ(accept(with("stop", {std::string(256, 's')})).stop.at(0).size(), 256u);
    EXPECT_BAD_REQUEST(with("stop", ""), "field 'stop': expected a non-empty string of at most 256 bytes");
    EXPECT_BAD_REQUEST(with("stop", {"a", ""}), "field 'stop[1]': expected a non-empty string of at most 256 bytes");
    EXPECT_BAD_REQUEST(with("stop", {std::string(257, 's')}), "field 'stop[0]'");
    EXPECT_BAD_REQUEST(with("stop", {"a", 1}), "field 'stop[1]'");
    EXPECT_BAD_REQUEST(with("stop", 5), "field 'stop': expected a non-empty string of at most 256 bytes or an array of them");
    json many = json::array();
    for (int i = 0; i < 17; ++i) many.push_back(std::to_string(i) + "s");
    EXPECT_BAD_REQUEST(with("stop", many), "field 'stop': expected at most 16 stop strings, got 17");
}

TEST(ProtocolRequest, ChecksStream) {
    EXPECT_TRUE(accept(with("stream", true)).stream);
    EXPECT_FALSE(accept(with("stream", false)).stream);
    EXPECT_BAD_REQUEST(with("stream", "true"), "field 'stream': expected true or false, got a string \"true\"");
    EXPECT_BAD_REQUEST(with("stream", 1), "field 'stream'");
}

TEST(ProtocolRequest, ChecksLogprobsAndPenalties) {
    EXPECT_EQ(accept(with("top_k", 0)).logprobs, -1);   // absent: none
    EXPECT_EQ(accept(with("logprobs", 0)).logprobs, 0);
    EXPECT_EQ(accept(with("logprobs", 20)).logprobs, 20);
    EXPECT_BAD_REQUEST(with("logprobs", 21), "field 'logprobs': expected an integer in [0, 20], got 21");
    EXPECT_BAD_REQUEST(with("logprobs", -1), "field 'logprobs'");
    EXPECT_BAD_REQUEST(with("logprobs", true), "field 'logprobs'");
    EXPECT_FLOAT_EQ(accept(with("repetition_penalty", 1.3)).repetition_penalty, 1.3f);
    EXPECT_BAD_REQUEST(with("repetition_penalty", 0), "field 'repetition_penalty': expected a number in (0, 10], got 0");
    EXPECT_BAD_REQUEST(with("repetition_penalty", 10.5), "field 'repetition_penalty'");
    EXPECT_BAD_REQUEST(with("repetition_penalty", 1e-300), "field 'repetition_penalty'");   // 0 as a float
    EXPECT_FLOAT_EQ(accept(with("frequency_penalty", -2)).frequency_penalty, -2.0f);
    EXPECT_FLOAT_EQ(accept(with("presence_penalty", 1.5)).presence_penalty, 1.5f);
    EXPECT_EQ(accept(with("top_k", 0)).priority, 0);   // absent: 0
    EXPECT_EQ(accept(with("priority", -1000)).priority, -1000);
    EXPECT_EQ(accept(with("priority", 7)).priority, 7);
    EXPECT_BAD_REQUEST(with("priority", 1001), "field 'priority': expected an integer in [-1000, 1000] (lower runs first), got 1001");
    EXPECT_BAD_REQUEST(with("priority", 1.5), "field 'priority'");
    EXPECT_BAD_REQUEST(with("priority", "high"), "field 'priority'");
    EXPECT_BAD_REQUEST(with("frequency_penalty", 2.01), "field 'frequency_penalty': expected a number in [-2, 2], got 2.01");
    EXPECT_BAD_REQUEST(with("presence_penalty", "1"), "field 'presence_penalty'");
    EXPECT_EQ(accept(with("prompt_logprobs", 2)).prompt_logprobs, 2);
    EXPECT_BAD_REQUEST(with("prompt_logprobs", 21), "field 'prompt_logprobs': expected an integer in [0, 20], got 21");
    // max_tokens 0 only scores a prompt
    EXPECT_EQ(accept(R"({"id":"r1","prompt":"a","max_tokens":0,"prompt_logprobs":0})").max_tokens, 0);
    EXPECT_EQ(accept(R"({"id":"r1","max_tokens":0,"prompt_logprobs":1,"prompt":"a"})").max_tokens, 0);   // any order
    EXPECT_BAD_REQUEST(with("max_tokens", 0), "field 'max_tokens': expected an integer in [1, 4096], got 0");
    EXPECT_EQ(accept(R"({"id":"r1","prompt":"a","max_tokens":0,"echo":true})").max_tokens, 0);
    EXPECT_TRUE(accept(with("echo", true)).echo);
    EXPECT_BAD_REQUEST(with("echo", 1), "field 'echo': expected true or false");
    // logit_bias: token ids as keys
    const Request b = accept(R"({"id":"r1","prompt":"a","logit_bias":{"5":-100,"31999":2.5}})");
    EXPECT_EQ(b.logit_bias, (std::vector<std::pair<int32_t, float>>{{5, -100.0f}, {31999, 2.5f}}));   // by id
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"32000":1}})", "field 'logit_bias': key '32000' is not a token id in [0, 31999]");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"-1":1}})", "key '-1'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"x":1}})", "key 'x'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"5":1,"05":1}})", "key '05'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"99999999999":1}})", "key '99999999999'");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":{"5":101}})", "field 'logit_bias.5': expected a number in [-100, 100], got 101");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","logit_bias":[1]})", "field 'logit_bias': expected an object");
    Limits l;
    l.max_logprobs = 3;
    auto parsed = parse_request(with("logprobs", 4).dump(), l);
    ASSERT_TRUE(std::holds_alternative<ParseError>(parsed));
    EXPECT_NE(std::get<ParseError>(parsed).message.find("[0, 3]"), std::string::npos);
}

TEST(ProtocolRequest, GrammarOrJsonSchemaKeepsTheSchemasKeyOrder) {
    EXPECT_EQ(accept(with("grammar", "root ::= \"a\"")).grammar, "root ::= \"a\"");
    // properties are generated in the order sent, so the schema's text keeps it (not sorted)
    const Request r = accept(R"({"id":"r1","prompt":"a","json_schema":{"type":"object","properties":{"zeta":{},"alpha":{}}}})");
    ASSERT_TRUE(r.json_schema);
    EXPECT_EQ(*r.json_schema, R"({"type":"object","properties":{"zeta":{},"alpha":{}}})");
    EXPECT_FALSE(r.grammar);
    EXPECT_EQ(*accept(request_frame(r)).json_schema, *r.json_schema);   // the frame round-trips it
    EXPECT_EQ(*accept(request_frame(accept(with("grammar", "root ::= [0-9]+")))).grammar, "root ::= [0-9]+");
    EXPECT_BAD_REQUEST(with("grammar", ""), "field 'grammar': expected a non-empty string (GBNF)");
    EXPECT_BAD_REQUEST(with("grammar", 5), "field 'grammar'");
    EXPECT_BAD_REQUEST(with("json_schema", "x"), "field 'json_schema': expected an object (a JSON Schema)");
    EXPECT_BAD_REQUEST(R"({"id":"r1","prompt":"a","grammar":"root ::= \"a\"","json_schema":{}})", "give one, not both");
    // schemas nest: 30 levels are fine
    std::string deep = R"({"type":"array","items":)";
    std::string nested = "{}";
    for (int i = 0; i < 30; ++i) nested = R"({"type":"array","items":)" + nested + "}";
    EXPECT_TRUE(accept(R"({"id":"r1","prompt":"a","json_schema":)" + nested + "}").json_schema);
}

TEST(ProtocolRequest, NeverThrowsOnPrefixesOrByteNoise) {
    const std::string valid = R"({"type":"generate","id":"r1","messages":[{"role":"user","content":"h\u00e9"}],"stop":["x"],"seed":1})";
    for (size_t n = 0; n <= valid.size(); ++n) {
        auto parsed = parse_request(std::string_view(valid).substr(0, n), limits());
        EXPECT_EQ(std::holds_alternative<Request>(parsed), n == valid.size()) << n;
    }
    uint32_t x = 12345;
    for (int i = 0; i < 2000; ++i) {
        std::string s = valid;
        for (int k = 0; k < 3; ++k) {
            x = x * 1664525u + 1013904223u;
            s[(x >> 8) % s.size()] = char(x >> 24);
        }
        EXPECT_NO_THROW((void)parse_request(s, limits()));
    }
}

TEST(ProtocolRequest, ToolsAndToolMessagesRoundTrip) {
    Request g;
    g.id = "t1";
    ChatMessage user{"user", "Weather?", {}, {}, {}, {}};
    ChatMessage call{"assistant", "", {{"abcDEF123", "get_weather", R"({"city":"Paris"})"}}, {}, {}, std::string("hm")};
    ChatMessage result{"tool", R"({"temp": 21})", {}, "abcDEF123", "get_weather", {}};
    g.messages = std::vector<ChatMessage>{user, call, result};
    g.tools = R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"z":{},"a":{}}}}}])";
    g.tool_choice = ToolChoice::Named;
    g.tool_choice_name = "get_weather";
    g.chat_template_kwargs = R"({"enable_thinking":false,"b":1,"a":2})";
    const Request r = accept(request_frame(g));
    ASSERT_TRUE(r.messages);
    ASSERT_EQ(r.messages->at(1).tool_calls.size(), 1u);
    EXPECT_EQ(r.messages->at(1).tool_calls[0].id, "abcDEF123");
    EXPECT_EQ(r.messages->at(1).tool_calls[0].arguments, R"({"city":"Paris"})");
    EXPECT_EQ(r.messages->at(1).reasoning_content, "hm");
    EXPECT_EQ(r.messages->at(2).tool_call_id, "abcDEF123");
    EXPECT_EQ(r.messages->at(2).name, "get_weather");
    EXPECT_EQ(r.tools, g.tools);   // key order kept: "z" before "a"
    EXPECT_EQ(r.tool_choice, ToolChoice::Named);
    EXPECT_EQ(r.tool_choice_name, "get_weather");
    EXPECT_EQ(r.chat_template_kwargs, g.chat_template_kwargs);
}

TEST(ProtocolRequest, ToolFieldsAreChecked) {
    const std::string m = R"("id":"t","messages":[{"role":"user","content":"x"}])";
    const std::string tool = R"({"type":"function","function":{"name":"f"}})";
    auto msg = [](const std::string & body) { return refuse("{" + body + "}").message; };
    EXPECT_EQ(msg(R"("id":"t","prompt":"x","tools":[)" + tool + "]"), "field 'tools' needs 'messages' (it is for the chat template)");
    EXPECT_EQ(msg(m + R"(,"tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}])"),
              "field 'tools[1].function.name': 'f' is offered twice");
    EXPECT_EQ(msg(m + R"(,"tools":[{"type":"function","function":{"name":"f","params":{}}}])"), "unknown field 'tools[0].function.params'");
    EXPECT_EQ(msg(m + R"(,"tools":[{"type":"function","function":{"name":"get weather"}}])"),
              "field 'tools[0].function.name': expected 1 to 64 letters, digits, '_', '-' or '.', got a string \"get weather\"");
    EXPECT_TRUE(accept("{" + m + R"(,"tools":[{"type":"function","function":{"name":"mcp.get_weather-2"}}]})").tools.has_value());
    EXPECT_EQ(msg(m + R"(,"tools":[{"type":"retrieval"}])"), "field 'tools[0].type': expected \"function\", got a string \"retrieval\"");
    EXPECT_EQ(msg(m + R"(,"tool_choice":"required")"), "field 'tool_choice': \"required\" without 'tools'");
    EXPECT_EQ(msg(m + R"(,"tools":[)" + tool + R"(],"tool_choice":{"type":"function","function":{"name":"g"}})"),
              "field 'tool_choice': 'g' is not one of the request's tools");
    EXPECT_EQ(msg(m + R"(,"tools":[)" + tool + R"(],"tool_choice":"required","grammar":"root ::= \"a\"")"),
              "field 'tool_choice': a call that must be made is its own grammar; not with 'grammar' or 'json_schema'");
    EXPECT_EQ(msg(m + R"(,"chat_template_kwargs":{"messages":[]})"), "field 'chat_template_kwargs.messages': set by the server, not by a request");
    EXPECT_EQ(msg(R"("id":"t","messages":[{"role":"tool","content":"x"}])"),
              "field 'messages[0].tool_call_id': missing (the id of the call this answers)");
    EXPECT_EQ(msg(R"("id":"t","messages":[{"role":"user","content":"x","tool_calls":[]}])"),
              "unknown field 'messages[0].tool_calls' for a message with role 'user'");
    EXPECT_EQ(msg(R"("id":"t","messages":[{"role":"assistant","tool_calls":[{"id":"a","function":{"name":"f","arguments":{}}}]}])"),
              "field 'messages[0].tool_calls[0].function.arguments': expected a string (the JSON text of an object), got an object");
    EXPECT_EQ(msg(R"("id":"t","messages":[{"role":"assistant","tool_calls":[{"id":"a","function":{"name":"f","arguments":"{}"},"x":1}]}])"),
              "unknown field 'messages[0].tool_calls[0].x'");
    // an assistant's message with calls needs no content
    EXPECT_TRUE(accept(R"({"id":"t","messages":[{"role":"assistant","tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}}]}]})").messages);
}

TEST(ProtocolResponse, DoneFramesCarryToolCalls) {
    Done d;
    d.tool_calls = {{"abcDEF123", "f", R"({"x":1})"}};
    d.finish_reason = FinishReason::ToolCalls;
    const std::string frame = done_frame("r1", d);
    auto parsed = parse_response(frame);
    ASSERT_TRUE(std::holds_alternative<Response>(parsed)) << frame;
    const auto & body = std::get<Response>(parsed).body;
    EXPECT_EQ(body["finish_reason"], "tool_calls");
    EXPECT_EQ(body["tool_calls"][0]["function"]["arguments"], R"({"x":1})");
    std::string bad = frame;
    bad.replace(bad.find(R"("arguments":)"), 12, R"("argumentz":)");
    EXPECT_TRUE(std::holds_alternative<ParseError>(parse_response(bad)));
}

TEST(ProtocolRequest, RequestFrameReadsBackAsTheSameRequest) {
    Request g;
    g.id = "g1";
    ChatMessage sys, user;
    sys.role = "system", sys.content = "S";
    user.role = "user", user.content = "caf\xc3\xa9";
    g.messages = std::vector<ChatMessage>{sys, user};
    g.max_tokens = 33;
    g.temperature = 0.7f;
    g.top_p = 0.95f;
    g.top_k = 50;
    g.seed = 18446744073709551615ull;
    g.stop = {"\n", "</s>"};
    g.stream = true;
    g.logprobs = 4;
    g.prompt_logprobs = 0;
    g.echo = true;
    g.logit_bias = {{0, 100.0f}, {7, -1.5f}};
    g.repetition_penalty = 1.1f;
    g.frequency_penalty = -0.3f;
    g.presence_penalty = 0.7f;
    g.priority = -3;
    const Request r = accept(request_frame(g));
    EXPECT_EQ(r.id, g.id);
    ASSERT_TRUE(r.messages);
    EXPECT_EQ(r.messages->at(1).content, "caf\xc3\xa9");
    EXPECT_EQ(r.max_tokens, 33);
    EXPECT_EQ(r.temperature, g.temperature);
    EXPECT_EQ(r.top_p, g.top_p);
    EXPECT_EQ(r.top_k, 50);
    EXPECT_EQ(r.seed, g.seed);
    EXPECT_EQ(r.stop, g.stop);
    EXPECT_TRUE(r.stream);
    EXPECT_EQ(r.logprobs, 4);
    EXPECT_EQ(r.prompt_logprobs, 0);
    EXPECT_TRUE(r.echo);
    EXPECT_EQ(r.logit_bias, g.logit_bias);
    EXPECT_EQ(r.repetition_penalty, g.repetition_penalty);
    EXPECT_EQ(r.frequency_penalty, g.frequency_penalty);
    EXPECT_EQ(r.presence_penalty, g.presence_penalty);
    EXPECT_EQ(r.priority, -3);

    EXPECT_NE(request_frame(g).find(R"("temperature":0.7,"top_p":0.95,)"), std::string::npos) << request_frame(g);

    Request ids;
    ids.id = "g2";
    ids.prompt_ids = std::vector<int32_t>{5, 6};
    EXPECT_EQ(*accept(request_frame(ids)).prompt_ids, *ids.prompt_ids);
    EXPECT_EQ(request_frame(ids).find("logprobs"), std::string::npos);   // the defaults are not written
    EXPECT_EQ(request_frame(ids).find("penalty"), std::string::npos);

    Request c;
    c.type = RequestType::Cancel;
    c.id = "g1";
    EXPECT_EQ(request_frame(c), R"({"type":"cancel","id":"g1"})");
    EXPECT_EQ(accept(request_frame(c)).type, RequestType::Cancel);
    Request p;
    p.type = RequestType::Ping;
    EXPECT_EQ(request_frame(p), R"({"type":"ping"})");
}

TEST(ProtocolNames, ErrorCodesHaveTheirWireNames) {
    const std::pair<ErrorCode, const char *> names[] = {
        {ErrorCode::BadRequest, "bad_request"}, {ErrorCode::TooLarge, "too_large"},
        {ErrorCode::TooLong, "too_long"},       {ErrorCode::Busy, "busy"},
        {ErrorCode::NotFound, "not_found"},     {ErrorCode::ShuttingDown, "shutting_down"},
        {ErrorCode::Internal, "internal"}};
    for (const auto & [code, name] : names) {
        EXPECT_STREQ(error_code_name(code), name);
        EXPECT_EQ(error_code_from_name(name), code);
    }
    EXPECT_FALSE(error_code_from_name("Busy"));
    EXPECT_STREQ(finish_reason_name(FinishReason::Cancelled), "cancelled");
    EXPECT_STREQ(finish_reason_name(FinishReason::Eos), "eos");
}

// --- frames ---

Response read_back(const std::string & frame) {
    auto parsed = parse_response(frame);
    if (auto * e = std::get_if<ParseError>(&parsed)) {
        ADD_FAILURE() << "client refused " << frame << ": " << e->message;
        return {};
    }
    return std::get<Response>(parsed);
}

TEST(ProtocolFrames, TokenFrameReadsBack) {
    const std::string f = token_frame("r1", 3, 1234, " world");
    EXPECT_EQ(f, R"({"type":"token","id":"r1","index":3,"token":1234,"text":" world"})");
    const Response r = read_back(f);
    EXPECT_EQ(r.type, "token");
    EXPECT_EQ(r.id, "r1");
    EXPECT_EQ(r.body["index"], 3);
    EXPECT_EQ(r.body["token"], 1234);
    EXPECT_EQ(r.body["text"], " world");
}

TEST(ProtocolFrames, TokenFramesCarryToolCallDeltas) {
    const std::vector<ToolCallDelta> calls = {{0, "abcDEF123", "get_weather", ""}, {1, "", "", "{\"city\":\"Pa"}};
    const Response r = read_back(token_frame("r1", 4, 9, "", nullptr, {}, calls));
    ASSERT_EQ(r.body["tool_calls"].size(), 2u);
    EXPECT_EQ(r.body["tool_calls"][0],
              nlohmann::json::parse(R"({"index":0,"id":"abcDEF123","type":"function","function":{"name":"get_weather","arguments":""}})"));
    EXPECT_EQ(r.body["tool_calls"][1], nlohmann::json::parse(R"({"index":1,"function":{"arguments":"{\"city\":\"Pa"}})"));
    EXPECT_FALSE(read_back(token_frame("r1", 0, 7, "a")).body.contains("tool_calls"));
}

TEST(ProtocolFrames, DoneFrameReadsBack) {
    Done d;
    d.tokens = {5, 6, 7};
    d.text = "abc";
    d.finish_reason = FinishReason::Stop;
    d.prompt_tokens = 12;
    d.completion_tokens = 3;
    d.queue_ms = 1.5;
    d.ttft_ms = 20;
    d.total_ms = 45.25;
    d.decode_tokens_per_second = 80;
    d.preempted = 2;
    const Response r = read_back(done_frame("r1", d));
    EXPECT_EQ(r.type, "done");
    EXPECT_EQ(r.id, "r1");
    EXPECT_EQ(r.body["tokens"], json({5, 6, 7}));
    EXPECT_EQ(r.body["text"], "abc");
    EXPECT_EQ(r.body["finish_reason"], "stop");
    EXPECT_EQ(r.body["usage"], json({{"prompt_tokens", 12}, {"completion_tokens", 3}}));
    EXPECT_EQ(r.body["timings"]["queue_ms"], 1.5);
    EXPECT_EQ(r.body["timings"]["ttft_ms"], 20.0);
    EXPECT_EQ(r.body["timings"]["total_ms"], 45.25);
    EXPECT_EQ(r.body["timings"]["decode_tokens_per_second"], 80.0);
    EXPECT_EQ(r.body["timings"]["preempted"], 2);
}

TEST(ProtocolFrames, LogprobsReadBackInTokenAndDoneFrames) {
    Logprobs l;
    l.sampled = {7, -0.25f, std::string("a\xe2")};   // part of a UTF-8 character: text replaced, bytes exact
    l.top = {{7, -0.25f, std::string("a\xe2")}, {9, -1.5f, std::nullopt}, {3, -INFINITY, std::string("")}};
    const Response t = read_back(token_frame("r1", 0, 7, "a", &l));
    const json & e = t.body["logprobs"];
    EXPECT_EQ(e["token"], 7);
    EXPECT_EQ(e["logprob"], -0.25);
    EXPECT_EQ(e["text"], "a\xef\xbf\xbd");
    EXPECT_EQ(e["bytes"], json({97, 226}));
    ASSERT_EQ(e["top_logprobs"].size(), 3u);
    EXPECT_FALSE(e["top_logprobs"][1].contains("text"));   // no tokenizer: no text
    EXPECT_TRUE(e["top_logprobs"][2]["logprob"].is_null());   // -inf
    EXPECT_FALSE(read_back(token_frame("r1", 0, 7, "a")).body.contains("logprobs"));

    Done d;
    d.tokens = {7, 7};
    d.logprobs = std::vector<Logprobs>{l, l};
    EXPECT_EQ(read_back(done_frame("r1", d)).body["logprobs"].size(), 2u);
    d.prompt_logprobs = std::vector<Logprobs>{Logprobs{{1, NAN, std::string("<s>")}, {}}, l};
    d.prompt_text = "def";
    const Response pr = read_back(done_frame("r1", d));
    EXPECT_TRUE(pr.body["prompt_logprobs"][0]["logprob"].is_null());   // nothing before the first token
    EXPECT_EQ(pr.body["prompt_logprobs"][1]["token"], 7);
    EXPECT_EQ(pr.body["prompt_text"], "def");
    d.logprobs->pop_back();   // one entry for two tokens
    EXPECT_TRUE(std::holds_alternative<ParseError>(parse_response(done_frame("r1", d))));
}

TEST(ProtocolFrames, DoneFrameWritesUnmeasuredTimingsAsNull) {
    Done d;
    d.ttft_ms = std::nan("");
    d.decode_tokens_per_second = INFINITY;
    d.finish_reason = FinishReason::Cancelled;
    const Response r = read_back(done_frame("r1", d));
    EXPECT_TRUE(r.body["timings"]["ttft_ms"].is_null());
    EXPECT_TRUE(r.body["timings"]["decode_tokens_per_second"].is_null());
    EXPECT_EQ(r.body["finish_reason"], "cancelled");
    EXPECT_EQ(r.body["tokens"], json::array());
}

TEST(ProtocolFrames, ErrorFrameReadsBack) {
    Response r = read_back(error_frame("r1", ErrorCode::Busy, "queue full", 250));
    EXPECT_EQ(r.type, "error");
    EXPECT_EQ(r.id, "r1");
    EXPECT_EQ(r.body["code"], "busy");
    EXPECT_EQ(r.body["message"], "queue full");
    EXPECT_EQ(r.body["retry_after_ms"], 250);
    const std::string f = error_frame("", ErrorCode::BadRequest, "nope");
    EXPECT_EQ(f, R"({"type":"error","id":null,"code":"bad_request","message":"nope"})");
    r = read_back(f);
    EXPECT_EQ(r.id, "");
    EXPECT_FALSE(r.body.contains("retry_after_ms"));
}

TEST(ProtocolFrames, ParseErrorBecomesAnErrorFrame) {
    const ParseError e = refuse(with("max_tokens", -5));
    const Response r = read_back(error_frame(e.id, e.code, e.message));
    EXPECT_EQ(r.id, "r1");
    EXPECT_EQ(r.body["code"], "bad_request");
    EXPECT_EQ(r.body["message"], "field 'max_tokens': expected an integer in [1, 4096], got -5");
}

TEST(ProtocolFrames, PongFrameReadsBack) {
    const json info = {{"model", "tiny"}, {"queue", {{"waiting", 2}}}};
    const Response r = read_back(pong_frame("p1", info));
    EXPECT_EQ(r.type, "pong");
    EXPECT_EQ(r.id, "p1");
    EXPECT_EQ(r.body["info"], info);
    EXPECT_TRUE(json::parse(pong_frame("", json::object()))["id"].is_null());
}

TEST(ProtocolFrames, InvalidUtf8InTextBecomesReplacementCharacters) {
    const std::string fffd = "\xef\xbf\xbd";
    // a lone continuation byte, a truncated 3-byte character, an overlong form and a surrogate
    EXPECT_EQ(read_back(token_frame("r1", 0, 1, "a\x80z")).body["text"], "a" + fffd + "z");
    EXPECT_EQ(read_back(token_frame("r1", 0, 1, "\xe2\x82")).body["text"].get<std::string>().find(fffd), 0u);
    Done d;
    d.text = "ok \xc0\xaf \xed\xa0\x80 \xe2\x82\xac";
    const std::string text = read_back(done_frame("r1", d)).body["text"];
    EXPECT_EQ(text.substr(0, 3), "ok ");
    EXPECT_EQ(text.substr(text.size() - 3), "\xe2\x82\xac");   // the valid euro sign is kept
    EXPECT_NE(text.find(fffd), std::string::npos);
    EXPECT_EQ(read_back(error_frame("r\xff", ErrorCode::Internal, "bad \xff")).body["message"], "bad " + fffd);
    EXPECT_EQ(read_back(pong_frame("p", {{"name", "x\xfe"}})).body["info"]["name"], "x" + fffd);
    // nlohmann's default (strict) parser accepts every frame
    json strict;
    EXPECT_NO_THROW(strict = json::parse(token_frame("\xff", 0, 1, "\xf5\x80\x80\x80")));
    EXPECT_EQ(strict["id"], fffd);
}

// --- the client's parser ---

TEST(ProtocolResponse, RefusesMalformedFrames) {
    struct Case {
        const char * frame;
        const char * says;
    };
    const Case cases[] = {
        {"", "invalid JSON"},
        {"[1]", "must be a JSON object"},
        {R"({"id":"r1"})", "field 'type': missing"},
        {R"({"type":"tok","id":"r1"})", "field 'type'"},
        {R"({"type":"token","index":0,"token":1,"text":""})", "field 'id': missing"},
        {R"({"type":"token","id":null,"index":0,"token":1,"text":""})", "field 'id'"},
        {R"({"type":"token","id":"r1","index":-1,"token":1,"text":""})", "field 'index'"},
        {R"({"type":"token","id":"r1","index":0,"token":1.5,"text":""})", "field 'token'"},
        {R"({"type":"token","id":"r1","index":0,"token":1})", "field 'text': missing"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":7})", "field 'text'"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":"","logprobs":[]})", "field 'logprobs'"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":"","logprobs":{"token":1,"logprob":"x","top_logprobs":[]}})", "field 'logprobs.logprob'"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":"","logprobs":{"token":1,"logprob":0}})", "field 'logprobs.top_logprobs'"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":"","logprobs":{"token":1,"logprob":0,"top_logprobs":[{"token":-2,"logprob":0}]}})", "field 'logprobs.top_logprobs[0].token'"},
        {R"({"type":"token","id":"r1","index":0,"token":1,"text":"","logprobs":{"token":1,"logprob":0,"bytes":[256],"top_logprobs":[]}})", "field 'logprobs.bytes'"},
        {R"({"type":"done","id":"r1","tokens":[],"prompt_logprobs":[],"prompt_text":5,"text":"","finish_reason":"eos","usage":{"prompt_tokens":1,"completion_tokens":0},"timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'prompt_text'"},
        {R"({"type":"done","id":"r1","tokens":[1],"logprobs":[{"token":1}],"text":"","finish_reason":"eos","usage":{"prompt_tokens":1,"completion_tokens":1},"timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'logprobs[0].logprob'"},
        {R"({"type":"done","id":"r1","tokens":[1,"2"],"text":"","finish_reason":"eos","usage":{"prompt_tokens":1,"completion_tokens":2},"timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'tokens[1]'"},
        {R"({"type":"done","id":"r1","tokens":[],"text":"","finish_reason":"eos","timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'usage': missing"},
        {R"({"type":"done","id":"r1","tokens":[],"text":"","finish_reason":"eos","usage":{"prompt_tokens":-1,"completion_tokens":2},"timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'usage.prompt_tokens'"},
        {R"({"type":"done","id":"r1","tokens":[],"text":"","finish_reason":"eos","usage":{"prompt_tokens":1,"completion_tokens":2},"timings":{"queue_ms":"0","ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'timings.queue_ms'"},
        {R"({"type":"done","id":"r1","tokens":[],"text":"","finish_reason":"","usage":{"prompt_tokens":1,"completion_tokens":2},"timings":{"queue_ms":0,"ttft_ms":0,"total_ms":0,"decode_tokens_per_second":0}})", "field 'finish_reason'"},
        {R"({"type":"error","id":null,"message":"x"})", "field 'code': missing"},
        {R"({"type":"error","id":null,"code":"busy","message":"x","retry_after_ms":-3})", "field 'retry_after_ms'"},
        {R"({"type":"error","id":5,"code":"busy","message":"x"})", "field 'id'"},
        {R"({"type":"pong","id":"p","id":"q"})", "duplicate field 'id'"},
    };
    for (const Case & c : cases) {
        auto parsed = parse_response(c.frame);
        ASSERT_TRUE(std::holds_alternative<ParseError>(parsed)) << c.frame;
        const ParseError & e = std::get<ParseError>(parsed);
        EXPECT_NE(e.message.find(c.says), std::string::npos) << c.frame << "\nmessage: " << e.message;
    }
}

TEST(ProtocolResponse, KeepsUnknownFieldsAndCodes) {
    const Response r = read_back(R"({"type":"error","id":"r1","code":"overloaded_v2","message":"m","extra":{"a":1}})");
    EXPECT_EQ(r.body["code"], "overloaded_v2");
    EXPECT_EQ(r.body["extra"]["a"], 1);
    EXPECT_EQ(read_back(R"({"type":"pong","id":null})").type, "pong");
}

TEST(ProtocolResponse, ErrorsCarryTheFramesId) {
    auto parsed = parse_response(R"({"type":"token","id":"r9","index":0,"token":1})");
    ASSERT_TRUE(std::holds_alternative<ParseError>(parsed));
    EXPECT_EQ(std::get<ParseError>(parsed).id, "r9");
}

} // namespace
} // namespace moesh::protocol
