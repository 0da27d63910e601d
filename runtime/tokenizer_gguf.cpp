// GGUF tokenizer metadata (tokenizer.ggml.*) -> TokenizerSpec -> Tokenizer,
// read as llama.cpp's llama_vocab::load does, with its defaults; every value
// is checked first so that malformed metadata is an Error naming the key.
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

#include <algorithm>
#include <cctype>

namespace moesh {

namespace {

constexpr std::string_view k_gpt2_regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// The regexes of the families' tokenizer.json files (llama.cpp spells the
// case-insensitive contractions out as [sS]; PCRE2 takes the original).
constexpr std::string_view k_llama3_regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view k_qwen2_regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// How one tokenizer.ggml.pre value pre-tokenizes: Isolated splits by these
// regexes in turn, then the byte-level mapping (with GPT-2's regex if asked).
struct PreType {
    std::vector<std::string_view> names;
    std::vector<std::string_view> splits;
    bool byte_level_regex = false;
    bool ignore_merges = false;
    bool add_bos = false;   // llama.cpp's default when add_bos_token is absent
    bool nfc = false;       // Qwen2's tokenizer.json normalizes to NFC; llama.cpp does not
};

const std::vector<PreType> & pre_types() {
    static const std::vector<PreType> types = {
        {{"gpt-2", "phi-2", "olmo", "mpt"}, {}, true, false, false, false},
        {{"llama3", "llama-v3", "llama-bpe"}, {k_llama3_regex}, false, true, true, false},
        {{"dbrx", "smaug-bpe"}, {k_llama3_regex}, false, false, false, false},
        {{"qwen2", "deepseek-r1-qwen"}, {k_qwen2_regex}, false, false, false, true},
        // tokenizer.json: Digits(individual_digits) then ByteLevel(use_regex)
        {{"smollm", "starcoder", "refact"}, {R"(\p{N})"}, true, false, false, false},
        // llama.cpp's fallback for files without a known pre-tokenizer
        {{"default"},
         {R"([\p{P}\$\+<=>\^~\|]+)", R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))",
          R"(\p{N}+)", R"([0-9][0-9][0-9])"},
         false, false, false, false},
    };
    return types;
}

enum TokenType : int32_t { k_undefined = 0, k_normal = 1, k_unknown = 2, k_control = 3, k_user_defined = 4,
                           k_unused = 5, k_byte = 6 };

class MetaReader {
public:
    MetaReader(const GgufContents & g, std::string_view source) : g_(g), source_(source) {}

    [[noreturn]] void fail(std::string_view key, const std::string & what) const {
        throw Error(source_ + ": key '" + std::string(key) + "': " + what);
    }
    const GgufKv * find(std::string_view key) const { return g_.find(key); }

    std::string type_name(const GgufValue & v) const {
        std::string s(gguf_value_type_name(v.type));
        if (v.type == GgufValueType::Array) s += " of " + std::string(gguf_value_type_name(v.array->type()));
        return s;
    }
    std::optional<std::string> string(std::string_view key) const {
        const GgufKv * kv = find(key);
        if (!kv) return std::nullopt;
        if (kv->value.type != GgufValueType::String) fail(key, "expected a string, got " + type_name(kv->value));
        return std::string(kv->value.str);
    }
    std::optional<bool> boolean(std::string_view key) const {
        const GgufKv * kv = find(key);
        if (!kv) return std::nullopt;
        if (kv->value.type != GgufValueType::Bool) fail(key, "expected a bool, got " + type_name(kv->value));
        return kv->value.u != 0;
    }
    // A token id in [0, n_tokens), or nullopt when absent.
    std::optional<int32_t> id(std::string_view key, size_t n_tokens) const {
        const GgufKv * kv = find(key);
        if (!kv) return std::nullopt;
        if (!kv->value.is_integer()) fail(key, "expected a token id (integer), got " + type_name(kv->value));
        auto v = kv->value.as_int<int64_t>();
        if (!v || *v < 0 || uint64_t(*v) >= n_tokens)
            fail(key, "token id " + (v ? std::to_string(*v) : std::to_string(kv->value.u)) +
                          " is not in the vocabulary of " + std::to_string(n_tokens) + " tokens");
        return int32_t(*v);
    }
    // An array whose elements have one of the given types, or nullptr when absent.
    const GgufArray * array(std::string_view key, std::initializer_list<GgufValueType> types,
                            std::string_view expected) const {
        const GgufKv * kv = find(key);
        if (!kv) return nullptr;
        if (kv->value.type != GgufValueType::Array ||
            std::find(types.begin(), types.end(), kv->value.array->type()) == types.end())
            fail(key, "expected " + std::string(expected) + ", got " + type_name(kv->value));
        return kv->value.array;
    }

private:
    const GgufContents & g_;
    std::string source_;
};

} // namespace

