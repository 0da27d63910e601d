#include "runtime/tokenizer.h"

#include "runtime/error.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <queue>
#include <unordered_map>

namespace moesh {

namespace {

// ---- UTF-8 ------------------------------------------------------------------

// Length of the valid UTF-8 sequence at s[i], 0 if invalid; *n_ok gets how many
// bytes form a valid prefix (the "maximal subpart" replaced by one U+FFFD), and
// *truncated whether the sequence was cut short by the end of the input.
size_t utf8_sequence(std::string_view s, size_t i, size_t * n_ok, bool * truncated, uint32_t * cp = nullptr) {
    const auto b0 = uint8_t(s[i]);
    *truncated = false;
    if (b0 < 0x80) {
        *n_ok = 1;
        if (cp) *cp = b0;
        return 1;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
    else if (b0 == 0xE0) len = 3, lo = 0xA0;
    else if (b0 == 0xED) len = 3, hi = 0x9F;
    else if (b0 >= 0xE1 && b0 <= 0xEF) len = 3;
    else if (b0 == 0xF0) len = 4, lo = 0x90;
    else if (b0 == 0xF4) len = 4, hi = 0x8F;
    else if (b0 >= 0xF1 && b0 <= 0xF3) len = 4;
    else {
        *n_ok = 1;
        return 0;
    }
    uint32_t c = b0 & (0xFF >> (len + 1));
    for (size_t k = 1; k < len; ++k) {
        if (i + k >= s.size()) {
            *n_ok = k;
            *truncated = true;
            return 0;
        }
        const auto b = uint8_t(s[i + k]);
        if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
            *n_ok = k;
            return 0;
        }
        c = (c << 6) | (b & 0x3F);
    }
    *n_ok = len;
    if (cp) *cp = c;
    return len;
}

size_t utf8_char_len(std::string_view s, size_t i) {
    size_t n_ok;
    bool truncated;
    size_t len = utf8_sequence(s, i, &n_ok, &truncated);
    return len ? len : 1;
}

void append_utf8(std::string & out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

constexpr std::string_view k_replacement = "\xEF\xBF\xBD";

// Appends the valid UTF-8 of `bytes` to out, one U+FFFD per maximal invalid
// subpart (as Rust's String::from_utf8_lossy). With hold_incomplete, a
// sequence cut short by the end stays unconsumed; returns the bytes consumed.
size_t append_lossy(std::string & out, std::string_view bytes, bool hold_incomplete) {
    size_t i = 0;
    while (i < bytes.size()) {
        size_t n_ok;
        bool truncated;
        size_t len = utf8_sequence(bytes, i, &n_ok, &truncated);
        if (len) {
            out.append(bytes.data() + i, len);
            i += len;
        } else if (truncated && hold_incomplete) {
            return i;
        } else {
            out += k_replacement;
            i += n_ok;
        }
    }
    return i;
}

bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

// ---- byte-level alphabet (GPT-2's bytes_to_unicode) ---------------------------

struct ByteAlphabet {
    std::array<std::string, 256> encode;       // byte -> UTF-8 of its stand-in character
    std::array<int16_t, 512> decode;           // stand-in code point -> byte, -1 if none

    ByteAlphabet() {
        decode.fill(-1);
        uint32_t n = 0;
        for (uint32_t b = 0; b < 256; ++b) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            uint32_t cp = printable ? b : 256 + n++;
            append_utf8(encode[b], cp);
            decode[cp] = int16_t(b);
        }
    }
};

const ByteAlphabet & byte_alphabet() {
    static const ByteAlphabet alphabet;
    return alphabet;
}

// What the ByteLevel decoder turns a token into: its stand-in characters mapped
// back to bytes, or the token's own bytes if any character is not a stand-in.
std::string byte_level_decode(std::string_view token) {
    const auto & alphabet = byte_alphabet();
    std::string out;
    size_t i = 0;
    while (i < token.size()) {
        size_t n_ok;
        bool truncated;
        uint32_t cp = 0;
        size_t len = utf8_sequence(token, i, &n_ok, &truncated, &cp);
        if (!len || cp >= alphabet.decode.size() || alphabet.decode[cp] < 0) return std::string(token);
        out += char(alphabet.decode[cp]);
        i += len;
    }
    return out;
}

// ---- regex --------------------------------------------------------------------

constexpr std::string_view k_gpt2_regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF + Unicode properties, invalid UTF-8 in the
// subject never matches). Immutable after construction, so matching is
// reentrant; match data is per call.
class Regex {
public:
    // Throws a bare message; the caller adds file and key.
    Regex(std::string_view pattern, bool literal) {
        int err = 0;
        PCRE2_SIZE offset = 0;
        // PCRE2_LITERAL refuses PCRE2_UCP, which a literal does not need anyway.
        uint32_t options = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
        code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &err, &offset,
                              nullptr);
        if (!code_) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(err, msg, sizeof msg);
            throw std::runtime_error("invalid regex at offset " + std::to_string(offset) + ": " +
                                     reinterpret_cast<const char *>(msg));
        }
        jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
        context_ = pcre2_match_context_create(nullptr);
        pcre2_set_match_limit(context_, 10'000'000);
        pcre2_set_depth_limit(context_, 100'000);
        pcre2_set_heap_limit(context_, 64 * 1024);   // KiB
    }
    Regex(const Regex &) = delete;
    Regex & operator=(const Regex &) = delete;
    ~Regex() {
        pcre2_match_context_free(context_);
        pcre2_code_free(code_);
    }

