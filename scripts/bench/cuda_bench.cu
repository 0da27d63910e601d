// GPU memory bandwidth, and the cuda plugin's kernels through the plugin ABI
// (loaded with dlopen by plugins/loader) as a fraction of it, at Mixtral-8x7B
// shapes (n_embd 4096, n_ff 14336):
//   copy        cudaMemcpy device to device of two --copy-gib buffers, counted
//               as bytes read + bytes written per second, best of --reps
//   read        a read-only kernel over one such buffer: bytes read per second, best of --reps
//   gemv        matmul with n_tokens = 1 through W [14336, 4096] and W [4096, 14336]
//               (decode), per weight type: weight bytes per second and that as a
//               fraction of copy (and of read)
//   expert_ffn  one token through one expert (gate, up [14336, 4096], down [4096, 14336])
//   prefill     matmul with n_tokens = 128 through W [14336, 4096]: FLOP/s
//
//   moesh_bench_cuda [--types f16,bf16,q8_0,q4_0,q4_K] [--seconds 0.5] [--copy-gib 1] [--reps 10]
//                    [--plugin-dir D]
//   moesh_bench_cuda --info      # the device line only
//
// One JSON object per line, {"bench": "cuda_<what>", ...}. Decode weights rotate
// over copies of >= 512 MiB in all (and >= 4x the L2 cache) so that every call
// reads them from device memory, as a decode step reads layers it has not
// touched since the previous token. Weights: f16/bf16 of uniform random values,
// q8_0/q4_0 quantized with experts/quant.h, q4_K random bytes with finite fp16
// scales. Without a CUDA device it says so and exits with 77 (skipped).
// Built as moesh_bench_cuda by scripts/bench/CMakeLists.txt when CUDA is enabled.
#include "experts/quant.h"
#include "plugins/loader/plugin_loader.h"

#include <cuda_runtime.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int k_skip = 77;   // the exit status test drivers read as "skipped"

struct DtypeInfo {
    moesh_dtype type;
    const char * name;
    int64_t block_elems;   // 1 for the element types
    size_t block_bytes;
};

const DtypeInfo k_dtypes[] = {
    {MOESH_DTYPE_F16, "f16", 1, 2},     {MOESH_DTYPE_BF16, "bf16", 1, 2},      {MOESH_DTYPE_Q8_0, "q8_0", 32, 34},
    {MOESH_DTYPE_Q4_0, "q4_0", 32, 18}, {MOESH_DTYPE_Q4_K, "q4_K", 256, 144},
};

size_t matrix_bytes(const DtypeInfo & t, int64_t n_rows, int64_t n_cols) {
    return size_t(n_rows) * size_t(n_cols / t.block_elems) * t.block_bytes;
}

void emit(const nlohmann::json & j) { std::cout << j.dump() << std::endl; }

