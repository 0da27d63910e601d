#include "runtime/quantize.h"

#include "experts/quant.h"
#include "runtime/error.h"
#include "runtime/gguf_model.h"
#include "runtime/gguf_writer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <thread>

namespace moesh {

namespace {

bool is_element_type(moesh_dtype t) { return t == MOESH_DTYPE_F32 || t == MOESH_DTYPE_F16 || t == MOESH_DTYPE_BF16; }

template <typename F> void parallel_rows(int64_t n_rows, int n_threads, F && f) {
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows / 16));
    if (n == 1) return f(int64_t(0), n_rows);
    std::vector<std::thread> ts;
    for (int64_t i = 0; i < n; ++i) ts.emplace_back([&, i] { f(n_rows * i / n, n_rows * (i + 1) / n); });
    for (auto & t : ts) t.join();
}

class Quantizer {
public:
    Quantizer(QuantizeReport & r, std::vector<std::unique_ptr<uint8_t[]>> & owned, int n_threads)
        : r_(r), owned_(owned), n_threads_(n_threads) {}

    void run(WeightMatrix & w, std::optional<moesh_dtype> target, const std::string & name) {
        if (!target || w.empty() || w.type == *target) return;
        if (!is_element_type(w.type)) {
            r_.kept.push_back(name + ": already " + dtype_name(w.type) + " (requantizing would add error)");
            return;
        }
        const QuantType qt = *quant_type_of(*target);
        const size_t row_bytes = dtype_row_bytes(*target, w.n_cols);
        if (row_bytes == 0) {
            r_.kept.push_back(name + ": rows of " + std::to_string(w.n_cols) + " are not whole " + dtype_name(*target) +
                              " blocks");
            return;
        }
        auto buf = std::make_unique<uint8_t[]>(row_bytes * size_t(w.n_rows));
        const size_t src_row = dtype_row_bytes(w.type, w.n_cols);
        const auto * src = static_cast<const uint8_t *>(w.data);
        uint8_t * dst = buf.get();
        parallel_rows(w.n_rows, n_threads_, [&](int64_t r0, int64_t r1) {
            std::vector<float> row(size_t(w.n_cols));
            for (int64_t r = r0; r < r1; ++r) {
                convert_to_f32(src + size_t(r) * src_row, w.type, row.data(), w.n_cols);
                quantize_row(qt, row.data(), dst + size_t(r) * row_bytes, w.n_cols);
            }
        });
        r_.bytes_before += w.n_bytes();
        w = WeightMatrix{buf.get(), *target, w.n_rows, w.n_cols};
        r_.bytes_after += w.n_bytes();
        ++r_.n_quantized;
        owned_.push_back(std::move(buf));
    }

private:
    QuantizeReport & r_;
    std::vector<std::unique_ptr<uint8_t[]>> & owned_;
    int n_threads_;
};

} // namespace

