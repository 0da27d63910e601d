// The OpenAI-compatible API's translation (transport/openai.h): request bodies
// as OpenAI documents them become the protocol frames they mean; what moesh
// cannot honour is refused by name, never ignored; replies have the shapes
// OpenAI's clients parse. End to end with the `openai` package:
// tests/clients/http_openai_test.py.
#include "transport/openai.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>
#include <variant>

namespace moesh::openai {
namespace {

using json = nlohmann::json;

Defaults defaults() {
    Defaults d;
    d.id = "cmpl-1";
    d.max_tokens = 16;
    d.seed = 42;
    d.max_body_bytes = 4096;
    return d;
}

json frame_of(Endpoint e, const json & body) {
    auto t = translate(e, body.dump(), defaults());
    if (auto * err = std::get_if<HttpError>(&t)) {
        ADD_FAILURE() << "refused: " << err->message;
        return {};
    }
    return json::parse(std::get<Translated>(t).frame);
}

HttpError error_of(Endpoint e, const std::string & body) {
    auto t = translate(e, body, defaults());
    if (auto * err = std::get_if<HttpError>(&t)) return *err;
    ADD_FAILURE() << "accepted: " << std::get<Translated>(t).frame;
    return {};
}

TEST(OpenAi, CompletionTakesOpenAiDefaults) {
    // OpenAI: max_tokens 16, temperature 1; the seed is the server's when not given.
    const json f = frame_of(Endpoint::Completions, {{"model", "x"}, {"prompt", "Hi"}});
    EXPECT_EQ(f, json({{"id", "cmpl-1"}, {"prompt", "Hi"}, {"max_tokens", 16}, {"temperature", 1.0}, {"seed", 42}}));
}

TEST(OpenAi, CompletionPassesSamplingThrough) {
    const json f = frame_of(Endpoint::Completions, {{"prompt", "Hi"}, {"max_tokens", 5}, {"temperature", 0}, {"top_p", 0.5},
                                                    {"top_k", 3}, {"seed", 7}, {"stop", {"a", "b"}}, {"stream", true},
                                                    {"stream_options", {{"include_usage", true}}}});
    EXPECT_EQ(f["max_tokens"], 5);
    EXPECT_EQ(f["temperature"], 0);
    EXPECT_EQ(f["top_p"], 0.5);
    EXPECT_EQ(f["top_k"], 3);
    EXPECT_EQ(f["seed"], 7);
    EXPECT_EQ(f["stop"], json({"a", "b"}));
    EXPECT_EQ(f["stream"], true);
    auto t = translate(Endpoint::Completions, json({{"prompt", "x"}, {"stream", true}, {"stream_options", {{"include_usage", true}}}}).dump(),
                       defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(t));
    EXPECT_TRUE(std::get<Translated>(t).include_usage);
    EXPECT_TRUE(std::get<Translated>(t).stream);
}

TEST(OpenAi, PromptShapes) {
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", {"one"}}})["prompt"], "one");
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", {1, 2, 3}}})["prompt_ids"], json({1, 2, 3}));
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", {{4, 5}}}})["prompt_ids"], json({4, 5}));
    std::string big = "[";
    for (int i = 0; i < 65; ++i) big += std::string(i ? "," : "") + "\"p\"";
    const HttpError many = error_of(Endpoint::Completions, R"({"prompt": )" + big + "]}");
    EXPECT_EQ(many.status, 400);
    EXPECT_EQ(many.param, "prompt");
    EXPECT_NE(many.message.find("65 prompts in one request; at most 64"), std::string::npos) << many.message;
    const HttpError product = error_of(Endpoint::Completions, R"({"prompt": ["a", "b", "c", "d", "e"], "n": 16})");
    EXPECT_EQ(product.param, "n");
    EXPECT_NE(product.message.find("is 80 completions; at most 64"), std::string::npos) << product.message;
    const HttpError mixed = error_of(Endpoint::Completions, R"({"prompt": ["a", 3]})");
    EXPECT_EQ(mixed.param, "prompt[1]");
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": ["a", []]})").param, "prompt[1]");
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": {"a": 1}})").param, "prompt");
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"max_tokens": 3})").message, "field 'prompt': missing");
}

TEST(OpenAi, PriorityPassesThrough) {   // vLLM's extra field: the protocol checks it
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", "x"}, {"priority", -2}})["priority"], -2);
    EXPECT_EQ(frame_of(Endpoint::Chat, {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"priority", 3}})["priority"], 3);
}

