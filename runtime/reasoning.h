// Reasoning in a model's output: what reasoning templates (Qwen3 and
// Qwen3-MoE, QwQ, DeepSeek-R1 and its distills, ...) teach the model to write
// between <think> and </think> before its answer, split from the answer as
// vLLM's and llama.cpp's reasoning parsers do (OpenAI-compatible servers
// return it as `reasoning_content`). Either the model opens the block itself,
// or the template's generation prompt already did (DeepSeek-R1's ends with
// "<think>\n"). Whitespace around the reasoning and before the answer is
// dropped.
//
//   ReasoningSplit s = split_reasoning(text, prompt_opens_reasoning(prompt), /*final=*/true);
//   std::string_view reasoning = text.substr(s.reasoning_begin, s.reasoning_end - s.reasoning_begin);
//   std::string_view answer = text.substr(s.content_begin);
//
// While generating (final false) the split says how much of each part is
// certain: a tail that may still become a marker, or whitespace that may turn
// out to end the reasoning, is held back; what is certain never changes as the
// text grows. Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

// The template writes <think> blocks.
bool template_reasons(std::string_view template_text);
// The rendered prompt ends inside an open <think> block (its last tag is <think>).
bool prompt_opens_reasoning(std::string_view prompt);

struct ReasoningSplit {
    bool reasoned = false;           // a <think> block was opened (by the model or the prompt)
    size_t reasoning_begin = 0;      // offsets into the text
    size_t reasoning_end = 0;        // certain reasoning: [reasoning_begin, reasoning_end)
    size_t content_begin = 0;        // the answer starts here; the text's size while it is not known yet
};

ReasoningSplit split_reasoning(std::string_view text, bool starts_inside, bool final);

// gpt-oss' harmony format: the reply is messages on channels,
//   <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
// (the markers are special tokens, so the text must be decoded with them). The analysis
// channel is the reasoning; the final channel, and any other (commentary), the answer. A message
// addressed to a recipient (to=functions.get_weather) is a tool call, neither.
bool template_uses_harmony(std::string_view template_text);

struct HarmonySplit {
    bool reasoned = false;          // an analysis message was opened
    std::string reasoning, content;
    size_t reasoning_certain = 0;   // prefixes that can no longer change while the text grows
    size_t content_certain = 0;
    struct Call {
        std::string recipient;      // "functions.get_weather"
        std::string body;
        bool whole = false;         // its end was seen (or the text is final)
    };
    std::vector<Call> calls;
};

HarmonySplit split_harmony(std::string_view text, bool final);

} // namespace moesh
