#include "runtime/grammar.h"

#include "runtime/tokenizer.h"

#include <algorithm>
#include <map>
#include <numeric>

namespace moesh {

namespace {

constexpr uint32_t k_max_cp = 0x1FFFFF;   // what a 4-byte UTF-8 sequence can hold
constexpr int k_max_group_depth = 200;    // nested parentheses (the parser recurses)

struct ParseFail {
    size_t at;
    std::string what;
};

// A printable rendering of a grammar character for messages.
std::string show_char(uint32_t c) {
    if (c >= 0x20 && c < 0x7f) return std::string(1, char(c));
    char buf[16];
    snprintf(buf, sizeof buf, c < 0x10000 ? "\\u%04X" : "\\U%08X", unsigned(c));
    return buf;
}

class Parser {
public:
    explicit Parser(std::string_view src) : s_(src) {}

    std::shared_ptr<Grammar> run() {
        g_ = std::make_shared<Grammar>();
        g_->syms.push_back({Grammar::Ref, rule_id("root", 0)});
        g_->syms.push_back({Grammar::End, 0});
        space(true);
        while (p_ < s_.size()) rule();
        if (!defined_[0]) throw ParseFail{SIZE_MAX, "no rule named root"};
        for (size_t r = 1; r < g_->rules.size(); ++r)
            if (!defined_[r]) throw ParseFail{first_use_[r], "rule '" + g_->rule_names[r] + "' is used but never defined"};
        return g_;
    }

private:
    static bool word_char(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    }

    [[noreturn]] void fail(std::string what) const { throw ParseFail{p_, std::move(what)}; }
    char peek(size_t k = 0) const { return p_ + k < s_.size() ? s_[p_ + k] : '\0'; }
    bool at_end() const { return p_ >= s_.size(); }

    void space(bool newline_ok) {
        while (!at_end()) {
            const char c = s_[p_];
            if (c == ' ' || c == '\t' || (newline_ok && (c == '\n' || c == '\r'))) {
                ++p_;
            } else if (c == '#') {
                while (!at_end() && s_[p_] != '\n' && s_[p_] != '\r') ++p_;
            } else {
                break;
            }
        }
    }

    uint32_t rule_id(const std::string & name, size_t at) {
        auto [it, fresh] = ids_.emplace(name, uint32_t(g_->rules.size()));
        if (fresh) {
            g_->rules.emplace_back();
            g_->rule_names.push_back(name);
            defined_.push_back(false);
            first_use_.push_back(at);
        }
        return it->second;
    }

    uint32_t new_rule(const std::string & base) {
        std::string name;
        // '~' cannot be written in a rule name, so a rule defined later cannot clash with it.
        name = base + "~" + std::to_string(++n_generated_);
        const uint32_t id = rule_id(name, p_);
        defined_[id] = true;
        return id;
    }

    std::string name() {
        const size_t start = p_;
        while (!at_end() && word_char(s_[p_])) ++p_;
        if (p_ == start) fail(at_end() ? "expected a rule name, found the end" : "expected a rule name, found '" + show_char(uint8_t(s_[p_])) + "'");
        return std::string(s_.substr(start, p_ - start));
    }

    uint32_t utf8_char() {
        const auto b = uint8_t(s_[p_]);
        int n = b < 0x80 ? 0 : b >= 0xC2 && b < 0xE0 ? 1 : b >= 0xE0 && b < 0xF0 ? 2 : b >= 0xF0 && b < 0xF5 ? 3 : -1;
        if (n < 0) fail("invalid UTF-8 in the grammar");
        uint32_t cp = n == 0 ? b : b & (0x3F >> n);
        ++p_;
        for (; n > 0; --n, ++p_) {
            if (at_end() || (uint8_t(s_[p_]) & 0xC0) != 0x80) fail("invalid UTF-8 in the grammar");
            cp = (cp << 6) | (uint8_t(s_[p_]) & 0x3F);
        }
        return cp;
    }

    uint32_t hex(int digits) {
        uint32_t v = 0;
        for (int i = 0; i < digits; ++i, ++p_) {
            const char c = peek();
            const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) fail("expected " + std::to_string(digits) + " hex digits after the escape");
            v = v * 16 + uint32_t(d);
        }
        if (v > k_max_cp) fail("code point past U+1FFFFF");
        return v;
    }

    // One character of a literal or class, escapes resolved.
    uint32_t character() {
        if (at_end()) fail("unexpected end inside a literal or class");
        if (s_[p_] != '\\') return utf8_char();
        const size_t at = p_++;
        const char e = peek();
        ++p_;
        switch (e) {
        case 'x': return hex(2);
        case 'u': return hex(4);
        case 'U': return hex(8);
        case 't': return '\t';
        case 'r': return '\r';
        case 'n': return '\n';
        case '\\': case '"': case '[': case ']': case '-': return uint8_t(e);
        default: p_ = at; fail(e ? "unknown escape '\\" + show_char(uint8_t(e)) + "'" : "unexpected end after '\\'");
        }
    }

