// Tool calls: split from the text, held back while streaming, forced, in every format read;
// against what the real templates write for an assistant's calls
// (tests/fixtures/chat_templates/tool_calls.json, scripts/make_tool_call_fixtures.py).
#include "runtime/tool_calls.h"

#include "runtime/grammar.h"
#include "runtime/reasoning.h"
#include "jinja_fixture.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>

namespace moesh {
namespace {

using ojson = nlohmann::ordered_json;

const ojson & calls_fixture() {
    static const ojson doc = [] {
        std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/chat_templates/tool_calls.json");
        return ojson::parse(in);
    }();
    return doc;
}

constexpr ToolCallFormat k_formats[] = {ToolCallFormat::Hermes,      ToolCallFormat::Llama3,      ToolCallFormat::Mistral,
                                        ToolCallFormat::MistralArgs, ToolCallFormat::DeepSeekV31, ToolCallFormat::DeepSeekR1,
                                        ToolCallFormat::KimiK2,      ToolCallFormat::Harmony,     ToolCallFormat::QwenXml,
                                        ToolCallFormat::GlmXml,      ToolCallFormat::MiniMaxXml,  ToolCallFormat::DsmlV32,
                                        ToolCallFormat::DsmlV4};

ToolCallFormat format_named(const std::string & name) {
    for (ToolCallFormat f : k_formats)
        if (tool_call_format_name(f) == name) return f;
    ADD_FAILURE() << "no format " << name;
    return ToolCallFormat::None;
}

// The part of a fixture text the calls are read from: after a <think> block the template writes
// (or closes: its generation prompt opened it).
std::string_view answer_part(const std::string & tmpl, ToolCallFormat f, std::string_view text) {
    if (f == ToolCallFormat::Harmony || !template_reasons(tmpl)) return text;
    const bool inside = text.find("</think>") != std::string_view::npos && text.find("<think>") == std::string_view::npos;
    return text.substr(std::min(text.size(), split_reasoning(text, inside, true).content_begin));
}

std::string_view rtrim(std::string_view s) {
    while (!s.empty() && (s.back() == ' ' || s.back() == '\n')) s.remove_suffix(1);
    return s;
}

TEST(ToolCalls, FormatIsKnownFromTheTemplate) {
    for (const auto & t : calls_fixture()["templates"])
        EXPECT_EQ(tool_call_format_name(tool_call_format(t["template"].get<std::string>())), t["format"].get<std::string>()) << t["name"];
    // templates whose calls are not read: XML parameters, their own formats, no tools
    for (const char * name : {"HuggingFaceTB-SmolLM3-3B", "google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct"})
        EXPECT_EQ(tool_call_format(test::fixture_template(name)), ToolCallFormat::None) << name;
}

// What each real template writes for an assistant's calls reads back as the same calls, and
// streaming it never shows part of a call as content.
TEST(ToolCalls, WhatRealTemplatesWriteReadsBack) {
    int n = 0;
    for (const auto & t : calls_fixture()["templates"]) {
        const std::string tmpl = t["template"];
        const ToolCallFormat f = format_named(t["format"]);
        for (const auto & c : t["cases"]) {
            const std::string text = c["text"];
            const std::string_view answer = answer_part(tmpl, f, text);
            const ParsedOutput out = parse_tool_calls(f, answer, calls_fixture()["tools"].dump());
            SCOPED_TRACE(t["name"].get<std::string>() + ": " + text);
            EXPECT_EQ(rtrim(out.content), c["content"].get<std::string>());
            ASSERT_EQ(out.calls.size(), c["calls"].size());
            for (size_t i = 0; i < out.calls.size(); ++i) {
                EXPECT_EQ(out.calls[i].name, c["calls"][i]["name"]);
                EXPECT_EQ(ojson::parse(out.calls[i].arguments).dump(), c["calls"][i]["arguments"].dump());
            }
            if (f == ToolCallFormat::Harmony) {   // calls are messages of their own, never content
                for (size_t k = 0; k <= answer.size(); ++k)
                    ASSERT_EQ(split_harmony(answer.substr(0, k), false).content_certain, 0u) << "at " << k;
            } else {
                for (size_t k = 0; k <= answer.size(); ++k) {
                    const std::string_view part = answer.substr(0, k);
                    const size_t safe = tool_call_safe_prefix(f, part);
                    ASSERT_LE(safe, out.content.size()) << "at " << k;
                    ASSERT_EQ(out.content.compare(0, safe, part.substr(0, safe)), 0) << "at " << k;
                }
            }
            ++n;
        }
    }
    EXPECT_GE(n, 56);
}

// Streaming calls as they are written: at every cut of what the real templates write, the calls
// begun so far are the final calls' names with a start of their arguments, each cut's a start of
// the next one's, and one byte before the end every call's arguments are there but for their close.
TEST(ToolCalls, StreamedCallsGrowIntoTheCalls) {
    const std::string tools = calls_fixture()["tools"].dump();
    for (const auto & t : calls_fixture()["templates"]) {
        const ToolCallFormat f = format_named(t["format"]);
        for (const auto & c : t["cases"]) {
            const std::string text = c["text"];
            const std::string_view answer = answer_part(t["template"], f, text);
            const ParsedOutput out = parse_tool_calls(f, answer, tools);
            SCOPED_TRACE(t["name"].get<std::string>() + ": " + text);
            std::vector<PartialCall> last;
            for (size_t k = 0; k <= answer.size(); ++k) {
                const std::vector<PartialCall> now = tool_call_prefix(f, answer.substr(0, k), tools);
                ASSERT_LE(now.size(), out.calls.size()) << "at " << k;
                ASSERT_GE(now.size(), last.size()) << "at " << k;
                for (size_t i = 0; i < now.size(); ++i) {
                    ASSERT_EQ(now[i].name, out.calls[i].name) << "at " << k;
                    ASSERT_EQ(out.calls[i].arguments.compare(0, now[i].arguments.size(), now[i].arguments), 0)
                        << "at " << k << ": " << now[i].arguments;
                    if (i < last.size()) {
                        ASSERT_EQ(now[i].arguments.compare(0, last[i].arguments.size(), last[i].arguments), 0) << "at " << k;
                    }
                }
                if (k + 1 == answer.size()) {   // (a name that ends at the call's close is known with it)
                    ASSERT_GE(now.size() + 1, out.calls.size());
                    for (size_t i = 0; i < now.size(); ++i) {
                        EXPECT_GE(now[i].arguments.size() + 1, out.calls[i].arguments.size()) << i;
                    }
                }
                last = now;
            }
            ASSERT_EQ(last.size(), out.calls.size());
            for (size_t i = 0; i < last.size(); ++i) EXPECT_EQ(last[i].arguments, out.calls[i].arguments);
        }
    }
}

TEST(ToolCalls, StreamedArgumentsHoldBackWhatMayStillChange) {
    auto args = [](ToolCallFormat f, std::string_view text, std::string_view tools = {}) {
        const std::vector<PartialCall> p = tool_call_prefix(f, text, tools);
        return p.empty() ? std::string("(none)") : p.back().name + " " + p.back().arguments;
    };
    const auto h = ToolCallFormat::Hermes;
    EXPECT_EQ(args(h, "Sure. <tool_call>\n{\"name\": \"get_wea"), "(none)");   // the name may grow
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"argu"), "f ");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": 12"), "f {");   // 12 may be 123
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": 12, \"s\": \"ab"), "f {\"n\":12,\"s\":\"ab");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": tr"), "f {");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": true"), "f {");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": true}"), "f {\"n\":true}");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\\"), "f {\"s\":\"a");   // half an escape
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\\u00e"), "f {\"s\":\"a");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\\ud83d\\ude0"), "f {\"s\":\"a");   // half a pair
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\\ud83d\\ude00"), "f {\"s\":\"a\xf0\x9f\x98\x80");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\xe6\x97"), "f {\"s\":\"a");   // half a character
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a\\\"b\\n"), "f {\"s\":\"a\\\"b\\n");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"l\": [1, \"x"), "f {\"l\":[1,\"x");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"l\": [1, 2"), "f {\"l\":[1");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"o\": {\"k\": \"\"}, \"p\""), "f {\"o\":{\"k\":\"\"}");
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1,, "), "(none)");   // not JSON: nothing
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\""), "g ");
    // a text that spells the mark changes nothing
    EXPECT_EQ(args(h, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"~moesh~ \\u007emoesh\\u007e"), "(none)");
    // XML: text values come as written; others whole; a tail that may be the close is held back
    const std::string tools = R"([{"type": "function", "function": {"name": "write", "parameters": {"type": "object",
        "properties": {"path": {"type": "string"}, "mode": {"type": "integer"}, "text": {"type": "string"}}}}}])";
    const auto q = ToolCallFormat::QwenXml;
    EXPECT_EQ(args(q, "<tool_call>\n<function=wri", tools), "(none)");
    EXPECT_EQ(args(q, "<tool_call>\n<function=write>\n<parameter=path>\n/tmp/a.txt\n</param", tools), "write {\"path\":\"/tmp/a.txt");
    EXPECT_EQ(args(q, "<tool_call>\n<function=write>\n<parameter=path>\na\n</parameter>\n<parameter=mode>\n64", tools), "write {\"path\":\"a\"");
    EXPECT_EQ(args(q, "<tool_call>\n<function=write>\n<parameter=mode>\n644\n</parameter>\n<parameter=text>\nline 1\nline 2\n", tools),
              "write {\"mode\":644,\"text\":\"line 1\\nline 2");
    EXPECT_EQ(args(ToolCallFormat::GlmXml, "<tool_call>write\n<arg_key>text</arg_key>\n<arg_value>x <b>\n</arg_val", tools),
              "write {\"text\":\"x <b>\\n");
    EXPECT_EQ(args(ToolCallFormat::DsmlV32,
                   "<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"write\">\n<｜DSML｜parameter name=\"text\" string=\"false\">\"ab", tools),
              "write {");
    EXPECT_EQ(args(ToolCallFormat::Harmony, "<|channel|>commentary to=functions.write <|constrain|>json<|message|>{\"path\": \"a.t<|ca"),
              "write {\"path\":\"a.t");
    EXPECT_EQ(args(ToolCallFormat::Mistral, "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}, {\"name\": \"g\", \"arguments\": {\"x\": \"y"),
              "g {\"x\":\"y");
    // nesting past what is read: nothing, and no crash
    EXPECT_EQ(args(h, "<tool_call>{\"name\": \"f\", \"arguments\": " + std::string(100000, '[')), "(none)");
}

