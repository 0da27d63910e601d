// BPE tokenizers with the same ids as their references:
//  - byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM families) from a Hugging
//    Face tokenizer.json or from GGUF metadata (tokenizer.ggml.model "gpt2");
//  - SentencePiece-style BPE (Llama-2, Mistral, Mixtral): from tokenizer.json
//    (BPE with byte_fallback, merges by rank, as `tokenizers` does) or from
//    GGUF metadata (tokenizer.ggml.model "llama": merges by token score with
//    <0xNN> byte fallback, as llama.cpp's SPM tokenizer and SentencePiece do).
//
//   Tokenizer tok = load_tokenizer_json_file("model/tokenizer.json");
//   // or: GgufFile f("model.gguf"); Tokenizer tok = load_tokenizer_gguf(f, "model.gguf");
//   std::vector<int32_t> ids = tok.encode("Hello world", /*add_special=*/true);  // BOS per the post-processor / metadata
//   std::string text = tok.decode(ids, /*skip_special=*/true);
//
//   StreamDecoder stream(tok, /*skip_special=*/true);   // while generating:
//   for (int32_t id : generated) { std::string_view s = stream.push(id); fwrite(s.data(), 1, s.size(), stdout); }
//   std::string_view rest = stream.flush();              // at the end
//
// tokenizer.json, supported: model BPE (merges as "a b" or [a, b],
// ignore_merges, unk_token, fuse_unk, byte_fallback); normalizers
// NFC/NFD/NFKC/NFKD (ICU), Prepend, Replace (String pattern) and Sequence;
// pre-tokenizers ByteLevel (alone or last in a Sequence after Split/Digits),
// Split (Regex run by PCRE2, or String; every behaviour, invert), Digits,
// Metaspace; decoders ByteLevel, Metaspace, or a Sequence of Replace
// (String), ByteFallback, Fuse and a final Strip of leading characters;
// post-processors ByteLevel, TemplateProcessing (single: specials around $A)
// and Sequence; added tokens with lstrip/rstrip/single_word/normalized,
// matched leftmost-longest before pre-tokenization. Refused: dropout,
// WordPiece/Unigram, other normalizers/pre-tokenizers/decoders.
// truncation/padding are ignored.
//
// GGUF: see load_tokenizer_gguf below.
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
    int32_t bos_id() const;   // GGUF metadata, else TemplateProcessing ("<bos> $A"); -1 if none
    int32_t eos_id() const;   // GGUF metadata, else TemplateProcessing ("$A <eos>"); -1 if none
    int32_t unk_id() const;   // the model's unknown token; -1 if none
    int32_t pad_id() const;   // GGUF metadata; -1 if none
    bool is_special(int32_t id) const;
    const std::vector<AddedToken> & added_tokens() const;
    const std::string & source() const;      // file name given at load

private:
    friend class StreamDecoder;
    std::shared_ptr<const Impl> impl_;
};

// Turns ids into text one at a time, emitting only complete UTF-8 characters:
// bytes of a character split across tokens are held back until it completes.
// The concatenation of every push() and the final flush() equals
// Tokenizer::decode of the same ids. The Tokenizer must outlive the decoder.
class StreamDecoder {
public:
    // skip_special: special tokens are not text, except those in keep.
    explicit StreamDecoder(const Tokenizer & tok, bool skip_special = false, std::vector<int32_t> keep = {});

    // The text completed by this id; the view is valid until the next call.
    std::string_view push(int32_t id);
    // Whatever is held back, with an incomplete character as U+FFFD; resets.
    std::string_view flush();

private:
    void strip();   // the decoder's Strip of leading characters, until text has started

    const Tokenizer * tok_;
    bool skip_special_;
    std::vector<int32_t> keep_;
    std::string pending_;   // bytes not yet emitted: at most an incomplete character
    std::string out_;
    size_t n_stripped_ = 0; // leading characters the decoder's Strip has removed so far
    bool started_ = false;  // some text was emitted (Strip only applies before)
};

