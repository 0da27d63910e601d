// Prefill and decode speed of a model file (GGUF or Hugging Face folder), the
// way llama-bench reports them, next to the machine's read bandwidth.
//
//   moesh_bench_gguf --model moe-mid-q4_0.gguf --threads 1,2 --prompt 128 --gen 64
//   moesh_bench_gguf --synthetic moe-mid --type q4_0 --backend cuda --roofline-gbps 3900
//   moesh_bench_gguf --probe-only --threads 2        # {"bench":"probe","gbps":...}
//
// One JSON line per thread count: prefill tokens/s (the whole --prompt in
// chunks of --batch), decode tokens/s (--gen tokens after that prompt, one per
// step), each the median over --reps (means and sd beside them), the bytes of weights one decode step reads, and the probe's GB/s
// measured just before and after, so decode can be stated as a fraction of
// the bandwidth roofline. Prompts are random token ids from a fixed seed.
//
// --synthetic SHAPE builds the model in memory instead of reading a file: the
// shapes of scripts/bench/make_moe_gguf.py (moe-small, moe-mid), random bf16
// weights (runtime/synthetic_model.h) quantized at load to --type (q8_0, q4_0,
// q4_1; bf16 keeps them), every matrix but the router, as that script's files
// are. The values differ from the script's; the bytes read per token do not.
// --backend NAME picks the plugin (default cpu). The probe reads host memory,
// so it is the roofline of the cpu backend only: --roofline-gbps GBPS gives
// the bandwidth to compare with instead (e.g. a GPU's, from moesh_bench_cuda),
// and without it a non-cpu backend gets no roofline fraction.
// --gpu-budgets 50,25 (a device backend): instead of every weight in device
// memory, a gpu tier holding that percentage of the routed experts' bytes
// (experts/device_experts.h); the experts it lacks are promoted or computed on
// the cpu plugin from the same --plugin-dir, as --costs says (auto: the cost
// model, uploads on the backend's copy queue and the next layer prefetched into
// VRAM; auto-sync: the same with blocking uploads and no prefetch; promote;
// in-place: the static rule, the first layers' experts pinned and every other
// one on the cpu). One line per budget x cost x thread count, with the tier's
// hits, promotions, in-place counts and prefetches.
// --sequences N: then a serving step as `moesh serve` runs it (runtime/scheduler.h):
// N requests of --prompt random tokens and --gen tokens each, prefilled, then decoded
// together, one token of every sequence per step. Its line gives the decode steps'
// tokens/s and that as a fraction of the prefill rate (what issue 7's "0.6 of the
// prefill rate" asks of aggregate decode), without sockets or clients.
#include "bandwidth_probe.h"
#include "plugins/loader/plugin_loader.h"
#include "runtime/generate.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/backend_weights.h"
#include "runtime/quantize.h"
#include "runtime/error.h"
#include "runtime/scheduler.h"
#include "runtime/expert_placement.h"
#include "runtime/synthetic_model.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

double probe_gbps(double gib, int threads) {
    return moesh::bench::measure_read_bandwidth(size_t(gib * double(1ull << 30)), threads, 3) / 1e9;
}

// median: the figure reported, as compare_llamacpp.py reports llama-bench's (robust
// to a repetition preempted on a shared machine); mean and sd beside it.
struct Stat {
    double median = 0, mean = 0, sd = 0;
};
Stat stat(std::vector<double> v) {
    Stat s;
    std::sort(v.begin(), v.end());
    s.median = v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
    for (double x : v) s.mean += x;
    s.mean /= double(v.size());
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = v.size() > 1 ? std::sqrt(s.sd / double(v.size() - 1)) : 0.0;
    return s;
}