    uint32_t intern_set(std::vector<std::pair<uint32_t, uint32_t>> r, bool negate) {
        std::sort(r.begin(), r.end());
        std::vector<std::pair<uint32_t, uint32_t>> merged;
        for (const auto & x : r) {
            if (!merged.empty() && x.first <= merged.back().second + 1) merged.back().second = std::max(merged.back().second, x.second);
            else merged.push_back(x);
        }
        if (negate) {
            std::vector<std::pair<uint32_t, uint32_t>> out;
            uint32_t next = 0;
            for (const auto & x : merged) {
                if (x.first > next) out.push_back({next, x.first - 1});
                next = x.second + 1;
            }
            if (next <= k_max_cp) out.push_back({next, k_max_cp});
            merged = std::move(out);
        }
        auto [it, fresh] = set_ids_.emplace(merged, uint32_t(g_->sets.size()));
        if (fresh) g_->sets.push_back(std::move(merged));
        return it->second;
    }

    void emit(std::vector<Grammar::Sym> & seq, Grammar::Sym s) {
        if (g_->syms.size() + seq.size() >= k_max_grammar_syms) fail("the grammar is too large (over " + std::to_string(k_max_grammar_syms) + " symbols once repetitions are written out)");
        seq.push_back(s);
    }

    // The rule `alternatives` (each a symbol sequence) becomes rule id's definition.
    void define(uint32_t id, const std::vector<std::vector<Grammar::Sym>> & alts) {
        auto & starts = g_->rules[id];
        starts.clear();
        for (const auto & a : alts) {
            if (g_->syms.size() + a.size() + 1 >= k_max_grammar_syms) fail("the grammar is too large (over " + std::to_string(k_max_grammar_syms) + " symbols once repetitions are written out)");
            starts.push_back(uint32_t(g_->syms.size()));
            g_->syms.insert(g_->syms.end(), a.begin(), a.end());
            g_->syms.push_back({Grammar::End, 0});
        }
    }

    // item{lo,hi} (hi = UINT32_MAX: unbounded), item = seq[from..].
    void repeat(std::vector<Grammar::Sym> & seq, size_t from, uint32_t lo, uint32_t hi, const std::string & base) {
        const std::vector<Grammar::Sym> item(seq.begin() + long(from), seq.end());
        seq.resize(from);
        for (uint32_t i = 0; i < lo; ++i)
            for (const auto & s : item) emit(seq, s);
        if (hi == UINT32_MAX) {   // R ::= item R |
            const uint32_t r = new_rule(base);
            auto body = item;
            body.push_back({Grammar::Ref, r});
            define(r, {body, {}});
            emit(seq, {Grammar::Ref, r});
        } else if (hi > lo) {   // R1 ::= item | ; Rk ::= item R(k-1) |
            uint32_t prev = UINT32_MAX;
            for (uint32_t k = 0; k < hi - lo; ++k) {
                const uint32_t r = new_rule(base);
                auto body = item;
                if (prev != UINT32_MAX) body.push_back({Grammar::Ref, prev});
                define(r, {body, {}});
                prev = r;
            }
            emit(seq, {Grammar::Ref, prev});
        }
    }

    // <[id]> or <text> (the whole of it, brackets included, is the token's text).
    uint32_t token_ref() {
        const size_t start = p_;
        Grammar::TokenRef ref;
        if (peek(1) == '[') {
            p_ += 2;
            const size_t digits = p_;
            int64_t id = 0;
            while (peek() >= '0' && peek() <= '9') {
                id = id * 10 + (peek() - '0');
                if (id > INT32_MAX) fail("a token id past " + std::to_string(INT32_MAX));
                ++p_;
            }
            if (p_ == digits || peek() != ']' || peek(1) != '>') {
                p_ = start;
                fail("expected a token id as <[123]>");
            }
            p_ += 2;
            ref.id = id;
        } else {
            const size_t close = s_.find('>', p_);
            const size_t eol = s_.find_first_of("\r\n", p_);
            if (close == std::string_view::npos || close > eol) fail("a token reference '<' is never closed with '>' on its line");
            p_ = close + 1;
            ref.text = std::string(s_.substr(start, p_ - start));
        }
        g_->token_refs.push_back(std::move(ref));
        return uint32_t(g_->token_refs.size() - 1);
    }

    uint32_t count() {
        const size_t start = p_;
        uint64_t v = 0;
        while (peek() >= '0' && peek() <= '9') {
            v = v * 10 + uint64_t(peek() - '0');
            if (v > k_max_grammar_repeat) fail("a repetition count over " + std::to_string(k_max_grammar_repeat));
            ++p_;
        }
        if (p_ == start) fail("expected a number in the repetition");
        return uint32_t(v);
    }