// What a tokenizer.json or GGUF metadata describes, checked for types but
// not yet for consistency: build_tokenizer validates ids, merges and regexes
// and reports problems against `source` and the keys named in `keys`.
struct TokenizerSpec {
    struct Normalizer {
        enum class Kind { NFC, NFD, NFKC, NFKD, Prepend, Replace } kind = Kind::NFC;
        std::string text;       // Prepend: what to put in front; Replace: the literal pattern
        std::string content;    // Replace: what replaces it
    };
    enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
    enum class PrependScheme { Always, First, Never };
    struct PreTokenizer {
        enum class Kind { Split, ByteLevel, Metaspace } kind = Kind::ByteLevel;
        std::string key;                    // JSON path, for messages
        std::string pattern;                // Split
        bool pattern_is_regex = true;       // Split: {"Regex": ...} or {"String": ...}
        SplitBehavior behavior = SplitBehavior::Isolated;
        bool invert = false;
        bool add_prefix_space = false;      // ByteLevel
        bool use_regex = true;              // ByteLevel: also split with the GPT-2 regex
        std::string replacement;            // Metaspace: stands for ' ' ("▁")
        PrependScheme prepend_scheme = PrependScheme::Always;   // Metaspace
        bool split = false;                 // Metaspace: split before each replacement
    };
    struct Decoder {
        bool byte_level = true;             // ByteLevel; otherwise the steps below
        std::vector<std::pair<std::string, std::string>> replace;   // (literal, by) on each token, in order
        bool byte_fallback = false;         // "<0xNN>" tokens decode to byte NN
        std::string strip_content;          // one character ...
        uint32_t n_strip_leading = 0;       // ... removed up to this many times from the start of the text
    };
    struct TemplateItem {
        bool is_sequence = false;           // $A
        std::string special;                // otherwise: this entry of the special-token map
        std::vector<int32_t> ids;           // ... and its ids
    };
    // Names of the source's keys, for messages.
    struct Keys {
        std::string vocab = "model.vocab", merges = "model.merges", scores = "model.scores";
        std::string unk = "model.unk_token", added = "added_tokens", special = "post_processor.special_tokens";
    };

    std::string source;
    Keys keys;
    std::vector<std::pair<std::string, int32_t>> vocab;
    std::vector<std::pair<std::string, std::string>> merges;
    std::vector<float> scores;              // [n_vocab] by id; non-empty: merge by score, not by `merges`
    std::string unk_token;                  // empty: unknown characters are dropped
    bool fuse_unk = false;
    bool ignore_merges = false;
    bool byte_fallback = false;             // characters not in the vocab become <0xNN> tokens
    std::vector<AddedToken> added_tokens;
    std::vector<Normalizer> normalizers;
    std::vector<PreTokenizer> pre_tokenizers;   // with a byte-level decoder, the last one is ByteLevel
    Decoder decoder;
    std::vector<TemplateItem> single_template;  // empty: no special tokens added
    int32_t bos_id = -1, eos_id = -1, pad_id = -1;   // >= 0: stated by the source (else from the template)
};

Tokenizer build_tokenizer(TokenizerSpec spec);

// Loads a Hugging Face tokenizer.json (byte-level BPE, or BPE with byte
// fallback). source_name is used in error messages.
Tokenizer load_tokenizer_json(std::string_view json_text, std::string_view source_name);
Tokenizer load_tokenizer_json_file(const std::string & path);

class GgufContents;

// The tokenizer stored in a GGUF file's metadata, as llama.cpp reads it:
//   tokenizer.ggml.model   "gpt2" (byte-level BPE with tokenizer.ggml.merges) or
//                          "llama" (SentencePiece BPE: tokenizer.ggml.scores, <0xNN> byte tokens)
//   tokenizer.ggml.pre     gpt2 only: which pre-tokenizer (gpt-2, llama-bpe, qwen2, smollm, ...;
//                          gguf_pre_tokenizer_names() lists them); absent means "default"
//   tokenizer.ggml.tokens, .token_type (1 normal, 2 unknown, 3 control, 4 user-defined,
//                          5 unused, 6 byte), .bos/.eos/.unk/.padding_token_id,
//   tokenizer.ggml.add_bos_token / add_eos_token (what encode(add_special=true) adds),
//   tokenizer.ggml.add_space_prefix (llama: default true).
// Control, unknown and user-defined tokens are matched in the text before
// anything else (control and unknown ones are special). Throws moesh::Error
// naming `source`, the key and the problem.
Tokenizer load_tokenizer_gguf(const GgufContents & gguf, std::string_view source);
// The tokenizer.ggml.pre values load_tokenizer_gguf knows.
const std::vector<std::string> & gguf_pre_tokenizer_names();

} // namespace moesh
