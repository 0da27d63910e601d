// Grammar-constrained decoding: a context-free grammar in GBNF, llama.cpp's notation, decides
// which tokens may come next.
//
//   std::string err;
//   std::shared_ptr<const Grammar> g = Grammar::parse("root ::= \"yes\" | \"no\"", &err);  // null + err if bad
//   auto vocab = std::make_shared<const GrammarVocab>(tokenizer);    // once per model
//   GrammarMatcher m(g, vocab, {tokenizer.eos_id()});
//   if (!m.allows(tok)) { m.fill_allowed(&allowed); ... }            // resample among the allowed
//   m.accept(tok);
//   if (m.must_end()) ...                                            // the text is complete
//
// Notation (as llama.cpp's): `name ::= alternatives` per rule, `root` first matched; "literals"
// and [character classes] ([^...] negated, a-z ranges) with the escapes \n \r \t \\ \" \[ \] \-
// \xHH \uHHHH \UHHHHHHHH; `.` any character; ( groups ); `|`; repetitions * + ? {m} {m,} {m,n};
// token references, one token by id `<[128000]>` or by its whole text `<|im_end|>` (a special token
// or one piece of the vocabulary; llama.cpp's negated `!<...>` is refused); # comments; a rule ends
// at a newline outside parentheses. Left recursion is refused (it would never end); write it as
// repetition.
//
// Matching is over the text the tokens decode to, as code points; a token may end inside a UTF-8
// character and the next one complete it. Only well-formed UTF-8 passes (RFC 3629: no stray
// continuation, overlong form, surrogate or code point past U+10FFFF; llama.cpp lets some through),
// and no NUL; an end token passes only where the root can be complete. Special
// tokens other than the given end tokens are never allowed as characters (llama.cpp matches a
// control token's text; moesh does not let `<|im_start|>` pass as characters): only a token
// reference lets one through, between characters. A reference to an end token never matches (the
// end token ends the text).
//
// Memory: a matcher's stacks are shared, interned nodes (compacted past k_max_nodes, never more
// than k_hard_nodes) and a stack is at most k_max_depth deep; a grammar more ambiguous than
// k_max_stacks live alternatives, or needing more nodes, fails the matcher (error(); it then
// allows nothing) rather than growing without bound.
// Thread safety: Grammar and GrammarVocab are immutable and may be shared across threads; a
// GrammarMatcher belongs to one thread.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moesh {

class Tokenizer;

struct Grammar {
    enum Kind : uint8_t { End, Char, Ref, Token };
    struct Sym {
        Kind kind;
        uint32_t arg;   // Char: index in sets; Ref: index in rules; Token: index in token_refs
    };
    struct TokenRef {
        int64_t id = -1;    // <[id]>
        std::string text;   // <text>: resolved against the vocabulary by each matcher
    };
    std::vector<TokenRef> token_refs;
    std::vector<Sym> syms;                                   // alternatives, each closed by End; [0,1] = root, End
    std::vector<std::vector<uint32_t>> rules;                // rule -> its alternatives' first symbols
    std::vector<std::vector<std::pair<uint32_t, uint32_t>>> sets;   // character class -> sorted disjoint [lo, hi]
    std::vector<std::string> rule_names;

    // Null and *error ("grammar line 3, column 7: ...") when text is not a valid grammar.
    static std::shared_ptr<const Grammar> parse(std::string_view text, std::string * error);
    bool matches(uint32_t set, uint32_t cp) const;
    bool intersects(uint32_t set, uint32_t lo, uint32_t hi) const;
};

// Limits on what a grammar's text may build.
constexpr size_t k_max_grammar_bytes = 1 << 20;
constexpr size_t k_max_grammar_syms = 1 << 20;
constexpr uint32_t k_max_grammar_repeat = 10000;

// The vocabulary as a byte trie: every token that is not special, by its bytes.
class GrammarVocab {
public:
    explicit GrammarVocab(const Tokenizer & tok);
    // pieces[id]: the token's bytes; empty = never allowed (special tokens). With the 256 single
    // bytes as tokens, a matcher checks or writes plain text.
    explicit GrammarVocab(std::vector<std::string> pieces);
    int32_t n_vocab() const { return n_vocab_; }
    const std::string & piece(int32_t id) const;   // empty: never allowed as text
    // The token whose whole text is `text` (a special token's, or a piece); -1 when none.
    int32_t token_of(std::string_view text) const;

    struct Node {
        uint32_t first_edge, n_edges;     // edges [first_edge, first_edge + n_edges)
        uint32_t first_token, n_tokens;   // tokens ending here, in tokens_
    };
    std::vector<Node> nodes;              // [0] = root
    std::vector<uint8_t> edge_byte;
    std::vector<uint32_t> edge_node;
    std::vector<int32_t> tokens;

private:
    int32_t n_vocab_ = 0;
    std::vector<std::string> pieces_;
    std::unordered_map<std::string, int32_t> specials_;   // text -> id of the special tokens
};