TEST(ToolCalls, SplitsContentAndCalls) {
    const auto out = parse_tool_calls(ToolCallFormat::Hermes,
                                      "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": [1, 2]}}\n</tool_call>\n"
                                      "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>");
    EXPECT_EQ(out.content, "Let me look.\n");
    ASSERT_EQ(out.calls.size(), 2u);
    EXPECT_EQ(out.calls[0].name, "get_weather");
    EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris","n":[1,2]})");   // key order kept
    EXPECT_EQ(out.calls[1].name, "now");
    EXPECT_EQ(out.calls[1].arguments, "{}");
    // the model may end inside its last call, after a whole JSON object
    EXPECT_EQ(parse_tool_calls(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {}}").calls.size(), 1u);
}


// A model that calls, then says more: the calls, and the text before and after them as content
// (streamed, the calls as they are written stay calls).
TEST(ToolCalls, TextAfterTheCallsIsContent) {
    const std::string text = "Checking.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\nLet me know.";
    const ParsedOutput out = parse_tool_calls(ToolCallFormat::Hermes, text);
    ASSERT_EQ(out.calls.size(), 1u);
    EXPECT_EQ(out.content, "Checking.\nLet me know.");
    for (size_t k = 0; k <= text.size(); ++k) {   // never a call that goes away
        const std::vector<PartialCall> p = tool_call_prefix(ToolCallFormat::Hermes, std::string_view(text).substr(0, k));
        if (k >= text.find("</tool_call>") + 12) {
            ASSERT_EQ(p.size(), 1u) << "at " << k;
        }
    }
    const ParsedOutput glm = parse_tool_calls(ToolCallFormat::GlmXml, "<tool_call>f\n</tool_call>\nDone.");
    EXPECT_EQ(glm.calls.size(), 1u);
    EXPECT_EQ(glm.content, "Done.");
    // Llama 3's reply is the call: JSON followed by words is words
    EXPECT_TRUE(parse_tool_calls(ToolCallFormat::Llama3, "{\"name\": \"f\", \"parameters\": {}} is what I would call").calls.empty());
}

