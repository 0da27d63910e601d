#include "runtime/perplexity.h"

#include "runtime/error.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace moesh {

PerplexityResult perplexity(const Model & model, Backend & backend, const std::vector<int32_t> & tokens,
                            const PerplexityOptions & o) {
    const ModelConfig & c = model.config();
    const int64_t n_ctx = o.n_ctx;
    if (n_ctx < 4) throw Error("perplexity: the context must be at least 4 tokens, got " + std::to_string(n_ctx));
    if (n_ctx > c.max_positions)
        throw Error("perplexity: a context of " + std::to_string(n_ctx) + " exceeds the model's " +
                    std::to_string(c.max_positions) + " positions");
    if (int64_t(tokens.size()) < 2 * n_ctx)
        throw Error("perplexity: " + std::to_string(tokens.size()) + " tokens; at least " + std::to_string(2 * n_ctx) +
                    " (twice the context) are needed, as in llama.cpp: give a longer file or a smaller --ctx");
    if (o.add_bos && (o.bos_id < 0 || o.bos_id >= c.n_vocab))
        throw Error("perplexity: the tokenizer adds BOS but has no BOS id in the vocabulary");
    for (size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || tokens[i] >= c.n_vocab)
            throw Error("perplexity: token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                        " is outside the vocabulary [0, " + std::to_string(c.n_vocab) + ")");

    int64_t n_chunk = int64_t(tokens.size()) / n_ctx;
    if (o.n_chunks > 0) n_chunk = std::min(n_chunk, o.n_chunks);
    const int64_t n_batch = std::max<int64_t>(1, std::min(o.n_batch, n_ctx));
    const int64_t first = n_ctx / 2;

    KvCacheSpec ks;
    ks.n_layer = c.n_layer;
    ks.n_head_kv = c.n_head_kv;
    ks.head_dim = c.head_dim;
    ks.block_size = 16;
    ks.n_blocks = (n_ctx + ks.block_size - 1) / ks.block_size;
    ks.n_seq_max = 1;
    ks.type = o.kv_type;
    KvCache kv(ks, backend);
    ForwardPass fwd(model, backend, kv, n_batch, o.weights);
    fwd.set_placement(o.placement);

    PerplexityResult r;
    const size_t n_vocab = size_t(c.n_vocab);
    double nll = 0.0, nll2 = 0.0;
    int64_t count = 0;
    Batch batch;
    std::string err;
    if (o.trace) {
        fwd.set_route_observer([&](int64_t layer, int64_t n, const int32_t * ids, const float * w) { o.trace->route(layer, n, ids, w); });
        if (o.trace->n_predicted() > 0)
            fwd.set_predict_observer([&](int64_t layer, int64_t n, int64_t n_ranked, const int32_t * ids) {
                o.trace->predict(layer, n, n_ranked, ids);
            }, o.trace->n_predicted());
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t ch = 0; ch < n_chunk; ++ch) {
        kv.release(0);
        if (!kv.reserve(0, n_ctx)) throw Error("perplexity: cannot reserve the KV cache");
        const int32_t * chunk = tokens.data() + ch * n_ctx;
        for (int64_t b0 = 0; b0 < n_ctx; b0 += n_batch) {
            const int64_t b1 = std::min(n_ctx, b0 + n_batch);
            batch.clear();
            for (int64_t j = b0; j < b1; ++j) {
                const int32_t t = (j == 0 && o.add_bos) ? o.bos_id : chunk[j];
                batch.add(t, int32_t(j), 0, j >= first && j < n_ctx - 1);
            }
            if (o.trace) o.trace->begin(batch);
            const float * logits = fwd.run(batch, &err);
            if (!logits) throw Error("forward pass: " + err);
            if (o.trace) o.trace->end();
            r.n_evaluated += b1 - b0;
            for (int64_t j = std::max(b0, first); j < std::min(b1, n_ctx - 1); ++j) {
                const float * row = logits + size_t(j - std::max(b0, first)) * n_vocab;
                float mx = row[0];
                for (size_t v = 1; v < n_vocab; ++v) mx = std::max(mx, row[v]);
                double sum = 0.0;
                for (size_t v = 0; v < n_vocab; ++v) sum += std::exp(double(row[v] - mx));
                const double logp = double(row[chunk[j + 1]] - mx) - std::log(sum);
                nll -= logp;
                nll2 += logp * logp;
                ++count;
            }
        }
        r.running.push_back(std::exp(nll / double(count)));
        if (o.on_chunk) o.on_chunk(ch, r.running.back());
    }
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.n_chunks = n_chunk;
    r.n_scored = count;
    const double mean = nll / double(count);
    r.ppl = std::exp(mean);
    const double var = nll2 / double(count) - mean * mean;
    r.ppl_error = (var > 0 && count > 1) ? r.ppl * std::sqrt(var / double(count - 1)) : 0.0;
    return r;
}

} // namespace moesh