class GrammarMatcher {
public:
    static constexpr uint32_t k_max_depth = 1024;
    static constexpr size_t k_max_stacks = 4096;
    static constexpr size_t k_max_nodes = 1 << 16;    // compacted past this between tokens
    static constexpr size_t k_hard_nodes = 1 << 19;   // never more (about 30 MB with the maps): error()

    // A token reference the vocabulary does not have sets error() at once.
    GrammarMatcher(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const GrammarVocab> vocab,
                   std::vector<int32_t> end_ids);

    bool allows(int32_t token);
    // allowed [n_vocab]: 1 where the grammar allows the token next; returns how many.
    int64_t fill_allowed(std::vector<uint8_t> * allowed);
    // Advances past token; false (and nothing changes) when the grammar does not allow it.
    bool accept(int32_t token);
    bool can_end() const;    // the text so far is a whole match (an end token is allowed)
    bool must_end() const;   // ... and nothing can follow it
    // Set once the matcher cannot go on: the grammar proved too ambiguous or too large, or no
    // token can continue the text (a whole mask came out empty); it then allows nothing.
    const std::string & error() const { return error_; }
    int64_t n_masks() const { return n_masks_; }          // fill_allowed calls so far (the slow path)
    void keep_masks(bool on) { keep_masks_ = on; masks_.clear(); }   // the mask cache (on); off to measure a walk

private:
    struct Node { uint32_t pos, parent, depth; };
    struct State {
        uint32_t set = 0;       // in sets_: the stacks (sorted node ids; 0 = the empty stack, the root complete)
        uint32_t partial = 0;   // a UTF-8 character begun: its value so far,
        int32_t remain = 0;     // how many continuation bytes it still needs
        uint8_t lead = 0;       // and its first byte
    };
    struct VecHash {
        size_t operator()(const std::vector<uint32_t> & v) const;
    };
    static constexpr size_t k_max_sets = 1 << 14;   // compacted past this between tokens

    uint32_t push(uint32_t parent, uint32_t pos);
    void expand(uint32_t stack, std::vector<uint32_t> * out);
    const uint32_t * transition(uint32_t stack, uint32_t cp, uint32_t * n);
    int32_t intern(std::vector<uint32_t> & stacks);       // the set's id; -1 (dead) when empty or too wide
    int32_t advance(uint32_t set, uint32_t cp);           // the set after code point cp; -1: dead
    int32_t advance_token(uint32_t set, int32_t token);   // the set after a token its references match; -1: none
    bool step(const State & in, uint8_t byte, State * out);
    bool feasible(const State & s) const;
    bool walk(const State & from, const std::string & bytes, State * out);
    void visit(uint32_t node, size_t depth, std::vector<uint8_t> * allowed, int64_t * n);
    void compact();
    bool is_end(int32_t token) const;

    std::shared_ptr<const Grammar> g_;
    std::shared_ptr<const GrammarVocab> vocab_;
    std::vector<int32_t> end_ids_;
    State state_;
    std::vector<Node> nodes_;                                       // [0] = the empty stack
    std::unordered_map<uint64_t, uint32_t> interned_;               // (pos, parent) -> node
    std::unordered_map<uint64_t, std::pair<uint32_t, uint32_t>> memo_;   // (stack, cp) -> range of memo_out_
    std::vector<uint32_t> memo_out_;
    // Sets of stacks, interned: a state is one id, and the next set after an ASCII byte is a
    // table lookup (-2: not computed yet; -1: dead), so the trie walk mostly reads arrays.
    std::vector<std::vector<uint32_t>> sets_;
    std::unordered_map<std::vector<uint32_t>, uint32_t, VecHash> set_ids_;
    std::vector<std::array<int32_t, 128>> ascii_next_;              // [set][byte]
    std::unordered_map<uint64_t, int32_t> next_;                    // (set, cp >= 128) -> set
    std::unordered_map<uint64_t, int32_t> token_next_;              // (set, token) -> set, by references
    std::vector<int32_t> ref_ids_;                                  // token_refs resolved in this vocabulary
    // The last k_cached_masks whole-vocabulary masks, by set (states between characters recur:
    // inside a JSON string, after any ordinary character, the set is the same).
    static constexpr size_t k_cached_masks = 16;
    struct CachedMask { uint32_t set; int64_t n; std::vector<uint64_t> bits; };
    std::vector<CachedMask> masks_;
    size_t next_mask_ = 0;
    bool keep_masks_ = true;
    std::vector<State> levels_;                                     // the trie walk's states, by depth
    std::vector<uint32_t> todo_, seen_, scratch_;
    std::string error_;
    int64_t n_masks_ = 0;
};

} // namespace moesh