    // Non-overlapping matches, left to right, as (start, end) byte offsets.
    std::vector<std::pair<size_t, size_t>> find_all(std::string_view text) const {
        std::vector<std::pair<size_t, size_t>> out;
        pcre2_match_data * md = pcre2_match_data_create_from_pattern(code_, nullptr);
        size_t pos = 0;
        while (pos <= text.size()) {
            int rc = match(md, text, pos);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                pcre2_match_data_free(md);
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                throw Error(std::string("tokenizer: pre-tokenizer regex failed: ") +
                            reinterpret_cast<const char *>(msg));
            }
            const PCRE2_SIZE * ov = pcre2_get_ovector_pointer(md);
            size_t start = ov[0], end = ov[1];
            if (end < start || end > text.size()) break;   // \K tricks; not used by tokenizers
            out.emplace_back(start, end);
            if (end == start) {
                if (end >= text.size()) break;
                pos = end + utf8_char_len(text, end);
            } else {
                pos = end;
            }
        }
        pcre2_match_data_free(md);
        return out;
    }

    bool matches_at_start(std::string_view text) const {
        pcre2_match_data * md = pcre2_match_data_create_from_pattern(code_, nullptr);
        int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0, PCRE2_ANCHORED, md,
                             context_);
        pcre2_match_data_free(md);
        return rc >= 0;
    }

private:
    int match(pcre2_match_data * md, std::string_view text, size_t pos) const {
        int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos, 0, md, context_);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT && jit_)
            rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos, PCRE2_NO_JIT, md,
                             context_);
        return rc;
    }

    pcre2_code * code_ = nullptr;
    pcre2_match_context * context_ = nullptr;
    bool jit_ = false;
};

bool is_word_char(uint32_t cp) {
    static const Regex word("\\w", false);
    std::string s;
    append_utf8(s, cp);
    return word.matches_at_start(s);
}

using Behavior = TokenizerSpec::SplitBehavior;

// (piece, is_match) after one Split, following tokenizers' SplitDelimiterBehavior.
std::vector<std::string> split_pieces(std::string_view text, const std::vector<std::pair<size_t, size_t>> & found,
                                      Behavior behavior, bool invert) {
    struct Part {
        size_t start, end;
        bool is_match;
    };
    std::vector<Part> parts;
    size_t prev = 0;
    for (auto [s, e] : found) {
        if (s != prev) parts.push_back({prev, s, invert});
        parts.push_back({s, e, !invert});
        prev = e;
    }
    if (prev != text.size()) parts.push_back({prev, text.size(), invert});

    std::vector<Part> merged;
    bool previous_match = false;
    switch (behavior) {
    case Behavior::Isolated: merged = parts; break;
    case Behavior::Removed:
        for (const auto & p : parts)
            if (!p.is_match) merged.push_back(p);
        break;
    case Behavior::MergedWithPrevious:
        for (const auto & p : parts) {
            if (p.is_match && !previous_match && !merged.empty()) merged.back().end = p.end;
            else merged.push_back(p);
            previous_match = p.is_match;
        }
        break;
    case Behavior::MergedWithNext:
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->is_match && !previous_match && !merged.empty()) merged.back().start = it->start;
            else merged.push_back(*it);
            previous_match = it->is_match;
        }
        std::reverse(merged.begin(), merged.end());
        break;
    case Behavior::Contiguous:
        for (const auto & p : parts) {
            if (p.is_match == previous_match && !merged.empty()) merged.back().end = p.end;
            else merged.push_back(p);
            previous_match = p.is_match;
        }
        break;
    }
    std::vector<std::string> out;
    for (const auto & p : merged)
        if (p.end > p.start) out.emplace_back(text.substr(p.start, p.end - p.start));
    return out;
}

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
    std::string out;
    size_t pos = 0;
    for (size_t hit; (hit = text.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
        out.append(text.substr(pos, hit - pos));
        out.append(to);
    }
    out.append(text.substr(pos));
    return out;
}

