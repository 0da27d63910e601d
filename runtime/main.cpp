// The moesh executable: `moesh run`, `moesh inspect`, `moesh sim`, `moesh heatmap`, ...
#include "plugins/loader/plugin_loader.h"
#include "experts/cache_policy.h"
#include "runtime/backend_weights.h"
#include "runtime/chat_template.h"
#include "runtime/route_trace.h"
#include "runtime/error.h"
#include "runtime/expert_placement.h"
#include "runtime/generate.h"
#include "runtime/gguf.h"
#include "runtime/grammar.h"
#include "runtime/heatmap.h"
#include "runtime/json_schema.h"
#include "runtime/mapped_file.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"
#include "runtime/perplexity.h"
#include "runtime/quantize.h"
#include "runtime/run_config.h"
#include "runtime/server.h"
#include "transport/http_server.h"
#include "runtime/tokenizer.h"
#include "transport/client.h"
#include "transport/security.h"

#include <CLI/CLI.hpp>

#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <optional>
#include <cstdio>
#include <iostream>
#include <map>
#include <random>
#include <sstream>

namespace {

using moesh::Error;

std::vector<int32_t> parse_ids(const std::string & text) {
    std::vector<int32_t> ids;
    std::stringstream ss(text);
    std::string item;
    size_t index = 0;
    while (std::getline(ss, item, ',')) {
        size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
        if (b == std::string::npos) throw Error("--prompt-ids: empty entry at index " + std::to_string(index));
        item = item.substr(b, e - b + 1);
        size_t used = 0;
        long long v = 0;
        try {
            v = std::stoll(item, &used);
        } catch (...) {
            used = 0;
        }
        if (used != item.size() || v < 0 || v > INT32_MAX)
            throw Error("--prompt-ids: '" + item + "' at index " + std::to_string(index) + " is not a token id (a non-negative integer)");
        ids.push_back(int32_t(v));
        ++index;
    }
    if (ids.empty()) throw Error("--prompt-ids: no token ids given (example: --prompt-ids 1,2,3)");
    return ids;
}

std::string human_bytes(double b) {
    const char * units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        ++u;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, units[u]);
    return buf;
}