TEST(OpenAi, NullMeansNotGiven) {
    const json f = frame_of(Endpoint::Completions, {{"prompt", "x"}, {"max_tokens", nullptr}, {"stop", nullptr}, {"n", nullptr},
                                                    {"logprobs", nullptr}, {"user", "u"}});
    EXPECT_EQ(f["max_tokens"], 16);
    EXPECT_FALSE(f.contains("stop"));
}

TEST(OpenAi, UnhonouredValuesAreRefusedByName) {
    struct Case {
        const char * body;
        const char * param;
        const char * says;
    };
    for (const Case & c : {Case{R"({"prompt":"x","n":17})", "n", "an integer in [1, 16]"},
                           Case{R"({"prompt":"x","n":0})", "n", "an integer in [1, 16]"},
                           Case{R"({"prompt":"x","echo":true,"stream":true})", "echo", "only without"},
                           Case{R"({"prompt":"x","suffix":"y"})", "suffix", "not implemented"},
                           Case{R"({"prompt":"x","temprature":0})", "temprature", "unknown field"},
                           Case{R"({"prompt":"x","stream_options":{"include_usage":true}})", "stream_options", "only allowed with"}}) {
        const HttpError e = error_of(Endpoint::Completions, c.body);
        EXPECT_EQ(e.status, 400) << c.body;
        EXPECT_EQ(e.param, c.param) << c.body;
        EXPECT_NE(e.message.find(c.says), std::string::npos) << e.message;
    }
    // The values that mean "off" are accepted.
    (void)frame_of(Endpoint::Completions, {{"prompt", "x"}, {"n", 1}, {"presence_penalty", 0}, {"frequency_penalty", 0.0},
                                           {"echo", false}, {"best_of", 1}, {"logit_bias", json::object()}, {"suffix", ""}});
}

// n choices: choice i's request is the first's with its own id and the seed plus i, streamed (its
// first token sends the others); the answer has a choice per done frame and counts the prompt once.
TEST(OpenAi, ChoicesAreRequestsOfTheirOwn) {
    auto t = translate(Endpoint::Completions, R"({"prompt":"x","n":3,"seed":18446744073709551615})", defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(t));
    const Translated & tr = std::get<Translated>(t);
    EXPECT_EQ(tr.n, 3);
    EXPECT_FALSE(tr.stream);   // the client's wish; the requests stream
    const json first = json::parse(choice_frame(tr, 0)), last = json::parse(choice_frame(tr, 2));
    EXPECT_EQ(first["stream"], true);
    EXPECT_EQ(last["id"], first["id"].get<std::string>() + ".2");
    EXPECT_EQ(last["seed"], 1u);   // wraps at 2^64
    EXPECT_EQ(last["prompt"], first["prompt"]);
    Reply r{"cmpl-1", "m", 7};
    auto done = [](const char * text, int completion) {
        return json{{"type", "done"}, {"id", "x"}, {"tokens", json::array()}, {"text", text}, {"finish_reason", "length"},
                    {"usage", {{"prompt_tokens", 5}, {"completion_tokens", completion}}}};
    };
    const json body = json::parse(completion_body(Endpoint::Completions, r, std::vector<json>{done("a", 2), done("b", 3)}, 2));
    ASSERT_EQ(body["choices"].size(), 2u);
    EXPECT_EQ(body["choices"][1]["index"], 1);
    EXPECT_EQ(body["choices"][1]["text"], "b");
    EXPECT_EQ(body["usage"], json::parse(R"({"prompt_tokens":5,"completion_tokens":5,"total_tokens":10})"));
    const json chunk = json::parse(text_chunk(Endpoint::Chat, r, "hi", true, nullptr, nullptr, {}, 1).substr(6));
    EXPECT_EQ(chunk["choices"][0]["index"], 1);
    EXPECT_EQ(chunk["choices"][0]["delta"]["role"], "assistant");
}

