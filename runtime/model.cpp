#include "runtime/model.h"

#include "experts/quant.h"
#include "runtime/error.h"
#include "runtime/gguf_model.h"
#include "runtime/mapped_file.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

namespace moesh {

namespace {

std::string shape_str(const std::vector<int64_t> & shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

float bf16_bits_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Looks tensors up by name, checks dtype and shape, and records what was used.
class Binder {
public:
    Binder(const WeightSource & src, std::vector<std::string> & used) : src_(src), used_(used) {}

    const SourceTensor * find(const std::string & name) const { return src_.find(name); }

    const SourceTensor & require(const std::string & name, const std::vector<int64_t> & shape, const char * what) {
        const SourceTensor * t = src_.find(name);
        if (!t)
            throw Error(src_.describe() + ": missing tensor '" + src_.file_name_of(name) + "' (" + what +
                        ", expected shape " + shape_str(shape) + " in NumPy order)");
        if (t->dtype < 0)
            throw Error(t->origin + ": tensor '" + name + "' has dtype " + t->dtype_name +
                        "; moesh computes with F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K weights");
        if (t->shape != shape)
            throw Error(t->origin + ": tensor '" + name + "' has shape " + shape_str(t->shape) + ", expected " +
                        shape_str(shape) + " (" + what + ")");
        if (shape.size() == 2 && dtype_row_bytes(moesh_dtype(t->dtype), shape[1]) == 0)
            throw Error(t->origin + ": tensor '" + name + "' rows of " + std::to_string(shape[1]) + " elements are not whole " +
                        t->dtype_name + " blocks");
        used_.push_back(name);
        return *t;
    }

    WeightMatrix matrix(const std::string & name, int64_t n_rows, int64_t n_cols, const char * what) {
        const SourceTensor & t = require(name, {n_rows, n_cols}, what);
        return WeightMatrix{t.data, moesh_dtype(t.dtype), n_rows, n_cols};
    }

    std::vector<float> vector(const std::string & name, int64_t n, const char * what) {
        const SourceTensor & t = require(name, {n}, what);
        std::vector<float> v(static_cast<size_t>(n));
        convert_to_f32(t.data, moesh_dtype(t.dtype), v.data(), n);
        return v;
    }

    // A slice [row0, row0 + n_rows) of expert e of a fused [n_expert, rows, cols] tensor.
    WeightMatrix fused_slice(const std::string & name, int64_t n_expert, int64_t rows, int64_t cols, int64_t e,
                             int64_t row0, int64_t n_rows, const char * what) {
        const SourceTensor & t = require(name, {n_expert, rows, cols}, what);
        const size_t esz = dtype_size(moesh_dtype(t.dtype));
        const auto * base = static_cast<const uint8_t *>(t.data);
        const size_t off = (size_t(e) * size_t(rows) + size_t(row0)) * size_t(cols) * esz;
        return WeightMatrix{base + off, moesh_dtype(t.dtype), n_rows, cols};
    }

private:
    const WeightSource & src_;
    std::vector<std::string> & used_;
};

void check_same_type(const ExpertWeights & w, const std::string & where) {
    if (w.gate.type != w.up.type || w.gate.type != w.down.type)
        throw Error(where + ": gate/up/down weights have different dtypes (" + dtype_name(w.gate.type) + ", " +
                    dtype_name(w.up.type) + ", " + dtype_name(w.down.type) + "); moesh needs one dtype per expert");
}

} // namespace

std::optional<QuantType> quant_type_of(moesh_dtype type) {
    switch (type) {
    case MOESH_DTYPE_Q8_0: return QuantType::Q8_0;
    case MOESH_DTYPE_Q4_0: return QuantType::Q4_0;
    case MOESH_DTYPE_Q4_1: return QuantType::Q4_1;
    case MOESH_DTYPE_Q4_K: return QuantType::Q4_K;
    case MOESH_DTYPE_Q5_K: return QuantType::Q5_K;
    case MOESH_DTYPE_Q6_K: return QuantType::Q6_K;
    default: return std::nullopt;
    }
}

void convert_to_f32(const void * src, moesh_dtype type, float * dst, int64_t n) {
    switch (type) {
    case MOESH_DTYPE_F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case MOESH_DTYPE_F16: {
        const auto * h = static_cast<const uint16_t *>(src);
        for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(h[i]);
        break;
    }
    case MOESH_DTYPE_BF16: {
        const auto * h = static_cast<const uint16_t *>(src);
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(h[i]);
        break;
    }
    default: {
        const std::optional<QuantType> q = quant_type_of(type);
        if (!q || !dequantize_row(*q, src, dst, n))
            throw Error(std::string("convert_to_f32: cannot convert ") + dtype_name(type) + " x " + std::to_string(n));
    }
    }
}

Model Model::load_folder(const std::string & folder) {
    const std::string config_path = folder + "/config.json";
    ModelConfig cfg = parse_model_config(read_text_file(config_path, "the model config (does the folder hold config.json?)"), config_path);
    std::shared_ptr<WeightSource> src = open_safetensors_folder(folder);
    return load(std::move(cfg), std::move(src));
}

Model Model::load_path(const std::string & path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) return load_folder(path);
    if (!std::filesystem::exists(path, ec))
        throw Error(path + ": no such file or folder (expected a Hugging Face model folder or a .gguf file)");
    auto file = std::make_shared<const GgufFile>(path);
    ModelConfig cfg = model_config_from_gguf(*file);
    const Arch arch = cfg.arch;
    return load(std::move(cfg), gguf_weight_source(std::move(file), arch));
}

Model Model::load(ModelConfig cfg, std::shared_ptr<WeightSource> source) {
    Model m;
    m.config_ = std::move(cfg);
    m.source_ = std::move(source);
    const ModelConfig & c = m.config_;
    Binder b(*m.source_, m.used_);

    m.tok_embd_ = b.matrix("model.embed_tokens.weight", c.n_vocab, c.n_embd, "token embeddings");
    m.output_norm_ = b.vector("model.norm.weight", c.n_embd, "final norm");
    if (c.tie_embeddings) {
        m.output_ = m.tok_embd_;
    } else {
        m.output_ = b.matrix("lm_head.weight", c.n_vocab, c.n_embd, "output projection (tie_word_embeddings is false)");
    }
    m.rope_ = compute_rope_tables(c);
    if (!c.rope.freq_factors.empty() && b.find("rope_freqs.weight")) m.used_.push_back("rope_freqs.weight"); // read into the config
    m.experts_ = ExpertTable(c.n_layer, c.n_expert);

    const int64_t q_dim = c.n_head * c.head_dim;
    const int64_t kv_dim = c.n_head_kv * c.head_dim;
    m.layers_.resize(size_t(c.n_layer));
    for (int64_t il = 0; il < c.n_layer; ++il) {
        LayerWeights & L = m.layers_[size_t(il)];
        const std::string p = "model.layers." + std::to_string(il) + ".";
        L.attn_norm = b.vector(p + "input_layernorm.weight", c.n_embd, "attention norm");
        L.ffn_norm = b.vector(p + "post_attention_layernorm.weight", c.n_embd, "FFN norm");
        L.wq = b.matrix(p + "self_attn.q_proj.weight", q_dim, c.n_embd, "query projection");
        L.wk = b.matrix(p + "self_attn.k_proj.weight", kv_dim, c.n_embd, "key projection");
        L.wv = b.matrix(p + "self_attn.v_proj.weight", kv_dim, c.n_embd, "value projection");
        L.wo = b.matrix(p + "self_attn.o_proj.weight", c.n_embd, q_dim, "output projection");
        if (c.q_bias) L.bq = b.vector(p + "self_attn.q_proj.bias", q_dim, "query bias");
        if (c.k_bias) L.bk = b.vector(p + "self_attn.k_proj.bias", kv_dim, "key bias");
        if (c.v_bias) L.bv = b.vector(p + "self_attn.v_proj.bias", kv_dim, "value bias");
        if (c.o_bias) L.bo = b.vector(p + "self_attn.o_proj.bias", c.n_embd, "output bias");
        if (c.qk_norm == QkNorm::PerHead) {
            L.q_norm = b.vector(p + "self_attn.q_norm.weight", c.head_dim, "per-head query norm");
            L.k_norm = b.vector(p + "self_attn.k_norm.weight", c.head_dim, "per-head key norm");
        } else if (c.qk_norm == QkNorm::Full) {
            L.q_norm = b.vector(p + "self_attn.q_norm.weight", q_dim, "query norm");
            L.k_norm = b.vector(p + "self_attn.k_norm.weight", kv_dim, "key norm");
        }

        L.is_moe = c.layer_is_moe[size_t(il)];
        if (!L.is_moe) {
            L.dense.gate = b.matrix(p + "mlp.gate_proj.weight", c.n_ff, c.n_embd, "MLP gate");
            L.dense.up = b.matrix(p + "mlp.up_proj.weight", c.n_ff, c.n_embd, "MLP up");
            L.dense.down = b.matrix(p + "mlp.down_proj.weight", c.n_embd, c.n_ff, "MLP down");
            check_same_type(L.dense, m.source_->describe() + ": layer " + std::to_string(il) + " MLP");
            continue;
        }

        // Hub checkpoints: one tensor per expert (Mixtral under block_sparse_moe
        // with w1/w3/w2); transformers 5.x may write fused [n_expert, ...] tensors under mlp.experts.
        const int64_t ff = c.n_ff_expert;
        std::string moe = p + "mlp.";
        if (c.arch == Arch::Mixtral && (b.find(p + "block_sparse_moe.gate.weight") ||
                                        !b.find(p + "mlp.gate.weight")))
            moe = p + "block_sparse_moe.";
        L.router = b.matrix(moe + "gate.weight", c.n_expert, c.n_embd, "router");
        const std::string fused = moe + "experts.gate_up_proj";
        const bool is_fused = b.find(fused) != nullptr;
        for (int64_t e = 0; e < c.n_expert; ++e) {
            ExpertWeights w;
            if (is_fused) {
                w.gate = b.fused_slice(fused, c.n_expert, 2 * ff, c.n_embd, e, 0, ff, "fused expert gate/up");
                w.up = b.fused_slice(fused, c.n_expert, 2 * ff, c.n_embd, e, ff, ff, "fused expert gate/up");
                w.down = b.fused_slice(moe + "experts.down_proj", c.n_expert, c.n_embd, ff, e, 0, c.n_embd,
                                       "fused expert down");
            } else {
                const std::string ep = moe + "experts." + std::to_string(e) + ".";
                if (c.arch == Arch::Mixtral) {
                    w.gate = b.matrix(ep + "w1.weight", ff, c.n_embd, "expert gate (w1)");
                    w.up = b.matrix(ep + "w3.weight", ff, c.n_embd, "expert up (w3)");
                    w.down = b.matrix(ep + "w2.weight", c.n_embd, ff, "expert down (w2)");
                } else {
                    w.gate = b.matrix(ep + "gate_proj.weight", ff, c.n_embd, "expert gate");
                    w.up = b.matrix(ep + "up_proj.weight", ff, c.n_embd, "expert up");
                    w.down = b.matrix(ep + "down_proj.weight", c.n_embd, ff, "expert down");
                }
            }
            check_same_type(w, m.source_->describe() + ": layer " + std::to_string(il) + " expert " + std::to_string(e));
            m.experts_.set({int32_t(il), int32_t(e)}, w);
        }
        if (c.n_ff_shared > 0) {
            const std::string sp = moe + "shared_expert.";
            L.shared.gate = b.matrix(sp + "gate_proj.weight", c.n_ff_shared, c.n_embd, "shared expert gate");
            L.shared.up = b.matrix(sp + "up_proj.weight", c.n_ff_shared, c.n_embd, "shared expert up");
            L.shared.down = b.matrix(sp + "down_proj.weight", c.n_embd, c.n_ff_shared, "shared expert down");
            check_same_type(L.shared, m.source_->describe() + ": layer " + std::to_string(il) + " shared expert");
            L.shared_gate = b.matrix(moe + "shared_expert_gate.weight", 1, c.n_embd, "shared expert gate");
        }
    }
    std::sort(m.used_.begin(), m.used_.end());
    m.used_.erase(std::unique(m.used_.begin(), m.used_.end()), m.used_.end());
    return m;
}

size_t Model::weight_bytes() const {
    size_t s = tok_embd_.n_bytes() + (output_.data == tok_embd_.data ? 0 : output_.n_bytes());
    for (const auto & L : layers_) {
        s += L.wq.n_bytes() + L.wk.n_bytes() + L.wv.n_bytes() + L.wo.n_bytes();
        s += L.dense.n_bytes() + L.router.n_bytes() + L.shared.n_bytes() + L.shared_gate.n_bytes();
    }
    return s + experts_.total_bytes();
}

size_t Model::active_bytes_per_token() const {
    size_t s = output_.n_bytes() + tok_embd_.n_bytes() / size_t(std::max<int64_t>(1, config_.n_vocab));
    for (size_t il = 0; il < layers_.size(); ++il) {
        const auto & L = layers_[il];
        s += L.wq.n_bytes() + L.wk.n_bytes() + L.wv.n_bytes() + L.wo.n_bytes();
        s += L.dense.n_bytes() + L.router.n_bytes() + L.shared.n_bytes() + L.shared_gate.n_bytes();
        if (L.is_moe) s += size_t(config_.n_expert_used) * experts_.bytes_per_expert(int32_t(il));
    }
    return s;
}

std::vector<std::string> Model::unused_tensors() const {
    std::vector<std::string> out;
    for (const auto & n : source_->names())
        if (!std::binary_search(used_.begin(), used_.end(), n)) out.push_back(n);
    std::sort(out.begin(), out.end());
    return out;
}

} // namespace moesh