// The byte of a "<0xNN>" token, -1 if the text is not one.
int byte_token_value(std::string_view text) {
    auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
    if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
    int hi = hex(text[3]), lo = hex(text[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

struct Merge {
    uint32_t rank;
    int32_t new_id;
};

} // namespace

// ---- the loaded tokenizer -------------------------------------------------------

struct Tokenizer::Impl {
    struct PreTokenizer {
        TokenizerSpec::PreTokenizer spec;
        std::unique_ptr<Regex> regex;   // Split pattern, the GPT-2 regex for ByteLevel(use_regex), Metaspace(split)
    };
    struct NormalizerStep {
        TokenizerSpec::Normalizer spec;
        const icu::Normalizer2 * icu = nullptr;   // NFC, NFD, NFKC, NFKD
    };
    struct AddedPatterns {
        std::vector<std::pair<std::string, size_t>> patterns;   // (text to match, index in added)
        std::array<std::vector<size_t>, 256> by_first_byte;      // pattern indices, longest first
    };

    std::string source;
    std::unordered_map<std::string, int32_t> vocab;
    std::unordered_map<uint64_t, Merge> merges;
    std::vector<std::string> id_text;    // [n_vocab] as written in the file
    std::vector<std::string> id_bytes;   // [n_vocab] what the id decodes to
    std::vector<uint8_t> id_special;     // [n_vocab]
    std::vector<float> scores;           // [n_vocab] non-empty: merge by score (SentencePiece)
    std::array<int32_t, 256> byte_ids;   // id of "<0xNN>", -1 if none
    int32_t unk_id = -1;
    bool fuse_unk = false;
    bool ignore_merges = false;
    bool byte_fallback = false;
    bool byte_level = true;              // words are mapped to GPT-2's byte alphabet before BPE
    std::vector<AddedToken> added;
    std::unordered_map<std::string, int32_t> added_by_content;
    AddedPatterns raw_patterns, normalized_patterns;
    std::vector<NormalizerStep> normalizers;
    std::vector<PreTokenizer> pre_tokenizers;
    std::vector<TokenizerSpec::TemplateItem> single_template;
    int32_t bos = -1, eos = -1, pad = -1;
    std::string strip_content;           // the decoder's Strip: this character ...
    uint32_t n_strip_leading = 0;        // ... at most this many times at the start

    void normalize(std::string & text) const;
    void split_added(std::string_view text, const AddedPatterns & set,
                     std::vector<std::pair<int32_t, std::string>> & out) const;
    // at_start: the text begins the input (Metaspace's prepend_scheme "first")
    void encode_segment(std::string_view text, bool at_start, std::vector<int32_t> & ids) const;
    void bpe(std::string_view word, std::vector<int32_t> & ids) const;
    void merge_by_score(std::string_view word, std::vector<int32_t> & ids) const;
    void strip_front(std::string & text, size_t & n_stripped) const;
};

namespace {

void build_patterns(Tokenizer::Impl::AddedPatterns & set) {
    for (size_t i = 0; i < set.patterns.size(); ++i)
        if (!set.patterns[i].first.empty())
            set.by_first_byte[uint8_t(set.patterns[i].first[0])].push_back(i);
    for (auto & list : set.by_first_byte)
        std::stable_sort(list.begin(), list.end(), [&](size_t a, size_t b) {
            return set.patterns[a].first.size() > set.patterns[b].first.size();
        });
}

uint32_t last_code_point(std::string_view s) {
    size_t i = s.size();
    while (i > 0 && (uint8_t(s[i - 1]) & 0xC0) == 0x80 && s.size() - i < 3) --i;
    if (i > 0) --i;
    size_t n_ok;
    bool truncated;
    uint32_t cp = 0;
    if (!utf8_sequence(s, i, &n_ok, &truncated, &cp) ) return 0xFFFD;
    return cp;
}

} // namespace

void Tokenizer::Impl::normalize(std::string & text) const {
    using Kind = TokenizerSpec::Normalizer::Kind;
    for (const NormalizerStep & step : normalizers) {
        if (step.spec.kind == Kind::Prepend) {
            if (!text.empty()) text.insert(0, step.spec.text);
            continue;
        }
        if (step.spec.kind == Kind::Replace) {
            text = replace_all(text, step.spec.text, step.spec.content);
            continue;
        }
        const icu::Normalizer2 * n = step.icu;
        // ICU wants valid UTF-8: normalize the valid runs, keep invalid bytes as they are.
        std::string out;
        size_t i = 0, run = 0;
        auto flush_run = [&](size_t end) {
            if (end > run) {
                UErrorCode status = U_ZERO_ERROR;
                icu::StringByteSink<std::string> sink(&out);
                n->normalizeUTF8(0, icu::StringPiece(text.data() + run, int32_t(end - run)), sink, nullptr, status);
                if (U_FAILURE(status)) out.append(text, run, end - run);
            }
        };
        while (i < text.size()) {
            size_t n_ok;
            bool truncated;
            size_t len = utf8_sequence(text, i, &n_ok, &truncated);
            if (len) {
                i += len;
                continue;
            }
            flush_run(i);
            out.append(text, i, n_ok);
            i += n_ok;
            run = i;
        }
        flush_run(i);
        text = std::move(out);
    }
}

// Leftmost-longest matches of the added tokens, then tokenizers' single_word,
// lstrip and rstrip rules; id -1 marks text between matches.
void Tokenizer::Impl::split_added(std::string_view text, const AddedPatterns & set,
                                  std::vector<std::pair<int32_t, std::string>> & out) const {
    size_t start_offset = 0, pos = 0;
    while (pos < text.size()) {
        size_t hit = SIZE_MAX;
        for (size_t p : set.by_first_byte[uint8_t(text[pos])]) {
            const std::string & pat = set.patterns[p].first;
            if (text.compare(pos, pat.size(), pat) == 0) {
                hit = p;
                break;
            }
        }
        if (hit == SIZE_MAX) {
            ++pos;
            continue;
        }
        const AddedToken & tok = added[set.patterns[hit].second];
        size_t start = pos, stop = pos + set.patterns[hit].first.size();
        pos = stop;
        if (tok.single_word) {
            bool start_space = start == 0 || !is_word_char(last_code_point(text.substr(0, start)));
            uint32_t next_cp = 0;
            if (stop < text.size()) {
                size_t n_ok;
                bool truncated;
                if (!utf8_sequence(text, stop, &n_ok, &truncated, &next_cp)) next_cp = 0xFFFD;
            }
            bool stop_space = stop == text.size() || !is_word_char(next_cp);
            if (!start_space || !stop_space) continue;
        }
        if (tok.lstrip) {
            size_t s = start;
            while (s > 0) {
                size_t i = s - 1;
                while (i > 0 && (uint8_t(text[i]) & 0xC0) == 0x80 && s - i < 4) --i;
                size_t n_ok;
                bool truncated;
                uint32_t cp = 0;
                if (utf8_sequence(text, i, &n_ok, &truncated, &cp) != s - i || !is_white_space(cp)) break;
                s = i;
            }
            start = std::max(s, start_offset);
        }
        if (tok.rstrip) {
            while (stop < text.size()) {
                size_t n_ok;
                bool truncated;
                uint32_t cp = 0;
                size_t len = utf8_sequence(text, stop, &n_ok, &truncated, &cp);
                if (!len || !is_white_space(cp)) break;
                stop += len;
            }
            pos = stop;
        }
        if (start < start_offset) continue;
        if (start_offset < start) out.emplace_back(-1, std::string(text.substr(start_offset, start - start_offset)));
        out.emplace_back(tok.id, std::string());
        start_offset = stop;
    }
    if (start_offset < text.size()) out.emplace_back(-1, std::string(text.substr(start_offset)));
}

void Tokenizer::Impl::encode_segment(std::string_view text, bool at_start, std::vector<int32_t> & ids) const {
    using PreKind = TokenizerSpec::PreTokenizer::Kind;
    using Scheme = TokenizerSpec::PrependScheme;
    std::vector<std::string> pieces{std::string(text)};
    for (const auto & pt : pre_tokenizers) {
        std::vector<std::string> next;
        for (size_t i = 0; i < pieces.size(); ++i) {
            std::string & piece = pieces[i];
            if (pt.spec.kind == PreKind::Metaspace) {
                const std::string & rep = pt.spec.replacement;
                piece = replace_all(piece, " ", rep);
                bool first = at_start && i == 0;
                bool prepend = pt.spec.prepend_scheme == Scheme::Always || (pt.spec.prepend_scheme == Scheme::First && first);
                if (prepend && piece.compare(0, rep.size(), rep) != 0) piece.insert(0, rep);
                if (!pt.spec.split) {
                    if (!piece.empty()) next.push_back(std::move(piece));
                    continue;
                }
                auto found = pt.regex->find_all(piece);
                for (auto & p : split_pieces(piece, found, Behavior::MergedWithNext, false)) next.push_back(std::move(p));
            } else if (pt.spec.kind == PreKind::ByteLevel) {
                if (pt.spec.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(0, 1, ' ');
                if (!pt.spec.use_regex) {
                    if (!piece.empty()) next.push_back(std::move(piece));
                    continue;
                }
                auto found = pt.regex->find_all(piece);
                for (auto & p : split_pieces(piece, found, Behavior::Isolated, false)) next.push_back(std::move(p));
            } else {
                auto found = pt.regex->find_all(piece);
                for (auto & p : split_pieces(piece, found, pt.spec.behavior, pt.spec.invert))
                    next.push_back(std::move(p));
            }
        }
        pieces = std::move(next);
    }
    if (!scores.empty()) {
        for (const auto & piece : pieces) merge_by_score(piece, ids);
        return;
    }
    if (!byte_level) {
        for (const auto & piece : pieces) bpe(piece, ids);
        return;
    }
    const auto & alphabet = byte_alphabet();
    std::string word;
    for (const auto & piece : pieces) {
        word.clear();
        for (char c : piece) word += alphabet.encode[uint8_t(c)];
        bpe(word, ids);
    }
}

// SentencePiece's BPE encoding, as llama.cpp's SPM tokenizer runs it: start
// from characters and repeatedly join the adjacent pair whose concatenation
// is the vocabulary token of highest score (leftmost on ties); what stays
// outside the vocabulary becomes <0xNN> byte tokens.
void Tokenizer::Impl::merge_by_score(std::string_view word, std::vector<int32_t> & ids) const {
    struct Symbol {
        size_t start, n;   // n == 0: merged into its left neighbour
        int32_t prev, next;
    };
    struct Bigram {
        float score;
        int32_t left, right;
        size_t size;
        bool operator<(const Bigram & o) const { return score != o.score ? score < o.score : left > o.left; }
    };
    std::vector<Symbol> symbols;
    for (size_t i = 0; i < word.size();) {
        size_t len = utf8_char_len(word, i);
        int32_t n = int32_t(symbols.size());
        symbols.push_back({i, len, n - 1, i + len < word.size() ? n + 1 : -1});
        i += len;
    }
    std::priority_queue<Bigram> queue;
    std::string key;
    auto consider = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        key.assign(word.substr(symbols[left].start, symbols[left].n + symbols[right].n));
        auto it = vocab.find(key);
        if (it != vocab.end()) queue.push({scores[it->second], left, right, key.size()});
    };
    for (int32_t i = 1; i < int32_t(symbols.size()); ++i) consider(i - 1, i);
    while (!queue.empty()) {
        Bigram top = queue.top();
        queue.pop();
        Symbol & left = symbols[top.left];
        Symbol & right = symbols[top.right];
        if (left.n == 0 || right.n == 0 || left.n + right.n != top.size) continue;
        left.n += right.n;
        right.n = 0;
        left.next = right.next;
        if (right.next >= 0) symbols[right.next].prev = top.left;
        consider(left.prev, top.left);
        consider(top.left, left.next);
    }
    for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
        key.assign(word.substr(symbols[i].start, symbols[i].n));
        if (auto it = vocab.find(key); it != vocab.end()) {
            ids.push_back(it->second);
            continue;
        }
        for (char c : key) {
            int32_t id = byte_ids[uint8_t(c)];
            if (id < 0) id = unk_id;
            if (id >= 0) ids.push_back(id);
        }
    }
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t> & ids) const {
    if (word.empty()) return;
    if (ignore_merges) {
        auto it = vocab.find(std::string(word));
        if (it != vocab.end()) {
            ids.push_back(it->second);
            return;
        }
    }
    struct Symbol {
        int32_t id;
        int32_t prev, next;
        bool alive;
    };
    std::vector<Symbol> symbols;
    std::string ch;
    bool pending_unk = false;
    auto add = [&](int32_t id) {
        int32_t n = int32_t(symbols.size());
        symbols.push_back({id, n - 1, n + 1, true});
    };
    for (size_t i = 0; i < word.size();) {
        size_t len = utf8_char_len(word, i);
        ch.assign(word.data() + i, len);
        i += len;
        auto it = vocab.find(ch);
        if (it != vocab.end()) {
            if (pending_unk) add(unk_id), pending_unk = false;
            add(it->second);
            continue;
        }
        // as `tokenizers`: byte tokens only when every byte has one, and a pending unk stays pending
        if (byte_fallback && std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids[uint8_t(c)] >= 0; })) {
            for (char c : ch) add(byte_ids[uint8_t(c)]);
        } else if (unk_id >= 0) {
            if (pending_unk && !fuse_unk) add(unk_id);
            pending_unk = true;
        }
    }
    if (pending_unk) add(unk_id);
    if (symbols.empty()) return;
    symbols.back().next = -1;

    struct Candidate {
        uint32_t rank;
        int32_t pos;
        int32_t new_id;
        bool operator>(const Candidate & o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    auto consider = [&](int32_t pos) {
        int32_t next = symbols[pos].next;
        if (next < 0) return;
        auto it = merges.find(pair_key(symbols[pos].id, symbols[next].id));
        if (it != merges.end()) queue.push({it->second.rank, pos, it->second.new_id});
    };
    for (int32_t i = 0; i + 1 < int32_t(symbols.size()); ++i) consider(i);
    while (!queue.empty()) {
        Candidate top = queue.top();
        queue.pop();
        Symbol & cur = symbols[top.pos];
        if (!cur.alive || cur.next < 0) continue;
        Symbol & right = symbols[cur.next];
        auto it = merges.find(pair_key(cur.id, right.id));
        if (it == merges.end() || it->second.new_id != top.new_id) continue;
        cur.id = top.new_id;
        right.alive = false;
        cur.next = right.next;
        if (cur.next >= 0) symbols[cur.next].prev = top.pos;
        if (cur.prev >= 0) consider(cur.prev);
        consider(top.pos);
    }
    for (int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
}

// ---- Tokenizer --------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
    std::vector<int32_t> ids;
    if (!impl_) return ids;
    const Impl & m = *impl_;
    std::vector<int32_t> body;
    std::vector<std::pair<int32_t, std::string>> raw_split;
    m.split_added(text, m.raw_patterns, raw_split);
    std::vector<std::pair<int32_t, std::string>> norm_split;
    for (size_t i = 0; i < raw_split.size(); ++i) {
        auto & [id, segment] = raw_split[i];
        if (id >= 0) {
            body.push_back(id);
            continue;
        }
        m.normalize(segment);
        norm_split.clear();
        m.split_added(segment, m.normalized_patterns, norm_split);
        for (size_t k = 0; k < norm_split.size(); ++k) {
            const auto & [id2, sub] = norm_split[k];
            if (id2 >= 0) body.push_back(id2);
            else m.encode_segment(sub, i == 0 && k == 0, body);
        }
    }
    if (!add_special || m.single_template.empty()) return body;
    for (const auto & item : m.single_template) {
        if (item.is_sequence) ids.insert(ids.end(), body.begin(), body.end());
        else ids.insert(ids.end(), item.ids.begin(), item.ids.end());
    }
    return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t> & ids, bool skip_special) const {
    std::string bytes, out;
    if (!impl_) return out;
    for (int32_t id : ids) {
        if (id < 0 || id >= n_vocab()) continue;
        if (skip_special && impl_->id_special[id]) continue;
        bytes += impl_->id_bytes[id];
    }
    append_lossy(out, bytes, false);
    size_t n_stripped = 0;
    impl_->strip_front(out, n_stripped);
    return out;
}

const std::string & Tokenizer::token_to_piece(int32_t id) const {
    static const std::string empty;
    if (!impl_ || id < 0 || id >= n_vocab()) return empty;
    return impl_->id_bytes[id];
}

const std::string & Tokenizer::token_text(int32_t id) const {
    static const std::string empty;
    if (!impl_ || id < 0 || id >= n_vocab()) return empty;
    return impl_->id_text[id];
}

int32_t Tokenizer::token_id(std::string_view token_text) const {
    if (!impl_) return -1;
    std::string key(token_text);
    if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end()) return it->second;
    if (auto it = impl_->vocab.find(key); it != impl_->vocab.end()) return it->second;
    return -1;
}