// A model that calls, says something, and calls again: both calls, the words between are content, and
// streaming sees the second call as it is written. Every format whose calls may be followed by text.
TEST(ToolCalls, CallsTextAndMoreCalls) {
    const std::string tools = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer"}}}}}, {"type": "function", "function": {"name": "g", "parameters":
        {"type": "object", "properties": {"b": {"type": "string"}}}}}])";
    for (ToolCallFormat f : {ToolCallFormat::Hermes, ToolCallFormat::Mistral, ToolCallFormat::MistralArgs, ToolCallFormat::DeepSeekV31,
                             ToolCallFormat::KimiK2, ToolCallFormat::QwenXml, ToolCallFormat::GlmXml, ToolCallFormat::MiniMaxXml,
                             ToolCallFormat::DsmlV32, ToolCallFormat::DsmlV4}) {
        SCOPED_TRACE(std::string(tool_call_format_name(f)));
        const std::string first = write_tool_call(f, "f", R"({"a":1})"), second = write_tool_call(f, "g", R"({"b":"x y"})");
        const std::string text = "Checking.\n" + first + "\nAnd the other one:\n" + second + "\nDone.";
        const ParsedOutput out = parse_tool_calls(f, text, tools);
        ASSERT_EQ(out.calls.size(), 2u) << text;
        EXPECT_EQ(out.calls[0].name, "f");
        EXPECT_EQ(out.calls[0].arguments, R"({"a":1})");
        EXPECT_EQ(out.calls[1].name, "g");
        EXPECT_EQ(out.calls[1].arguments, R"({"b":"x y"})");
        EXPECT_EQ(out.content.find("<"), std::string::npos) << "no markup in the content: " << out.content;
        EXPECT_NE(out.content.find("And the other one:"), std::string::npos) << out.content;
        EXPECT_NE(out.content.find("Done."), std::string::npos) << out.content;
        size_t most = 0;
        for (size_t k = 0; k <= text.size(); ++k) {   // calls only grow, each a start of the final one
            const std::vector<PartialCall> p = tool_call_prefix(f, std::string_view(text).substr(0, k), tools);
            ASSERT_GE(p.size(), most) << "at " << k;
            ASSERT_LE(p.size(), 2u) << "at " << k;
            for (size_t i = 0; i < p.size(); ++i) {
                EXPECT_EQ(p[i].name, out.calls[i].name) << "at " << k;
                EXPECT_EQ(out.calls[i].arguments.rfind(p[i].arguments, 0), 0u) << "at " << k << ": " << p[i].arguments;
            }
            most = p.size();
        }
        EXPECT_EQ(most, 2u);
        // a later run that is not well formed stays content; the calls before it stand
        const ParsedOutput cut = parse_tool_calls(f, "Checking.\n" + first + "\nAnd:\n" + second.substr(0, second.size() / 2), tools);
        EXPECT_EQ(cut.calls.size(), 1u);
    }
}