QuantizeReport quantize_model(Model & m, const QuantizePlan & plan, int n_threads) {
    if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
    QuantizeReport r;
    const auto t0 = std::chrono::steady_clock::now();
    Quantizer q(r, m.owned_, n_threads);
    const bool tied = m.output_.data == m.tok_embd_.data;
    q.run(m.tok_embd_, plan.embeddings, "token embeddings");
    if (tied) m.output_ = m.tok_embd_;
    else q.run(m.output_, plan.output, "output projection");
    const ModelConfig & c = m.config_;
    for (int64_t il = 0; il < c.n_layer; ++il) {
        LayerWeights & L = m.layers_[size_t(il)];
        const std::string p = "layer " + std::to_string(il) + " ";
        q.run(L.wq, plan.attention, p + "attention q");
        q.run(L.wk, plan.attention, p + "attention k");
        q.run(L.wv, plan.attention, p + "attention v");
        q.run(L.wo, plan.attention, p + "attention output");
        for (auto [w, what] : {std::pair{&L.dense, "dense FFN"}, std::pair{&L.shared, "shared expert"}}) {
            q.run(w->gate, plan.ffn, p + what + " gate");
            q.run(w->up, plan.ffn, p + what + " up");
            q.run(w->down, plan.ffn, p + what + " down");
        }
        if (!L.is_moe) continue;
        for (int32_t e = 0; e < c.n_expert; ++e) {
            ExpertWeights w = m.experts_.get({int32_t(il), e});
            const std::string ep = p + "expert " + std::to_string(e);
            q.run(w.gate, plan.experts, ep + " gate");
            q.run(w.up, plan.experts, ep + " up");
            q.run(w.down, plan.experts, ep + " down");
            m.experts_.set({int32_t(il), e}, w);
        }
    }
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

namespace {

// Carries a general.* / tokenizer.* value over from the source file.
void copy_kv(GgufWriter & w, const GgufKv & kv) {
    const GgufValue & v = kv.value;
    switch (v.type) {
    case GgufValueType::U8: w.add_u8(kv.key, uint8_t(v.u)); break;
    case GgufValueType::I8: w.add_i8(kv.key, int8_t(v.i)); break;
    case GgufValueType::U16: w.add_u16(kv.key, uint16_t(v.u)); break;
    case GgufValueType::I16: w.add_i16(kv.key, int16_t(v.i)); break;
    case GgufValueType::U32: w.add_u32(kv.key, uint32_t(v.u)); break;
    case GgufValueType::I32: w.add_i32(kv.key, int32_t(v.i)); break;
    case GgufValueType::U64: w.add_u64(kv.key, v.u); break;
    case GgufValueType::I64: w.add_i64(kv.key, v.i); break;
    case GgufValueType::F32: w.add_f32(kv.key, float(v.f)); break;
    case GgufValueType::F64: w.add_f64(kv.key, v.f); break;
    case GgufValueType::Bool: w.add_bool(kv.key, v.u != 0); break;
    case GgufValueType::String: w.add_string(kv.key, v.str); break;
    case GgufValueType::Array: {
        const GgufArray & a = *v.array;
        const size_t n = a.size();
        auto scalars = [&]<typename T>() {
            std::vector<T> out(n);
            if (n) std::memcpy(out.data(), a.raw(), n * sizeof(T));
            w.add_array<T>(kv.key, std::span<const T>(out));
        };
        switch (a.type()) {
        case GgufValueType::String: {
            std::vector<std::string_view> s(n);
            for (size_t i = 0; i < n; ++i) s[i] = a.string(i);
            w.add_string_array(kv.key, s);
            break;
        }
        case GgufValueType::U8: scalars.operator()<uint8_t>(); break;
        case GgufValueType::I8: scalars.operator()<int8_t>(); break;
        case GgufValueType::U16: scalars.operator()<uint16_t>(); break;
        case GgufValueType::I16: scalars.operator()<int16_t>(); break;
        case GgufValueType::U32: scalars.operator()<uint32_t>(); break;
        case GgufValueType::I32: scalars.operator()<int32_t>(); break;
        case GgufValueType::U64: scalars.operator()<uint64_t>(); break;
        case GgufValueType::I64: scalars.operator()<int64_t>(); break;
        case GgufValueType::F32: scalars.operator()<float>(); break;
        case GgufValueType::F64: scalars.operator()<double>(); break;
        case GgufValueType::Bool: {
            std::unique_ptr<bool[]> b(new bool[n ? n : 1]);
            for (size_t i = 0; i < n; ++i) b[i] = a.raw()[i] != 0;
            w.add_array<bool>(kv.key, std::span<const bool>(b.get(), n));
            break;
        }
        case GgufValueType::Array: break; // arrays of arrays: nothing llama.cpp reads; dropped
        }
        break;
    }
    }
}

} // namespace

void write_model_gguf(const Model & m, const std::string & path, const GgufContents * source) {
    const ModelConfig & c = m.config();
    const std::string a = gguf_arch_name(c.arch);
    const bool llama = a == "llama";
    if (c.rope.type == RopeType::Yarn)
        throw Error("cannot write " + c.source + " as GGUF: YaRN RoPE is not expressed the same way there yet");
    if (!llama && c.rope_adjacent_pairs)
        throw Error("cannot write " + c.source + " as GGUF " + a + ": its q/k rows are in adjacent-pair order");

    GgufWriter w;
    std::deque<std::vector<uint8_t>> keep; // bytes made here, alive (and unmoved) until the write
    w.add_string("general.architecture", a);
    if (source) {
        for (const GgufKv & kv : source->kvs()) {
            const std::string_view k = kv.key;
            const bool general = k.substr(0, 8) == "general." && k != "general.architecture" && k != "general.file_type" &&
                                 k != "general.alignment" && k != "general.quantization_version";
            if (general || k.substr(0, 10) == "tokenizer.") copy_kv(w, kv);
        }
    }
    const std::string p = a + ".";
    w.add_u32(p + "block_count", uint32_t(c.n_layer));
    w.add_u32(p + "context_length", uint32_t(c.max_positions));
    w.add_u32(p + "embedding_length", uint32_t(c.n_embd));
    w.add_u32(p + "attention.head_count", uint32_t(c.n_head));
    w.add_u32(p + "attention.head_count_kv", uint32_t(c.n_head_kv));
    w.add_u32(p + "attention.key_length", uint32_t(c.head_dim));
    w.add_u32(p + "attention.value_length", uint32_t(c.head_dim));
    w.add_u32(p + "rope.dimension_count", uint32_t(c.head_dim));
    w.add_f32(p + "rope.freq_base", float(c.rope.theta));
    w.add_f32(p + "attention.layer_norm_rms_epsilon", float(c.rms_eps));
    w.add_u32(p + "vocab_size", uint32_t(c.n_vocab));
    if (c.rope.type == RopeType::Linear) {
        w.add_string(p + "rope.scaling.type", "linear");
        w.add_f32(p + "rope.scaling.factor", float(c.rope.factor));
    }
    const bool dense_ffn = c.n_moe_layers() < c.n_layer;
    if (dense_ffn) w.add_u32(p + "feed_forward_length", uint32_t(c.n_ff));
    if (c.n_expert > 0) {
        w.add_u32(p + "expert_count", uint32_t(c.n_expert));
        w.add_u32(p + "expert_used_count", uint32_t(c.n_expert_used));
        if (c.arch == Arch::Mixtral && !dense_ffn) w.add_u32(p + "feed_forward_length", uint32_t(c.n_ff_expert));
        else w.add_u32(p + "expert_feed_forward_length", uint32_t(c.n_ff_expert));
        if (c.n_ff_shared > 0) w.add_u32(p + "expert_shared_feed_forward_length", uint32_t(c.n_ff_shared));
        w.add_bool(p + "expert_weights_norm", c.norm_topk_prob);
    }
    if (c.clip_qkv > 0) w.add_f32(p + "attention.clamp_kqv", float(c.clip_qkv));
    if (!source) {
        if (c.bos_token_id >= 0) w.add_u32("tokenizer.ggml.bos_token_id", uint32_t(c.bos_token_id));
        if (!c.eos_token_ids.empty()) w.add_u32("tokenizer.ggml.eos_token_id", uint32_t(c.eos_token_ids.front()));
    }
    const moesh_dtype main_type = c.n_expert > 0 ? m.experts().get({0, 0}).gate.type : m.layers()[0].wq.type;
    int32_t file_type = 0;
    switch (main_type) {
    case MOESH_DTYPE_F16: file_type = 1; break;
    case MOESH_DTYPE_Q4_0: file_type = 2; break;
    case MOESH_DTYPE_Q4_1: file_type = 3; break;
    case MOESH_DTYPE_Q8_0: file_type = 7; break;
    case MOESH_DTYPE_BF16: file_type = 32; break;
    default: break;
    }
    w.add_u32("general.file_type", uint32_t(file_type));
    w.add_u32("general.quantization_version", 2);

    auto matrix = [&](const std::string & name, const WeightMatrix & mat) {
        const auto t = dtype_to_gguf_type(mat.type);
        if (!t) throw Error("cannot write " + name + ": no GGUF type for " + dtype_name(mat.type));
        w.add_tensor_view(name, *t, {mat.n_cols, mat.n_rows},
                          std::span<const uint8_t>(static_cast<const uint8_t *>(mat.data), mat.n_bytes()));
    };
    auto vec = [&](const std::string & name, const std::vector<float> & v) {
        if (v.empty()) return;
        std::vector<uint8_t> b(v.size() * 4);
        std::memcpy(b.data(), v.data(), b.size());
        w.add_tensor(name, GgmlType::F32, {int64_t(v.size())}, std::move(b));
    };
    // llama.cpp's llama graph rotates adjacent pairs: within each head, row 2i + j
    // of the file is row j * d/2 + i of the rotate-half layout (rows are whole, so
    // quantized ones move as they are)
    const bool permute = llama && !c.rope_adjacent_pairs;
    const int64_t d = c.head_dim;
    auto source_row = [d](int64_t r) { return r / d * d + (r % d) % 2 * (d / 2) + (r % d) / 2; };
    auto permuted = [&](const std::string & name, const WeightMatrix & mat) {
        if (!permute) return matrix(name, mat);
        const size_t rb = dtype_row_bytes(mat.type, mat.n_cols);
        std::vector<uint8_t> & out = keep.emplace_back(rb * size_t(mat.n_rows));
        const auto * src = static_cast<const uint8_t *>(mat.data);
        for (int64_t r = 0; r < mat.n_rows; ++r) std::memcpy(&out[size_t(r) * rb], src + size_t(source_row(r)) * rb, rb);
        matrix(name, WeightMatrix{out.data(), mat.type, mat.n_rows, mat.n_cols});
    };
    auto permuted_vec = [&](const std::string & name, const std::vector<float> & v) {
        if (!permute || v.empty()) return vec(name, v);
        std::vector<float> o(v.size());
        for (size_t r = 0; r < v.size(); ++r) o[r] = v[size_t(source_row(int64_t(r)))];
        vec(name, o);
    };

    matrix("token_embd.weight", m.tok_embd());
    vec("output_norm.weight", m.output_norm());
    if (m.output().data != m.tok_embd().data) matrix("output.weight", m.output());
    if (c.rope.type == RopeType::Llama3 || !c.rope.freq_factors.empty()) {
        // per-frequency divisors, as llama.cpp's converter bakes llama-3 scaling
        ModelConfig plain = c;
        plain.rope.type = RopeType::Default;
        plain.rope.freq_factors.clear();
        const std::vector<float> base = compute_rope_tables(plain).inv_freq;
        std::vector<float> div(base.size());
        for (size_t i = 0; i < base.size(); ++i) div[i] = base[i] / m.rope().inv_freq[i];
        vec("rope_freqs.weight", div);
    }
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = m.layers()[size_t(il)];
        const std::string b = "blk." + std::to_string(il) + ".";
        vec(b + "attn_norm.weight", L.attn_norm);
        vec(b + "ffn_norm.weight", L.ffn_norm);
        permuted(b + "attn_q.weight", L.wq);
        permuted(b + "attn_k.weight", L.wk);
        matrix(b + "attn_v.weight", L.wv);
        matrix(b + "attn_output.weight", L.wo);
        permuted_vec(b + "attn_q.bias", L.bq);
        permuted_vec(b + "attn_k.bias", L.bk);
        vec(b + "attn_v.bias", L.bv);
        vec(b + "attn_output.bias", L.bo);
        vec(b + "attn_q_norm.weight", L.q_norm);
        vec(b + "attn_k_norm.weight", L.k_norm);
        if (!L.is_moe) {
            matrix(b + "ffn_gate.weight", L.dense.gate);
            matrix(b + "ffn_up.weight", L.dense.up);
            matrix(b + "ffn_down.weight", L.dense.down);
            continue;
        }
        matrix(b + "ffn_gate_inp.weight", L.router);
        for (const char * k : {"gate", "up", "down"}) {
            auto pick = [&](const ExpertWeights & e) -> const WeightMatrix & {
                return k[0] == 'g' ? e.gate : k[0] == 'u' ? e.up : e.down;
            };
            const WeightMatrix & e0 = pick(m.experts().get({int32_t(il), 0}));
            const size_t bytes = e0.n_bytes();
            std::vector<uint8_t> & out = keep.emplace_back(bytes * size_t(c.n_expert));
            for (int32_t e = 0; e < c.n_expert; ++e) {
                const WeightMatrix & we = pick(m.experts().get({int32_t(il), e}));
                if (we.type != e0.type || we.n_bytes() != bytes)
                    throw Error("cannot write layer " + std::to_string(il) + "'s experts as one GGUF tensor: expert " +
                                std::to_string(e) + " has another type or size than expert 0");
                std::memcpy(&out[size_t(e) * bytes], we.data, bytes);
            }
            w.add_tensor_view(b + "ffn_" + k + "_exps.weight", *dtype_to_gguf_type(e0.type), {e0.n_cols, e0.n_rows, c.n_expert},
                              std::span<const uint8_t>(out));
        }
        if (!L.shared.empty()) {
            matrix(b + "ffn_gate_shexp.weight", L.shared.gate);
            matrix(b + "ffn_up_shexp.weight", L.shared.up);
            matrix(b + "ffn_down_shexp.weight", L.shared.down);
            matrix(b + "ffn_gate_inp_shexp.weight", L.shared_gate);
        }
    }
    w.write_file(path);
}

} // namespace moesh