// The shapes of scripts/bench/make_moe_gguf.py (Mixtral layout, untied output).
std::optional<moesh::ModelConfig> synthetic_config(const std::string & shape) {
    int64_t n_embd, n_layer, n_ff, n_head, n_head_kv;
    if (shape == "moe-small") {
        n_embd = 512, n_layer = 4, n_ff = 1408, n_head = 8, n_head_kv = 4;
    } else if (shape == "moe-mid") {
        n_embd = 2048, n_layer = 8, n_ff = 5632, n_head = 16, n_head_kv = 8;
    } else {
        return std::nullopt;
    }
    const nlohmann::json j = {{"architectures", {"MixtralForCausalLM"}},
                              {"vocab_size", 32000},
                              {"hidden_size", n_embd},
                              {"intermediate_size", n_ff},
                              {"num_hidden_layers", n_layer},
                              {"num_attention_heads", n_head},
                              {"num_key_value_heads", n_head_kv},
                              {"num_local_experts", 8},
                              {"num_experts_per_tok", 2},
                              {"max_position_embeddings", 4096},
                              {"rope_theta", 1e6},
                              {"rms_norm_eps", 1e-5},
                              {"tie_word_embeddings", false}};
    return moesh::parse_model_config(j.dump(), "synthetic " + shape);
}

// Tokens/s of the decode steps of n_seq requests served together (see --sequences), over
// reps rounds. Steps that still prefill a prompt are left out.
Stat batched_decode(const moesh::Model & model, moesh::Backend & be, const moesh::BackendWeights & weights, int64_t n_prompt,
                    int64_t n_gen, int64_t n_seq, int64_t batch, int32_t kv_type, int reps, std::mt19937 & rng) {
    moesh::SchedulerOptions so;
    so.max_batch = std::max(batch, n_seq);
    so.max_sequences = n_seq;
    so.kv_type = kv_type;
    so.kv_blocks = n_seq * ((n_prompt + n_gen + so.kv_block_size - 1) / so.kv_block_size);
    so.prefill_chunk = n_prompt;
    so.max_queue = n_seq;
    moesh::Scheduler sched(model, be, so, &weights);
    std::uniform_int_distribution<int32_t> tok(0, int32_t(model.config().n_vocab - 1));
    std::vector<double> out;
    for (int r = 0; r <= reps; ++r) {   // the first round warms up
        for (int64_t i = 0; i < n_seq; ++i) {
            moesh::GenRequest q;
            for (int64_t k = 0; k < n_prompt; ++k) q.prompt.push_back(tok(rng));
            q.max_tokens = n_gen;
            uint64_t h = 0;
            std::string why;
            if (sched.submit(std::move(q), &h, &why) != moesh::Admit::Queued) throw moesh::Error("--sequences: " + why);
        }
        double seconds = 0;
        int64_t tokens = 0;
        while (!sched.idle()) {
            const moesh::SchedulerStats before = sched.stats();
            const auto t0 = std::chrono::steady_clock::now();   // the whole step, sampling included (not only last_step_seconds)
            sched.step();
            const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const moesh::SchedulerStats after = sched.stats();
            if (after.tokens_prefilled == before.tokens_prefilled) {
                seconds += dt;
                tokens += after.tokens_generated - before.tokens_generated;
            }
        }
        if (r > 0 && seconds > 0) out.push_back(double(tokens) / seconds);
    }
    return stat(out);
}

} // namespace

