// A batch of tokens for one forward step. Tokens may belong to several
// sequences; each carries its sequence id and position, so prefill and decode
// of many requests share one step (continuous batching).
//
//   Batch b; b.add(token, pos, seq, /*want_logits=*/true);
//
// Thread safety: plain data.
#pragma once

#include <cstdint>
#include <vector>

namespace moesh {

struct Batch {
    std::vector<int32_t> token;       // [n_tokens]
    std::vector<int32_t> pos;         // [n_tokens] position within its sequence
    std::vector<int32_t> seq;         // [n_tokens] sequence id (a KV cache slot)
    std::vector<uint8_t> want_logits; // [n_tokens]

    void add(int32_t t, int32_t p, int32_t s, bool logits) {
        token.push_back(t);
        pos.push_back(p);
        seq.push_back(s);
        want_logits.push_back(logits ? 1 : 0);
    }
    void clear() {
        token.clear();
        pos.clear();
        seq.clear();
        want_logits.clear();
    }
    int64_t size() const { return int64_t(token.size()); }
    int64_t n_logits() const {
        int64_t n = 0;
        for (uint8_t w : want_logits) n += w;
        return n;
    }
};

} // namespace moesh
