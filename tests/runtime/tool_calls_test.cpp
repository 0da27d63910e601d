// Tool calls in the Hermes format: split from the text, held back while
// streaming, forced by a grammar, and the same format the real Qwen2.5
// template writes an assistant's calls in (tests/fixtures/chat_templates/jinja.json).
#include "runtime/tool_calls.h"

#include "runtime/chat_template.h"
#include "runtime/grammar.h"
#include "jinja_fixture.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>


namespace moesh {
namespace {

using ojson = nlohmann::ordered_json;

std::string template_text(const std::string & name) { return test::fixture_template(name); }

TEST(ToolCalls, FormatIsKnownFromTheTemplate) {
    EXPECT_EQ(tool_call_format(template_text("Qwen-Qwen2.5-7B-Instruct")), ToolCallFormat::Hermes);
    EXPECT_EQ(tool_call_format(template_text("Qwen-Qwen3-0.6B")), ToolCallFormat::Hermes);
    EXPECT_EQ(tool_call_format(template_text("NousResearch-Hermes-3-Llama-3.1-8B-tool_use")), ToolCallFormat::Hermes);
    EXPECT_EQ(tool_call_format(template_text("HuggingFaceTB-SmolLM3-3B")), ToolCallFormat::None);   // xml_tools, its own
    EXPECT_EQ(tool_call_format(template_text("Qwen3-Coder")), ToolCallFormat::None);   // XML parameters
    EXPECT_EQ(tool_call_format(template_text("meta-llama-Llama-3.1-8B-Instruct")), ToolCallFormat::None);
    EXPECT_EQ(tool_call_format(template_text("openai-gpt-oss-120b")), ToolCallFormat::None);
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

TEST(ToolCalls, MalformedCallsStayText) {
    for (const char * text : {"<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": </tool_call>",   // not JSON
                              "<tool_call>{\"arguments\": {}}</tool_call>",                          // no name
                              "<tool_call>{\"name\": \"f\", \"arguments\": \"x\"}</tool_call>",      // arguments not an object
                              "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> and then more words"}) {
        const auto out = parse_tool_calls(ToolCallFormat::Hermes, text);
        EXPECT_TRUE(out.calls.empty()) << text;
        EXPECT_EQ(out.content, text);
    }
    EXPECT_TRUE(parse_tool_calls(ToolCallFormat::None, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>").calls.empty());
}

TEST(ToolCalls, StreamingHoldsBackWhatMayBecomeACall) {
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello"), 5u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello <tool"), 6u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "Hello <tool_call>{\"na"), 6u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "a < b"), 5u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::Hermes, "<"), 0u);
    EXPECT_EQ(tool_call_safe_prefix(ToolCallFormat::None, "Hello <tool"), 11u);
}

// The calls the real template writes into a prompt read back as the same calls.
TEST(ToolCalls, WhatQwensTemplateWritesReadsBack) {
    const ChatTemplate t(template_text("Qwen-Qwen2.5-7B-Instruct"), "", "<|im_end|>");
    const ojson messages = ojson::parse(R"([{"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
            {"id": "b", "type": "function", "function": {"name": "now", "arguments": {}}}]}])");
    const std::string prompt = t.render(messages, false);
    const size_t from = prompt.find("<|im_start|>assistant\n") + std::string("<|im_start|>assistant\n").size();
    const std::string turn = prompt.substr(from, prompt.rfind("<|im_end|>") - from);
    const auto out = parse_tool_calls(ToolCallFormat::Hermes, turn);
    ASSERT_EQ(out.calls.size(), 2u) << turn;
    EXPECT_EQ(out.calls[0].name, "get_weather");
    EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris","unit":"celsius"})");
    EXPECT_EQ(out.calls[1].name, "now");
    EXPECT_EQ(out.content, "");
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

TEST(ToolCalls, ARequiredCallIsAGrammar) {
    const std::string tools = R"([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "now"}}])";
    std::string why;
    const std::string any = forced_tool_call_grammar(ToolCallFormat::Hermes, tools, "", &why);
    ASSERT_FALSE(any.empty()) << why;
    EXPECT_TRUE(grammar_matches(any, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"));
    EXPECT_TRUE(grammar_matches(any, "<tool_call>\n{\"name\":\"now\",\"arguments\":{\"x\": 1}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"unit\": \"celsius\"}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>"));
    EXPECT_FALSE(grammar_matches(any, "Sure! <tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));
    const std::string one = forced_tool_call_grammar(ToolCallFormat::Hermes, tools, "now", &why);
    ASSERT_FALSE(one.empty()) << why;
    EXPECT_FALSE(grammar_matches(one, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"));
    EXPECT_TRUE(grammar_matches(one, "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));
    // what a forced call writes, the parser reads
    EXPECT_EQ(parse_tool_calls(ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>").calls.size(), 1u);

    const std::string bad = R"([{"type": "function", "function": {"name": "a"}},
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}])";
    EXPECT_TRUE(forced_tool_call_grammar(ToolCallFormat::Hermes, bad, "", &why).empty());
    EXPECT_EQ(why.rfind("tools[1].function.parameters at /properties/x: 'pattern' is not supported", 0), 0u) << why;
    EXPECT_TRUE(forced_tool_call_grammar(ToolCallFormat::None, tools, "", &why).empty());
}

} // namespace
} // namespace moesh
