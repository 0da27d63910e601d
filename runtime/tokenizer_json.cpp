// Hugging Face tokenizer.json -> TokenizerSpec -> Tokenizer. Only what the
// byte-level BPE families (GPT-2, Llama-3, Qwen2, SmolLM) and the
// SentencePiece-style BPE ones (Llama-2, Mistral) use is accepted; anything
// else is refused by name so that a model never runs with silently different ids.
#include "runtime/error.h"
#include "runtime/mapped_file.h"
#include "runtime/tokenizer.h"

#include <nlohmann/json.hpp>


namespace moesh {

using json = nlohmann::json;

namespace {

class JsonReader {
public:
    explicit JsonReader(std::string source) : source_(std::move(source)) {}

    [[noreturn]] void fail(const std::string & key, const std::string & what) const {
        throw Error(source_ + ": key '" + key + "': " + what);
    }

    static std::string describe(const json & v) {
        std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
        if (s.size() > 40) s = s.substr(0, 37) + "...";
        return std::string(v.type_name()) + " " + s;
    }

    const json & object(const json & parent, const std::string & key, const std::string & path) const {
        auto it = parent.find(key);
        if (it == parent.end() || !it->is_object())
            fail(path, it == parent.end() ? "missing (an object is required)" : "expected an object, got " + describe(*it));
        return *it;
    }
    // nullptr when absent or null
    const json * optional(const json & parent, const std::string & key) const {
        auto it = parent.find(key);
        return it == parent.end() || it->is_null() ? nullptr : &*it;
    }
    bool boolean(const json & parent, const std::string & key, const std::string & path, bool fallback) const {
        const json * v = optional(parent, key);
        if (!v) return fallback;
        if (!v->is_boolean()) fail(path, "expected true or false, got " + describe(*v));
        return v->get<bool>();
    }
    std::string string(const json & parent, const std::string & key, const std::string & path,
                       const std::string & fallback) const {
        const json * v = optional(parent, key);
        if (!v) return fallback;
        if (!v->is_string()) fail(path, "expected a string, got " + describe(*v));
        return v->get<std::string>();
    }
    std::string type(const json & obj, const std::string & path) const {
        if (!obj.is_object()) fail(path, "expected an object, got " + describe(obj));
        const json * v = optional(obj, "type");
        if (!v) fail(path + ".type", "missing");
        if (!v->is_string()) fail(path + ".type", "expected a string, got " + describe(*v));
        return v->get<std::string>();
    }
    int32_t id(const json & v, const std::string & path) const {
        if (!v.is_number_integer()) fail(path, "expected a token id (integer), got " + describe(v));
        if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(INT32_MAX)
                                   : (v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX))
            fail(path, "token id " + v.dump() + " out of range [0, 2147483647]");
        return int32_t(v.get<int64_t>());
    }

    const std::string & source() const { return source_; }

private:
    std::string source_;
};

void parse_model(const JsonReader & r, const json & root, TokenizerSpec & spec) {
    const json & model = r.object(root, "model", "model");
    std::string type = model.contains("type") ? r.type(model, "model") : "BPE";
    if (type != "BPE") r.fail("model.type", "unsupported model '" + type + "' (supported: BPE)");

    const json & vocab = r.object(model, "vocab", "model.vocab");
    spec.vocab.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it)
        spec.vocab.emplace_back(it.key(), r.id(it.value(), "model.vocab." + it.key()));

    const json * merges = r.optional(model, "merges");
    if (merges && !merges->is_array()) r.fail("model.merges", "expected an array, got " + JsonReader::describe(*merges));
    if (merges) {
        spec.merges.reserve(merges->size());
        for (size_t i = 0; i < merges->size(); ++i) {
            const json & m = (*merges)[i];
            const std::string key = "model.merges[" + std::to_string(i) + "]";
            if (m.is_string()) {
                const std::string & s = m.get_ref<const std::string &>();
                size_t space = s.find(' ');
                if (space == std::string::npos || space == 0 || space + 1 == s.size() ||
                    s.find(' ', space + 1) != std::string::npos)
                    r.fail(key, "expected \"<left> <right>\", got " + JsonReader::describe(m));
                spec.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
            } else {
                r.fail(key, "expected \"<left> <right>\" or [left, right], got " + JsonReader::describe(m));
            }
        }
    }