    std::vector<Grammar::Sym> sequence(const std::string & rule_name, bool nested, int depth) {
        std::vector<Grammar::Sym> seq;
        size_t item = SIZE_MAX;   // where the last item starts in seq
        while (!at_end()) {
            const char c = s_[p_];
            if (c == '"') {
                ++p_;
                item = seq.size();
                while (peek() != '"' || at_end()) {
                    const uint32_t ch = character();
                    emit(seq, {Grammar::Char, intern_set({{ch, ch}}, false)});
                }
                ++p_;
                if (seq.size() == item) item = SIZE_MAX;   // "" is nothing to repeat
            } else if (c == '[') {
                ++p_;
                bool negate = false;
                if (peek() == '^') negate = true, ++p_;
                std::vector<std::pair<uint32_t, uint32_t>> ranges;
                while (peek() != ']') {
                    const size_t at = p_;
                    const uint32_t lo = character();
                    uint32_t hi = lo;
                    if (peek() == '-' && peek(1) != ']' && p_ + 1 < s_.size()) {
                        ++p_;
                        hi = character();
                        if (hi < lo) { p_ = at; fail("range " + show_char(lo) + "-" + show_char(hi) + " runs backwards"); }
                    }
                    ranges.push_back({lo, hi});
                }
                if (ranges.empty()) fail("an empty character class []");
                ++p_;
                item = seq.size();
                emit(seq, {Grammar::Char, intern_set(std::move(ranges), negate)});
            } else if (c == '.') {
                ++p_;
                item = seq.size();
                emit(seq, {Grammar::Char, intern_set({{0, k_max_cp}}, false)});
            } else if (c == '(') {
                if (depth >= k_max_group_depth) fail("parentheses nested over " + std::to_string(k_max_group_depth) + " deep");
                ++p_;
                space(true);
                const uint32_t r = new_rule(rule_name);
                auto alts = alternatives(rule_name, true, depth + 1);
                if (peek() != ')') fail(at_end() ? "a '(' is never closed" : "expected ')', found '" + show_char(uint8_t(peek())) + "'");
                ++p_;
                define(r, alts);
                item = seq.size();
                emit(seq, {Grammar::Ref, r});
            } else if (word_char(c)) {
                const size_t at = p_;
                item = seq.size();
                emit(seq, {Grammar::Ref, rule_id(name(), at)});
            } else if (c == '*' || c == '+' || c == '?' || c == '{') {
                if (item == SIZE_MAX) fail(std::string("'") + c + "' follows nothing it could repeat");
                ++p_;
                uint32_t lo = c == '+' ? 1 : 0, hi = c == '?' ? 1 : UINT32_MAX;
                if (c == '{') {
                    space(nested);
                    lo = count();
                    space(nested);
                    hi = lo;
                    if (peek() == ',') {
                        ++p_;
                        space(nested);
                        hi = peek() >= '0' && peek() <= '9' ? count() : UINT32_MAX;
                        space(nested);
                    }
                    if (peek() != '}') fail("expected '}' to close the repetition");
                    ++p_;
                    if (hi < lo) fail("a repetition {" + std::to_string(lo) + "," + std::to_string(hi) + "} with max < min");
                }
                repeat(seq, item, lo, hi, rule_name);
                item = SIZE_MAX;   // x** is refused as llama.cpp does
            } else if (c == '!') {
                fail("negated token references (!<...>) are not supported");
            } else if (c == '<') {
                item = seq.size();
                emit(seq, {Grammar::Token, token_ref()});
            } else {
                break;
            }
            space(nested);
        }
        return seq;
    }

    std::vector<std::vector<Grammar::Sym>> alternatives(const std::string & rule_name, bool nested, int depth) {
        std::vector<std::vector<Grammar::Sym>> alts;
        alts.push_back(sequence(rule_name, nested, depth));
        while (peek() == '|') {
            ++p_;
            space(true);
            alts.push_back(sequence(rule_name, nested, depth));
        }
        return alts;
    }

    void rule() {
        const size_t at = p_;
        const std::string n = name();
        space(false);
        if (s_.substr(p_, 3) != "::=") fail("expected '::=' after the rule name '" + n + "'");
        p_ += 3;
        space(true);
        const uint32_t id = rule_id(n, at);
        if (defined_[id]) { p_ = at; fail("rule '" + n + "' is defined twice"); }
        defined_[id] = true;
        define(id, alternatives(n, false, 0));
        if (!at_end() && s_[p_] != '\n' && s_[p_] != '\r')
            fail(std::string("unexpected '") + show_char(uint8_t(s_[p_])) + "' (a rule ends at the end of its line)");
        space(true);
    }