// A file that starts with GGUF's magic (whatever its name); a tokenizer.json or a folder is not.
bool is_gguf_path(const std::string & path) {
    char magic[4] = {};
    std::ifstream in(path, std::ios::binary);
    return !std::filesystem::is_directory(path) && in.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

// A .gguf file's vocabulary, the tokenizer.json of a model folder, or that file itself.
std::optional<moesh::Tokenizer> find_tokenizer(const std::string & model) {
    namespace fs = std::filesystem;
    fs::path p(model);
    if (is_gguf_path(model)) {
        moesh::GgufFile f(model);
        if (f.find("tokenizer.ggml.model")) return moesh::load_tokenizer_gguf(f, model);
        // A file without a vocabulary (moesh quantize of a folder): the folder's tokenizer.json beside it.
        p = p.parent_path() / "tokenizer.json";
        if (!fs::exists(p)) return std::nullopt;
        return moesh::load_tokenizer_json_file(p.string());
    }
    if (fs::is_directory(p)) p /= "tokenizer.json";
    if (!fs::exists(p)) return std::nullopt;
    return moesh::load_tokenizer_json_file(p.string());
}

// The chat template of a .gguf file (tokenizer.chat_template) or a folder's tokenizer_config.json.
std::optional<std::string> find_chat_template_text(const std::string & model) {
    namespace fs = std::filesystem;
    if (is_gguf_path(model)) {
        moesh::GgufFile f(model);
        if (auto t = f.find_string("tokenizer.chat_template")) return std::string(*t);
        return std::nullopt;
    }
    const fs::path cfg = fs::path(model) / "tokenizer_config.json";
    if (!fs::is_directory(model) || !fs::exists(cfg)) return std::nullopt;
    const nlohmann::json j = nlohmann::json::parse(moesh::read_text_file(cfg.string(), "tokenizer_config.json"), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("chat_template")) return std::nullopt;
    const auto & t = j["chat_template"];
    if (t.is_string()) return t.get<std::string>();
    if (t.is_array()) // [{"name": "default", "template": ...}, ...]
        for (const auto & e : t)
            if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
                return e["template"].get<std::string>();
    return std::nullopt;
}

// The chat template: --chat-template FILE, else the model's own (GGUF or
// tokenizer_config.json). nullopt, with *why, when there is none; a template
// that cannot be parsed throws, naming the line.
std::optional<moesh::ChatTemplate> load_chat_template(const std::string & model, const std::string & file,
                                                      const moesh::Tokenizer & tok, std::string * why) {
    if (!file.empty()) {
        try {
            return moesh::ChatTemplate(moesh::read_text_file(file, "--chat-template"), tok);
        } catch (const Error & e) {
            throw Error(file + ": " + e.what());
        }
    }
    const std::optional<std::string> text = find_chat_template_text(model);
    if (!text) {
        *why = "the model has no chat template (give one with --chat-template FILE)";
        return std::nullopt;
    }
    try {
        return moesh::ChatTemplate(*text, tok);
    } catch (const Error & e) {
        throw Error(model + ": the model's " + e.what() + " (give a working one with --chat-template FILE)");
    }
}

struct ChatOptions {
    bool enabled = false;
    std::string system;
    std::string tools_file, tool_choice;   // `client` only: tools the model may call
};

bool g_debug = false;   // MOESH_LOG=debug

// What the output must match: a GBNF file, a JSON Schema file, or any JSON object.
struct GrammarOptions {
    std::string grammar_file, schema_file;
    bool json_object = false;
    bool any() const { return !grammar_file.empty() || !schema_file.empty() || json_object; }
};

std::string read_whole_file(const std::string & path, const char * what) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open the " + what + " file");
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// The options' grammar: its GBNF text (a schema converted) and the grammar parsed from it;
// throws naming the file and the problem.
struct LoadedGrammar {
    std::string text;
    std::shared_ptr<const moesh::Grammar> grammar;
};

LoadedGrammar load_grammar(const GrammarOptions & g) {
    LoadedGrammar out;
    std::string err;
    std::string source = "--json-object";
    if (!g.grammar_file.empty()) {
        source = g.grammar_file;
        out.text = read_whole_file(g.grammar_file, "grammar");
    } else if (!g.schema_file.empty()) {
        source = g.schema_file;
        out.text = moesh::json_schema_to_grammar(read_whole_file(g.schema_file, "JSON Schema"), &err);
        if (out.text.empty()) throw Error(source + ": " + err);
    } else {
        out.text = moesh::json_object_grammar();
    }
    out.grammar = moesh::Grammar::parse(out.text, &err);
    if (!out.grammar) throw Error(source + ": " + err);
    return out;
}

void add_grammar_options(CLI::App * app, GrammarOptions & g) {
    auto * a = app->add_option("--grammar", g.grammar_file,
                               "A GBNF grammar file (llama.cpp's notation) the output must match; generation ends "
                               "where the grammar is complete and nothing can follow");
    auto * b = app->add_option("--json-schema", g.schema_file, "A JSON Schema file the output must be an instance of");
    auto * c = app->add_flag("--json-object", g.json_object, "The output must be a JSON object");
    a->excludes(b)->excludes(c);
    b->excludes(c);
}

struct CommonOptions {
    std::string model;
    std::string config;
    std::string plugin_dir;
    std::string backend;
    int threads = -1;
    bool verbose = false;
    std::string activations;   // "", "fast" or "precise"
    bool no_repack = false;
    std::string expert_budget;   // --expert-budget: host tier of this size + disk tier
    std::string kv_type;         // --kv-type: "", "auto", "f32", "f16" or "q8_0"
    bool stats = false;          // --stats
    std::string chat_template;   // --chat-template FILE (run, serve): replaces the model's own
};

// The weights as the backend reads them: packed into its layout where it has one and
// they fit; on a GPU backend, uploaded whole (refused, with what it needs, when
// weights + KV cache for n_positions + activations for max_batch do not fit).
std::unique_ptr<moesh::BackendWeights> prepare_weights(const moesh::Model & model, moesh::Backend & backend,
                                                       const CommonOptions & co, const moesh::RunConfig & rc,
                                                       int64_t n_positions, int64_t max_batch, bool routed_experts = true) {
    const moesh::ModelConfig & c = model.config();
    moesh::WeightOptions o;
    o.repack = rc.repack && !co.no_repack;
    o.routed_experts = routed_experts;
    moesh::KvCacheSpec ks{c.n_layer, c.n_head_kv, c.head_dim, 16, (n_positions + 15) / 16, 1, rc.kv_type};
    o.reserve_bytes = ks.bytes() + moesh::ForwardPass::scratch_bytes(c, std::max<int64_t>(1, max_batch), ks);
    const char * verb = backend.host_memory() ? "packing weights for" : "uploading weights to";
    if (isatty(STDERR_FILENO)) // a percentage that rewrites itself; logs get the summary line only
        o.progress = [verb](size_t done, size_t total) {
            std::fprintf(stderr, "\rmoesh: %s the backend: %3d%%", verb, int(100.0 * double(done) / double(total)));
            if (done == total) std::fprintf(stderr, "\r\033[K");
            std::fflush(stderr);
        };
    auto w = std::make_unique<moesh::BackendWeights>(model, backend, o);
    std::fprintf(stderr, "moesh: %s\n", w->summary().c_str());
    return w;
}

std::unique_ptr<moesh::Backend> open_backend(const CommonOptions & o, const moesh::RunConfig & rc) {
    moesh::PluginOptions po;
    po.search_dirs = moesh::default_plugin_dirs(o.plugin_dir, rc.plugin_dirs);
    po.allowed = rc.allowed_plugins;
    po.preferred = o.backend.empty() ? rc.preferred_plugin : o.backend;
    po.n_threads = o.threads >= 0 ? o.threads : rc.threads;
    po.precise_activations = o.activations.empty() ? rc.precise_activations : o.activations == "precise";
    std::string report;
    auto be = moesh::load_backend(po, &report);
    if (!be && !po.preferred.empty() && report.find("'" + po.preferred + "' was requested but rejected") != std::string::npos) {
        // The backend asked for cannot run here (a GPU plugin without a GPU): say why, then use the best one that can.
        std::string why;
        for (size_t a = 0, b; a < report.size(); a = b + 1) {
            b = report.find('\n', a);
            if (b == std::string::npos) b = report.size();
            const std::string line = report.substr(a, b - a);
            if (line.find("'" + po.preferred + "'") != std::string::npos) why = line.rfind("moesh: ", 0) == 0 ? line.substr(7) : line;
        }
        po.preferred.clear();
        std::string fallback_report;
        be = moesh::load_backend(po, &fallback_report);
        if (be)
            std::fprintf(stderr, "moesh: warning: %s\nmoesh: falling back to backend '%s'\n",
                         why.empty() ? "the requested backend cannot run here" : why.c_str(), be->name().c_str());
    }
    if (!be) throw Error("no usable backend plugin:\n" + report);
    if (o.verbose) std::fprintf(stderr, "%s", report.c_str());
    return be;
}

// [runtime] kv_type auto: f16 where the backend's attention and copy_rows offer it, else f32. An
// explicit type the backend lacks, or that cannot hold the model's rows, is refused here, before
// the weights are packed or uploaded.
void resolve_kv_type(moesh::RunConfig & rc, const moesh::Backend & backend, const moesh::Model & model) {
    if (rc.kv_type < 0)
        rc.kv_type = moesh::backend_offers_kv_type(backend, MOESH_DTYPE_F16) ? MOESH_DTYPE_F16 : MOESH_DTYPE_F32;
    else if (!moesh::backend_offers_kv_type(backend, rc.kv_type))
        throw Error(std::string("backend '") + backend.name() + "' cannot keep the KV cache in " +
                    moesh::kv_type_name(rc.kv_type) + "; use --kv-type " + (rc.kv_type == MOESH_DTYPE_Q8_0 ? "f16" : "f32") +
                    " or auto (or [runtime] kv_type)");
    if (const std::string why = moesh::kv_type_problem(rc.kv_type, model.config().head_dim); !why.empty()) throw Error(why);
}

// --expert-budget SIZE: the same as a host tier of SIZE and a disk tier in the TOML; --kv-type
// over [runtime] kv_type.
void apply_expert_budget(const CommonOptions & co, moesh::RunConfig & rc) {
    if (!co.kv_type.empty()) rc.kv_type = co.kv_type == "auto" ? -1 : moesh::parse_kv_type(co.kv_type);   // CLI11 checked it
    if (co.expert_budget.empty()) return;
    uint64_t bytes = 0;
    if (!moesh::parse_byte_size(co.expert_budget, &bytes) || bytes == 0)
        throw Error("--expert-budget: '" + co.expert_budget + "' is not a size such as 1.5GiB or 512MiB");
    std::erase_if(rc.placement.tiers, [](const moesh::TierConfig & t) { return t.kind != moesh::TierKind::Gpu; });
    std::erase_if(rc.placement.pins, [&](const moesh::PinConfig & p) {
        return p.tier != "host" && std::none_of(rc.placement.tiers.begin(), rc.placement.tiers.end(),
                                                [&](const moesh::TierConfig & t) { return t.name == p.tier; });
    });
    rc.placement.tiers.push_back({"host", moesh::TierKind::Host, bytes, 0});
    rc.placement.tiers.push_back({"disk", moesh::TierKind::Disk, 0, 0});
}

// What the configured tiers set up: the disk-streaming store for the host tier, the gpu tier with
// the host backend and cost model for the experts it lacks; all empty without tiers.
struct PlacementSetup {
    std::unique_ptr<moesh::ExpertStore> store;
    std::unique_ptr<moesh::DeviceExperts> gpu;
    std::unique_ptr<moesh::Backend> host;
    std::unique_ptr<moesh::CostModel> cost;

    moesh::ExpertPlacement refs(bool prefetch, int32_t extra) const {
        return {store.get(), prefetch, extra, gpu.get(), host.get(), cost.get()};
    }
    bool routed_experts_in_weights() const { return !store && !gpu; }
};

PlacementSetup open_placement(const moesh::Model & model, const CommonOptions & co, moesh::RunConfig rc,
                              const moesh::Backend & backend, int64_t n_ctx, int64_t max_batch) {
    PlacementSetup p;
    if (rc.placement.tiers.empty()) return p;
    const bool has_gpu = std::any_of(rc.placement.tiers.begin(), rc.placement.tiers.end(),
                                     [](const moesh::TierConfig & t) { return t.kind == moesh::TierKind::Gpu; });
    if (has_gpu && backend.host_memory()) {
        std::fprintf(stderr, "moesh: warning: backend '%s' computes in host memory: the gpu tier is ignored (use --backend cuda)\n",
                     backend.name().c_str());
        std::erase_if(rc.placement.pins, [&](const moesh::PinConfig & pin) {
            for (const moesh::TierConfig & t : rc.placement.tiers)
                if (t.name == pin.tier && t.kind == moesh::TierKind::Gpu) return true;
            return false;
        });
        std::erase_if(rc.placement.tiers, [](const moesh::TierConfig & t) { return t.kind == moesh::TierKind::Gpu; });
        if (rc.placement.tiers.empty()) return p;
    }
    const moesh::ModelFootprint f = moesh::footprint_of(model, co.model, n_ctx, max_batch, rc.kv_type);
    moesh::PlacementPlan plan;
    try {
        plan = moesh::plan_placement(f, rc.placement);
    } catch (const moesh::PlacementError & e) {
        throw Error(std::string(co.config.empty() ? "--expert-budget" : co.config) + ": " + e.what());
    }
    if (co.verbose) std::fprintf(stderr, "%s", moesh::describe_plan(f, plan).c_str());
    auto progress_for = [](const char * what) -> std::function<void(size_t, size_t)> {
        if (!isatty(STDERR_FILENO)) return {};
        return [what](size_t done, size_t total) {
            std::fprintf(stderr, "\rmoesh: %s: %3d%%", what, int(100.0 * double(done) / double(total)));
            if (done == total) std::fprintf(stderr, "\r\033[K");
            std::fflush(stderr);
        };
    };
    if (!backend.host_memory()) {
        p.gpu = moesh::open_device_experts(model, plan, backend, progress_for("uploading pinned experts"));
        if (p.gpu) {
            moesh::PluginOptions po;
            po.search_dirs = moesh::default_plugin_dirs(co.plugin_dir, rc.plugin_dirs);
            po.preferred = "cpu";
            po.n_threads = co.threads >= 0 ? co.threads : rc.threads;
            std::string report;
            p.host = moesh::load_backend(po, &report);
            if (!p.host || !p.host->host_memory())
                throw Error("the gpu tier computes the experts it lacks on the cpu backend, which cannot be loaded:\n" + report);
            p.cost = std::make_unique<moesh::CostModel>(moesh::measure_cost_rates(model, backend, *p.host));
            if (g_debug)
                p.cost->set_decision_log([](int32_t layer, int32_t expert, int64_t n, double promote_s, double in_place_s, bool reuse,
                                            moesh::Placement chosen, bool planned) {
                    std::fprintf(stderr, "moesh: debug: cost: layer %d expert %d, %lld token%s: %spromote %.3f ms%s, in place %.3f ms -> %s\n",
                                 layer, expert, (long long)n, n == 1 ? "" : "s",
                                 planned ? "the layer's misses done (copy queue and host at once) if " : "", promote_s * 1e3,
                                 reuse ? " (net of the in-place run a kept copy saves)" : "", in_place_s * 1e3,
                                 chosen == moesh::Placement::Promote ? "promote" : "in place");
                });
            std::fprintf(stderr, "moesh: gpu tier: %lld expert slots of %s (%s budget), %lld pinned; the rest promoted or "
                                 "computed on the host (%s); cost model: %s\n",
                         (long long)p.gpu->slots(), human_bytes(double(p.gpu->slot_bytes())).c_str(),
                         human_bytes(double(p.gpu->budget())).c_str(), (long long)p.gpu->n_pinned(), p.host->name().c_str(),
                         p.cost->describe().c_str());
        }
    }
    p.store = moesh::open_expert_store(model, plan, progress_for("loading pinned experts"));
    if (!p.store && !p.gpu) {
        std::fprintf(stderr, "moesh: experts: all %lld fit the host tier; read from the mapping\n", (long long)f.n_routed());
    } else if (p.store) {
        std::fprintf(stderr, "moesh: experts: %lld slots of %s (%s budget) for %lld routed experts, %lld pinned; misses read from "
                             "disk%s; policy %s%s\n",
                     (long long)p.store->slots(), human_bytes(double(p.store->slot_bytes())).c_str(),
                     human_bytes(double(p.store->budget())).c_str(), (long long)f.n_routed(), (long long)p.store->n_pinned(),
                     p.store->direct_io() ? " (O_DIRECT)" : " (buffered)", rc.placement.policy.c_str(),
                     rc.placement.prefetch ? ", prefetch on" : "");
    }
    return p;
}

nlohmann::json gpu_json(const moesh::DeviceExpertStats & s) {
    return {{"requests", s.requests},       {"hits", s.hits},
            {"hit_rate", s.hit_rate()},     {"promotions", s.promotions},
            {"in_place", s.in_place},       {"evictions", s.evictions},
            {"bytes_uploaded", s.bytes_uploaded}, {"upload_seconds", s.upload_seconds},
            {"async_upload_seconds", s.async_upload_seconds}, {"async_bytes_timed", s.async_bytes_timed},
            {"async_uploads", s.async_uploads}, {"prefetches", s.prefetches},
            {"prefetch_hits", s.prefetch_hits},  {"prefetch_unused", s.prefetch_unused},
            {"prefetch_skipped", s.prefetch_skipped}, {"prefetch_precision", s.prefetch_precision()},
            {"prefetch_recall", s.prefetch_recall()}, {"host_compute_seconds", s.host_seconds}};
}

void print_gpu_stats(const moesh::DeviceExpertStats & s, int64_t n_tokens) {
    std::printf("gpu tier: %lld requests, %lld hits (%.1f%%), %lld promoted, %lld computed in place on the host, %lld evictions\n",
                (long long)s.requests, (long long)s.hits, 100.0 * s.hit_rate(), (long long)s.promotions, (long long)s.in_place,
                (long long)s.evictions);
    std::printf("host -> gpu: %s uploaded (%s per token), %lld beside the compute (%s of them timed by the device: %.3f s), "
                "synchronous ones in %.3f s; host expert compute %.3f s\n",
                human_bytes(double(s.bytes_uploaded)).c_str(),
                human_bytes(n_tokens > 0 ? double(s.bytes_uploaded) / double(n_tokens) : 0.0).c_str(),
                (long long)s.async_uploads, human_bytes(double(s.async_bytes_timed)).c_str(), s.async_upload_seconds,
                s.upload_seconds, s.host_seconds);
    if (s.predicted > 0)
        std::printf("gpu prefetch: %lld uploads, %lld used, %lld unused, %lld skipped (precision below the bar); "
                    "prediction precision %.3f, recall %.3f\n",
                    (long long)s.prefetches, (long long)s.prefetch_hits, (long long)s.prefetch_unused,
                    (long long)s.prefetch_skipped, s.prefetch_precision(), s.prefetch_recall());
}

nlohmann::json store_json(const moesh::StoreStats & s, int64_t n_tokens) {
    return {{"requests", s.requests},
            {"hits", s.hits},
            {"misses", s.misses},
            {"hit_rate", s.hit_rate()},
            {"prefetch_hits", s.prefetch_hits},
            {"prefetches", s.prefetches},
            {"prefetch_unused", s.prefetch_unused},
            {"prefetch_dropped", s.prefetch_dropped},
            {"prefetch_skipped", s.prefetch_skipped},
            {"prefetch_precision", s.prefetch_precision()},
            {"prefetch_recall", s.prefetch_recall()},
            {"evictions", s.evictions},
            {"streamed", s.streamed},
            {"disk_bytes_read", s.bytes_read},
            {"disk_bytes_per_token", n_tokens > 0 ? double(s.bytes_read) / double(n_tokens) : 0.0},
            {"disk_read_seconds", s.read_seconds},
            {"disk_read_gbps", s.read_seconds > 0 ? double(s.bytes_read) / s.read_seconds / 1e9 : 0.0},
            {"stall_seconds", s.stall_seconds}};
}

void print_store_stats(const moesh::StoreStats & s, int64_t n_tokens) {
    std::printf("experts: %lld requests, %lld hits (%.1f%%, %lld of them prefetched), %lld misses (%lld streamed, not "
                "cached), %lld evictions\n",
                (long long)s.requests, (long long)s.hits, 100.0 * s.hit_rate(), (long long)s.prefetch_hits, (long long)s.misses,
                (long long)s.streamed, (long long)s.evictions);
    std::printf("prefetch: %lld loads, %lld unused (%lld dropped before the read), %lld layer predictions not loaded (precision "
                "below the bar); next-layer prediction precision %.3f, recall %.3f\n",
                (long long)s.prefetches, (long long)s.prefetch_unused, (long long)s.prefetch_dropped, (long long)s.prefetch_skipped,
                s.prefetch_precision(), s.prefetch_recall());
    std::printf("disk -> host: %s read (%s per token) in %.2f s of reads (%.2f GB/s); forward pass stalled %.2f s\n",
                human_bytes(double(s.bytes_read)).c_str(),
                human_bytes(n_tokens > 0 ? double(s.bytes_read) / double(n_tokens) : 0.0).c_str(), s.read_seconds,
                s.read_seconds > 0 ? double(s.bytes_read) / s.read_seconds / 1e9 : 0.0, s.stall_seconds);
}

void report_quantization(const moesh::QuantizeReport & q) {
    std::fprintf(stderr, "moesh: quantized %lld matrices in %.2f s: %s -> %s\n", (long long)q.n_quantized, q.seconds,
                 human_bytes(double(q.bytes_before)).c_str(), human_bytes(double(q.bytes_after)).c_str());
    for (size_t i = 0; i < q.kept.size() && i < 8; ++i) std::fprintf(stderr, "moesh:   kept %s\n", q.kept[i].c_str());
    if (q.kept.size() > 8) std::fprintf(stderr, "moesh:   ... and %zu more kept as they were\n", q.kept.size() - 8);
}

moesh::Model load_model(const std::string & path, const moesh::QuantizePlan & plan = {}, int threads = 0) {
    auto t0 = std::chrono::steady_clock::now();
    std::fprintf(stderr, "moesh: loading %s ...\n", path.c_str());
    moesh::Model m = moesh::Model::load_path(path);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto & c = m.config();
    std::fprintf(stderr, "moesh: %s, %lld layers, %lld experts (top-%lld), %s of weights mapped in %.2f s\n",
                 moesh::arch_name(c.arch), (long long)c.n_layer, (long long)c.n_expert, (long long)c.n_expert_used,
                 human_bytes(double(m.weight_bytes())).c_str(), s);
    auto unused = m.unused_tensors();
    if (!unused.empty()) {
        std::fprintf(stderr, "moesh: warning: %zu tensors in the checkpoint are not used (first: %s)\n", unused.size(),
                     unused.front().c_str());
    }
    if (!plan.empty()) report_quantization(moesh::quantize_model(m, plan, threads));
    return m;
}

// --trace: a routing trace writer named after the model folder or file; none for an empty path.
// It records the prefetch prediction's 2k best-ranked experts per layer as well (the lookahead
// `moesh sim` gives the prediction-aware policies).
std::optional<moesh::RouteTraceWriter> open_trace(const std::string & path, const std::string & model_path,
                                                  const moesh::Model & model) {
    if (path.empty()) return std::nullopt;
    const std::filesystem::path mp = std::filesystem::path(model_path).lexically_normal();
    return std::optional<moesh::RouteTraceWriter>(std::in_place, path, model.config(),
                                                  (mp.has_filename() ? mp : mp.parent_path()).filename().string(),
                                                  2 * model.config().n_expert_used);
}

void report_trace(const std::optional<moesh::RouteTraceWriter> & trace, const std::string & path) {
    if (trace)
        std::fprintf(stderr, "moesh: wrote the routing of %lld tokens to %s\n", (long long)trace->n_tokens(), path.c_str());
}

// The sampling options `run` and `client` share (runtime/sampler.h says what each does).
void add_sampling(CLI::App * app, moesh::SamplerParams & sp) {
    app->add_option("--temperature", sp.temperature, "Sampling temperature; 0 = greedy (default)")->check(CLI::Range(0.0f, 1e6f));
    app->add_option("--top-k", sp.top_k, "Keep the k most likely tokens; 0 = off")->check(CLI::Range(0, 1 << 30));
    app->add_option("--top-p", sp.top_p, "Keep the smallest set of tokens with this much probability; 1 = off")
        ->check(CLI::Range(1e-6f, 1.0f));
    app->add_option("--seed", sp.seed, "Random seed for sampling")->capture_default_str();
    app->add_option("--repetition-penalty", sp.repetition_penalty,
                    "Hugging Face's: divide a positive logit (multiply a negative one) of every token already in the "
                    "prompt or output by this; 1 = off")
        ->check(CLI::Range(1e-6f, 10.0f));
    app->add_option("--frequency-penalty", sp.frequency_penalty,
                    "OpenAI's: subtract this times the token's count in the output so far; 0 = off")
        ->check(CLI::Range(-2.0f, 2.0f));
    app->add_option("--presence-penalty", sp.presence_penalty,
                    "OpenAI's: subtract this from every token already in the output; 0 = off")
        ->check(CLI::Range(-2.0f, 2.0f));
}

int cmd_run(const CommonOptions & co, const std::string & prompt_ids, const std::string & prompt_text, int64_t n,
            const moesh::SamplerParams & sampling, const std::string & output,
            const std::string & dump_logits, const std::string & trace_path, const ChatOptions & chat,
            const GrammarOptions & grammar_opts) {
    moesh::RunConfig rc = co.config.empty() ? moesh::RunConfig{} : moesh::load_run_config(co.config);
    apply_expert_budget(co, rc);
    std::optional<moesh::Tokenizer> tok = find_tokenizer(co.model);
    moesh::GenerateOptions go;
    bool chatting = false;
    if (!prompt_text.empty()) {
        if (!tok) throw Error(co.model + ": no tokenizer (tokenizer.json or GGUF vocabulary), so --prompt cannot be used; give --prompt-ids instead");
        std::optional<moesh::ChatTemplate> tmpl;
        if (chat.enabled) {
            std::string why;
            tmpl = load_chat_template(co.model, co.chat_template, *tok, &why);
            if (!tmpl) std::fprintf(stderr, "moesh: warning: --chat: %s; using the prompt as it is (raw mode)\n", why.c_str());
        }
        if (tmpl) {
            std::vector<moesh::ChatMessage> msgs;
            if (!chat.system.empty()) msgs.push_back({"system", chat.system});
            msgs.push_back({"user", prompt_text});
            const std::string rendered = tmpl->apply(msgs, /*add_generation_prompt=*/true);
            go.prompt = tok->encode(rendered, /*add_special=*/false); // BOS is in the rendering where the template wants it
            go.stop_at_eos = true;
            go.stop_ids = moesh::chat_stop_ids(*tok);
            chatting = true;
            if (co.verbose) std::fprintf(stderr, "moesh: chat prompt (%zu tokens):\n%s\n", go.prompt.size(), rendered.c_str());
        } else {
            go.prompt = tok->encode(prompt_text, /*add_special=*/true);
        }
    } else {
        go.prompt = parse_ids(prompt_ids);
    }
    go.n_generate = n;
    go.sampling = sampling;
    go.keep_logits = !dump_logits.empty();
    go.max_batch = rc.max_batch;
    go.kv_block_size = rc.kv_block_size;
    if (std::string e = moesh::validate(go.sampling); !e.empty()) throw Error(e);
    std::shared_ptr<const moesh::Grammar> grammar;
    if (grammar_opts.any()) {
        if (!tok) throw Error(co.model + ": no tokenizer, and a grammar matches text: --grammar/--json-schema/--json-object need one");
        grammar = load_grammar(grammar_opts).grammar;
    }

    moesh::Model model = load_model(co.model, rc.quantize, co.threads >= 0 ? co.threads : rc.threads);
    if (grammar) {   // its end tokens end generation
        go.stop_at_eos = true;
        std::vector<int32_t> ends(model.config().eos_token_ids.begin(), model.config().eos_token_ids.end());
        ends.insert(ends.end(), go.stop_ids.begin(), go.stop_ids.end());
        go.grammar = std::make_shared<moesh::GrammarMatcher>(grammar, std::make_shared<const moesh::GrammarVocab>(*tok), ends);
    }
    auto backend = open_backend(co, rc);
    resolve_kv_type(rc, *backend, model);
    std::fprintf(stderr, "moesh: backend '%s' (%s)\n", backend->name().c_str(), backend->path().c_str());

    if (tok && tok->n_vocab() > model.config().n_vocab)
        std::fprintf(stderr, "moesh: warning: the tokenizer has %lld ids, the model %lld\n", (long long)tok->n_vocab(),
                     (long long)model.config().n_vocab);
    // text mode streams the generated text as it comes; never half a UTF-8 character
    std::optional<moesh::StreamDecoder> stream;
    if (tok && output == "text") {
        stream.emplace(*tok, /*skip_special=*/chatting);
        go.on_token = [&](int32_t id) {
            if (id >= 0 && id < tok->n_vocab()) {
                std::string_view piece = stream->push(id);
                std::fwrite(piece.data(), 1, piece.size(), stdout);
                std::fflush(stdout);
            }
        };
    }

    const int64_t n_positions = int64_t(go.prompt.size()) + go.n_generate;
    const int64_t max_batch = std::min<int64_t>(go.max_batch, int64_t(go.prompt.size()));
    const PlacementSetup placement = open_placement(model, co, rc, *backend, n_positions, max_batch);
    const auto weights = prepare_weights(model, *backend, co, rc, n_positions, max_batch, placement.routed_experts_in_weights());
    go.weights = weights.get();
    go.kv_type = rc.kv_type;
    go.placement = placement.refs(rc.placement.prefetch, rc.placement.prefetch_extra);
    std::optional<moesh::RouteTraceWriter> trace = open_trace(trace_path, co.model, model);
    go.trace = trace ? &*trace : nullptr;
    moesh::GenerateResult r = moesh::generate(model, *backend, go);
    report_trace(trace, trace_path);
    if (go.grammar && co.verbose)   // how often the model's own choice was refused (a whole-vocabulary mask each)
        std::fprintf(stderr, "moesh: grammar: %zu tokens, %lld masked after a refused choice\n", r.tokens.size(),
                     (long long)go.grammar->n_masks());
    std::string text;
    if (tok) {
        std::vector<int32_t> in_vocab;
        for (int32_t t : r.tokens)
            if (t < tok->n_vocab()) in_vocab.push_back(t);
        text = tok->decode(in_vocab, /*skip_special=*/chatting);
    }

    if (!dump_logits.empty()) {
        moesh::write_npy_f32(dump_logits, r.logits.data(), {r.n_logit_rows, model.config().n_vocab});
        std::fprintf(stderr, "moesh: wrote logits [%lld, %lld] to %s\n", (long long)r.n_logit_rows,
                     (long long)model.config().n_vocab, dump_logits.c_str());
    }
    const double prompt_tps = r.prompt_seconds > 0 ? double(go.prompt.size()) / r.prompt_seconds : 0.0;
    const double decode_tps = r.decode_seconds > 0 ? double(r.n_decode_steps) / r.decode_seconds : 0.0;

    if (output == "json") {
        nlohmann::json j;
        j["prompt_ids"] = go.prompt;
        j["tokens"] = r.tokens;
        if (tok)
            j["text"] = text;
        else
            j["text"] = nullptr; // no tokenizer.json in the model folder
        j["timings"] = {{"prompt_tokens", go.prompt.size()},
                        {"prompt_seconds", r.prompt_seconds},
                        {"prompt_tokens_per_second", prompt_tps},
                        {"decode_tokens", r.n_decode_steps},
                        {"decode_seconds", r.decode_seconds},
                        {"decode_tokens_per_second", decode_tps}};
        nlohmann::json layers = nlohmann::json::array();
        for (int64_t il = 0; il < model.config().n_layer; ++il) {
            if (model.config().n_expert > 0 && model.layers()[size_t(il)].is_moe)
                layers.push_back(r.heat.counts(il));
            else
                layers.push_back(nullptr);
        }
        j["experts"] = {{"n_expert", model.config().n_expert},
                        {"n_expert_used", model.config().n_expert_used},
                        {"activation_counts", layers}};
        j["backend"] = backend->name();
        j["kv_cache_bytes"] = r.kv_bytes;
        const int64_t n_tokens = int64_t(go.prompt.size()) + int64_t(r.tokens.size());
        if (placement.store) j["placement"] = store_json(placement.store->stats(), n_tokens);
        if (placement.gpu) j["gpu_tier"] = gpu_json(placement.gpu->stats());
        std::cout << j.dump() << std::endl;
    } else {
        if (stream) {
            std::string_view rest = stream->flush();
            std::fwrite(rest.data(), 1, rest.size(), stdout);
            std::fputc('\n', stdout);
        }
        std::cout << "tokens:";
        for (int32_t t : r.tokens) std::cout << ' ' << t;
        std::cout << '\n';
        std::fprintf(stdout, "prompt: %zu tokens, %.1f tokens/s; decode: %lld tokens, %.1f tokens/s\n", go.prompt.size(),
                     prompt_tps, (long long)r.n_decode_steps, decode_tps);
        if (co.stats) {
            const int64_t n_tokens = int64_t(go.prompt.size()) + int64_t(r.tokens.size());
            if (placement.store) print_store_stats(placement.store->stats(), n_tokens);
            if (placement.gpu) print_gpu_stats(placement.gpu->stats(), n_tokens);
            if (!placement.store && !placement.gpu)
                std::printf("experts: no expert budget (--expert-budget or [[tier]] in --config): every expert read from the mapping\n");
        }
    }
    return 0;
}

// Prints the grammar, checks a text against it, or writes random texts it matches.
int cmd_grammar(const GrammarOptions & g, const std::string & check_file, int64_t n_sample, uint64_t seed, int64_t max_bytes) {
    const LoadedGrammar loaded = load_grammar(g);
    const auto & grammar = loaded.grammar;
    // The 256 bytes as tokens, and 256 as the end.
    std::vector<std::string> bytes(257);
    for (int b = 0; b < 256; ++b) bytes[size_t(b)] = std::string(1, char(b));
    const auto vocab = std::make_shared<const moesh::GrammarVocab>(std::move(bytes));
    constexpr int32_t k_end = 256;
    if (!check_file.empty()) {
        const std::string text = read_whole_file(check_file, "text");
        moesh::GrammarMatcher m(grammar, vocab, {k_end});
        int64_t line = 1, col = 1;
        for (size_t i = 0; i < text.size(); ++i) {
            if (!m.accept(uint8_t(text[i]))) {
                std::fprintf(stderr, "%s: offset %zu (line %lld, column %lld): the grammar does not allow %s here%s%s\n",
                             check_file.c_str(), i, (long long)line, (long long)col,
                             moesh::quote_untrusted(text.substr(i, 1), false).c_str(), m.error().empty() ? "" : ": ",
                             m.error().c_str());
                return 1;
            }
            if (text[i] == '\n') ++line, col = 1;
            else ++col;
        }
        if (!m.can_end()) {
            std::fprintf(stderr, "%s: the text ends before the grammar is complete\n", check_file.c_str());
            return 1;
        }
        std::fprintf(stderr, "%s: matches\n", check_file.c_str());
        return 0;
    }
    if (n_sample > 0) {
        std::mt19937_64 rng(seed);
        std::vector<uint8_t> allowed;
        std::vector<int32_t> choices;
        int64_t made = 0, tries = 0;
        while (made < n_sample) {
            if (++tries > 20 * n_sample + 100)
                throw Error("could not finish " + std::to_string(n_sample) + " texts within --max-bytes " + std::to_string(max_bytes));
            moesh::GrammarMatcher m(grammar, vocab, {k_end});
            std::string text;
            bool done = false;
            while (!done && int64_t(text.size()) <= max_bytes) {
                // End with a chance of 1/4 where the grammar can, and always past half the budget.
                if (m.can_end() && (rng() % 4 == 0 || int64_t(text.size()) > max_bytes / 2)) { done = true; break; }
                if (m.fill_allowed(&allowed) == 0) break;
                choices.clear();
                for (int32_t t = 0; t < 256; ++t)
                    if (allowed[size_t(t)]) choices.push_back(t);
                if (choices.empty()) { done = m.can_end(); break; }
                const int32_t t = choices[size_t(rng() % choices.size())];
                m.accept(t);
                text += char(t);
            }
            if (!done) continue;
            std::cout << nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
            ++made;
        }
        return 0;
    }
    if (!g.grammar_file.empty()) {
        std::fprintf(stderr, "%s: a valid grammar of %zu rules\n", g.grammar_file.c_str(), grammar->rules.size());
        return 0;
    }
    std::cout << loaded.text;
    return 0;
}

int cmd_perplexity(const CommonOptions & co, const std::string & file, int64_t n_ctx, int64_t n_batch, int64_t n_chunks,
                   const std::string & output, const std::string & trace_path) {
    moesh::RunConfig rc = co.config.empty() ? moesh::RunConfig{} : moesh::load_run_config(co.config);
    apply_expert_budget(co, rc);
    std::optional<moesh::Tokenizer> tok = find_tokenizer(co.model);
    if (!tok) throw Error(co.model + ": no tokenizer (a .gguf file's vocabulary or a folder's tokenizer.json) to read --file with");
    std::string text = moesh::read_text_file(file, "the text to score");
    if (!text.empty() && text.back() == '\n') text.pop_back(); // llama.cpp's -f drops one trailing newline
    // BOS as the tokenizer adds it, which is what llama.cpp's tool does too
    moesh::PerplexityOptions po;
    const std::vector<int32_t> bos_probe = tok->encode("", /*add_special=*/true);
    po.add_bos = !bos_probe.empty() && bos_probe.front() == tok->bos_id();
    po.bos_id = tok->bos_id();
    const std::vector<int32_t> tokens = tok->encode(text, po.add_bos);
    po.n_ctx = n_ctx;
    po.n_batch = n_batch;
    po.n_chunks = n_chunks;
    moesh::Model model = load_model(co.model, rc.quantize, co.threads >= 0 ? co.threads : rc.threads);
    auto backend = open_backend(co, rc);
    resolve_kv_type(rc, *backend, model);
    std::fprintf(stderr, "moesh: %zu tokens, %lld chunks of %lld (BOS %s), backend '%s'\n", tokens.size(),
                 (long long)(n_chunks > 0 ? std::min<int64_t>(n_chunks, int64_t(tokens.size()) / n_ctx)
                                          : int64_t(tokens.size()) / n_ctx),
                 (long long)n_ctx, po.add_bos ? "added" : "not added", backend->name().c_str());
    po.on_chunk = [](int64_t i, double ppl) {
        std::fprintf(stderr, "[%lld]%.4f,", (long long)i + 1, ppl);
        std::fflush(stderr);
    };
    const PlacementSetup placement = open_placement(model, co, rc, *backend, n_ctx, std::min(n_batch, n_ctx));
    const auto weights = prepare_weights(model, *backend, co, rc, n_ctx, std::min(n_batch, n_ctx), placement.routed_experts_in_weights());
    po.weights = weights.get();
    po.kv_type = rc.kv_type;
    po.placement = placement.refs(rc.placement.prefetch, rc.placement.prefetch_extra);
    std::optional<moesh::RouteTraceWriter> trace = open_trace(trace_path, co.model, model);
    po.trace = trace ? &*trace : nullptr;
    const moesh::PerplexityResult r = moesh::perplexity(model, *backend, tokens, po);
    report_trace(trace, trace_path);
    std::fprintf(stderr, "\n");
    if (output == "json") {
        nlohmann::json j = {{"ppl", r.ppl},           {"ppl_error", r.ppl_error}, {"n_ctx", n_ctx},
                            {"chunks", r.n_chunks},   {"scored", r.n_scored},     {"running", r.running},
                            {"tokens", tokens.size()}, {"seconds", r.seconds},
                            {"tokens_per_second", r.seconds > 0 ? double(r.n_evaluated) / r.seconds : 0.0}};
        if (placement.store) j["placement"] = store_json(placement.store->stats(), r.n_evaluated);
        if (placement.gpu) j["gpu_tier"] = gpu_json(placement.gpu->stats());
        std::cout << j.dump() << std::endl;
    } else {
        std::printf("Final estimate: PPL = %.4f +/- %.5f\n", r.ppl, r.ppl_error);
        std::printf("%lld chunks of %lld tokens, %lld predictions scored, %.1f tokens/s\n", (long long)r.n_chunks,
                    (long long)n_ctx, (long long)r.n_scored, r.seconds > 0 ? double(r.n_evaluated) / r.seconds : 0.0);
        if (co.stats && placement.store) print_store_stats(placement.store->stats(), r.n_evaluated);
        if (co.stats && placement.gpu) print_gpu_stats(placement.gpu->stats(), r.n_evaluated);
    }
    return 0;
}

// Where every expert, the attention weights and the KV cache will live, before any matrix is read
// (the model's header and small norm vectors are).
std::atomic<bool> g_stop{false};
extern "C" void on_stop_signal(int) { g_stop.store(true); }
std::atomic<bool> g_reload{false};
extern "C" void on_reload_signal(int) { g_reload.store(true); }

// A ZeroMQ server, and the HTTP front when configured, until SIGTERM/SIGINT, then a bounded
// drain (server.h). HTTP listens before the model loads, so /health can say "loading".
// Who may connect: the files [server] names, read before the model loads so a bad one stops
// the server at once.
struct ServeSecurity {
    moesh::security::CurveCert curve;          // the server's, when CURVE is on
    std::vector<std::string> curve_clients;     // empty: any client with the server's key
    std::vector<std::string> api_keys;          // empty: HTTP open
};

// with_cert false: the lists only (a reload; the server's own key changes only with a restart).
ServeSecurity load_serve_security(const moesh::ServerConfig & sc, bool with_cert) {
    ServeSecurity s;
    try {
        if (with_cert && !sc.curve_secret_key.empty()) s.curve = moesh::security::load_curve_cert(sc.curve_secret_key, true);
        if (!sc.curve_authorized_keys.empty()) s.curve_clients = moesh::security::load_authorized_keys(sc.curve_authorized_keys);
        if (!sc.api_key_file.empty()) s.api_keys = moesh::security::load_api_keys(sc.api_key_file);
    } catch (const std::runtime_error & e) {
        throw Error(std::string("[server] security: ") + e.what());
    }
    return s;
}

// "tcp://HOST:PORT" -> HOST (brackets of an IPv6 address dropped).
std::string zmq_host(const std::string & endpoint) {
    std::string h = endpoint.substr(6);
    if (size_t c = h.rfind(':'); c != std::string::npos) h.resize(c);
    if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
    return h;
}

bool is_loopback(const std::string & host) {
    return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0 || host == "lo";
}

int cmd_serve(const CommonOptions & co, const std::string & endpoint, const std::string & http) {
    moesh::RunConfig rc = co.config.empty() ? moesh::RunConfig{} : moesh::load_run_config(co.config);
    apply_expert_budget(co, rc);
    if (!endpoint.empty()) rc.server.endpoint = endpoint;
    if (!http.empty()) rc.server.http = http == "off" ? "" : http;
    const ServeSecurity security = load_serve_security(rc.server, true);
    moesh::LocalPort port;
    std::unique_ptr<moesh::HttpFront> front;
    const std::filesystem::path mp = std::filesystem::path(co.model).lexically_normal();
    const std::string model_name = (mp.has_filename() ? mp : mp.parent_path()).filename().string();
    if (!rc.server.http.empty()) {
        moesh::HttpOptions ho;
        if (!moesh::parse_host_port(rc.server.http, &ho.address, &ho.port))
            throw Error("--http: '" + rc.server.http + "' is not ADDRESS:PORT such as 127.0.0.1:8090 (or off)");
        ho.max_connections = rc.server.http_max_connections;
        ho.max_body_bytes = rc.server.max_message_bytes;
        ho.request_timeout_s = rc.server.http_request_timeout_s;
        ho.default_max_tokens = std::min<int64_t>(16, rc.server.max_tokens);
        ho.default_chat_max_tokens = std::min(rc.server.default_max_tokens, rc.server.max_tokens);
        ho.model_name = model_name;
        ho.api_keys = security.api_keys;
        if (ho.api_keys.empty() && !is_loopback(ho.address))
            std::fprintf(stderr, "moesh: warning: http listens on %s without API keys: anyone who reaches it can use it "
                                 "(set [server] api_key_file)\n", rc.server.http.c_str());
        front = std::make_unique<moesh::HttpFront>(ho, port);
        try {
            front->start();
        } catch (const std::runtime_error & e) {
            throw Error(e.what());
        }
        std::fprintf(stderr, "moesh: http on %s (503 until the model is loaded)\n", front->url().c_str());
    }
    std::optional<moesh::Tokenizer> tok = find_tokenizer(co.model);
    std::optional<moesh::ChatTemplate> chat;
    if (tok) {
        std::string why;
        try {
            chat = load_chat_template(co.model, co.chat_template, *tok, &why);
        } catch (const Error & e) {
            if (!co.chat_template.empty()) throw;
            why = e.what();
        }
        if (!chat) std::fprintf(stderr, "moesh: warning: chat requests will be refused: %s\n", why.c_str());
    }
    moesh::Model model = load_model(co.model, rc.quantize, co.threads >= 0 ? co.threads : rc.threads);
    auto backend = open_backend(co, rc);
    resolve_kv_type(rc, *backend, model);
    const int64_t n_ctx = std::min<int64_t>(model.config().max_positions, int64_t(rc.server.max_tokens) + 1024);
    const PlacementSetup placement = open_placement(model, co, rc, *backend, n_ctx, rc.max_batch);
    const auto weights = prepare_weights(model, *backend, co, rc, n_ctx, rc.max_batch, placement.routed_experts_in_weights());
    moesh::Server server(model, *backend, tok ? &*tok : nullptr, chat, rc.server, rc.max_batch, rc.kv_block_size, rc.kv_type,
                         weights.get(),
                         model_name);
    if (!placement.routed_experts_in_weights()) server.set_placement(placement.refs(rc.placement.prefetch, rc.placement.prefetch_extra));
    if (!security.curve.secret_key.empty()) server.set_curve(security.curve.secret_key, security.curve_clients);
    server.bind();
    if (!security.curve.secret_key.empty())
        std::fprintf(stderr, "moesh: CURVE on %s: server public key %s; %s\n", server.endpoint().c_str(), security.curve.public_key.c_str(),
                     security.curve_clients.empty()
                         ? "any client that knows it may connect (curve_authorized_keys limits that)"
                         : (std::to_string(security.curve_clients.size()) + " client key(s) let in").c_str());
    else if (server.endpoint().rfind("tcp://", 0) == 0 && !is_loopback(zmq_host(server.endpoint())))
        std::fprintf(stderr, "moesh: warning: %s is not loopback and has no CURVE: anyone who reaches it can use it, in clear text "
                             "(set [server] curve_secret_key)\n", server.endpoint().c_str());
    if (front) server.attach(port);
    // SIGHUP: read the client keys and the API keys again (rotating them without a restart); a file
    // that is now bad leaves the keys as they were.
    server.set_reload(&g_reload, [&] {
        try {
            const ServeSecurity s = load_serve_security(rc.server, false);
            if (!security.curve.secret_key.empty()) server.set_curve_clients(s.curve_clients);
            if (front) front->set_api_keys(s.api_keys);
            std::fprintf(stderr, "moesh: reloaded: %s, %zu API key(s)\n",
                         security.curve.secret_key.empty() ? "no CURVE"
                         : s.curve_clients.empty()         ? "CURVE lets in any client with the server's key"
                                                           : (std::to_string(s.curve_clients.size()) + " CURVE client key(s)").c_str(),
                         s.api_keys.size());
        } catch (const std::exception & e) {
            std::fprintf(stderr, "moesh: reload failed, the keys stay as they were: %s\n", e.what());
        }
    });
    std::signal(SIGHUP, on_reload_signal);
    std::signal(SIGTERM, on_stop_signal);
    std::signal(SIGINT, on_stop_signal);
    const int64_t kv_positions = server.scheduler().stats().kv_blocks_total * rc.kv_block_size;
    std::fprintf(stderr, "moesh: serving %s on %s%s%s (%lld sequences, KV %s in %s: %lld positions, queue %lld); SIGTERM drains for %.0f s\n",
                 co.model.c_str(), server.endpoint().c_str(), front ? " and " : "", front ? front->url().c_str() : "",
                 (long long)rc.server.max_sequences, human_bytes(double(rc.server.kv_cache)).c_str(),
                 moesh::kv_type_name(rc.kv_type), (long long)kv_positions, (long long)rc.server.max_queue, rc.server.drain_timeout_s);
    std::printf("%s\n", server.endpoint().c_str());   // for scripts: the endpoints actually bound, once ready
    if (front) std::printf("%s\n", front->url().c_str());
    std::fflush(stdout);
    server.run(g_stop);   // on SIGTERM it drains the port: the HTTP front stops accepting
    if (front) front->stop();
    const moesh::ServerStats & st = server.stats();
    std::fprintf(stderr, "moesh: stopped: %lld requests, %lld completed, %lld cancelled, %lld busy, %lld refused, %lld bad, "
                         "%lld replies undeliverable, %lld tokens\n",
                 (long long)st.requests, (long long)st.completed, (long long)st.cancelled, (long long)st.busy,
                 (long long)st.rejected, (long long)st.bad_requests, (long long)st.undeliverable, (long long)st.tokens_out);
    if (co.stats && placement.store) print_store_stats(placement.store->stats(), st.tokens_out);
    return 0;
}

// One request to a server; streamed text as it comes, or the final frame.
// A CURVE key given on the command line: 40 Z85 characters, or the path of a certificate file.
std::string curve_key_arg(const std::string & arg, bool secret, const char * what) {
    if (!secret && moesh::security::is_z85_key(arg) && !std::filesystem::exists(arg)) return arg;
    try {
        const moesh::security::CurveCert c = moesh::security::load_curve_cert(arg, secret);
        return secret ? c.secret_key : c.public_key;
    } catch (const std::runtime_error & e) {
        throw Error(std::string(what) + ": " + e.what());
    }
}

int cmd_client(const std::string & endpoint, const std::string & prompt, const std::string & prompt_ids, int64_t max_tokens,
               const moesh::SamplerParams & sp, int logprobs, int priority, bool stream, const std::string & output, double timeout_s,
               const GrammarOptions & grammar, const ChatOptions & chat, const moesh::CurveClientKeys & curve) {
    moesh::Client c(endpoint, curve);
    nlohmann::json req = {{"id", "moesh-client-" + std::to_string(::getpid())},
                          {"max_tokens", max_tokens},
                          {"temperature", sp.temperature},
                          {"top_k", sp.top_k},
                          {"top_p", sp.top_p},
                          {"seed", sp.seed},
                          {"stream", stream}};
    if (logprobs >= 0) req["logprobs"] = logprobs;
    if (priority != 0) req["priority"] = priority;
    if (sp.repetition_penalty != 1.0f) req["repetition_penalty"] = sp.repetition_penalty;
    if (sp.frequency_penalty != 0.0f) req["frequency_penalty"] = sp.frequency_penalty;
    if (sp.presence_penalty != 0.0f) req["presence_penalty"] = sp.presence_penalty;
    if (!prompt_ids.empty()) {
        req["prompt_ids"] = parse_ids(prompt_ids);
    } else if (chat.enabled) {
        req["messages"] = nlohmann::json::array();
        if (!chat.system.empty()) req["messages"].push_back({{"role", "system"}, {"content", chat.system}});
        req["messages"].push_back({{"role", "user"}, {"content", prompt}});
        if (!chat.tools_file.empty()) {
            const auto tools = nlohmann::json::parse(read_whole_file(chat.tools_file, "tools"), nullptr, false);
            if (!tools.is_array()) throw Error(chat.tools_file + ": not a JSON array of tools ([{\"type\": \"function\", \"function\": {...}}])");
            req["tools"] = tools;
        }
        if (chat.tool_choice == "auto" || chat.tool_choice == "none" || chat.tool_choice == "required") req["tool_choice"] = chat.tool_choice;
        else if (!chat.tool_choice.empty())
            req["tool_choice"] = nlohmann::json{{"type", "function"}, {"function", {{"name", chat.tool_choice}}}};
    } else {
        req["prompt"] = prompt;
    }
    // A schema is sent as the grammar it becomes here (a request's JSON would not keep its key order).
    if (grammar.any()) {
        req["grammar"] = load_grammar(grammar).text;   // a bad one is refused here, with the file's name
    }
    // Streamed calls are printed as they are written: a call's pieces come in order, and it is whole
    // (but for what the done frame adds to the last one) when the next one starts.
    std::vector<std::string> call_ids, call_args;
    auto r = c.request(req, std::chrono::milliseconds(int64_t(timeout_s * 1000)), [&](const moesh::protocol::Response & f) {
        if (output == "text") {
            const std::string piece = f.body.value("text", "");
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            if (auto calls = f.body.find("tool_calls"); calls != f.body.end() && calls->is_array())
                for (const auto & d : *calls) {
                    const auto fn = d.value("function", nlohmann::json::object());
                    if (d.contains("id")) {
                        if (!call_ids.empty()) std::fputs("]", stdout);
                        call_ids.push_back(d.value("id", ""));
                        call_args.emplace_back();
                        std::printf("\n[call %s ", fn.value("name", "?").c_str());
                    }
                    if (call_ids.empty()) continue;
                    const std::string a = fn.value("arguments", "");
                    call_args.back() += a;
                    std::fwrite(a.data(), 1, a.size(), stdout);
                }
            std::fflush(stdout);
        } else {
            std::cout << f.body.dump() << std::endl;
        }
    });
    if (!r) {
        const std::string note = c.connection_note();
        throw Error("no answer from " + endpoint + " within " + std::to_string(int(timeout_s)) + " s (" +
                    (note.empty() ? "is `moesh serve` running there?" : note) + ")");
    }
    if (r->type == "error")
        throw Error("the server refused the request: " + r->body.value("code", "?") + ": " + r->body.value("message", ""));
    if (output == "json") {
        std::cout << r->body.dump() << std::endl;
    } else {
        if (!stream && r->body.contains("reasoning")) std::cout << "[reasoning] " << r->body["reasoning"].get<std::string>() << "\n";
        if (!stream) std::cout << r->body.value("text", "");
        if (r->body.contains("tool_calls")) {
            const auto & calls = r->body["tool_calls"];
            for (size_t i = 0; i < calls.size(); ++i) {
                const std::string args = calls[i]["function"].value("arguments", "");
                if (i + 1 < call_ids.size()) continue;   // printed whole as it streamed
                if (i + 1 == call_ids.size()) {   // the rest of the call being streamed
                    if (calls[i].value("id", "") == call_ids[i] && args.rfind(call_args[i], 0) == 0) std::cout << args.substr(call_args[i].size());
                    std::cout << "]";
                } else {
                    std::cout << "\n[call " << calls[i]["function"].value("name", "?") << " " << args << "]";
                }
            }
            if (calls.size() < call_ids.size()) std::cout << "]";
        } else if (!call_ids.empty()) {
            std::cout << "]";
        }
        std::cout << "\n[" << r->body.value("finish_reason", "?") << ", " << r->body["usage"].value("completion_tokens", 0)
                  << " tokens]" << std::endl;
    }
    return 0;
}

int cmd_plan(const CommonOptions & co, int64_t n_ctx, int64_t max_batch) {
    moesh::RunConfig rc = co.config.empty() ? moesh::RunConfig{} : moesh::load_run_config(co.config);
    apply_expert_budget(co, rc);
    const moesh::Model model = moesh::Model::load_path(co.model);
    // auto: f16, as both the cpu and the cuda plugin keep it (no plugin is loaded here)
    const int32_t kv_type = rc.kv_type >= 0 ? rc.kv_type : MOESH_DTYPE_F16;
    if (const std::string why = moesh::kv_type_problem(kv_type, model.config().head_dim); !why.empty()) throw Error(why);
    const moesh::ModelFootprint f = moesh::footprint_of(model, co.model, n_ctx, std::min(max_batch, n_ctx), kv_type);
    try {
        const moesh::PlacementPlan plan = moesh::plan_placement(f, rc.placement);
        std::printf("%s", moesh::describe_plan(f, plan).c_str());
    } catch (const moesh::PlacementError & e) {
        std::printf("%s", moesh::describe_plan(f, moesh::PlacementPlan{}).c_str());
        throw Error(std::string(co.config.empty() ? "--expert-budget" : co.config) + ": does not fit: " + e.what());
    }
    return 0;
}

int cmd_quantize(const std::string & in, const std::string & out, const std::string & type,
                 const std::map<std::string, std::string> & per_class, int threads) {
    moesh::QuantizePlan plan;
    auto target = [](const std::string & flag, const std::string & v) -> std::optional<moesh_dtype> {
        if (v.empty()) return std::nullopt;
        auto t = moesh::parse_quant_target(v);
        if (!t) throw Error(flag + ": unknown type '" + v + "' (supported: " + moesh::k_quant_targets + ")");
        return t;
    };
    plan.experts = plan.attention = plan.ffn = plan.embeddings = plan.output = target("--type", type);
    for (const auto & [cls, v] : per_class) {
        auto t = target("--" + cls, v);
        if (!t) continue;
        if (cls == "experts") plan.experts = t;
        else if (cls == "attention") plan.attention = t;
        else if (cls == "ffn") plan.ffn = t;
        else if (cls == "embeddings") plan.embeddings = t;
        else if (cls == "output") plan.output = t;
    }
    if (plan.empty()) throw Error("nothing to do: give --type or a per-class type (--experts, --attention, ...)");
    std::shared_ptr<const moesh::GgufFile> src;
    namespace fs = std::filesystem;
    if (is_gguf_path(in)) src = std::make_shared<const moesh::GgufFile>(in);
    moesh::Model model = load_model(in, plan, threads);
    if (!src) std::fprintf(stderr, "moesh: note: %s is not a GGUF file, so %s gets no tokenizer metadata\n", in.c_str(), out.c_str());
    moesh::write_model_gguf(model, out, src.get());
    std::fprintf(stderr, "moesh: wrote %s (%s)\n", out.c_str(), human_bytes(double(fs::file_size(out))).c_str());
    return 0;
}

int cmd_tokenize(const std::string & model, const std::string & text_arg, const std::string & file, bool add_special,
                 const std::string & output) {
    std::optional<moesh::Tokenizer> tok = find_tokenizer(model);
    if (!tok) throw Error(model + ": no tokenizer.json (give a model folder that has one, the file itself, or a .gguf file)");
    const std::string text = file.empty() ? text_arg : moesh::read_text_file(file, "the text file");
    const std::vector<int32_t> ids = tok->encode(text, add_special);
    if (output == "json") {
        nlohmann::json j;
        j["ids"] = ids;
        std::cout << j.dump() << std::endl;
    } else {
        for (size_t i = 0; i < ids.size(); ++i) {
            nlohmann::json piece = tok->token_text(ids[i]);
            std::cout << ids[i] << '\t' << piece.dump() << '\n';
        }
        std::cout << ids.size() << " tokens" << std::endl;
    }
    return 0;
}

// A GGUF file: metadata (arrays summarised), every tensor with its format, and expert sizes.
int inspect_gguf(const std::string & path) {
    moesh::GgufFile f(path);
    std::printf("file:          %s\n", path.c_str());
    std::printf("format:        GGUF v%u, alignment %u, %zu tensors, %zu metadata keys\n", f.version(), f.alignment(),
                f.tensors().size(), f.kvs().size());
    std::printf("\nmetadata:\n");
    for (const moesh::GgufKv & kv : f.kvs()) {
        const moesh::GgufValue & v = kv.value;
        std::string shown;
        switch (v.type) {
        case moesh::GgufValueType::String:
            shown = nlohmann::json(std::string(v.str.substr(0, 80)) + (v.str.size() > 80 ? "..." : "")).dump(
                -1, ' ', false, nlohmann::json::error_handler_t::replace);
            break;
        case moesh::GgufValueType::Array:
            shown = "array of " + std::to_string(v.array->size()) + " " +
                    std::string(moesh::gguf_value_type_name(v.array->type()));
            break;
        case moesh::GgufValueType::Bool: shown = v.u ? "true" : "false"; break;
        case moesh::GgufValueType::F32:
        case moesh::GgufValueType::F64: {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%g", v.f);
            shown = buf;
            break;
        }
        default: shown = v.is_integer() && v.type != moesh::GgufValueType::I8 && v.type != moesh::GgufValueType::I16 &&
                                 v.type != moesh::GgufValueType::I32 && v.type != moesh::GgufValueType::I64
                             ? std::to_string(v.u)
                             : std::to_string(v.i);
        }
        std::printf("  %-45.*s %s\n", int(kv.key.size()), kv.key.data(), shown.c_str());
    }
    std::printf("\ntensors (ne[0] first):\n");
    uint64_t total = 0, experts = 0;
    int64_t n_expert = 0;
    for (const moesh::GgufTensor & t : f.tensors()) {
        std::printf("  %-40.*s %-7.*s %s\n", int(t.name.size()), t.name.data(), int(moesh::ggml_type_name(t.type).size()),
                    moesh::ggml_type_name(t.type).data(), t.shape_string().c_str());
        total += t.n_bytes;
        if (t.n_dims == 3 && t.name.find("_exps.") != std::string_view::npos) {
            experts += t.n_bytes;
            n_expert = t.ne[2];
        }
    }
    std::printf("\nweights in all:   %s\n", human_bytes(double(total)).c_str());
    if (n_expert > 0)
        std::printf("routed experts:   %s in merged tensors of %lld experts each\n", human_bytes(double(experts)).c_str(),
                    (long long)n_expert);
    return 0;
}

int cmd_inspect(const CommonOptions & co) {
    if (!std::filesystem::is_directory(co.model)) return inspect_gguf(co.model); // a GGUF file, or its error
    moesh::Model model = moesh::Model::load_folder(co.model);
    const auto & c = model.config();
    std::printf("model:         %s\n", co.model.c_str());
    std::printf("architecture:  %s\n", moesh::arch_name(c.arch));
    std::printf("vocab:         %lld\n", (long long)c.n_vocab);
    std::printf("hidden:        %lld\n", (long long)c.n_embd);
    std::printf("layers:        %lld (%lld MoE)\n", (long long)c.n_layer, (long long)c.n_moe_layers());
    std::printf("heads:         %lld query, %lld key/value, head_dim %lld\n", (long long)c.n_head,
                (long long)c.n_head_kv, (long long)c.head_dim);
    if (c.n_expert > 0) {
        std::printf("experts:       %lld per MoE layer, top-%lld, ffn %lld, %s\n", (long long)c.n_expert,
                    (long long)c.n_expert_used, (long long)c.n_ff_expert,
                    c.norm_topk_prob ? "renormalised" : "not renormalised");
        if (c.n_ff_shared > 0) std::printf("shared expert: ffn %lld, sigmoid-gated\n", (long long)c.n_ff_shared);
    }
    if (c.n_ff > 0) std::printf("dense ffn:     %lld\n", (long long)c.n_ff);
    std::printf("rope:          %s, theta %g", moesh::rope_type_name(c.rope.type), c.rope.theta);
    if (c.rope.type != moesh::RopeType::Default) std::printf(", factor %g", c.rope.factor);
    std::printf("\nnorm eps:      %g\n", c.rms_eps);
    std::printf("max positions: %lld\n", (long long)c.max_positions);
    std::printf("tied embeds:   %s\n", c.tie_embeddings ? "yes" : "no");
    std::printf("\ntensors:\n");
    const auto & src = model.source();
    for (const auto & name : src.names()) {
        const moesh::SourceTensor * t = src.find(name);
        std::string shape = "[";
        for (size_t i = 0; i < t->shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t->shape[i]);
        shape += "]";
        std::printf("  %-60s %-5s %s\n", name.c_str(), t->dtype_name.c_str(), shape.c_str());
    }
    std::printf("\n");
    for (int64_t il = 0; il < c.n_layer; ++il) {
        size_t b = model.experts().bytes_per_expert(int32_t(il));
        if (b) {
            std::printf("bytes per expert: %s (layer %lld; every MoE layer alike)\n", human_bytes(double(b)).c_str(),
                        (long long)il);
            break;
        }
    }
    std::printf("routed experts:   %s in all (%lld experts)\n", human_bytes(double(model.experts().total_bytes())).c_str(),
                (long long)model.experts().n_present());
    std::printf("weights in all:   %s\n", human_bytes(double(model.weight_bytes())).c_str());
    std::printf("read per token:   %s (batch 1 decode)\n", human_bytes(double(model.active_bytes_per_token())).c_str());
    return 0;
}

// "a,b,,c" -> {"a", "b", "c"}
std::vector<std::string> split_list(const std::string & s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ','))
        if (!item.empty()) out.push_back(item);
    return out;
}

