// Decode throughput at batch 1 on a synthetic MoE of realistic shape, as a
// fraction of the read bandwidth measured in the same run.
//
//   build/bin/moesh_bench_decode [--threads 1,2] [--tokens 32] [--dtype bf16] [--probe-gib 1]
//
// Prints one JSON object per line: {"bench": ..., "metric": ..., "value": ..., ...}.
// Shape (issue #2): hidden 2048, 8 layers, 8 experts top-2, expert ffn 5632,
// 16 heads, 8 kv heads, vocab 32000, bf16 weights.
#include "bandwidth_probe.h"
#include "plugins/loader/plugin_loader.h"
#include "runtime/forward.h"
#include "runtime/sampler.h"
#include "runtime/synthetic_model.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <unistd.h>

namespace {

std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
    return "unknown";
}

void emit(const std::string & bench, const std::string & metric, double value, nlohmann::json extra = {}) {
    nlohmann::json j = {{"bench", bench}, {"metric", metric}, {"value", value}};
    for (auto & [k, v] : extra.items()) j[k] = v;
    std::cout << j.dump() << std::endl;
}

} // namespace

int main(int argc, char ** argv) {
    std::vector<int> threads = {1, 2};
    int n_tokens = 32;
    double probe_gib = 1.0;
    std::string dtype = "bf16";
    std::string plugin_dir = MOESH_PLUGIN_BUILD_DIR;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "missing value after %s\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--threads") {
            threads.clear();
            std::stringstream ss(next());
            std::string t;
            while (std::getline(ss, t, ',')) threads.push_back(std::stoi(t));
        } else if (a == "--tokens") {
            n_tokens = std::stoi(next());
        } else if (a == "--dtype") {
            dtype = next();
        } else if (a == "--probe-gib") {
            probe_gib = std::stod(next());
        } else if (a == "--plugin-dir") {
            plugin_dir = next();
        } else {
            std::fprintf(stderr,
                         "usage: %s [--threads 1,2] [--tokens 32] [--dtype bf16|f16|f32] [--probe-gib 1] [--plugin-dir D]\n",
                         argv[0]);
            return a == "--help" ? 0 : 2;
        }
    }
    const moesh_dtype wtype = dtype == "f32" ? MOESH_DTYPE_F32 : dtype == "f16" ? MOESH_DTYPE_F16 : MOESH_DTYPE_BF16;

    nlohmann::json cfg_json = {{"architectures", {"MixtralForCausalLM"}},
                               {"vocab_size", 32000},
                               {"hidden_size", 2048},
                               {"intermediate_size", 5632},
                               {"num_hidden_layers", 8},
                               {"num_attention_heads", 16},
                               {"num_key_value_heads", 8},
                               {"num_local_experts", 8},
                               {"num_experts_per_tok", 2},
                               {"max_position_embeddings", 4096}};
    const moesh::ModelConfig cfg = moesh::parse_model_config(cfg_json.dump(), "synthetic");
    std::fprintf(stderr, "bench: building synthetic %s model ...\n", dtype.c_str());
    moesh::Model model = moesh::Model::load(cfg, moesh::make_synthetic_weights(cfg, wtype, 1));
    const double bytes_per_token = double(model.active_bytes_per_token());
    std::fprintf(stderr, "bench: %.2f GiB of weights, %.1f MiB read per decoded token\n",
                 double(model.weight_bytes()) / (1 << 30), bytes_per_token / (1 << 20));

    char date[32];
    std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
    const nlohmann::json machine = {{"cpu", cpu_model()}, {"cores", sysconf(_SC_NPROCESSORS_ONLN)}, {"date", date}};
    emit("decode", "bytes_per_token", bytes_per_token, {{"dtype", dtype}, {"machine", machine}});

    for (int nt : threads) {
        const double bw = moesh::bench::measure_read_bandwidth(size_t(probe_gib * double(1 << 30)), nt, 5);
        emit("bandwidth_probe", "read_bytes_per_second", bw, {{"threads", nt}, {"buffer_gib", probe_gib}});

        moesh::PluginOptions po;
        po.search_dirs = {plugin_dir};
        po.preferred = "cpu";
        po.n_threads = nt;
        std::string report;
        auto be = moesh::load_backend(po, &report);
        if (!be) {
            std::fprintf(stderr, "%s", report.c_str());
            return 1;
        }
        const int n_warm = 4;
        moesh::KvCache kv({cfg.n_layer, cfg.n_head_kv, cfg.head_dim, 16, (n_tokens + n_warm + 15) / 16 + 1, 1}, *be);
        kv.reserve(0, n_tokens + n_warm + 1);
        moesh::ForwardPass fwd(model, *be, kv, 1);
        moesh::Batch b;
        std::string err;
        int32_t tok = 1;
        auto step = [&](int pos) {
            b.clear();
            b.add(tok, pos, 0, true);
            const float * l = fwd.run(b, &err);
            if (!l) {
                std::fprintf(stderr, "forward failed: %s\n", err.c_str());
                std::exit(1);
            }
            tok = moesh::argmax(l, cfg.n_vocab);
        };
        for (int i = 0; i < n_warm; ++i) step(i);
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < n_tokens; ++i) step(n_warm + i);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double tps = n_tokens / s;
        const double achieved = bytes_per_token * tps;
        emit("decode", "tokens_per_second", tps, {{"threads", nt}, {"dtype", dtype}, {"tokens", n_tokens}});
        emit("decode", "weight_read_bytes_per_second", achieved, {{"threads", nt}, {"dtype", dtype}});
        emit("decode", "fraction_of_probe_bandwidth", achieved / bw,
             {{"threads", nt}, {"dtype", dtype}, {"probe_bytes_per_second", bw}});
    }
    return 0;
}