TEST(ToolCalls, StreamingHoldsBackWhatMayBecomeACall) {
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello"), 5u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello <tool"), 6u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello <tool_call>{\"na"), 6u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "a < b"), 5u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "<"), 0u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::None, "Hello <tool"), 11u);
}

TEST(ToolCalls, MalformedCallsStayText) {
    const std::pair<ToolCallFormat, const char *> cases[] = {
        {ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": </tool_call>"},   // not JSON
        {ToolCallFormat::Hermes, "<tool_call>{\"arguments\": {}}</tool_call>"},                          // no name
        {ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": \"x\"}</tool_call>"},      // arguments not an object
        // a key twice: which one counts differs between readers, and streaming has sent the first
        {ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": {\"c\": 2, \"c\": 3}}}</tool_call>"},
        {ToolCallFormat::GlmXml, "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"},
        {ToolCallFormat::Llama3, "{\"name\": \"f\"}"},                                    // no parameters
        {ToolCallFormat::Llama3, "{\"name\": \"f\", \"parameters\": {}} is what I would call"},
        {ToolCallFormat::Llama3, "{\"answer\": 42}"},                                     // JSON, not a call
        {ToolCallFormat::Llama3, "{\"name\": \"f\", \"parameters\": {\"x\": 1}, \"arguments\": {\"y\": 2}}"},   // which?
        {ToolCallFormat::Mistral, "[TOOL_CALLS]{\"name\": \"f\", \"arguments\": [1]}"},
        {ToolCallFormat::Mistral, "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}"},   // cut short
        {ToolCallFormat::MistralArgs, "[TOOL_CALLS]f{\"x\": 1}"},                         // no [ARGS]
        {ToolCallFormat::MistralArgs, "[TOOL_CALLS]two words[ARGS]{}"},                   // not a name
        {ToolCallFormat::DeepSeekV31, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f{\"x\": 1}<｜tool▁call▁end｜>"},
        {ToolCallFormat::DeepSeekR1, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{}\n<｜tool▁call▁end｜>"},
        {ToolCallFormat::KimiK2, "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0{}<|tool_call_end|>"},
        {ToolCallFormat::QwenXml, "<tool_call>\n<function=f>\n<parameter=x>\n1\n</tool_call>"},   // a parameter not closed
        {ToolCallFormat::QwenXml, "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"},   // Hermes' JSON
        {ToolCallFormat::GlmXml, "<tool_call>f\n<arg_key>x</arg_key>\n</tool_call>"},             // a key without a value
        {ToolCallFormat::MiniMaxXml, "<minimax:tool_call>\n<invoke name=\"f\">\n<parameter name=\"x\">1</invoke>"},
        {ToolCallFormat::DsmlV4, "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" string=\"true\">1\n</｜DSML｜invoke>"},
        {ToolCallFormat::DsmlV32, "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"},   // V4's block
        {ToolCallFormat::None, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"},
    };
    for (const auto & [f, text] : cases) {
        const auto out = parse_tool_calls(f, text);
        EXPECT_TRUE(out.calls.empty()) << text;
        EXPECT_EQ(out.content, text);
    }
    // harmony: a message to functions.* whose body is not an object stays the model's words
    const auto h = parse_tool_calls(ToolCallFormat::Harmony, "<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json");
    EXPECT_TRUE(h.calls.empty());
    EXPECT_EQ(h.content, "not json");
}

// XML values are text: a string stays text, other types are read as JSON or as Python's str().
TEST(ToolCalls, XmlValuesTakeTheirSchemasTypes) {
    const std::string tools = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string"}, "i": {"type": "integer"}, "b": {"type": "boolean"}, "n": {"type": ["number", "null"]},
        "o": {"type": "object"}, "any": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}}}}])";
    const std::string text = "<tool_call>\n<function=f>\n<parameter=s>\n007\n</parameter>\n<parameter=i>\n7\n</parameter>\n"
                             "<parameter=b>\nTrue\n</parameter>\n<parameter=n>\nNone\n</parameter>\n<parameter=o>\n{\"k\": [1]}\n</parameter>\n"
                             "<parameter=any>\n12\n</parameter>\n<parameter=other>\n3\n</parameter>\n</function>\n</tool_call>";
    const auto out = parse_tool_calls(ToolCallFormat::QwenXml, text, tools);
    ASSERT_EQ(out.calls.size(), 1u);
    EXPECT_EQ(out.calls[0].arguments, R"({"s":"007","i":7,"b":true,"n":null,"o":{"k":[1]},"any":12,"other":"3"})");
    // not of its type: kept as the text it is
    const auto odd = parse_tool_calls(ToolCallFormat::GlmXml, "<tool_call>f\n<arg_key>i</arg_key>\n<arg_value>seven</arg_value>\n</tool_call>", tools);
    ASSERT_EQ(odd.calls.size(), 1u);
    EXPECT_EQ(odd.calls[0].arguments, R"({"i":"seven"})");
}