int32_t Tokenizer::n_vocab() const { return impl_ ? int32_t(impl_->id_text.size()) : 0; }
int32_t Tokenizer::bos_id() const { return impl_ ? impl_->bos : -1; }
int32_t Tokenizer::eos_id() const { return impl_ ? impl_->eos : -1; }
int32_t Tokenizer::unk_id() const { return impl_ ? impl_->unk_id : -1; }
int32_t Tokenizer::pad_id() const { return impl_ ? impl_->pad : -1; }

void Tokenizer::Impl::strip_front(std::string & text, size_t & n_stripped) const {
    size_t cut = 0;
    while (n_stripped < n_strip_leading && text.compare(cut, strip_content.size(), strip_content) == 0) {
        cut += strip_content.size();
        ++n_stripped;
    }
    text.erase(0, cut);
}

bool Tokenizer::is_special(int32_t id) const {
    return impl_ && id >= 0 && id < n_vocab() && impl_->id_special[id];
}

const std::vector<AddedToken> & Tokenizer::added_tokens() const {
    static const std::vector<AddedToken> none;
    return impl_ ? impl_->added : none;
}

const std::string & Tokenizer::source() const {
    static const std::string none;
    return impl_ ? impl_->source : none;
}

// ---- StreamDecoder ------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer & tok, bool skip_special, std::vector<int32_t> keep)
    : tok_(&tok), skip_special_(skip_special), keep_(std::move(keep)) {}

