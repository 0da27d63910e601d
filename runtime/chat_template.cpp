// Chat templates through the Jinja interpreter, with the variables
// transformers' render_jinja_template passes.
#include "runtime/chat_template.h"

#include "runtime/error.h"
#include "runtime/reasoning.h"

#include <algorithm>

namespace moesh {

namespace {

using ojson = nlohmann::ordered_json;

std::string token_text(const Tokenizer & tok, int32_t id) { return id >= 0 ? tok.token_text(id) : std::string(); }

// transformers' _alias_reasoning_fields: a message's reasoning (the first
// non-null of reasoning_content, thinking, reasoning) is also `thinking`
// (first key) and `reasoning_content` (last key unless already there), as
// {"thinking": r, **message, "reasoning_content": r} orders them.
ojson alias_reasoning(const ojson & m) {
    if (!m.is_object()) return m;
    const ojson * reasoning = nullptr;
    for (const char * k : {"reasoning_content", "thinking", "reasoning"}) {
        auto it = m.find(k);
        if (it != m.end() && !it->is_null()) {
            reasoning = &*it;
            break;
        }
    }
    if (!reasoning) return m;
    ojson out = ojson::object();
    out["thinking"] = m.contains("thinking") ? m["thinking"] : *reasoning;
    for (const auto & [k, v] : m.items())
        if (k != "thinking") out[k] = v;
    out["reasoning_content"] = *reasoning;
    return out;
}

} // namespace

ChatTemplate::ChatTemplate(std::string_view jinja, std::string bos_token, std::string eos_token)
    : tmpl_([&] {
          try {
              return jinja::Template(jinja);
          } catch (const Error & e) {
              throw Error(std::string("chat ") + e.what());
          }
      }()),
      bos_(std::move(bos_token)), eos_(std::move(eos_token)), takes_tools_(jinja.find("tools") != std::string_view::npos),
      tool_format_(moesh::tool_call_format(jinja)), reasons_(template_reasons(jinja)),
      harmony_(template_uses_harmony(jinja)) {}

ChatTemplate::ChatTemplate(std::string_view jinja, const Tokenizer & tok)
    : ChatTemplate(jinja, token_text(tok, tok.bos_id()), token_text(tok, tok.eos_id())) {}

std::string ChatTemplate::render(const ojson & messages, bool add_generation_prompt, const ojson & extra,
                                const jinja::RenderOptions & options) const {
    if (!messages.is_array()) throw Error("chat template: messages must be an array");
    ojson vars = ojson::object();
    vars["messages"] = ojson::array();
    for (const auto & m : messages) vars["messages"].push_back(alias_reasoning(m));
    vars["tools"] = nullptr;
    vars["documents"] = nullptr;
    vars["add_generation_prompt"] = add_generation_prompt;
    vars["bos_token"] = bos_;
    vars["eos_token"] = eos_;
    if (extra.is_object())
        for (const auto & [k, v] : extra.items()) vars[k] = v;
    try {
        return tmpl_.render(vars, options);
    } catch (const jinja::RaisedError & e) {
        throw Error(std::string("chat template: ") + e.what());
    } catch (const Error & e) {
        throw Error(std::string("chat ") + e.what());
    }
}

std::string ChatTemplate::apply(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const {
    ojson m = ojson::array();
    for (const ChatMessage & msg : messages) m.push_back({{"role", msg.role}, {"content", msg.content}});
    return render(m, add_generation_prompt);
}

std::vector<int32_t> chat_stop_ids(const Tokenizer & tok) {
    std::vector<int32_t> ids;
    auto add = [&](int32_t id) {
        if (id >= 0 && std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    };
    add(tok.eos_id());
    for (const char * end : {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
                             "</s>", "<|end_of_text|>", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
                             "<|END_OF_TURN_TOKEN|>", "<|role_end|>"})
        if (const int32_t id = tok.token_id(end); id >= 0 && tok.is_special(id)) add(id);
    // Phi-3's end of turn; in gpt-oss's format <|end|> closes the reasoning and the answer follows, <|return|> ends it
    if (const int32_t id = tok.token_id("<|end|>"); id >= 0 && tok.is_special(id) && tok.token_id("<|return|>") < 0) add(id);
    return ids;
}

} // namespace moesh
