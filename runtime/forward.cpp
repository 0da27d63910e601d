#include "runtime/forward.h"

#include "runtime/error.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moesh {

ForwardPass::ForwardPass(const Model & model, Backend & backend, KvCache & kv, int64_t max_batch,
                         const PackedWeights * packed)
    : model_(model), be_(backend), packed_(packed), kv_(kv), max_batch_(max_batch),
      heat_(model.config().n_layer, std::max<int64_t>(1, model.config().n_expert)),
      dispatch_(std::max<int64_t>(1, model.config().n_expert), max_batch * std::max<int64_t>(1, model.config().n_expert_used)) {
    const ModelConfig & c = model.config();
    if (!be_.iface().host_memory)
        throw Error("backend '" + be_.name() +
                    "' computes in device memory; the forward pass runs on host-memory backends only for now");
    // Refuse up front, naming the weight, rather than fail mid-generation.
    auto need = [&](int32_t op, const WeightMatrix & w, const char * what) {
        if (!w.empty() && !be_.supports(op, w.type))
            throw Error("backend '" + be_.name() + "' cannot compute with " + dtype_name(w.type) + " weights (" + what +
                        "); convert the model to a format it supports or use another backend");
    };
    need(MOESH_OP_MATMUL, model.output(), "output projection");
    for (int64_t il = 0; il < c.n_layer; ++il) {
        const LayerWeights & L = model.layers()[size_t(il)];
        for (const WeightMatrix * w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.router, &L.shared_gate}) need(MOESH_OP_MATMUL, *w, "attention/router");
        for (const ExpertWeights * e : {&L.dense, &L.shared}) need(MOESH_OP_EXPERT_FFN, e->gate, "dense/shared FFN");
        for (int64_t e = 0; e < c.n_expert && L.is_moe; ++e)
            need(MOESH_OP_EXPERT_FFN, model.experts().get({int32_t(il), int32_t(e)}).gate, "routed expert");
    }
    const KvCacheSpec & ks = kv.spec();
    if (ks.n_layer != c.n_layer || ks.n_head_kv != c.n_head_kv || ks.head_dim != c.head_dim)
        throw Error("KV cache shape does not match the model");
    const size_t B = size_t(max_batch);
    const size_t q_dim = size_t(c.n_head * c.head_dim), kv_dim = size_t(c.n_head_kv * c.head_dim);
    int64_t max_ff = std::max({c.n_ff, c.n_ff_expert, c.n_ff_shared});
    x_.resize(B * size_t(c.n_embd));
    h_.resize(B * size_t(c.n_embd));
    q_.resize(B * q_dim);
    k_.resize(B * kv_dim);
    v_.resize(B * kv_dim);
    attn_.resize(B * q_dim);
    out_.resize(B * size_t(c.n_embd));
    router_.resize(B * size_t(std::max<int64_t>(1, c.n_expert)));
    ids_.resize(B * size_t(std::max<int64_t>(1, c.n_expert_used)));
    weights_.resize(ids_.size());
    xe_.resize(B * size_t(c.n_embd));
    oe_.resize(B * size_t(c.n_embd));
    scale_.resize(B);
    ffn_tmp_.resize(2 * B * size_t(max_ff));
    run_pos_.resize(B);
    logits_.resize(B * size_t(c.n_vocab));
    out_rows_.reserve(B);
}

void ForwardPass::matmul(const WeightMatrix & w, const std::vector<float> & bias, const float * x, float * y,
                         int64_t n) {
    moesh_matmul_args a{};
    a.struct_size = sizeof a;
    a.w = w.data;
    a.w_type = w.type;
    if (const void * p = packed_ ? packed_->find(w) : nullptr) {
        a.w = p;
        a.w_type = int32_t(w.type) | MOESH_DTYPE_PACKED;
    }
    a.bias = bias.empty() ? nullptr : bias.data();
    a.x = x;
    a.y = y;
    a.n_in = w.n_cols;
    a.n_out = w.n_rows;
    a.n_tokens = n;
    a.x_stride = w.n_cols;
    a.y_stride = w.n_rows;
    be_.check(be_.iface().matmul(be_.ctx(), &a), "matmul");
}

void ForwardPass::rms_norm(const float * x, const std::vector<float> & w, float * y, int64_t n_rows, int64_t n) {
    moesh_rms_norm_args a{};
    a.struct_size = sizeof a;
    a.x = x;
    a.weight = w.data();
    a.y = y;
    a.n = n;
    a.n_rows = n_rows;
    a.eps = float(model_.config().rms_eps);
    be_.check(be_.iface().rms_norm(be_.ctx(), &a), "rms_norm");
}

