// Chat prompts for the chat-template families moesh knows, recognised from
// the Jinja text (GGUF tokenizer.chat_template or tokenizer_config.json's
// chat_template) without running Jinja, and rendered exactly as
// transformers' apply_chat_template renders those templates:
//   chatml      <|im_start|>role\n...<|im_end|>\n (Qwen2, SmolLM2), with the
//               template's default system message when the first message is not one
//   llama3      <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> after BOS
//   mistral-v1  BOS [INST] user [/INST]assistant</s> (Mistral/Mixtral v0.1, no system role)
//   mistral-v3  BOS [INST] user[/INST] assistant</s>, a system message folded
//               into the last message when that is the user's (Mistral v0.3)
//
//   std::optional<ChatTemplate> t = detect_chat_template(gguf.get_string("tokenizer.chat_template"), tok);
//   if (!t) { /* say so and use the raw prompt */ }
//   std::string prompt = t->apply({{"system", "Be brief."}, {"user", "Hi"}}, /*add_generation_prompt=*/true);
//   std::vector<int32_t> ids = tok.encode(prompt);   // BOS is in the prompt where the template puts it
//
// Anything else (Llama-3.1's dated system header, reasoning templates with
// <think>, Llama-2's <<SYS>>, Gemma, ...) is not recognised: nullopt.
//
// Thread safety: a ChatTemplate is immutable; apply is const.
#pragma once

#include "runtime/tokenizer.h"

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

struct ChatMessage {
    std::string role;      // "system", "user", "assistant"
    std::string content;
};

class ChatTemplate {
public:
    enum class Family { ChatML, Llama3, MistralV1, MistralV3 };

    Family family() const { return family_; }
    std::string_view name() const;   // "chatml", "llama3", "mistral-v1", "mistral-v3"

    // Throws moesh::Error where the template raises an exception (roles that
    // do not alternate, a system message where the template has none).
    std::string apply(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

private:
    friend std::optional<ChatTemplate> detect_chat_template(std::string_view, std::string, std::string);
    Family family_ = Family::ChatML;
    std::string bos_, eos_;
    std::optional<std::string> default_system_;   // chatml: when messages[0] is not a system message
};

// bos_token / eos_token are the template's variables (tokenizer_config.json's
// bos_token and eos_token); a family that needs one that is empty is not
// recognised.
std::optional<ChatTemplate> detect_chat_template(std::string_view jinja, std::string bos_token, std::string eos_token);
// The same, with the tokenizer's BOS and EOS token texts.
std::optional<ChatTemplate> detect_chat_template(std::string_view jinja, const Tokenizer & tok);

} // namespace moesh