void cuda_or_die(cudaError_t e, const char * what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "moesh_bench_cuda: %s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

// Reads n 16-byte words, four loads in flight per thread; the store that
// depends on every load is never taken, but the compiler cannot know that.
__global__ void read_kernel(const uint4 * __restrict__ p, size_t n, unsigned * out) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        const uint4 a = p[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}

struct Bandwidth {
    double copy_gbps = 0;   // (read + written) / s
    double read_gbps = 0;
};

Bandwidth measure_bandwidth(double gib, int reps) {
    const size_t n_bytes = size_t(gib * double(1ull << 30)) / 16 * 16;
    void *a = nullptr, *b = nullptr;
    unsigned * flag = nullptr;
    cuda_or_die(cudaMalloc(&a, n_bytes), "cudaMalloc (copy source)");
    cuda_or_die(cudaMalloc(&b, n_bytes), "cudaMalloc (copy destination)");
    cuda_or_die(cudaMalloc(&flag, sizeof(unsigned)), "cudaMalloc");
    cuda_or_die(cudaMemset(a, 0x5a, n_bytes), "cudaMemset");
    cuda_or_die(cudaMemset(b, 0xa5, n_bytes), "cudaMemset");
    cudaStream_t s;
    cudaEvent_t e0, e1;
    cuda_or_die(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_or_die(cudaEventCreate(&e0), "cudaEventCreate");
    cuda_or_die(cudaEventCreate(&e1), "cudaEventCreate");
    int device = 0, n_sm = 0;
    cuda_or_die(cudaGetDevice(&device), "cudaGetDevice");
    cuda_or_die(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");

    auto best_seconds = [&](auto && launch) {
        float best = 0;
        for (int r = 0; r <= reps; ++r) {   // the first is a warm-up
            cuda_or_die(cudaEventRecord(e0, s), "cudaEventRecord");
            launch();
            cuda_or_die(cudaEventRecord(e1, s), "cudaEventRecord");
            cuda_or_die(cudaEventSynchronize(e1), "cudaEventSynchronize");
            float ms = 0;
            cuda_or_die(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
            if (r > 0 && (best == 0 || ms < best)) best = ms;
        }
        return double(best) * 1e-3;
    };
    Bandwidth bw;
    const double t_copy = best_seconds([&] {
        cuda_or_die(cudaMemcpyAsync(b, a, n_bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
    });
    bw.copy_gbps = 2.0 * double(n_bytes) / t_copy / 1e9;
    const double t_read = best_seconds([&] {
        read_kernel<<<n_sm * 4, 512, 0, s>>>(static_cast<const uint4 *>(a), n_bytes / 16, flag);
        cuda_or_die(cudaGetLastError(), "read_kernel launch");
    });
    bw.read_gbps = double(n_bytes) / t_read / 1e9;
    emit({{"bench", "cuda_copy"}, {"buffer_gib", gib}, {"reps", reps}, {"seconds", t_copy}, {"gbps", bw.copy_gbps},
          {"counted", "bytes read + bytes written"}});
    emit({{"bench", "cuda_read"}, {"buffer_gib", gib}, {"reps", reps}, {"seconds", t_read}, {"gbps", bw.read_gbps},
          {"counted", "bytes read"}});
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(s);
    cudaFree(flag);
    cudaFree(b);
    cudaFree(a);
    return bw;
}

uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);   // round to nearest even; inputs are finite
    return uint16_t(u >> 16);
}

// Runs f(r0, r1) over [0, n_rows) split across the machine's cores.
template <class F>
void parallel_rows(int64_t n_rows, F && f) {
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n_rows / 64));
    std::vector<std::thread> ts;
    for (int64_t i = 0; i < n; ++i) ts.emplace_back([&, i] { f(n_rows * i / n, n_rows * (i + 1) / n); });
    for (auto & t : ts) t.join();
}

// A [n_rows, n_cols] matrix of type t with values ~ uniform(-a, a), a = 1/sqrt(n_cols).
std::vector<uint8_t> make_weights(const DtypeInfo & t, int64_t n_rows, int64_t n_cols) {
    std::vector<uint8_t> w(matrix_bytes(t, n_rows, n_cols));
    const size_t row_bytes = w.size() / size_t(n_rows);
    const float a = 1.0f / std::sqrt(float(n_cols));
    parallel_rows(n_rows, [&](int64_t r0, int64_t r1) {
        uint64_t s = 0x9e3779b97f4a7c15ull * uint64_t(r0 + 1);
        auto next = [&s]() {   // xorshift: uniform(-1, 1)
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            return float(s >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        };
        std::vector<float> row(static_cast<size_t>(n_cols));
        for (int64_t r = r0; r < r1; ++r) {
            uint8_t * dst = w.data() + size_t(r) * row_bytes;
            for (float & v : row) v = a * next();
            switch (t.type) {
            case MOESH_DTYPE_F16:
            case MOESH_DTYPE_BF16:
                for (int64_t i = 0; i < n_cols; ++i) {
                    const uint16_t h = t.type == MOESH_DTYPE_F16 ? moesh::f32_to_fp16(row[size_t(i)])
                                                                 : f32_to_bf16_bits(row[size_t(i)]);
                    std::memcpy(dst + 2 * i, &h, 2);
                }
                break;
            case MOESH_DTYPE_Q8_0:
            case MOESH_DTYPE_Q4_0:
                moesh::quantize_row(t.type == MOESH_DTYPE_Q8_0 ? moesh::QuantType::Q8_0 : moesh::QuantType::Q4_0,
                                    row.data(), dst, n_cols);
                break;
            default: {   // Q4_K: random bits, d and dmin chosen so that values stay within about +-a
                for (size_t i = 0; i < row_bytes; ++i) dst[i] = uint8_t(next() * 127.0f + 128.0f);
                for (size_t b = 0; b < row_bytes; b += t.block_bytes) {
                    const uint16_t d = moesh::f32_to_fp16(a / (15.0f * 32.0f)), dmin = moesh::f32_to_fp16(a / 64.0f);
                    std::memcpy(dst + b, &d, 2);
                    std::memcpy(dst + b + 2, &dmin, 2);
                }
            }
            }
        }
    });
    return w;
}

// Seconds per call of enqueue(i) (i counts calls), from trials of ~20 ms over
// `seconds` in all, each trial ending with be's synchronize: the 10th
// percentile of the trials' times (a slow trial is another process or the host
// getting in the way; the very fastest may be a timer hiccup).
template <class F>
double time_per_call(const moesh::Backend & be, double seconds, F && enqueue) {
    using clock = std::chrono::steady_clock;
    int64_t i = 0;
    auto sync = [&] { be.check(be.iface().synchronize(be.ctx()), "synchronize"); };
    enqueue(i++);
    sync();
    auto t = clock::now();
    for (int k = 0; k < 4; ++k) enqueue(i++);
    sync();
    const double one = std::chrono::duration<double>(clock::now() - t).count() / 4;
    const int64_t n_per_trial = std::max<int64_t>(1, int64_t(0.02 / std::max(one, 1e-9)));
    std::vector<double> trials;
    const auto t_end = clock::now() + std::chrono::duration<double>(seconds);
    while (clock::now() < t_end || trials.size() < 5) {
        t = clock::now();
        for (int64_t k = 0; k < n_per_trial; ++k) enqueue(i++);
        sync();
        trials.push_back(std::chrono::duration<double>(clock::now() - t).count() / double(n_per_trial));
    }
    std::sort(trials.begin(), trials.end());
    return trials[trials.size() / 10];
}

// A buffer_alloc buffer, freed with buffer_free.
class DeviceBuffer {
public:
    DeviceBuffer(const moesh::Backend & be, size_t n_bytes) : be_(&be) {
        be.check(be.iface().buffer_alloc(be.ctx(), n_bytes, &ptr_), "buffer_alloc");
    }
    DeviceBuffer(DeviceBuffer && o) noexcept : be_(o.be_), ptr_(o.ptr_) { o.ptr_ = nullptr; }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer & operator=(const DeviceBuffer &) = delete;
    ~DeviceBuffer() {
        if (ptr_) be_->iface().buffer_free(be_->ctx(), ptr_);
    }
    void * get() const { return ptr_; }
    float * f() const { return static_cast<float *>(ptr_); }

private:
    const moesh::Backend * be_;
    void * ptr_ = nullptr;
};

DeviceBuffer upload(const moesh::Backend & be, const void * src, size_t n_bytes) {
    DeviceBuffer d(be, n_bytes);
    be.check(be.iface().copy_to_device(be.ctx(), d.get(), src, n_bytes), "copy_to_device");
    return d;
}

DeviceBuffer random_floats(const moesh::Backend & be, size_t n) {
    std::vector<float> v(n);
    uint32_t s = 12345;
    for (float & x : v) {
        s = s * 1664525u + 1013904223u;
        x = float(s >> 8) * (1.0f / 8388608.0f) - 1.0f;
    }
    return upload(be, v.data(), n * sizeof(float));
}

} // namespace

int main(int argc, char ** argv) {
    std::string types = ",f16,bf16,q8_0,q4_0,q4_K,";
    std::string plugin_dir;
    double seconds = 0.5, copy_gib = 1.0;
    int reps = 10;
    bool info_only = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "missing value after %s\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--types") types = "," + next() + ",";
        else if (a == "--seconds") seconds = std::stod(next());
        else if (a == "--copy-gib") copy_gib = std::stod(next());
        else if (a == "--reps") reps = std::stoi(next());
        else if (a == "--plugin-dir") plugin_dir = next();
        else if (a == "--info") info_only = true;
        else {
            std::fprintf(stderr,
                         "usage: %s [--types f16,bf16,q8_0,q4_0,q4_K] [--seconds 0.5] [--copy-gib 1] [--reps 10]"
                         " [--plugin-dir D]\n"
                         "       %s --info     # the device line only (exit 77 when there is no usable device)\n",
                         argv[0], argv[0]);
            return a == "--help" ? 0 : 2;
        }
    }
    if (seconds <= 0 || copy_gib <= 0 || reps < 1) {
        std::fprintf(stderr, "--seconds and --copy-gib must be positive, --reps >= 1\n");
        return 2;
    }

    int n_dev = 0;
    const cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        std::fprintf(stderr, "moesh_bench_cuda: no CUDA device here (%s): nothing measured, skipped\n",
                     e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return k_skip;
    }
    cudaDeviceProp prop;
    cuda_or_die(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    emit({{"bench", "cuda_device"},
          {"name", prop.name},
          {"sm", std::to_string(prop.major) + "." + std::to_string(prop.minor)},
          {"n_sm", prop.multiProcessorCount},
          {"memory_gib", double(prop.totalGlobalMem) / double(1ull << 30)},
          {"l2_mib", double(prop.l2CacheSize) / double(1 << 20)},
          {"driver_api", driver},
          {"runtime_api", runtime}});
    if (info_only) return 0;

    const Bandwidth bw = measure_bandwidth(copy_gib, reps);

    moesh::PluginOptions po;
    if (!plugin_dir.empty()) po.search_dirs = {plugin_dir};
    po.preferred = "cuda";
    std::string report;
    std::unique_ptr<moesh::Backend> be = moesh::load_backend(po, &report);
    if (!be) {
        std::fprintf(stderr, "moesh_bench_cuda: the cuda plugin did not load:\n%s", report.c_str());
        return 1;
    }

    const int64_t n_embd = 4096, n_ff = 14336, n_prefill = 128;
    const size_t min_rotation = std::max<size_t>(size_t(512) << 20, size_t(4) * size_t(prop.l2CacheSize));
    int n_failed = 0;
    try {
        // activations: x [n_prefill, max(n_embd, n_ff)] and y, scratch [2, n_ff], all reused
        DeviceBuffer x = random_floats(*be, size_t(n_prefill * n_ff));
        DeviceBuffer y(*be, size_t(n_prefill * n_ff) * sizeof(float));
        DeviceBuffer out(*be, size_t(n_embd) * sizeof(float));
        DeviceBuffer scratch(*be, size_t(2 * n_ff) * sizeof(float));
        for (const DtypeInfo & t : k_dtypes) {
            if (types.find("," + std::string(t.name) + ",") == std::string::npos) continue;
            if (!be->supports(MOESH_OP_MATMUL, t.type)) {
                emit({{"bench", "cuda_gemv"}, {"dtype", t.name}, {"skipped", "matmul not offered for this type"}});
                continue;
            }
            try {
                const auto t_gen = std::chrono::steady_clock::now();
                const std::vector<uint8_t> host = make_weights(t, n_ff, n_embd);
                const size_t w_bytes = host.size();
                const size_t n_copies = std::max<size_t>(2, (min_rotation + w_bytes - 1) / w_bytes);
                std::vector<DeviceBuffer> w;
                for (size_t c = 0; c < n_copies; ++c) w.push_back(upload(*be, host.data(), w_bytes));
                std::fprintf(stderr, "moesh_bench_cuda: %s: %zu copies of %.1f MiB made in %.2f s\n", t.name, n_copies,
                             double(w_bytes) / (1 << 20),
                             std::chrono::duration<double>(std::chrono::steady_clock::now() - t_gen).count());

                // decode GEMV, both shapes (the bytes are valid blocks either way)
                using Shape = std::pair<int64_t, int64_t>;   // n_out, n_in
                for (const auto & [n_out, n_in] : {Shape{n_ff, n_embd}, Shape{n_embd, n_ff}}) {
                    moesh_matmul_args m{};
                    m.struct_size = sizeof m;
                    m.w_type = t.type;
                    m.x = x.f();
                    m.y = y.f();
                    m.n_in = n_in;
                    m.n_out = n_out;
                    m.n_tokens = 1;
                    m.x_stride = n_in;
                    m.y_stride = n_out;
                    const double s = time_per_call(*be, seconds, [&](int64_t i) {
                        m.w = w[size_t(i) % n_copies].get();
                        be->check(be->iface().matmul(be->ctx(), &m), "matmul");
                    });
                    const double gbps = double(w_bytes) / s / 1e9;
                    emit({{"bench", "cuda_gemv"}, {"dtype", t.name}, {"n_out", n_out}, {"n_in", n_in},
                          {"n_copies", n_copies}, {"us_per_call", s * 1e6}, {"weight_gbps", gbps},
                          {"fraction_of_copy", gbps / bw.copy_gbps}, {"fraction_of_read", gbps / bw.read_gbps}});
                }

                // one token through one expert: gate = copy e, up = e + 1, down = e + 2 (as [n_embd, n_ff])
                if (be->supports(MOESH_OP_EXPERT_FFN, t.type)) {
                    moesh_expert_ffn_args f{};
                    f.struct_size = sizeof f;
                    f.w_type = t.type;
                    f.x = x.f();
                    f.out = out.f();
                    f.scratch = scratch.f();
                    f.n_embd = n_embd;
                    f.n_ff = n_ff;
                    f.n_tokens = 1;
                    const size_t n_experts = std::max<size_t>(1, n_copies / 3);
                    const double s = time_per_call(*be, seconds, [&](int64_t i) {
                        const size_t e0 = 3 * (size_t(i) % n_experts);
                        f.gate = w[e0].get();
                        f.up = w[(e0 + 1) % n_copies].get();
                        f.down = w[(e0 + 2) % n_copies].get();
                        be->check(be->iface().expert_ffn(be->ctx(), &f), "expert_ffn");
                    });
                    const double gbps = 3.0 * double(w_bytes) / s / 1e9;
                    emit({{"bench", "cuda_expert_ffn"}, {"dtype", t.name}, {"n_embd", n_embd}, {"n_ff", n_ff},
                          {"n_tokens", 1}, {"us_per_call", s * 1e6}, {"weight_gbps", gbps},
                          {"fraction_of_copy", gbps / bw.copy_gbps}});
                }

                // prefill: n_prefill tokens through W [n_ff, n_embd], compute-bound
                {
                    moesh_matmul_args m{};
                    m.struct_size = sizeof m;
                    m.w_type = t.type;
                    m.w = w[0].get();
                    m.x = x.f();
                    m.y = y.f();
                    m.n_in = n_embd;
                    m.n_out = n_ff;
                    m.n_tokens = n_prefill;
                    m.x_stride = n_embd;
                    m.y_stride = n_ff;
                    const double s = time_per_call(*be, seconds, [&](int64_t) {
                        be->check(be->iface().matmul(be->ctx(), &m), "matmul");
                    });
                    const double flops = 2.0 * double(n_prefill) * double(n_ff) * double(n_embd);
                    emit({{"bench", "cuda_prefill"}, {"dtype", t.name}, {"n_out", n_ff}, {"n_in", n_embd},
                          {"n_tokens", n_prefill}, {"us_per_call", s * 1e6}, {"tflops", flops / s / 1e12}});
                }
            } catch (const std::exception & ex) {   // this type only; the next may work
                std::fprintf(stderr, "moesh_bench_cuda: %s: %s\n", t.name, ex.what());
                emit({{"bench", "cuda_error"}, {"dtype", t.name}, {"error", ex.what()}});
                ++n_failed;
            }
        }
    } catch (const std::exception & ex) {
        std::fprintf(stderr, "moesh_bench_cuda: %s\n", ex.what());
        return 1;
    }
    return n_failed > 0 ? 1 : 0;
}
