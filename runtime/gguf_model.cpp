#include "runtime/gguf_model.h"

#include "runtime/error.h"

#include <charconv>
#include <cstring>
#include <unordered_map>

namespace moesh {

namespace {

constexpr int64_t k_max_dim = int64_t(1) << 24;

struct ArchInfo {
    const char * gguf_name;
    Arch arch;
};
constexpr ArchInfo k_archs[] = {
    {"llama", Arch::Llama}, {"qwen2moe", Arch::Qwen2Moe}, {"qwen3moe", Arch::Qwen3Moe}, {"olmoe", Arch::Olmoe}};

std::string supported_gguf_archs() {
    std::string s;
    for (const auto & a : k_archs) s += std::string(s.empty() ? "" : ", ") + a.gguf_name;
    return s;
}

// Typed, range-checked reads of "<arch>.<key>" with messages naming the file and key.
class Keys {
public:
    Keys(const GgufContents & f, std::string arch) : f_(f), arch_(std::move(arch)) {}

    std::string key(std::string_view k) const { return arch_ + "." + std::string(k); }
    bool has(std::string_view k) const { return f_.find(key(k)) != nullptr; }

    [[noreturn]] void fail(std::string_view k, const std::string & what) const {
        throw Error(f_.source() + ": metadata key '" + key(k) + "': " + what);
    }

