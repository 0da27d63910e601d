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

} // namespace moesh