TEST(ToolCalls, HarmonyCallsAfterReasoning) {
    const std::string reply = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                              "to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}";
    const HarmonySplit h = split_harmony(reply, true);
    EXPECT_EQ(h.reasoning, "Need the weather.");
    EXPECT_EQ(h.content, "");
    const auto out = parse_tool_calls(ToolCallFormat::Harmony, reply);
    ASSERT_EQ(out.calls.size(), 1u);
    EXPECT_EQ(out.calls[0].name, "get_weather");
    EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris"})");
}

// Byte tokens: the grammar's matcher then checks plain text.
bool grammar_matches(const std::string & grammar, const std::string & text) {
    std::string why;
    auto g = Grammar::parse(grammar, &why);
    EXPECT_TRUE(g) << why;
    if (!g) return false;
    std::vector<std::string> pieces;
    for (int b = 0; b < 256; ++b) pieces.emplace_back(1, char(b));
    pieces.emplace_back();   // 256: the end token
    GrammarMatcher m(g, std::make_shared<const GrammarVocab>(std::move(pieces)), {256});
    for (char c : text)
        if (!m.accept(uint8_t(c))) return false;
    return m.can_end();
}

const std::string k_tools = R"([
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}])";

std::string forced(ToolCallFormat f, const std::string & tools, const std::string & only, std::string * why,
                   const std::function<int32_t(std::string_view)> & special_id = {}) {
    return force_tool_call(f, tools, only, special_id, why);
}

