// Prefill and decode speed of a model file (GGUF or Hugging Face folder), the
// way llama-bench reports them, next to the machine's read bandwidth.
//
//   moesh_bench_gguf --model moe-mid-q4_0.gguf --threads 1,2 --prompt 128 --gen 64
//   moesh_bench_gguf --probe-only --threads 2        # {"bench":"probe","gbps":...}
//
// One JSON line per thread count: prefill tokens/s (the whole --prompt in
// chunks of --batch), decode tokens/s (--gen tokens after that prompt, one per
// step), the bytes of weights one decode step reads, and the probe's GB/s
// measured just before and after, so decode can be stated as a fraction of
// the bandwidth roofline. Prompts are random token ids from a fixed seed.
#include "bandwidth_probe.h"
#include "plugins/loader/plugin_loader.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/backend_weights.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

double probe_gbps(double gib, int threads) {
    return moesh::bench::measure_read_bandwidth(size_t(gib * double(1ull << 30)), threads, 3) / 1e9;
}

struct Stat {
    double mean = 0, sd = 0;
};
Stat stat(const std::vector<double> & v) {
    Stat s;
    for (double x : v) s.mean += x;
    s.mean /= double(v.size());
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = v.size() > 1 ? std::sqrt(s.sd / double(v.size() - 1)) : 0.0;
    return s;
}

} // namespace

int main(int argc, char ** argv) {
    std::string model_path, plugin_dir = MOESH_PLUGIN_BUILD_DIR;
    std::vector<int> threads = {1, 2};
    int64_t n_prompt = 128, n_gen = 64, batch = 128;
    int reps = 3;
    double probe_gib = 1.0;
    bool probe_only = false;
    bool repack = true;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "missing value after %s\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--model") model_path = next();
        else if (a == "--threads") {
            threads.clear();
            std::stringstream ss(next());
            std::string t;
            while (std::getline(ss, t, ',')) threads.push_back(std::stoi(t));
        } else if (a == "--prompt") n_prompt = std::stoll(next());
        else if (a == "--gen") n_gen = std::stoll(next());
        else if (a == "--batch") batch = std::stoll(next());
        else if (a == "--reps") reps = std::stoi(next());
        else if (a == "--probe-gib") probe_gib = std::stod(next());
        else if (a == "--probe-only") probe_only = true;
        else if (a == "--no-repack") repack = false;
        else if (a == "--plugin-dir") plugin_dir = next();
        else {
            std::fprintf(stderr,
                         "usage: %s --model PATH [--threads 1,2] [--prompt 128] [--gen 64] [--batch 128] [--reps 3]\n"
                         "          [--probe-gib 1] [--plugin-dir D] [--no-repack]\n"
                         "       %s --probe-only [--threads 2] [--probe-gib 1]\n",
                         argv[0], argv[0]);
            return a == "--help" ? 0 : 2;
        }
    }
    if (probe_only) {
        for (int t : threads)
            std::cout << nlohmann::json{{"bench", "probe"}, {"threads", t}, {"gbps", probe_gbps(probe_gib, t)}}.dump()
                      << std::endl;
        return 0;
    }
    if (model_path.empty() || n_prompt < 1 || n_gen < 2 || reps < 1) {
        std::fprintf(stderr, "--model is required; --prompt >= 1, --gen >= 2, --reps >= 1\n");
        return 2;
    }
    try {
        const moesh::Model model = moesh::Model::load_path(model_path);
        const size_t bytes_per_token = model.active_bytes_per_token();
        std::mt19937 rng(1234);
        std::uniform_int_distribution<int32_t> tok(0, int32_t(model.config().n_vocab - 1));
        moesh::GenerateOptions o;
        for (int64_t i = 0; i < n_prompt; ++i) o.prompt.push_back(tok(rng));
        o.n_generate = n_gen + 1; // the first token comes with the prefill
        o.max_batch = batch;
        for (int t : threads) {
            moesh::PluginOptions po;
            po.search_dirs = {plugin_dir};
            po.n_threads = t;
            po.preferred = "cpu";
            std::string report;
            auto be = moesh::load_backend(po, &report);
            if (!be) {
                std::fprintf(stderr, "no backend:\n%s", report.c_str());
                return 1;
            }
            moesh::WeightOptions wo;
            wo.repack = repack;
            const moesh::BackendWeights weights(model, *be, wo);
            std::fprintf(stderr, "%s\n", weights.summary().c_str());
            o.weights = &weights;
            moesh::generate(model, *be, o); // warm-up: page in the weights
            const double bw_before = probe_gbps(probe_gib, t);
            std::vector<double> pp, tg;
            for (int r = 0; r < reps; ++r) {
                const moesh::GenerateResult g = moesh::generate(model, *be, o);
                pp.push_back(double(n_prompt) / g.prompt_seconds);
                tg.push_back(double(g.n_decode_steps) / g.decode_seconds);
            }
            const double bw_after = probe_gbps(probe_gib, t);
            const Stat p = stat(pp), d = stat(tg);
            const double bw = 0.5 * (bw_before + bw_after);
            nlohmann::json j = {{"bench", "moesh"},
                                {"model", model_path},
                                {"threads", t},
                                {"repack", weights.n_packed() > 0},
                                {"n_prompt", n_prompt},
                                {"n_gen", n_gen},
                                {"reps", reps},
                                {"prefill_tps", p.mean},
                                {"prefill_tps_sd", p.sd},
                                {"decode_tps", d.mean},
                                {"decode_tps_sd", d.sd},
                                {"bytes_per_token", bytes_per_token},
                                {"probe_gbps_before", bw_before},
                                {"probe_gbps_after", bw_after},
                                {"decode_roofline_fraction", d.mean * double(bytes_per_token) / (bw * 1e9)}};
            std::cout << j.dump() << std::endl;
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