    int64_t integer(std::string_view k, int64_t lo, int64_t hi) const {
        const GgufKv * kv = f_.find(key(k));
        if (!kv) fail(k, "missing (an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] is required)");
        if (kv->value.type == GgufValueType::Array)
            fail(k, "per-layer arrays are not supported; expected one integer for all layers");
        const std::optional<int64_t> v = kv->value.as_int<int64_t>();
        if (!v) fail(k, "expected an integer, found " + std::string(gguf_value_type_name(kv->value.type)));
        if (*v < lo || *v > hi)
            fail(k, std::to_string(*v) + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        return *v;
    }
    int64_t integer_or(std::string_view k, int64_t lo, int64_t hi, int64_t dflt) const {
        return has(k) ? integer(k, lo, hi) : dflt;
    }

    double number_or(std::string_view k, double lo, double hi, double dflt) const {
        const GgufKv * kv = f_.find(key(k));
        if (!kv) return dflt;
        double v;
        if (kv->value.is_float()) v = kv->value.f;
        else if (auto i = kv->value.as_int<int64_t>()) v = double(*i);
        else fail(k, "expected a number, found " + std::string(gguf_value_type_name(kv->value.type)));
        if (!(v >= lo && v <= hi)) fail(k, std::to_string(v) + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        return v;
    }

    std::optional<bool> boolean(std::string_view k) const {
        if (!has(k)) return std::nullopt;
        return f_.get_bool(key(k));
    }
    std::optional<std::string_view> string(std::string_view k) const { return f_.find_string(key(k)); }

private:
    const GgufContents & f_;
    std::string arch_;
};

int64_t token_id_or(const GgufContents & f, std::string_view key, int64_t n_vocab) {
    const GgufKv * kv = f.find(key);
    if (!kv) return -1;
    const std::optional<int64_t> v = kv->value.as_int<int64_t>();
    if (!v || *v < 0 || *v >= n_vocab)
        throw Error(f.source() + ": metadata key '" + std::string(key) + "': expected a token id in [0, " +
                    std::to_string(n_vocab) + ")");
    return *v;
}

// GGUF layer tensor -> Hugging Face name under model.layers.N. (one-to-one ones)
constexpr std::pair<std::string_view, const char *> k_layer_names[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_output.bias", "self_attn.o_proj.bias"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
    {"ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"},
    {"ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"},
    {"ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"},
};

const char * hf_layer_name(std::string_view gguf_suffix) {
    for (const auto & [g, h] : k_layer_names)
        if (g == gguf_suffix) return h;
    return nullptr;
}

// "blk.12.attn_q.weight" -> (12, "attn_q.weight"); nullopt for other names.
std::optional<std::pair<int64_t, std::string_view>> split_block_name(std::string_view name) {
    if (name.substr(0, 4) != "blk.") return std::nullopt;
    const std::string_view rest = name.substr(4);
    const size_t dot = rest.find('.');
    if (dot == std::string_view::npos || dot == 0) return std::nullopt;
    int64_t layer = 0;
    auto [end, ec] = std::from_chars(rest.data(), rest.data() + dot, layer);
    if (ec != std::errc() || end != rest.data() + dot || layer < 0) return std::nullopt;
    return std::pair{layer, rest.substr(dot + 1)};
}

class GgufWeightSource final : public WeightSource {
public:
    GgufWeightSource(std::shared_ptr<const GgufContents> file, Arch arch) : file_(std::move(file)), arch_(arch) {
        for (const GgufTensor & t : file_->tensors()) add(t);
    }

    const SourceTensor * find(std::string_view name) const override {
        auto it = tensors_.find(std::string(name));
        return it == tensors_.end() ? nullptr : &it->second;
    }
    std::vector<std::string> names() const override {
        std::vector<std::string> out;
        out.reserve(tensors_.size());
        for (const auto & [n, t] : tensors_) out.push_back(n);
        return out;
    }
    std::string describe() const override { return file_->source(); }
    // The image starts data_offset + offset before any tensor's data; it spans at least to the last tensor's end.
    std::vector<MappedRegion> mapped_files() const override {
        const auto & ts = file_->tensors();
        if (ts.empty()) return {};
        const uint8_t * base = ts.front().data - file_->data_offset() - ts.front().offset;
        size_t end = 0;
        for (const GgufTensor & t : ts) end = std::max(end, size_t(t.data + t.n_bytes - base));
        return {{file_->source(), base, end}};
    }
    // Also for names the file lacks, so that "missing tensor" names what the file should hold.
    std::string file_name_of(std::string_view name) const override {
        auto it = tensors_.find(std::string(name));
        if (it != tensors_.end()) return it->second.file_name;
        if (name == "model.embed_tokens.weight") return "token_embd.weight";
        if (name == "model.norm.weight") return "output_norm.weight";
        if (name == "lm_head.weight") return "output.weight";
        const std::string_view pre = "model.layers.";
        if (name.substr(0, pre.size()) != pre) return std::string(name);
        const std::string_view rest = name.substr(pre.size());
        const size_t dot = rest.find('.');
        if (dot == std::string_view::npos) return std::string(name);
        const std::string blk = "blk." + std::string(rest.substr(0, dot)) + ".";
        std::string_view s = rest.substr(dot + 1);
        for (const auto & [g, h] : k_layer_names)
            if (s == h) return blk + std::string(g);
        for (std::string_view moe : {"mlp.", "block_sparse_moe."}) {
            if (s.substr(0, moe.size()) != moe) continue;
            s = s.substr(moe.size());
            if (s == "gate.weight") return blk + "ffn_gate_inp.weight";
            if (s == "shared_expert_gate.weight") return blk + "ffn_gate_inp_shexp.weight";
            if (s.substr(0, 8) == "experts.") {
                const std::string_view e = s.substr(8, s.find('.', 8) - 8);
                for (const char * k : {"gate", "up", "down"})
                    if (s.find(std::string(".") + expert_name(k) + ".") != std::string_view::npos)
                        return blk + "ffn_" + k + "_exps.weight (expert " + std::string(e) + ")";
            }
        }
        return std::string(name);
    }

private:
    void add(const GgufTensor & t) {
        const std::string gname(t.name);
        std::vector<int64_t> shape;
        for (uint32_t d = t.n_dims; d-- > 0;) shape.push_back(t.ne[d]);
        std::string name = gname;
        if (gname == "token_embd.weight") name = "model.embed_tokens.weight";
        else if (gname == "output_norm.weight") name = "model.norm.weight";
        else if (gname == "output.weight") name = "lm_head.weight";
        else if (auto blk = split_block_name(gname)) {
            const std::string p = "model.layers." + std::to_string(blk->first) + ".";
            const std::string moe = p + (arch_ == Arch::Mixtral ? "block_sparse_moe." : "mlp.");
            const std::string_view s = blk->second;
            if (const char * hf = hf_layer_name(s)) {
                name = p + hf;
            } else if (s == "ffn_gate_inp.weight") {
                name = moe + "gate.weight";
            } else if (s == "ffn_gate_inp_shexp.weight") {
                name = moe + "shared_expert_gate.weight";
                if (shape.size() == 1) shape.insert(shape.begin(), 1); // llama.cpp stores [n_embd]; HF [1, n_embd]
            } else if (const char * which = expert_kind(s)) {
                if (t.n_dims != 3) {
                    insert(gname, SourceTensor{gname, t.data, gguf_type_to_dtype(t.type), std::string(ggml_type_name(t.type)),
                                               shape, origin(gname), {}}, gname);
                    return; // Model reports it as unused; the experts it should hold are then missing, by name
                }
                for (int64_t e = 0; e < t.ne[2]; ++e) {
                    const GgufSlice v = t.expert_view(e);
                    const std::string en = moe + "experts." + std::to_string(e) + "." + expert_name(which) + ".weight";
                    const std::string fname = gname + " (expert " + std::to_string(e) + ")";
                    insert(en, SourceTensor{en, v.data, gguf_type_to_dtype(t.type), std::string(ggml_type_name(t.type)),
                                            {t.ne[1], t.ne[0]}, origin(fname), {}}, fname);
                }
                return;
            } else if (auto old = old_expert(s)) {
                // blk.N.ffn_gate.E.weight: one tensor per expert (early Mixtral GGUFs)
                name = moe + "experts." + std::to_string(old->second) + "." + expert_name(old->first) + ".weight";
            }
        }
        insert(name, SourceTensor{name, t.data, gguf_type_to_dtype(t.type), std::string(ggml_type_name(t.type)),
                                  std::move(shape), origin(gname), {}}, gname);
    }

    static const char * expert_kind(std::string_view s) {
        if (s == "ffn_gate_exps.weight") return "gate";
        if (s == "ffn_up_exps.weight") return "up";
        if (s == "ffn_down_exps.weight") return "down";
        return nullptr;
    }
    // "ffn_up.3.weight" -> ("up", 3)
    static std::optional<std::pair<const char *, int64_t>> old_expert(std::string_view s) {
        for (const char * k : {"gate", "up", "down"}) {
            const std::string pre = std::string("ffn_") + k + ".";
            if (s.substr(0, pre.size()) != pre || s.size() < pre.size() + 8) continue;
            const std::string_view num = s.substr(pre.size(), s.size() - pre.size() - 7);
            if (s.substr(s.size() - 7) != ".weight") continue;
            int64_t e = 0;
            auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), e);
            if (ec == std::errc() && end == num.data() + num.size() && e >= 0) return std::pair{k, e};
        }
        return std::nullopt;
    }
    std::string expert_name(const char * kind) const {
        const bool mixtral = arch_ == Arch::Mixtral;
        if (std::strcmp(kind, "gate") == 0) return mixtral ? "w1" : "gate_proj";
        if (std::strcmp(kind, "up") == 0) return mixtral ? "w3" : "up_proj";
        return mixtral ? "w2" : "down_proj";
    }
    std::string origin(const std::string & gguf_name) const {
        return file_->source() + " (GGUF tensor '" + gguf_name + "')";
    }
    void insert(const std::string & name, SourceTensor t, const std::string & file_name) {
        t.file_name = file_name;
        if (!tensors_.emplace(name, std::move(t)).second)
            throw Error(file_->source() + ": GGUF tensor '" + file_name + "' and another tensor both provide '" + name +
                        "'; the file holds the same weight twice");
    }

