#include "runtime/generate.h"

#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"

#include <algorithm>
#include <chrono>

namespace moesh {

GenerateResult generate(const Model & model, Backend & backend, const GenerateOptions & o) {
    const ModelConfig & c = model.config();
    if (o.prompt.empty()) throw Error("the prompt is empty: give at least one token id");
    if (o.n_generate < 1) throw Error("the number of tokens to generate must be at least 1");
    if (o.max_batch < 1) throw Error("max_batch must be at least 1");
    for (size_t i = 0; i < o.prompt.size(); ++i)
        if (o.prompt[i] < 0 || o.prompt[i] >= c.n_vocab)
            throw Error("prompt token " + std::to_string(o.prompt[i]) + " at index " + std::to_string(i) +
                        " is outside the vocabulary [0, " + std::to_string(c.n_vocab) + ")");
    if (std::string e = validate(o.sampling); !e.empty()) throw Error(e);
    const int64_t n_prompt = int64_t(o.prompt.size());
    const int64_t n_total = n_prompt + o.n_generate;
    if (n_total > c.max_positions)
        throw Error("prompt (" + std::to_string(n_prompt) + ") + tokens to generate (" + std::to_string(o.n_generate) +
                    ") exceed the model's max_position_embeddings (" + std::to_string(c.max_positions) + ")");

    KvCacheSpec ks;
    ks.n_layer = c.n_layer;
    ks.n_head_kv = c.n_head_kv;
    ks.head_dim = c.head_dim;
    ks.block_size = o.kv_block_size;
    ks.n_blocks = (n_total + ks.block_size - 1) / ks.block_size;
    ks.n_seq_max = 1;
    ks.type = o.kv_type;
    KvCache kv(ks, backend);
    if (!kv.reserve(0, n_total)) throw Error("KV cache: cannot reserve " + std::to_string(n_total) + " positions");

    const int64_t max_batch = std::min(o.max_batch, n_prompt);
    ForwardPass fwd(model, backend, kv, std::max<int64_t>(1, max_batch), o.weights);
    fwd.set_placement(o.placement);
    Sampler sampler(o.sampling, c.n_vocab, o.prompt);
    GenerateResult r;
    r.kv_bytes = ks.bytes();
    const size_t n_vocab = size_t(c.n_vocab);
    if (o.keep_logits) r.logits.reserve(size_t(n_total - 1) * n_vocab);

    using clock = std::chrono::steady_clock;
    Batch batch;
    std::string err;
    const float * last = nullptr;
    if (o.trace) {
        fwd.set_route_observer([&](int64_t layer, int64_t n, const int32_t * ids, const float * w) { o.trace->route(layer, n, ids, w); });
        if (o.trace->n_predicted() > 0)
            fwd.set_predict_observer([&](int64_t layer, int64_t n, int64_t n_ranked, const int32_t * ids) {
                o.trace->predict(layer, n, n_ranked, ids);
            }, o.trace->n_predicted());
    }
    auto run = [&](const Batch & b) {
        if (o.trace) o.trace->begin(b);
        const float * logits = fwd.run(b, &err);
        if (!logits) throw Error("forward pass: " + err);
        if (o.trace) o.trace->end();
        return logits;
    };
    auto t0 = clock::now();
    for (int64_t p0 = 0; p0 < n_prompt; p0 += max_batch) {
        const int64_t p1 = std::min(n_prompt, p0 + max_batch);
        batch.clear();
        for (int64_t p = p0; p < p1; ++p) batch.add(o.prompt[size_t(p)], int32_t(p), 0, o.keep_logits || p == n_prompt - 1);
        const float * logits = run(batch);
        const int64_t n_rows = batch.n_logits();
        if (o.keep_logits) r.logits.insert(r.logits.end(), logits, logits + size_t(n_rows) * n_vocab);
        if (p1 == n_prompt) last = logits + size_t(n_rows - 1) * n_vocab;
    }
    bool ended = false;   // the grammar allows nothing more
    auto next = [&](const float * logits) {
        const int32_t t = sampler.sample(logits, c.n_vocab, o.grammar.get());
        if (t < 0) {
            ended = true;
            return;
        }
        r.tokens.push_back(t);
        if (o.grammar) {
            o.grammar->accept(t);
            ended = o.grammar->must_end();
        }
        if (o.on_token) o.on_token(t);
    };
    next(last);
    auto t1 = clock::now();
    r.prompt_seconds = std::chrono::duration<double>(t1 - t0).count();

    for (int64_t step = 1; step < o.n_generate && !ended; ++step) {
        if (o.stop_at_eos && (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), r.tokens.back()) != c.eos_token_ids.end() ||
                              std::find(o.stop_ids.begin(), o.stop_ids.end(), r.tokens.back()) != o.stop_ids.end()))
            break;
        batch.clear();
        batch.add(r.tokens.back(), int32_t(n_prompt + step - 1), 0, true);
        const float * logits = run(batch);
        if (o.keep_logits) r.logits.insert(r.logits.end(), logits, logits + n_vocab);
        next(logits);
        ++r.n_decode_steps;
    }
    r.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
    r.n_logit_rows = int64_t(r.logits.size() / n_vocab);
    r.heat = fwd.heat();
    return r;
}

} // namespace moesh