    std::string_view s_;
    size_t p_ = 0;
    std::shared_ptr<Grammar> g_;
    std::map<std::string, uint32_t> ids_;
    std::map<std::vector<std::pair<uint32_t, uint32_t>>, uint32_t> set_ids_;
    std::vector<bool> defined_;
    std::vector<size_t> first_use_;
    uint32_t n_generated_ = 0;
};

// Refuses a rule that can begin with itself (directly or through rules that may be empty), which
// would expand forever.
void check_left_recursion(const Grammar & g) {
    const size_t n = g.rules.size();
    std::vector<bool> nullable(n, false);
    for (bool changed = true; changed;) {
        changed = false;
        for (size_t r = 0; r < n; ++r) {
            if (nullable[r]) continue;
            for (uint32_t a : g.rules[r]) {
                bool all = true;
                for (uint32_t p = a; g.syms[p].kind != Grammar::End && all; ++p)
                    all = g.syms[p].kind == Grammar::Ref && nullable[g.syms[p].arg];
                if (all) { nullable[r] = true, changed = true; break; }
            }
        }
    }
    // left[r]: rules r may begin with
    std::vector<std::vector<uint32_t>> left(n);
    for (size_t r = 0; r < n; ++r)
        for (uint32_t a : g.rules[r])
            for (uint32_t p = a; g.syms[p].kind == Grammar::Ref; ++p) {
                left[r].push_back(g.syms[p].arg);
                if (!nullable[g.syms[p].arg]) break;
            }
    std::vector<uint8_t> mark(n, 0);   // 1 on the path, 2 done
    std::vector<std::pair<uint32_t, size_t>> path;
    for (uint32_t start = 0; start < n; ++start) {
        if (mark[start]) continue;
        path.push_back({start, 0});
        mark[start] = 1;
        while (!path.empty()) {
            auto & [r, k] = path.back();
            if (k == left[r].size()) { mark[r] = 2; path.pop_back(); continue; }
            const uint32_t next = left[r][k++];
            if (mark[next] == 1) {
                std::string cycle;
                bool on = false;
                for (const auto & f : path) {
                    on = on || f.first == next;
                    if (on) cycle += g.rule_names[f.first] + " -> ";
                }
                throw ParseFail{SIZE_MAX, "rule '" + g.rule_names[next] + "' is left-recursive (" + cycle + g.rule_names[next] +
                                              "); write it with repetition instead"};
            }
            if (mark[next] == 0) { mark[next] = 1; path.push_back({next, 0}); }
        }
    }
}

} // namespace

std::shared_ptr<const Grammar> Grammar::parse(std::string_view text, std::string * error) {
    if (text.size() > k_max_grammar_bytes) {
        *error = "grammar: " + std::to_string(text.size()) + " bytes, over the limit of " + std::to_string(k_max_grammar_bytes);
        return nullptr;
    }
    try {
        std::shared_ptr<Grammar> g = Parser(text).run();
        check_left_recursion(*g);
        return g;
    } catch (const ParseFail & f) {
        if (f.at == SIZE_MAX) {
            *error = "grammar: " + f.what;
        } else {
            const size_t at = std::min(f.at, text.size());
            const size_t line = 1 + size_t(std::count(text.begin(), text.begin() + long(at), '\n'));
            const size_t nl = text.rfind('\n', at == 0 ? 0 : at - 1);
            const size_t col = 1 + (nl == std::string_view::npos || at == 0 ? at : at - nl - 1);
            *error = "grammar line " + std::to_string(line) + ", column " + std::to_string(col) + ": " + f.what;
        }
        return nullptr;
    }
}

bool Grammar::matches(uint32_t set, uint32_t cp) const {
    const auto & r = sets[set];
    auto it = std::upper_bound(r.begin(), r.end(), cp, [](uint32_t c, const auto & x) { return c < x.first; });
    return it != r.begin() && cp <= std::prev(it)->second;
}

bool Grammar::intersects(uint32_t set, uint32_t lo, uint32_t hi) const {
    for (const auto & x : sets[set])
        if (x.first <= hi && lo <= x.second) return true;
    return false;
}

// ---------------------------------------------------------------------------------------------

namespace {
std::vector<std::string> text_pieces(const Tokenizer & tok) {
    std::vector<std::string> pieces(size_t(tok.n_vocab()));
    for (int32_t id = 0; id < tok.n_vocab(); ++id)
        if (!tok.is_special(id)) pieces[size_t(id)] = tok.token_to_piece(id);
    return pieces;
}
} // namespace

GrammarVocab::GrammarVocab(const Tokenizer & tok) : GrammarVocab(text_pieces(tok)) {
    for (int32_t id = 0; id < tok.n_vocab(); ++id)
        if (tok.is_special(id)) specials_.emplace(tok.token_text(id), id);
}