    std::shared_ptr<const GgufContents> file_;
    Arch arch_;
    std::unordered_map<std::string, SourceTensor> tensors_;
};

} // namespace

namespace {
constexpr std::pair<GgmlType, moesh_dtype> k_types[] = {
    {GgmlType::F32, MOESH_DTYPE_F32},   {GgmlType::F16, MOESH_DTYPE_F16},   {GgmlType::BF16, MOESH_DTYPE_BF16},
    {GgmlType::Q8_0, MOESH_DTYPE_Q8_0}, {GgmlType::Q4_0, MOESH_DTYPE_Q4_0}, {GgmlType::Q4_1, MOESH_DTYPE_Q4_1},
    {GgmlType::Q4_K, MOESH_DTYPE_Q4_K}, {GgmlType::Q5_K, MOESH_DTYPE_Q5_K}, {GgmlType::Q6_K, MOESH_DTYPE_Q6_K},
};
} // namespace

int gguf_type_to_dtype(GgmlType type) {
    for (const auto & [g, d] : k_types)
        if (g == type) return d;
    return -1;
}

std::optional<GgmlType> dtype_to_gguf_type(moesh_dtype type) {
    for (const auto & [g, d] : k_types)
        if (d == type) return g;
    return std::nullopt;
}

const char * gguf_arch_name(Arch arch) {
    if (arch == Arch::Mixtral) return "llama";
    for (const auto & a : k_archs)
        if (a.arch == arch) return a.gguf_name;
    return "?";
}

ModelConfig model_config_from_gguf(const GgufContents & f) {
    const GgufKv * arch_kv = f.find("general.architecture");
    if (!arch_kv || arch_kv->value.type != GgufValueType::String)
        throw Error(f.source() + ": metadata key 'general.architecture' is missing or not a string (supported: " +
                    supported_gguf_archs() + ")");
    const std::string arch(arch_kv->value.str);
    ModelConfig c;
    c.source = f.source();
    bool found = false;
    for (const auto & a : k_archs) {
        if (arch == a.gguf_name) {
            c.arch = a.arch;
            found = true;
        }
    }
    if (!found)
        throw Error(f.source() + ": unsupported GGUF architecture " + quote_untrusted(arch, true) + " (supported: " +
                    supported_gguf_archs() + ")");
    const Keys k(f, arch);

    const GgufTensor * embd = f.find_tensor("token_embd.weight");
    if (!embd || embd->n_dims != 2)
        throw Error(f.source() + ": missing 2-D tensor 'token_embd.weight' (token embeddings)");
    c.n_embd = k.integer("embedding_length", 1, k_max_dim);
    c.n_vocab = embd->ne[1];
    if (k.has("vocab_size") && k.integer("vocab_size", 1, k_max_dim) != c.n_vocab)
        k.fail("vocab_size", "disagrees with token_embd.weight's " + std::to_string(c.n_vocab) + " rows");
    c.n_layer = k.integer("block_count", 1, 4096);
    c.n_head = k.integer("attention.head_count", 1, 4096);
    c.n_head_kv = k.integer_or("attention.head_count_kv", 1, 4096, c.n_head);
    if (c.n_head % c.n_head_kv != 0)
        k.fail("attention.head_count_kv", "attention.head_count (" + std::to_string(c.n_head) + ") must be a multiple of it (" +
                                              std::to_string(c.n_head_kv) + ")");
    if (k.has("attention.key_length")) {
        c.head_dim = k.integer("attention.key_length", 2, 4096);
    } else {
        if (c.n_embd % c.n_head != 0)
            k.fail("attention.head_count", "embedding_length is not divisible by it and attention.key_length is absent");
        c.head_dim = c.n_embd / c.n_head;
    }
    if (k.integer_or("attention.value_length", 1, 4096, c.head_dim) != c.head_dim)
        k.fail("attention.value_length", "differs from the key length " + std::to_string(c.head_dim) + "; not supported");
    if (c.head_dim % 2 != 0) k.fail("attention.key_length", "head size must be even for RoPE");
    if (k.integer_or("rope.dimension_count", 1, 4096, c.head_dim) != c.head_dim)
        k.fail("rope.dimension_count", "partial rotary embeddings are not supported (must equal the head size " +
                                           std::to_string(c.head_dim) + ")");
    c.max_positions = k.integer_or("context_length", 1, k_max_dim * 64, 2048);
    c.rms_eps = k.number_or("attention.layer_norm_rms_epsilon", 0, 1, 1e-5);
    if (k.has("attention.sliding_window") && k.integer("attention.sliding_window", 0, INT64_MAX) > 0)
        k.fail("attention.sliding_window", "sliding-window attention is not supported yet");
    c.rope.theta = k.number_or("rope.freq_base", 1e-6, 1e30, 10000.0);
    const std::string scaling(k.string("rope.scaling.type").value_or("none"));
    if (scaling == "linear") {
        c.rope.type = RopeType::Linear;
        c.rope.factor = k.number_or("rope.scaling.factor", 1e-6, 1e6, 1.0);
    } else if (scaling != "none") {
        k.fail("rope.scaling.type", quote_untrusted(scaling, true) + " is not supported for GGUF files yet (supported: none, linear)");
    }
    if (const GgufTensor * ff = f.find_tensor("rope_freqs.weight")) {
        // llama-3 style scaling, baked by the converter into per-frequency divisors
        if (ff->type != GgmlType::F32 || ff->n_dims != 1 || ff->ne[0] != c.head_dim / 2)
            throw Error(f.source() + ": tensor 'rope_freqs.weight' must be F32 [" + std::to_string(c.head_dim / 2) +
                        "], found " + std::string(ggml_type_name(ff->type)) + " " + ff->shape_string());
        c.rope.freq_factors.resize(size_t(ff->ne[0]));
        std::memcpy(c.rope.freq_factors.data(), ff->data, size_t(ff->ne[0]) * 4);
        for (float v : c.rope.freq_factors)
            if (!(v > 0 && v < 1e30f)) throw Error(f.source() + ": tensor 'rope_freqs.weight' holds a non-positive factor");
    }
    c.tie_embeddings = f.find_tensor("output.weight") == nullptr;
    c.torch_dtype = "gguf";

    c.n_expert = k.integer_or("expert_count", 0, 4096, 0);
    if (c.n_expert > 0) {
        c.n_expert_used = k.integer("expert_used_count", 1, c.n_expert);
        c.n_ff_expert = k.has("expert_feed_forward_length") ? k.integer("expert_feed_forward_length", 1, k_max_dim)
                                                            : k.integer("feed_forward_length", 1, k_max_dim);
    } else if (c.arch != Arch::Llama) {
        k.fail("expert_count", "missing or 0; " + arch + " is a mixture-of-experts architecture");
    }
    c.layer_is_moe.assign(size_t(c.n_layer), c.n_expert > 0);
    for (int64_t il = 0; il < c.n_layer && c.n_expert > 0; ++il) {
        // Qwen2-MoE-style dense layers are not in the metadata: a layer without a router is dense
        const std::string p = "blk." + std::to_string(il) + ".";
        c.layer_is_moe[size_t(il)] = f.find_tensor(p + "ffn_gate_inp.weight") != nullptr;
    }
    if (c.n_expert == 0 || c.n_moe_layers() < c.n_layer) c.n_ff = k.integer("feed_forward_length", 1, k_max_dim);

    const GgufTensor * q0 = f.find_tensor("blk.0.attn_q.bias");
    switch (c.arch) {
    case Arch::Llama:
        if (c.n_expert > 0) c.arch = Arch::Mixtral;
        c.rope_adjacent_pairs = true;
        c.norm_topk_prob = true;
        c.q_bias = c.k_bias = c.v_bias = q0 != nullptr;
        c.o_bias = f.find_tensor("blk.0.attn_output.bias") != nullptr;
        break;
    case Arch::Qwen2Moe:
        c.q_bias = c.k_bias = c.v_bias = q0 != nullptr;
        c.n_ff_shared = f.find_tensor("blk.0.ffn_gate_shexp.weight")
                            ? k.integer("expert_shared_feed_forward_length", 1, k_max_dim)
                            : 0;
        break;
    case Arch::Qwen3Moe:
        c.qk_norm = QkNorm::PerHead;
        c.norm_topk_prob = true;
        break;
    case Arch::Olmoe:
        c.qk_norm = QkNorm::Full;
        c.clip_qkv = k.number_or("attention.clamp_kqv", 0, 1e30, 0.0);
        break;
    case Arch::Mixtral: break;
    }
    if (auto norm = k.boolean("expert_weights_norm")) c.norm_topk_prob = *norm;

    c.bos_token_id = token_id_or(f, "tokenizer.ggml.bos_token_id", c.n_vocab);
    if (int64_t eos = token_id_or(f, "tokenizer.ggml.eos_token_id", c.n_vocab); eos >= 0) c.eos_token_ids.push_back(eos);
    if (int64_t eot = token_id_or(f, "tokenizer.ggml.eot_token_id", c.n_vocab); eot >= 0 && (c.eos_token_ids.empty() || eot != c.eos_token_ids.front()))
        c.eos_token_ids.push_back(eot);
    return c;
}

std::unique_ptr<WeightSource> gguf_weight_source(std::shared_ptr<const GgufContents> file, Arch arch) {
    return std::make_unique<GgufWeightSource>(std::move(file), arch);
}

} // namespace moesh