// Several prompts: a request per prompt and choice, prompt-major (choice i is prompt i / n), each
// prompt's choices seeded from the request's seed as for one prompt; usage counts each prompt once.
TEST(OpenAi, SeveralPromptsAreRequestsOfTheirOwn) {
    auto t = translate(Endpoint::Completions, R"({"prompt":["ab",[7,8,9],"c"],"n":2,"seed":10})", defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(t)) << std::get<HttpError>(t).message;
    const Translated & tr = std::get<Translated>(t);
    EXPECT_EQ(tr.choices(), 6);
    EXPECT_TRUE(tr.prompt_ids);   // errors about prompt_ids name 'prompt'
    std::vector<json> f;
    for (int i = 0; i < tr.choices(); ++i) f.push_back(json::parse(choice_frame(tr, i)));
    EXPECT_EQ(f[0]["prompt"], "ab");
    EXPECT_EQ(f[1]["prompt"], "ab");
    EXPECT_EQ(f[2]["prompt_ids"], json({7, 8, 9}));
    EXPECT_FALSE(f[2].contains("prompt"));
    EXPECT_EQ(f[3]["prompt_ids"], json({7, 8, 9}));
    EXPECT_EQ(f[5]["prompt"], "c");
    EXPECT_EQ(f[5]["id"], f[0]["id"].get<std::string>() + ".5");
    for (int i = 0; i < 6; ++i) EXPECT_EQ(f[size_t(i)]["seed"], 10 + i % 2) << i;
    auto done = [](int prompt, int completion) {
        return json{{"type", "done"}, {"id", "x"}, {"tokens", json::array()}, {"text", "t"}, {"finish_reason", "length"},
                    {"usage", {{"prompt_tokens", prompt}, {"completion_tokens", completion}}}};
    };
    const std::vector<json> dones{done(2, 1), done(2, 1), done(3, 1), done(3, 1), done(1, 2), done(1, 2)};
    const json body = json::parse(completion_body(Endpoint::Completions, {"cmpl-1", "m", 7}, dones, tr.n));
    ASSERT_EQ(body["choices"].size(), 6u);
    EXPECT_EQ(body["choices"][5]["index"], 5);
    EXPECT_EQ(body["usage"], json::parse(R"({"prompt_tokens":6,"completion_tokens":8,"total_tokens":14})"));
    const json usage = json::parse(usage_chunk(Endpoint::Completions, {"cmpl-1", "m", 7}, dones, tr.n).substr(6));
    EXPECT_EQ(usage["usage"]["prompt_tokens"], 6);
    // One prompt in a list is one prompt.
    auto one = translate(Endpoint::Completions, R"({"prompt":[[4,5]]})", defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(one));
    EXPECT_EQ(std::get<Translated>(one).choices(), 1);
}

TEST(OpenAi, ResponseFormatBecomesAJsonSchemaInItsKeyOrder) {
    auto frame_text = [](Endpoint e, const std::string & body) {
        auto t = translate(e, body, defaults());
        if (auto * err = std::get_if<HttpError>(&t)) return "refused: " + err->message;
        return std::get<Translated>(t).frame;
    };
    const std::string schema = R"({"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"integer"}},"required":["zeta"]})";
    const std::string f = frame_text(Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"n","strict":true,"schema":)" + schema + "}}}");
    EXPECT_NE(f.find(R"("json_schema":)" + schema), std::string::npos) << f;
    EXPECT_EQ(frame_of(Endpoint::Chat, json::parse(R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})"))["json_schema"],
              json({{"type", "object"}}));
    EXPECT_FALSE(frame_of(Endpoint::Chat, json::parse(R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"text"}})")).contains("json_schema"));
    // llama-server's fields, on both endpoints
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", "x"}, {"grammar", "root ::= \"a\""}})["grammar"], "root ::= \"a\"");
    const std::string c = frame_text(Endpoint::Completions, R"({"prompt":"x","json_schema":)" + schema + "}");
    EXPECT_NE(c.find(R"("json_schema":)" + schema), std::string::npos) << c;
    struct Case { const char * body; const char * param; const char * says; };
    for (const Case & e : {Case{R"({"prompt":"x","response_format":{"type":"yaml"}})", "response_format.type", "one of"},
                           Case{R"({"prompt":"x","response_format":"json"})", "response_format", "expected an object"},
                           Case{R"({"prompt":"x","response_format":{"type":"json_schema"}})", "response_format.json_schema", "expected an object"},
                           Case{R"({"prompt":"x","response_format":{"type":"json_schema","json_schema":{"schema":{},"nme":"a"}}})",
                                "response_format.json_schema.nme", "unknown field"},
                           Case{R"({"prompt":"x","response_format":{"type":"json_object"},"grammar":"root ::= \"a\""})", "response_format", "give one"},
                           Case{R"({"prompt":"x","grammar":"root ::= \"a\"","json_schema":{}})", "json_schema", "give one"},
                           Case{R"({"prompt":"x","json_schema":[]})", "json_schema", "expected an object"}}) {
        const HttpError err = error_of(Endpoint::Completions, e.body);
        EXPECT_EQ(err.status, 400) << e.body;
        EXPECT_EQ(err.param, e.param) << e.body << ": " << err.message;
        EXPECT_NE(err.message.find(e.says), std::string::npos) << err.message;
    }
}

