// <think> reasoning split from the answer: whole texts, growing texts (what is
// certain never changes), and prompts the real templates open a block in
// (tests/fixtures/chat_templates/jinja.json).
#include "runtime/reasoning.h"

#include "runtime/chat_template.h"
#include "jinja_fixture.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>


namespace moesh {
namespace {

using ojson = nlohmann::ordered_json;

struct Parts {
    std::string reasoning, answer;
    bool reasoned;
};

Parts split(std::string_view text, bool inside, bool final = true) {
    const ReasoningSplit s = split_reasoning(text, inside, final);
    return {std::string(text.substr(s.reasoning_begin, s.reasoning_end - s.reasoning_begin)), std::string(text.substr(s.content_begin)),
            s.reasoned};
}

TEST(Reasoning, SplitsAWholeText) {
    Parts p = split("<think>\nSix times seven.\n</think>\n\nIt is 42.", false);
    EXPECT_TRUE(p.reasoned);
    EXPECT_EQ(p.reasoning, "Six times seven.");
    EXPECT_EQ(p.answer, "It is 42.");
    p = split("Six times seven.</think>\n\nIt is 42.", true);   // the prompt opened the block
    EXPECT_EQ(p.reasoning, "Six times seven.");
    EXPECT_EQ(p.answer, "It is 42.");
    p = split("It is 42. <think>not this</think>", false);   // no block first: all answer
    EXPECT_FALSE(p.reasoned);
    EXPECT_EQ(p.reasoning, "");
    EXPECT_EQ(p.answer, "It is 42. <think>not this</think>");
    p = split("<think>\nstill thinking when max_tokens came\n", false);
    EXPECT_EQ(p.reasoning, "still thinking when max_tokens came");
    EXPECT_EQ(p.answer, "");
    p = split("<think>\n\n</think>\n\nHi", false);   // an empty block (Qwen3 without thinking writes one)
    EXPECT_TRUE(p.reasoned);
    EXPECT_EQ(p.reasoning, "");
    EXPECT_EQ(p.answer, "Hi");
    EXPECT_EQ(split("<thi", false).answer, "<thi");   // at the end, a marker's start is text
}

// Every prefix's certain parts are prefixes of the whole text's parts: what was streamed stays.
TEST(Reasoning, WhatIsCertainWhileGeneratingNeverChanges) {
    for (const auto & [text, inside] : std::vector<std::pair<std::string, bool>>{
             {"<think>\nA b  c.\n\n</think>\n\nThe answer </thin is here.", false},
             {"  <think>x</think>y", false},
             {"reason </ more </think> answer", true},
             {"<thinking about it", false},
             {"Plain answer, no block.", false}}) {
        const Parts whole = split(text, inside);
        for (size_t n = 0; n <= text.size(); ++n) {
            const Parts part = split(std::string_view(text).substr(0, n), inside, false);
            EXPECT_EQ(whole.reasoning.compare(0, part.reasoning.size(), part.reasoning), 0) << text << " at " << n << ": " << part.reasoning;
            EXPECT_EQ(whole.answer.compare(0, part.answer.size(), part.answer), 0) << text << " at " << n << ": " << part.answer;
        }
    }
}

// gpt-oss' channels (the markers come from its special tokens, decoded as text).
TEST(Reasoning, HarmonyChannelsSplitIntoReasoningAndAnswer) {
    const std::string reply = "<|channel|>analysis<|message|>User asks capital. Answer Paris.<|end|>"
                              "<|start|>assistant<|channel|>final<|message|>The capital is Paris.";
    HarmonySplit h = split_harmony(reply, true);
    EXPECT_TRUE(h.reasoned);
    EXPECT_EQ(h.reasoning, "User asks capital. Answer Paris.");
    EXPECT_EQ(h.content, "The capital is Paris.");
    h = split_harmony("<|channel|>final<|message|>Hi", true);   // low reasoning effort: no analysis
    EXPECT_FALSE(h.reasoned);
    EXPECT_EQ(h.content, "Hi");
    h = split_harmony("Plain text, no channels", true);
    EXPECT_EQ(h.content, "Plain text, no channels");
    h = split_harmony("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"x\": 1}", true);
    EXPECT_EQ(h.content, "");   // a call: a message of its own (runtime/tool_calls.h reads it)
    ASSERT_EQ(h.calls.size(), 1u);
    EXPECT_EQ(h.calls[0].recipient, "functions.f");
    EXPECT_EQ(h.calls[0].body, "{\"x\": 1}");
    // what is certain while the reply grows never changes
    for (size_t n = 0; n <= reply.size(); ++n) {
        const HarmonySplit part = split_harmony(std::string_view(reply).substr(0, n), false);
        const HarmonySplit whole = split_harmony(reply, true);
        EXPECT_EQ(whole.reasoning.compare(0, part.reasoning_certain, part.reasoning, 0, part.reasoning_certain), 0) << n;
        EXPECT_EQ(whole.content.compare(0, part.content_certain, part.content, 0, part.content_certain), 0) << n;
        EXPECT_EQ(part.reasoning.find("<|"), std::string::npos) << n << ": " << part.reasoning;
    }
    EXPECT_TRUE(ChatTemplate(test::fixture_template("openai-gpt-oss-120b"), "", "").harmony());
    EXPECT_FALSE(ChatTemplate(test::fixture_template("Qwen-Qwen3-0.6B"), "", "").harmony());
}

std::string render(const std::string & name, const ojson & extra = ojson::object()) {
    const ChatTemplate c(test::fixture_template(name), "<s>", "</s>");
    EXPECT_TRUE(c.reasons()) << name;
    return c.render(ojson::parse(R"([{"role": "user", "content": "Hi"}])"), true, extra);
}

TEST(Reasoning, KnowsWhichPromptsOpenABlock) {
    EXPECT_TRUE(prompt_opens_reasoning(render("MiniMax-M2")));                                // ends "<think>\n"
    EXPECT_TRUE(prompt_opens_reasoning(render("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16")));
    EXPECT_FALSE(prompt_opens_reasoning(render("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")));   // ends "<think>\n</think>"
    EXPECT_FALSE(prompt_opens_reasoning(render("Qwen-Qwen3-0.6B")));                           // the model opens it
    EXPECT_FALSE(prompt_opens_reasoning(render("Qwen-Qwen3-0.6B", {{"enable_thinking", false}})));   // closed: "<think>\n\n</think>"
}

} // namespace
} // namespace moesh
