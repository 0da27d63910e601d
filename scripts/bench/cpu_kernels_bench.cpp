// CPU backend kernels at Mixtral-moe-mid shapes (n_embd 2048, n_ff 5632),
// through the real plugin (dlopen), for every weight dtype the plugin offers,
// in the file's layout and, where the plugin packs the dtype, packed
// ("layout": "file" / "packed"):
//   matvec   one token through W [n_ff, n_embd]           (decode GEMV)
//   matmul   128 tokens through the same W                (prefill GEMM)
//   moe      top-2 of 8 experts: one token (decode), and 128 tokens routed
//            evenly, 32 per expert (prefill), and 16 tokens, 4 per expert, with the
//            weights from DRAM (a serving step of 16 sequences), through expert_ffn calls
//
//   cpu_kernels_bench [--threads 1,2] [--types q4_0,q4_K] [--probe-gib 1] [--seconds 1] [--plugin path.so]
//
// Prints one JSON object per line: {"bench": ..., "metric": ..., "value": ...,
// "threads": ..., "dtype": ..., "layout": ...}, metrics weight_gb_per_s (weight bytes streamed
// per second), gflop_per_s, fraction_of_probe_bandwidth (of the read bandwidth
// measured in the same run) and microseconds_per_call.
// Decode weights rotate over enough copies (>= 512 MiB) that every call reads
// them from DRAM, as a decode step reads experts it has not touched for a while.
// Built as moesh_bench_cpu_kernels by scripts/bench/CMakeLists.txt.
#include "bandwidth_probe.h"

#include <moesh/plugin.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Backend {
    const moesh_backend_iface * be = nullptr;
    moesh_backend * ctx = nullptr;
};

void emit(const char * bench, const char * metric, double value, const std::string & extra) {
    std::printf("{\"bench\": \"%s\", \"metric\": \"%s\", \"value\": %.6g%s%s}\n", bench, metric, value,
                extra.empty() ? "" : ", ", extra.c_str());
    std::fflush(stdout);
}

struct DtypeInfo {
    moesh_dtype type;
    const char * name;
    int64_t block_elems;   // 1 for the element types
    size_t block_bytes;
};

const DtypeInfo k_dtypes[] = {
    {MOESH_DTYPE_F32, "f32", 1, 4},         {MOESH_DTYPE_F16, "f16", 1, 2},
    {MOESH_DTYPE_BF16, "bf16", 1, 2},       {MOESH_DTYPE_Q8_0, "q8_0", 32, 34},
    {MOESH_DTYPE_Q4_0, "q4_0", 32, 18},     {MOESH_DTYPE_Q4_1, "q4_1", 32, 20},
    {MOESH_DTYPE_Q4_K, "q4_K", 256, 144},   {MOESH_DTYPE_Q5_K, "q5_K", 256, 176},
    {MOESH_DTYPE_Q6_K, "q6_K", 256, 210},
};

size_t matrix_bytes(const DtypeInfo & t, int64_t n_rows, int64_t n_cols) {
    return size_t(n_rows) * size_t(n_cols / t.block_elems) * t.block_bytes;
}

// Copies of one weight matrix, filled with small non-zero values (zero pages
// would not be read from DRAM at all).
std::vector<std::vector<uint8_t>> make_copies(size_t n_bytes, size_t min_total) {
    const size_t n_copies = (min_total + n_bytes - 1) / n_bytes;
    std::vector<std::vector<uint8_t>> copies(n_copies, std::vector<uint8_t>(n_bytes));
    uint32_t state = 12345;
    for (auto & c : copies) {
        // 0x3a00-ish bit patterns: small finite values in f16, bf16 and f32
        // alike, and finite fp16 block scales (every block size is even).
        for (size_t i = 0; i < n_bytes; i += 2) {
            state = state * 1664525u + 1013904223u;
            const uint16_t v = uint16_t(0x3a00 | (state >> 24));
            std::memcpy(&c[i], &v, 2);
        }
    }
    return copies;
}