TEST(OpenAi, LogprobsAndPenaltiesPassThrough) {
    const json f = frame_of(Endpoint::Completions, {{"prompt", "x"}, {"logprobs", 3}, {"presence_penalty", 0.5},
                                                    {"frequency_penalty", -1}, {"repetition_penalty", 1.2}});
    EXPECT_EQ(f["logprobs"], 3);   // the protocol checks the values
    EXPECT_EQ(f["presence_penalty"], 0.5);
    EXPECT_EQ(f["frequency_penalty"], -1);
    EXPECT_EQ(f["repetition_penalty"], 1.2);
    // chat: logprobs true, with top_logprobs most likely (0 when not given)
    const json msgs = json::array({{{"role", "user"}, {"content", "hi"}}});
    EXPECT_EQ(frame_of(Endpoint::Chat, {{"messages", msgs}, {"logprobs", true}, {"top_logprobs", 4}})["logprobs"], 4);
    EXPECT_EQ(frame_of(Endpoint::Chat, {{"messages", msgs}, {"logprobs", true}})["logprobs"], 0);
    EXPECT_FALSE(frame_of(Endpoint::Chat, {{"messages", msgs}, {"logprobs", false}}).contains("logprobs"));
    const std::string m = R"("messages":[{"role":"user","content":"hi"}])";
    const HttpError alone = error_of(Endpoint::Chat, "{" + m + R"(,"top_logprobs":2})");
    EXPECT_EQ(alone.param, "top_logprobs");
    EXPECT_NE(alone.message.find("only allowed with \"logprobs\": true"), std::string::npos) << alone.message;
    EXPECT_EQ(error_of(Endpoint::Chat, "{" + m + R"(,"logprobs":true,"top_logprobs":21})").param, "top_logprobs");
    EXPECT_EQ(error_of(Endpoint::Chat, "{" + m + R"(,"logprobs":1})").param, "logprobs");
    // echo: the prompt's text, and its tokens' logprobs with logprobs (lm-eval's loglikelihood request)
    const json echo = frame_of(Endpoint::Completions, {{"prompt", {1, 2, 3}}, {"echo", true}, {"max_tokens", 0}, {"logprobs", 1}});
    EXPECT_EQ(echo["prompt_logprobs"], 1);
    EXPECT_EQ(echo["echo"], true);
    EXPECT_EQ(echo["max_tokens"], 0);
    const json text_only = frame_of(Endpoint::Completions, {{"prompt", "x"}, {"echo", true}});   // nothing scored
    EXPECT_EQ(text_only["echo"], true);
    EXPECT_FALSE(text_only.contains("prompt_logprobs"));
    EXPECT_FALSE(frame_of(Endpoint::Completions, {{"prompt", "x"}, {"echo", false}}).contains("echo"));
    // an out-of-range logprobs with echo is refused as 'logprobs', the field the client sent
    EXPECT_FALSE(frame_of(Endpoint::Completions, {{"prompt", "x"}, {"echo", true}, {"logprobs", "5"}}).contains("prompt_logprobs"));
    EXPECT_EQ(frame_of(Endpoint::Completions, {{"prompt", "x"}, {"logit_bias", {{"5", -100}}}})["logit_bias"], json({{"5", -100}}));
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt":"x","echo":true,"stream":true})").param, "echo");
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt":"x","echo":1})").param, "echo");
    EXPECT_EQ(error_of(Endpoint::Chat, "{" + m + R"(,"echo":true})").param, "echo");   // not a chat field
}

