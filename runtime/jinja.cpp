// Jinja2 for chat templates: a lexer over the whole source (text and tag
// tokens, whitespace control applied as Jinja's lexer does), a recursive
// descent parser with Jinja's precedence, and a tree-walking renderer with
// Python's value semantics. References: tests/fixtures/chat_templates,
// rendered by jinja2 under transformers' environment.
#include "runtime/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

namespace moesh::jinja {

namespace {

using ojson = nlohmann::ordered_json;

// ---------------------------------------------------------------- values

struct Value;
struct ListObj;
struct DictObj;
struct FuncObj;
using ListP = std::shared_ptr<ListObj>;
using DictP = std::shared_ptr<DictObj>;
using FuncP = std::shared_ptr<const FuncObj>;

struct Undef {
    std::string why;   // the error using it raises: "'x' is undefined"
};
struct None {};

struct Value {
    std::variant<Undef, None, bool, int64_t, double, std::string, ListP, DictP, FuncP> v;

    Value() : v(Undef{}) {}
    Value(Undef u) : v(std::move(u)) {}
    Value(None) : v(None{}) {}
    Value(bool b) : v(b) {}
    Value(int64_t i) : v(i) {}
    Value(int i) : v(int64_t(i)) {}
    Value(double d) : v(d) {}
    Value(std::string s) : v(std::move(s)) {}
    Value(const char * s) : v(std::string(s)) {}
    Value(ListP l) : v(std::move(l)) {}
    Value(DictP d) : v(std::move(d)) {}
    Value(FuncP f) : v(std::move(f)) {}

    bool undef() const { return std::holds_alternative<Undef>(v); }
    bool none() const { return std::holds_alternative<None>(v); }
    bool is_bool() const { return std::holds_alternative<bool>(v); }
    bool is_int() const { return std::holds_alternative<int64_t>(v); }
    bool is_float() const { return std::holds_alternative<double>(v); }
    bool is_str() const { return std::holds_alternative<std::string>(v); }
    bool is_list() const { return std::holds_alternative<ListP>(v); }
    bool is_dict() const { return std::holds_alternative<DictP>(v); }
    bool is_func() const { return std::holds_alternative<FuncP>(v); }
    bool is_number() const { return is_int() || is_float() || is_bool(); }   // Python: bool is an int
    const std::string & str() const { return std::get<std::string>(v); }
    const ListP & list() const { return std::get<ListP>(v); }
    const DictP & dict() const { return std::get<DictP>(v); }
};

int depth_of(const Value & v);

struct ListObj {
    std::vector<Value> items;
    bool tuple = false;
    int depth = 1;   // 1 + the deepest element's (a scalar's is 0)
};

struct DictObj {
    std::vector<std::pair<std::string, Value>> items;   // insertion order, as Python's dict
    bool ns = false;                                     // a namespace(): attributes assignable by set
    int depth = 1;
    const Value * find(std::string_view k) const {
        for (const auto & [key, val] : items)
            if (key == k) return &val;
        return nullptr;
    }
    void set(const std::string & k, Value val) {
        depth = std::max(depth, 1 + depth_of(val));
        for (auto & [key, old] : items)
            if (key == k) {
                old = std::move(val);
                return;
            }
        items.emplace_back(k, std::move(val));
    }
};

struct Args {
    std::vector<Value> pos;
    std::vector<std::pair<std::string, Value>> kw;
};

struct FuncObj {
    std::string name;
    std::function<Value(Args &)> fn;
};

// Dict keys are strings; an integer key (a dict literal's {0: ...}) is kept
// as "\x01" and its digits, and read back as the integer.
std::string dict_key(const Value & k) {
    if (k.is_str()) return k.str();
    return "\x01" + std::to_string(std::get<int64_t>(k.v));
}
Value key_value(const std::string & k) {
    if (!k.empty() && k[0] == '\x01') return int64_t(std::strtoll(k.c_str() + 1, nullptr, 10));
    return k;
}
std::string key_text(const std::string & k) { return !k.empty() && k[0] == '\x01' ? k.substr(1) : k; }

int depth_of(const Value & v) {
    if (v.is_list()) return v.list()->depth;
    if (v.is_dict()) return v.dict()->depth;
    return 0;
}

ListP new_list(std::vector<Value> items = {}, bool tuple = false) {
    auto l = std::make_shared<ListObj>();
    for (const Value & v : items) l->depth = std::max(l->depth, 1 + depth_of(v));
    l->items = std::move(items);
    l->tuple = tuple;
    return l;
}

// What a copy of a value costs: strings are copied, lists and dicts shared.
size_t weight(const Value & v) { return 16 + (v.is_str() ? v.str().size() : 0); }
size_t weight(const std::vector<Value> & items) {
    size_t n = 0;
    for (const Value & v : items) n += weight(v);
    return n;
}

Value from_json(const ojson & j) {
    switch (j.type()) {
    case ojson::value_t::null: return None{};
    case ojson::value_t::boolean: return j.get<bool>();
    case ojson::value_t::number_integer: return j.get<int64_t>();
    case ojson::value_t::number_unsigned: {
        const uint64_t u = j.get<uint64_t>();
        return u <= uint64_t(INT64_MAX) ? Value(int64_t(u)) : Value(double(u));
    }
    case ojson::value_t::number_float: return j.get<double>();
    case ojson::value_t::string: return j.get<std::string>();
    case ojson::value_t::array: {
        std::vector<Value> items;
        for (const auto & e : j) items.push_back(from_json(e));
        return new_list(std::move(items));
    }
    case ojson::value_t::object: {
        auto d = std::make_shared<DictObj>();
        for (const auto & [k, e] : j.items()) {
            Value v = from_json(e);
            d->depth = std::max(d->depth, 1 + depth_of(v));
            d->items.emplace_back(k, std::move(v));
        }
        return d;
    }
    default: return None{};
    }
}

// ---------------------------------------------------------------- UTF-8 and Python text helpers

// Code point boundaries: Python indexes strings by code point.
std::vector<size_t> cp_starts(std::string_view s) {
    std::vector<size_t> out;
    for (size_t i = 0; i < s.size(); ++i)
        if ((uint8_t(s[i]) & 0xc0) != 0x80) out.push_back(i);
    return out;
}
int64_t cp_len(std::string_view s) {
    int64_t n = 0;
    for (char c : s) n += (uint8_t(c) & 0xc0) != 0x80;
    return n;
}

// Substring search in linear time (glibc's memmem is two-way), where std::string::find can take
// length x needle steps.
size_t find_sub(std::string_view h, std::string_view n, size_t from = 0) {
    if (from > h.size()) return std::string_view::npos;
    if (n.empty()) return from;
    const void * p = memmem(h.data() + from, h.size() - from, n.data(), n.size());
    return p ? size_t(static_cast<const char *>(p) - h.data()) : std::string_view::npos;
}
// The last occurrence starting at or before `before`, by the same search.
size_t rfind_sub(std::string_view h, std::string_view n, size_t before = std::string_view::npos) {
    size_t best = std::string_view::npos;
    for (size_t p = find_sub(h, n); p != std::string_view::npos && (before == std::string_view::npos || p <= before);
         p = find_sub(h, n, p + 1))
        best = p;
    return best;
}

// The characters Python's str.isspace() accepts, as UTF-8.
size_t space_at(std::string_view s, size_t i, bool backwards) {
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
}

// str.strip / lstrip / rstrip: whitespace, or any code point of `chars`.
std::string py_strip(std::string_view s, const std::optional<std::string> & chars, bool left, bool right) {
    size_t b = 0, e = s.size();
    if (!chars) {
        while (left && b < e)
            if (size_t n = space_at(s, b, false)) b += n;
            else break;
        while (right && e > b)
            if (size_t n = space_at(s, e, true)) e -= n;
            else break;
    } else {
        auto in_set = [&](size_t at, size_t len) { return chars->find(s.substr(at, len)) != std::string::npos; };
        auto len_at = [&](size_t i) {
            size_t n = 1;
            while (i + n < s.size() && (uint8_t(s[i + n]) & 0xc0) == 0x80) ++n;
            return n;
        };
        while (left && b < e && in_set(b, len_at(b))) b += len_at(b);
        while (right && e > b) {
            size_t st = e - 1;
            while (st > b && (uint8_t(s[st]) & 0xc0) == 0x80) --st;
            if (!in_set(st, e - st)) break;
            e = st;
        }
    }
    return std::string(s.substr(b, e - b));
}

std::string ascii_lower(std::string s) {
    for (char & c : s)
        if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
    return s;
}
std::string ascii_upper(std::string s) {
    for (char & c : s)
        if (c >= 'a' && c <= 'z') c = char(c - 'a' + 'A');
    return s;
}
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || uint8_t(c) >= 0x80; }

// Python's repr(float): the shortest digits that read back, in fixed
// notation for exponents in [-4, 16), with ".0" when integral.
std::string float_repr(double d) {
    if (std::isnan(d)) return "nan";
    if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
    std::string sci(buf, r.ptr);   // [-]d[.ddd]e[+-]XX
    const bool neg = sci[0] == '-';
    if (neg) sci.erase(0, 1);
    const size_t epos = sci.find('e');
    const int exp = std::atoi(sci.c_str() + epos + 1);
    std::string digits;
    for (size_t i = 0; i < epos; ++i)
        if (sci[i] != '.') digits += sci[i];
    std::string out;
    if (exp < -4 || exp >= 16) {
        out = digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char e[16];
        std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
        out += e;
    } else if (exp < 0) {
        out = "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else {
        if (digits.size() <= size_t(exp) + 1) {
            out = digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
        } else {
            out = digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
        }
    }
    return neg ? "-" + out : out;
}

// Python's repr(str): single quotes unless the text has ' and no ".
std::string str_repr(std::string_view s) {
    const bool dq = s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos;
    const char q = dq ? '"' : '\'';
    std::string out(1, q);
    for (char c : s) {
        const auto u = uint8_t(c);
        if (c == q || c == '\\') {
            out += '\\';
            out += c;
        } else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (u < 0x20 || u == 0x7f) {
            char b[8];
            std::snprintf(b, sizeof b, "\\x%02x", u);
            out += b;
        } else out += c;
    }
    return out + q;
}

std::string type_name(const Value & v) {
    switch (v.v.index()) {
    case 0: return "Undefined";
    case 1: return "NoneType";
    case 2: return "bool";
    case 3: return "int";
    case 4: return "float";
    case 5: return "str";
    case 6: return v.list()->tuple ? "tuple" : "list";
    case 7: return v.dict()->ns ? "Namespace" : "dict";
    default: return "function";
    }
}

// Thrown by the value walks below when they pass their budget (shared sublists can make a text
// or a comparison exponentially larger than the values); the renderer turns it into its error.
struct Exhausted {};

// Python's str() appended to out; past `limit` bytes, Exhausted.
void append_str(std::string & out, const Value & v, size_t limit, bool as_repr = false) {
    if (out.size() > limit) throw Exhausted{};
    switch (v.v.index()) {
    case 0:
        if (as_repr) out += "Undefined";   // inside a list, as Python prints jinja2's Undefined
        return;
    case 1: out += "None"; return;
    case 2: out += std::get<bool>(v.v) ? "True" : "False"; return;
    case 3: out += std::to_string(std::get<int64_t>(v.v)); return;
    case 4: out += float_repr(std::get<double>(v.v)); return;
    case 5:
        if (as_repr) out += str_repr(v.str());
        else out += v.str();
        return;
    case 6: {
        const auto & l = *v.list();
        out += l.tuple ? "(" : "[";
        for (size_t i = 0; i < l.items.size(); ++i) {
            if (i) out += ", ";
            append_str(out, l.items[i], limit, true);
        }
        if (l.tuple && l.items.size() == 1) out += ",";
        out += l.tuple ? ")" : "]";
        return;
    }
    case 7: {
        const auto & d = *v.dict();
        out += d.ns ? "<Namespace {" : "{";
        for (size_t i = 0; i < d.items.size(); ++i) {
            if (i) out += ", ";
            append_str(out, key_value(d.items[i].first), limit, true);
            out += ": ";
            append_str(out, d.items[i].second, limit, true);
        }
        out += d.ns ? "}>" : "}";
        return;
    }
    default: out += "<function " + std::get<FuncP>(v.v)->name + ">";
    }
}

std::string to_str(const Value & v, size_t limit = SIZE_MAX) {
    if (v.is_str()) return v.str();
    std::string out;
    append_str(out, v, limit);
    return out;
}

std::string repr(const Value & v, size_t limit = SIZE_MAX) {
    std::string out;
    append_str(out, v, limit, true);
    return out;
}

bool truthy(const Value & v) {
    switch (v.v.index()) {
    case 0:
    case 1: return false;
    case 2: return std::get<bool>(v.v);
    case 3: return std::get<int64_t>(v.v) != 0;
    case 4: return std::get<double>(v.v) != 0.0;
    case 5: return !v.str().empty();
    case 6: return !v.list()->items.empty();
    case 7: return v.dict()->ns || !v.dict()->items.empty();
    default: return true;
    }
}

double as_double(const Value & v) {
    if (v.is_float()) return std::get<double>(v.v);
    if (v.is_int()) return double(std::get<int64_t>(v.v));
    return std::get<bool>(v.v) ? 1.0 : 0.0;
}
int64_t as_int(const Value & v) {
    if (v.is_int()) return std::get<int64_t>(v.v);
    return std::get<bool>(v.v) ? 1 : 0;
}
bool int_like(const Value & v) { return v.is_int() || v.is_bool(); }

// Python's ==; *count grows by the elements compared (the renderer bills them as work), and
// past `limit` the comparison gives up (Exhausted).
bool equals(const Value & a, const Value & b, int64_t * count, int64_t limit) {
    if (++*count > limit) throw Exhausted{};
    if (a.is_number() && b.is_number()) {
        if (int_like(a) && int_like(b)) return as_int(a) == as_int(b);
        return as_double(a) == as_double(b);
    }
    if (a.v.index() != b.v.index()) return false;
    switch (a.v.index()) {
    case 0:
    case 1: return true;
    case 5: return a.str() == b.str();
    case 6: {
        if (a.list() == b.list()) return true;
        const auto & x = a.list()->items;
        const auto & y = b.list()->items;
        if (a.list()->tuple != b.list()->tuple || x.size() != y.size()) return false;
        for (size_t i = 0; i < x.size(); ++i)
            if (!equals(x[i], y[i], count, limit)) return false;
        return true;
    }
    case 7: {
        if (a.dict()->ns || b.dict()->ns) return a.dict() == b.dict();
        const auto & x = a.dict()->items;
        if (x.size() != b.dict()->items.size()) return false;
        for (const auto & [k, val] : x) {
            const Value * o = b.dict()->find(k);
            if (!o || !equals(val, *o, count, limit)) return false;
        }
        return true;
    }
    default: return std::get<FuncP>(a.v) == std::get<FuncP>(b.v);
    }
}

// ---------------------------------------------------------------- tokens

enum class TT { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, Str, Int, Float, Op, Eof };

struct Token {
    TT t;
    std::string s;   // text, name, string value, operator
    int64_t i = 0;
    double f = 0;
    int line = 0;
};

[[noreturn]] void syntax(int line, const std::string & msg) {
    throw Error("template line " + std::to_string(line) + ": " + msg);
}

std::string describe(const Token & t) {
    switch (t.t) {
    case TT::Text: return "text";
    case TT::VarBegin: return "'{{'";
    case TT::VarEnd: return "'}}'";
    case TT::BlockBegin: return "'{%'";
    case TT::BlockEnd: return "'%}'";
    case TT::Name: return "'" + t.s + "'";
    case TT::Str: return "a string";
    case TT::Int:
    case TT::Float: return "a number";
    case TT::Op: return "'" + t.s + "'";
    default: return "the end of the template";
    }
}

class Lexer {
public:
    explicit Lexer(std::string_view source) {
        src_.reserve(source.size());
        for (size_t i = 0; i < source.size(); ++i) {   // newlines normalised to \n, as Jinja's lexer does
            if (source[i] == '\r') {
                src_ += '\n';
                if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
            } else {
                src_ += source[i];
            }
        }
        if (!src_.empty() && src_.back() == '\n') src_.pop_back();   // keep_trailing_newline=False
    }