    if (const json * d = r.optional(model, "dropout")) {
        if (!d->is_number()) r.fail("model.dropout", "expected null or a number, got " + JsonReader::describe(*d));
        if (d->get<double>() != 0.0) r.fail("model.dropout", "BPE dropout is not supported (only null or 0)");
    }
    spec.unk_token = r.string(model, "unk_token", "model.unk_token", "");
    if (!r.string(model, "continuing_subword_prefix", "model.continuing_subword_prefix", "").empty())
        r.fail("model.continuing_subword_prefix", "not supported (only null or \"\")");
    if (!r.string(model, "end_of_word_suffix", "model.end_of_word_suffix", "").empty())
        r.fail("model.end_of_word_suffix", "not supported (only null or \"\")");
    spec.fuse_unk = r.boolean(model, "fuse_unk", "model.fuse_unk", false);
    spec.byte_fallback = r.boolean(model, "byte_fallback", "model.byte_fallback", false);
    spec.ignore_merges = r.boolean(model, "ignore_merges", "model.ignore_merges", false);
}

// {"String": s} -> s; a Regex pattern is refused (no tokenizer we support uses one here).
std::string literal_pattern(const JsonReader & r, const json & parent, const std::string & path) {
    const json * pattern = r.optional(parent, "pattern");
    if (!pattern || !pattern->is_object() || !pattern->contains("String"))
        r.fail(path + ".pattern", "expected {\"String\": ...} (Regex patterns are not supported here)");
    std::string s = r.string(*pattern, "String", path + ".pattern.String", "");
    if (s.empty()) r.fail(path + ".pattern.String", "empty pattern");
    return s;
}

void parse_normalizer(const JsonReader & r, const json & n, const std::string & path, TokenizerSpec & spec) {
    using Kind = TokenizerSpec::Normalizer::Kind;
    std::string type = r.type(n, path);
    if (type == "NFC") spec.normalizers.push_back({Kind::NFC, "", ""});
    else if (type == "NFD") spec.normalizers.push_back({Kind::NFD, "", ""});
    else if (type == "NFKC") spec.normalizers.push_back({Kind::NFKC, "", ""});
    else if (type == "NFKD") spec.normalizers.push_back({Kind::NFKD, "", ""});
    else if (type == "Prepend") {
        const json * v = r.optional(n, "prepend");
        if (!v || !v->is_string()) r.fail(path + ".prepend", "expected a string");
        spec.normalizers.push_back({Kind::Prepend, v->get<std::string>(), ""});
    } else if (type == "Replace") {
        std::string from = literal_pattern(r, n, path);
        const json * v = r.optional(n, "content");
        if (!v || !v->is_string()) r.fail(path + ".content", "expected a string");
        spec.normalizers.push_back({Kind::Replace, from, v->get<std::string>()});
    } else if (type == "Sequence") {
        const json * list = r.optional(n, "normalizers");
        if (!list || !list->is_array()) r.fail(path + ".normalizers", "expected an array");
        for (size_t i = 0; i < list->size(); ++i)
            parse_normalizer(r, (*list)[i], path + ".normalizers[" + std::to_string(i) + "]", spec);
    } else {
        r.fail(path + ".type",
               "unsupported normalizer '" + type + "' (supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)");
    }
}

