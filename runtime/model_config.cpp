#include "runtime/model_config.h"

#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <sstream>

namespace moesh {

using json = nlohmann::json;

namespace {

struct ArchEntry {
    const char * name;
    Arch arch;
};
constexpr ArchEntry k_archs[] = {
    {"LlamaForCausalLM", Arch::Llama},
    {"MixtralForCausalLM", Arch::Mixtral},
    {"Qwen2MoeForCausalLM", Arch::Qwen2Moe},
    {"Qwen3MoeForCausalLM", Arch::Qwen3Moe},
    {"OlmoeForCausalLM", Arch::Olmoe},
};

// Reads typed keys of one JSON object and reports errors as "<source>: key 'k': ...".
class Reader {
public:
    Reader(const json & obj, std::string source, std::string prefix = "")
        : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

    [[noreturn]] void fail(std::string_view key, const std::string & what) const {
        throw Error(source_ + ": key '" + prefix_ + std::string(key) + "': " + what);
    }

    bool has(std::string_view key) const {
        auto it = obj_.find(key);
        return it != obj_.end() && !it->is_null();
    }

    int64_t integer(std::string_view key, int64_t min, int64_t max) const {
        if (!has(key)) fail(key, "missing (an integer is required)");
        return integer_or(key, min, max, 0);
    }
    int64_t integer_or(std::string_view key, int64_t min, int64_t max, int64_t fallback) const {
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return fallback;
        if (!it->is_number_integer() && !(it->is_number_float() && is_integral_float(it->get<double>())))
            fail(key, "expected an integer, got " + describe(*it));
        int64_t v = it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())
                        ? std::numeric_limits<int64_t>::max()
                        : (it->is_number_float() ? int64_t(it->get<double>()) : it->get<int64_t>());
        if (v < min || v > max)
            fail(key, "value " + std::to_string(v) + " out of range [" + std::to_string(min) + ", " +
                          std::to_string(max) + "]");
        return v;
    }
    double number_or(std::string_view key, double min, double max, double fallback) const {
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return fallback;
        if (!it->is_number()) fail(key, "expected a number, got " + describe(*it));
        double v = it->get<double>();
        if (!std::isfinite(v) || v < min || v > max) {
            std::ostringstream os;
            os << "value " << v << " out of range [" << min << ", " << max << "]";
            fail(key, os.str());
        }
        return v;
    }
    bool boolean_or(std::string_view key, bool fallback) const {
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return fallback;
        if (!it->is_boolean()) fail(key, "expected true or false, got " + describe(*it));
        return it->get<bool>();
    }
    std::string string_or(std::string_view key, std::string fallback) const {
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return fallback;
        if (!it->is_string()) fail(key, "expected a string, got " + describe(*it));
        return it->get<std::string>();
    }
    const json * object_or_null(std::string_view key) const {
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return nullptr;
        if (!it->is_object()) fail(key, "expected an object, got " + describe(*it));
        return &*it;
    }
    std::vector<int64_t> int_list_or_int(std::string_view key) const {
        std::vector<int64_t> out;
        auto it = obj_.find(key);
        if (it == obj_.end() || it->is_null()) return out;
        auto one = [&](const json & v) {
            if (!v.is_number_integer()) fail(key, "expected integers, got " + describe(v));
            out.push_back(v.get<int64_t>());
        };
        if (it->is_array()) {
            for (const auto & v : *it) one(v);
        } else {
            one(*it);
        }
        return out;
    }

    static std::string describe(const json & v) {
        std::string s = v.dump();
        if (s.size() > 40) s = s.substr(0, 37) + "...";
        return std::string(v.type_name()) + " " + s;
    }

private:
    static bool is_integral_float(double v) { return std::isfinite(v) && std::floor(v) == v && std::fabs(v) < 9e15; }