TEST(OpenAi, LogprobsReplyShapes) {
    const Reply r{"cmpl-1", "tiny", 1};
    // two tokens: "H\xc3\xa9" and one from a server without a tokenizer
    const json e0 = {{"token", 5}, {"logprob", -0.5}, {"text", "H\xc3\xa9"}, {"bytes", {72, 195, 169}},
                     {"top_logprobs", {{{"token", 5}, {"logprob", -0.5}, {"text", "H\xc3\xa9"}, {"bytes", {72, 195, 169}}},
                                       {{"token", 6}, {"logprob", -1.5}, {"text", "A"}, {"bytes", {65}}}}}};
    const json e1 = {{"token", 9}, {"logprob", -2.0}, {"top_logprobs", {{{"token", 4}, {"logprob", -0.1}}}}};   // no tokenizer
    // a token ending inside a UTF-8 character is written by its bytes, not as the U+FFFD of its text
    const json partial = {{"token", 3}, {"logprob", -1.0}, {"text", "\xef\xbf\xbd"}, {"bytes", {226, 130}}, {"top_logprobs", json::array()}};
    int64_t off = 0;
    const json pc = json::parse(text_chunk(Endpoint::Completions, r, "", false, &partial, &off).substr(6));
    EXPECT_EQ(pc["choices"][0]["logprobs"]["tokens"], json({"bytes:\\xe2\\x82"}));
    EXPECT_EQ(off, 1);   // offsets advance by the token's text (here one U+FFFD), not its bytes form
    const json done = {{"tokens", {5, 9}}, {"text", "Hi"}, {"finish_reason", "length"},
                       {"usage", {{"prompt_tokens", 1}, {"completion_tokens", 2}}}, {"logprobs", {e0, e1}}};
    const json c = json::parse(completion_body(Endpoint::Completions, r, done))["choices"][0]["logprobs"];
    EXPECT_EQ(c["tokens"], json({"H\xc3\xa9", "token_id:9"}));
    EXPECT_EQ(c["token_logprobs"], json({-0.5, -2.0}));
    EXPECT_EQ(c["top_logprobs"][0], json({{"H\xc3\xa9", -0.5}, {"A", -1.5}}));
    EXPECT_EQ(c["top_logprobs"][1], json({{"token_id:4", -0.1}, {"token_id:9", -2.0}}));   // the sampled one added
    EXPECT_EQ(c["text_offset"], json({0, 2}));   // characters, not bytes

    const json chat = json::parse(completion_body(Endpoint::Chat, r, done))["choices"][0]["logprobs"];
    EXPECT_TRUE(chat["refusal"].is_null());
    ASSERT_EQ(chat["content"].size(), 2u);
    EXPECT_EQ(chat["content"][0]["token"], "H\xc3\xa9");
    EXPECT_EQ(chat["content"][0]["bytes"], json({72, 195, 169}));
    EXPECT_EQ(chat["content"][0]["top_logprobs"][1], json({{"token", "A"}, {"logprob", -1.5}, {"bytes", {65}}}));
    EXPECT_TRUE(chat["content"][1]["bytes"].is_null());
    json ended = done;   // an end-of-turn token: its entry follows the tokens'
    ended["finish_reason"] = "eos";
    ended["logprobs"].push_back({{"token", 2}, {"logprob", -0.2}, {"special", true}, {"top_logprobs", json::array()}});
    EXPECT_EQ(json::parse(completion_body(Endpoint::Chat, r, ended))["choices"][0]["logprobs"]["content"].size(), 2u);
    EXPECT_EQ(json::parse(completion_body(Endpoint::Completions, r, ended))["choices"][0]["logprobs"]["tokens"].size(), 3u);

    // echo: the prompt's text first, its tokens' logprobs first; the first token has none
    const json p0 = {{"token", 1}, {"logprob", nullptr}, {"text", "<s>"}, {"special", true}, {"top_logprobs", json::array()}};
    const json p1 = {{"token", 2}, {"logprob", -3.0}, {"text", "ab"}, {"top_logprobs", json::array()}};
    json echoed = done;
    echoed["prompt_logprobs"] = {p0, p1};
    echoed["prompt_text"] = "ab";
    const json ec = json::parse(completion_body(Endpoint::Completions, r, echoed))["choices"][0];
    EXPECT_EQ(ec["text"], "abHi");
    EXPECT_EQ(ec["logprobs"]["tokens"], json({"<s>", "ab", "H\xc3\xa9", "token_id:9"}));
    EXPECT_EQ(ec["logprobs"]["token_logprobs"], json({nullptr, -3.0, -0.5, -2.0}));
    EXPECT_TRUE(ec["logprobs"]["top_logprobs"][0].is_null());
    EXPECT_EQ(ec["logprobs"]["top_logprobs"][1], json({{"ab", -3.0}}));
    EXPECT_EQ(ec["logprobs"]["text_offset"], json({0, 0, 2, 4}));   // into "abHi": the BOS's text is not in it
    echoed.erase("logprobs");   // echo without logprobs: the text only
    EXPECT_TRUE(json::parse(completion_body(Endpoint::Completions, r, echoed))["choices"][0]["logprobs"].is_null());

    int64_t offset = 7;   // streamed: each chunk carries its token, offsets continue
    const json k = json::parse(text_chunk(Endpoint::Completions, r, "x", false, &e0, &offset).substr(6));
    EXPECT_EQ(k["choices"][0]["logprobs"]["text_offset"], json({7}));
    EXPECT_EQ(offset, 9);
    const json kc = json::parse(text_chunk(Endpoint::Chat, r, "", false, &e1).substr(6));
    EXPECT_EQ(kc["choices"][0]["logprobs"]["content"][0]["token"], "token_id:9");
    EXPECT_TRUE(json::parse(text_chunk(Endpoint::Chat, r, "x", false).substr(6))["choices"][0]["logprobs"].is_null());
}