void ForwardPass::run_expert(const ExpertWeights & w, const float * x, const float * scale, float * out, int64_t n) {
    moesh_expert_ffn_args a{};
    a.struct_size = sizeof a;
    a.gate = w.gate.data;
    a.up = w.up.data;
    a.down = w.down.data;
    a.w_type = w.gate.type;
    if (const void * g = packed_ ? packed_->find(w.gate) : nullptr) {   // packed as a set (PackedWeights)
        a.gate = g;
        a.up = packed_->find(w.up);
        a.down = packed_->find(w.down);
        a.w_type = int32_t(w.gate.type) | MOESH_DTYPE_PACKED;
    }
    a.x = x;
    a.scale = scale;
    a.out = out;
    a.scratch = ffn_tmp_.data();
    a.n_embd = w.gate.n_cols;
    a.n_ff = w.gate.n_rows;
    a.n_tokens = n;
    be_.check(be_.iface().expert_ffn(be_.ctx(), &a), "expert_ffn");
}

void ForwardPass::attention(int64_t il, const Batch & batch, int64_t n) {
    const ModelConfig & c = model_.config();
    const LayerWeights & L = model_.layers()[size_t(il)];
    const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;

    rms_norm(x_.data(), L.attn_norm, h_.data(), n, c.n_embd);
    matmul(L.wq, L.bq, h_.data(), q_.data(), n);
    matmul(L.wk, L.bk, h_.data(), k_.data(), n);
    matmul(L.wv, L.bv, h_.data(), v_.data(), n);

    if (c.qk_norm == QkNorm::Full) {
        rms_norm(q_.data(), L.q_norm, q_.data(), n, q_dim);
        rms_norm(k_.data(), L.k_norm, k_.data(), n, kv_dim);
    } else if (c.qk_norm == QkNorm::PerHead) {
        rms_norm(q_.data(), L.q_norm, q_.data(), n * c.n_head, c.head_dim);
        rms_norm(k_.data(), L.k_norm, k_.data(), n * c.n_head_kv, c.head_dim);
    }
    if (c.clip_qkv > 0) {
        const float lim = float(c.clip_qkv);
        auto clip = [lim](std::vector<float> & v, size_t count) {
            for (size_t i = 0; i < count; ++i) v[i] = std::clamp(v[i], -lim, lim);
        };
        clip(q_, size_t(n * q_dim));
        clip(k_, size_t(n * kv_dim));
        clip(v_, size_t(n * kv_dim));
    }

    const RopeTables & rt = model_.rope();
    moesh_rope_args r{};
    r.struct_size = sizeof r;
    r.pos = batch.pos.data();
    r.inv_freq = rt.inv_freq.data();
    r.n_tokens = n;
    r.head_dim = c.head_dim;
    r.rot_dim = c.head_dim;
    r.attn_factor = rt.attn_factor;
    r.mode = c.rope_adjacent_pairs ? MOESH_ROPE_NORM : MOESH_ROPE_NEOX;
    r.x = q_.data();
    r.n_head = c.n_head;
    be_.check(be_.iface().rope(be_.ctx(), &r), "rope");
    r.x = k_.data();
    r.n_head = c.n_head_kv;
    be_.check(be_.iface().rope(be_.ctx(), &r), "rope");

    for (int64_t t = 0; t < n; ++t) {
        std::memcpy(kv_.k_row(il, batch.seq[size_t(t)], batch.pos[size_t(t)]), &k_[size_t(t * kv_dim)],
                    size_t(kv_dim) * sizeof(float));
        std::memcpy(kv_.v_row(il, batch.seq[size_t(t)], batch.pos[size_t(t)]), &v_[size_t(t * kv_dim)],
                    size_t(kv_dim) * sizeof(float));
    }

    // One attention call per run of consecutive tokens of the same sequence.
    for (int64_t t0 = 0; t0 < n;) {
        const int32_t seq = batch.seq[size_t(t0)];
        int64_t t1 = t0 + 1;
        int32_t max_pos = batch.pos[size_t(t0)];
        while (t1 < n && batch.seq[size_t(t1)] == seq) max_pos = std::max(max_pos, batch.pos[size_t(t1++)]);
        moesh_attention_args a{};
        a.struct_size = sizeof a;
        a.q = &q_[size_t(t0 * q_dim)];
        a.k_pool = kv_.k_pool(il);
        a.v_pool = kv_.v_pool(il);
        a.block_table = kv_.block_table(seq);
        a.pos = &batch.pos[size_t(t0)];
        a.out = &attn_[size_t(t0 * q_dim)];
        a.n_tokens = t1 - t0;
        a.n_head = c.n_head;
        a.n_head_kv = c.n_head_kv;
        a.head_dim = c.head_dim;
        a.block_size = kv_.spec().block_size;
        a.n_blocks = kv_.spec().n_blocks;
        a.n_kv = int64_t(max_pos) + 1;
        a.scale = 1.0f / std::sqrt(float(c.head_dim));
        be_.check(be_.iface().attention(be_.ctx(), &a), "attention");
        t0 = t1;
    }

    matmul(L.wo, L.bo, attn_.data(), out_.data(), n);
    for (size_t i = 0; i < size_t(n * c.n_embd); ++i) x_[i] += out_[i];
}

