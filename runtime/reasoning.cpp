// Splitting <think> reasoning from the answer, for whole and growing texts.
#include "runtime/reasoning.h"

#include <algorithm>

namespace moesh {

namespace {

constexpr std::string_view k_open = "<think>", k_close = "</think>";

bool space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

size_t skip_space(std::string_view t, size_t i) {
    while (i < t.size() && space(t[i])) ++i;
    return i;
}

// The length of the longest tail of t that is a proper prefix of marker.
size_t partial_tail(std::string_view t, std::string_view marker) {
    for (size_t n = std::min(t.size(), marker.size() - 1); n > 0; --n)
        if (t.substr(t.size() - n) == marker.substr(0, n)) return n;
    return 0;
}

} // namespace

bool template_reasons(std::string_view t) {
    return t.find(k_open) != std::string_view::npos && t.find(k_close) != std::string_view::npos;
}

bool prompt_opens_reasoning(std::string_view prompt) {
    size_t end = prompt.size();
    while (end > 0 && space(prompt[end - 1])) --end;
    return end >= k_open.size() && prompt.substr(end - k_open.size(), k_open.size()) == k_open;
}

ReasoningSplit split_reasoning(std::string_view text, bool starts_inside, bool final) {
    ReasoningSplit s;
    size_t r0 = 0;
    if (!starts_inside) {
        const size_t w = skip_space(text, 0);
        const std::string_view rest = text.substr(w);
        if (rest.substr(0, k_open.size()) == k_open) {
            r0 = w + k_open.size();
        } else if (!final && rest.size() < k_open.size() && k_open.substr(0, rest.size()) == rest) {
            s.reasoning_begin = s.reasoning_end = s.content_begin = text.size();   // may still open a block: nothing is certain
            return s;
        } else {
            return s;   // no reasoning: all of it is the answer
        }
    }
    s.reasoned = true;
    s.reasoning_begin = skip_space(text, r0);
    const size_t close = text.find(k_close, r0);
    if (close != std::string_view::npos) {
        size_t end = close;
        while (end > s.reasoning_begin && space(text[end - 1])) --end;
        s.reasoning_begin = std::min(s.reasoning_begin, end);
        s.reasoning_end = end;
        s.content_begin = skip_space(text, close + k_close.size());
        return s;
    }
    // still reasoning: hold back a tail that may become </think>, and trailing whitespace
    size_t end = text.size() - (final ? 0 : partial_tail(text, k_close));
    while (end > s.reasoning_begin && space(text[end - 1])) --end;
    s.reasoning_begin = std::min(s.reasoning_begin, end);
    s.reasoning_end = end;
    s.content_begin = text.size();
    return s;
}

bool template_uses_harmony(std::string_view t) {
    return t.find("<|channel|>") != std::string_view::npos && t.find("<|message|>") != std::string_view::npos;
}

HarmonySplit split_harmony(std::string_view text, bool final) {
    constexpr std::string_view k_start = "<|start|>", k_channel = "<|channel|>", k_message = "<|message|>";
    constexpr std::string_view k_ends[] = {"<|end|>", "<|return|>", "<|call|>"};
    HarmonySplit h;
    // the text from `from` may still grow into one of `markers`: nothing after it is certain yet
    auto may_become = [&](size_t from, std::initializer_list<std::string_view> markers) {
        const std::string_view rest = text.substr(from);
        for (std::string_view m : markers)
            if (!final && rest.size() < m.size() && m.substr(0, rest.size()) == rest) return true;
        return false;
    };
    // The reply starts inside the header of its first message (the prompt ends "<|start|>assistant"):
    // a channel, or a recipient (" to=functions.f<|channel|>..."). Anything else: no channels at all.
    if (text.substr(0, k_channel.size()) != k_channel && text.substr(0, 4) != " to=" && text.substr(0, k_start.size()) != k_start) {
        if (!may_become(0, {k_channel, k_start, " to="})) {
            h.content = std::string(text);
            h.content_certain = h.content.size();
        }
        return h;
    }
    size_t pos = 0;
    while (pos < text.size()) {
        if (pos > 0 && text.compare(pos, k_start.size(), k_start) != 0) break;   // between messages only <|start|> is expected
        const size_t msg = text.find(k_message, pos);
        if (msg == std::string_view::npos) break;   // the header is still coming
        const std::string_view header = text.substr(pos, msg - pos);
        std::string_view channel, recipient;
        if (const size_t c = header.find(k_channel); c != std::string_view::npos) {
            channel = header.substr(c + k_channel.size());
            channel = channel.substr(0, std::min(channel.find(' '), channel.find("<|")));
        }
        if (const size_t r = header.find("to="); r != std::string_view::npos) {
            recipient = header.substr(r + 3);
            recipient = recipient.substr(0, std::min({recipient.find(' '), recipient.find("<|"), recipient.size()}));
        }
        const size_t body = msg + k_message.size();
        size_t end = std::string_view::npos, after = 0;   // the first end marker: one pass, not a search per marker
        for (size_t p = text.find("<|", body); p != std::string_view::npos && end == std::string_view::npos; p = text.find("<|", p + 1))
            for (std::string_view e : k_ends)
                if (text.compare(p, e.size(), e) == 0) {
                    end = p, after = p + e.size();
                    break;
                }
        if (!recipient.empty()) {   // a call: kept out of the reasoning and the answer
            const bool whole = end != std::string_view::npos || final;
            h.calls.push_back({std::string(recipient), std::string(text.substr(body, end == std::string_view::npos ? std::string_view::npos : end - body)), whole});
            if (end == std::string_view::npos) break;
            pos = after;
            continue;
        }
        const bool analysis = channel.substr(0, 8) == "analysis";
        std::string & out = analysis ? h.reasoning : h.content;
        size_t & certain = analysis ? h.reasoning_certain : h.content_certain;
        if (analysis) h.reasoned = true;
        if (!out.empty()) out += "\n\n";   // a second message on the same side
        certain = out.size();
        if (end == std::string_view::npos) {   // the message is still being written
            size_t stop = text.size();
            if (!final)   // hold back what may become a marker
                for (size_t n = std::min<size_t>(text.size() - body, 10); n > 0; --n)
                    if (text.substr(text.size() - n).find("<|") == 0 || text.substr(text.size() - n) == "<") {
                        stop = text.size() - n;
                        break;
                    }
            out += text.substr(body, stop - body);
            certain = out.size();
            break;
        }
        out += text.substr(body, end - body);
        certain = out.size();
        pos = after;
    }
    return h;
}

} // namespace moesh
