// Recognising a chat template by the literal text it emits, and rendering
// it. Each family's rendering follows its Jinja template line by line; the
// references are scripts/make_chat_template_fixtures.py's renderings.
#include "runtime/chat_template.h"

#include "runtime/error.h"

namespace moesh {

namespace {

bool has(std::string_view s, std::string_view what) { return s.find(what) != std::string_view::npos; }

// Python's str.strip() (Jinja's trim): the characters str.isspace() accepts.
std::string trim(std::string_view s) {
    auto space_len = [&](size_t i, bool backwards) -> size_t {
        static const std::string_view k_spaces[] = {
            "\t", "\n", "\v", "\f", "\r", " ", "\x1c", "\x1d", "\x1e", "\x1f", "\xc2\x85", "\xc2\xa0",
            "\xe1\x9a\x80", "\xe2\x80\x80", "\xe2\x80\x81", "\xe2\x80\x82", "\xe2\x80\x83", "\xe2\x80\x84",
            "\xe2\x80\x85", "\xe2\x80\x86", "\xe2\x80\x87", "\xe2\x80\x88", "\xe2\x80\x89", "\xe2\x80\x8a",
            "\xe2\x80\xa8", "\xe2\x80\xa9", "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80"};
        for (std::string_view sp : k_spaces) {
            if (backwards ? i >= sp.size() && s.substr(i - sp.size(), sp.size()) == sp : s.substr(i, sp.size()) == sp)
                return sp.size();
        }
        return 0;
    };
    size_t b = 0, e = s.size();
    while (b < e)
        if (size_t n = space_len(b, false)) b += n;
        else break;
    while (e > b)
        if (size_t n = space_len(e, true)) e -= n;
        else break;
    return std::string(s.substr(b, e - b));
}

// The text of a string literal in the template that starts with `prefix`
// and holds no Jinja, with \n unescaped; nullopt if there is none.
std::optional<std::string> find_literal(std::string_view jinja, std::string_view prefix) {
    for (char quote : {'\'', '"'}) {
        const std::string start = std::string(1, quote) + std::string(prefix);
        for (size_t pos = jinja.find(start); pos != std::string_view::npos; pos = jinja.find(start, pos + 1)) {
            std::string out;
            size_t i = pos + 1;
            for (; i < jinja.size() && jinja[i] != quote; ++i) {
                if (jinja[i] == '\\' && i + 1 < jinja.size()) {
                    ++i;
                    out += jinja[i] == 'n' ? '\n' : jinja[i] == 't' ? '\t' : jinja[i];
                } else {
                    out += jinja[i];
                }
            }
            if (i < jinja.size()) return out;
        }
    }
    return std::nullopt;
}

} // namespace

std::string_view ChatTemplate::name() const {
    switch (family_) {
    case Family::ChatML: return "chatml";
    case Family::Llama3: return "llama3";
    case Family::MistralV1: return "mistral-v1";
    case Family::MistralV3: return "mistral-v3";
    }
    return "";
}

std::optional<ChatTemplate> detect_chat_template(std::string_view jinja, std::string bos, std::string eos) {
    ChatTemplate t;
    if (has(jinja, "<think>")) return std::nullopt;   // reasoning templates rewrite assistant turns
    if (has(jinja, "<|im_start|>") && has(jinja, "<|im_end|>")) {
        t.family_ = ChatTemplate::Family::ChatML;
        // '<|im_start|>system\nDEFAULT<|im_end|>\n', emitted when messages[0] is not a system message
        if (auto lit = find_literal(jinja, "<|im_start|>system\\n")) {
            const std::string_view head = "<|im_start|>system\n", tail = "<|im_end|>\n";
            if (lit->size() >= head.size() + tail.size() && lit->ends_with(tail))
                t.default_system_ = lit->substr(head.size(), lit->size() - head.size() - tail.size());
        }
    } else if (has(jinja, "<|start_header_id|>") && has(jinja, "<|eot_id|>")) {
        // Llama-3.1 and later add a dated system header and tool prompts
        if (has(jinja, "Cutting Knowledge Date") || has(jinja, "Environment: ipython") || bos.empty())
            return std::nullopt;
        t.family_ = ChatTemplate::Family::Llama3;
    } else if (has(jinja, "[INST]") && has(jinja, "[/INST]")) {
        if (has(jinja, "<<SYS>>") || bos.empty() || eos.empty()) return std::nullopt;
        if (has(jinja, "' [/INST]'") && !has(jinja, "system_message"))
            t.family_ = ChatTemplate::Family::MistralV1;
        else if (has(jinja, "\"[INST] \" + system_message") && has(jinja, "loop.last and system_message"))
            t.family_ = ChatTemplate::Family::MistralV3;
        else
            return std::nullopt;
    } else {
        return std::nullopt;
    }
    t.bos_ = std::move(bos);
    t.eos_ = std::move(eos);
    return t;
}

std::optional<ChatTemplate> detect_chat_template(std::string_view jinja, const Tokenizer & tok) {
    auto text = [&](int32_t id) { return id >= 0 ? tok.token_text(id) : std::string(); };
    return detect_chat_template(jinja, text(tok.bos_id()), text(tok.eos_id()));
}

std::string ChatTemplate::apply(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const {
    std::string out;
    switch (family_) {
    case Family::ChatML:
        for (size_t i = 0; i < messages.size(); ++i) {
            if (i == 0 && default_system_ && messages[0].role != "system")
                out += "<|im_start|>system\n" + *default_system_ + "<|im_end|>\n";
            out += "<|im_start|>" + messages[i].role + "\n" + messages[i].content + "<|im_end|>\n";
        }
        if (add_generation_prompt) out += "<|im_start|>assistant\n";
        return out;
    case Family::Llama3:
        for (size_t i = 0; i < messages.size(); ++i) {
            if (i == 0) out += bos_;
            out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + trim(messages[i].content) +
                   "<|eot_id|>";
        }
        if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
        return out;
    case Family::MistralV1:
        out = bos_;
        for (size_t i = 0; i < messages.size(); ++i) {
            const ChatMessage & m = messages[i];
            if ((m.role == "user") != (i % 2 == 0))
                throw Error("chat template: Conversation roles must alternate user/assistant/user/assistant/...");
            if (m.role == "user") out += "[INST] " + m.content + " [/INST]";
            else if (m.role == "assistant") out += m.content + eos_;
            else throw Error("chat template: Only user and assistant roles are supported!");
        }
        return out;   // the template has no generation prompt: [/INST] ends the user's turn
    case Family::MistralV3: {
        size_t first = !messages.empty() && messages[0].role == "system" ? 1 : 0;
        for (size_t i = first; i < messages.size(); ++i)
            if ((messages[i].role == "user") != ((i - first) % 2 == 0))
                throw Error("chat template: After the optional system message, conversation roles must alternate "
                            "user/assistant/user/assistant/...");
        out = bos_;
        for (size_t i = first; i < messages.size(); ++i) {
            const ChatMessage & m = messages[i];
            if (m.role == "user") {
                bool last = i + 1 == messages.size();
                out += "[INST] " + (last && first ? messages[0].content + "\n\n" : std::string()) + m.content + "[/INST]";
            } else if (m.role == "assistant") {
                out += " " + trim(m.content) + eos_;
            } else {
                throw Error("chat template: Only user and assistant roles are supported, with the exception of an "
                            "initial optional system message!");
            }
        }
        return out;
    }
    }
    return out;
}

} // namespace moesh