    std::vector<Token> run() {
        size_t pos = 0;
        bool strip_next = false, trim_next = false;
        while (pos <= src_.size()) {
            size_t at = pos;
            while ((at = src_.find('{', at)) != std::string::npos) {
                if (at + 1 < src_.size() && (src_[at + 1] == '{' || src_[at + 1] == '%' || src_[at + 1] == '#')) break;
                ++at;
            }
            const size_t text_end = at == std::string::npos ? src_.size() : at;
            std::string text = src_.substr(pos, text_end - pos);
            apply_leading(text, strip_next, trim_next);
            strip_next = trim_next = false;
            if (at == std::string::npos) {
                emit_text(std::move(text), pos);
                break;
            }
            const char kind = src_[at + 1];
            size_t p = at + 2;
            char sign = 0;
            if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) sign = src_[p++];
            // whitespace control before the tag
            if (sign == '-') {
                while (!text.empty() && std::isspace(uint8_t(text.back()))) text.pop_back();
            } else if (kind != '{' && sign != '+') {   // lstrip_blocks
                size_t k = text_end;
                while (k > pos && (src_[k - 1] == ' ' || src_[k - 1] == '\t')) --k;
                if ((k == 0 || src_[k - 1] == '\n') && text_end - k <= text.size()) text.resize(text.size() - (text_end - k));
            }
            emit_text(std::move(text), pos);
            const int line = line_at(at);
            if (kind == '#') {
                const size_t e = src_.find("#}", p);
                if (e == std::string::npos) syntax(line, "a comment opened here is never closed with '#}'");
                strip_next = e > p && src_[e - 1] == '-';
                trim_next = !strip_next && !(e > p && src_[e - 1] == '+');
                pos = e + 2;
                continue;
            }
            if (kind == '%' && is_raw(p)) {
                pos = lex_raw(p, line, strip_next, trim_next);
                continue;
            }
            toks_.push_back({kind == '{' ? TT::VarBegin : TT::BlockBegin, {}, 0, 0, line});
            pos = lex_tag(p, kind == '{', strip_next, trim_next);
        }
        toks_.push_back({TT::Eof, {}, 0, 0, line_at(src_.size())});
        return std::move(toks_);
    }

private:
    std::string src_;
    std::vector<Token> toks_;
    std::vector<size_t> newline_at_;   // lazily filled

    int line_at(size_t off) {
        if (newline_at_.empty()) {
            newline_at_.push_back(0);
            for (size_t i = 0; i < src_.size(); ++i)
                if (src_[i] == '\n') newline_at_.push_back(i + 1);
        }
        return int(std::upper_bound(newline_at_.begin(), newline_at_.end(), off) - newline_at_.begin());
    }

    static void apply_leading(std::string & text, bool strip, bool trim) {
        if (strip) {
            size_t b = 0;
            while (b < text.size() && std::isspace(uint8_t(text[b]))) ++b;
            text.erase(0, b);
        } else if (trim && !text.empty() && text[0] == '\n') {   // trim_blocks
            text.erase(0, 1);
        }
    }

    void emit_text(std::string text, size_t pos) {
        if (!text.empty()) toks_.push_back({TT::Text, std::move(text), 0, 0, line_at(pos)});
    }

    static bool name_char(char c) { return std::isalnum(uint8_t(c)) || c == '_'; }

    bool is_raw(size_t p) const {
        while (p < src_.size() && std::isspace(uint8_t(src_[p]))) ++p;
        if (src_.compare(p, 3, "raw") != 0 || (p + 3 < src_.size() && name_char(src_[p + 3]))) return false;
        p += 3;
        while (p < src_.size() && std::isspace(uint8_t(src_[p]))) ++p;
        if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) ++p;
        return src_.compare(p, 2, "%}") == 0;
    }

    size_t lex_raw(size_t p, int line, bool & strip_next, bool & trim_next) {
        size_t e = src_.find("%}", p);
        const bool strip = src_[e - 1] == '-';
        size_t body = e + 2;
        for (size_t s = src_.find("{%", body); s != std::string::npos; s = src_.find("{%", s + 2)) {
            size_t q = s + 2;
            const bool lstrip = q < src_.size() && src_[q] == '-';
            if (q < src_.size() && (src_[q] == '-' || src_[q] == '+')) ++q;
            while (q < src_.size() && std::isspace(uint8_t(src_[q]))) ++q;
            if (src_.compare(q, 6, "endraw") != 0) continue;
            q += 6;
            while (q < src_.size() && std::isspace(uint8_t(src_[q]))) ++q;
            const bool rstrip = q < src_.size() && src_[q] == '-';
            if (q < src_.size() && (src_[q] == '-' || src_[q] == '+')) ++q;
            if (src_.compare(q, 2, "%}") != 0) continue;
            std::string text = src_.substr(body, s - body);
            apply_leading(text, strip, !strip);
            if (lstrip)
                while (!text.empty() && std::isspace(uint8_t(text.back()))) text.pop_back();
            emit_text(std::move(text), body);
            strip_next = rstrip;
            trim_next = !rstrip && src_[q - 1] != '+';
            return q + 2;
        }
        syntax(line, "{% raw %} is never closed with {% endraw %}");
    }

    size_t lex_tag(size_t p, bool var, bool & strip_next, bool & trim_next) {
        const int open_line = line_at(p);
        std::vector<char> balance;
        for (;;) {
            while (p < src_.size() && std::isspace(uint8_t(src_[p]))) ++p;
            if (p >= src_.size()) syntax(open_line, std::string("a tag opened here is never closed with '") + (var ? "}}" : "%}") + "'");
            const int line = line_at(p);
            const char c = src_[p];
            if (balance.empty()) {
                const char * end = var ? "}}" : "%}";
                size_t q = p;
                char sign = 0;
                if ((c == '-' || (!var && c == '+')) && src_.compare(p + 1, 2, end) == 0) sign = c, ++q;
                if (src_.compare(q, 2, end) == 0) {
                    toks_.push_back({var ? TT::VarEnd : TT::BlockEnd, {}, 0, 0, line});
                    strip_next = sign == '-';
                    trim_next = !var && sign == 0;
                    return q + 2;
                }
            }
            if (c == '\'' || c == '"') {
                std::string s;
                size_t q = p + 1;
                for (; q < src_.size() && src_[q] != c; ++q) {
                    if (src_[q] != '\\' || q + 1 >= src_.size()) {
                        s += src_[q];
                        continue;
                    }
                    const char e = src_[++q];
                    switch (e) {
                    case 'n': s += '\n'; break;
                    case 't': s += '\t'; break;
                    case 'r': s += '\r'; break;
                    case '0': s += '\0'; break;
                    case 'a': s += '\a'; break;
                    case 'b': s += '\b'; break;
                    case 'f': s += '\f'; break;
                    case 'v': s += '\v'; break;
                    case '\n': break;
                    case '\\':
                    case '\'':
                    case '"': s += e; break;
                    case 'x':
                    case 'u':
                    case 'U': {
                        const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                        if (q + n >= src_.size()) syntax(line, "a truncated \\" + std::string(1, e) + " escape in a string");
                        uint32_t cp = 0;
                        for (size_t k = 1; k <= n; ++k) {
                            const char h = src_[q + k];
                            const int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                            if (d < 0) syntax(line, "a bad \\" + std::string(1, e) + " escape in a string");
                            cp = cp * 16 + uint32_t(d);
                        }
                        if (cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) syntax(line, "an escape in a string names no character");
                        append_utf8(s, cp);
                        q += n;
                        break;
                    }
                    default: s += '\\', s += e;   // Python keeps unknown escapes
                    }
                }
                if (q >= src_.size()) syntax(line, "a string is never closed");
                toks_.push_back({TT::Str, std::move(s), 0, 0, line});
                p = q + 1;
                continue;
            }
            if (std::isdigit(uint8_t(c))) {
                size_t q = p;
                bool flt = false;
                auto digits = [&] {
                    while (q < src_.size() && (std::isdigit(uint8_t(src_[q])) || (src_[q] == '_' && q + 1 < src_.size() && std::isdigit(uint8_t(src_[q + 1]))))) ++q;
                };
                digits();
                if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(uint8_t(src_[q + 1]))) {
                    flt = true;
                    ++q;
                    digits();
                }
                if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
                    size_t r = q + 1;
                    if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
                    if (r < src_.size() && std::isdigit(uint8_t(src_[r]))) {
                        flt = true;
                        q = r;
                        digits();
                    }
                }
                std::string text;
                for (size_t k = p; k < q; ++k)
                    if (src_[k] != '_') text += src_[k];
                Token t{flt ? TT::Float : TT::Int, text, 0, 0, line};
                if (flt) {
                    t.f = std::strtod(text.c_str(), nullptr);
                } else {
                    auto r = std::from_chars(text.data(), text.data() + text.size(), t.i);
                    if (r.ec != std::errc()) syntax(line, "the integer " + text + " is too large");
                }
                toks_.push_back(std::move(t));
                p = q;
                continue;
            }
            if (std::isalpha(uint8_t(c)) || c == '_') {
                size_t q = p;
                while (q < src_.size() && name_char(src_[q])) ++q;
                toks_.push_back({TT::Name, src_.substr(p, q - p), 0, 0, line});
                p = q;
                continue;
            }
            static const char * k_ops[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "(", ")", "[",
                                           "]", "{", "}", ",", ".", ":", "|", "<", ">", "=", ";"};
            const char * op = nullptr;
            for (const char * o : k_ops)
                if (src_.compare(p, std::strlen(o), o) == 0) {
                    op = o;
                    break;
                }
            if (!op) syntax(line, "unexpected character " + quote_untrusted(src_.substr(p, 1), false) + " in a tag");
            if (*op == '(' || *op == '[' || *op == '{') balance.push_back(*op);
            if (*op == ')' || *op == ']' || *op == '}') {
                const char want = *op == ')' ? '(' : *op == ']' ? '[' : '{';
                if (balance.empty() || balance.back() != want) syntax(line, std::string("unexpected '") + op + "'");
                balance.pop_back();
            }
            toks_.push_back({TT::Op, op, 0, 0, line});
            p += std::strlen(op);
        }
    }

    static void append_utf8(std::string & s, uint32_t cp) {
        if (cp < 0x80) {
            s += char(cp);
        } else if (cp < 0x800) {
            s += char(0xc0 | (cp >> 6));
            s += char(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            s += char(0xe0 | (cp >> 12));
            s += char(0x80 | ((cp >> 6) & 0x3f));
            s += char(0x80 | (cp & 0x3f));
        } else {
            s += char(0xf0 | (cp >> 18));
            s += char(0x80 | ((cp >> 12) & 0x3f));
            s += char(0x80 | ((cp >> 6) & 0x3f));
            s += char(0x80 | (cp & 0x3f));
        }
    }
};

// ---------------------------------------------------------------- syntax tree

enum class NK {
    // expressions
    Lit, Name, ListLit, TupleLit, DictLit, Attr, Index, Slice, Call, Filter, Test, Neg, Pos, Not, Binary, Compare, And, Or,
    Cond, Concat,
    // statements
    Block, Text, Output, If, For, Set, SetBlock, Macro, FilterBlock, Break, Continue,
};

struct Node;
using NodeP = std::unique_ptr<Node>;

struct Node {
    Node() = default;
    Node(const Node &) = delete;
    Node & operator=(const Node &) = delete;
    // Without recursion: a chain (a.b.c..., x|f|g..., a + b + ...) is as deep as it is long.
    ~Node() {
        std::vector<std::unique_ptr<Node>> stack;
        for (auto & ch : c)
            if (ch) stack.push_back(std::move(ch));
        while (!stack.empty()) {
            std::unique_ptr<Node> n = std::move(stack.back());
            stack.pop_back();
            for (auto & ch : n->c)
                if (ch) stack.push_back(std::move(ch));
        }
    }