// Replays a routing trace through every cache policy at several cache sizes (fractions of all
// routed experts), beside Belady's optimum. config_path: a moesh TOML whose [placement] gives the
// heat decay (unless decay_given) and the pins of the tier the cache stands for: the host tier (the
// one `moesh run` caches disk reads in), or the first tier when there is no host tier.
// n_predicted: the prediction's ranks the lookahead policy is told per layer (-1: the router's k, as the
// run-time prefetch with prefetch_extra = 0; 0: none).
int cmd_sim(const std::string & trace_path, const std::string & sizes_arg, const std::string & policies_arg, double decay,
            bool decay_given, const std::string & config_path, const std::string & output, int64_t n_predicted,
            int64_t window, bool by_step) {
    const moesh::RouteTrace t = moesh::read_route_trace(trace_path);
    if (by_step && !t.has_steps)
        throw Error("--replay steps: " + trace_path + " does not say which tokens were computed together (no \"step\"); "
                    "write the trace again with this moesh, or use --replay tokens");
    int64_t n_moe = 0;
    for (bool m : t.moe_layers) n_moe += m ? 1 : 0;
    if (n_moe == 0 || t.tokens.empty()) throw Error(trace_path + ": the trace has no routed tokens (a dense model, or empty)");
    if (n_predicted < 0) n_predicted = t.n_expert_used;
    if (t.n_predicted > 0 && n_predicted > t.n_predicted)
        throw Error("--predicted " + std::to_string(n_predicted) + ": " + trace_path + " records " +
                    std::to_string(t.n_predicted) + " predicted experts per layer");
    if (t.n_predicted == 0) n_predicted = 0;
    const moesh::TraceReplay r = moesh::trace_requests(t, by_step, n_predicted);
    const std::vector<moesh::ExpertRequest> & reqs = r.requests;
    const std::vector<moesh::LayerPrediction> & preds = r.predictions;
    // How good the prediction is, token by token (as at batch 1).
    int64_t n_pred_right = 0, n_pred_visits = 0;
    for (size_t i = 0; i < t.tokens.size() && n_predicted > 0; ++i)
        for (int64_t l = 0; l < t.n_layer; ++l) {
            const int32_t * p = t.predicted_of(i, l);
            if (!t.moe_layers[size_t(l)] || !p) continue;
            const int32_t * e = t.experts_of(i, l);
            for (int64_t j = 0; j < n_predicted; ++j) n_pred_right += std::count(e, e + t.n_expert_used, p[j]);
            ++n_pred_visits;
        }
    const double pred_precision = n_pred_visits ? double(n_pred_right) / double(n_pred_visits * n_predicted) : 0.0;
    const double pred_recall = n_pred_visits ? double(n_pred_right) / double(n_pred_visits * t.n_expert_used) : 0.0;

    std::vector<double> sizes;
    for (const std::string & f : split_list(sizes_arg)) {
        const double v = std::stod(f);
        if (!(v > 0 && v <= 100)) throw Error("--sizes: " + f + " is not a percentage in (0, 100]");
        sizes.push_back(v);
    }
    std::vector<moesh::Policy> policies;
    for (const std::string & name : split_list(policies_arg)) {
        moesh::Policy p;
        if (!moesh::parse_policy(name, &p))
            throw Error("--policies: unknown policy '" + name + "' (static, lru, lfu, heat, lookahead, window, belady)");
        policies.push_back(p);
    }
    const int64_t total = n_moe * t.n_expert;
    if (window < 0) window = n_moe;   // the next token's routing, known one token ahead
    auto capacity = [&](double pct) { return std::max<int64_t>(1, int64_t(std::llround(pct / 100.0 * double(total)))); };

    // Pins on the cache's tier are its; pins on other tiers do not change what it holds.
    std::vector<int64_t> pins;
    nlohmann::json config_json;
    std::string config_line;
    if (!config_path.empty()) {
        const moesh::PlacementConfig pc = moesh::load_run_config(config_path).placement;
        if (!decay_given) decay = pc.heat_decay;
        std::string tier = pc.tiers.empty() ? "" : pc.tiers.front().name;
        for (const moesh::TierConfig & tc : pc.tiers)
            if (tc.kind == moesh::TierKind::Host) tier = tc.name;
        try {
            pins = moesh::pinned_expert_keys(pc, tier, t.moe_layers, t.n_expert);
        } catch (const moesh::PlacementError & e) {
            throw Error(config_path + ": " + e.what() + "; trace " + trace_path + " is of model " + t.model);
        }
        char buf[64];
        for (double pct : sizes)
            if (int64_t(pins.size()) > capacity(pct)) {
                std::snprintf(buf, sizeof buf, "%g%%", pct);
                throw Error(config_path + ": the pins on tier '" + tier + "' name " + std::to_string(pins.size()) +
                            " experts, more than a cache of " + buf + " (" + std::to_string(capacity(pct)) + " of " +
                            std::to_string(total) + " routed experts) holds; pass larger --sizes or pin fewer experts");
            }
        size_t elsewhere = 0;
        for (const moesh::PinConfig & p : pc.pins) elsewhere += p.tier != tier ? 1 : 0;
        std::snprintf(buf, sizeof buf, "%g", pc.heat_decay);
        config_line = "config " + config_path + ": [placement] policy " + pc.policy + ", heat decay " + buf + "; " +
                      std::to_string(pins.size()) + " experts pinned" + (tier.empty() ? "" : " on tier '" + tier + "'") +
                      (elsewhere ? " (pins on other tiers left out: " + std::to_string(elsewhere) + ")" : "");
        config_json = {{"path", config_path}, {"policy", pc.policy}, {"heat_decay", pc.heat_decay}, {"tier", tier},
                       {"pinned", pins.size()}};
    }

    nlohmann::json rows = nlohmann::json::array();
    if (output == "text") {
        std::printf("trace %s: model %s, %zu tokens, %lld MoE layers x %lld experts (top-%lld), %zu requests (%s)\n",
                    trace_path.c_str(), t.model.c_str(), t.tokens.size(), (long long)n_moe, (long long)t.n_expert,
                    (long long)t.n_expert_used, reqs.size(),
                    by_step ? ("replayed by forward pass: " + std::to_string(r.n_steps) + " steps, each expert once per step")
                                  .c_str()
                            : "replayed token by token");
        if (!config_line.empty()) std::printf("%s\n", config_line.c_str());
        if (n_predicted > 0)
            std::printf("prefetch prediction (top-%lld of the next layer's router, per token): precision %.4f, recall %.4f "
                        "over %lld layer visits\n", (long long)n_predicted, pred_precision, pred_recall, (long long)n_pred_visits);
        else
            std::printf("no predictions in this trace (or --predicted 0): lookahead uses its reuse counts alone\n");
        std::printf("%-8s", "cache");
        for (moesh::Policy p : policies) std::printf(" %9s", moesh::policy_name(p));
        std::printf("   (hit rate; cache = share of all routed experts)\n");
    }
    for (double pct : sizes) {
        const int64_t cap = capacity(pct);
        if (output == "text") std::printf("%5.1f%%  ", pct);
        for (moesh::Policy p : policies) {
            moesh::PolicyParams pp;
            pp.policy = p;
            pp.heat_decay = decay;
            pp.pinned = pins;
            pp.window = window;
            if (p == moesh::Policy::Static && pins.empty()) pp.pinned = moesh::most_used_experts(reqs, int32_t(t.n_expert), cap);
            const moesh::CacheStats st =
                moesh::simulate_cache(reqs, int32_t(t.n_expert), int32_t(t.n_expert_used), cap, pp, preds.empty() ? nullptr : &preds);
            if (output == "text") std::printf(" %9.4f", st.hit_rate());
            rows.push_back({{"cache_percent", pct}, {"cache_experts", cap}, {"policy", moesh::policy_name(p)},
                            {"hit_rate", st.hit_rate()}, {"hits", st.hits}, {"requests", st.requests}, {"loads", st.loads},
                            {"evictions", st.evictions}});
            if (p == moesh::Policy::Window) rows.back()["window"] = window;
        }
        if (output == "text") std::printf("\n");
    }
    if (output == "text" && std::find(policies.begin(), policies.end(), moesh::Policy::Window) != policies.end())
        std::printf("window: an oracle that knows the next %lld layer visits' routing (not an online policy)\n",
                    (long long)window);
    if (output == "json") {
        nlohmann::json j{{"trace", trace_path}, {"model", t.model}, {"tokens", t.tokens.size()}, {"heat_decay", decay},
                         {"replay", by_step ? "steps" : "tokens"}, {"steps", r.n_steps}, {"results", rows}};
        if (!config_json.is_null()) j["config"] = config_json;
        if (n_predicted > 0)
            j["prediction"] = {{"ranks", n_predicted}, {"precision", pred_precision}, {"recall", pred_recall}, {"visits", n_pred_visits}};
        std::cout << j.dump() << std::endl;
    } else if (pins.empty()) {
        std::printf("static: the most used experts of this trace pinned (the best frequency rule); heat decay %.3g per "
                    "token; lookahead: heat with reuse counts and the prediction of the next layer; belady: the offline "
                    "optimum\n", decay);
    } else {
        std::printf("every policy keeps the config's %zu pinned experts resident, static keeps only them; heat decay %.3g "
                    "per token; belady: the offline optimum with the same pins\n", pins.size(), decay);
    }
    return 0;
}