TEST(ToolCalls, ARequiredHermesCallIsAGrammar) {
    std::string why;
    const std::string any = forced(ToolCallFormat::Hermes, k_tools, "", &why);
    ASSERT_FALSE(any.empty()) << why;
    EXPECT_TRUE(grammar_matches(any, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"));
    EXPECT_TRUE(grammar_matches(any, "<tool_call>\n{\"name\": \"now\", \"arguments\": {\"x\": 1}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"unit\": \"celsius\"}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "Sure! <tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));
    const std::string one = forced(ToolCallFormat::Hermes, k_tools, "now", &why);
    ASSERT_FALSE(one.empty()) << why;
    EXPECT_FALSE(grammar_matches(one, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"));
    EXPECT_TRUE(grammar_matches(one, "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));

    const std::string bad = R"([{"type": "function", "function": {"name": "a"}},
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}])";
    EXPECT_TRUE(forced(ToolCallFormat::Hermes, bad, "", &why).empty());
    EXPECT_EQ(why.rfind("tools[1].function.parameters at /properties/x: 'pattern' is not supported", 0), 0u) << why;
    EXPECT_TRUE(forced(ToolCallFormat::DeepSeekV31, bad, "", &why).empty());
    EXPECT_EQ(why.rfind("tools[1].function.parameters at /properties/x: 'pattern' is not supported", 0), 0u) << why;
    EXPECT_TRUE(forced(ToolCallFormat::Hermes, k_tools, "other", &why).empty());
    EXPECT_EQ(why, "tool_choice: no such tool 'other'");
    EXPECT_TRUE(forced(ToolCallFormat::None, k_tools, "", &why).empty());
}

// A forced call's arguments follow the tool's own schema: "#" is its parameters (not a wrapper),
// $defs resolve, and in the XML formats non-string values follow their schemas as JSON.
TEST(ToolCalls, AForcedCallFollowsEachToolsOwnSchema) {
    const std::string tools = R"([{"type": "function", "function": {"name": "tree", "parameters": {"type": "object",
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}},
        "required": ["v"], "$defs": {"leaf": {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}}}}])";
    std::string why;
    for (ToolCallFormat f : {ToolCallFormat::Hermes, ToolCallFormat::QwenXml}) {
        SCOPED_TRACE(std::string(tool_call_format_name(f)));
        const std::string g = forced(f, tools, "", &why);
        ASSERT_FALSE(g.empty()) << why;
        const std::string good = write_tool_call(f, "tree", R"({"v": 7, "kids": [{"n": 1}, {"n": 2}]})");
        EXPECT_TRUE(grammar_matches(g, good)) << good << "\n" << g;
        for (const char * bad : {R"({"v": 07})", R"({"v": 7, "kids": [{"n": 3}]})", R"({"v": 7, "kids": [{"n": 1}, {"n": 1}, {"n": 1}]})"})
            EXPECT_FALSE(grammar_matches(g, write_tool_call(f, "tree", bad))) << bad;
        const ParsedOutput out = parse_tool_calls(f, good, tools);
        ASSERT_EQ(out.calls.size(), 1u);
        EXPECT_EQ(out.calls[0].arguments, R"({"v":7,"kids":[{"n":1},{"n":2}]})");
    }
    // what an XML format cannot write or hold is refused, naming the place
    const std::string pattern = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"s": {"type": "string", "pattern": "a+"}}}}}])";
    EXPECT_TRUE(forced(ToolCallFormat::GlmXml, pattern, "", &why).empty());
    EXPECT_EQ(why, "tools[0].function.parameters at /properties/s: 'pattern' is not supported in this model's call format (its strings are plain text)");
    const std::string key = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"a<b": {"type": "string"}}}}}])";
    EXPECT_TRUE(forced(ToolCallFormat::MiniMaxXml, key, "", &why).empty());
    EXPECT_EQ(why, "tools[0].function.parameters at /properties/a<b: a name this model's call format cannot write");
}

