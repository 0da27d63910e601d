#include "runtime/synthetic_model.h"

#include "runtime/error.h"

#include "experts/quant.h"

#include <cmath>
#include <cstring>
#include <random>

namespace moesh {

namespace {

uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1); // round to nearest even; inputs here are finite
    return uint16_t(u >> 16);
}

class Filler {
public:
    Filler(MemoryWeightSource & src, moesh_dtype dtype, uint64_t seed) : src_(src), dtype_(dtype), rng_(seed) {}

    void matrix(const std::string & name, std::vector<int64_t> shape) {
        const int64_t fan_in = shape.back();
        fill(name, shape, dtype_, 0.0f, 1.0f / std::sqrt(float(fan_in)));
    }
    void norm(const std::string & name, int64_t n) { fill(name, {n}, MOESH_DTYPE_F32, 1.0f, 0.1f); }
    void bias(const std::string & name, int64_t n) { fill(name, {n}, MOESH_DTYPE_F32, 0.0f, 0.1f); }

private:
    void fill(const std::string & name, const std::vector<int64_t> & shape, moesh_dtype type, float center, float a) {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        void * data = src_.add(name, type, shape);
        // a cheap generator: filling GBs with mt19937 + distributions is slow
        uint64_t s = rng_();
        auto next = [&s]() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            return float(s >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        };
        if (type == MOESH_DTYPE_F32) {
            auto * p = static_cast<float *>(data);
            for (int64_t i = 0; i < n; ++i) p[i] = center + a * next();
        } else {
            auto * p = static_cast<uint16_t *>(data);
            for (int64_t i = 0; i < n; ++i) {
                const float v = center + a * next();
                p[i] = type == MOESH_DTYPE_BF16 ? f32_to_bf16_bits(v) : f32_to_fp16(v);
            }
        }
    }

    MemoryWeightSource & src_;
    moesh_dtype dtype_;
    std::mt19937_64 rng_;
};

} // namespace

std::shared_ptr<MemoryWeightSource> make_synthetic_weights(const ModelConfig & c, moesh_dtype dtype, uint64_t seed) {
    if (dtype != MOESH_DTYPE_F32 && dtype != MOESH_DTYPE_BF16 && dtype != MOESH_DTYPE_F16)   // block types: quantize_model after
        throw Error("synthetic weights: dtype " + std::to_string(int(dtype)) + " is not f32, bf16 or f16 (block types come from quantizing those)");
    auto src = std::make_shared<MemoryWeightSource>("synthetic " + std::string(arch_name(c.arch)));
    Filler f(*src, dtype, seed);
    f.matrix("model.embed_tokens.weight", {c.n_vocab, c.n_embd});
    f.norm("model.norm.weight", c.n_embd);
    if (!c.tie_embeddings) f.matrix("lm_head.weight", {c.n_vocab, c.n_embd});
    const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const std::string p = "model.layers." + std::to_string(il) + ".";
        f.norm(p + "input_layernorm.weight", c.n_embd);
        f.norm(p + "post_attention_layernorm.weight", c.n_embd);
        f.matrix(p + "self_attn.q_proj.weight", {q_dim, c.n_embd});
        f.matrix(p + "self_attn.k_proj.weight", {kv_dim, c.n_embd});
        f.matrix(p + "self_attn.v_proj.weight", {kv_dim, c.n_embd});
        f.matrix(p + "self_attn.o_proj.weight", {c.n_embd, q_dim});
        if (c.q_bias) f.bias(p + "self_attn.q_proj.bias", q_dim);
        if (c.k_bias) f.bias(p + "self_attn.k_proj.bias", kv_dim);
        if (c.v_bias) f.bias(p + "self_attn.v_proj.bias", kv_dim);
        if (c.o_bias) f.bias(p + "self_attn.o_proj.bias", c.n_embd);
        if (c.qk_norm == QkNorm::PerHead) {
            f.norm(p + "self_attn.q_norm.weight", c.head_dim);
            f.norm(p + "self_attn.k_norm.weight", c.head_dim);
        } else if (c.qk_norm == QkNorm::Full) {
            f.norm(p + "self_attn.q_norm.weight", q_dim);
            f.norm(p + "self_attn.k_norm.weight", kv_dim);
        }
        if (!c.layer_is_moe[size_t(il)]) {
            f.matrix(p + "mlp.gate_proj.weight", {c.n_ff, c.n_embd});
            f.matrix(p + "mlp.up_proj.weight", {c.n_ff, c.n_embd});
            f.matrix(p + "mlp.down_proj.weight", {c.n_embd, c.n_ff});
            continue;
        }
        const std::string moe = p + (c.arch == Arch::Mixtral ? "block_sparse_moe." : "mlp.");
        f.matrix(moe + "gate.weight", {c.n_expert, c.n_embd});
        for (int64_t e = 0; e < c.n_expert; ++e) {
            const std::string ep = moe + "experts." + std::to_string(e) + ".";
            const bool mx = c.arch == Arch::Mixtral;
            f.matrix(ep + (mx ? "w1.weight" : "gate_proj.weight"), {c.n_ff_expert, c.n_embd});
            f.matrix(ep + (mx ? "w3.weight" : "up_proj.weight"), {c.n_ff_expert, c.n_embd});
            f.matrix(ep + (mx ? "w2.weight" : "down_proj.weight"), {c.n_embd, c.n_ff_expert});
        }
        if (c.n_ff_shared > 0) {
            f.matrix(moe + "shared_expert.gate_proj.weight", {c.n_ff_shared, c.n_embd});
            f.matrix(moe + "shared_expert.up_proj.weight", {c.n_ff_shared, c.n_embd});
            f.matrix(moe + "shared_expert.down_proj.weight", {c.n_embd, c.n_ff_shared});
            f.matrix(moe + "shared_expert_gate.weight", {1, c.n_embd});
        }
    }
    return src;
}

} // namespace moesh