void parse_pre_tokenizer(const JsonReader & r, const json & p, const std::string & path, TokenizerSpec & spec) {
    using PreTokenizer = TokenizerSpec::PreTokenizer;
    std::string type = r.type(p, path);
    if (type == "Sequence") {
        const json * list = r.optional(p, "pretokenizers");
        if (!list || !list->is_array()) r.fail(path + ".pretokenizers", "expected an array");
        for (size_t i = 0; i < list->size(); ++i)
            parse_pre_tokenizer(r, (*list)[i], path + ".pretokenizers[" + std::to_string(i) + "]", spec);
        return;
    }
    PreTokenizer step;
    step.key = path;
    if (type == "ByteLevel") {
        step.kind = PreTokenizer::Kind::ByteLevel;
        step.add_prefix_space = r.boolean(p, "add_prefix_space", path + ".add_prefix_space", true);
        step.use_regex = r.boolean(p, "use_regex", path + ".use_regex", true);
        r.boolean(p, "trim_offsets", path + ".trim_offsets", true);   // offsets only
    } else if (type == "Digits") {
        // tokenizers splits at char::is_numeric, which is \p{N}
        step.kind = PreTokenizer::Kind::Split;
        step.pattern = r.boolean(p, "individual_digits", path + ".individual_digits", false) ? "\\p{N}" : "\\p{N}+";
    } else if (type == "Metaspace") {
        step.kind = PreTokenizer::Kind::Metaspace;
        step.replacement = r.string(p, "replacement", path + ".replacement", "\u2581");
        if (step.replacement.empty()) r.fail(path + ".replacement", "empty");
        step.split = r.boolean(p, "split", path + ".split", true);
        // older files say add_prefix_space instead of prepend_scheme
        bool add_prefix = r.boolean(p, "add_prefix_space", path + ".add_prefix_space", true);
        std::string scheme = r.string(p, "prepend_scheme", path + ".prepend_scheme", add_prefix ? "always" : "never");
        using Scheme = TokenizerSpec::PrependScheme;
        if (scheme == "always") step.prepend_scheme = Scheme::Always;
        else if (scheme == "first") step.prepend_scheme = Scheme::First;
        else if (scheme == "never") step.prepend_scheme = Scheme::Never;
        else r.fail(path + ".prepend_scheme", "unsupported '" + scheme + "' (supported: always, first, never)");
    } else if (type == "Split") {
        step.kind = PreTokenizer::Kind::Split;
        const json * pattern = r.optional(p, "pattern");
        if (!pattern || !pattern->is_object() || pattern->size() != 1)
            r.fail(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
        if (pattern->contains("Regex")) {
            step.pattern = r.string(*pattern, "Regex", path + ".pattern.Regex", "");
        } else if (pattern->contains("String")) {
            step.pattern = r.string(*pattern, "String", path + ".pattern.String", "");
            step.pattern_is_regex = false;
        } else {
            r.fail(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}, got " +
                                          JsonReader::describe(*pattern));
        }
        if (step.pattern.empty()) r.fail(path + ".pattern", "empty pattern");
        std::string behavior = r.string(p, "behavior", path + ".behavior", "");
        using B = TokenizerSpec::SplitBehavior;
        if (behavior == "Removed") step.behavior = B::Removed;
        else if (behavior == "Isolated") step.behavior = B::Isolated;
        else if (behavior == "MergedWithPrevious") step.behavior = B::MergedWithPrevious;
        else if (behavior == "MergedWithNext") step.behavior = B::MergedWithNext;
        else if (behavior == "Contiguous") step.behavior = B::Contiguous;
        else
            r.fail(path + ".behavior", "unsupported behavior '" + behavior +
                                           "' (supported: Removed, Isolated, MergedWithPrevious, MergedWithNext, "
                                           "Contiguous)");
        step.invert = r.boolean(p, "invert", path + ".invert", false);
    } else {
        r.fail(path + ".type",
               "unsupported pre-tokenizer '" + type + "' (supported: ByteLevel, Split, Digits, Metaspace, Sequence)");
    }
    spec.pre_tokenizers.push_back(std::move(step));
}