std::string_view StreamDecoder::push(int32_t id) {
    out_.clear();
    if (id < 0 || id >= tok_->n_vocab() ||
        (skip_special_ && tok_->is_special(id) && std::find(keep_.begin(), keep_.end(), id) == keep_.end()))
        return out_;
    pending_ += tok_->token_to_piece(id);
    size_t used = append_lossy(out_, pending_, true);
    pending_.erase(0, used);
    strip();
    return out_;
}

std::string_view StreamDecoder::flush() {
    out_.clear();
    append_lossy(out_, pending_, false);
    pending_.clear();
    strip();
    started_ = false;
    n_stripped_ = 0;
    return out_;
}

void StreamDecoder::strip() {
    if (started_ || !tok_->impl_) return;
    tok_->impl_->strip_front(out_, n_stripped_);
    started_ = !out_.empty();
}

// ---- building from a spec -----------------------------------------------------------

Tokenizer build_tokenizer(TokenizerSpec spec) {
    auto m = std::make_shared<Tokenizer::Impl>();
    const std::string & src = spec.source;
    const TokenizerSpec::Keys & keys = spec.keys;
    auto fail = [&](const std::string & key, const std::string & what) -> void {
        throw Error(src + ": key '" + key + "': " + what);
    };
    // Tables are indexed by id; real vocabularies stay below 300k.
    constexpr int32_t k_max_id = (1 << 21) - 1;

    m->source = spec.source;
    int32_t max_id = -1;
    for (size_t i = 0; i < spec.vocab.size(); ++i) {
        const auto & [text, id] = spec.vocab[i];
        if (id < 0 || id > k_max_id)
            fail(keys.vocab, "token '" + text + "' has id " + std::to_string(id) + " outside [0, " +
                                 std::to_string(k_max_id) + "]");
        if (text.empty()) fail(keys.vocab, "empty token (id " + std::to_string(id) + ")");
        if (!m->vocab.emplace(text, id).second) fail(keys.vocab, "duplicate token '" + text + "'");
        max_id = std::max(max_id, id);
    }
    for (const auto & a : spec.added_tokens) {
        if (a.id < 0 || a.id > k_max_id)
            fail(keys.added, "token '" + a.content + "' has id " + std::to_string(a.id) + " outside [0, " +
                                     std::to_string(k_max_id) + "]");
        max_id = std::max(max_id, a.id);
    }
    const size_t n_vocab = size_t(max_id + 1);
    m->id_text.assign(n_vocab, std::string());
    std::vector<uint8_t> seen(n_vocab, 0);
    for (const auto & [text, id] : spec.vocab) {
        if (seen[id]) fail(keys.vocab, "id " + std::to_string(id) + " is used by more than one token (another is '" +
                                              text + "')");
        seen[id] = 1;
        m->id_text[id] = text;
    }
    m->byte_level = spec.decoder.byte_level;
    m->strip_content = spec.decoder.strip_content;
    m->n_strip_leading = spec.decoder.strip_content.empty() ? 0 : spec.decoder.n_strip_leading;
    // What a token decodes to: the byte-level alphabet mapped back, or the
    // decoder's replacements and byte fallback applied to its text.
    auto decode_token = [&](const std::string & text) {
        if (spec.decoder.byte_level) return byte_level_decode(text);
        if (int b = byte_token_value(text); spec.decoder.byte_fallback && b >= 0) return std::string(1, char(b));
        std::string out = text;
        for (const auto & [from, to] : spec.decoder.replace) out = replace_all(out, from, to);
        return out;
    };
    m->id_bytes.assign(n_vocab, std::string());
    for (size_t id = 0; id < n_vocab; ++id)
        if (seen[id]) m->id_bytes[id] = decode_token(m->id_text[id]);
    m->id_special.assign(n_vocab, 0);

    const std::string & vocab_key = keys.vocab;
    for (size_t i = 0; i < spec.merges.size(); ++i) {
        const auto & [a, b] = spec.merges[i];
        const std::string key = keys.merges + "[" + std::to_string(i) + "]";
        auto ia = m->vocab.find(a), ib = m->vocab.find(b), ic = m->vocab.find(a + b);
        if (ia == m->vocab.end()) fail(key, "merge names '" + a + "', which is not in " + vocab_key);
        if (ib == m->vocab.end()) fail(key, "merge names '" + b + "', which is not in " + vocab_key);
        if (ic == m->vocab.end()) fail(key, "merged token '" + a + b + "' is not in " + vocab_key);
        m->merges[pair_key(ia->second, ib->second)] = Merge{uint32_t(i), ic->second};
    }
    if (!spec.scores.empty()) {
        if (spec.scores.size() != n_vocab)
            fail(keys.scores, std::to_string(spec.scores.size()) + " scores for " + std::to_string(n_vocab) + " tokens");
        for (size_t id = 0; id < n_vocab; ++id)
            if (!std::isfinite(spec.scores[id]))
                fail(keys.scores, "score of token " + std::to_string(id) + " is not a finite number");
        m->scores = std::move(spec.scores);
    }
    if (!spec.unk_token.empty()) {
        auto it = m->vocab.find(spec.unk_token);
        if (it == m->vocab.end()) fail(keys.unk, "'" + spec.unk_token + "' is not in " + vocab_key);
        m->unk_id = it->second;
    }
    m->fuse_unk = spec.fuse_unk;
    m->ignore_merges = spec.ignore_merges;
    m->byte_fallback = spec.byte_fallback || !m->scores.empty();
    m->byte_ids.fill(-1);
    for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        if (auto it = m->vocab.find(name); it != m->vocab.end()) m->byte_ids[b] = it->second;
    }

    UErrorCode status = U_ZERO_ERROR;
    for (const auto & n : spec.normalizers) {
        using Kind = TokenizerSpec::Normalizer::Kind;
        Tokenizer::Impl::NormalizerStep step{n, nullptr};
        switch (n.kind) {
        case Kind::NFC: step.icu = icu::Normalizer2::getNFCInstance(status); break;
        case Kind::NFD: step.icu = icu::Normalizer2::getNFDInstance(status); break;
        case Kind::NFKC: step.icu = icu::Normalizer2::getNFKCInstance(status); break;
        case Kind::NFKD: step.icu = icu::Normalizer2::getNFKDInstance(status); break;
        case Kind::Prepend: break;
        case Kind::Replace:
            if (n.text.empty()) fail("normalizer", "Replace with an empty pattern");
            break;
        }
        if (U_FAILURE(status) || (n.kind != Kind::Prepend && n.kind != Kind::Replace && !step.icu))
            fail("normalizer", "ICU has no Unicode normalization data");
        m->normalizers.push_back(std::move(step));
    }

    m->added = spec.added_tokens;
    std::vector<uint8_t> added_seen(n_vocab, 0);
    for (size_t i = 0; i < m->added.size(); ++i) {
        AddedToken & a = m->added[i];
        const std::string key = keys.added + "[" + std::to_string(i) + "]";
        if (a.content.empty()) fail(key + ".content", "empty token");
        if (added_seen[a.id]) fail(key + ".id", "id " + std::to_string(a.id) + " is used by two added tokens");
        added_seen[a.id] = 1;
        if (seen[a.id] && m->id_text[a.id] != a.content)
            fail(key + ".id", "id " + std::to_string(a.id) + " is '" + m->id_text[a.id] + "' in " + vocab_key +
                                  " but '" + a.content + "' here");
        if (!m->added_by_content.emplace(a.content, a.id).second)
            fail(key + ".content", "'" + a.content + "' is added twice");
        m->id_text[a.id] = a.content;
        m->id_bytes[a.id] = decode_token(a.content);
        m->id_special[a.id] = a.special;
        if (a.normalized && !m->normalizers.empty()) {
            std::string pattern = a.content;
            m->normalize(pattern);
            m->normalized_patterns.patterns.emplace_back(pattern, i);
        } else if (a.normalized) {
            m->normalized_patterns.patterns.emplace_back(a.content, i);
        } else {
            m->raw_patterns.patterns.emplace_back(a.content, i);
        }
    }
    build_patterns(m->raw_patterns);
    build_patterns(m->normalized_patterns);

    using PreKind = TokenizerSpec::PreTokenizer::Kind;
    for (size_t i = 0; i < spec.pre_tokenizers.size(); ++i) {
        const auto & pt = spec.pre_tokenizers[i];
        Tokenizer::Impl::PreTokenizer step{pt, nullptr};
        bool byte_level = pt.kind == PreKind::ByteLevel;
        if (byte_level && i + 1 != spec.pre_tokenizers.size())
            fail(pt.key, "ByteLevel must be the last pre-tokenizer (later steps would see its stand-in characters)");
        if (byte_level && !m->byte_level) fail(pt.key, "a ByteLevel pre-tokenizer needs the ByteLevel decoder");
        if (pt.kind == PreKind::Metaspace && pt.replacement.empty()) fail(pt.key + ".replacement", "empty");
        try {
            if (pt.kind == PreKind::Split) step.regex = std::make_unique<Regex>(pt.pattern, !pt.pattern_is_regex);
            else if (pt.kind == PreKind::Metaspace && pt.split) step.regex = std::make_unique<Regex>(pt.replacement, true);
            else if (byte_level && pt.use_regex) step.regex = std::make_unique<Regex>(k_gpt2_regex, false);
        } catch (const std::runtime_error & e) {
            fail(pt.key + ".pattern", e.what());
        }
        m->pre_tokenizers.push_back(std::move(step));
    }
    if (m->byte_level && (m->pre_tokenizers.empty() || m->pre_tokenizers.back().spec.kind != PreKind::ByteLevel))
        fail("pre_tokenizer", "a byte-level BPE needs a ByteLevel pre-tokenizer (alone or last in a Sequence)");

    bool before_sequence = true;
    for (const auto & item : spec.single_template) {
        if (item.is_sequence) {
            before_sequence = false;
            continue;
        }
        for (int32_t id : item.ids) {
            if (id < 0 || size_t(id) >= n_vocab)
                fail(keys.special, "'" + item.special + "' has id " + std::to_string(id) +
                                                          ", which is not a token");
        }
        if (item.ids.size() == 1) {
            if (before_sequence && m->bos < 0) m->bos = item.ids[0];
            if (!before_sequence) m->eos = item.ids[0];
        }
    }
    m->single_template = std::move(spec.single_template);
    for (auto [id, key] : {std::pair{spec.bos_id, "bos"}, {spec.eos_id, "eos"}, {spec.pad_id, "pad"}}) {
        if (id >= 0 && size_t(id) >= n_vocab)
            fail(std::string(key) + " id", std::to_string(id) + " is not a token (n_vocab " + std::to_string(n_vocab) + ")");
    }
    if (spec.bos_id >= 0) m->bos = spec.bos_id;
    if (spec.eos_id >= 0) m->eos = spec.eos_id;
    m->pad = spec.pad_id;
    return Tokenizer(std::move(m));
}

} // namespace moesh