int32_t GrammarVocab::token_of(std::string_view text) const {
    if (auto it = specials_.find(std::string(text)); it != specials_.end()) return it->second;
    uint32_t node = 0;   // the trie, byte by byte
    for (const char c : text) {
        const Node & n = nodes[node];
        uint32_t next = UINT32_MAX;
        for (uint32_t e = n.first_edge; e < n.first_edge + n.n_edges; ++e)
            if (edge_byte[e] == uint8_t(c)) next = edge_node[e];
        if (next == UINT32_MAX) return -1;
        node = next;
    }
    return !text.empty() && nodes[node].n_tokens > 0 ? tokens[nodes[node].first_token] : -1;
}

GrammarVocab::GrammarVocab(std::vector<std::string> pieces) : n_vocab_(int32_t(pieces.size())), pieces_(std::move(pieces)) {
    std::vector<int32_t> ids;
    for (int32_t id = 0; id < n_vocab_; ++id)
        if (!pieces_[size_t(id)].empty()) ids.push_back(id);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
        return pieces_[size_t(a)] != pieces_[size_t(b)] ? pieces_[size_t(a)] < pieces_[size_t(b)] : a < b;
    });
    // Depth-first over the sorted pieces: a node's tokens, then its children grouped by next byte.
    struct Frame { size_t node, lo, hi, depth; };
    nodes.push_back({});
    std::vector<Frame> todo{{0, 0, ids.size(), 0}};
    while (!todo.empty()) {
        const Frame f = todo.back();
        todo.pop_back();
        size_t i = f.lo;
        nodes[f.node].first_token = uint32_t(tokens.size());
        while (i < f.hi && pieces_[size_t(ids[i])].size() == f.depth) tokens.push_back(ids[i++]);
        nodes[f.node].n_tokens = uint32_t(tokens.size()) - nodes[f.node].first_token;
        nodes[f.node].first_edge = uint32_t(edge_byte.size());
        std::vector<Frame> children;
        while (i < f.hi) {
            const auto b = uint8_t(pieces_[size_t(ids[i])][f.depth]);
            size_t j = i;
            while (j < f.hi && uint8_t(pieces_[size_t(ids[j])][f.depth]) == b) ++j;
            const size_t child = nodes.size();
            nodes.push_back({});
            edge_byte.push_back(b);
            edge_node.push_back(uint32_t(child));
            children.push_back({child, i, j, f.depth + 1});
            i = j;
        }
        nodes[f.node].n_edges = uint32_t(edge_byte.size()) - nodes[f.node].first_edge;
        todo.insert(todo.end(), children.rbegin(), children.rend());
    }
}

const std::string & GrammarVocab::piece(int32_t id) const {
    static const std::string none;
    return id >= 0 && id < n_vocab_ ? pieces_[size_t(id)] : none;
}

// ---------------------------------------------------------------------------------------------

GrammarMatcher::GrammarMatcher(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const GrammarVocab> vocab,
                               std::vector<int32_t> end_ids)
    : g_(std::move(grammar)), vocab_(std::move(vocab)), end_ids_(std::move(end_ids)) {
    for (const Grammar::TokenRef & r : g_->token_refs) {
        const int32_t id = r.text.empty() ? (r.id < vocab_->n_vocab() ? int32_t(r.id) : -1) : vocab_->token_of(r.text);
        if (id < 0 && error_.empty())
            error_ = r.text.empty() ? "grammar token <[" + std::to_string(r.id) + "]>: past the vocabulary's " + std::to_string(vocab_->n_vocab()) + " tokens"
                                    : "grammar token " + r.text + ": not one token of this vocabulary";
        ref_ids_.push_back(id);
    }
    nodes_.push_back({UINT32_MAX, 0, 0});
    std::vector<uint32_t> start;
    expand(push(0, 0), &start);
    const int32_t set = intern(start);
    if (set < 0) {   // (only past the matcher's limits) an empty set that allows nothing
        if (error_.empty()) error_ = "the grammar cannot start";
        sets_.emplace_back();
        ascii_next_.emplace_back().fill(-1);
    }
    state_.set = set < 0 ? 0 : uint32_t(set);
}

size_t GrammarMatcher::VecHash::operator()(const std::vector<uint32_t> & v) const {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ v.size();
    for (uint32_t x : v) h = (h ^ x) * 0x100000001B3ull, h ^= h >> 29;
    return size_t(h);
}

int32_t GrammarMatcher::intern(std::vector<uint32_t> & stacks) {
    if (stacks.empty()) return -1;
    if (stacks.size() > k_max_stacks) {
        if (error_.empty()) error_ = "the grammar is too ambiguous: over " + std::to_string(k_max_stacks) + " ways to read the text at once";
        return -1;
    }
    auto it = set_ids_.find(stacks);
    if (it != set_ids_.end()) return int32_t(it->second);
    const auto id = uint32_t(sets_.size());
    sets_.push_back(stacks);
    set_ids_.emplace(stacks, id);
    ascii_next_.emplace_back();
    ascii_next_.back().fill(-2);
    return int32_t(id);
}

