// Chat prompts from a model's own Jinja chat template (GGUF
// tokenizer.chat_template or tokenizer_config.json's chat_template), rendered
// exactly as transformers' apply_chat_template renders it (runtime/jinja.h):
// any template, including reasoning and tool-calling ones (Qwen3, DeepSeek,
// gpt-oss, Llama 3.1, Mistral, Gemma, ...).
//
//   moesh::ChatTemplate t(gguf.get_string("tokenizer.chat_template"), tok);   // throws moesh::Error on bad syntax
//   std::string prompt = t.apply({{"system", "Be brief."}, {"user", "Hi"}}, /*add_generation_prompt=*/true);
//   std::vector<int32_t> ids = tok.encode(prompt, /*add_special=*/false);   // BOS is in the prompt where the template puts it
//
// Thread safety: a ChatTemplate is immutable; apply is const and may run on
// several threads at once.
#pragma once

#include "runtime/jinja.h"
#include "runtime/tokenizer.h"
#include "runtime/tool_calls.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

struct ChatMessage {
    std::string role;      // "system", "user", "assistant", ...
    std::string content;
};

class ChatTemplate {
public:
    // bos_token / eos_token are the template's variables (tokenizer_config.json's
    // bos_token and eos_token). Throws moesh::Error("chat template line L: ...")
    // for a template that cannot be parsed.
    ChatTemplate(std::string_view jinja, std::string bos_token, std::string eos_token);
    // The same, with the tokenizer's BOS and EOS token texts (empty where it has none).
    ChatTemplate(std::string_view jinja, const Tokenizer & tok);

    // `messages` is an array of message objects as OpenAI's API and
    // transformers take them (role, content, and what the template reads:
    // tool_calls, reasoning_content, ...). The template sees what
    // apply_chat_template gives it: messages with reasoning also under
    // `thinking`, tools and documents (null unless `extra` gives them),
    // add_generation_prompt, bos_token, eos_token, and `extra`'s keys
    // (enable_thinking, reasoning_effort, ...). Throws moesh::Error: the
    // template's own raise_exception message after "chat template: ", or what
    // went wrong rendering it and on which line.
    std::string render(const nlohmann::ordered_json & messages, bool add_generation_prompt,
                      const nlohmann::ordered_json & extra = nlohmann::ordered_json::object(),
                      const jinja::RenderOptions & options = {}) const;
    // The same for plain role/content messages.
    std::string apply(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

    bool takes_tools() const { return takes_tools_; }   // the template reads a `tools` variable
    ToolCallFormat tool_call_format() const { return tool_format_; }   // how it shows the model calls
    bool reasons() const { return reasons_; }   // it writes <think> blocks (runtime/reasoning.h)
    bool harmony() const { return harmony_; }   // gpt-oss' channels (runtime/reasoning.h)

private:
    jinja::Template tmpl_;
    std::string bos_, eos_;
    bool takes_tools_ = false;
    ToolCallFormat tool_format_ = ToolCallFormat::None;
    bool reasons_ = false;
    bool harmony_ = false;
};

// The tokens a chat reply ends at: the tokenizer's end-of-sequence token and
// the end-of-turn markers of the chat formats moesh knows (<|im_end|>,
// <|eot_id|>, <|eom_id|>, <|end|>, <|return|>, <|call|>, <end_of_turn>,
// <|endoftext|>, DeepSeek's <｜end▁of▁sentence｜>, ...) that are in its vocabulary.
std::vector<int32_t> chat_stop_ids(const Tokenizer & tok);

} // namespace moesh