// Draws a routing trace as an SVG heat map of expert activations per layer.
int cmd_heatmap(const std::string & trace_path, const std::string & output) {
    const moesh::RouteTrace t = moesh::read_route_trace(trace_path);
    int64_t n_moe = 0;
    for (bool m : t.moe_layers) n_moe += m ? 1 : 0;
    if (n_moe == 0 || t.tokens.empty())
        throw Error(trace_path + ": the trace has no routed tokens (a dense model, or empty); nothing to draw");
    const moesh::ExpertActivations a = moesh::count_activations(t);
    moesh::write_heatmap_svg(a, output);
    std::printf("wrote %s: expert activations of %zu tokens of %s, %lld layers x %lld experts\n", output.c_str(),
                t.tokens.size(), t.model.c_str(), (long long)t.n_layer, (long long)t.n_expert);
    return 0;
}

// The model shipped with moesh (models/moesh-tiny-py), found next to the executable: the
// source tree of a build (<exe>/../../models) or an install (<exe>/../share/moesh/models).
// Empty when it is in neither place.
std::string shipped_model() {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (ec) return {};
    for (const fs::path & p : {exe.parent_path() / "../../models/moesh-tiny-py", exe.parent_path() / "../share/moesh/models/moesh-tiny-py"})
        if (fs::exists(p / "config.json", ec)) return fs::weakly_canonical(p, ec).string();
    return {};
}