void ForwardPass::ffn(int64_t il, int64_t n) {
    const ModelConfig & c = model_.config();
    const LayerWeights & L = model_.layers()[size_t(il)];
    const size_t n_embd = size_t(c.n_embd);

    rms_norm(x_.data(), L.ffn_norm, h_.data(), n, c.n_embd);
    std::fill(out_.begin(), out_.begin() + long(size_t(n) * n_embd), 0.0f);

    if (!L.is_moe) {
        run_expert(L.dense, h_.data(), nullptr, out_.data(), n);
    } else {
        matmul(L.router, {}, h_.data(), router_.data(), n);
        RouterSpec spec{c.n_expert, c.n_expert_used, c.norm_topk_prob};
        route_softmax_topk(router_.data(), n, spec, ids_.data(), weights_.data());
        heat_.add(il, ids_.data(), n * c.n_expert_used);
        dispatch_.build(ids_.data(), weights_.data(), n, c.n_expert_used);

        for (int64_t e = 0; e < c.n_expert; ++e) {
            const int64_t n_e = dispatch_.n_tokens_for(e);
            if (n_e == 0) continue;
            const ExpertWeights & w = model_.experts().get({int32_t(il), int32_t(e)});
            const int32_t * tok = dispatch_.tokens_for(e);
            if (n == 1) { // decode: no gather/scatter
                run_expert(w, h_.data(), dispatch_.weights_for(e), out_.data(), 1);
                continue;
            }
            for (int64_t i = 0; i < n_e; ++i)
                std::memcpy(&xe_[size_t(i) * n_embd], &h_[size_t(tok[i]) * n_embd], n_embd * sizeof(float));
            std::fill(oe_.begin(), oe_.begin() + long(size_t(n_e) * n_embd), 0.0f);
            run_expert(w, xe_.data(), dispatch_.weights_for(e), oe_.data(), n_e);
            for (int64_t i = 0; i < n_e; ++i) {
                float * dst = &out_[size_t(tok[i]) * n_embd];
                const float * src = &oe_[size_t(i) * n_embd];
                for (size_t j = 0; j < n_embd; ++j) dst[j] += src[j];
            }
        }
        if (!L.shared.empty()) {
            matmul(L.shared_gate, {}, h_.data(), scale_.data(), n);
            shared_expert_gate(scale_.data(), n);
            run_expert(L.shared, h_.data(), scale_.data(), out_.data(), n);
        }
    }
    for (size_t i = 0; i < size_t(n) * n_embd; ++i) x_[i] += out_[i];
}

const float * ForwardPass::run(const Batch & batch, std::string * error) {
    const ModelConfig & c = model_.config();
    const int64_t n = batch.size();
    auto fail = [&](const std::string & msg) -> const float * {
        if (error) *error = msg;
        return nullptr;
    };
    if (n == 0) return fail("empty batch");
    if (n > max_batch_) return fail("batch of " + std::to_string(n) + " tokens exceeds max_batch " + std::to_string(max_batch_));
    if (batch.pos.size() != size_t(n) || batch.seq.size() != size_t(n) || batch.want_logits.size() != size_t(n))
        return fail("batch arrays have different lengths");
    for (int64_t t = 0; t < n; ++t) {
        const int32_t tok = batch.token[size_t(t)], pos = batch.pos[size_t(t)], seq = batch.seq[size_t(t)];
        if (tok < 0 || tok >= c.n_vocab)
            return fail("token " + std::to_string(tok) + " at batch row " + std::to_string(t) + " is outside the vocabulary [0, " +
                        std::to_string(c.n_vocab) + ")");
        if (seq < 0 || seq >= kv_.spec().n_seq_max)
            return fail("sequence id " + std::to_string(seq) + " outside [0, " + std::to_string(kv_.spec().n_seq_max) + ")");
        if (pos < 0 || pos >= kv_.capacity(seq))
            return fail("position " + std::to_string(pos) + " of sequence " + std::to_string(seq) +
                        " is beyond its reserved KV capacity (" + std::to_string(kv_.capacity(seq)) + ")");
    }

    const size_t n_embd = size_t(c.n_embd);
    for (int64_t t = 0; t < n; ++t) {
        const WeightMatrix & E = model_.tok_embd();
        const auto * row = static_cast<const uint8_t *>(E.data) + size_t(batch.token[size_t(t)]) * dtype_row_bytes(E.type, c.n_embd);
        convert_to_f32(row, E.type, &x_[size_t(t) * n_embd], c.n_embd);
    }
    for (int64_t il = 0; il < c.n_layer; ++il) {
        attention(il, batch, n);
        ffn(il, n);
    }

    out_rows_.clear();
    for (int64_t t = 0; t < n; ++t)
        if (batch.want_logits[size_t(t)]) out_rows_.push_back(t);
    const int64_t n_out = int64_t(out_rows_.size());
    if (n_out == 0) return logits_.data();
    for (int64_t i = 0; i < n_out; ++i)
        std::memcpy(&h_[size_t(i) * n_embd], &x_[size_t(out_rows_[size_t(i)]) * n_embd], n_embd * sizeof(float));
    rms_norm(h_.data(), model_.output_norm(), h_.data(), n_out, c.n_embd);
    matmul(model_.output(), {}, h_.data(), logits_.data(), n_out);
    return logits_.data();
}

} // namespace moesh