// Seconds per call of f(), from trials of ~20 ms over `seconds` in all (after
// a warm-up call): the 10th percentile of the trials' times. Other processes
// only ever slow a trial down, so a fast trial is the machine's speed; not the
// very fastest, which a clock hiccup in a VM can make absurd.
template <class F>
double time_per_call(double seconds, F && f) {
    using clock = std::chrono::steady_clock;
    f();
    auto t = clock::now();
    f();
    const double one = std::chrono::duration<double>(clock::now() - t).count();
    const int64_t n_per_trial = std::max<int64_t>(1, int64_t(0.02 / std::max(one, 1e-9)));
    std::vector<double> trials;
    const auto t_end = clock::now() + std::chrono::duration<double>(seconds);
    while (clock::now() < t_end || trials.size() < 5) {
        t = clock::now();
        for (int64_t i = 0; i < n_per_trial; ++i) {
            f();
        }
        trials.push_back(std::chrono::duration<double>(clock::now() - t).count() / double(n_per_trial));
    }
    std::sort(trials.begin(), trials.end());
    return trials[trials.size() / 10];
}

void check(moesh_status st, const Backend & b, const char * what) {
    if (st != MOESH_OK) {
        std::fprintf(stderr, "%s failed (%d): %s\n", what, int(st), b.be->last_error(b.ctx));
        std::exit(1);
    }
}

} // namespace

