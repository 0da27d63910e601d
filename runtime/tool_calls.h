// Function calls in a model's output, in the format its chat template shows
// the model (OpenAI's tools). One format is read today, Hermes': each call is
//   <tool_call>
//   {"name": "get_weather", "arguments": {"city": "Paris"}}
//   </tool_call>
// as the templates of Qwen2.5, Qwen3 and Qwen3-MoE, QwQ and Hermes 2/3 write
// it. Others (Llama 3.1's JSON, Mistral's [TOOL_CALLS], DeepSeek's, gpt-oss',
// Qwen3-Coder's XML, SmolLM3's xml_tools) are not read: a request with tools
// for such a template is refused, never answered with calls left in the text.
//
//   const ToolCallFormat f = tool_call_format(template_text);
//   ParsedOutput out = parse_tool_calls(f, generated_text);   // out.calls, out.content
//
// Thread safety: pure functions.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moesh {

enum class ToolCallFormat { None, Hermes };

// From a chat template's Jinja text.
ToolCallFormat tool_call_format(std::string_view template_text);

struct ParsedCall {
    std::string name;
    std::string arguments;   // the JSON text of an object
};

struct ParsedOutput {
    std::string content;            // the text before the first call (all of it when there is none)
    std::vector<ParsedCall> calls;
};

// Splits generated text into content and calls. A call that is not well formed
// (not JSON, no name, arguments not an object) makes the whole text content,
// with no calls, rather than half an answer.
ParsedOutput parse_tool_calls(ToolCallFormat format, std::string_view text);

// How much of a growing text can be streamed as content: up to the first call,
// and never a tail that may still become the start of one.
size_t tool_call_safe_prefix(ToolCallFormat format, std::string_view text);

// A GBNF grammar whose every match is one call, in the format, of a function
// of `tools_json` (a request's tools: a JSON array of {"type": "function",
// "function": {"name", "parameters"?}}) or only of the one named `only`, with
// arguments that are an instance of its parameters schema. "" and *error
// (naming tools[i]) when a schema cannot be made a grammar.
std::string forced_tool_call_grammar(ToolCallFormat format, std::string_view tools_json, const std::string & only,
                                     std::string * error);

} // namespace moesh
