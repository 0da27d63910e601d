// Byte-level BPE tokenizer (GPT-2, Llama-3, Qwen2 families) loaded from a
// Hugging Face tokenizer.json, with the same ids as the `tokenizers` library.
//
//   Tokenizer tok = load_tokenizer_json_file("model/tokenizer.json");
//   std::vector<int32_t> ids = tok.encode("Hello world", /*add_special=*/true);  // BOS per the post-processor
//   std::string text = tok.decode(ids, /*skip_special=*/true);
//
//   StreamDecoder stream(tok, /*skip_special=*/true);   // while generating:
//   for (int32_t id : generated) { std::string_view s = stream.push(id); fwrite(s.data(), 1, s.size(), stdout); }
//   std::string_view rest = stream.flush();              // at the end
//
// Supported: model BPE (merges as "a b" or [a, b], ignore_merges, unk_token);
// normalizers NFC/NFD/NFKC/NFKD (ICU) and Sequence; pre-tokenizers ByteLevel
// alone or last in a Sequence after Split (Regex run by PCRE2, or String;
// every behaviour, invert); decoder ByteLevel; post-processors ByteLevel,
// TemplateProcessing (single: specials around $A) and Sequence; added tokens
// with lstrip/rstrip/single_word/normalized, matched leftmost-longest before
// pre-tokenization. Refused: byte_fallback, dropout, WordPiece/Unigram,
// Metaspace and other pre-tokenizers/decoders. truncation/padding are ignored.
//
// Loading refuses anything it does not implement (model, normalizer,
// pre-tokenizer, decoder or post-processor types, flag combinations) with a
// moesh::Error naming the file, the key and what is supported.
//
// Thread safety: a Tokenizer is immutable once loaded; encode, decode and the
// accessors are const and may run concurrently from any number of threads.
// Copies share the loaded tables. A StreamDecoder belongs to one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moesh {

struct AddedToken {
    int32_t id = -1;
    std::string content;
    bool special = false;
    bool lstrip = false;        // the match also takes the whitespace before it
    bool rstrip = false;        // ... and after it
    bool single_word = false;   // only matches when not inside a word
    bool normalized = true;     // matched against the normalized text
};

class Tokenizer {
public:
    struct Impl;

    Tokenizer() = default;   // empty: n_vocab() == 0, encode returns nothing
    explicit Tokenizer(std::shared_ptr<const Impl> impl);

    // Throws moesh::Error only if a pre-tokenizer regex exceeds PCRE2's match
    // limits (pathological patterns); invalid UTF-8 is tokenized byte by byte.
    std::vector<int32_t> encode(std::string_view text, bool add_special = false) const;

    // Unknown ids are skipped, as `tokenizers` does; invalid UTF-8 in the
    // result is replaced with U+FFFD per maximal invalid subsequence.
    std::string decode(const std::vector<int32_t> & ids, bool skip_special = false) const;

    // The bytes this token decodes to (may be part of a UTF-8 character);
    // empty for an unknown id.
    const std::string & token_to_piece(int32_t id) const;
    // The token as written in the vocabulary ("Ġhello"); empty for an unknown id.
    const std::string & token_text(int32_t id) const;
    // Id of a vocabulary or added token by its text as written in the file; -1 if none.
    int32_t token_id(std::string_view token_text) const;

    int32_t n_vocab() const;                 // 1 + the largest id
    int32_t bos_id() const;                  // from TemplateProcessing ("<bos> $A"); -1 if none
    int32_t eos_id() const;                  // from TemplateProcessing ("$A <eos>"); -1 if none
    bool is_special(int32_t id) const;
    const std::vector<AddedToken> & added_tokens() const;
    const std::string & source() const;      // file name given at load

private:
    std::shared_ptr<const Impl> impl_;
};

// Turns ids into text one at a time, emitting only complete UTF-8 characters:
// bytes of a character split across tokens are held back until it completes.
// The concatenation of every push() and the final flush() equals
// Tokenizer::decode of the same ids. The Tokenizer must outlive the decoder.
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer & tok, bool skip_special = false);

    // The text completed by this id; the view is valid until the next call.
    std::string_view push(int32_t id);
    // Whatever is held back, with an incomplete character as U+FFFD; resets.
    std::string_view flush();

private:
    const Tokenizer * tok_;
    bool skip_special_;
    std::string pending_;   // bytes not yet emitted: at most an incomplete character
    std::string out_;
};

// What a tokenizer.json describes, checked for types but not yet for
// consistency: build_tokenizer validates ids, merges and regexes and reports
// problems against `source` and the recorded JSON keys.
struct TokenizerSpec {
    enum class Normalizer { NFC, NFD, NFKC, NFKD };
    enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
    struct PreTokenizer {
        enum class Kind { Split, ByteLevel } kind = Kind::ByteLevel;
        std::string key;                    // JSON path, for messages
        std::string pattern;                // Split
        bool pattern_is_regex = true;       // Split: {"Regex": ...} or {"String": ...}
        SplitBehavior behavior = SplitBehavior::Isolated;
        bool invert = false;
        bool add_prefix_space = false;      // ByteLevel
        bool use_regex = true;              // ByteLevel: also split with the GPT-2 regex
    };
    struct TemplateItem {
        bool is_sequence = false;           // $A
        std::string special;                // otherwise: this entry of the special-token map
        std::vector<int32_t> ids;           // ... and its ids
    };

    std::string source;
    std::vector<std::pair<std::string, int32_t>> vocab;
    std::vector<std::pair<std::string, std::string>> merges;
    std::string unk_token;                  // empty: unknown characters are dropped
    bool fuse_unk = false;
    bool ignore_merges = false;
    std::vector<AddedToken> added_tokens;
    std::vector<Normalizer> normalizers;
    std::vector<PreTokenizer> pre_tokenizers;   // the last one is ByteLevel
    std::vector<TemplateItem> single_template;  // empty: no special tokens added
};

Tokenizer build_tokenizer(TokenizerSpec spec);

// Loads a Hugging Face tokenizer.json (BPE model with byte-level pre-tokenizer
// and decoder). source_name is used in error messages.
Tokenizer load_tokenizer_json(std::string_view json_text, std::string_view source_name);
Tokenizer load_tokenizer_json_file(const std::string & path);

} // namespace moesh