int32_t GrammarMatcher::advance(uint32_t set, uint32_t cp) {
    int32_t * slot = nullptr;
    if (cp < 128) {
        slot = &ascii_next_[set][cp];
    } else {
        auto [it, fresh] = next_.emplace((uint64_t(set) << 21) | cp, -2);
        slot = &it->second;
    }
    if (*slot != -2) return *slot;
    scratch_.clear();
    size_t sources = 0;
    for (size_t i = 0; i < sets_[set].size(); ++i) {
        const uint32_t s = sets_[set][i];
        if (s == 0) continue;
        uint32_t n = 0;
        const uint32_t * next = transition(s, cp, &n);
        if (n == 0) continue;
        ++sources;
        scratch_.insert(scratch_.end(), next, next + n);
    }
    if (sources > 1) {
        std::sort(scratch_.begin(), scratch_.end());
        scratch_.erase(std::unique(scratch_.begin(), scratch_.end()), scratch_.end());
    }
    const int32_t id = intern(scratch_);
    // intern may have grown ascii_next_: find the slot again
    if (cp < 128) ascii_next_[set][cp] = id;
    else next_[(uint64_t(set) << 21) | cp] = id;
    return id;
}

uint32_t GrammarMatcher::push(uint32_t parent, uint32_t pos) {
    const uint64_t key = (uint64_t(pos) << 32) | parent;
    auto it = interned_.find(key);
    if (it != interned_.end()) return it->second;
    const uint32_t depth = nodes_[parent].depth + 1;
    if (depth > k_max_depth) return UINT32_MAX;
    if (nodes_.size() >= k_hard_nodes) {
        if (error_.empty()) error_ = "the grammar needs more than " + std::to_string(k_hard_nodes) + " stack nodes to follow the text";
        return UINT32_MAX;
    }
    const auto id = uint32_t(nodes_.size());
    nodes_.push_back({pos, parent, depth});
    interned_.emplace(key, id);
    return id;
}

// Every stack `stack` can become with a character class (or nothing: the empty stack) on top.
void GrammarMatcher::expand(uint32_t stack, std::vector<uint32_t> * out) {
    todo_.assign(1, stack);
    seen_.clear();
    const size_t out_start = out->size();
    while (!todo_.empty()) {
        const uint32_t s = todo_.back();
        todo_.pop_back();
        if (s == UINT32_MAX || std::find(seen_.begin(), seen_.end(), s) != seen_.end()) continue;
        seen_.push_back(s);
        if (s == 0 || g_->syms[nodes_[s].pos].kind == Grammar::Char || g_->syms[nodes_[s].pos].kind == Grammar::Token) {
            out->push_back(s);
            continue;
        }
        const Node n = nodes_[s];   // a Ref: its alternatives, then what follows it
        const uint32_t after = n.pos + 1;
        const uint32_t base = g_->syms[after].kind == Grammar::End ? n.parent : push(n.parent, after);
        if (base == UINT32_MAX) continue;
        for (uint32_t a : g_->rules[g_->syms[n.pos].arg])
            todo_.push_back(g_->syms[a].kind == Grammar::End ? base : push(base, a));
    }
    std::sort(out->begin() + long(out_start), out->end());
}

const uint32_t * GrammarMatcher::transition(uint32_t stack, uint32_t cp, uint32_t * n) {
    const uint64_t key = (uint64_t(stack) << 21) | cp;
    auto it = memo_.find(key);
    if (it == memo_.end()) {
        const auto start = uint32_t(memo_out_.size());
        const Node node = nodes_[stack];
        if (g_->syms[node.pos].kind == Grammar::Char && g_->matches(g_->syms[node.pos].arg, cp)) {
            const uint32_t after = node.pos + 1;
            const uint32_t next = g_->syms[after].kind == Grammar::End ? node.parent : push(node.parent, after);
            if (next != UINT32_MAX) expand(next, &memo_out_);
        }
        it = memo_.emplace(key, std::make_pair(start, uint32_t(memo_out_.size()) - start)).first;
    }
    *n = it->second.second;
    return memo_out_.data() + it->second.first;
}

bool GrammarMatcher::feasible(const State & s) const {
    // The code points the begun character can still become.
    uint32_t lo = s.partial << (6 * s.remain);
    uint32_t hi = lo | ((1u << (6 * s.remain)) - 1);
    if (s.lead == 0xE0 && s.remain == 2) lo = 0x800;
    if (s.lead == 0xF0 && s.remain == 3) lo = 0x10000;
    if (s.lead == 0xED) hi = std::min<uint32_t>(hi, 0xD7FF);
    hi = std::min<uint32_t>(hi, 0x10FFFF);
    for (uint32_t st : sets_[s.set])
        if (st != 0 && g_->syms[nodes_[st].pos].kind == Grammar::Char && g_->intersects(g_->syms[nodes_[st].pos].arg, lo, hi))
            return true;
    return false;
}

