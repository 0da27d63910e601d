// Function calls in a model's output, in the format its chat template shows
// the model (OpenAI's tools). Formats read (the template tells which):
//   hermes         <tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>   Qwen2.5, Qwen3, Qwen3-MoE,
//                  QwQ, Hermes 2/3, Granite 4
//   llama3         {"name": N, "parameters": {...}} as the whole reply (<|python_tag|> may precede it)
//                  Llama 3.1, 3.2, 3.3
//   mistral        [TOOL_CALLS][{"name": N, "arguments": {...}, "id": I}, ...]   Mistral Nemo, Mixtral 8x22B
//   mistral-args   [TOOL_CALLS]N[CALL_ID]I[ARGS]{...}, once per call ([CALL_ID] optional)
//                  Mistral Small 3.2, Devstral, Ministral 3, Magistral
//   deepseek-v3.1  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
//   deepseek-r1    the same with function<｜tool▁sep｜>N\n```json\n{...}\n``` in each call   DeepSeek-R1, V3-0324
//   kimi-k2        <|tool_calls_section_begin|><|tool_call_begin|>functions.N:0<|tool_call_argument_begin|>{...}
//                  <|tool_call_end|>...<|tool_calls_section_end|>
//   harmony        gpt-oss: a message addressed to functions.N (<|channel|>commentary to=functions.N
//                  <|constrain|>json<|message|>{...}<|call|>, or " to=functions.N" before its channel)
//   qwen3-coder    <tool_call>\n<function=N>\n<parameter=K>\nV\n</parameter>\n...</function>\n</tool_call>
//                  Qwen3-Coder, Qwen3.5, Nemotron 3, Step 3.5
//   glm            <tool_call>N\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n...</tool_call>   GLM-4.5/4.6/4.7
//   minimax        <minimax:tool_call>\n<invoke name="N">\n<parameter name="K">V</parameter>\n...</invoke>\n
//                  </minimax:tool_call>   MiniMax-M2
//   deepseek-v3.2  <｜DSML｜function_calls>\n<｜DSML｜invoke name="N">\n<｜DSML｜parameter name="K" string="true">V
//                  </｜DSML｜parameter>\n...</｜DSML｜invoke>\n</｜DSML｜function_calls>   DeepSeek V3.2
//   deepseek-v4    the same in a <｜DSML｜tool_calls> block   DeepSeek V4
// In the XML formats a value V is text: strings as they are, other values as JSON (or Python's
// str(): True, None), so they are read by the type the tool's parameters schema gives them (DSML
// says it: string="false" is JSON). Other templates (SmolLM3's xml_tools, Kimi K3's, ...) are not read: a request with
// tools for such a template is refused, never answered with calls left in the text. Many markers
// are special tokens: the text must be decoded with the ones tool_call_markers() names.
//
//   const ToolCallFormat f = tool_call_format(template_text);
//   ParsedOutput out = parse_tool_calls(f, generated_text);   // out.calls, out.content
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

enum class ToolCallFormat {
    None, Hermes, Llama3, Mistral, MistralArgs, DeepSeekV31, DeepSeekR1, KimiK2, Harmony, QwenXml, GlmXml, MiniMaxXml, DsmlV32, DsmlV4
};

// From a chat template's Jinja text.
ToolCallFormat tool_call_format(std::string_view template_text);
// "hermes", "llama3", ... as listed above; "none".
std::string_view tool_call_format_name(ToolCallFormat format);
// The marker strings of the format's calls that a tokenizer may hold as special tokens.
std::vector<std::string_view> tool_call_markers(ToolCallFormat format);

struct ParsedCall {
    std::string name;
    std::string arguments;   // the JSON text of an object
};

struct ParsedOutput {
    std::string content;            // the text around and between the runs of calls (all of it when there is none)
    std::vector<ParsedCall> calls;
};

// Splits generated text into content and calls. A call that is not well formed
// (not JSON, no name, arguments not an object) makes the whole text content, with
// no calls, rather than half an answer. Text after the calls (a model that calls,
// then says more) is content too, after the text before them; Llama 3's reply,
// which is the call, takes none. Harmony: the
// text is the raw reply, with its markers; content is what split_harmony
// gives (runtime/reasoning.h), and a malformed call's body is added to it.
// tools_json (the request's tools) types the XML formats' values.
ParsedOutput parse_tool_calls(ToolCallFormat format, std::string_view text, std::string_view tools_json = {});

// A call as far as a growing text shows it.
struct PartialCall {
    std::string name;
    std::string arguments;   // the start of its arguments' JSON text that can no longer change
};

// The calls of a growing text, for streaming them while they are written: each call begun so far
// whose name is certain, in order, with the certain start of its arguments (of what
// parse_tool_calls gives once the text is whole: the same compact JSON). Numbers and other
// non-text values come whole; text comes as it is written. This holds if the calls end well
// formed; if they do not, parse_tool_calls makes the whole text content, as it always does.
// Empty when the calls so far are not well formed.
std::vector<PartialCall> tool_call_prefix(ToolCallFormat format, std::string_view text, std::string_view tools_json = {});

// How much of a growing text can be streamed as content: up to the first call,
// and never a tail that may still become the start of one. (Harmony's calls are
// messages of their own, which split_harmony keeps out of its content.)
size_t tool_call_safe_prefix(ToolCallFormat format, std::string_view text);

// A call in the format: what the model is shown as an example.
std::string write_tool_call(ToolCallFormat format, const std::string & name, const std::string & arguments);

// For templates that read calls in a known format but never show the model its tools
// (DeepSeek V3.1's and R1's): a system message's text that lists the tools (their JSON, one per
// line) and shows the format of a call, as llama.cpp's template polyfill does.
std::string tools_system_prompt(ToolCallFormat format, std::string_view tools_json);

// A call the model must make (tool_choice "required" or a named tool): a GBNF grammar whose every
// match is one call, in the format, of a function of `tools_json` (a request's tools: a JSON array
// of {"type": "function", "function": {"name", "parameters"?}}) or only of the one named `only`,
// with arguments that are an instance of its parameters schema. The format's markers that
// `special_id` says are special tokens (their id; -1: not one) are token references in it (a
// grammar never lets a special token through as text). "" and *error (naming tools[i]) when a
// schema cannot be made a grammar or `only` is not a tool.
std::string force_tool_call(ToolCallFormat format, std::string_view tools_json, const std::string & only,
                            const std::function<int32_t(std::string_view)> & special_id, std::string * error);

} // namespace moesh