    NK k;
    int line = 0;
    std::string s;                    // name, attribute, operator, filter/test name, text
    Value lit;                        // Lit
    std::vector<NodeP> c;             // children; see the parser for each kind's layout
    std::vector<std::string> names;   // keyword argument names (the last names.size() arguments), for targets, macro params
    bool negate = false;              // Test: `is not`
};

NodeP make(NK k, int line) {
    auto n = std::make_unique<Node>();
    n->k = k;
    n->line = line;
    return n;
}

const std::unordered_set<std::string> & filter_names() {
    static const std::unordered_set<std::string> k = {
        "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "indent",
        "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace",
        "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim", "unique",
        "upper", "wordcount"};
    return k;
}
const std::unordered_set<std::string> & test_names() {
    static const std::unordered_set<std::string> k = {
        "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "==", "even", "false", "float", "ge", ">=",
        "gt", "greaterthan", ">", "in", "integer", "iterable", "le", "<=", "lower", "lt", "lessthan", "<", "mapping",
        "ne", "!=", "none", "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper"};
    return k;
}

constexpr int k_max_nesting = 200;

class Parser {
public:
    explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

    NodeP parse() {
        std::string end;
        NodeP body = body_until({}, &end, "");
        return body;
    }

private:
    std::vector<Token> t_;
    size_t p_ = 0;
    int depth_ = 0;
    int loops_ = 0;
    int ifs_ = 0;   // if blocks open around the parse position

    struct Depth {
        Parser & p;
        explicit Depth(Parser & pp, int line) : p(pp) {
            if (++p.depth_ > k_max_nesting) syntax(line, "nesting deeper than " + std::to_string(k_max_nesting));
        }
        ~Depth() { --p.depth_; }
    };

    const Token & cur() const { return t_[p_]; }
    const Token & peek(size_t n = 1) const { return t_[std::min(p_ + n, t_.size() - 1)]; }
    bool is_op(const char * op) const { return cur().t == TT::Op && cur().s == op; }
    bool is_name(const char * n) const { return cur().t == TT::Name && cur().s == n; }
    [[noreturn]] void fail_here(const std::string & what) const { syntax(cur().line, what + ", got " + describe(cur())); }
    void expect_op(const char * op) {
        if (!is_op(op)) fail_here(std::string("expected '") + op + "'");
        ++p_;
    }
    void expect(TT t, const char * what) {
        if (cur().t != t) fail_here(std::string("expected ") + what);
        ++p_;
    }
    std::string expect_name() {
        if (cur().t != TT::Name) fail_here("expected a name");
        return t_[p_++].s;
    }

    // Statements until one of `ends` opens a tag; *which is the tag found.
    NodeP body_until(std::initializer_list<std::string_view> ends, std::string * which, const std::string & inside) {
        auto block = make(NK::Block, cur().line);
        const int open_line = cur().line;
        for (;;) {
            const Token & tk = cur();
            if (tk.t == TT::Eof) {
                if (ends.size() == 0) return block;
                syntax(open_line, "'" + inside + "' opened here is never closed with {% " + std::string(*ends.begin()) + " %}" +
                                      (ends.size() > 1 ? " (or another of its clauses)" : ""));
            }
            if (tk.t == TT::Text) {
                auto n = make(NK::Text, tk.line);
                n->s = tk.s;
                block->c.push_back(std::move(n));
                ++p_;
            } else if (tk.t == TT::VarBegin) {
                ++p_;
                auto n = make(NK::Output, tk.line);
                n->c.push_back(tuple_expr(true));
                expect(TT::VarEnd, "'}}'");
                block->c.push_back(std::move(n));
            } else if (tk.t == TT::BlockBegin) {
                const Token & name = peek();
                if (name.t != TT::Name) syntax(name.line, "expected a tag name after '{%', got " + describe(name));
                for (std::string_view e : ends)
                    if (name.s == e) {
                        *which = name.s;
                        p_ += 2;
                        return block;
                    }
                block->c.push_back(statement());
            } else {
                fail_here("unexpected");
            }
        }
    }

    NodeP statement() {
        ++p_;   // {%
        const Token tag = t_[p_++];
        Depth d(*this, tag.line);
        const std::string & n = tag.s;
        if (n == "if") return parse_if(tag.line);
        if (n == "for") return parse_for(tag.line);
        if (n == "set") return parse_set(tag.line);
        if (n == "macro") return parse_macro(tag.line);
        if (n == "filter") {
            auto node = make(NK::FilterBlock, tag.line);
            node->c.push_back(filter_chain(nullptr));
            expect(TT::BlockEnd, "'%}'");
            std::string w;
            node->c.push_back(body_until({"endfilter"}, &w, "filter"));
            expect(TT::BlockEnd, "'%}'");
            return node;
        }
        if (n == "generation") {   // transformers' tag marking the assistant's text; renders its body
            std::string w;
            expect(TT::BlockEnd, "'%}'");
            NodeP body = body_until({"endgeneration"}, &w, "generation");
            expect(TT::BlockEnd, "'%}'");
            return body;
        }
        if (n == "break" || n == "continue") {
            if (loops_ == 0) syntax(tag.line, "'" + n + "' outside a loop");
            expect(TT::BlockEnd, "'%}'");
            return make(n == "break" ? NK::Break : NK::Continue, tag.line);
        }
        static const std::unordered_set<std::string> k_known = {"include", "extends", "import", "from", "block", "call",
                                                                   "with", "do", "autoescape", "trans"};
        if (k_known.count(n)) syntax(tag.line, "the '" + n + "' tag is not supported in chat templates by moesh");
        if (n.rfind("end", 0) == 0 || n == "else" || n == "elif")
            syntax(tag.line, "'" + n + "' without an open block it could close");
        syntax(tag.line, "unknown tag " + quote_untrusted(n, true));
    }

    NodeP parse_if(int line) {
        auto node = make(NK::If, line);
        node->c.push_back(tuple_expr(false));
        expect(TT::BlockEnd, "'%}'");
        ++ifs_;
        struct Leave {
            int & n;
            ~Leave() { --n; }
        } leave{ifs_};
        for (;;) {
            std::string w;
            node->c.push_back(body_until({"elif", "else", "endif"}, &w, "if"));
            if (w == "elif") {
                node->c.push_back(tuple_expr(false));
                expect(TT::BlockEnd, "'%}'");
                continue;
            }
            if (w == "else") {
                expect(TT::BlockEnd, "'%}'");
                node->c.push_back(body_until({"endif"}, &w, "if"));
            }
            expect(TT::BlockEnd, "'%}'");
            return node;
        }
    }

    NodeP parse_for(int line) {
        auto node = make(NK::For, line);
        node->names.push_back(expect_name());
        while (is_op(",")) {
            ++p_;
            node->names.push_back(expect_name());
        }
        if (!is_name("in")) fail_here("expected 'in' in a for loop");
        ++p_;
        node->c.push_back(tuple_expr(false));
        if (is_name("if")) {
            ++p_;
            node->c.push_back(expr(true));
        } else {
            node->c.push_back(nullptr);
        }
        if (is_name("recursive")) syntax(line, "recursive loops are not supported in chat templates by moesh");
        expect(TT::BlockEnd, "'%}'");
        std::string w;
        ++loops_;
        node->c.push_back(body_until({"else", "endfor"}, &w, "for"));
        --loops_;
        if (w == "else") {
            expect(TT::BlockEnd, "'%}'");
            node->c.push_back(body_until({"endfor"}, &w, "for"));
        } else {
            node->c.push_back(nullptr);
        }
        expect(TT::BlockEnd, "'%}'");
        return node;
    }

    NodeP parse_set(int line) {
        NodeP target;
        const int tl = cur().line;
        std::string first = expect_name();
        if (is_op(".")) {
            ++p_;
            target = make(NK::Attr, tl);
            auto obj = make(NK::Name, tl);
            obj->s = first;
            target->c.push_back(std::move(obj));
            target->s = expect_name();
        } else if (is_op(",")) {
            target = make(NK::TupleLit, tl);
            target->names.push_back(first);
            while (is_op(",")) {
                ++p_;
                target->names.push_back(expect_name());
            }
        } else {
            target = make(NK::Name, tl);
            target->s = first;
        }
        if (is_op("=")) {
            ++p_;
            auto node = make(NK::Set, line);
            node->c.push_back(std::move(target));
            node->c.push_back(tuple_expr(true));
            expect(TT::BlockEnd, "'%}'");
            return node;
        }
        if (target->k != NK::Name) fail_here("expected '=' (a block set takes one name)");
        auto node = make(NK::SetBlock, line);
        node->c.push_back(std::move(target));
        if (is_op("|")) {
            ++p_;
            node->c.push_back(filter_chain(nullptr));
        } else {
            node->c.push_back(nullptr);
        }
        expect(TT::BlockEnd, "'%}'");
        std::string w;
        node->c.push_back(body_until({"endset"}, &w, "set"));
        expect(TT::BlockEnd, "'%}'");
        return node;
    }

    NodeP parse_macro(int line) {
        auto node = make(NK::Macro, line);
        node->s = expect_name();
        expect_op("(");
        std::vector<NodeP> defaults;
        while (!is_op(")")) {
            if (!node->names.empty()) expect_op(",");
            if (is_op(")")) break;
            node->names.push_back(expect_name());
            if (is_op("=")) {
                ++p_;
                defaults.push_back(expr(true));
            } else {
                defaults.push_back(nullptr);
            }
        }
        ++p_;
        expect(TT::BlockEnd, "'%}'");
        std::string w;
        const int saved = loops_;
        loops_ = 0;
        node->c.push_back(body_until({"endmacro"}, &w, "macro"));
        loops_ = saved;
        if (cur().t == TT::Name) ++p_;   // {% endmacro name %}
        expect(TT::BlockEnd, "'%}'");
        for (auto & d : defaults) node->c.push_back(std::move(d));
        return node;
    }

    // ------------------------------------------------------------ expressions

    NodeP tuple_expr(bool with_cond) {
        const int line = cur().line;
        NodeP first = expr(with_cond);
        if (!is_op(",")) return first;
        auto t = make(NK::TupleLit, line);
        t->c.push_back(std::move(first));
        while (is_op(",")) {
            ++p_;
            if (cur().t == TT::VarEnd || cur().t == TT::BlockEnd || is_op(")") || is_name("if")) break;
            t->c.push_back(expr(with_cond));
        }
        return t;
    }

    NodeP expr(bool with_cond) {
        Depth d(*this, cur().line);
        if (!with_cond) return or_expr();
        NodeP e = or_expr();
        while (is_name("if")) {
            const int line = cur().line;
            ++p_;
            auto n = make(NK::Cond, line);
            NodeP cond = or_expr();
            n->c.push_back(std::move(e));
            n->c.push_back(std::move(cond));
            if (is_name("else")) {
                ++p_;
                n->c.push_back(expr(true));
            } else {
                n->c.push_back(nullptr);
            }
            e = std::move(n);
        }
        return e;
    }

    NodeP binary(NK k, const std::string & op, NodeP a, NodeP b, int line) {
        auto n = make(k, line);
        n->s = op;
        n->c.push_back(std::move(a));
        n->c.push_back(std::move(b));
        return n;
    }