TEST(OpenAi, ChatMessagesAreNormalised) {
    const json f = frame_of(Endpoint::Chat, {{"model", "m"},
                                             {"messages",
                                              {{{"role", "developer"}, {"content", "Be brief."}},
                                               {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Hel"}}, {{"type", "text"}, {"text", "lo"}}}}},
                                               {{"role", "assistant"}, {"content", nullptr}, {"name", "bot"}}}},
                                             {"max_completion_tokens", 9}});
    EXPECT_EQ(f["messages"], json({{{"role", "system"}, {"content", "Be brief."}},
                                   {{"role", "user"}, {"content", "Hello"}},
                                   {{"role", "assistant"}, {"content", ""}}}));
    EXPECT_EQ(f["max_tokens"], 9);
    EXPECT_FALSE(f.contains("prompt"));
}

// What OpenAI's SDKs send for tools: passed to the protocol with the client's key order, an
// assistant's content null where it called tools, a tool's result with its call's id.
TEST(OpenAi, ToolsPassThroughInTheirKeyOrder) {
    const std::string body = R"({"model":"m","messages":[{"role":"user","content":"Weather?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"abcDEF123","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
        {"role":"tool","tool_call_id":"abcDEF123","content":[{"type":"text","text":"21 C"}]}],
        "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"z":{},"a":{}}}}}],
        "tool_choice":"required","parallel_tool_calls":false,"chat_template_kwargs":{"enable_thinking":false,"b":1,"a":2}})";
    auto t = translate(Endpoint::Chat, body, defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(t)) << std::get<HttpError>(t).message;
    const std::string frame = std::get<Translated>(t).frame;
    EXPECT_LT(frame.find(R"("z")"), frame.find(R"("a":{})")) << frame;
    EXPECT_NE(frame.find(R"({"enable_thinking":false,"b":1,"a":2})"), std::string::npos) << frame;
    protocol::Limits l;
    auto r = protocol::parse_request(frame, l);
    ASSERT_TRUE(std::holds_alternative<protocol::Request>(r)) << std::get<protocol::ParseError>(r).message;
    const protocol::Request & req = std::get<protocol::Request>(r);
    EXPECT_EQ(req.tool_choice, protocol::ToolChoice::Required);
    ASSERT_EQ(req.messages->size(), 3u);
    EXPECT_EQ(req.messages->at(1).content, "");
    EXPECT_EQ(req.messages->at(1).tool_calls.at(0).arguments, R"({"city":"Paris"})");
    EXPECT_EQ(req.messages->at(2).tool_call_id, "abcDEF123");
    EXPECT_EQ(req.messages->at(2).content, "21 C");
    // tool_choice none/auto without tools, and tools [], are what clients send by default: nothing
    const json plain = frame_of(Endpoint::Chat, json::parse(R"({"messages":[{"role":"user","content":"x"}],"tools":[],"tool_choice":"none"})"));
    EXPECT_FALSE(plain.contains("tools"));
    EXPECT_FALSE(plain.contains("tool_choice"));
}