// Model output nested past any sensible depth is text, not a call (writing it back would recurse).
TEST(ToolCalls, DeeplyNestedArgumentsAreNotACall) {
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    const std::string tools = R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"x": {"type": "array"}}}}}])";
    for (const std::string & text : {"<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"a\": " + deep + "}",
                                     "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": " + deep + "}\"}</tool_call>",
                                     "<tool_call>\n<function=f>\n<parameter=x>\n" + deep + "\n</parameter>\n</function>\n</tool_call>"}) {
        for (ToolCallFormat f : k_formats) {   // (before: a crash in writing the arguments back)
            const ParsedOutput out = parse_tool_calls(f, text, tools);
            for (const ParsedCall & c : out.calls) {   // only the XML value, as the text it is
                EXPECT_EQ(f, ToolCallFormat::QwenXml);
                EXPECT_EQ(c.arguments, "{\"x\":\"" + deep + "\"}");
            }
        }
    }
}

// Long hostile outputs are read in one pass (before: a search to the end of the text per call,
// 20-30 s for these 1-1.4 MB).
TEST(ToolCalls, ManyCallsAreReadInOnePass) {
    std::string mistral, glm;
    for (int i = 0; i < 50000; ++i) mistral += "[TOOL_CALLS]a[ARGS]{}";
    for (int i = 0; i < 60000; ++i) glm += "<tool_call>a</tool_call>";
    EXPECT_EQ(parse_tool_calls(ToolCallFormat::MistralArgs, mistral).calls.size(), 50000u);
    EXPECT_EQ(parse_tool_calls(ToolCallFormat::GlmXml, glm).calls.size(), 60000u);
    std::string harmony;   // many short messages: split_harmony finds each end in one pass
    for (int i = 0; i < 50000; ++i) harmony += "<|start|>assistant<|channel|>final<|message|>x<|end|>";
    EXPECT_EQ(split_harmony(harmony.substr(std::string("<|start|>assistant").size()), true).content.size(), 50000u + 2 * 49999u);
}

// The text a forced call may take, as tokens: the format's markers as special tokens (ids from 257
// on, no text) where `specials`, every other byte as its byte token.
std::vector<int32_t> tokens_of(ToolCallFormat f, const std::string & text, bool specials) {
    std::vector<std::string_view> markers = tool_call_markers(f);
    std::vector<int32_t> out;
    for (size_t i = 0; i < text.size();) {
        bool marker = false;
        for (size_t m = 0; m < markers.size() && specials; ++m)
            if (text.compare(i, markers[m].size(), markers[m]) == 0) {
                out.push_back(257 + int32_t(m));
                i += markers[m].size();
                marker = true;
                break;
            }
        if (!marker) out.push_back(uint8_t(text[i++]));
    }
    return out;
}