    NodeP or_expr() {
        NodeP l = and_expr();
        while (is_name("or")) {
            const int line = t_[p_++].line;
            l = binary(NK::Or, "or", std::move(l), and_expr(), line);
        }
        return l;
    }
    NodeP and_expr() {
        NodeP l = not_expr();
        while (is_name("and")) {
            const int line = t_[p_++].line;
            l = binary(NK::And, "and", std::move(l), not_expr(), line);
        }
        return l;
    }
    NodeP not_expr() {
        if (is_name("not")) {
            Depth d(*this, cur().line);
            auto n = make(NK::Not, t_[p_++].line);
            n->c.push_back(not_expr());
            return n;
        }
        return compare();
    }
    NodeP compare() {
        const int line = cur().line;
        NodeP first = math1();
        NodeP cmp;
        for (;;) {
            std::string op;
            if (cur().t == TT::Op && (cur().s == "==" || cur().s == "!=" || cur().s == "<" || cur().s == ">" ||
                                      cur().s == "<=" || cur().s == ">=")) {
                op = t_[p_++].s;
            } else if (is_name("in")) {
                ++p_;
                op = "in";
            } else if (is_name("not") && peek().t == TT::Name && peek().s == "in") {
                p_ += 2;
                op = "not in";
            } else {
                break;
            }
            if (!cmp) {
                cmp = make(NK::Compare, line);
                cmp->c.push_back(std::move(first));
            }
            cmp->names.push_back(op);
            cmp->c.push_back(math1());
        }
        return cmp ? std::move(cmp) : std::move(first);
    }
    NodeP math1() {
        NodeP l = concat();
        while (is_op("+") || is_op("-")) {
            const Token & op = t_[p_++];
            l = binary(NK::Binary, op.s, std::move(l), concat(), op.line);
        }
        return l;
    }
    NodeP concat() {
        const int line = cur().line;
        NodeP first = math2();
        if (!is_op("~")) return first;
        auto n = make(NK::Concat, line);
        n->c.push_back(std::move(first));
        while (is_op("~")) {
            ++p_;
            n->c.push_back(math2());
        }
        return n;
    }
    NodeP math2() {
        NodeP l = pow_expr();
        while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
            const Token & op = t_[p_++];
            l = binary(NK::Binary, op.s, std::move(l), pow_expr(), op.line);
        }
        return l;
    }
    NodeP pow_expr() {
        NodeP l = unary(true);
        while (is_op("**")) {
            const int line = t_[p_++].line;
            l = binary(NK::Binary, "**", std::move(l), unary(true), line);
        }
        return l;
    }
    NodeP unary(bool with_filter) {
        Depth d(*this, cur().line);
        NodeP n;
        if (is_op("-") || is_op("+")) {
            const Token & op = t_[p_++];
            n = make(op.s == "-" ? NK::Neg : NK::Pos, op.line);
            n->c.push_back(unary(false));
        } else {
            n = primary();
        }
        n = postfix(std::move(n));
        if (with_filter) n = filter_expr(std::move(n));
        return n;
    }

    NodeP primary() {
        const Token & tk = cur();
        Depth d(*this, tk.line);
        if (tk.t == TT::Name) {
            ++p_;
            auto n = make(NK::Lit, tk.line);
            if (tk.s == "true" || tk.s == "True") n->lit = true;
            else if (tk.s == "false" || tk.s == "False") n->lit = false;
            else if (tk.s == "none" || tk.s == "None") n->lit = None{};
            else {
                n->k = NK::Name;
                n->s = tk.s;
            }
            return n;
        }
        if (tk.t == TT::Str) {
            auto n = make(NK::Lit, tk.line);
            std::string s;
            while (cur().t == TT::Str) s += t_[p_++].s;
            n->lit = std::move(s);
            return n;
        }
        if (tk.t == TT::Int || tk.t == TT::Float) {
            ++p_;
            auto n = make(NK::Lit, tk.line);
            n->lit = tk.t == TT::Int ? Value(tk.i) : Value(tk.f);
            return n;
        }
        if (tk.t == TT::Op && tk.s == "(") {
            ++p_;
            if (is_op(")")) {
                ++p_;
                return make(NK::TupleLit, tk.line);
            }
            NodeP first = expr(true);
            if (is_op(",")) {
                auto t = make(NK::TupleLit, tk.line);
                t->c.push_back(std::move(first));
                while (is_op(",")) {
                    ++p_;
                    if (is_op(")")) break;
                    t->c.push_back(expr(true));
                }
                first = std::move(t);
            }
            expect_op(")");
            return first;
        }
        if (tk.t == TT::Op && tk.s == "[") {
            ++p_;
            auto n = make(NK::ListLit, tk.line);
            while (!is_op("]")) {
                if (!n->c.empty()) {
                    expect_op(",");
                    if (is_op("]")) break;
                }
                n->c.push_back(expr(true));
            }
            ++p_;
            return n;
        }
        if (tk.t == TT::Op && tk.s == "{") {
            ++p_;
            auto n = make(NK::DictLit, tk.line);
            while (!is_op("}")) {
                if (!n->c.empty()) {
                    expect_op(",");
                    if (is_op("}")) break;
                }
                n->c.push_back(expr(true));
                expect_op(":");
                n->c.push_back(expr(true));
            }
            ++p_;
            return n;
        }
        fail_here("expected an expression");
    }

    NodeP postfix(NodeP n) {
        for (;;) {
            if (is_op(".")) {
                const int line = t_[p_++].line;
                if (cur().t == TT::Int) {
                    auto idx = make(NK::Index, line);
                    auto lit = make(NK::Lit, line);
                    lit->lit = cur().i;
                    ++p_;
                    idx->c.push_back(std::move(n));
                    idx->c.push_back(std::move(lit));
                    n = std::move(idx);
                    continue;
                }
                auto a = make(NK::Attr, line);
                a->s = expect_name();
                a->c.push_back(std::move(n));
                n = std::move(a);
            } else if (is_op("[")) {
                const int line = t_[p_++].line;
                n = subscript(std::move(n), line);
            } else if (is_op("(")) {
                n = call(std::move(n));
            } else {
                return n;
            }
        }
    }

    NodeP subscript(NodeP obj, int line) {
        NodeP parts[3];
        bool slice = false;
        int i = 0;
        for (;;) {
            if (is_op("]")) break;
            if (is_op(":")) {
                slice = true;
                if (++i > 2) fail_here("too many ':' in a slice");
                ++p_;
                continue;
            }
            if (parts[i]) fail_here("expected ']'");
            parts[i] = expr(true);
        }
        ++p_;
        if (!slice) {
            if (!parts[0]) syntax(line, "an empty subscript []");
            auto n = make(NK::Index, line);
            n->c.push_back(std::move(obj));
            n->c.push_back(std::move(parts[0]));
            return n;
        }
        auto n = make(NK::Slice, line);
        n->c.push_back(std::move(obj));
        for (auto & part : parts) n->c.push_back(std::move(part));
        return n;
    }

    // Arguments after '(' into n->c (from index `from`), keyword names into n->names.
    void arguments(Node & n) {
        expect_op("(");
        bool first = true;
        while (!is_op(")")) {
            if (!first) {
                expect_op(",");
                if (is_op(")")) break;
            }
            first = false;
            if (is_op("*") || is_op("**")) fail_here("*args and **kwargs in calls are not supported");
            if (cur().t == TT::Name && peek().t == TT::Op && peek().s == "=") {
                n.names.push_back(t_[p_].s);
                p_ += 2;
                n.c.push_back(expr(true));
            } else {
                if (!n.names.empty()) fail_here("a positional argument after a keyword argument");
                n.c.push_back(expr(true));
            }
        }
        ++p_;
    }

    NodeP call(NodeP callee) {
        auto n = make(NK::Call, cur().line);
        n->c.push_back(std::move(callee));
        arguments(*n);
        return n;
    }

    // `| name(args) | ...` applied to `value` (nullptr in a filter block).
    NodeP filter_chain(NodeP value) {
        bool first = value == nullptr;
        for (;;) {
            if (!first) {
                if (!is_op("|")) return value;
                ++p_;
            }
            first = false;
            auto f = make(NK::Filter, cur().line);
            f->s = expect_name();
            while (is_op(".")) {
                ++p_;
                f->s += '.';
                f->s += expect_name();
            }
            // as Jinja 3: an unknown filter inside an if block fails only if that block runs
            if (!filter_names().count(f->s) && ifs_ == 0) syntax(f->line, "no filter named " + quote_untrusted(f->s, true));
            f->c.push_back(std::move(value));
            if (is_op("(")) arguments(*f);
            value = std::move(f);
        }
    }

    NodeP filter_expr(NodeP n) {
        for (;;) {
            if (is_op("|")) {
                n = filter_chain(std::move(n));
            } else if (is_name("is")) {
                auto t = make(NK::Test, t_[p_++].line);
                if (is_name("not")) {
                    t->negate = true;
                    ++p_;
                }
                t->s = expect_name();
                if (!test_names().count(t->s) && ifs_ == 0) syntax(t->line, "no test named " + quote_untrusted(t->s, true));
                t->c.push_back(std::move(n));
                const Token & a = cur();
                if (is_op("(")) {
                    arguments(*t);
                } else if ((a.t == TT::Name || a.t == TT::Str || a.t == TT::Int || a.t == TT::Float ||
                            (a.t == TT::Op && (a.s == "(" || a.s == "[" || a.s == "{"))) &&
                           !(a.t == TT::Name && (a.s == "else" || a.s == "or" || a.s == "and" || a.s == "is"))) {
                    t->c.push_back(postfix(primary()));
                }
                n = std::move(t);
            } else if (is_op("(")) {
                n = call(std::move(n));
            } else {
                return n;
            }
        }
    }
};

// ---------------------------------------------------------------- rendering

struct Scope {
    std::unordered_map<std::string, Value> vars;
    Scope * parent = nullptr;
    const Value * find(const std::string & k) const {
        for (const Scope * s = this; s; s = s->parent) {
            auto it = s->vars.find(k);
            if (it != s->vars.end()) return &it->second;
        }
        return nullptr;
    }
};

enum class Flow { Normal, Break, Continue };

class Renderer {
public:
    Renderer(const RenderOptions & o) : opt_(o) {}

    std::string run(const Node & root, const ojson & vars) {
        install_globals();
        Scope top;
        top.parent = &globals_;
        if (vars.is_object())
            for (const auto & [k, v] : vars.items()) top.vars[k] = from_json(v);
        top_ = &top;
        std::string out;
        exec(root, top, out);
        return out;
    }

private:
    const RenderOptions & opt_;
    Scope globals_;
    Scope * top_ = nullptr;
    int64_t steps_ = 0;
    size_t produced_ = 0;
    size_t allocated_ = 0;
    int depth_ = 0;     // macro calls
    int nesting_ = 0;   // evaluations on the stack
    int line_ = 0;

    // Work proportional to n elements (so that a loop inside a builtin is bounded like one in the template).
    void work(size_t n) {
        steps_ += int64_t(std::min<size_t>(n, size_t(INT64_MAX / 2)));
        if (steps_ > opt_.limits.max_steps) fail("the template ran more than " + std::to_string(opt_.limits.max_steps) + " steps");
    }
    bool eq(const Value & a, const Value & b) {
        int64_t n = 0;
        bool r = false;
        try {
            r = equals(a, b, &n, opt_.limits.max_steps - steps_);
        } catch (const Exhausted &) {
            work(size_t(opt_.limits.max_steps));
        }
        work(size_t(n));
        return r;
    }
    // str() of a value, within the output limit
    std::string str(const Value & v) {
        if (v.is_str()) work(v.str().size() / 64);
        try {
            std::string s = to_str(v, opt_.limits.max_output);
            if (!v.is_str()) charge(s.size());
            return s;
        } catch (const Exhausted &) {
            fail("a value's text is longer than " + std::to_string(opt_.limits.max_output) + " bytes");
        }
    }
    std::string rep(const Value & v) {
        try {
            return repr(v, opt_.limits.max_output);
        } catch (const Exhausted &) {
            fail("a value's text is longer than " + std::to_string(opt_.limits.max_output) + " bytes");
        }
    }
    // Memory a new string or list costs.
    void charge(size_t bytes) {
        work(bytes / 64);
        allocated_ += bytes;
        if (allocated_ > opt_.limits.max_alloc) fail("the template built more than " + std::to_string(opt_.limits.max_alloc) + " bytes of values");
    }
    const Value & shallow(const Value & v) {   // a new list or dict: not nested too deep
        if (depth_of(v) > opt_.limits.max_value_depth)
            fail("lists and dicts nested deeper than " + std::to_string(opt_.limits.max_value_depth));
        return v;
    }
    struct Nest {
        Renderer & r;
        explicit Nest(Renderer & rr) : r(rr) {
            if (++r.nesting_ > r.opt_.limits.max_depth) r.fail("evaluations nested deeper than " + std::to_string(r.opt_.limits.max_depth));
        }
        ~Nest() { --r.nesting_; }
    };
    // Whether `v` holds `target` (a namespace must not hold itself: the cycle would never be freed).
    bool reaches(const Value & v, const DictObj * target, std::vector<const void *> & seen) {
        const void * p = v.is_list() ? static_cast<const void *>(v.list().get()) : v.is_dict() ? static_cast<const void *>(v.dict().get()) : nullptr;
        if (!p) return false;
        if (p == target) return true;
        if (std::find(seen.begin(), seen.end(), p) != seen.end()) return false;
        seen.push_back(p);
        work(1);
        if (v.is_list()) {
            for (const Value & x : v.list()->items)
                if (reaches(x, target, seen)) return true;
        } else {
            for (const auto & kv : v.dict()->items)
                if (reaches(kv.second, target, seen)) return true;
        }
        return false;
    }

    [[noreturn]] void fail(const std::string & msg) const { throw Error("template line " + std::to_string(line_) + ": " + msg); }

    void step(const Node & n) {
        line_ = n.line;
        if (++steps_ > opt_.limits.max_steps) fail("the template ran more than " + std::to_string(opt_.limits.max_steps) + " steps");
    }
    void emit(std::string & out, std::string_view s) {
        produced_ += s.size();
        if (produced_ > opt_.limits.max_output) fail("the template produced more than " + std::to_string(opt_.limits.max_output) + " bytes");
        out += s;
    }

    static FuncP func(std::string name, std::function<Value(Args &)> fn) {
        return std::make_shared<const FuncObj>(FuncObj{std::move(name), std::move(fn)});
    }

    // Keyword or positional argument `i` named `name`; Undef when absent.
    static Value arg(Args & a, size_t i, const char * name, Value dflt = Value()) {
        for (auto & [k, v] : a.kw)
            if (k == name) return v;
        return i < a.pos.size() ? a.pos[i] : dflt;
    }

    void install_globals() {
        globals_.vars["range"] = func("range", [this](Args & a) -> Value {
            std::vector<int64_t> n;
            for (const Value & v : a.pos) {
                if (!int_like(v)) fail("range() takes integers, got " + type_name(v));
                n.push_back(as_int(v));
            }
            if (n.empty() || n.size() > 3) fail("range() takes 1 to 3 integers");
            const int64_t start = n.size() > 1 ? n[0] : 0, stop = n.size() > 1 ? n[1] : n[0], st = n.size() > 2 ? n[2] : 1;
            if (st == 0) fail("range() step must not be zero");
            auto l = new_list();
            for (int64_t i = start; st > 0 ? i < stop : i > stop;) {
                if (int64_t(l->items.size()) >= opt_.limits.max_range) fail("range() longer than " + std::to_string(opt_.limits.max_range));
                l->items.emplace_back(i);
                if (__builtin_add_overflow(i, st, &i)) break;
            }
            work(l->items.size());
            charge(16 * l->items.size());
            return l;
        });
        auto make_dict = [this](Args & a, bool ns) -> Value {
            auto d = std::make_shared<DictObj>();
            d->ns = ns;
            if (!a.pos.empty()) {
                if (a.pos.size() > 1 || !a.pos[0].is_dict()) fail(std::string(ns ? "namespace" : "dict") + "() takes one mapping and keyword arguments");
                d->items = a.pos[0].dict()->items;   // its keys are distinct already
                d->depth = a.pos[0].dict()->depth;
                work(d->items.size());
                charge(weight(a.pos[0]) + 48 * d->items.size());
            }
            for (auto & [k, v] : a.kw) {
                if (ns && !k.empty() && k[0] == '_') fail("a namespace attribute may not start with '_': '" + k + "'");
                charge(weight(v));
                d->set(k, v);
            }
            return shallow(Value(d));
        };
        globals_.vars["namespace"] = func("namespace", [make_dict](Args & a) { return make_dict(a, true); });
        globals_.vars["dict"] = func("dict", [make_dict](Args & a) { return make_dict(a, false); });
        globals_.vars["raise_exception"] = func("raise_exception", [this](Args & a) -> Value {
            throw RaisedError(a.pos.empty() ? std::string() : str(a.pos[0]));
        });
        globals_.vars["strftime_now"] = func("strftime_now", [this](Args & a) -> Value {
            const Value f = arg(a, 0, "format");
            if (!f.is_str()) fail("strftime_now() takes a format string");
            std::tm tm{};
            if (opt_.now) {
                tm = *opt_.now;
            } else {
                const std::time_t t = std::time(nullptr);
                localtime_r(&t, &tm);
            }
            char buf[512];
            const size_t n = f.str().empty() ? 0 : std::strftime(buf, sizeof buf, f.str().c_str(), &tm);
            return std::string(buf, n);
        });
    }