TEST(OpenAi, ToolCallRepliesHaveOpenAisShape) {
    Reply r{"chatcmpl-1", "m", 7};
    const json done = json::parse(R"({"type":"done","id":"x","tokens":[1,2],"text":"","finish_reason":"tool_calls",
        "tool_calls":[{"id":"abcDEF123","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}],
        "usage":{"prompt_tokens":3,"completion_tokens":2},"timings":{}})");
    const json whole = json::parse(completion_body(Endpoint::Chat, r, done));
    const json & c = whole["choices"][0];
    EXPECT_EQ(c["finish_reason"], "tool_calls");
    EXPECT_TRUE(c["message"]["content"].is_null());
    EXPECT_EQ(c["message"]["tool_calls"][0]["id"], "abcDEF123");
    EXPECT_EQ(c["message"]["tool_calls"][0]["type"], "function");
    EXPECT_EQ(c["message"]["tool_calls"][0]["function"]["arguments"], R"({"x":1})");
    // streamed: one chunk with the calls (each with its index), then the finish
    const std::string events = finish_chunk(Endpoint::Chat, r, done);
    const size_t split = events.find("\n\ndata: ");
    ASSERT_NE(split, std::string::npos) << events;
    const json calls = json::parse(events.substr(6, split - 6));
    EXPECT_EQ(calls["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
    EXPECT_EQ(calls["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "f");
    EXPECT_TRUE(calls["choices"][0]["finish_reason"].is_null());
    const json end = json::parse(events.substr(split + 8));
    EXPECT_EQ(end["choices"][0]["finish_reason"], "tool_calls");
}

// Calls streamed as they were written: token frames' deltas pass as they are, and the end adds
// only what they lack (the rest of a call's arguments; a call never streamed, whole).
TEST(OpenAi, StreamedToolCallsGetTheirRestAtTheEnd) {
    Reply r{"chatcmpl-1", "m", 7};
    const json first = json::parse(R"([{"index":0,"id":"abcDEF123","type":"function","function":{"name":"f","arguments":"{\"x\""}}])");
    const json more = json::parse(R"([{"index":0,"function":{"arguments":":1"}}])");
    const json chunk = json::parse(calls_chunk(r, first).substr(6));
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_EQ(chunk["choices"][0]["delta"]["tool_calls"], first);
    EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
    StreamedCalls streamed;
    streamed.add(first);
    streamed.add(more);
    EXPECT_EQ(streamed.arguments.at(0), R"({"x":1)");
    const json done = json::parse(R"({"type":"done","id":"x","tokens":[1,2],"text":"","finish_reason":"tool_calls",
        "tool_calls":[{"id":"abcDEF123","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}},
                      {"id":"ghiJKL456","type":"function","function":{"name":"g","arguments":"{}"}}],
        "usage":{"prompt_tokens":3,"completion_tokens":2},"timings":{}})");
    const std::string events = finish_chunk(Endpoint::Chat, r, done, streamed);
    const size_t split = events.find("\n\ndata: ");
    ASSERT_NE(split, std::string::npos) << events;
    const json rest = json::parse(events.substr(6, split - 6))["choices"][0]["delta"]["tool_calls"];
    ASSERT_EQ(rest.size(), 2u) << rest;
    EXPECT_EQ(rest[0], json::parse(R"({"index":0,"function":{"arguments":"}"}})"));   // the rest of the first
    EXPECT_EQ(rest[1]["index"], 1);                                                    // the second, whole
    EXPECT_EQ(rest[1]["id"], "ghiJKL456");
    EXPECT_EQ(rest[1]["function"]["arguments"], "{}");
    // frames it cannot read are passed over, never thrown on; a delta for a call not next is ignored
    StreamedCalls odd;
    odd.add(json::parse(R"([1, {"index": "0"}, {"index": -1}, {"index": 5, "id": "x"}, {"index": 0, "function": "f"}])"));
    EXPECT_EQ(odd.ids.size(), 1u);
    EXPECT_EQ(odd.arguments.at(0), "");
    // all of it streamed: nothing before the finishing chunk
    streamed.add(json::parse(R"([{"index":0,"function":{"arguments":"}"}},{"index":1,"id":"ghiJKL456","function":{"name":"g","arguments":"{}"}}])"));
    const std::string end = finish_chunk(Endpoint::Chat, r, done, streamed);
    EXPECT_EQ(end.find("tool_calls\":["), std::string::npos) << end;
}

TEST(OpenAi, ChatRefusals) {
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[{"role":"function","content":"x"}]})").param, "messages[0].role");
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})").param,
              "messages[0].content[0].type");
    EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt":"x","tools":[{"type":"function"}]})").param, "tools");   // chat only
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"regex"}})").param,
              "response_format.type");
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"max_tokens":3,"max_completion_tokens":4})").status, 400);
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[]})").param, "messages");
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"prompt":"x"})").param, "prompt");   // not a chat field
    EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages":[{"role":"user"}]})").param, "messages[0].content");
}