int32_t GrammarMatcher::advance_token(uint32_t set, int32_t token) {
    auto [it, fresh] = token_next_.emplace((uint64_t(set) << 32) | uint32_t(token), -1);
    if (!fresh) return it->second;
    std::vector<uint32_t> out;
    for (const uint32_t s : sets_[set]) {
        if (s == 0) continue;
        const Node node = nodes_[s];
        const Grammar::Sym sym = g_->syms[node.pos];
        if (sym.kind != Grammar::Token || ref_ids_[sym.arg] != token) continue;
        const uint32_t after = node.pos + 1;
        const uint32_t next = g_->syms[after].kind == Grammar::End ? node.parent : push(node.parent, after);
        if (next != UINT32_MAX) expand(next, &out);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    it->second = intern(out);
    return it->second;
}

bool GrammarMatcher::step(const State & in, uint8_t b, State * out) {
    uint32_t cp;
    if (in.remain > 0) {
        if ((b & 0xC0) != 0x80) return false;
        // The second byte's narrower ranges (RFC 3629): no overlongs, surrogates, or past U+10FFFF.
        const int len = in.lead >= 0xF0 ? 3 : in.lead >= 0xE0 ? 2 : 1;
        if (in.remain == len && ((in.lead == 0xE0 && b < 0xA0) || (in.lead == 0xED && b > 0x9F) ||
                                 (in.lead == 0xF0 && b < 0x90) || (in.lead == 0xF4 && b > 0x8F)))
            return false;
        cp = (in.partial << 6) | (b & 0x3F);
        if (in.remain > 1) {
            *out = {in.set, cp, in.remain - 1, in.lead};
            return feasible(*out);
        }
    } else if (b < 0x80) {
        if (b == 0) return false;
        cp = b;
    } else {
        const int remain = b >= 0xC2 && b < 0xE0 ? 1 : b >= 0xE0 && b < 0xF0 ? 2 : b >= 0xF0 && b < 0xF5 ? 3 : 0;
        if (remain == 0) return false;
        *out = {in.set, uint32_t(b & (0x3F >> remain)), remain, b};
        return feasible(*out);
    }
    const int32_t next = advance(in.set, cp);
    if (next < 0) return false;
    *out = {uint32_t(next), 0, 0, 0};
    return true;
}

bool GrammarMatcher::walk(const State & from, const std::string & bytes, State * out) {
    State a = from, b;
    for (char c : bytes) {
        if (!step(a, uint8_t(c), &b)) return false;
        std::swap(a, b);
    }
    *out = std::move(a);
    return true;
}

bool GrammarMatcher::is_end(int32_t token) const {
    return std::find(end_ids_.begin(), end_ids_.end(), token) != end_ids_.end();
}

bool GrammarMatcher::can_end() const {
    return error_.empty() && state_.remain == 0 && sets_[state_.set].front() == 0;
}

bool GrammarMatcher::must_end() const { return can_end() && sets_[state_.set].size() == 1; }

bool GrammarMatcher::allows(int32_t token) {
    if (!error_.empty()) return false;
    if (is_end(token)) return can_end();
    const std::string & p = vocab_->piece(token);
    State out;
    if (!p.empty() && walk(state_, p, &out)) return true;
    return !g_->token_refs.empty() && state_.remain == 0 && advance_token(state_.set, token) >= 0;
}

bool GrammarMatcher::accept(int32_t token) {
    if (!error_.empty()) return false;
    if (is_end(token)) return can_end();
    const std::string & p = vocab_->piece(token);
    State out;
    const bool as_text = !p.empty() && walk(state_, p, &out);
    // by reference, between characters; with the text's reading too when that also ends between
    // characters (a reference to a piece the grammar also allows as text)
    const int32_t by_ref = !g_->token_refs.empty() && state_.remain == 0 ? advance_token(state_.set, token) : -1;
    if (by_ref >= 0 && !as_text) {
        out = {uint32_t(by_ref), 0, 0, 0};
    } else if (by_ref >= 0 && out.remain == 0) {   // both readings go on
        std::vector<uint32_t> both = sets_[uint32_t(by_ref)];
        both.insert(both.end(), sets_[out.set].begin(), sets_[out.set].end());
        std::sort(both.begin(), both.end());
        both.erase(std::unique(both.begin(), both.end()), both.end());
        const int32_t set = intern(both);
        if (set < 0) return false;
        out = {uint32_t(set), 0, 0, 0};
    } else if (!as_text) {
        return false;
    }
    state_ = std::move(out);
    if (nodes_.size() > k_max_nodes || memo_out_.size() > k_max_nodes * 4 || sets_.size() > k_max_sets) compact();
    return true;
}

void GrammarMatcher::visit(uint32_t node, size_t depth, std::vector<uint8_t> * allowed, int64_t * n) {
    const GrammarVocab::Node & tn = vocab_->nodes[node];
    if (levels_.size() < depth + 2) levels_.resize(depth + 2);
    for (uint32_t e = tn.first_edge; e < tn.first_edge + tn.n_edges; ++e) {
        if (!step(levels_[depth], vocab_->edge_byte[e], &levels_[depth + 1])) continue;
        const GrammarVocab::Node & child = vocab_->nodes[vocab_->edge_node[e]];
        for (uint32_t t = child.first_token; t < child.first_token + child.n_tokens; ++t) {
            const int32_t id = vocab_->tokens[t];
            if (!is_end(id)) (*allowed)[size_t(id)] = 1, ++*n;
        }
        visit(vocab_->edge_node[e], depth + 1, allowed, n);
    }
}

int64_t GrammarMatcher::fill_allowed(std::vector<uint8_t> * allowed) {
    ++n_masks_;
    const auto n_vocab = size_t(vocab_->n_vocab());
    allowed->assign(n_vocab, 0);
    if (!error_.empty()) return 0;
    if (state_.remain == 0 && keep_masks_)
        for (const CachedMask & c : masks_)
            if (c.set == state_.set) {
                for (size_t i = 0; i < n_vocab; ++i) (*allowed)[i] = uint8_t((c.bits[i >> 6] >> (i & 63)) & 1);
                return c.n;
            }
    int64_t n = 0;
    if (levels_.empty()) levels_.resize(1);
    levels_[0] = state_;
    visit(0, 0, allowed, &n);
    if (state_.remain == 0 && !g_->token_refs.empty())   // tokens by reference, between characters
        for (const uint32_t s : sets_[state_.set]) {
            if (s == 0) continue;
            const Grammar::Sym sym = g_->syms[nodes_[s].pos];
            if (sym.kind != Grammar::Token) continue;
            const int32_t id = ref_ids_[sym.arg];
            if (id >= 0 && id < vocab_->n_vocab() && !is_end(id) && !(*allowed)[size_t(id)]) (*allowed)[size_t(id)] = 1, ++n;
        }
    if (!error_.empty()) {   // the walk was cut short: nothing it found can be trusted
        allowed->assign(size_t(vocab_->n_vocab()), 0);
        return 0;
    }
    if (can_end())
        for (int32_t id : end_ids_)
            if (id >= 0 && id < vocab_->n_vocab() && !(*allowed)[size_t(id)]) (*allowed)[size_t(id)] = 1, ++n;
    if (n == 0) {   // a dead end: the request cannot go on
        error_ = can_end() ? "the text is complete and nothing ends it (no end token)"
                           : "no token of the vocabulary can continue the text here";
        return 0;
    }
    if (state_.remain == 0 && keep_masks_) {
        if (masks_.size() < k_cached_masks) masks_.emplace_back();
        CachedMask & c = masks_[next_mask_++ % masks_.size()];
        c.set = state_.set;
        c.n = n;
        c.bits.assign((n_vocab + 63) / 64, 0);
        for (size_t i = 0; i < n_vocab; ++i) c.bits[i >> 6] |= uint64_t((*allowed)[i]) << (i & 63);
    }
    if (nodes_.size() > k_max_nodes || memo_out_.size() > k_max_nodes * 4 || sets_.size() > k_max_sets) compact();
    return n;
}

// Rebuilds the node table with only what the current stacks hold; memos and sets go with it.
void GrammarMatcher::compact() {
    std::vector<uint32_t> live = sets_[state_.set];
    std::vector<Node> old;
    old.swap(nodes_);
    interned_.clear();
    memo_.clear();
    memo_out_.clear();
    sets_.clear();
    set_ids_.clear();
    masks_.clear();
    next_mask_ = 0;
    ascii_next_.clear();
    next_.clear();
    token_next_.clear();
    nodes_.push_back({UINT32_MAX, 0, 0});
    std::unordered_map<uint32_t, uint32_t> moved{{0, 0}};
    std::vector<uint32_t> chain;
    for (uint32_t & s : live) {
        chain.clear();
        uint32_t x = s;
        while (!moved.count(x)) chain.push_back(x), x = old[x].parent;
        uint32_t id = moved[x];
        for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
            id = push(id, old[*it].pos);
            moved[*it] = id;
        }
        s = id;
    }
    std::sort(live.begin(), live.end());
    state_.set = uint32_t(intern(live));
}

} // namespace moesh
