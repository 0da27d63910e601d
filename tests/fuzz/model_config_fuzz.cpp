// libFuzzer target for parse_model_config (config.json) and the RoPE tables
// computed from an accepted config: moesh::Error is the only way to refuse.
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/model_config.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "model_config", what); }

} // namespace

bool model_config_one_input(const uint8_t * data, size_t size) {
    ModelConfig cfg;
    try {
        cfg = parse_model_config(std::string_view(reinterpret_cast<const char *>(data), size), "fuzz/config.json");
    } catch (const Error &) {
        return false;
    }
    check(cfg.n_layer > 0 && cfg.n_embd > 0 && cfg.n_head > 0 && cfg.n_head_kv > 0 && cfg.head_dim > 0,
          "non-positive dimension accepted");
    check(static_cast<int64_t>(cfg.layer_is_moe.size()) == cfg.n_layer, "layer_is_moe is not [n_layer]");
    check(cfg.n_expert == 0 || (cfg.n_expert_used > 0 && cfg.n_expert_used <= cfg.n_expert),
          "n_expert_used outside [1, n_expert]");
    RopeTables rope;
    try {
        rope = compute_rope_tables(cfg);
    } catch (const Error &) {
        return false;
    }
    for (float f : rope.inv_freq) check(std::isfinite(f), "non-finite RoPE inverse frequency");
    check(std::isfinite(rope.attn_factor), "non-finite RoPE attention factor");
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::model_config_one_input(data, size);
    return 0;
}
#endif