const std::vector<std::string> & gguf_pre_tokenizer_names() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> out;
        for (const auto & t : pre_types())
            for (auto n : t.names) out.emplace_back(n);
        return out;
    }();
    return names;
}

Tokenizer load_tokenizer_gguf(const GgufContents & g, std::string_view source) {
    MetaReader r(g, source);
    const std::string model = r.string("tokenizer.ggml.model").value_or("");
    if (model.empty()) r.fail("tokenizer.ggml.model", "missing (the file has no tokenizer)");
    if (model != "gpt2" && model != "llama")
        r.fail("tokenizer.ggml.model", "unsupported tokenizer '" + model + "' (supported: gpt2, llama)");
    const bool spm = model == "llama";

    const GgufArray * tokens = r.array("tokenizer.ggml.tokens", {GgufValueType::String}, "an array of strings");
    if (!tokens) r.fail("tokenizer.ggml.tokens", "missing");
    const size_t n_tokens = tokens->size();
    if (n_tokens == 0) r.fail("tokenizer.ggml.tokens", "empty vocabulary");
    if (n_tokens > (1u << 21)) r.fail("tokenizer.ggml.tokens", std::to_string(n_tokens) + " tokens is too many");

    std::vector<int32_t> types(n_tokens, k_normal);
    if (const GgufArray * a = r.array("tokenizer.ggml.token_type", {GgufValueType::I32}, "an array of i32")) {
        if (a->size() != n_tokens)
            r.fail("tokenizer.ggml.token_type", std::to_string(a->size()) + " types for " + std::to_string(n_tokens) +
                                                    " tokens");
        for (size_t i = 0; i < n_tokens; ++i) {
            int64_t t = a->at(i).i;
            if (t < k_undefined || t > k_byte)
                r.fail("tokenizer.ggml.token_type",
                       "token " + std::to_string(i) + " has type " + std::to_string(t) + " (known: 0 to 6)");
            types[i] = int32_t(t);
        }
    }

    TokenizerSpec spec;
    spec.source = std::string(source);
    spec.keys.vocab = "tokenizer.ggml.tokens";
    spec.keys.merges = "tokenizer.ggml.merges";
    spec.keys.scores = "tokenizer.ggml.scores";
    spec.keys.unk = "tokenizer.ggml.unknown_token_id";
    spec.keys.added = "tokenizer.ggml.token_type";
    spec.keys.special = "tokenizer.ggml.bos_token_id";
    spec.vocab.reserve(n_tokens);
    for (size_t i = 0; i < n_tokens; ++i) {
        std::string text(tokens->string(i));
        if (types[i] == k_byte && (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>' ||
                                   !std::isxdigit(uint8_t(text[3])) || !std::isxdigit(uint8_t(text[4]))))
            r.fail("tokenizer.ggml.token_type", "token " + std::to_string(i) + " ('" + text +
                                                    "') has type byte but is not written <0xNN>");
        if (types[i] == k_unknown || types[i] == k_control || types[i] == k_user_defined) {
            AddedToken a;
            a.id = int32_t(i);
            a.content = text;
            a.special = types[i] != k_user_defined;
            a.normalized = false;
            spec.added_tokens.push_back(std::move(a));
        }
        spec.vocab.emplace_back(std::move(text), int32_t(i));
    }

    // llama.cpp's defaults, then what the file says
    int32_t bos = -1, eos = -1, unk = -1;
    bool add_bos = false;
    if (spm) {
        bos = 1, eos = 2, unk = 0, add_bos = true;
        for (int32_t * id : {&bos, &eos, &unk})
            if (size_t(*id) >= n_tokens) *id = -1;
    }
    bos = r.id("tokenizer.ggml.bos_token_id", n_tokens).value_or(bos);
    eos = r.id("tokenizer.ggml.eos_token_id", n_tokens).value_or(eos);
    unk = r.id("tokenizer.ggml.unknown_token_id", n_tokens).value_or(unk);
    spec.pad_id = r.id("tokenizer.ggml.padding_token_id", n_tokens).value_or(-1);
    spec.bos_id = bos;
    spec.eos_id = eos;
    if (unk >= 0) spec.unk_token = spec.vocab[size_t(unk)].first;

    if (spm) {
        if (const GgufArray * a = r.array("tokenizer.ggml.scores", {GgufValueType::F32, GgufValueType::I32},
                                          "an array of f32")) {
            if (a->size() != n_tokens)
                r.fail("tokenizer.ggml.scores", std::to_string(a->size()) + " scores for " + std::to_string(n_tokens) +
                                                    " tokens");
            spec.scores.resize(n_tokens);
            for (size_t i = 0; i < n_tokens; ++i) {
                GgufValue v = a->at(i);
                spec.scores[i] = v.type == GgufValueType::F32 ? float(v.f) : float(v.i);
            }
        } else {
            spec.scores.assign(n_tokens, 0.0f);   // llama.cpp: every score 0
        }
        if (r.boolean("tokenizer.ggml.remove_extra_whitespaces").value_or(false))
            r.fail("tokenizer.ggml.remove_extra_whitespaces", "true is not supported");
        const bool add_space_prefix = r.boolean("tokenizer.ggml.add_space_prefix").value_or(true);
        using Kind = TokenizerSpec::Normalizer::Kind;
        // A space in front of the text and after each special token, spaces as "▁".
        if (add_space_prefix) spec.normalizers.push_back({Kind::Prepend, "\u2581", ""});
        spec.normalizers.push_back({Kind::Replace, " ", "\u2581"});
        spec.decoder.byte_level = false;
        spec.decoder.replace.emplace_back("\u2581", " ");
        spec.decoder.byte_fallback = true;
        if (add_space_prefix) {
            spec.decoder.strip_content = " ";
            spec.decoder.n_strip_leading = 1;
        }
    } else {
        const std::string pre = r.string("tokenizer.ggml.pre").value_or("default");
        const PreType * type = nullptr;
        for (const auto & t : pre_types())
            if (std::find(t.names.begin(), t.names.end(), pre) != t.names.end()) type = &t;
        if (!type) {
            std::string known;
            for (const auto & n : gguf_pre_tokenizer_names()) known += (known.empty() ? "" : ", ") + n;
            r.fail("tokenizer.ggml.pre", "unknown pre-tokenizer '" + pre + "' (supported: " + known + ")");
        }
        if (type->nfc) spec.normalizers.push_back({TokenizerSpec::Normalizer::Kind::NFC, "", ""});
        for (size_t i = 0; i < type->splits.size(); ++i) {
            TokenizerSpec::PreTokenizer split;
            split.kind = TokenizerSpec::PreTokenizer::Kind::Split;
            split.key = "tokenizer.ggml.pre";
            split.pattern = std::string(type->splits[i]);
            spec.pre_tokenizers.push_back(std::move(split));
        }
        TokenizerSpec::PreTokenizer byte_level;
        byte_level.key = "tokenizer.ggml.pre";
        byte_level.use_regex = type->byte_level_regex;
        spec.pre_tokenizers.push_back(std::move(byte_level));
        spec.ignore_merges = type->ignore_merges;
        add_bos = type->add_bos;

        const GgufArray * merges = r.array("tokenizer.ggml.merges", {GgufValueType::String}, "an array of strings");
        if (!merges) r.fail("tokenizer.ggml.merges", "missing (a gpt2 tokenizer needs its merges)");
        spec.merges.reserve(merges->size());
        for (size_t i = 0; i < merges->size(); ++i) {
            std::string_view m = merges->string(i);
            size_t space = m.find(' ', 1);   // as llama.cpp: the left part may start with a space
            if (space == std::string_view::npos || space + 1 == m.size())
                r.fail("tokenizer.ggml.merges", "merge " + std::to_string(i) + " ('" + std::string(m.substr(0, 40)) +
                                                    "') is not \"<left> <right>\"");
            spec.merges.emplace_back(std::string(m.substr(0, space)), std::string(m.substr(space + 1)));
        }
    }

    add_bos = r.boolean("tokenizer.ggml.add_bos_token").value_or(add_bos);
    const bool add_eos = r.boolean("tokenizer.ggml.add_eos_token").value_or(false);
    if (add_bos && bos < 0) r.fail("tokenizer.ggml.add_bos_token", "true, but there is no tokenizer.ggml.bos_token_id");
    if (add_eos && eos < 0) r.fail("tokenizer.ggml.add_eos_token", "true, but there is no tokenizer.ggml.eos_token_id");
    if (add_bos) spec.single_template.push_back({false, "bos", {bos}});
    if (add_bos || add_eos) spec.single_template.push_back({true, "", {}});
    if (add_eos) spec.single_template.push_back({false, "eos", {eos}});
    return build_tokenizer(std::move(spec));
}

} // namespace moesh