void parse_post_processor(const JsonReader & r, const json & p, const std::string & path, TokenizerSpec & spec) {
    std::string type = r.type(p, path);
    if (type == "ByteLevel") return;   // offsets only
    if (type == "Sequence") {
        const json * list = r.optional(p, "processors");
        if (!list || !list->is_array()) r.fail(path + ".processors", "expected an array");
        for (size_t i = 0; i < list->size(); ++i)
            parse_post_processor(r, (*list)[i], path + ".processors[" + std::to_string(i) + "]", spec);
        return;
    }
    if (type != "TemplateProcessing")
        r.fail(path + ".type", "unsupported post-processor '" + type +
                                   "' (supported: ByteLevel, TemplateProcessing, Sequence)");
    if (!spec.single_template.empty()) r.fail(path, "more than one TemplateProcessing");
    const json * single = r.optional(p, "single");
    if (!single || !single->is_array()) r.fail(path + ".single", "expected an array");
    const json * specials = r.optional(p, "special_tokens");
    if (specials && !specials->is_object()) r.fail(path + ".special_tokens", "expected an object");
    size_t n_sequence = 0;
    for (size_t i = 0; i < single->size(); ++i) {
        const json & item = (*single)[i];
        const std::string key = path + ".single[" + std::to_string(i) + "]";
        TokenizerSpec::TemplateItem out;
        if (item.is_object() && item.contains("Sequence")) {
            const json & seq = item["Sequence"];
            if (!seq.is_object() || r.string(seq, "id", key + ".Sequence.id", "") != "A")
                r.fail(key + ".Sequence.id", "a single-sequence template can only name sequence A");
            out.is_sequence = true;
            ++n_sequence;
        } else if (item.is_object() && item.contains("SpecialToken")) {
            const json & st = item["SpecialToken"];
            if (!st.is_object()) r.fail(key + ".SpecialToken", "expected an object");
            out.special = r.string(st, "id", key + ".SpecialToken.id", "");
            if (!specials || !specials->contains(out.special))
                r.fail(key + ".SpecialToken.id", "'" + out.special + "' is not in " + path + ".special_tokens");
            const json & def = (*specials)[out.special];
            const std::string dkey = path + ".special_tokens." + out.special;
            const json * ids = def.is_object() ? r.optional(def, "ids") : nullptr;
            if (!ids || !ids->is_array() || ids->empty()) r.fail(dkey + ".ids", "expected a non-empty array of ids");
            for (size_t k = 0; k < ids->size(); ++k)
                out.ids.push_back(r.id((*ids)[k], dkey + ".ids[" + std::to_string(k) + "]"));
        } else {
            r.fail(key, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}, got " + JsonReader::describe(item));
        }
        spec.single_template.push_back(std::move(out));
    }
    if (n_sequence != 1) r.fail(path + ".single", "must contain $A exactly once");
}

constexpr const char * k_decoders = "supported: ByteLevel, Metaspace, or a Sequence of Replace, ByteFallback, Fuse, Strip";

// Per-token steps (Replace, ByteFallback) must come before Fuse; Strip of
// leading characters may only follow Fuse, where it applies to the whole text.
void parse_decoder_step(const JsonReader & r, const json & d, const std::string & path, bool & fused,
                        TokenizerSpec::Decoder & out) {
    std::string type = r.type(d, path);
    if (!out.strip_content.empty()) r.fail(path, "only Strip may end the decoder sequence");
    if (type == "Replace") {
        if (fused) r.fail(path, "Replace after Fuse is not supported");
        std::string from = literal_pattern(r, d, path);
        const json * v = r.optional(d, "content");
        if (!v || !v->is_string()) r.fail(path + ".content", "expected a string");
        out.replace.emplace_back(from, v->get<std::string>());
    } else if (type == "ByteFallback") {
        if (fused) r.fail(path, "ByteFallback after Fuse is not supported");
        if (out.byte_fallback) r.fail(path, "ByteFallback twice");
        out.byte_fallback = true;
    } else if (type == "Fuse") {
        fused = true;
    } else if (type == "Strip") {
        const json * content = r.optional(d, "content");
        const json * start = r.optional(d, "start");
        const json * stop = r.optional(d, "stop");
        if (!content || !content->is_string() || content->get<std::string>().empty())
            r.fail(path + ".content", "expected a character");
        if (!start || !start->is_number_unsigned() || start->get<uint64_t>() > 16)
            r.fail(path + ".start", "expected a count of at most 16");
        if (stop && (!stop->is_number_integer() || stop->get<int64_t>() != 0))
            r.fail(path + ".stop", "only 0 is supported (no stripping at the end)");
        if (!fused) r.fail(path, "Strip before Fuse is not supported");
        out.strip_content = content->get<std::string>();
        out.n_strip_leading = uint32_t(start->get<uint64_t>());
        if (out.n_strip_leading == 0) out.strip_content.clear();
    } else {
        r.fail(path + ".type", "unsupported decoder '" + type + "' (" + k_decoders + ")");
    }
}