void add_common(CLI::App * sub, CommonOptions & co, bool model_optional = false) {
    auto * m = sub->add_option("-m,--model", co.model,
                               model_optional ? "Hugging Face model folder (config.json + *.safetensors), or a .gguf file "
                                                "(default: moesh-tiny-py, the small Python-code model shipped in models/)"
                                              : "Hugging Face model folder (config.json + *.safetensors), or a .gguf file");
    if (!model_optional) m->required();
    sub->add_option("--config", co.config, "moesh TOML settings (plugins, threads, batching); see configs/default.toml");
    sub->add_option("--plugin-dir", co.plugin_dir,
                    "Folder with backend plugins (libmoesh_backend_*.so); searched before $MOESH_PLUGIN_DIR, the "
                    "config's [plugins].dirs and <exe>/../lib/moesh");
    sub->add_option("--backend", co.backend, "Backend plugin to use by name (default: the highest-scoring one)");
    sub->add_option("-t,--threads", co.threads, "Worker threads of the backend (default: config, else all cores)")
        ->check(CLI::Range(0, 1024));
    sub->add_flag("-v,--verbose", co.verbose, "Say which plugins were found and why one was chosen");
    sub->add_option("--activations", co.activations,
                    "How quantized weights see activations: fast (8 bits per value, as llama.cpp) or precise "
                    "(two 8-bit passes: ~100x less rounding error, slower); default: config, else fast")
        ->check(CLI::IsMember({"fast", "precise"}));
    sub->add_option("--expert-budget", co.expert_budget,
                    "Host memory for routed experts, e.g. 1.5GiB: the rest are read from the model file on demand "
                    "(O_DIRECT) into that many expert slots, evicted by the [placement] policy (default lookahead) and "
                    "prefetched from the next layer's router. Same as a host [[tier]] of that budget plus a disk tier; "
                    "`moesh plan` shows the split. Output is unchanged, only speed");
    sub->add_flag("--stats", co.stats,
                  "After the run, print the expert cache's hits, misses, prefetch precision/recall, bytes read from "
                  "disk and time stalled (always in --output json when a budget is set)");
    sub->add_option("--kv-type", co.kv_type,
                    "KV cache elements: f16 (half the memory and half the bytes attention reads, as llama.cpp keeps "
                    "it; logits move by a few 1e-4), q8_0 (8.5 bits a value, 0.53 of f16's memory, as llama.cpp's "
                    "--cache-type-k/v q8_0; the cpu plugin offers it, for a head_dim that is a multiple of 32), f32, "
                    "or auto: f16 where the backend offers it (the cpu and cuda plugins do); default: [runtime] "
                    "kv_type, else auto")
        ->check(CLI::IsMember({"auto", "f32", "f16", "q8_0"}));
    sub->add_flag("--no-repack", co.no_repack,
                  "Keep quantized weights in the file's layout instead of repacking them at load into the backend's "
                  "faster one (which takes a second copy of them in memory); also [runtime] repack = false");
}

} // namespace

