// CPU backend kernels at decode shapes, through the real plugin (dlopen), as
// a fraction of the read bandwidth measured in the same run.
//
//   cpu_kernels_bench [--threads 1,2] [--probe-gib 1] [--seconds 1] [--plugin path/libmoesh_backend_cpu.so]
//
// Prints one JSON object per line: {"bench": ..., "metric": ..., "value": ..., ...}.
// Weights rotate over enough copies (>= 512 MiB) that every call reads them
// from DRAM, as a decode step reads experts it has not touched for a while.
// Built as moesh_bench_cpu_kernels by scripts/bench/CMakeLists.txt.
#include "bandwidth_probe.h"

#include <moesh/plugin.h>

#include <dlfcn.h>

#include <algorithm>
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

const char * dtype_name(moesh_dtype t) {
    return t == MOESH_DTYPE_F32 ? "f32" : t == MOESH_DTYPE_F16 ? "f16" : "bf16";
}

size_t dtype_size(moesh_dtype t) { return t == MOESH_DTYPE_F32 ? 4 : 2; }

// Copies of one weight matrix, filled with small non-zero values (zero pages
// would not be read from DRAM at all).
std::vector<std::vector<uint8_t>> make_copies(size_t n_bytes, size_t min_total) {
    const size_t n_copies = (min_total + n_bytes - 1) / n_bytes;
    std::vector<std::vector<uint8_t>> copies(n_copies, std::vector<uint8_t>(n_bytes));
    uint32_t state = 12345;
    for (auto & c : copies) {
        // 0x3c00-ish bit patterns: small finite values in f16, bf16 and f32 alike.
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
        } else if (a == "--plugin" && has_value) {
            plugin = argv[++i];
        } else {
            std::fprintf(stderr, "usage: %s [--threads 1,2] [--probe-gib 1] [--seconds 1] [--plugin path.so]\n",
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
    const size_t min_total = size_t(512) << 20;
    for (int nt : threads) {
        const double probe = moesh::bench::measure_read_bandwidth(size_t(probe_gib * double(1 << 30)), nt, 10);
        emit("bandwidth_probe", "read_bytes_per_second", probe,
             "\"threads\": " + std::to_string(nt) + ", \"buffer_gib\": " + std::to_string(probe_gib));

        Backend b;
        b.be = iface;
        moesh_backend_params params = {sizeof params, nt};
        check(iface->create(&params, &host, &b.ctx), b, "create");

        for (moesh_dtype type : {MOESH_DTYPE_F32, MOESH_DTYPE_F16, MOESH_DTYPE_BF16}) {
            const std::string tags = "\"threads\": " + std::to_string(nt) + ", \"dtype\": \"" + dtype_name(type) + "\"";
            // Batch-1 matvec, W [n_ff, n_embd] (an expert's gate projection).
            {
                const size_t w_bytes = size_t(n_ff * n_embd) * dtype_size(type);
                const auto copies = make_copies(w_bytes, min_total);
                std::vector<float> x(size_t(n_embd), 0.01f), y(static_cast<size_t>(n_ff));
                size_t next = 0;
                const double s = time_per_call(seconds, [&] {
                    const moesh_matmul_args a = {sizeof(moesh_matmul_args), type, copies[next].data(), nullptr,
                                                 x.data(), y.data(), n_embd, n_ff, 1, n_embd, n_ff};
                    next = (next + 1) % copies.size();
                    check(iface->matmul(b.ctx, &a), b, "matmul");
                });
                emit("matvec_5632x2048", "weight_read_bytes_per_second", double(w_bytes) / s, tags);
                emit("matvec_5632x2048", "fraction_of_probe_bandwidth", double(w_bytes) / s / probe, tags);
            }
            // One expert for one token: gate, up [n_ff, n_embd] and down [n_embd, n_ff].
            {
                const size_t w_bytes = size_t(n_ff * n_embd) * dtype_size(type);
                const auto gates = make_copies(w_bytes, min_total / 3);
                const auto ups = make_copies(w_bytes, min_total / 3);
                const auto downs = make_copies(w_bytes, min_total / 3);
                std::vector<float> x(size_t(n_embd), 0.01f), out(static_cast<size_t>(n_embd)), scratch(static_cast<size_t>(2 * n_ff));
                size_t next = 0;
                const double s = time_per_call(seconds, [&] {
                    const moesh_expert_ffn_args a = {sizeof(moesh_expert_ffn_args), type, gates[next].data(),
                                                     ups[next].data(), downs[next].data(), x.data(), nullptr,
                                                     out.data(), scratch.data(), n_embd, n_ff, 1};
                    next = (next + 1) % gates.size();
                    check(iface->expert_ffn(b.ctx, &a), b, "expert_ffn");
                });
                emit("expert_ffn_2048x5632", "weight_read_bytes_per_second", 3.0 * double(w_bytes) / s, tags);
                emit("expert_ffn_2048x5632", "fraction_of_probe_bandwidth", 3.0 * double(w_bytes) / s / probe, tags);
                emit("expert_ffn_2048x5632", "microseconds_per_call", s * 1e6, tags);
            }
            // Prefill-like batch: 32 tokens through the same matrix, in FLOP/s.
            {
                const int64_t n_tokens = 32;
                const size_t w_bytes = size_t(n_ff * n_embd) * dtype_size(type);
                const auto copies = make_copies(w_bytes, 1);
                std::vector<float> x(size_t(n_tokens * n_embd), 0.01f), y(static_cast<size_t>(n_tokens * n_ff));
                const double s = time_per_call(seconds, [&] {
                    const moesh_matmul_args a = {sizeof(moesh_matmul_args), type, copies[0].data(), nullptr,
                                                 x.data(), y.data(), n_embd, n_ff, n_tokens, n_embd, n_ff};
                    check(iface->matmul(b.ctx, &a), b, "matmul");
                });
                emit("matmul_32x5632x2048", "flops_per_second", 2.0 * double(n_tokens * n_ff * n_embd) / s, tags);
            }
        }
        iface->destroy(b.ctx);
    }
    return 0;
}