    const json & obj_;
    std::string source_;
    std::string prefix_;
};

constexpr int64_t k_max_dim = int64_t(1) << 24;   // generous, but keeps products in range
constexpr int64_t k_max_vocab = int64_t(1) << 24;

RopeConfig parse_rope(const Reader & top, const json & root, const std::string & source, Arch arch,
                      int64_t max_positions) {
    RopeConfig rope;
    const double default_theta = arch == Arch::Mixtral ? 1e6 : 1e4;
    rope.theta = top.number_or("rope_theta", 1e-3, 1e12, default_theta);

    // transformers 5.x writes `rope_parameters`; Hub configs carry `rope_scaling`.
    const json * params = top.object_or_null("rope_parameters");
    std::string key = "rope_parameters";
    if (!params) {
        params = top.object_or_null("rope_scaling");
        key = "rope_scaling";
    }
    if (!params) return rope;
    Reader r(*params, source, key + ".");
    rope.theta = r.number_or("rope_theta", 1e-3, 1e12, rope.theta);
    std::string type = r.string_or("rope_type", r.string_or("type", "default"));
    if (r.has("partial_rotary_factor") && r.number_or("partial_rotary_factor", 0, 1, 1.0) != 1.0)
        r.fail("partial_rotary_factor", "partial rotary embeddings are not supported (only 1.0)");
    const int64_t orig_default = max_positions;
    if (type == "default") {
        rope.type = RopeType::Default;
    } else if (type == "linear") {
        rope.type = RopeType::Linear;
        rope.factor = r.number_or("factor", 1e-6, 1e6, 0.0);
        if (rope.factor == 0.0) r.fail("factor", "missing (required for linear scaling)");
    } else if (type == "llama3") {
        rope.type = RopeType::Llama3;
        rope.factor = r.number_or("factor", 1e-6, 1e6, 0.0);
        if (rope.factor == 0.0) r.fail("factor", "missing (required for llama3 scaling)");
        rope.low_freq_factor = r.number_or("low_freq_factor", 1e-6, 1e6, 1.0);
        rope.high_freq_factor = r.number_or("high_freq_factor", 1e-6, 1e6, 4.0);
        if (rope.high_freq_factor <= rope.low_freq_factor)
            r.fail("high_freq_factor", "must be greater than low_freq_factor");
        rope.original_max_positions = r.integer_or("original_max_position_embeddings", 1, k_max_dim * 64, orig_default);
    } else if (type == "yarn") {
        rope.type = RopeType::Yarn;
        rope.original_max_positions = r.integer_or("original_max_position_embeddings", 1, k_max_dim * 64, orig_default);
        rope.factor = r.number_or("factor", 1e-6, 1e6, 0.0);
        if (rope.factor == 0.0) rope.factor = double(max_positions) / double(rope.original_max_positions);
        rope.attention_factor = r.number_or("attention_factor", 1e-6, 1e6, 0.0);
        rope.beta_fast = r.number_or("beta_fast", 1e-6, 1e6, 32.0);
        rope.beta_slow = r.number_or("beta_slow", 1e-6, 1e6, 1.0);
        rope.mscale = r.number_or("mscale", 0, 1e6, 0.0);
        rope.mscale_all_dim = r.number_or("mscale_all_dim", 0, 1e6, 0.0);
        rope.truncate = r.boolean_or("truncate", true);
    } else {
        r.fail(params->contains("rope_type") ? "rope_type" : "type",
               "unsupported RoPE scaling '" + type + "' (supported: default, linear, llama3, yarn)");
    }
    (void)root;
    return rope;
}

} // namespace

const char * arch_name(Arch arch) {
    for (const auto & e : k_archs)
        if (e.arch == arch) return e.name;
    return "?";
}

std::string supported_architectures() {
    std::string s;
    for (const auto & e : k_archs) {
        if (!s.empty()) s += ", ";
        s += e.name;
    }
    return s;
}

const char * rope_type_name(RopeType type) {
    switch (type) {
    case RopeType::Default: return "default";
    case RopeType::Linear: return "linear";
    case RopeType::Llama3: return "llama3";
    case RopeType::Yarn: return "yarn";
    }
    return "?";
}