int main(int argc, char ** argv) {
    if (const char * level = std::getenv("MOESH_LOG")) {
        if (std::string_view(level) == "debug") {
            g_debug = true;
            moesh::set_plugin_log_level(MOESH_LOG_DEBUG);
        } else if (*level && std::string_view(level) != "info") {
            std::fprintf(stderr, "moesh: warning: MOESH_LOG=%s is not a level moesh knows (debug, info); ignored\n", level);
        }
    }
    CLI::App app{"moesh: Mixture-of-Experts inference that places experts by measured heat.\n"
                 "Runs Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and dense Llama\n"
                 "on backend plugins (cpu always; cuda when built).",
                 "moesh"};
    app.require_subcommand(1);
    app.footer("Examples:\n"
               "  moesh inspect --model tests/fixtures/mixtral_top2\n"
               "  moesh run --model tests/fixtures/mixtral_top2 --prompt-ids 1,2,3 -n 16\n"
               "  moesh run --model tests/fixtures/llama_gqa_tied --prompt \"Hello\" -n 16\n"
               "  moesh tokenize --model tests/fixtures/tokenizers/qwen2 --text \"Hello world\" --output json\n"
               "  moesh run --model DIR --prompt-ids 1,2,3 -n 64 --temperature 0.8 --top-p 0.95 --seed 7 --output json\n"
               "Plugins: --plugin-dir, then $MOESH_PLUGIN_DIR (colon-separated), then [plugins].dirs of --config,\n"
               "then <exe>/../lib/moesh. `moesh run -v` says which were found and why one was chosen.\n"
               "Logging: MOESH_LOG=debug also prints every cost-model decision of a gpu tier (promote or compute\n"
               "in place, with both estimates) and the plugins' debug messages.");
    app.set_version_flag("--version", "moesh 0.1.0");

    CommonOptions co;
    std::string prompt_ids, output = "text", dump_logits, trace_path;
    int64_t n = 16;
    moesh::SamplerParams sampling;

    CLI::App * run = app.add_subcommand("run", "Generate tokens from a prompt of token ids");
    add_common(run, co, /*model_optional=*/true);
    std::string prompt_text;
    auto * ids_opt = run->add_option("--prompt-ids", prompt_ids, "Comma-separated prompt token ids, e.g. 1,2,3");
    auto * text_opt = run->add_option("-p,--prompt", prompt_text,
                                      "Prompt text, encoded with the model folder's tokenizer.json (BOS as its "
                                      "post-processor adds it); the generated text is streamed");
    ids_opt->excludes(text_opt);
    ChatOptions chat;
    run->add_flag("--chat", chat.enabled,
                  "Treat --prompt as a user message and apply the model's chat template (the GGUF's or "
                  "tokenizer_config.json's Jinja, rendered as transformers renders it); stops at the end of the turn");
    run->add_option("--chat-template", co.chat_template, "A Jinja chat template file to use instead of the model's");
    run->add_option("--system", chat.system, "System message for --chat");
    run->callback([&]() {
        if (prompt_ids.empty() && prompt_text.empty()) throw CLI::ValidationError("--prompt or --prompt-ids is required");
    });
    run->add_option("-n,--n-predict", n, "Tokens to generate")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 30));
    add_sampling(run, sampling);
    GrammarOptions run_grammar;
    add_grammar_options(run, run_grammar);
    run->add_option("--output", output, "text, or json: one JSON object on the last line of stdout")
        ->check(CLI::IsMember({"text", "json"}));
    run->add_option("--dump-logits", dump_logits,
                    "Write float32 logits of every prompt position and generated step to this .npy file "
                    "[n_prompt + n - 1, n_vocab]");
    run->add_option("--trace", trace_path,
                    "Write the routing trace to this file: per token and layer the chosen experts and their weights, "
                    "as JSON lines (format in runtime/route_trace.h); the input of moesh's placement work");

    CLI::App * sim = app.add_subcommand("sim", "Replay a routing trace (moesh run/perplexity --trace) through the "
                                                "expert cache policies and print their hit rates beside Belady's");
    std::string sim_trace, sim_sizes = "25,50,75", sim_policies = "static,lru,lfu,heat,lookahead,belady", sim_output = "text";
    double sim_decay = 0.95;
    int64_t sim_predicted = -1, sim_window = -1;
    std::string sim_config;
    sim->add_option("--trace", sim_trace, "Routing trace (JSON lines)")->required();
    sim->add_option("--sizes", sim_sizes, "Cache sizes as percentages of all routed experts, comma-separated")
        ->capture_default_str();
    sim->add_option("--policies", sim_policies, "Policies to compare: static, lru, lfu, heat, lookahead, window, belady")
        ->capture_default_str();
    sim->add_option("--window", sim_window,
                    "The window yardstick: how many layer visits ahead its oracle sees (default: the trace's MoE "
                    "layers, one token)")
        ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
    sim->add_option("--predicted", sim_predicted,
                    "Lookahead: how many of the trace's ranked predicted experts per layer it is told, as the run-time "
                    "prefetch predicts k + prefetch_extra (default: the router's k; 0: none)")
        ->check(CLI::Range(int64_t(0), int64_t(65536)));
    auto * sim_decay_opt = sim->add_option("--decay", sim_decay,
                                           "Heat policy: decay of an expert's count per token (default: --config's "
                                           "[placement] heat_decay, else 0.95)")
                               ->check(CLI::Range(1e-6, 1.0));
    sim->add_option("--config", sim_config,
                    "moesh TOML settings (configs/placement.toml): its [placement] heat_decay, and its "
                    "[[placement.pin]] experts on the first [[tier]], which every policy then keeps resident (static "
                    "keeps only them; they must fit in every --sizes)");
    sim->add_option("--output", sim_output, "text, or json: one JSON object on the last line")->check(CLI::IsMember({"text", "json"}));
    std::string sim_replay = "tokens";
    sim->add_option("--replay", sim_replay,
                    "tokens: every token visits each layer alone (decoding one token at a time); steps: the tokens of "
                    "one forward pass visit together and each expert they want counts once, as the engine fetched it "
                    "(needs a trace with \"step\", written by moesh run/perplexity since it was added)")
        ->check(CLI::IsMember({"tokens", "steps"}))
        ->capture_default_str();

    CLI::App * heatmap = app.add_subcommand("heatmap", "Draw a routing trace (moesh run/perplexity --trace) as an SVG heat "
                                                        "map: per layer, how often the router chose each expert");
    std::string hm_trace, hm_output;
    heatmap->add_option("--trace", hm_trace, "Routing trace (JSON lines, runtime/route_trace.h)")->required();
    heatmap->add_option("-o,--output", hm_output,
                        "SVG file to write (one picture, no external files); in a browser, hovering a cell shows its "
                        "layer, expert, tokens and share")
        ->required();
    heatmap->footer("Layers run down, experts across; a cell's colour is the expert's share of its layer's activations "
                    "(dark: rarely chosen, light: often). Dense layers are grey.\n"
                    "Example:\n"
                    "  moesh run --prompt \"def fibonacci(n):\" -n 64 --trace trace.jsonl\n"
                    "  moesh heatmap --trace trace.jsonl --output heatmap.svg");

    CLI::App * tokenize = app.add_subcommand("tokenize", "Turn text into token ids with a model's tokenizer.json or GGUF");
    std::string tok_model, tok_text, tok_file, tok_output = "text";
    bool tok_add_special = false;
    tokenize->add_option("-m,--model", tok_model,
                         "Model folder with tokenizer.json, a tokenizer.json file, or a .gguf file (its tokenizer metadata)")
        ->required();
    auto * tt = tokenize->add_option("--text", tok_text, "Text to tokenize");
    auto * tf = tokenize->add_option("--file", tok_file, "File whose contents to tokenize");
    tt->excludes(tf);
    tokenize->add_flag("--add-special", tok_add_special,
                       "Add BOS/special tokens as the tokenizer's post-processor (or the GGUF's add_bos_token) does");
    tokenize->add_option("--output", tok_output, "text (id and piece per line), or json: {\"ids\": [...]} on the last line")
        ->check(CLI::IsMember({"text", "json"}));
    tokenize->callback([&]() {
        if (tok_text.empty() && tok_file.empty() && !*tt) throw CLI::ValidationError("--text or --file is required");
    });

    CLI::App * grammar_cmd = app.add_subcommand(
        "grammar", "Print the GBNF grammar a JSON Schema becomes, check a text against a grammar, or write random texts "
                   "it matches (what `run --grammar`, and the server's grammar, json_schema and response_format, use)");
    GrammarOptions gr_opts;
    std::string gr_check;
    int64_t gr_sample = 0, gr_max_bytes = 4096;
    uint64_t gr_seed = 0;
    add_grammar_options(grammar_cmd, gr_opts);
    grammar_cmd->add_option("--check", gr_check,
                            "A text file: exit 0 if the grammar matches it whole, else 1 with the byte offset, line and column "
                            "where it stops matching");
    grammar_cmd->add_option("--sample", gr_sample, "Write this many random texts the grammar matches, one JSON string per line")
        ->check(CLI::Range(int64_t(0), int64_t(100000)));
    grammar_cmd->add_option("--seed", gr_seed, "Seed for --sample")->capture_default_str();
    grammar_cmd->add_option("--max-bytes", gr_max_bytes, "Longest text --sample writes (longer ones are drawn again)")
        ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
    grammar_cmd->callback([&]() {
        if (!gr_opts.any()) throw CLI::ValidationError("--grammar, --json-schema or --json-object is required");
    });

    CLI::App * inspect = app.add_subcommand("inspect", "Show architecture, hyper-parameters, tensors and expert sizes");
    CommonOptions ico;
    inspect->add_option("-m,--model", ico.model, "Hugging Face model folder, or a .gguf file")->required();

    CLI::App * serve = app.add_subcommand(
        "serve", "Serve requests over ZeroMQ and HTTP (OpenAI-compatible /v1/completions, /v1/chat/completions, "
                 "/v1/models, /health, /metrics; docs/PROTOCOL.md) with continuous batching; settings in [server] of "
                 "--config (configs/serve.toml). Prints the bound ZeroMQ endpoint, then the HTTP URL, on stdout once "
                 "ready. SIGTERM stops accepting, drains running requests, and exits. Beyond loopback, set curve_secret_key "
                 "(and curve_authorized_keys) and api_key_file (docs/PROTOCOL.md, Security); SIGHUP reads those key "
                 "files again");
    CommonOptions sco;
    add_common(serve, sco, /*model_optional=*/true);
    serve->add_option("--chat-template", sco.chat_template,
                      "A Jinja chat template file for /v1/chat/completions and `messages`, instead of the model's");
    std::string serve_endpoint, serve_http;
    serve->add_option("--endpoint", serve_endpoint, "ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555 (default: [server] endpoint)");
    serve->add_option("--http", serve_http,
                      "HTTP address for the OpenAI-compatible API, /health and /metrics, e.g. 127.0.0.1:8090 (port 0: a free "
                      "one), or off (default: [server] http, else 127.0.0.1:8090)");

    CLI::App * client = app.add_subcommand("client", "Send one request to `moesh serve` and print the answer");
    std::string cl_endpoint = "tcp://127.0.0.1:5555", cl_prompt, cl_ids, cl_output = "text";
    int64_t cl_max = 64;
    moesh::SamplerParams cl_sampling;
    int cl_logprobs = -1, cl_priority = 0;
    bool cl_stream = false;
    double cl_timeout = 120;
    client->add_option("--endpoint", cl_endpoint, "The server's endpoint")->capture_default_str();
    auto * clp = client->add_option("-p,--prompt", cl_prompt, "Prompt text (the server tokenizes it)");
    auto * cli = client->add_option("--prompt-ids", cl_ids, "Comma-separated prompt token ids instead");
    clp->excludes(cli);
    client->add_option("-n,--max-tokens", cl_max, "Tokens to generate")->capture_default_str();
    add_sampling(client, cl_sampling);
    client->add_option("--logprobs", cl_logprobs,
                       "Ask for each token's log-probability and this many of the most likely tokens (0-20; see them "
                       "with --output json)")
        ->check(CLI::Range(0, 20));
    client->add_option("--priority", cl_priority,
                       "Lower runs first (-1000 to 1000): the server's queue is in priority order, and a request that finds no "
                       "room preempts running requests of a worse priority")
        ->check(CLI::Range(-1000, 1000))
        ->capture_default_str();
    client->add_flag("--stream", cl_stream, "Print tokens as they are generated");
    GrammarOptions cl_grammar;
    add_grammar_options(client, cl_grammar);
    ChatOptions cl_chat;
    client->add_flag("--chat", cl_chat.enabled, "Send the prompt as a user's message, through the model's chat template");
    client->add_option("--system", cl_chat.system, "With --chat: a system message first");
    client->add_option("--tools", cl_chat.tools_file,
                       "With --chat: a JSON file of tools the model may call (OpenAI's [{\"type\": \"function\", \"function\": "
                       "{\"name\", \"description\", \"parameters\"}}]); calls print as [call NAME ARGUMENTS]")
        ->check(CLI::ExistingFile);
    client->add_option("--tool-choice", cl_chat.tool_choice, "With --tools: auto (default), none, required, or a tool's name (it must call it)");
    client->add_option("--output", cl_output, "text, or json: the frames as JSON lines")->check(CLI::IsMember({"text", "json"}));
    client->add_option("--timeout", cl_timeout, "Seconds to wait for the answer")->capture_default_str();
    std::string cl_server_key, cl_client_cert;
    client->add_option("--server-key", cl_server_key,
                       "A server with CURVE (curve_secret_key): its public key, as 40 Z85 characters or its NAME.key certificate file");
    client->add_option("--client-cert", cl_client_cert,
                       "With --server-key: this client's NAME.key_secret certificate (`moesh keygen`), for a server that lets in "
                       "only listed keys (curve_authorized_keys); without it a fresh key pair is used");

    CLI::App * keygen = app.add_subcommand(
        "keygen", "Make a CURVE key pair for `moesh serve` or a client: writes NAME.key (the public certificate, to give to "
                  "the other side) and NAME.key_secret (mode 0600, keep it private), in the format CZMQ and pyzmq use");
    std::string kg_name, kg_dir = ".";
    keygen->add_option("name", kg_name, "The certificates' file name, e.g. server or client-alice")->required();
    keygen->add_option("--dir", kg_dir, "The folder to write them in")->capture_default_str();

    CLI::App * plan = app.add_subcommand(
        "plan", "Print where every expert, the attention weights and the KV cache will live under the [[tier]] budgets of "
                "--config (or --expert-budget), and what does not fit and why, before any weight is read");
    CommonOptions plco;
    int64_t plan_ctx = 4096, plan_batch = 64;
    plan->add_option("-m,--model", plco.model, "Hugging Face model folder or .gguf file")->required();
    plan->add_option("--config", plco.config, "moesh TOML with [[tier]] and [placement] (see configs/placement.toml)");
    plan->add_option("--expert-budget", plco.expert_budget, "Instead of --config's tiers: host memory for experts, e.g. 1.5GiB");
    plan->add_option("--kv-type", plco.kv_type,
                     "KV cache elements the plan sizes it in: f32, f16, q8_0 or auto (planned as f16; default: config, else auto)")
        ->check(CLI::IsMember({"auto", "f32", "f16", "q8_0"}));
    plan->add_option("-c,--ctx", plan_ctx, "Context length the KV cache is sized for")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 24));
    plan->add_option("-b,--batch", plan_batch, "Tokens per forward step (activation buffers)")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));

    CLI::App * ppl = app.add_subcommand(
        "perplexity", "Perplexity of a text file, defined as llama.cpp's perplexity tool defines it (so they compare)");
    CommonOptions pco;
    add_common(ppl, pco);
    std::string ppl_file, ppl_output = "text";
    int64_t ppl_ctx = 512, ppl_batch = 512, ppl_chunks = -1;
    ppl->add_option("-f,--file", ppl_file, "Text file to score (needs at least 2 x --ctx tokens)")->required();
    ppl->add_option("-c,--ctx", ppl_ctx, "Tokens per chunk; the second half of each is scored")
        ->capture_default_str()->check(CLI::Range(int64_t(4), int64_t(1) << 24));
    ppl->add_option("-b,--batch", ppl_batch, "Tokens per forward step")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 24));
    ppl->add_option("--chunks", ppl_chunks, "Score at most this many chunks (default: all)");
    std::string ppl_trace;
    ppl->add_option("--trace", ppl_trace,
                    "Write the routing trace of every evaluated token to this file (JSON lines, runtime/route_trace.h)");
    ppl->add_option("--output", ppl_output, "text, or json: one JSON object on the last line of stdout")
        ->check(CLI::IsMember({"text", "json"}));

    CLI::App * quant = app.add_subcommand(
        "quantize", "Write a model (Hugging Face folder or GGUF with f32/f16/bf16 weights) as a quantized GGUF file");
    std::string q_in, q_out, q_type;
    std::map<std::string, std::string> q_class;
    int q_threads = 0;
    quant->add_option("input", q_in, "Hugging Face model folder or .gguf file")->required();
    quant->add_option("output", q_out, "GGUF file to write (llama.cpp's layout and names)")->required();
    quant->add_option("--type", q_type, "Type for every matrix (q8_0, q4_0, q4_1); routers, norms and biases stay as they are");
    for (const char * cls : {"experts", "attention", "ffn", "embeddings", "output"})
        quant->add_option(std::string("--") + cls, q_class[cls], std::string("Type for the ") + cls + " matrices, overriding --type");
    quant->add_option("-t,--threads", q_threads, "Threads (default: all cores)")->check(CLI::Range(0, 1024));

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError & e) {
        return app.exit(e);
    }
    try {
        if (*run && co.model.empty()) {
            co.model = shipped_model();
            if (co.model.empty())
                throw Error("no --model given, and the shipped model (models/moesh-tiny-py) is not next to this "
                            "executable; pass --model DIR_OR.gguf");
            std::fprintf(stderr, "moesh: no --model given: using the shipped model %s\n", co.model.c_str());
        }
        if (*run) return cmd_run(co, prompt_ids, prompt_text, n, sampling, output, dump_logits, trace_path, chat, run_grammar);
        if (*grammar_cmd) return cmd_grammar(gr_opts, gr_check, gr_sample, gr_seed, gr_max_bytes);
        if (*tokenize) return cmd_tokenize(tok_model, tok_text, tok_file, tok_add_special, tok_output);
        if (*inspect) return cmd_inspect(ico);
        if (*quant) return cmd_quantize(q_in, q_out, q_type, q_class, q_threads);
        if (*sim)
            return cmd_sim(sim_trace, sim_sizes, sim_policies, sim_decay, sim_decay_opt->count() > 0, sim_config, sim_output,
                           sim_predicted, sim_window, sim_replay == "steps");
        if (*heatmap) return cmd_heatmap(hm_trace, hm_output);
        if (*plan) return cmd_plan(plco, plan_ctx, plan_batch);
        if (*serve) {
            if (sco.model.empty()) sco.model = shipped_model();
            if (sco.model.empty()) throw Error("no --model given and the shipped model was not found next to the executable");
            return cmd_serve(sco, serve_endpoint, serve_http);
        }
        if (*client) {
            if (cl_prompt.empty() && cl_ids.empty()) throw Error("client: give --prompt or --prompt-ids");
            if (!cl_chat.enabled && (!cl_chat.system.empty() || !cl_chat.tools_file.empty() || !cl_chat.tool_choice.empty()))
                throw Error("client: --system, --tools and --tool-choice go with --chat");
            if (cl_chat.enabled && !cl_ids.empty()) throw Error("client: --chat sends text: give --prompt, not --prompt-ids");
            if (!cl_client_cert.empty() && cl_server_key.empty()) throw Error("client: --client-cert goes with --server-key");
            moesh::CurveClientKeys curve;
            if (!cl_server_key.empty()) curve.server_public = curve_key_arg(cl_server_key, false, "--server-key");
            if (!cl_client_cert.empty()) curve.client_secret = curve_key_arg(cl_client_cert, true, "--client-cert");
            return cmd_client(cl_endpoint, cl_prompt, cl_ids, cl_max, cl_sampling, cl_logprobs, cl_priority, cl_stream, cl_output, cl_timeout,
                              cl_grammar, cl_chat, curve);
        }
        if (*keygen) {
            const moesh::security::CurveCert cert = moesh::security::new_curve_cert();
            const auto [pub, sec] = moesh::security::write_curve_cert(kg_dir, kg_name, cert);
            std::fprintf(stderr, "moesh: wrote %s (public) and %s (secret, mode 0600)\n", pub.c_str(), sec.c_str());
            std::printf("%s\n", cert.public_key.c_str());
            return 0;
        }
        if (*ppl) return cmd_perplexity(pco, ppl_file, ppl_ctx, ppl_batch, ppl_chunks, ppl_output, ppl_trace);
    } catch (const moesh::BackendError & e) {
        std::fprintf(stderr, "moesh: error: %s\n", e.what());
        return 1;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "moesh: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