    Value lookup(const std::string & name, Scope & sc) {
        if (const Value * v = sc.find(name)) {
            if (v->is_str()) work(v->str().size() / 64);   // a string is copied
            return *v;
        }
        return Undef{"'" + name + "' is undefined"};
    }

    void need_defined(const Value & v) const {
        if (v.undef()) fail(std::get<Undef>(v.v).why);
    }

    // ------------------------------------------------------------ statements

    Flow exec(const Node & n, Scope & sc, std::string & out) {
        step(n);
        Nest nest(*this);
        switch (n.k) {
        case NK::Block:
            for (const auto & s : n.c) {
                const Flow f = exec(*s, sc, out);
                if (f != Flow::Normal) return f;
            }
            return Flow::Normal;
        case NK::Text: emit(out, n.s); return Flow::Normal;
        case NK::Output: {
            const Value v = eval(*n.c[0], sc);
            if (!v.undef()) emit(out, str(v));
            return Flow::Normal;
        }
        case NK::If: {
            size_t i = 0;
            for (; i + 1 < n.c.size(); i += 2)
                if (truthy(eval(*n.c[i], sc))) return exec(*n.c[i + 1], sc, out);
            if (i < n.c.size()) return exec(*n.c[i], sc, out);
            return Flow::Normal;
        }
        case NK::For: return exec_for(n, sc, out);
        case NK::Set: {
            Value v = eval(*n.c[1], sc);
            assign(*n.c[0], std::move(v), sc);
            return Flow::Normal;
        }
        case NK::SetBlock: {
            std::string body;
            exec(*n.c[2], sc, body);
            Value v(std::move(body));
            if (n.c[1]) v = apply_filters(*n.c[1], std::move(v), sc);
            assign(*n.c[0], std::move(v), sc);
            return Flow::Normal;
        }
        case NK::Macro: sc.vars[n.s] = make_macro(n); return Flow::Normal;
        case NK::FilterBlock: {
            std::string body;
            exec(*n.c[1], sc, body);
            emit(out, str(apply_filters(*n.c[0], Value(std::move(body)), sc)));
            return Flow::Normal;
        }
        case NK::Break: return Flow::Break;
        case NK::Continue: return Flow::Continue;
        default: fail("internal: not a statement");
        }
    }