int64_t ModelConfig::n_moe_layers() const {
    int64_t n = 0;
    for (bool b : layer_is_moe) n += b;
    return n;
}

ModelConfig parse_model_config(std::string_view json_text, std::string_view source_name) {
    const std::string source(source_name);
    // nlohmann stops at a NUL byte and would ignore whatever follows it
    if (const size_t nul = json_text.find('\0'); nul != std::string_view::npos)
        throw Error(source + ": not valid JSON: NUL byte at offset " + std::to_string(nul));
    json root;
    try {
        root = json::parse(json_text.begin(), json_text.end());
    } catch (const json::exception & e) { // parse_error, and out_of_range for numbers past double
        throw Error(source + ": not valid JSON: " + e.what());
    }
    if (!root.is_object()) throw Error(source + ": expected a JSON object at the top level");
    Reader r(root, source);

    ModelConfig c;
    c.source = source;

    // architecture
    auto arch_it = root.find("architectures");
    if (arch_it == root.end() || !arch_it->is_array() || arch_it->empty() || !(*arch_it)[0].is_string())
        throw Error(source + ": key 'architectures': expected a list with one architecture name (supported: " +
                    supported_architectures() + ")");
    const std::string arch = (*arch_it)[0].get<std::string>();
    bool found = false;
    for (const auto & e : k_archs) {
        if (arch == e.name) {
            c.arch = e.arch;
            found = true;
        }
    }
    if (!found)
        throw Error(source + ": unsupported architecture '" + arch + "' (supported: " + supported_architectures() + ")");

    const std::string act = r.string_or("hidden_act", "silu");
    if (act != "silu") r.fail("hidden_act", "unsupported activation '" + act + "' (supported: silu)");

    c.n_vocab = r.integer("vocab_size", 1, k_max_vocab);
    c.n_embd = r.integer("hidden_size", 1, k_max_dim);
    c.n_layer = r.integer("num_hidden_layers", 1, 4096);
    c.n_head = r.integer("num_attention_heads", 1, 4096);
    c.n_head_kv = r.integer_or("num_key_value_heads", 1, 4096, c.n_head);
    if (c.n_head % c.n_head_kv != 0)
        r.fail("num_key_value_heads", "num_attention_heads (" + std::to_string(c.n_head) +
                                          ") must be a multiple of it (" + std::to_string(c.n_head_kv) + ")");
    if (r.has("head_dim")) {
        c.head_dim = r.integer("head_dim", 2, 4096);
    } else {
        if (c.n_embd % c.n_head != 0)
            r.fail("num_attention_heads", "hidden_size is not divisible by it and no head_dim is given");
        c.head_dim = c.n_embd / c.n_head;
    }
    if (c.head_dim % 2 != 0) r.fail("head_dim", "must be even for RoPE, got " + std::to_string(c.head_dim));
    c.max_positions = r.integer_or("max_position_embeddings", 1, k_max_dim * 64, 2048);
    c.rms_eps = r.number_or("rms_norm_eps", 0, 1, c.arch == Arch::Mixtral || c.arch == Arch::Olmoe ? 1e-5 : 1e-6);
    c.tie_embeddings = r.boolean_or("tie_word_embeddings", false);
    c.torch_dtype = r.string_or("dtype", r.string_or("torch_dtype", ""));
    c.bos_token_id = r.integer_or("bos_token_id", -1, c.n_vocab - 1, -1);
    for (int64_t id : r.int_list_or_int("eos_token_id")) {
        if (id < 0 || id >= c.n_vocab)
            r.fail("eos_token_id", "token id " + std::to_string(id) + " outside the vocabulary");
        c.eos_token_ids.push_back(id);
    }
    c.rope = parse_rope(r, root, source, c.arch, c.max_positions);

    if (r.integer_or("pretraining_tp", 1, 1024, 1) != 1)
        r.fail("pretraining_tp", "only 1 is supported");

    auto refuse_sliding = [&](const char * flag) {
        if (r.boolean_or(flag, false))
            r.fail(flag, "sliding-window attention is not supported yet; set it to false");
    };

    const int64_t k_max_experts = 4096;
    // transformers aliases num_experts <-> num_local_experts per architecture
    // (attribute_map), and writes whichever its class declares; accept either.
    auto expert_count = [&]() {
        const bool a = r.has("num_experts"), b = r.has("num_local_experts");
        if (!a && !b) r.fail("num_experts", "missing (or num_local_experts; an integer is required)");
        const int64_t n = a ? r.integer("num_experts", 1, k_max_experts) : r.integer("num_local_experts", 1, k_max_experts);
        if (a && b && r.integer("num_local_experts", 1, k_max_experts) != n)
            r.fail("num_local_experts", "disagrees with num_experts (" + std::to_string(n) + ")");
        return n;
    };
    switch (c.arch) {
    case Arch::Llama: {
        c.n_ff = r.integer("intermediate_size", 1, k_max_dim);
        bool bias = r.boolean_or("attention_bias", false);
        c.q_bias = c.k_bias = c.v_bias = c.o_bias = bias;
        if (r.boolean_or("mlp_bias", false)) r.fail("mlp_bias", "MLP biases are not supported yet (must be false)");
        break;
    }
    case Arch::Mixtral: {
        c.n_ff_expert = r.integer("intermediate_size", 1, k_max_dim);
        c.n_expert = expert_count();
        c.n_expert_used = r.integer("num_experts_per_tok", 1, c.n_expert);
        c.norm_topk_prob = true;
        if (r.has("sliding_window"))
            r.fail("sliding_window", "sliding-window attention is not supported yet (must be null)");
        break;
    }
    case Arch::Qwen2Moe:
    case Arch::Qwen3Moe: {
        c.n_ff = r.integer_or("intermediate_size", 1, k_max_dim, 0);
        c.n_ff_expert = r.integer("moe_intermediate_size", 1, k_max_dim);
        c.n_expert = expert_count();
        c.n_expert_used = r.integer("num_experts_per_tok", 1, c.n_expert);
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        refuse_sliding("use_sliding_window");
        if (c.arch == Arch::Qwen2Moe) {
            bool qkv = r.boolean_or("qkv_bias", true);
            c.q_bias = c.k_bias = c.v_bias = qkv;
            c.n_ff_shared = r.integer_or("shared_expert_intermediate_size", 0, k_max_dim, 5632);
        } else {
            bool bias = r.boolean_or("attention_bias", false);
            c.q_bias = c.k_bias = c.v_bias = c.o_bias = bias;
            c.qk_norm = QkNorm::PerHead;
        }
        break;
    }
    case Arch::Olmoe: {
        c.n_ff_expert = r.integer("intermediate_size", 1, k_max_dim);
        c.n_expert = expert_count();
        c.n_expert_used = r.integer("num_experts_per_tok", 1, c.n_expert);
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        bool bias = r.boolean_or("attention_bias", false);
        c.q_bias = c.k_bias = c.v_bias = c.o_bias = bias;
        c.qk_norm = QkNorm::Full;
        c.clip_qkv = r.number_or("clip_qkv", 0, 1e30, 0.0);
        if (r.has("clip_qkv") && c.clip_qkv <= 0) r.fail("clip_qkv", "must be positive or null");
        break;
    }
    }

    c.layer_is_moe.assign(size_t(c.n_layer), c.n_expert > 0);
    if (c.arch == Arch::Qwen2Moe || c.arch == Arch::Qwen3Moe) {
        const int64_t step = r.integer_or("decoder_sparse_step", 1, 1 << 20, 1);
        std::vector<int64_t> dense_layers;
        if (root.contains("mlp_only_layers") && !root["mlp_only_layers"].is_null()) {
            if (!root["mlp_only_layers"].is_array()) r.fail("mlp_only_layers", "expected a list of layer indices");
            dense_layers = r.int_list_or_int("mlp_only_layers");
        }
        for (int64_t il = 0; il < c.n_layer; ++il) c.layer_is_moe[size_t(il)] = (il + 1) % step == 0;
        for (int64_t il : dense_layers) {
            if (il < 0 || il >= c.n_layer)
                r.fail("mlp_only_layers", "layer " + std::to_string(il) + " outside [0, " + std::to_string(c.n_layer) + ")");
            c.layer_is_moe[size_t(il)] = false;
        }
        if (c.n_moe_layers() < c.n_layer && c.n_ff <= 0)
            r.fail("intermediate_size", "missing; some layers are dense (mlp_only_layers/decoder_sparse_step) and need it");
    }
    return c;
}