int main(int argc, char ** argv) {
    std::string model_path, plugin_dir = MOESH_PLUGIN_BUILD_DIR;
    std::string synthetic, synthetic_type = "q4_0", backend = "cpu";
    double roofline_gbps = 0;
    std::vector<int> threads = {1, 2};
    int64_t n_prompt = 128, n_gen = 64, batch = 128, n_sequences = 0;
    int reps = 3;
    double probe_gib = 1.0;
    bool probe_only = false;
    bool repack = true;
    int32_t kv_type = MOESH_DTYPE_F32;
    std::vector<double> gpu_budgets;
    std::vector<std::string> costs = {"auto"};
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
        else if (a == "--synthetic") synthetic = next();
        else if (a == "--type") synthetic_type = next();
        else if (a == "--backend") backend = next();
        else if (a == "--roofline-gbps") roofline_gbps = std::stod(next());
        else if (a == "--threads") {
            threads.clear();
            std::stringstream ss(next());
            std::string t;
            while (std::getline(ss, t, ',')) threads.push_back(std::stoi(t));
        } else if (a == "--prompt") n_prompt = std::stoll(next());
        else if (a == "--gen") n_gen = std::stoll(next());
        else if (a == "--batch") batch = std::stoll(next());
        else if (a == "--sequences") n_sequences = std::stoll(next());
        else if (a == "--reps") reps = std::stoi(next());
        else if (a == "--probe-gib") probe_gib = std::stod(next());
        else if (a == "--probe-only") probe_only = true;
        else if (a == "--no-repack") repack = false;
        else if (a == "--kv-type") {
            kv_type = moesh::parse_kv_type(next());
            if (kv_type < 0) {
                std::fprintf(stderr, "--kv-type: f32, f16 or q8_0\n");
                return 2;
            }
        }
        else if (a == "--gpu-budgets" || a == "--costs") {
            std::stringstream ss(next());
            std::string t;
            if (a == "--costs") costs.clear();
            while (std::getline(ss, t, ',')) {
                if (a == "--costs") costs.push_back(t);
                else gpu_budgets.push_back(std::stod(t));
            }
        }
        else if (a == "--plugin-dir") plugin_dir = next();
        else {
            std::fprintf(stderr,
                         "usage: %s --model PATH [--threads 1,2] [--prompt 128] [--gen 64] [--batch 128] [--reps 3]\n"
                         "          [--probe-gib 1] [--plugin-dir D] [--no-repack] [--kv-type f32|f16|q8_0] [--backend cpu]\n"
                         "          [--roofline-gbps G] [--sequences N]\n"
                         "          [--gpu-budgets 50,25 [--costs auto,auto-sync,promote,in-place]]   (a device backend)\n"
                         "       %s --synthetic moe-small|moe-mid [--type q4_0|q8_0|q4_1|bf16] [same options]\n"
                         "       %s --probe-only [--threads 2] [--probe-gib 1]\n",
                         argv[0], argv[0], argv[0]);
            return a == "--help" ? 0 : 2;
        }
    }
    if (probe_only) {
        for (int t : threads)
            std::cout << nlohmann::json{{"bench", "probe"}, {"threads", t}, {"gbps", probe_gbps(probe_gib, t)}}.dump()
                      << std::endl;
        return 0;
    }
    if (model_path.empty() == synthetic.empty() || n_prompt < 1 || n_gen < 2 || reps < 1 || roofline_gbps < 0 ||
        n_sequences < 0) {
        std::fprintf(stderr, "one of --model and --synthetic is required; --prompt >= 1, --gen >= 2, --reps >= 1,"
                             " --roofline-gbps >= 0, --sequences >= 0\n");
        return 2;
    }
    std::optional<moesh::ModelConfig> synthetic_cfg;
    moesh::QuantizePlan plan;
    if (!synthetic.empty()) {
        synthetic_cfg = synthetic_config(synthetic);
        if (!synthetic_cfg) {
            std::fprintf(stderr, "--synthetic: unknown shape '%s' (moe-small, moe-mid)\n", synthetic.c_str());
            return 2;
        }
        if (synthetic_type != "bf16") {
            const auto t = moesh::parse_quant_target(synthetic_type);
            if (!t) {
                std::fprintf(stderr, "--type: unknown type '%s' (bf16, %s)\n", synthetic_type.c_str(),
                             moesh::k_quant_targets);
                return 2;
            }
            plan.experts = plan.attention = plan.ffn = plan.embeddings = plan.output = *t;
        }
        model_path = "synthetic " + synthetic + " " + synthetic_type;
    }
    // The probe measures host memory: the roofline of the cpu backend only.
    const bool probe = roofline_gbps == 0 && backend == "cpu";
    if (roofline_gbps == 0 && !probe)
        std::fprintf(stderr, "note: backend %s and no --roofline-gbps: no roofline fraction\n", backend.c_str());
    {   // before spending a minute on the model: can the backend be loaded at all?
        moesh::PluginOptions po;
        po.search_dirs = {plugin_dir};
        po.preferred = backend;
        std::string report;
        if (!moesh::load_backend(po, &report)) {
            std::fprintf(stderr, "no backend:\n%s", report.c_str());
            return 1;
        }
    }
    try {
        moesh::Model model = synthetic.empty()
                                 ? moesh::Model::load_path(model_path)
                                 : moesh::Model::load(*synthetic_cfg,
                                                      moesh::make_synthetic_weights(*synthetic_cfg, MOESH_DTYPE_BF16, 1));
        if (!plan.empty()) {
            const moesh::QuantizeReport q =
                moesh::quantize_model(model, plan, int(std::max(1u, std::thread::hardware_concurrency())));
            std::fprintf(stderr, "%lld matrices quantized to %s in %.1f s\n", (long long)q.n_quantized,
                         synthetic_type.c_str(), q.seconds);
        }
        const size_t bytes_per_token = model.active_bytes_per_token();
        std::mt19937 rng(1234);
        std::uniform_int_distribution<int32_t> tok(0, int32_t(model.config().n_vocab - 1));
        moesh::GenerateOptions o;
        for (int64_t i = 0; i < n_prompt; ++i) o.prompt.push_back(tok(rng));
        o.n_generate = n_gen + 1; // the first token comes with the prefill
        o.max_batch = batch;
        o.kv_type = kv_type;
        for (int t : threads) {
            moesh::PluginOptions po;
            po.search_dirs = {plugin_dir};
            po.n_threads = t;
            po.preferred = backend;
            std::string report;
            auto be = moesh::load_backend(po, &report);
            if (!be) {
                std::fprintf(stderr, "no backend:\n%s", report.c_str());
                return 1;
            }
            if (!gpu_budgets.empty()) {
                if (be->host_memory()) {
                    std::fprintf(stderr, "--gpu-budgets needs a device-memory backend (--backend cuda)\n");
                    return 2;
                }
                moesh::PluginOptions hpo;
                hpo.search_dirs = {plugin_dir, MOESH_PLUGIN_BUILD_DIR};
                hpo.n_threads = t;
                hpo.preferred = "cpu";
                auto host = moesh::load_backend(hpo, &report);
                if (!host) {
                    std::fprintf(stderr, "no cpu backend for the experts the gpu tier lacks:\n%s", report.c_str());
                    return 1;
                }
                moesh::WeightOptions wo;
                wo.repack = repack;
                wo.routed_experts = false;
                const moesh::BackendWeights weights(model, *be, wo);
                std::fprintf(stderr, "%s\n", weights.summary().c_str());
                const moesh::CostRates rates = moesh::measure_cost_rates(model, *be, *host);
                const size_t expert_bytes = model.experts().total_bytes();
                for (double pct : gpu_budgets)
                    for (const std::string & cost_name : costs) {
                        const moesh::CostMode mode = cost_name == "promote" ? moesh::CostMode::AlwaysPromote
                                                     : cost_name == "in-place" ? moesh::CostMode::AlwaysInPlace
                                                                               : moesh::CostMode::Auto;
                        moesh::DeviceExpertOptions dopt;
                        dopt.budget = uint64_t(pct / 100.0 * double(expert_bytes));
                        dopt.n_expert_used = int32_t(model.config().n_expert_used);
                        dopt.policy.policy = moesh::Policy::Lookahead;
                        dopt.async_uploads = cost_name != "auto-sync";   // auto-sync: uploads block, no prefetch
                        if (mode == moesh::CostMode::AlwaysInPlace) {
                            // the static rule (llama.cpp's --n-cpu-moe): the first layers' experts pinned, the rest on the cpu
                            const int64_t n_slots = int64_t(dopt.budget / moesh::DeviceExperts::slot_bytes_for(
                                                                             model.experts().bytes_per_expert(0)));
                            for (int64_t k = 0; k < n_slots && k < model.config().n_layer * model.config().n_expert; ++k)
                                dopt.policy.pinned.push_back(k);
                            if (!dopt.policy.pinned.empty()) dopt.policy.pinned.pop_back();   // one slot stays unpinned
                        }
                        moesh::DeviceExperts tier(model.experts(), *be, dopt);
                        moesh::CostModel cost(rates, mode);
                        moesh::GenerateOptions go = o;
                        go.weights = &weights;
                        go.placement.device = &tier;
                        go.placement.host = host.get();
                        go.placement.cost = &cost;
                        moesh::generate(model, *be, go);   // warm-up: fills the tier
                        std::vector<double> pp, tg;
                        for (int r = 0; r < reps; ++r) {
                            const moesh::GenerateResult g = moesh::generate(model, *be, go);
                            pp.push_back(double(n_prompt) / g.prompt_seconds);
                            tg.push_back(double(g.n_decode_steps) / g.decode_seconds);
                        }
                        const Stat p = stat(pp), d = stat(tg);
                        const moesh::DeviceExpertStats & ts = tier.stats();
                        std::cout << nlohmann::json{{"bench", "moesh_gpu_tier"}, {"model", model_path}, {"backend", be->name()},
                                                    {"threads", t}, {"gpu_budget_percent", pct}, {"gpu_slots", tier.slots()},
                                                    {"cost", cost_name}, {"cost_rates", cost.describe()},
                                                    {"n_prompt", n_prompt}, {"n_gen", n_gen}, {"reps", reps},
                                                    {"prefill_tps", p.median}, {"decode_tps", d.median},
                                                    {"prefill_tps_mean", p.mean}, {"decode_tps_mean", d.mean},
                                                    {"decode_tps_sd", d.sd},
                                                    {"tier_requests", ts.requests}, {"tier_hits", ts.hits},
                                                    {"tier_promotions", ts.promotions}, {"tier_in_place", ts.in_place},
                                                    {"tier_bytes_uploaded", ts.bytes_uploaded},
                                                    {"tier_async_uploads", ts.async_uploads}, {"tier_prefetches", ts.prefetches},
                                                    {"tier_async_upload_gbps",   // the copy queue's rate as the device timed it
                                                     ts.async_upload_seconds > 0
                                                         ? double(ts.async_bytes_timed) / ts.async_upload_seconds / 1e9
                                                         : 0.0},
                                                    {"tier_prefetch_hits", ts.prefetch_hits},
                                                    {"tier_prefetch_precision", ts.prefetch_precision()},
                                                    {"tier_prefetch_recall", ts.prefetch_recall()}}
                                         .dump()
                                  << std::endl;
                    }
                continue;
            }
            moesh::WeightOptions wo;
            wo.repack = repack;
            const moesh::BackendWeights weights(model, *be, wo);
            std::fprintf(stderr, "%s\n", weights.summary().c_str());
            o.weights = &weights;
            moesh::generate(model, *be, o); // warm-up: page in the weights
            const double bw_before = probe ? probe_gbps(probe_gib, t) : 0.0;
            std::vector<double> pp, tg;
            for (int r = 0; r < reps; ++r) {
                const moesh::GenerateResult g = moesh::generate(model, *be, o);
                pp.push_back(double(n_prompt) / g.prompt_seconds);
                tg.push_back(double(g.n_decode_steps) / g.decode_seconds);
            }
            const double bw_after = probe ? probe_gbps(probe_gib, t) : 0.0;
            const Stat p = stat(pp), d = stat(tg);
            const double bw = probe ? 0.5 * (bw_before + bw_after) : roofline_gbps;
            nlohmann::json j = {{"bench", "moesh"},
                                {"model", model_path},
                                {"backend", be->name()},
                                {"threads", t},
                                {"repack", weights.n_packed() > 0},
                                {"kv_type", moesh::kv_type_name(kv_type)},
                                {"n_prompt", n_prompt},
                                {"n_gen", n_gen},
                                {"reps", reps},
                                {"prefill_tps", p.median},
                                {"prefill_tps_mean", p.mean},
                                {"prefill_tps_sd", p.sd},
                                {"decode_tps", d.median},
                                {"decode_tps_mean", d.mean},
                                {"decode_tps_sd", d.sd},
                                {"bytes_per_token", bytes_per_token}};
            if (probe) {
                j["probe_gbps_before"] = bw_before;
                j["probe_gbps_after"] = bw_after;
            } else if (bw > 0) {
                j["roofline_gbps"] = bw;   // given with --roofline-gbps
            }
            if (bw > 0) j["decode_roofline_fraction"] = d.median * double(bytes_per_token) / (bw * 1e9);
            std::cout << j.dump() << std::endl;
            if (n_sequences > 0) {
                const Stat b = batched_decode(model, *be, weights, n_prompt, n_gen, n_sequences, batch, kv_type, reps, rng);
                std::cout << nlohmann::json{{"bench", "moesh_batched_decode"}, {"model", model_path}, {"backend", be->name()},
                                            {"threads", t}, {"kv_type", moesh::kv_type_name(kv_type)},
                                            {"sequences", n_sequences}, {"n_prompt", n_prompt}, {"n_gen", n_gen},
                                            {"reps", reps}, {"decode_tps", b.median}, {"decode_tps_mean", b.mean},
                                            {"decode_tps_sd", b.sd}, {"prefill_tps", p.median},
                                            {"of_prefill", b.median / p.median}}
                                 .dump()
                          << std::endl;
            }
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