    void assign(const Node & target, Value v, Scope & sc) {
        if (target.k == NK::Name) {
            sc.vars[target.s] = std::move(v);
        } else if (target.k == NK::Attr) {
            Value obj = eval(*target.c[0], sc);
            if (!obj.is_dict() || !obj.dict()->ns) fail("cannot assign attribute '" + target.s + "' on a " + type_name(obj) + " (only on a namespace())");
            if (!target.s.empty() && target.s[0] == '_') fail("a namespace attribute may not start with '_'");
            std::vector<const void *> seen;
            if (reaches(v, obj.dict().get(), seen)) fail("a namespace cannot hold itself ('" + target.s + "')");
            charge(weight(v));
            obj.dict()->set(target.s, std::move(v));
            shallow(obj);
        } else {
            std::vector<Value> items = iterate(v);
            if (items.size() != target.names.size())
                fail("cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(target.names.size()) + " names");
            for (size_t i = 0; i < items.size(); ++i) sc.vars[target.names[i]] = std::move(items[i]);
        }
    }

    Flow exec_for(const Node & n, Scope & sc, std::string & out) {
        std::vector<Value> items = iterate(eval(*n.c[0], sc));
        if (n.c[1]) {   // `for x in xs if cond`: the loop counts only what passes
            std::vector<Value> kept;
            for (Value & it : items) {
                Scope s;
                s.parent = &sc;
                bind_targets(n, it, s);
                if (truthy(eval(*n.c[1], s))) kept.push_back(std::move(it));
            }
            items = std::move(kept);
        }
        const int64_t len = int64_t(items.size());
        for (int64_t i = 0; i < len; ++i) {
            Scope s;
            s.parent = &sc;
            bind_targets(n, items[size_t(i)], s);
            auto loop = std::make_shared<DictObj>();
            loop->items = {{"index", i + 1},
                           {"index0", i},
                           {"revindex", len - i},
                           {"revindex0", len - i - 1},
                           {"first", i == 0},
                           {"last", i == len - 1},
                           {"length", len},
                           {"depth", int64_t(1)},
                           {"depth0", int64_t(0)},
                           {"previtem", i > 0 ? items[size_t(i - 1)] : Value(Undef{"there is no previous item"})},
                           {"nextitem", i + 1 < len ? items[size_t(i + 1)] : Value(Undef{"there is no next item"})}};
            loop->items.emplace_back("cycle", func("cycle", [this, i](Args & a) -> Value {
                if (a.pos.empty()) fail("loop.cycle() needs at least one value");
                return a.pos[size_t(i) % a.pos.size()];
            }));
            charge(weight(items[size_t(i)]) + 512 + (i > 0 ? weight(items[size_t(i - 1)]) : 0) + (i + 1 < len ? weight(items[size_t(i + 1)]) : 0));
            s.vars["loop"] = Value(loop);
            const Flow f = exec(*n.c[2], s, out);
            if (f == Flow::Break) break;
        }
        if (len == 0 && n.c[3]) return exec(*n.c[3], sc, out);
        return Flow::Normal;
    }

    void bind_targets(const Node & n, const Value & item, Scope & s) {
        if (n.names.size() == 1) {
            s.vars[n.names[0]] = item;
            return;
        }
        std::vector<Value> parts = iterate(item);
        if (parts.size() != n.names.size())
            fail("cannot unpack " + std::to_string(parts.size()) + " values into " + std::to_string(n.names.size()) + " loop variables");
        for (size_t k = 0; k < parts.size(); ++k) s.vars[n.names[k]] = std::move(parts[k]);
    }

    Value make_macro(const Node & n) {
        return func(n.s, [this, &n](Args & a) -> Value {
            if (a.pos.size() > n.names.size())
                fail("macro '" + n.s + "' takes not more than " + std::to_string(n.names.size()) + " argument(s)");
            if (++depth_ > opt_.limits.max_call_depth) fail("macro calls nested deeper than " + std::to_string(opt_.limits.max_call_depth));
            Scope s;
            s.parent = top_;
            for (size_t i = 0; i < n.names.size(); ++i) {
                Value v = i < a.pos.size() ? a.pos[i] : Value(Undef{"'" + n.names[i] + "' is undefined"});
                bool given = i < a.pos.size();
                for (auto & [k, kv] : a.kw)
                    if (k == n.names[i]) {
                        v = kv;
                        given = true;
                    }
                if (!given && n.c[1 + i]) v = eval(*n.c[1 + i], s);
                s.vars[n.names[i]] = std::move(v);
            }
            for (auto & [k, kv] : a.kw)
                if (std::find(n.names.begin(), n.names.end(), k) == n.names.end())
                    fail("macro '" + n.s + "' has no parameter '" + k + "'");
            std::string out;
            exec(*n.c[0], s, out);
            --depth_;
            return out;
        });
    }

    // ------------------------------------------------------------ expressions

    std::vector<Value> iterate(const Value & v) {
        if (v.is_list()) {
            work(v.list()->items.size());
            charge(weight(v.list()->items));
            return v.list()->items;
        }
        if (v.is_dict()) {
            std::vector<Value> keys;
            for (const auto & kv : v.dict()->items) keys.push_back(key_value(kv.first));
            work(keys.size());
            charge(weight(keys));
            return keys;
        }
        if (v.is_str()) {
            std::vector<Value> chars;
            const std::string & s = v.str();
            work(s.size());
            charge(17 * s.size());
            work(s.size() / 64);
            const auto starts = cp_starts(s);
            for (size_t i = 0; i < starts.size(); ++i)
                chars.emplace_back(s.substr(starts[i], (i + 1 < starts.size() ? starts[i + 1] : s.size()) - starts[i]));
            return chars;
        }
        if (v.undef()) return {};
        fail("'" + type_name(v) + "' object is not iterable");
    }

    int64_t length(const Value & v) {
        if (v.is_str()) {
            work(v.str().size() / 64);
            return cp_len(v.str());
        }
        if (v.is_list()) return int64_t(v.list()->items.size());
        if (v.is_dict()) return int64_t(v.dict()->items.size());
        if (v.undef()) return 0;
        fail("object of type '" + type_name(v) + "' has no len()");
    }

    Value eval(const Node & n, Scope & sc) {
        step(n);
        Nest nest(*this);
        switch (n.k) {
        case NK::Lit: return n.lit;
        case NK::Name: return lookup(n.s, sc);
        case NK::ListLit:
        case NK::TupleLit: {
            std::vector<Value> items;
            for (const auto & e : n.c) items.push_back(eval(*e, sc));
            charge(weight(items));
            return shallow(Value(new_list(std::move(items), n.k == NK::TupleLit)));
        }
        case NK::DictLit: {
            auto d = std::make_shared<DictObj>();
            for (size_t i = 0; i + 1 < n.c.size(); i += 2) {
                const Value k = eval(*n.c[i], sc);
                if (!k.is_str() && !k.is_int()) fail("dictionary keys must be strings or integers here, got " + type_name(k));
                Value v = eval(*n.c[i + 1], sc);
                charge(weight(v) + weight(k));
                work(d->items.size());   // set() looks for the key
                d->set(dict_key(k), std::move(v));
            }
            return shallow(Value(d));
        }
        case NK::Attr: return get_attr(eval(*n.c[0], sc), n.s);
        case NK::Index: return get_item(eval(*n.c[0], sc), eval(*n.c[1], sc));
        case NK::Slice: {
            const Value obj = eval(*n.c[0], sc);
            std::optional<int64_t> part[3];
            for (int i = 0; i < 3; ++i)
                if (n.c[1 + i]) {
                    const Value v = eval(*n.c[1 + i], sc);
                    if (v.none()) continue;
                    if (!int_like(v)) fail("slice indices must be integers or None");
                    part[i] = as_int(v);
                }
            return slice(obj, part[0], part[1], part[2]);
        }
        case NK::Call: {
            const Value callee = eval(*n.c[0], sc);
            Args a = eval_args(n, 1, sc);
            line_ = n.line;
            return call(callee, a);
        }
        case NK::Filter: {   // its input (an inner filter of the chain included) is evaluated once
            const Value v = n.c[0] ? eval(*n.c[0], sc) : Value();
            Args a = eval_args(n, 1, sc);
            line_ = n.line;
            return filter(n.s, v, a);
        }
        case NK::Test: {
            const Value v = eval(*n.c[0], sc);
            Args a = eval_args(n, 1, sc);
            line_ = n.line;
            return run_test(n.s, v, a) != n.negate;
        }
        case NK::Neg:
        case NK::Pos: {
            const Value v = eval(*n.c[0], sc);
            need_defined(v);
            if (!v.is_number()) fail("bad operand type for unary " + std::string(n.k == NK::Neg ? "-" : "+") + ": '" + type_name(v) + "'");
            if (n.k == NK::Pos) return v.is_bool() ? Value(as_int(v)) : v;
            if (v.is_float()) return -as_double(v);
            if (as_int(v) == INT64_MIN) fail("integer overflow");
            return -as_int(v);
        }
        case NK::Not: return !truthy(eval(*n.c[0], sc));
        case NK::And: {
            Value l = eval(*n.c[0], sc);
            return truthy(l) ? eval(*n.c[1], sc) : l;
        }
        case NK::Or: {
            Value l = eval(*n.c[0], sc);
            return truthy(l) ? l : eval(*n.c[1], sc);
        }
        case NK::Cond:
            if (truthy(eval(*n.c[1], sc))) return eval(*n.c[0], sc);
            return n.c[2] ? eval(*n.c[2], sc) : Value(Undef{"the conditional expression has no else branch"});
        case NK::Concat: {
            std::string s;
            for (const auto & e : n.c) {
                const std::string part = str(eval(*e, sc));
                charge(part.size());
                s += part;
            }
            return s;
        }
        case NK::Binary: {
            const Value l = eval(*n.c[0], sc);
            const Value r = eval(*n.c[1], sc);
            line_ = n.line;
            return binop(n.s, l, r);
        }
        case NK::Compare: {
            Value l = eval(*n.c[0], sc);
            for (size_t i = 0; i < n.names.size(); ++i) {
                Value r = eval(*n.c[i + 1], sc);
                line_ = n.line;
                if (!compare_op(n.names[i], l, r)) return false;
                l = std::move(r);
            }
            return true;
        }
        default: fail("internal: not an expression");
        }
    }

    Args eval_args(const Node & n, size_t from, Scope & sc) {
        Args a;
        const size_t n_kw = n.names.size();
        const size_t n_all = n.c.size() - from;
        for (size_t i = 0; i < n_all; ++i) {
            Value v = eval(*n.c[from + i], sc);
            if (i + n_kw >= n_all) a.kw.emplace_back(n.names[i + n_kw - n_all], std::move(v));
            else a.pos.push_back(std::move(v));
        }
        return a;
    }

    Value call(const Value & callee, Args & a) {
        need_defined(callee);
        if (!callee.is_func()) fail("'" + type_name(callee) + "' object is not callable");
        return std::get<FuncP>(callee.v)->fn(a);
    }

    Value get_attr(const Value & obj, const std::string & name) {
        need_defined(obj);
        if (!name.empty() && name[0] == '_') return Undef{"access to attribute '" + name + "' of '" + type_name(obj) + "' object is unsafe"};
        if (obj.is_dict()) {
            // Python's getattr first: a dict's methods hide keys of the same name (d['items'] reaches the key)
            if (!obj.dict()->ns) {
                if (name == "items" || name == "keys" || name == "values" || name == "get" || name == "copy") return method(obj, name);
                if (name == "pop" || name == "popitem" || name == "setdefault" || name == "update" || name == "clear")
                    fail("access to attribute '" + name + "' of 'dict' object is unsafe");
            }
            if (const Value * v = obj.dict()->find(name)) return *v;
            return Undef{"'" + type_name(obj) + " object' has no attribute '" + name + "'"};
        }
        if (obj.is_str()) {
            static const std::unordered_set<std::string> k = {"strip", "lstrip", "rstrip", "split", "rsplit", "startswith",
                                                              "endswith", "upper", "lower", "title", "capitalize", "replace",
                                                              "find", "rfind", "count", "join", "splitlines", "isdigit",
                                                              "isalpha", "isalnum", "isspace", "islower", "isupper", "format"};
            if (k.count(name)) return method(obj, name);
        }
        if (obj.is_list()) {
            if (name == "count" || name == "index") return method(obj, name);
            static const std::unordered_set<std::string> k = {"append", "pop", "insert", "extend", "remove", "sort", "reverse", "clear"};
            if (k.count(name)) fail("access to attribute '" + name + "' of '" + type_name(obj) + "' object is unsafe");
        }
        return Undef{"'" + type_name(obj) + " object' has no attribute '" + name + "'"};
    }

    Value get_item(const Value & obj, const Value & key) {
        need_defined(obj);
        if (obj.is_dict()) {
            if (key.is_str()) {
                if (const Value * v = obj.dict()->find(key.str())) return *v;
                return get_attr(obj, key.str());
            }
            if (key.is_int())
                if (const Value * v = obj.dict()->find(dict_key(key))) return *v;
            return Undef{"'" + type_name(obj) + " object' has no attribute " + rep(key)};
        }
        if ((obj.is_list() || obj.is_str()) && int_like(key)) {
            int64_t i = as_int(key);
            if (obj.is_list()) {
                const auto & items = obj.list()->items;
                if (i < 0) i += int64_t(items.size());
                if (i < 0 || i >= int64_t(items.size())) return Undef{type_name(obj) + " index out of range"};
                return items[size_t(i)];
            }
            const std::string & s = obj.str();
            work(s.size() / 64);
            const auto starts = cp_starts(s);
            if (i < 0) i += int64_t(starts.size());
            if (i < 0 || i >= int64_t(starts.size())) return Undef{"string index out of range"};
            const size_t b = starts[size_t(i)], e = size_t(i) + 1 < starts.size() ? starts[size_t(i) + 1] : s.size();
            return s.substr(b, e - b);
        }
        if (key.is_str()) return get_attr(obj, key.str());
        return Undef{"'" + type_name(obj) + " object' has no item " + rep(key)};
    }

    Value slice(const Value & obj, std::optional<int64_t> start, std::optional<int64_t> stop, std::optional<int64_t> st) {
        need_defined(obj);
        const int64_t step = st.value_or(1);
        if (step == 0) fail("slice step cannot be zero");
        std::vector<size_t> starts;
        int64_t len;
        if (obj.is_list()) len = int64_t(obj.list()->items.size());
        else if (obj.is_str()) {
            work(obj.str().size() / 64);
            starts = cp_starts(obj.str());
            len = int64_t(starts.size());
        } else fail("'" + type_name(obj) + "' object is not subscriptable");
        auto clamp = [&](std::optional<int64_t> v, int64_t dflt) {
            if (!v) return dflt;
            int64_t x = *v;
            if (x < 0) x += len;
            if (step > 0) return std::clamp<int64_t>(x, 0, len);
            return std::clamp<int64_t>(x, -1, len - 1);
        };
        const int64_t b = clamp(start, step > 0 ? 0 : len - 1), e = clamp(stop, step > 0 ? len : -1);
        std::vector<int64_t> idx;
        for (int64_t i = b; step > 0 ? i < e : i > e;) {
            idx.push_back(i);
            if (__builtin_add_overflow(i, step, &i)) break;
        }
        work(idx.size());
        charge(16 * idx.size());
        if (obj.is_list()) {
            auto l = new_list({}, obj.list()->tuple);
            for (int64_t i : idx) l->items.push_back(obj.list()->items[size_t(i)]);
            return l;
        }
        const std::string & s = obj.str();
        std::string out;
        for (int64_t i : idx) {
            const size_t from = starts[size_t(i)], to = size_t(i) + 1 < starts.size() ? starts[size_t(i) + 1] : s.size();
            out.append(s, from, to - from);
        }
        return out;
    }

    Value binop(const std::string & op, const Value & l, const Value & r) {
        need_defined(l);
        need_defined(r);
        auto unsupported = [&]() -> Value {
            if (op == "+" && l.is_str()) fail("can only concatenate str (not \"" + type_name(r) + "\") to str");
            fail("unsupported operand type(s) for " + op + ": '" + type_name(l) + "' and '" + type_name(r) + "'");
        };
        if (l.is_number() && r.is_number()) {
            const bool ints = int_like(l) && int_like(r);
            if (op == "/") {
                if (as_double(r) == 0) fail("division by zero");
                return as_double(l) / as_double(r);
            }
            if (ints) {
                const int64_t a = as_int(l), b = as_int(r);
                int64_t res = 0;
                if (op == "+") {
                    if (__builtin_add_overflow(a, b, &res)) fail("integer overflow");
                    return res;
                }
                if (op == "-") {
                    if (__builtin_sub_overflow(a, b, &res)) fail("integer overflow");
                    return res;
                }
                if (op == "*") {
                    if (__builtin_mul_overflow(a, b, &res)) fail("integer overflow");
                    return res;
                }
                if (op == "//" || op == "%") {
                    if (b == 0) fail("integer division or modulo by zero");
                    if (a == INT64_MIN && b == -1) fail("integer overflow");
                    int64_t q = a / b, m = a % b;
                    if (m != 0 && ((m < 0) != (b < 0))) {
                        --q;
                        m += b;
                    }
                    return op == "//" ? q : m;
                }
                if (op == "**") {
                    if (b < 0) return std::pow(double(a), double(b));
                    int64_t acc = 1, base = a;
                    for (int64_t e = b; e > 0; e >>= 1) {   // by squaring: 0, 1 and -1 to a huge power end too
                        if ((e & 1) && __builtin_mul_overflow(acc, base, &acc)) fail("integer overflow");
                        if (e > 1 && __builtin_mul_overflow(base, base, &base)) {
                            if (acc == 0) return int64_t(0);
                            fail("integer overflow");
                        }
                    }
                    return acc;
                }
            }
            const double a = as_double(l), b = as_double(r);
            if (op == "+") return a + b;
            if (op == "-") return a - b;
            if (op == "*") return a * b;
            if (op == "//" || op == "%") {
                if (b == 0) fail("float division or modulo by zero");
                const double m = std::fmod(a, b);
                const double mm = (m != 0 && ((m < 0) != (b < 0))) ? m + b : m;
                return op == "%" ? mm : std::floor(a / b);
            }
            if (op == "**") return std::pow(a, b);
            return unsupported();
        }
        if (op == "+" && l.is_str() && r.is_str()) {
            charge(l.str().size() + r.str().size());
            return l.str() + r.str();
        }
        if (op == "+" && l.is_list() && r.is_list() && l.list()->tuple == r.list()->tuple) {
            std::vector<Value> items = l.list()->items;
            items.insert(items.end(), r.list()->items.begin(), r.list()->items.end());
            work(items.size());
            charge(weight(items));
            return new_list(std::move(items), l.list()->tuple);
        }
        if (op == "*" && (l.is_str() || l.is_list()) && int_like(r)) {
            const int64_t times = std::max<int64_t>(0, as_int(r));
            const size_t unit = l.is_str() ? l.str().size() : weight(l.list()->items);
            if (unit == 0) return l.is_str() ? Value(std::string()) : Value(new_list({}, l.list()->tuple));
            if (uint64_t(times) > opt_.limits.max_output / unit) fail("the repetition is too long");
            charge(unit * size_t(times));
            work(unit * size_t(times) / 256);   // copying bytes is cheap next to an evaluation
            if (l.is_str()) {
                std::string s;
                for (int64_t i = 0; i < times; ++i) s += l.str();
                return s;
            }
            auto out = new_list({}, l.list()->tuple);
            for (int64_t i = 0; i < times; ++i) out->items.insert(out->items.end(), l.list()->items.begin(), l.list()->items.end());
            return out;
        }
        if (op == "%" && l.is_str()) fail("'%' string formatting is not supported in chat templates by moesh");
        return unsupported();
    }

    bool contains(const Value & container, const Value & item) {
        if (container.is_str()) {
            if (!item.is_str()) fail("'in <string>' requires string as left operand, not " + type_name(item));
            work(container.str().size() / 64);
            return find_sub(container.str(), item.str()) != std::string::npos;
        }
        if (container.is_list()) {
            work(container.list()->items.size());
            for (const Value & v : container.list()->items)
                if (eq(v, item)) return true;
            return false;
        }
        if (container.is_dict()) return (item.is_str() || item.is_int()) && container.dict()->find(dict_key(item)) != nullptr;
        if (container.undef()) return false;
        fail("argument of type '" + type_name(container) + "' is not iterable");
    }

    // <0, 0, >0, or fails where Python raises TypeError.
    int order(const Value & a, const Value & b, const std::string & op) {
        if (a.is_number() && b.is_number()) {
            if (int_like(a) && int_like(b)) return as_int(a) < as_int(b) ? -1 : as_int(a) > as_int(b);
            const double x = as_double(a), y = as_double(b);
            return x < y ? -1 : x > y;
        }
        if (a.is_str() && b.is_str()) return a.str().compare(b.str()) < 0 ? -1 : a.str() != b.str();
        if (a.is_list() && b.is_list()) {
            const auto & x = a.list()->items;
            const auto & y = b.list()->items;
            for (size_t i = 0; i < x.size() && i < y.size(); ++i)
                if (!eq(x[i], y[i])) return order(x[i], y[i], op);
            return x.size() < y.size() ? -1 : x.size() > y.size();
        }
        need_defined(a);
        need_defined(b);
        fail("'" + op + "' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
    }

    bool compare_op(const std::string & op, const Value & l, const Value & r) {
        if (op == "==") return eq(l, r);
        if (op == "!=") return !eq(l, r);
        if (op == "in") return contains(r, l);
        if (op == "not in") return !contains(r, l);
        const int c = order(l, r, op);
        if (op == "<") return c < 0;
        if (op == ">") return c > 0;
        if (op == "<=") return c <= 0;
        return c >= 0;
    }

    // ------------------------------------------------------------ methods of str, list, dict

    Value method(const Value & recv, const std::string & name) {
        if (recv.is_str()) work(recv.str().size() / 64);   // the receiver is copied into the bound method
        return func(name, [this, recv, name](Args & a) -> Value { return call_method(recv, name, a); });
    }

    std::optional<std::string> opt_str(const Value & v, const char * what) {
        if (v.undef() || v.none()) return std::nullopt;
        if (!v.is_str()) fail(std::string(what) + " takes a string, got " + type_name(v));
        return v.str();
    }

    Value call_method(const Value & recv, const std::string & name, Args & a) {
        if (recv.is_dict()) {
            const auto & d = *recv.dict();
            if (name == "items") {
                std::vector<Value> items;
                for (const auto & [k, v] : d.items) {
                    charge(weight(v) + k.size() + 48);
                    items.emplace_back(new_list({key_value(k), v}, true));
                }
                work(items.size());
                return new_list(std::move(items));
            }
            if (name == "keys" || name == "values") {
                std::vector<Value> items;
                for (const auto & [k, v] : d.items) items.push_back(name == "keys" ? key_value(k) : v);
                work(items.size());
                charge(weight(items));
                return new_list(std::move(items));
            }
            if (name == "copy") {
                auto c = std::make_shared<DictObj>();
                c->items = d.items;
                return c;
            }
            const Value key = arg(a, 0, "key");
            if (key.is_str())
                if (const Value * v = d.find(key.str())) return *v;
            return a.pos.size() > 1 ? a.pos[1] : Value(None{});
        }
        if (recv.is_list()) {
            const Value x = arg(a, 0, "value");
            const auto & items = recv.list()->items;
            int64_t count = 0;
            for (size_t i = 0; i < items.size(); ++i)
                if (eq(items[i], x)) {
                    if (name == "index") return int64_t(i);
                    ++count;
                }
            if (name == "index") fail(rep(x) + " is not in list");
            return count;
        }
        const std::string & s = recv.str();
        if (name == "strip" || name == "lstrip" || name == "rstrip")
            return py_strip(s, opt_str(arg(a, 0, "chars"), name.c_str()), name != "rstrip", name != "lstrip");
        if (name == "upper") return ascii_upper(s);
        if (name == "lower") return ascii_lower(s);
        if (name == "title") return title(s);
        if (name == "capitalize") return capitalize(s);
        if (name == "startswith" || name == "endswith") {
            const Value p = arg(a, 0, "prefix");
            std::vector<std::string> options;
            if (p.is_str()) options.push_back(p.str());
            else if (p.is_list())
                for (const Value & v : p.list()->items) {
                    if (!v.is_str()) fail(name + " takes strings");
                    options.push_back(v.str());
                }
            else fail(name + " takes a string or a tuple of strings, got " + type_name(p));
            for (const std::string & o : options) {
                if (name == "startswith" ? s.compare(0, o.size(), o) == 0
                                         : s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0)
                    return true;
            }
            return false;
        }
        if (name == "replace") {
            const Value o = arg(a, 0, "old"), nw = arg(a, 1, "new"), cnt = arg(a, 2, "count", int64_t(-1));
            if (!o.is_str() || !nw.is_str() || !int_like(cnt)) fail("replace takes (old, new[, count])");
            return replace(s, o.str(), nw.str(), as_int(cnt));
        }
        if (name == "split" || name == "rsplit") {
            const std::optional<std::string> sep = opt_str(arg(a, 0, "sep"), name.c_str());
            const Value mx = arg(a, 1, "maxsplit", int64_t(-1));
            if (!int_like(mx)) fail(name + "'s maxsplit must be an integer");
            return split(s, sep, as_int(mx), name == "rsplit");
        }
        if (name == "splitlines") {
            std::vector<Value> lines;
            size_t b = 0;
            while (b < s.size()) {
                size_t e = s.find('\n', b);
                if (e == std::string::npos) e = s.size();
                charge(16 + e - b);
                lines.emplace_back(s.substr(b, e - b));
                b = e + 1;
            }
            work(lines.size());
            return new_list(std::move(lines));
        }
        if (name == "find" || name == "rfind" || name == "count") {
            const Value sub = arg(a, 0, "sub");
            if (!sub.is_str()) fail(name + " takes a string");
            if (name == "count") {
                if (sub.str().empty()) return cp_len(s) + 1;
                int64_t c = 0;
                work(s.size() / 64);
                for (size_t p = find_sub(s, sub.str()); p != std::string::npos; p = find_sub(s, sub.str(), p + sub.str().size())) ++c;
                return c;
            }
            work(s.size() / 16);
            const size_t p = name == "find" ? find_sub(s, sub.str()) : rfind_sub(s, sub.str());
            return p == std::string::npos ? int64_t(-1) : cp_len(std::string_view(s).substr(0, p));
        }
        if (name == "join") {
            std::string out;
            bool first = true;
            for (const Value & v : iterate(arg(a, 0, "iterable"))) {
                if (!v.is_str()) fail("join expects strings, got " + type_name(v));
                if (!first) out += s;
                out += v.str();
                charge(s.size() + v.str().size());
                first = false;
            }
            return out;
        }
        if (name == "format") return format(s, a);
        auto all = [&](auto pred) {
            if (s.empty()) return false;
            for (char c : s)
                if (!pred(c)) return false;
            return true;
        };
        if (name == "isdigit") return all([](char c) { return c >= '0' && c <= '9'; });
        if (name == "isalpha") return all([](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); });
        if (name == "isalnum") return all([](char c) { return std::isalnum(uint8_t(c)) != 0; });
        if (name == "isspace") return all([](char c) { return std::isspace(uint8_t(c)) != 0; });
        if (name == "islower") return s != ascii_upper(s) && s == ascii_lower(s);
        if (name == "isupper") return s != ascii_lower(s) && s == ascii_upper(s);
        fail("no method '" + name + "'");
    }

    // str.format with {}, {0} and {name} fields and no format specs.
    std::string format(const std::string & s, Args & a) {
        std::string out;
        size_t next = 0;
        for (size_t i = 0; i < s.size(); ++i) {
            const char c = s[i];
            if ((c == '{' || c == '}') && i + 1 < s.size() && s[i + 1] == c) {
                out += c;
                ++i;
                continue;
            }
            if (c == '}') fail("str.format: a single '}'");
            if (c != '{') {
                out += c;
                continue;
            }
            const size_t e = s.find('}', i);
            if (e == std::string::npos) fail("str.format: a '{' is never closed");
            const std::string field = s.substr(i + 1, e - i - 1);
            if (field.find_first_of(":!.[") != std::string::npos) fail("str.format: only {}, {N} and {name} fields are supported");
            const Value * v = nullptr;
            if (field.empty() || std::isdigit(uint8_t(field[0]))) {
                const size_t k = field.empty() ? next++ : size_t(std::strtoul(field.c_str(), nullptr, 10));
                if (k >= a.pos.size()) fail("str.format: no argument " + std::to_string(k));
                v = &a.pos[k];
            } else {
                for (auto & [name, kv] : a.kw)
                    if (name == field) v = &kv;
                if (!v) fail("str.format: no argument named '" + field + "'");
            }
            const std::string field_text = str(*v);
            charge(field_text.size());
            out += field_text;
            i = e;
        }
        return out;
    }

    static std::string title(const std::string & s) {
        std::string out = s;
        bool start = true;
        for (char & c : out) {
            if (is_alpha(c)) {
                if (start && c >= 'a' && c <= 'z') c = char(c - 'a' + 'A');
                else if (!start && c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
                start = false;
            } else {
                start = true;
            }
        }
        return out;
    }
    static std::string capitalize(const std::string & s) {
        std::string out = ascii_lower(s);
        if (!out.empty() && out[0] >= 'a' && out[0] <= 'z') out[0] = char(out[0] - 'a' + 'A');
        return out;
    }
    std::string replace(const std::string & s, const std::string & o, const std::string & n, int64_t count) {
        // the size first: a replacement can multiply the text
        size_t hits = 0;
        if (o.empty()) hits = size_t(cp_len(s)) + 1;
        else
            for (size_t p = find_sub(s, o); p != std::string::npos && (count < 0 || int64_t(hits) < count); p = find_sub(s, o, p + o.size())) ++hits;
        if (count >= 0) hits = std::min(hits, size_t(count));
        if (n.size() > o.size() && hits > (opt_.limits.max_alloc + s.size()) / (n.size() - o.size()))
            fail("replace: the text would be longer than " + std::to_string(opt_.limits.max_alloc) + " bytes");
        work(s.size() / 16 + hits);
        charge(s.size() + hits * n.size());
        if (o.empty()) {   // Python inserts `n` between characters
            std::string out;
            work(s.size() / 64);
            const auto starts = cp_starts(s);
            int64_t done = 0;
            for (size_t i = 0; i <= starts.size(); ++i) {
                if (count < 0 || done < count) {
                    out += n;
                    ++done;
                }
                if (i < starts.size()) out.append(s, starts[i], (i + 1 < starts.size() ? starts[i + 1] : s.size()) - starts[i]);
            }
            return out;
        }
        std::string out;
        size_t b = 0;
        int64_t done = 0;
        for (size_t p = find_sub(s, o); p != std::string::npos && (count < 0 || done < count); p = find_sub(s, o, b)) {
            out.append(s, b, p - b);
            out += n;
            b = p + o.size();
            ++done;
        }
        return out + s.substr(b);
    }
    Value split(const std::string & s, const std::optional<std::string> & sep, int64_t maxsplit, bool from_right) {
        std::vector<std::string> parts;
        if (sep) {
            if (sep->empty()) fail("empty separator");
            if (!from_right) {
                size_t b = 0;
                for (size_t p = find_sub(s, *sep); p != std::string::npos && (maxsplit < 0 || int64_t(parts.size()) < maxsplit); p = find_sub(s, *sep, b)) {
                    parts.push_back(s.substr(b, p - b));
                    b = p + sep->size();
                }
                parts.push_back(s.substr(b));
            } else {
                size_t e = s.size();
                std::vector<std::string> rev;
                for (;;) {
                    if (maxsplit >= 0 && int64_t(rev.size()) >= maxsplit) break;
                    if (e < sep->size()) break;
                    work(e / 64);
                    const size_t p = rfind_sub(s, *sep, e - sep->size());
                    if (p == std::string::npos) break;
                    rev.push_back(s.substr(p + sep->size(), e - p - sep->size()));
                    e = p;
                }
                rev.push_back(s.substr(0, e));
                parts.assign(rev.rbegin(), rev.rend());
            }
        } else {   // runs of whitespace, no empty parts
            std::vector<std::pair<size_t, size_t>> words;
            size_t i = 0;
            while (i < s.size()) {
                while (i < s.size() && space_at(s, i, false)) i += space_at(s, i, false);
                if (i >= s.size()) break;
                const size_t b = i;
                while (i < s.size() && !space_at(s, i, false)) ++i;
                words.emplace_back(b, i);
            }
            if (maxsplit >= 0 && int64_t(words.size()) > maxsplit) {   // the rest is one part, spaces on its far side kept
                if (!from_right) {
                    for (int64_t k = 0; k < maxsplit; ++k) parts.push_back(s.substr(words[size_t(k)].first, words[size_t(k)].second - words[size_t(k)].first));
                    parts.push_back(s.substr(words[size_t(maxsplit)].first));
                } else {
                    const size_t keep = words.size() - size_t(maxsplit);
                    parts.push_back(s.substr(0, words[keep - 1].second));
                    for (size_t k = keep; k < words.size(); ++k) parts.push_back(s.substr(words[k].first, words[k].second - words[k].first));
                }
            } else {
                for (auto [b, e] : words) parts.push_back(s.substr(b, e - b));
            }
        }
        auto l = new_list();
        for (auto & p : parts) l->items.emplace_back(std::move(p));
        work(l->items.size());
        charge(weight(l->items));
        return l;
    }

    // ------------------------------------------------------------ filters

    // The chain of a filter block or a set block (its innermost filter has no input of its own) applied to input.
    Value apply_filters(const Node & f, Value input, Scope & sc) {
        Value v = f.c[0] ? apply_filters(*f.c[0], std::move(input), sc) : std::move(input);
        Args a = eval_args(f, 1, sc);
        line_ = f.line;
        return filter(f.s, v, a);
    }

    Value attribute_of(const Value & item, const Value & attr) {
        if (!attr.is_str()) return get_item(item, attr);
        Value cur = item;
        const std::string & path = attr.str();
        size_t b = 0;
        for (;;) {
            const size_t dot = path.find('.', b);
            const std::string part = path.substr(b, dot == std::string::npos ? std::string::npos : dot - b);
            int64_t index = 0;
            const auto r = std::from_chars(part.data(), part.data() + part.size(), index);
            const bool digits = !part.empty() && r.ec == std::errc() && r.ptr == part.data() + part.size() && part[0] != '-';
            cur = digits ? get_item(cur, Value(index)) : get_item(cur, Value(part));
            if (dot == std::string::npos) return cur;
            b = dot + 1;
        }
    }

    Value sort_key(const Value & v, bool case_sensitive) {
        if (!case_sensitive && v.is_str()) return ascii_lower(v.str());
        return v;
    }

    Value filter(const std::string & name, const Value & v, Args & a) {
        if (name == "default" || name == "d") {
            const Value dflt = arg(a, 0, "default_value", std::string());
            const bool boolean = truthy(arg(a, 1, "boolean", false));
            return (v.undef() || (boolean && !truthy(v))) ? dflt : v;
        }
        if (name == "length" || name == "count") return length(v);
        if (name == "string") return v.undef() ? std::string() : str(v);
        if (name == "safe") return v;
        if (name == "trim") {
            const std::optional<std::string> chars = opt_str(arg(a, 0, "chars"), "trim");
            return py_strip(str(v), chars, true, true);
        }
        if (name == "upper") return ascii_upper(str(v));
        if (name == "lower") return ascii_lower(str(v));
        if (name == "title") return title(str(v));
        if (name == "capitalize") return capitalize(str(v));
        if (name == "e" || name == "escape") {
            std::string out;
            for (char c : str(v)) {
                switch (c) {
                case '&': out += "&amp;"; break;
                case '<': out += "&lt;"; break;
                case '>': out += "&gt;"; break;
                case '"': out += "&#34;"; break;
                case '\'': out += "&#39;"; break;
                default: out += c;
                }
            }
            return out;
        }
        if (name == "replace") {
            const Value o = arg(a, 0, "old"), nw = arg(a, 1, "new"), cnt = arg(a, 2, "count", None{});
            if (!o.is_str() || !nw.is_str()) fail("replace takes (old, new[, count]) strings");
            return replace(str(v), o.str(), nw.str(), cnt.none() || cnt.undef() ? -1 : as_int(cnt));
        }
        if (name == "tojson") {
            const Value indent = arg(a, 0, "indent", None{});
            const Value seps = arg(a, 2, "separators", None{});
            std::string item_sep = ", ", key_sep = ": ";
            std::optional<std::string> ind;
            if (int_like(indent)) ind = std::string(size_t(std::max<int64_t>(0, std::min<int64_t>(as_int(indent), 64))), ' ');
            else if (indent.is_str()) ind = indent.str();
            else if (!indent.none() && !indent.undef()) fail("tojson's indent must be an integer or a string");
            if (ind) item_sep = ",";
            if (seps.is_list() && seps.list()->items.size() == 2 && seps.list()->items[0].is_str() && seps.list()->items[1].is_str()) {
                item_sep = seps.list()->items[0].str();
                key_sep = seps.list()->items[1].str();
            } else if (!seps.none() && !seps.undef()) {
                fail("tojson's separators must be a pair of strings");
            }
            const bool ascii = truthy(arg(a, 1, "ensure_ascii", false));
            const bool sort = truthy(arg(a, 3, "sort_keys", false));
            std::string out;
            dump_json(v, out, ind, item_sep, key_sep, ascii, sort, 0);
            charge(out.size());
            return out;
        }
        if (name == "items") {
            if (v.undef()) return new_list();
            if (!v.is_dict()) fail("the items filter takes a mapping, got " + type_name(v));
            Args none;
            return call_method(v, "items", none);
        }
        if (name == "list") {
            if (v.is_dict()) return new_list(iterate(v));
            return new_list(iterate(v));
        }
        if (name == "first" || name == "last") {
            std::vector<Value> items = iterate(v);
            if (items.empty()) return Undef{"No " + name + " item, sequence was empty."};
            return name == "first" ? items.front() : items.back();
        }
        if (name == "reverse") {
            if (v.is_str()) {
                const auto starts = cp_starts(v.str());
                std::string out;
                for (size_t i = starts.size(); i-- > 0;)
                    out.append(v.str(), starts[i], (i + 1 < starts.size() ? starts[i + 1] : v.str().size()) - starts[i]);
                return out;
            }
            std::vector<Value> items = iterate(v);
            std::reverse(items.begin(), items.end());
            return new_list(std::move(items));
        }
        if (name == "join") {
            const Value sep = arg(a, 0, "d", std::string());
            const Value attr = arg(a, 1, "attribute", None{});
            std::string out;
            bool first = true;
            const std::string separator = str(sep);
            for (const Value & it : iterate(v)) {
                if (!first) out += separator;
                out += str(attr.none() || attr.undef() ? it : attribute_of(it, attr));
                charge(separator.size());
                first = false;
            }
            return out;
        }
        if (name == "map") {
            std::vector<Value> items = truthy(v) ? iterate(v) : std::vector<Value>();   // jinja2: `if value:` (none maps to nothing)
            auto l = new_list();
            const Value attr = arg(a, 999, "attribute");
            if (!attr.undef()) {
                const Value dflt = arg(a, 999, "default");
                for (const Value & it : items) {
                    Value x = attribute_of(it, attr);
                    l->items.push_back(x.undef() && !dflt.undef() ? dflt : x);
                }
                return l;
            }
            if (a.pos.empty() || !a.pos[0].is_str()) fail("map needs a filter name or attribute=");
            const std::string fname = a.pos[0].str();
            if (!filter_names().count(fname)) fail("no filter named '" + fname + "'");
            Args rest;
            rest.pos.assign(a.pos.begin() + 1, a.pos.end());
            rest.kw = a.kw;
            for (const Value & it : items) l->items.push_back(filter(fname, it, rest));
            return l;
        }
        if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
            const bool attr_form = name.size() > 6;
            const bool want = name[0] == 's';
            size_t i = 0;
            Value attr;
            if (attr_form) {
                if (a.pos.empty()) fail(name + " needs an attribute name");
                attr = a.pos[i++];
            }
            std::string test;
            if (i < a.pos.size()) {
                if (!a.pos[i].is_str()) fail(name + "'s test must be a name");
                test = a.pos[i++].str();
                if (!test_names().count(test)) fail("no test named '" + test + "'");
            }
            Args rest;
            rest.pos.assign(a.pos.begin() + std::ptrdiff_t(i), a.pos.end());
            rest.kw = a.kw;
            auto l = new_list();
            for (const Value & it : truthy(v) ? iterate(v) : std::vector<Value>()) {
                const Value x = attr_form ? attribute_of(it, attr) : it;
                const bool ok = test.empty() ? truthy(x) : run_test(test, x, rest);
                if (ok == want) l->items.push_back(it);
            }
            return l;
        }
        if (name == "sort" || name == "min" || name == "max" || name == "unique" || name == "dictsort") {
            const bool cs = truthy(arg(a, name == "sort" ? 1 : 0, "case_sensitive", false));
            const Value attr = arg(a, name == "sort" ? 2 : name == "unique" ? 1 : 1, "attribute", None{});
            const bool has_attr = !attr.none() && !attr.undef() && name != "dictsort";
            std::vector<Value> items;
            if (name == "dictsort") {
                if (!v.is_dict()) fail("dictsort takes a mapping");
                Args none;
                items = call_method(v, "items", none).list()->items;
            } else {
                items = iterate(v);
            }
            auto key = [&](const Value & x) -> Value {
                if (name == "dictsort") {
                    const bool by_value = arg(a, 1, "by", "key").is_str() && arg(a, 1, "by", "key").str() == "value";
                    return sort_key(x.list()->items[by_value ? 1 : 0], cs);
                }
                return sort_key(has_attr ? attribute_of(x, attr) : x, cs);
            };
            if (name == "unique") {
                auto l = new_list();
                std::vector<Value> seen;
                for (const Value & x : items) {
                    const Value k = key(x);
                    work(seen.size());
                    if (std::none_of(seen.begin(), seen.end(), [&](const Value & s) { return eq(s, k); })) {
                        seen.push_back(k);
                        l->items.push_back(x);
                    }
                }
                return l;
            }
            work(items.size() * 32);   // the comparisons of a sort
            std::stable_sort(items.begin(), items.end(), [&](const Value & x, const Value & y) { return order(key(x), key(y), "<") < 0; });
            if (name == "min" || name == "max") {
                if (items.empty()) return Undef{"No aggregated item, sequence was empty."};
                if (name == "min") return items.front();
                // the first of the largest, as Python's max
                size_t best = items.size() - 1;
                while (best > 0 && order(key(items[best - 1]), key(items[best]), "<") == 0) --best;
                return items[best];
            }
            if (truthy(arg(a, name == "sort" ? 0 : 2, "reverse", false))) std::reverse(items.begin(), items.end());
            return new_list(std::move(items));
        }
        if (name == "sum") {
            const Value attr = arg(a, 0, "attribute", None{});
            Value acc = arg(a, 1, "start", int64_t(0));
            for (const Value & it : iterate(v)) acc = binop("+", acc, attr.none() || attr.undef() ? it : attribute_of(it, attr));
            return acc;
        }
        if (name == "abs") {
            need_defined(v);
            if (!v.is_number()) fail("bad operand type for abs(): '" + type_name(v) + "'");
            if (v.is_float()) return std::fabs(as_double(v));
            if (as_int(v) == INT64_MIN) fail("integer overflow");
            return std::abs(as_int(v));
        }
        if (name == "int" || name == "float") {
            const Value dflt = arg(a, 0, "default", name == "int" ? Value(int64_t(0)) : Value(0.0));
            if (v.is_number()) {
                if (name == "float") return as_double(v);
                if (v.is_float()) {
                    const double d = std::trunc(as_double(v));
                    if (!(d >= -9.2e18 && d <= 9.2e18)) return dflt;
                    return int64_t(d);
                }
                return as_int(v);
            }
            if (v.is_str()) {
                const std::string t = py_strip(v.str(), std::nullopt, true, true);
                if (name == "int") {
                    int64_t x = 0;
                    auto r = std::from_chars(t.data(), t.data() + t.size(), x);
                    if (r.ec == std::errc() && r.ptr == t.data() + t.size() && !t.empty()) return x;
                }
                char * end = nullptr;
                const double d = t.empty() ? 0 : std::strtod(t.c_str(), &end);
                if (!t.empty() && end == t.c_str() + t.size()) {
                    if (name == "float") return d;
                    if (d >= -9.2e18 && d <= 9.2e18) return int64_t(std::trunc(d));
                }
            }
            return dflt;
        }
        if (name == "round") {
            const Value prec = arg(a, 0, "precision", int64_t(0));
            const Value method_v = arg(a, 1, "method", "common");
            need_defined(v);
            if (!v.is_number() || !int_like(prec)) fail("round takes a number");
            const double scale = std::pow(10.0, double(as_int(prec)));
            double x = as_double(v) * scale;
            const std::string m = method_v.is_str() ? method_v.str() : "common";
            x = m == "ceil" ? std::ceil(x) : m == "floor" ? std::floor(x) : std::nearbyint(x);   // Python's round: half to even
            return x / scale;
        }
        if (name == "indent") {
            const Value width = arg(a, 0, "width", int64_t(4));
            const bool first = truthy(arg(a, 1, "first", false));
            const bool blank = truthy(arg(a, 2, "blank", false));
            const std::string pad = width.is_str() ? width.str() : std::string(size_t(std::clamp<int64_t>(int_like(width) ? as_int(width) : 4, 0, 256)), ' ');
            std::string s = str(v) + "\n";
            const size_t n_lines = size_t(std::count(s.begin(), s.end(), '\n'));
            if (pad.size() && n_lines > opt_.limits.max_alloc / pad.size()) fail("indent: the text would be too long");
            charge(s.size() + n_lines * pad.size());
            std::vector<std::string> lines;
            size_t b = 0;
            for (size_t p; (p = s.find('\n', b)) != std::string::npos; b = p + 1) lines.push_back(s.substr(b, p - b));
            std::string out;
            if (blank) {
                for (size_t i = 0; i < lines.size(); ++i) out += (i ? "\n" + pad : "") + lines[i];
            } else {
                out = lines.empty() ? "" : lines[0];
                for (size_t i = 1; i < lines.size(); ++i) out += "\n" + (lines[i].empty() ? "" : pad + lines[i]);
            }
            return first ? pad + out : out;
        }
        if (name == "wordcount") {
            Args none;
            return int64_t(split(str(v), std::nullopt, -1, false).list()->items.size());
        }
        if (name == "attr") {
            const Value n = arg(a, 0, "name");
            if (!n.is_str()) fail("attr takes a name");
            return get_attr(v, n.str());
        }
        fail("no filter named '" + name + "'");
    }

    bool run_test(const std::string & name, const Value & v, Args & a) {
        const Value x = arg(a, 0, "other");
        if (name == "defined") return !v.undef();
        if (name == "undefined") return v.undef();
        if (name == "none") return v.none();
        if (name == "boolean") return v.is_bool();
        if (name == "true") return v.is_bool() && std::get<bool>(v.v);
        if (name == "false") return v.is_bool() && !std::get<bool>(v.v);
        if (name == "integer") return v.is_int();
        if (name == "float") return v.is_float();
        if (name == "number") return v.is_number();
        if (name == "string") return v.is_str();
        if (name == "mapping") return v.is_dict();
        if (name == "iterable") return v.is_str() || v.is_list() || v.is_dict() || v.undef();
        if (name == "sequence") return v.is_str() || v.is_list() || v.is_dict();
        if (name == "callable") return v.is_func();
        if (name == "lower") return v.is_str() && ascii_lower(v.str()) == v.str();
        if (name == "upper") return v.is_str() && ascii_upper(v.str()) == v.str();
        if (name == "odd" || name == "even" || name == "divisibleby") {
            need_defined(v);
            if (!int_like(v)) fail("the '" + name + "' test takes an integer, got " + type_name(v));
            if (name == "divisibleby") {
                if (!int_like(x) || as_int(x) == 0) fail("divisibleby needs a nonzero integer");
                return as_int(v) % as_int(x) == 0;
            }
            return (as_int(v) % 2 != 0) == (name == "odd");
        }
        if (name == "eq" || name == "equalto" || name == "==") return eq(v, x);
        if (name == "ne" || name == "!=") return !eq(v, x);
        if (name == "sameas") {
            if (v.is_list() && x.is_list()) return v.list() == x.list();
            if (v.is_dict() && x.is_dict()) return v.dict() == x.dict();
            return v.v.index() == x.v.index() && (v.none() || v.undef() || (v.is_bool() && eq(v, x)));
        }
        if (name == "in") return contains(x, v);
        if (name == "lt" || name == "lessthan" || name == "<") return order(v, x, "<") < 0;
        if (name == "le" || name == "<=") return order(v, x, "<=") <= 0;
        if (name == "gt" || name == "greaterthan" || name == ">") return order(v, x, ">") > 0;
        if (name == "ge" || name == ">=") return order(v, x, ">=") >= 0;
        fail("no test named '" + name + "'");
    }

    // Python's json.dumps.
    void dump_json(const Value & v, std::string & out, const std::optional<std::string> & indent, const std::string & item_sep,
                   const std::string & key_sep, bool ascii, bool sort, int level) {
        if (level > 256) fail("tojson: nesting too deep");
        work(1 + (v.is_str() ? v.str().size() / 64 : 0));
        if (out.size() > opt_.limits.max_output) fail("tojson: the text is too long");
        auto newline = [&](int lv) {
            if (!indent) return;
            out += '\n';
            for (int i = 0; i < lv; ++i) out += *indent;
        };
        switch (v.v.index()) {
        case 0: fail("Object of type Undefined is not JSON serializable");
        case 1: out += "null"; return;
        case 2: out += std::get<bool>(v.v) ? "true" : "false"; return;
        case 3: out += std::to_string(std::get<int64_t>(v.v)); return;
        case 4: {
            const double d = std::get<double>(v.v);
            out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity") : float_repr(d);
            return;
        }
        case 5: json_string(v.str(), out, ascii); return;
        case 6: {
            const auto & items = v.list()->items;
            if (items.empty()) {
                out += "[]";
                return;
            }
            out += '[';
            for (size_t i = 0; i < items.size(); ++i) {
                if (i) out += item_sep;
                newline(level + 1);
                dump_json(items[i], out, indent, item_sep, key_sep, ascii, sort, level + 1);
            }
            newline(level);
            out += ']';
            return;
        }
        case 7: {
            if (v.dict()->ns) fail("Object of type Namespace is not JSON serializable");
            std::vector<const std::pair<std::string, Value> *> items;
            for (const auto & kv : v.dict()->items) items.push_back(&kv);
            if (sort) std::stable_sort(items.begin(), items.end(), [](auto * x, auto * y) { return x->first < y->first; });
            if (items.empty()) {
                out += "{}";
                return;
            }
            out += '{';
            for (size_t i = 0; i < items.size(); ++i) {
                if (i) out += item_sep;
                newline(level + 1);
                json_string(key_text(items[i]->first), out, ascii);
                out += key_sep;
                dump_json(items[i]->second, out, indent, item_sep, key_sep, ascii, sort, level + 1);
            }
            newline(level);
            out += '}';
            return;
        }
        default: fail("Object of type function is not JSON serializable");
        }
    }

    static void json_string(const std::string & s, std::string & out, bool ascii) {
        out += '"';
        for (size_t i = 0; i < s.size(); ++i) {
            const auto c = uint8_t(s[i]);
            char buf[16];
            switch (c) {
            case '"': out += "\\\""; continue;
            case '\\': out += "\\\\"; continue;
            case '\n': out += "\\n"; continue;
            case '\r': out += "\\r"; continue;
            case '\t': out += "\\t"; continue;
            case '\b': out += "\\b"; continue;
            case '\f': out += "\\f"; continue;
            default: break;
            }
            if (c < 0x20 || (ascii && c == 0x7f)) {
                std::snprintf(buf, sizeof buf, "\\u%04x", c);
                out += buf;
            } else if (ascii && c >= 0x80) {
                size_t n = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
                if (i + n > s.size()) n = 1;
                uint32_t cp = n == 1 ? c : c & (0xff >> (n + 1));
                for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3f);
                i += n - 1;
                if (cp >= 0x10000) {
                    cp -= 0x10000;
                    std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
                } else {
                    std::snprintf(buf, sizeof buf, "\\u%04x", cp);
                }
                out += buf;
            } else {
                out += char(c);
            }
        }
        out += '"';
    }
};

} // namespace

struct Template::Impl {
    NodeP root;
};

Template::Template(std::string_view source) {
    auto impl = std::make_shared<Impl>();
    impl->root = Parser(Lexer(source).run()).parse();
    impl_ = std::move(impl);
}

Template::~Template() = default;
Template::Template(const Template &) = default;
Template & Template::operator=(const Template &) = default;

std::string Template::render(const nlohmann::ordered_json & vars, const RenderOptions & options) const {
    Renderer r(options);
    return r.run(*impl_->root, vars);
}

} // namespace moesh::jinja