RopeTables compute_rope_tables(const ModelConfig & cfg) {
    const RopeConfig & rope = cfg.rope;
    const int64_t dim = cfg.head_dim;
    const int64_t n = dim / 2;
    RopeTables t;
    t.inv_freq.resize(size_t(n));
    const float base = float(rope.theta);
    // Hugging Face: 1 / base ** (arange(0, dim, 2).float() / dim), in float32.
    std::vector<float> plain(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        float e = float(2 * i) / float(dim);
        plain[size_t(i)] = 1.0f / std::pow(base, e);
    }
    switch (rope.type) {
    case RopeType::Default: t.inv_freq = plain; break;
    case RopeType::Linear:
        for (int64_t i = 0; i < n; ++i) t.inv_freq[size_t(i)] = plain[size_t(i)] / float(rope.factor);
        break;
    case RopeType::Llama3: {
        const float factor = float(rope.factor);
        const float old_ctx = float(rope.original_max_positions);
        const float low_wavelen = old_ctx / float(rope.low_freq_factor);
        const float high_wavelen = old_ctx / float(rope.high_freq_factor);
        const float pi = 3.14159265358979323846f;
        for (int64_t i = 0; i < n; ++i) {
            const float f = plain[size_t(i)];
            const float wavelen = 2.0f * pi / f;
            float v = wavelen > low_wavelen ? f / factor : f;
            const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
            if (medium) {
                const float smooth = (old_ctx / wavelen - float(rope.low_freq_factor)) /
                                     float(rope.high_freq_factor - rope.low_freq_factor);
                v = (1.0f - smooth) * v / factor + smooth * v;
            }
            t.inv_freq[size_t(i)] = v;
        }
        break;
    }
    case RopeType::Yarn: {
        const double factor = rope.factor;
        auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
        double attn = rope.attention_factor;
        if (attn == 0.0) {
            attn = (rope.mscale != 0 && rope.mscale_all_dim != 0)
                       ? get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
                       : get_mscale(factor, 1.0);
        }
        t.attn_factor = float(attn);
        const double pi = 3.14159265358979323846;
        auto correction_dim = [&](double n_rot) {
            return (double(dim) * std::log(double(rope.original_max_positions) / (n_rot * 2 * pi))) /
                   (2 * std::log(rope.theta));
        };
        double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
        if (rope.truncate) {
            low = std::floor(low);
            high = std::ceil(high);
        }
        low = std::max(low, 0.0);
        high = std::min(high, double(dim - 1));
        if (low == high) high += 0.001;
        for (int64_t i = 0; i < n; ++i) {
            const float pos_freq = std::pow(base, float(2 * i) / float(dim));
            const float extrap = 1.0f / pos_freq;
            const float interp = 1.0f / (float(factor) * pos_freq);
            float ramp = (float(i) - float(low)) / (float(high) - float(low));
            ramp = std::min(1.0f, std::max(0.0f, ramp));
            const float extrap_factor = 1.0f - ramp;
            t.inv_freq[size_t(i)] = interp * (1.0f - extrap_factor) + extrap * extrap_factor;
        }
        break;
    }
    }
    if (!rope.freq_factors.empty())
        for (int64_t i = 0; i < n && size_t(i) < rope.freq_factors.size(); ++i) t.inv_freq[size_t(i)] /= rope.freq_factors[size_t(i)];
    return t;
}

} // namespace moesh