TEST(OpenAi, MalformedBodies) {
    EXPECT_NE(error_of(Endpoint::Completions, "{prompt: 1}").message.find("invalid JSON"), std::string::npos);
    EXPECT_NE(error_of(Endpoint::Completions, R"({"prompt":"a","prompt":"b"})").message.find("duplicate field 'prompt'"), std::string::npos);
    EXPECT_NE(error_of(Endpoint::Completions, "[1]").message.find("must be a JSON object"), std::string::npos);
    EXPECT_EQ(error_of(Endpoint::Completions, std::string(5000, ' ')).status, 413);
    EXPECT_EQ(error_of(Endpoint::Completions, "{\"prompt\":\"\xff\"}").status, 400);
}

TEST(OpenAi, ProtocolErrorsBecomeHttpStatuses) {
    using protocol::ErrorCode;
    const HttpError busy = from_protocol_error(ErrorCode::Busy, "queue full");
    EXPECT_EQ(busy.status, 503);
    EXPECT_EQ(from_protocol_error(ErrorCode::TooLong, "prompt too long").code, "context_length_exceeded");
    EXPECT_EQ(from_protocol_error(ErrorCode::TooLarge, "big").status, 413);
    EXPECT_EQ(from_protocol_error(ErrorCode::Internal, "oops").status, 500);
    const HttpError ids = from_protocol_error(ErrorCode::BadRequest, "field 'prompt_ids[2]': expected an integer in [0, 9], got 12",
                                              {{"prompt_ids", "prompt"}});
    EXPECT_EQ(ids.message, "field 'prompt[2]': expected an integer in [0, 9], got 12");
    EXPECT_EQ(ids.param, "prompt[2]");
    // a schema sent in response_format is named there
    auto t = translate(Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{}}}})",
                       defaults());
    ASSERT_TRUE(std::holds_alternative<Translated>(t));
    const HttpError s = from_protocol_error(ErrorCode::BadRequest, "field 'json_schema': json_schema at /: 'pattern' is not supported",
                                            std::get<Translated>(t).renames);
    EXPECT_EQ(s.param, "response_format.json_schema.schema");
    EXPECT_EQ(s.message, "field 'response_format.json_schema.schema': json_schema at /: 'pattern' is not supported");
}

TEST(OpenAi, ReplyShapes) {
    const Reply r{"chatcmpl-1", "tiny", 1700000000};
    const json done = {{"text", "Hi there"}, {"finish_reason", "eos"}, {"usage", {{"prompt_tokens", 5}, {"completion_tokens", 3}}}};
    const json whole = json::parse(completion_body(Endpoint::Chat, r, done));
    EXPECT_EQ(whole["object"], "chat.completion");
    EXPECT_EQ(whole["choices"][0]["message"], json({{"role", "assistant"}, {"content", "Hi there"}}));
    EXPECT_EQ(whole["choices"][0]["finish_reason"], "stop");   // eos is OpenAI's "stop"
    EXPECT_EQ(whole["usage"], json({{"prompt_tokens", 5}, {"completion_tokens", 3}, {"total_tokens", 8}}));

    const std::string first = text_chunk(Endpoint::Chat, r, "Hi", true);
    ASSERT_EQ(first.rfind("data: ", 0), 0u);
    ASSERT_EQ(first.substr(first.size() - 2), "\n\n");
    const json c = json::parse(first.substr(6));
    EXPECT_EQ(c["object"], "chat.completion.chunk");
    EXPECT_EQ(c["choices"][0]["delta"], json({{"role", "assistant"}, {"content", "Hi"}}));
    EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null());

    const json fin = json::parse(finish_chunk(Endpoint::Chat, r, json({{"finish_reason", "length"}})).substr(6));
    EXPECT_EQ(fin["choices"][0]["delta"], json::object());
    EXPECT_EQ(fin["choices"][0]["finish_reason"], "length");

    const json text = json::parse(completion_body(Endpoint::Completions, {"cmpl-1", "tiny", 1}, done));
    EXPECT_EQ(text["object"], "text_completion");
    EXPECT_EQ(text["choices"][0]["text"], "Hi there");
    const json usage = json::parse(usage_chunk(Endpoint::Completions, r, done).substr(6));
    EXPECT_TRUE(usage["choices"].empty());
    EXPECT_EQ(usage["usage"]["total_tokens"], 8);
    EXPECT_EQ(json::parse(error_body({400, "invalid_request_error", "bad", "n", {}})),
              json({{"error", {{"message", "bad"}, {"type", "invalid_request_error"}, {"param", "n"}, {"code", nullptr}}}}));
}

} // namespace
} // namespace moesh::openai
