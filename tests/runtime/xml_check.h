// A small XML well-formedness check for the tests (no XML library is a
// dependency): one root element, tags closed in order, attributes quoted and not
// repeated, '&' only in the predefined or numeric entities, '<' only as markup,
// no characters XML 1.0 forbids. Not a validator: DTDs and CDATA are refused.
#pragma once

#include <cctype>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace moesh::test {

namespace xml_detail {

inline bool name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':' || (c & 0x80); }
inline bool name_char(char c) {
    return name_start(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
}
inline bool space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

struct Reader {
    std::string_view s;
    size_t i = 0;
    std::string error;

    bool fail(const std::string & what) {
        if (error.empty()) error = what + " at byte " + std::to_string(i);
        return false;
    }
    bool at_end() const { return i >= s.size(); }
    bool starts(std::string_view p) const { return s.substr(i, p.size()) == p; }
    void skip_space() {
        while (!at_end() && space(s[i])) ++i;
    }
    bool name(std::string * out) {
        const size_t b = i;
        if (at_end() || !name_start(s[i])) return fail("expected a name");
        while (!at_end() && name_char(s[i])) ++i;
        *out = std::string(s.substr(b, i - b));
        return true;
    }
    // At '&': one entity reference.
    bool reference() {
        const size_t semi = s.find(';', i);
        if (semi == std::string_view::npos || semi - i > 12) return fail("'&' that starts no entity");
        const std::string_view ref = s.substr(i + 1, semi - i - 1);
        bool ok = ref == "lt" || ref == "gt" || ref == "amp" || ref == "quot" || ref == "apos";
        if (!ok && ref.size() > 1 && ref[0] == '#') {
            const bool hex = ref[1] == 'x';
            const std::string_view digits = ref.substr(hex ? 2 : 1);
            ok = !digits.empty();
            for (char c : digits) ok = ok && (hex ? std::isxdigit(static_cast<unsigned char>(c)) : std::isdigit(static_cast<unsigned char>(c)));
        }
        if (!ok) return fail("unknown entity &" + std::string(ref) + ";");
        i = semi + 1;
        return true;
    }
    bool legal_char(char c) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (u < 0x20 && c != '\t' && c != '\n' && c != '\r') return fail("control character");
        return true;
    }
    // Character data up to the next '<'.
    bool text() {
        while (!at_end() && s[i] != '<') {
            if (!legal_char(s[i])) return false;
            if (s[i] == '&') {
                if (!reference()) return false;
            } else {
                if (starts("]]>")) return fail("']]>' in text");
                ++i;
            }
        }
        return true;
    }
    bool comment_or_pi() {
        const std::string_view end = starts("<!--") ? "-->" : "?>";
        const size_t e = s.find(end, i + 2);
        if (e == std::string_view::npos) return fail("unterminated comment or processing instruction");
        i = e + end.size();
        return true;
    }
    // At '<' of a start tag; pushes its name unless it closes itself.
    bool start_tag(std::vector<std::string> & open) {
        ++i;
        std::string tag;
        if (!name(&tag)) return false;
        std::set<std::string> attrs;
        for (;;) {
            const size_t before = i;
            skip_space();
            if (at_end()) return fail("unterminated tag <" + tag);
            if (starts("/>")) {
                i += 2;
                return true;
            }
            if (s[i] == '>') {
                ++i;
                open.push_back(tag);
                return true;
            }
            if (i == before) return fail("no space before an attribute of <" + tag);
            std::string attr;
            if (!name(&attr)) return false;
            if (!attrs.insert(attr).second) return fail("attribute " + attr + " twice in <" + tag);
            skip_space();
            if (at_end() || s[i] != '=') return fail("attribute " + attr + " without '='");
            ++i;
            skip_space();
            if (at_end() || (s[i] != '"' && s[i] != '\'')) return fail("attribute " + attr + " not quoted");
            const char q = s[i++];
            while (!at_end() && s[i] != q) {
                if (s[i] == '<') return fail("'<' in attribute " + attr);
                if (!legal_char(s[i])) return false;
                if (s[i] == '&') {
                    if (!reference()) return false;
                } else {
                    ++i;
                }
            }
            if (at_end()) return fail("unterminated attribute " + attr);
            ++i;
        }
    }
    bool end_tag(std::vector<std::string> & open) {
        i += 2;
        std::string tag;
        if (!name(&tag)) return false;
        skip_space();
        if (at_end() || s[i] != '>') return fail("unterminated </" + tag);
        ++i;
        if (open.empty() || open.back() != tag)
            return fail("</" + tag + "> closes " + (open.empty() ? std::string("nothing") : "<" + open.back() + ">"));
        open.pop_back();
        return true;
    }
};

} // namespace xml_detail

// Empty when text is a well-formed XML document, else what is wrong and where.
inline std::string xml_well_formed(std::string_view text) {
    xml_detail::Reader r;
    r.s = text;
    std::vector<std::string> open;
    int roots = 0;
    while (!r.at_end()) {
        if (open.empty()) {   // outside the root: only space, comments and processing instructions
            r.skip_space();
            if (r.at_end()) break;
            if (r.starts("<?") || r.starts("<!--")) {
                if (!r.comment_or_pi()) return r.error;
            } else if (r.starts("<") && !r.starts("</") && !r.starts("<!")) {
                if (++roots > 1) return "a second root element at byte " + std::to_string(r.i);
                if (!r.start_tag(open)) return r.error;
            } else {
                r.fail("content outside the root element");
                return r.error;
            }
            continue;
        }
        if (!r.text()) return r.error;
        if (r.at_end()) break;
        bool ok;
        if (r.starts("</")) ok = r.end_tag(open);
        else if (r.starts("<!--") || r.starts("<?")) ok = r.comment_or_pi();
        else if (r.starts("<!")) ok = r.fail("CDATA or DTD (not supported here)");
        else ok = r.start_tag(open);
        if (!ok) return r.error;
    }
    if (!open.empty()) return "<" + open.back() + "> is never closed";
    if (roots == 0) return "no root element";
    return {};
}

} // namespace moesh::test