// In every format a forced call is one grammar, for one tool or several; what a model held by it
// writes reads back as the call, with the markers as text or as special tokens.
TEST(ToolCalls, AForcedCallIsOneGrammarInEveryFormat) {
    const std::string args = "{\"city\": \"Paris\", \"unit\": \"celsius\"}";
    for (ToolCallFormat f : k_formats) {
        for (bool specials : {false, true}) {
            SCOPED_TRACE(std::string(tool_call_format_name(f)) + (specials ? ", markers as special tokens" : ", markers as text"));
            const std::vector<std::string_view> markers = tool_call_markers(f);
            auto special_id = [&](std::string_view m) -> int32_t {
                for (size_t k = 0; k < markers.size(); ++k)
                    if (specials && markers[k] == m) return 257 + int32_t(k);
                return -1;
            };
            std::vector<std::string> pieces(257 + markers.size());   // bytes, 256 the end, then the markers (special)
            for (int b = 0; b < 256; ++b) pieces[size_t(b)] = std::string(1, char(b));
            const auto vocab = std::make_shared<const GrammarVocab>(std::move(pieces));
            for (const std::string only : {"get_weather", ""}) {
                std::string why;
                const std::string g = forced(f, k_tools, only, &why, special_id);
                ASSERT_FALSE(g.empty()) << why;
                auto grammar = Grammar::parse(g, &why);
                ASSERT_TRUE(grammar) << why << "\n" << g;
                // what a model writes: the call as the format shows it
                std::string written = write_tool_call(f, "get_weather", args);
                if (f == ToolCallFormat::Harmony) written.resize(written.size() - std::string("<|call|>").size());   // ends the turn
                GrammarMatcher m(grammar, vocab, {256});
                bool ok = true;
                for (int32_t t : tokens_of(f, written, specials)) ok = ok && m.accept(t);
                EXPECT_TRUE(ok && m.can_end()) << written << "\n" << g;
                const ParsedOutput out = parse_tool_calls(f, written, k_tools);
                ASSERT_EQ(out.calls.size(), 1u) << written;
                EXPECT_EQ(out.calls[0].name, "get_weather");
                EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris","unit":"celsius"})");
                EXPECT_EQ(out.content, "");
                // the other tool too, unless the choice named one
                std::string other = write_tool_call(f, "now", "{}");
                if (f == ToolCallFormat::Harmony) other.resize(other.size() - std::string("<|call|>").size());
                GrammarMatcher m2(grammar, vocab, {256});
                bool ok2 = true;
                for (int32_t t : tokens_of(f, other, specials)) ok2 = ok2 && m2.accept(t);
                EXPECT_EQ(ok2 && m2.can_end(), only.empty()) << other;
            }
        }
    }
}

// What the model is shown (write_tool_call, in tools_system_prompt for templates that do not show
// tools) is what the parser reads.
TEST(ToolCalls, TheShownCallFormatReadsBack) {
    for (ToolCallFormat f : k_formats) {
        SCOPED_TRACE(std::string(tool_call_format_name(f)));
        const std::string call = write_tool_call(f, "get_weather", R"({"city": "Paris"})");
        const ParsedOutput out = parse_tool_calls(f, call);
        ASSERT_EQ(out.calls.size(), 1u) << call;
        EXPECT_EQ(out.calls[0].name, "get_weather");
        EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris"})");
        const std::string shown = tools_system_prompt(f, k_tools);
        EXPECT_NE(shown.find(write_tool_call(f, "tool_name", R"({"argument": "value"})")), std::string::npos) << shown;
        EXPECT_NE(shown.find(R"({"name":"get_weather","parameters":{"type":"object")"), std::string::npos) << shown;
    }
}

} // namespace
} // namespace moesh