void parse_decoder(const JsonReader & r, const json & d, TokenizerSpec & spec) {
    std::string type = r.type(d, "decoder");
    TokenizerSpec::Decoder & out = spec.decoder;
    if (type == "ByteLevel") return;
    out.byte_level = false;
    if (type == "Metaspace") {
        // replacement -> ' ' on every token, then one leading space dropped unless prepend_scheme is never
        std::string replacement = r.string(d, "replacement", "decoder.replacement", "\u2581");
        if (replacement.empty()) r.fail("decoder.replacement", "empty");
        bool add_prefix = r.boolean(d, "add_prefix_space", "decoder.add_prefix_space", true);
        std::string scheme = r.string(d, "prepend_scheme", "decoder.prepend_scheme", add_prefix ? "always" : "never");
        if (scheme != "always" && scheme != "first" && scheme != "never")
            r.fail("decoder.prepend_scheme", "unsupported '" + scheme + "' (supported: always, first, never)");
        out.replace.emplace_back(replacement, " ");
        if (scheme != "never") {
            out.strip_content = " ";
            out.n_strip_leading = 1;
        }
        return;
    }
    if (type != "Sequence") r.fail("decoder.type", "unsupported decoder '" + type + "' (" + k_decoders + ")");
    const json * list = r.optional(d, "decoders");
    if (!list || !list->is_array()) r.fail("decoder.decoders", "expected an array");
    bool fused = false;
    for (size_t i = 0; i < list->size(); ++i)
        parse_decoder_step(r, (*list)[i], "decoder.decoders[" + std::to_string(i) + "]", fused, out);
}

void parse_added_tokens(const JsonReader & r, const json & list, TokenizerSpec & spec) {
    if (!list.is_array()) r.fail("added_tokens", "expected an array, got " + JsonReader::describe(list));
    for (size_t i = 0; i < list.size(); ++i) {
        const json & t = list[i];
        const std::string key = "added_tokens[" + std::to_string(i) + "]";
        if (!t.is_object()) r.fail(key, "expected an object, got " + JsonReader::describe(t));
        AddedToken a;
        if (!t.contains("id")) r.fail(key + ".id", "missing");
        a.id = r.id(t["id"], key + ".id");
        if (!t.contains("content") || !t["content"].is_string()) r.fail(key + ".content", "expected a string");
        a.content = t["content"].get<std::string>();
        a.special = r.boolean(t, "special", key + ".special", false);
        a.lstrip = r.boolean(t, "lstrip", key + ".lstrip", false);
        a.rstrip = r.boolean(t, "rstrip", key + ".rstrip", false);
        a.single_word = r.boolean(t, "single_word", key + ".single_word", false);
        a.normalized = r.boolean(t, "normalized", key + ".normalized", !a.special);
        spec.added_tokens.push_back(std::move(a));
    }
}

} // namespace

Tokenizer load_tokenizer_json(std::string_view json_text, std::string_view source_name) {
    JsonReader r{std::string(source_name)};
    json root;
    try {
        root = json::parse(json_text.begin(), json_text.end());
    } catch (const json::exception & e) {   // parse_error, or out_of_range for numbers too big
        throw Error(std::string(source_name) + ": not valid JSON: " + e.what());
    }
    if (!root.is_object()) throw Error(std::string(source_name) + ": expected a JSON object at the top level");

    TokenizerSpec spec;
    spec.source = std::string(source_name);
    parse_model(r, root, spec);
    if (const json * n = r.optional(root, "normalizer")) parse_normalizer(r, *n, "normalizer", spec);
    const json * dec = r.optional(root, "decoder");
    if (!dec) r.fail("decoder", std::string("missing (") + k_decoders + ")");
    parse_decoder(r, *dec, spec);
    const json * pre = r.optional(root, "pre_tokenizer");
    if (!pre && spec.decoder.byte_level)
        r.fail("pre_tokenizer", "missing (byte-level BPE needs ByteLevel, alone or last in a Sequence)");
    if (pre) parse_pre_tokenizer(r, *pre, "pre_tokenizer", spec);
    if (const json * p = r.optional(root, "post_processor")) parse_post_processor(r, *p, "post_processor", spec);
    if (const json * a = r.optional(root, "added_tokens")) parse_added_tokens(r, *a, spec);
    return build_tokenizer(std::move(spec));
}

Tokenizer load_tokenizer_json_file(const std::string & path) {
    return load_tokenizer_json(read_text_file(path, "the tokenizer"), path);
}

} // namespace moesh