int main(int argc, char ** argv) {
    std::vector<int> threads = {1, 2};
    double probe_gib = 1.0;
    double seconds = 1.0;
    std::string types;   // ",q4_0,q4_K," or empty for all
#ifdef MOESH_PLUGIN_BUILD_DIR
    std::string plugin = MOESH_PLUGIN_BUILD_DIR "/libmoesh_backend_cpu.so";
#else
    std::string plugin = "build/lib/moesh/libmoesh_backend_cpu.so";
#endif
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--threads" && has_value) {
            threads.clear();
            std::stringstream ss(argv[++i]);
            std::string t;
            while (std::getline(ss, t, ',')) {
                threads.push_back(std::stoi(t));
            }
        } else if (a == "--probe-gib" && has_value) {
            probe_gib = std::stod(argv[++i]);
        } else if (a == "--seconds" && has_value) {
            seconds = std::stod(argv[++i]);
        } else if (a == "--types" && has_value) {
            types = "," + std::string(argv[++i]) + ",";
        } else if (a == "--plugin" && has_value) {
            plugin = argv[++i];
        } else {
            std::fprintf(stderr, "usage: %s [--threads 1,2] [--types q4_0,q4_K] [--probe-gib 1] [--seconds 1] [--plugin path.so]\n",
                         argv[0]);
            return a == "--help" ? 0 : 2;
        }
    }

    void * handle = dlopen(plugin.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        std::fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    auto init = reinterpret_cast<moesh_plugin_init_fn>(dlsym(handle, MOESH_PLUGIN_INIT_SYMBOL));
    const moesh_host_api host = {MOESH_PLUGIN_ABI_VERSION, sizeof(moesh_host_api), nullptr,
                                 [](void *, int32_t, const char * msg) { std::fprintf(stderr, "%s\n", msg); }};
    const moesh_backend_iface * iface = nullptr;
    if (!init || init(&host, &iface) != MOESH_OK) {
        std::fprintf(stderr, "cannot initialise %s\n", plugin.c_str());
        return 1;
    }

    const int64_t n_embd = 2048;
    const int64_t n_ff = 5632;
    const int64_t n_expert = 8;
    const int64_t n_prefill = 128;
    const size_t min_total = size_t(512) << 20;
    for (int nt : threads) {
        const double probe = moesh::bench::measure_read_bandwidth(size_t(probe_gib * double(1 << 30)), nt, 10);
        emit("bandwidth_probe", "read_gb_per_s", probe * 1e-9,
             "\"threads\": " + std::to_string(nt) + ", \"buffer_gib\": " + std::to_string(probe_gib));

        Backend b;
        b.be = iface;
        moesh_backend_params params = {sizeof params, nt, MOESH_ACTIVATIONS_FAST};
        check(iface->create(&params, &host, &b.ctx), b, "create");

        for (const DtypeInfo & dt : k_dtypes) {
          for (const bool packed : {false, true}) {
            if (!types.empty() && types.find("," + std::string(dt.name) + ",") == std::string::npos) {
                continue;
            }
            const int32_t w_type = int32_t(dt.type) | (packed ? MOESH_DTYPE_PACKED : 0);
            if (!iface->supports(b.ctx, MOESH_OP_MATMUL, w_type) || !iface->supports(b.ctx, MOESH_OP_EXPERT_FFN, w_type) ||
                (packed && !(iface->packed_size && iface->pack_weights))) {
                continue;
            }
            // Matrices [n_rows, n_cols] at the given offsets of each copy, packed
            // into the backend's layout (one blob per copy, same offsets order).
            auto pack_all = [&](std::vector<std::vector<uint8_t>> copies,
                                const std::vector<std::array<int64_t, 2>> & shapes) {
                if (!packed) {
                    return copies;
                }
                for (auto & c : copies) {
                    std::vector<uint8_t> out;
                    size_t in_off = 0;
                    for (const auto & sh : shapes) {
                        size_t n = 0;
                        check(iface->packed_size(b.ctx, dt.type, sh[0], sh[1], &n), b, "packed_size");
                        const size_t out_off = (out.size() + 63) / 64 * 64;
                        out.resize(out_off + n);
                        check(iface->pack_weights(b.ctx, dt.type, c.data() + in_off, sh[0], sh[1], out.data() + out_off, n),
                              b, "pack_weights");
                        in_off += matrix_bytes(dt, sh[0], sh[1]);
                    }
                    c = std::move(out);
                }
                return copies;
            };
            // Where matrix k of a blob packed by pack_all starts.
            auto blob_offset = [&](const std::vector<std::array<int64_t, 2>> & shapes, size_t k) {
                size_t off = 0;
                for (size_t i = 0; i < k; ++i) {
                    size_t n = matrix_bytes(dt, shapes[i][0], shapes[i][1]);
                    if (packed) {
                        check(iface->packed_size(b.ctx, dt.type, shapes[i][0], shapes[i][1], &n), b, "packed_size");
                        off = (off + 63) / 64 * 64;
                    }
                    off += n;
                }
                return packed ? (off + 63) / 64 * 64 : off;
            };
            const std::string tags = "\"threads\": " + std::to_string(nt) + ", \"dtype\": \"" + dt.name +
                                     (packed ? "\", \"layout\": \"packed\"" : "\", \"layout\": \"file\"");
            auto report = [&](const char * bench, double s, double w_bytes, double flops) {
                emit(bench, "weight_gb_per_s", w_bytes / s * 1e-9, tags);
                emit(bench, "gflop_per_s", flops / s * 1e-9, tags);
                emit(bench, "fraction_of_probe_bandwidth", w_bytes / s / probe, tags);
                emit(bench, "microseconds_per_call", s * 1e6, tags);
            };
            const size_t w_bytes = matrix_bytes(dt, n_ff, n_embd);
            const double mat_flops = 2.0 * double(n_ff * n_embd);
            // Decode GEMV: W [n_ff, n_embd] (an expert's gate projection), a fresh copy each call.
            {
                const auto copies = pack_all(make_copies(w_bytes, min_total), {{n_ff, n_embd}});
                std::vector<float> x(size_t(n_embd), 0.01f), y(static_cast<size_t>(n_ff));
                size_t next = 0;
                const double s = time_per_call(seconds, [&] {
                    const moesh_matmul_args a = {sizeof(moesh_matmul_args), w_type, copies[next].data(), nullptr,
                                                 x.data(), y.data(), n_embd, n_ff, 1, n_embd, n_ff};
                    next = (next + 1) % copies.size();
                    check(iface->matmul(b.ctx, &a), b, "matmul");
                });
                report("matvec_5632x2048", s, double(w_bytes), mat_flops);
            }
            // Prefill GEMM: 128 tokens through one W (cache-resident after the first call).
            {
                const auto copies = pack_all(make_copies(w_bytes, 1), {{n_ff, n_embd}});
                std::vector<float> x(size_t(n_prefill * n_embd)), y(static_cast<size_t>(n_prefill * n_ff));
                for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * float(int(i % 17) - 8);
                const double s = time_per_call(seconds, [&] {
                    const moesh_matmul_args a = {sizeof(moesh_matmul_args), w_type, copies[0].data(), nullptr,
                                                 x.data(), y.data(), n_embd, n_ff, n_prefill, n_embd, n_ff};
                    check(iface->matmul(b.ctx, &a), b, "matmul");
                });
                report("matmul_128x5632x2048", s, double(w_bytes), mat_flops * double(n_prefill));
            }
            // MoE layer, top-2 of 8 experts: layers of 8 experts (gate, up, down each), enough
            // layers that decode reads from DRAM; each call is one layer.
            const size_t expert_bytes = 3 * w_bytes;
            const size_t n_layers = std::max<size_t>(1, (min_total + n_expert * expert_bytes - 1) / (n_expert * expert_bytes));
            const std::vector<std::array<int64_t, 2>> ffn_shapes = {{n_ff, n_embd}, {n_ff, n_embd}, {n_embd, n_ff}};
            const auto experts = pack_all(make_copies(expert_bytes, n_layers * n_expert * expert_bytes),
                                          ffn_shapes);   // [n_layers * n_expert]
            const size_t up_off = blob_offset(ffn_shapes, 1), down_off = blob_offset(ffn_shapes, 2);
            auto run_expert = [&](size_t e, const float * x, float * out, float * scratch, int64_t n_tok) {
                const uint8_t * w = experts[e].data();
                const moesh_expert_ffn_args a = {sizeof(moesh_expert_ffn_args), w_type, w, w + up_off,
                                                 w + down_off, x, nullptr, out, scratch, n_embd, n_ff, n_tok};
                check(iface->expert_ffn(b.ctx, &a), b, "expert_ffn");
            };
            {
                std::vector<float> x(size_t(n_embd), 0.01f), out(static_cast<size_t>(n_embd)),
                    scratch(static_cast<size_t>(2 * n_ff));
                size_t layer = 0;
                uint32_t pick = 1;
                const double s = time_per_call(seconds, [&] {
                    pick = pick * 1103515245u + 12345u;
                    const size_t e0 = (pick >> 16) % n_expert;
                    const size_t e1 = (e0 + 1 + (pick >> 8) % (n_expert - 1)) % n_expert;
                    run_expert(layer * n_expert + e0, x.data(), out.data(), scratch.data(), 1);
                    run_expert(layer * n_expert + e1, x.data(), out.data(), scratch.data(), 1);
                    layer = (layer + 1) % n_layers;
                });
                report("moe_top2of8_decode", s, 2.0 * double(expert_bytes), 2.0 * 3.0 * mat_flops);
            }
            {
                const int64_t n_per_expert = n_prefill * 2 / n_expert;
                std::vector<float> x(size_t(n_per_expert * n_embd)), out(static_cast<size_t>(n_per_expert * n_embd)),
                    scratch(static_cast<size_t>(2 * n_per_expert * n_ff));
                for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * float(int(i % 13) - 6);
                const double s = time_per_call(seconds, [&] {
                    for (int64_t e = 0; e < n_expert; ++e) {
                        run_expert(size_t(e), x.data(), out.data(), scratch.data(), n_per_expert);
                    }
                });
                report("moe_top2of8_prefill128", s, double(n_expert) * double(expert_bytes),
                       3.0 * mat_flops * double(n_prefill * 2));
            }
            {
                // A serving step of 16 sequences: 4 tokens per expert, every expert of a layer,
                // layers rotating so that the weights come from DRAM as in a decode step.
                const int64_t n_batch = 16, n_per_expert = n_batch * 2 / n_expert;
                std::vector<float> x(size_t(n_per_expert * n_embd)), out(static_cast<size_t>(n_per_expert * n_embd)),
                    scratch(static_cast<size_t>(2 * n_per_expert * n_ff));
                for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * float(int(i % 13) - 6);
                size_t layer = 0;
                const double s = time_per_call(seconds, [&] {
                    for (int64_t e = 0; e < n_expert; ++e) {
                        run_expert(layer * n_expert + size_t(e), x.data(), out.data(), scratch.data(), n_per_expert);
                    }
                    layer = (layer + 1) % n_layers;
                });
                report("moe_top2of8_batch16", s, double(n_expert) * double(expert_bytes),
                       3.0 * mat_flops * double(n_batch * 2));
            }
          }
        }
        iface->destroy(b.ctx);
    }
    return 0;
}
