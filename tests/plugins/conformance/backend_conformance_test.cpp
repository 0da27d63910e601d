// Conformance of backend plugins: every op of every backend against the
// reference kernels (plugins/reference), through the real dlopen path.
//
// A backend joins by adding a case to k_backends (its CMake target defines the
// plugin path). Inputs and outputs go through the backend's own buffers
// (buffer_alloc, copy_to_device, copy_to_host), so the same tests run on a
// device-memory backend; the few checks that need host pointers say so.
//
// Tolerances: each output element gets a bound on its float32 rounding error,
// computed from the data with u = 2^-24 (see sum_error and the comment above
// each op's bound). The reference accumulates in double and widens weights
// exactly, so the bound is all the error a correct float32 backend may have;
// a wrong index, a dropped tail element or a missed block is far outside it.
// Block weight types may also round the activations to 8 bits (as ggml and
// the cpu backend do); see act_quant_error for that part of the bound.
#include <moesh/plugin.h>

#include "reference_kernels.h"

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

// Under AddressSanitizer (MOESH_SANITIZE) or ThreadSanitizer, let an
// impossible allocation fail with NULL, as it does without them, rather than
// abort: a test asks for one.
extern "C" const char * __asan_default_options() { return "allocator_may_return_null=1"; }
extern "C" const char * __tsan_default_options() { return "allocator_may_return_null=1"; }

namespace {

constexpr double k_u = 0x1p-24;       // unit roundoff of float32
constexpr double k_tiny = 0x1p-126;   // FLT_MIN: slack for results that underflow
constexpr float k_sentinel = 12345.0f;
const float k_nan = std::numeric_limits<float>::quiet_NaN();

std::vector<float> f16_values(const std::vector<uint16_t> & h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); ++i) f[i] = moesh::ref::f16_to_f32(h[i]);
    return f;
}

// A pool of float rows as a Q8_0 KV pool keeps it (each 32 values one block, quantized by the
// reference). A block with a NaN gets a NaN scale, so that a read of it still poisons the output.
std::vector<uint8_t> q8_0_pool(const std::vector<float> & x) {
    std::vector<uint8_t> q(x.size() / MOESH_QK_BLOCK * 34);
    for (size_t b = 0; b < x.size() / MOESH_QK_BLOCK; ++b) {
        const float * v = x.data() + b * MOESH_QK_BLOCK;
        moesh::ref::quantize_q8_0_block(v, q.data() + b * 34);
        if (std::any_of(v, v + MOESH_QK_BLOCK, [](float f) { return std::isnan(f); })) {
            const uint16_t nan16 = 0x7e00;
            std::memcpy(q.data() + b * 34, &nan16, sizeof nan16);
        }
    }
    return q;
}

std::vector<float> q8_0_values(const std::vector<uint8_t> & q) {
    std::vector<float> f(q.size() / 34 * MOESH_QK_BLOCK);
    for (size_t i = 0; i < f.size(); ++i) f[i] = moesh::ref::load_weight(q.data(), MOESH_DTYPE_Q8_0, int64_t(i));
    return f;
}

// A KV pool of f32 rows (NaN where nothing was written) as a backend keeps it in kv_type: its
// bytes, which the backend gets and the reference reads, and the values they stand for.
struct KvPoolAs {
    std::vector<uint8_t> bytes;
    std::vector<float> values;
    KvPoolAs(const std::vector<float> & f, int32_t kv_type) {
        if (kv_type == MOESH_DTYPE_Q8_0) {
            bytes = q8_0_pool(f);
            values = q8_0_values(bytes);
        } else if (kv_type == MOESH_DTYPE_F16) {   // rounded, NaN staying NaN
            std::vector<uint16_t> h(f.size());
            for (size_t i = 0; i < f.size(); ++i) h[i] = moesh::ref::f32_to_f16(f[i]);
            bytes.resize(h.size() * 2);
            std::memcpy(bytes.data(), h.data(), bytes.size());
            values = f16_values(h);
        } else {
            bytes.resize(f.size() * sizeof(float));
            std::memcpy(bytes.data(), f.data(), bytes.size());
            values = f;
        }
    }
};

// Error of a float32 sum of n terms in any order, relative to the sum of the
// terms' magnitudes. The worst case is n*u, but for terms of random sign (all
// inputs here) rounding errors add up like a random walk, ~sqrt(n)*u; using
// the worst case would let a dropped term (~1/n of that sum) pass for large n.
// The factor 4 and the +4 leave room for the final roundings and reductions.
double sum_error(int64_t n) { return 4.0 * k_u * (std::sqrt(double(n)) + 4.0); }

struct BackendCase {
    const char * name;
    const char * path;
    int32_t n_threads;
    bool all_weight_types;   // must support every type of k_weight_types
};

const BackendCase k_backends[] = {
    {"cpu_1thread", MOESH_CPU_PLUGIN_PATH, 1, true},
    {"cpu_2threads", MOESH_CPU_PLUGIN_PATH, 2, true},
#ifdef MOESH_CUDA_PLUGIN_PATH
    {"cuda", MOESH_CUDA_PLUGIN_PATH, 0, false},
#endif
#ifdef MOESH_DEVSIM_PLUGIN_PATH
    {"devsim", MOESH_DEVSIM_PLUGIN_PATH, 0, false},
#endif
};

// Names the case in gtest's messages.
void PrintTo(const BackendCase & c, std::ostream * os) { *os << c.name; }

const moesh_dtype k_weight_types[] = {MOESH_DTYPE_F32,  MOESH_DTYPE_F16,  MOESH_DTYPE_BF16,
                                      MOESH_DTYPE_Q8_0, MOESH_DTYPE_Q4_0, MOESH_DTYPE_Q4_1,
                                      MOESH_DTYPE_Q4_K, MOESH_DTYPE_Q5_K, MOESH_DTYPE_Q6_K};

// Elements per block: 32 or 256 for the block types, 0 for the element types.
int64_t block_elems(moesh_dtype t) {
    switch (t) {
    case MOESH_DTYPE_Q8_0:
    case MOESH_DTYPE_Q4_0:
    case MOESH_DTYPE_Q4_1: return MOESH_QK_BLOCK;
    case MOESH_DTYPE_Q4_K:
    case MOESH_DTYPE_Q5_K:
    case MOESH_DTYPE_Q6_K: return MOESH_QK_K;
    default: return 0;
    }
}

// Block types: rows are whole blocks, so the shapes differ.
bool is_block_type(moesh_dtype t) { return block_elems(t) != 0; }

const char * dtype_name(moesh_dtype t) {
    switch (t) {
    case MOESH_DTYPE_F32: return "f32";
    case MOESH_DTYPE_F16: return "f16";
    case MOESH_DTYPE_BF16: return "bf16";
    case MOESH_DTYPE_Q8_0: return "q8_0";
    case MOESH_DTYPE_Q4_0: return "q4_0";
    case MOESH_DTYPE_Q4_1: return "q4_1";
    case MOESH_DTYPE_Q4_K: return "q4_K";
    case MOESH_DTYPE_Q5_K: return "q5_K";
    case MOESH_DTYPE_Q6_K: return "q6_K";
    default: return "?";
    }
}

std::string g_last_info;   // the plugin's last INFO message

void on_plugin_log(void *, int32_t level, const char * msg) {
    if (level >= MOESH_LOG_WARN) {
        std::fprintf(stderr, "[plugin] %s\n", msg);
    } else if (level == MOESH_LOG_INFO) {
        g_last_info = msg;
    }
}

// Static: a plugin may keep the host table for the life of its contexts.
const moesh_host_api k_host = {MOESH_PLUGIN_ABI_VERSION, sizeof(moesh_host_api), nullptr, on_plugin_log};

struct LoadedPlugin {
    void * handle = nullptr;
    moesh_plugin_init_fn init = nullptr;
    moesh_plugin_score_fn score = nullptr;
    std::string error;
};

// dlopen'ed once per path and never closed, so tables stay valid.
// The plugin paths are where the build put them. MOESH_CONFORMANCE_PLUGIN_DIR
// names another folder holding the same files (a build tree copied to another
// machine, as scripts/device-check.sh does).
std::string plugin_path(const char * built_path) {
    const char * dir = std::getenv("MOESH_CONFORMANCE_PLUGIN_DIR");
    if (!dir || !*dir) {
        return built_path;
    }
    const std::string p = built_path;
    const size_t slash = p.rfind('/');
    return std::string(dir) + "/" + (slash == std::string::npos ? p : p.substr(slash + 1));
}

const LoadedPlugin & load_plugin(const std::string & path) {
    static std::map<std::string, LoadedPlugin> loaded;
    auto it = loaded.find(path);
    if (it != loaded.end()) {
        return it->second;
    }
    LoadedPlugin p;
    p.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!p.handle) {
        p.error = dlerror();
    } else {
        p.init = reinterpret_cast<moesh_plugin_init_fn>(dlsym(p.handle, MOESH_PLUGIN_INIT_SYMBOL));
        p.score = reinterpret_cast<moesh_plugin_score_fn>(dlsym(p.handle, MOESH_PLUGIN_SCORE_SYMBOL));
        if (!p.init) {
            p.error = path + " does not export " MOESH_PLUGIN_INIT_SYMBOL;
        }
    }
    return loaded.emplace(path, std::move(p)).first->second;
}

std::vector<float> uniform(size_t n, float lo, float hi, std::mt19937 & rng) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (float & x : v) {
        x = dist(rng);
    }
    return v;
}

// Weights as the backend gets them and, exactly, as floats.
struct Weights {
    std::vector<uint8_t> bytes;   // [n] of the dtype
    std::vector<float> values;    // [n]
};

// Little-endian fp16 bits of f at p.
void put_f16(uint8_t * p, float f) {
    const uint16_t h = moesh::ref::f32_to_f16(f);
    p[0] = uint8_t(h & 0xff);
    p[1] = uint8_t(h >> 8);
}

// GGUF's Q8_0 / Q4_0 quantization of n (a multiple of 32) values, in the
// spirit of gguf.quants (rounding details do not matter: the test compares
// against the dequantized bytes). Every 11th block is all zero (d = 0), and
// every 13th has a tiny scale (an fp16 subnormal). The other block types get
// random bytes with scales that keep values within about [-scale, scale]
// (the K-quants' 6-bit scales and mins, Q6_K's int8 scales all random).
void quantize_blocks(moesh_dtype type, const std::vector<float> & x, float scale, std::mt19937 & rng,
                     std::vector<uint8_t> & bytes) {
    const size_t n_per_block = size_t(block_elems(type));
    const size_t n_blocks = x.size() / n_per_block;
    const size_t block_bytes = moesh::ref::weight_row_bytes(type, int64_t(n_per_block));
    bytes.assign(n_blocks * block_bytes, 0);
    std::uniform_int_distribution<int> byte(0, 255);
    for (size_t b = 0; b < n_blocks; ++b) {
        const float * v = x.data() + n_per_block * b;
        uint8_t * p = bytes.data() + b * block_bytes;
        if (b % 11 == 10) {
            continue;   // d = 0, q = 0 (Q4_0: nibbles 0, i.e. -8 * 0)
        }
        const bool tiny = b % 13 == 12;
        if (type == MOESH_DTYPE_Q8_0) {
            float amax = 0.0f;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
            const float d = tiny ? 0x1p-20f : amax / 127.0f;
            put_f16(p, d);
            const float dq = moesh::ref::f16_to_f32(moesh::ref::f32_to_f16(d));
            for (int j = 0; j < 32; ++j) {
                const float q = dq != 0.0f ? std::round(v[j] / dq) : 0.0f;
                p[2 + j] = uint8_t(int8_t(std::clamp(q, -127.0f, 127.0f)));
            }
        } else if (type == MOESH_DTYPE_Q4_0) {
            float amax = 0.0f, max = 0.0f;
            for (int j = 0; j < 32; ++j) {
                if (std::fabs(v[j]) > amax) {
                    amax = std::fabs(v[j]);
                    max = v[j];
                }
            }
            const float d = tiny ? -0x1p-20f : max / -8.0f;
            put_f16(p, d);
            const float dq = moesh::ref::f16_to_f32(moesh::ref::f32_to_f16(d));
            for (int j = 0; j < 16; ++j) {
                auto nib = [&](float f) {
                    const float q = dq != 0.0f ? std::floor(f / dq + 8.5f) : 8.0f;
                    return uint8_t(std::clamp(q, 0.0f, 15.0f));
                };
                p[2 + j] = uint8_t(nib(v[j]) | (nib(v[j + 16]) << 4));
            }
        } else {
            for (size_t i = 0; i < block_bytes; ++i) {
                p[i] = uint8_t(byte(rng));
            }
            const float t = tiny ? 0x1p-12f : 1.0f;
            switch (type) {
            case MOESH_DTYPE_Q4_1:   // d * [0, 15] + m
                put_f16(p, t * scale * 2.0f / 15.0f);
                put_f16(p + 2, -t * scale * (b % 2 ? 1.0f : 0.5f));
                break;
            case MOESH_DTYPE_Q4_K:   // d * sc * [0, 15] - dmin * mn, sc and mn in [0, 63]
            case MOESH_DTYPE_Q5_K:   // d * sc * [0, 31] - dmin * mn
                put_f16(p, t * scale / (type == MOESH_DTYPE_Q4_K ? 15.0f * 32.0f : 31.0f * 32.0f));
                put_f16(p + 2, t * scale / 64.0f);
                break;
            default:                 // Q6_K: d * sc * [-32, 31], sc in [-128, 127]
                put_f16(p + 208, t * scale / (128.0f * 32.0f));
                break;
            }
        }
    }
}

// n elements; for a block type, n must be a whole number of blocks.
Weights make_weights(moesh_dtype type, size_t n, float scale, std::mt19937 & rng) {
    Weights w;
    w.values = uniform(n, -scale, scale, rng);
    if (is_block_type(type)) {
        quantize_blocks(type, w.values, scale, rng, w.bytes);
        for (size_t i = 0; i < n; ++i) {
            w.values[i] = moesh::ref::load_weight(w.bytes.data(), type, int64_t(i));   // exact
        }
        return w;
    }
    if (type == MOESH_DTYPE_F32) {
        w.bytes.resize(n * sizeof(float));
        std::memcpy(w.bytes.data(), w.values.data(), w.bytes.size());
        return w;
    }
    std::vector<uint16_t> bits(n);
    for (size_t i = 0; i < n; ++i) {
        if (type == MOESH_DTYPE_F16) {
            if (i % 97 == 13) {
                w.values[i] = float(int(i % 1000) - 500) * 0x1p-24f;   // f16 subnormals
            }
            bits[i] = moesh::ref::f32_to_f16(w.values[i]);
            w.values[i] = moesh::ref::f16_to_f32(bits[i]);
        } else {
            bits[i] = moesh::ref::f32_to_bf16(w.values[i]);
            w.values[i] = moesh::ref::bf16_to_f32(bits[i]);
        }
    }
    w.bytes.resize(bits.size() * sizeof(uint16_t));
    std::memcpy(w.bytes.data(), bits.data(), bits.size() * sizeof(uint16_t));
    return w;
}

// Activation rounding of block-type kernels. A backend may round activations
// to 8 bits with one scale per block of up to 256 values (ggml's Q8_0 uses 32,
// Q8_K 256; the cpu backend 32): |x - x_q| <= h = max|x over the block| / 254.
// h_i below uses the 256-aligned block around i, the largest such h for any
// block size up to 256. The rounding errors of random inputs are independent,
// so sum_i w_i (x_i - x_q,i) has standard deviation sqrt(sum (w_i h_i)^2 / 3);
// the bound 6 sqrt(sum (w_i h_i)^2) is over 10 of those, and for n <= 36 it is
// above the worst case sum |w_i h_i|. A dropped or misplaced 32-value block
// still moves a result by ~sqrt(32) rms(w x): 2-20 times this bound at the
// sizes below (each result of a wrong kernel has a fair chance to exceed it,
// and there are hundreds).
std::vector<double> act_half_steps(const float * x, int64_t n) {
    std::vector<double> h(static_cast<size_t>(n));
    for (int64_t b = 0; b < n; b += 256) {
        const int64_t e = std::min<int64_t>(n, b + 256);
        double amax = 0.0;
        for (int64_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(double(x[i])));
        std::fill(h.begin() + b, h.begin() + e, amax / 254.0);
    }
    return h;
}

double act_quant_error(const float * w, const std::vector<double> & h) {
    double sum_sq = 0.0;
    for (size_t i = 0; i < h.size(); ++i) sum_sq += (double(w[i]) * h[i]) * (double(w[i]) * h[i]);
    return 6.0 * std::sqrt(sum_sq);
}

// Integer kernels add the blocks' offsets (Q4_0's -8, mins, Q6_K's -32) as
// separate float terms, up to ~4x the magnitude of the final sum's terms.
constexpr double k_block_float_factor = 4.0;

// Largest error/bound ratio seen, printed when MOESH_CONFORMANCE_VERBOSE is
// set: how much headroom the bounds leave.
double g_worst_ratio = 0.0;

// |got[i] - ref[i]| <= bound[i] for every i (a bound of 0 means bit-exact).
::testing::AssertionResult within_bounds(const std::vector<float> & got, const std::vector<float> & ref,
                                         const std::vector<double> & bound) {
    if (got.size() != ref.size() || got.size() != bound.size()) {
        return ::testing::AssertionFailure() << "size mismatch";
    }
    size_t n_bad = 0;
    size_t first_bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double err = std::fabs(double(got[i]) - double(ref[i]));
        const bool exact = std::memcmp(&got[i], &ref[i], sizeof(float)) == 0;
        if (!exact && !(err <= bound[i])) {
            if (n_bad++ == 0) {
                first_bad = i;
            }
        } else if (bound[i] > 0.0) {
            g_worst_ratio = std::max(g_worst_ratio, err / bound[i]);
        }
    }
    if (n_bad > 0) {
        return ::testing::AssertionFailure()
               << n_bad << " of " << got.size() << " elements outside the bound; first at " << first_bad << ": got "
               << got[first_bad] << ", reference " << ref[first_bad] << ", |diff| "
               << std::fabs(double(got[first_bad]) - double(ref[first_bad])) << ", bound " << bound[first_bad];
    }
    return ::testing::AssertionSuccess();
}

// A buffer of the backend's memory.
class DeviceBuffer {
public:
    DeviceBuffer(const moesh_backend_iface * be, moesh_backend * ctx, size_t n_bytes) : be_(be), ctx_(ctx) {
        status_ = be_->buffer_alloc(ctx_, std::max<size_t>(n_bytes, 1), &ptr_);
    }
    DeviceBuffer(DeviceBuffer && o) noexcept : be_(o.be_), ctx_(o.ctx_), ptr_(o.ptr_), status_(o.status_) {
        o.ptr_ = nullptr;
    }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer & operator=(const DeviceBuffer &) = delete;
    DeviceBuffer & operator=(DeviceBuffer &&) = delete;
    ~DeviceBuffer() {
        if (ptr_) {
            be_->buffer_free(ctx_, ptr_);
        }
    }

    void * get() const { return ptr_; }
    template <class T>
    T * as() const { return static_cast<T *>(ptr_); }
    moesh_status status() const { return status_; }

private:
    const moesh_backend_iface * be_;
    moesh_backend * ctx_;
    void * ptr_ = nullptr;
    moesh_status status_;
};

class BackendConformance : public ::testing::TestWithParam<BackendCase> {
protected:
    void SetUp() override {
        // devsim is a test harness, not a backend: it does not check every argument as these tests
        // demand, so only its copy queue is held to them (as ctest runs it, tests/plugins/conformance).
        const std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
        if (std::string(GetParam().name) == "devsim" && test.rfind("Async", 0) != 0 &&
            !(test.find("Copy") != std::string::npos && test.find("Queue") != std::string::npos))
            GTEST_SKIP() << "devsim: only its copy queue is conformance-checked";
        const LoadedPlugin & p = load_plugin(plugin_path(GetParam().path));
        ASSERT_NE(p.init, nullptr) << p.error;
        if (p.score && p.score() < 0) {   // e.g. the cuda plugin on a machine without a GPU
            GTEST_SKIP() << GetParam().name << ": the plugin cannot run here (negative score)";
        }
        ASSERT_EQ(p.init(&k_host, &be_), MOESH_OK);
        ASSERT_NE(be_, nullptr);
        ctx_ = create_context();
        ASSERT_NE(ctx_, nullptr);
    }

    void TearDown() override {
        if (ctx_) {
            be_->destroy(ctx_);
        }
        if (std::getenv("MOESH_CONFORMANCE_VERBOSE")) {
            std::printf("worst error/bound ratio so far: %.3g\n", g_worst_ratio);
        }
    }

    moesh_backend * create_context(int32_t activations = MOESH_ACTIVATIONS_FAST) {
        moesh_backend_params params = {sizeof(moesh_backend_params), GetParam().n_threads, activations};
        moesh_backend * ctx = nullptr;
        EXPECT_EQ(be_->create(&params, &k_host, &ctx), MOESH_OK);
        return ctx;
    }

    const char * last_error() { return be_->last_error(ctx_); }

    template <class T>
    DeviceBuffer upload(const std::vector<T> & v) {
        DeviceBuffer b(be_, ctx_, v.size() * sizeof(T));
        EXPECT_EQ(b.status(), MOESH_OK) << last_error();
        if (!v.empty() && b.get()) {
            EXPECT_EQ(be_->copy_to_device(ctx_, b.get(), v.data(), v.size() * sizeof(T)), MOESH_OK) << last_error();
        }
        return b;
    }

    template <class T>
    std::vector<T> download(const DeviceBuffer & b, size_t n) {
        std::vector<T> v(n);
        EXPECT_EQ(be_->synchronize(ctx_), MOESH_OK) << last_error();
        EXPECT_EQ(be_->copy_to_host(ctx_, v.data(), b.get(), n * sizeof(T)), MOESH_OK) << last_error();
        return v;
    }

    // Whether op with w_type is offered; if not, the call must say so.
    bool offered(moesh_op op, moesh_dtype w_type) {
        const int32_t s = be_->supports(ctx_, op, w_type);
        if (GetParam().all_weight_types) {
            EXPECT_EQ(s, 1) << "op " << op << " with " << dtype_name(w_type);
        }
        return s != 0;
    }

    // Whether op takes w_type packed: the plugin has the optional pack slots
    // and says so. A plugin with the slots must pack what it says it takes.
    bool packs(moesh_op op, moesh_dtype w_type) {
        return be_->packed_size && be_->pack_weights &&
               be_->supports(ctx_, op, int32_t(w_type) | MOESH_DTYPE_PACKED) != 0;
    }

    // w (GGUF layout, [n_rows, n_cols] of w_type) packed into a backend buffer.
    DeviceBuffer pack(moesh_dtype w_type, const std::vector<uint8_t> & w, int64_t n_rows, int64_t n_cols) {
        size_t n = 0;
        EXPECT_EQ(be_->packed_size(ctx_, w_type, n_rows, n_cols, &n), MOESH_OK) << last_error();
        DeviceBuffer b(be_, ctx_, n);
        EXPECT_EQ(b.status(), MOESH_OK) << last_error();
        EXPECT_EQ(be_->pack_weights(ctx_, w_type, w.data(), n_rows, n_cols, b.get(), n), MOESH_OK) << last_error();
        return b;
    }

    const moesh_backend_iface * be_ = nullptr;
    moesh_backend * ctx_ = nullptr;
};

// ------------------------------------------------------------------ matmul

TEST_P(BackendConformance, MatmulMatchesReference) {
    struct Shape {
        int64_t n_in, n_out, n_tokens, x_pad, y_pad;
        bool bias;
    };
    const Shape shapes[] = {
        {1, 1, 1, 0, 0, false},    {7, 5, 1, 0, 0, true},      {13, 9, 3, 3, 2, false},
        {64, 33, 17, 0, 0, true},  {100, 70, 2, 5, 1, true},   {2048, 37, 1, 0, 0, false},
        {517, 64, 17, 0, 0, false}, {31, 5, 40, 0, 0, true},   // few rows, many tokens
        {300, 8, 70, 1, 3, false},  {5000, 6, 17, 0, 0, true}, // tokens in several blocks
    };
    // Block types, in blocks (32 or 256 values): odd block counts; n_out not a
    // multiple of 4; n_tokens 1..9, 17 and 70; strides past the row; one-token
    // rows whose 32-value groups are not a multiple of 16 (decode chunks).
    struct BlockShape {
        int64_t n_blocks_32, n_blocks_256, n_out, n_tokens, x_pad, y_pad;
        bool bias;
    };
    const BlockShape block_shapes[] = {
        {1, 1, 1, 1, 0, 0, false},   {1, 1, 5, 3, 3, 2, true},    {3, 3, 33, 9, 0, 0, true},
        {5, 5, 70, 2, 5, 1, false},  {65, 9, 37, 1, 0, 0, true},  {7, 3, 8, 70, 1, 3, false},
        {127, 16, 6, 17, 0, 0, true}, {2, 2, 9, 4, 0, 0, false},  {3, 1, 18, 5, 40, 0, false},
        {2, 2, 23, 6, 0, 0, true},   {1, 1, 13, 7, 0, 0, false},  {4, 2, 11, 8, 0, 5, true},
        {9, 3, 10, 1, 7, 0, false},
    };
    std::mt19937 rng(1);
    for (moesh_dtype type : k_weight_types) {
        std::vector<Shape> type_shapes(std::begin(shapes), std::end(shapes));
        if (is_block_type(type)) {
            type_shapes.clear();
            for (const BlockShape & b : block_shapes) {
                const int64_t n_in = block_elems(type) == 32 ? 32 * b.n_blocks_32 : 256 * b.n_blocks_256;
                type_shapes.push_back({n_in, b.n_out, b.n_tokens, b.x_pad, b.y_pad, b.bias});
            }
        }
        for (const Shape & s : type_shapes) {
            SCOPED_TRACE(testing::Message() << dtype_name(type) << " n_in " << s.n_in << " n_out " << s.n_out
                                            << " n_tokens " << s.n_tokens);
            const int64_t x_stride = s.n_in + s.x_pad;
            const int64_t y_stride = s.n_out + s.y_pad;
            const Weights w = make_weights(type, size_t(s.n_out * s.n_in), 1.0f, rng);
            const std::vector<float> x = uniform(size_t(s.n_tokens * x_stride), -1.0f, 1.0f, rng);
            const std::vector<float> bias = s.bias ? uniform(size_t(s.n_out), -1.0f, 1.0f, rng) : std::vector<float>();
            const std::vector<float> y0(size_t(s.n_tokens * y_stride), k_sentinel);
            DeviceBuffer d_w = upload(w.bytes);
            DeviceBuffer d_x = upload(x);
            DeviceBuffer d_bias = upload(bias);
            DeviceBuffer d_y = upload(y0);
            moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args),
                                   .w_type = type,
                                   .w = d_w.get(),
                                   .bias = s.bias ? d_bias.as<float>() : nullptr,
                                   .x = d_x.as<float>(),
                                   .y = d_y.as<float>(),
                                   .n_in = s.n_in,
                                   .n_out = s.n_out,
                                   .n_tokens = s.n_tokens,
                                   .x_stride = x_stride,
                                   .y_stride = y_stride};
            if (!offered(MOESH_OP_MATMUL, type)) {
                EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_ERR_UNSUPPORTED);
                continue;
            }
            ASSERT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> y = download<float>(d_y, y0.size());

            std::vector<float> y_ref = y0;
            moesh_matmul_args r = a;
            r.w = w.bytes.data();
            r.bias = s.bias ? bias.data() : nullptr;
            r.x = x.data();
            r.y = y_ref.data();
            moesh::ref::matmul(r);

            // One float32 sum of n_in products and the bias, plus the activations'
            // rounding for block types; padding untouched.
            const bool block = is_block_type(type);
            std::vector<double> bound(y0.size(), 0.0);
            for (int64_t t = 0; t < s.n_tokens; ++t) {
                const std::vector<double> h = block ? act_half_steps(x.data() + t * x_stride, s.n_in)
                                                    : std::vector<double>();
                for (int64_t o = 0; o < s.n_out; ++o) {
                    double mag = s.bias ? std::fabs(bias[size_t(o)]) : 0.0;
                    for (int64_t i = 0; i < s.n_in; ++i) {
                        mag += std::fabs(double(w.values[size_t(o * s.n_in + i)]) * x[size_t(t * x_stride + i)]);
                    }
                    const size_t k = size_t(t * y_stride + o);
                    bound[k] = sum_error(s.n_in + 1) * mag * (block ? k_block_float_factor : 1.0) +
                               k_u * std::fabs(y_ref[k]) + k_tiny;
                    if (block) {
                        bound[k] += act_quant_error(w.values.data() + o * s.n_in, h);
                    }
                }
            }
            EXPECT_TRUE(within_bounds(y, y_ref, bound));
            if (packs(MOESH_OP_MATMUL, type)) {   // the same call on packed weights
                DeviceBuffer d_p = pack(type, w.bytes, s.n_out, s.n_in);
                DeviceBuffer d_yp = upload(y0);
                moesh_matmul_args p = a;
                p.w_type = int32_t(type) | MOESH_DTYPE_PACKED;
                p.w = d_p.get();
                p.y = d_yp.as<float>();
                ASSERT_EQ(be_->matmul(ctx_, &p), MOESH_OK) << last_error();
                EXPECT_TRUE(within_bounds(download<float>(d_yp, y0.size()), y_ref, bound)) << "packed";
            }
        }
    }
}

// A NaN in a token's activations makes all of that token's outputs NaN, as in
// the reference (block types too, whose activation scales it must not slip past).
TEST_P(BackendConformance, MatmulPropagatesNanActivations) {
    std::mt19937 rng(9);
    for (moesh_dtype type : k_weight_types) {
        SCOPED_TRACE(dtype_name(type));
        const int64_t n_in = is_block_type(type) ? 2 * block_elems(type) : 70, n_out = 6, n_tokens = 3;
        const Weights w = make_weights(type, size_t(n_out * n_in), 1.0f, rng);
        std::vector<float> x = uniform(size_t(n_tokens * n_in), -1.0f, 1.0f, rng);
        x[size_t(n_in + 37)] = k_nan;   // token 1
        DeviceBuffer d_w = upload(w.bytes);
        DeviceBuffer d_x = upload(x);
        DeviceBuffer d_y = upload(std::vector<float>(size_t(n_tokens * n_out), 0.0f));
        moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args), .w_type = type, .w = d_w.get(),
                               .bias = nullptr, .x = d_x.as<float>(), .y = d_y.as<float>(), .n_in = n_in,
                               .n_out = n_out, .n_tokens = n_tokens, .x_stride = n_in, .y_stride = n_out};
        if (!offered(MOESH_OP_MATMUL, type)) {
            continue;
        }
        ASSERT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
        const std::vector<float> y = download<float>(d_y, size_t(n_tokens * n_out));
        for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t o = 0; o < n_out; ++o) {
                EXPECT_EQ(std::isnan(y[size_t(t * n_out + o)]), t == 1) << "token " << t << " row " << o;
            }
        }
    }
}

// -------------------------------------------------------------- expert_ffn

// Bound on |out - ref| for one expert, by first-order propagation of float32
// rounding (and, for block types, of the activations' 8-bit rounding: q(w, x)
// = act_quant_error, 0 for element types; f = k_block_float_factor, else 1):
//   g = gate.x, u = up.x:     e_g = f sum_error(n_embd) * sum|gate x| + q(gate, x), e_u alike
//   h = silu(g) * u:          |silu'(g) u| e_g + |silu(g)| e_u + 8u|h| (exp, add, divide, multiply)
//   d = down.h:               sum_f |down_ef| e_h,f + f sum_error(n_ff) * sum_f |down_ef h_f| + q(down, h)
//   out += scale * d:         |scale| e_d + 2u (|out_0| + |scale d|) + u|out|
std::vector<double> expert_ffn_bound(const moesh_expert_ffn_args & a, const Weights & gate, const Weights & up,
                                     const Weights & down, const std::vector<float> & out0,
                                     const std::vector<float> & out_ref) {
    const bool block = is_block_type(moesh_dtype(a.w_type));
    const double f_float = block ? k_block_float_factor : 1.0;
    const size_t n_embd = size_t(a.n_embd);
    const size_t n_ff = size_t(a.n_ff);
    std::vector<double> h(size_t(a.n_tokens) * n_ff);     // [n_tokens, n_ff]
    std::vector<double> e_h(size_t(a.n_tokens) * n_ff);   // [n_tokens, n_ff]
    for (size_t t = 0; t < size_t(a.n_tokens); ++t) {
        const float * x = a.x + t * n_embd;
        const std::vector<double> hx = block ? act_half_steps(x, a.n_embd) : std::vector<double>();
        for (size_t f = 0; f < n_ff; ++f) {
            double g = 0, g_mag = 0, u = 0, u_mag = 0;
            for (size_t i = 0; i < n_embd; ++i) {
                g += double(gate.values[f * n_embd + i]) * x[i];
                g_mag += std::fabs(double(gate.values[f * n_embd + i]) * x[i]);
                u += double(up.values[f * n_embd + i]) * x[i];
                u_mag += std::fabs(double(up.values[f * n_embd + i]) * x[i]);
            }
            const double sig = 1.0 / (1.0 + std::exp(-g));
            const double silu = g * sig;
            const double d_silu = sig * (1.0 + g * (1.0 - sig));
            double e_g = f_float * sum_error(a.n_embd) * g_mag;
            double e_u = f_float * sum_error(a.n_embd) * u_mag;
            if (block) {
                e_g += act_quant_error(gate.values.data() + f * n_embd, hx);
                e_u += act_quant_error(up.values.data() + f * n_embd, hx);
            }
            h[t * n_ff + f] = silu * u;
            e_h[t * n_ff + f] = std::fabs(d_silu * u) * e_g + std::fabs(silu) * e_u + e_g * e_u +
                                8.0 * k_u * std::fabs(silu * u);
        }
    }
    std::vector<double> bound(out_ref.size());
    for (size_t t = 0; t < size_t(a.n_tokens); ++t) {
        const double scale = a.scale ? a.scale[t] : 1.0;
        std::vector<double> hh;
        if (block) {
            // Steps of the backend's h, which is within e_h of the reference h.
            std::vector<float> h_upper(n_ff);
            for (size_t f = 0; f < n_ff; ++f) {
                h_upper[f] = float(std::fabs(h[t * n_ff + f]) + e_h[t * n_ff + f]);
            }
            hh = act_half_steps(h_upper.data(), a.n_ff);
        }
        for (size_t e = 0; e < n_embd; ++e) {
            double d = 0, propagated = 0, mag = 0;
            for (size_t f = 0; f < n_ff; ++f) {
                const double w = down.values[e * n_ff + f];
                d += w * h[t * n_ff + f];
                propagated += std::fabs(w) * e_h[t * n_ff + f];
                mag += std::fabs(w * h[t * n_ff + f]);
            }
            double e_d = propagated + f_float * sum_error(a.n_ff) * mag;
            if (block) {
                e_d += act_quant_error(down.values.data() + e * n_ff, hh);
            }
            const size_t k = t * n_embd + e;
            bound[k] = std::fabs(scale) * e_d + 2.0 * k_u * (std::fabs(out0[k]) + std::fabs(scale * d)) +
                       k_u * std::fabs(out_ref[k]) + k_tiny;
        }
    }
    return bound;
}

TEST_P(BackendConformance, ExpertFfnMatchesReference) {
    struct Shape {
        int64_t n_embd, n_ff, n_tokens;
        bool scale;
    };
    const Shape shapes[] = {
        {8, 16, 1, false}, {13, 7, 3, true},   {64, 96, 17, true},
        {37, 51, 2, false}, {256, 704, 5, true}, {1000, 300, 20, true},
    };
    // Block types, in blocks (32 or 256 values): odd block counts included;
    // 33 tokens: several experts' worth of a prompt.
    const Shape block_shapes_32[] = {
        {1, 1, 1, false}, {3, 5, 3, true}, {2, 3, 17, true}, {9, 7, 17, true}, {1, 3, 2, false},
        {3, 2, 33, true}, {5, 9, 1, true}, {2, 1, 6, false},
    };
    const Shape block_shapes_256[] = {
        {1, 1, 1, false}, {1, 2, 3, true}, {2, 1, 9, true}, {3, 2, 1, true}, {1, 1, 33, false}, {2, 3, 5, false},
    };
    std::mt19937 rng(2);
    for (moesh_dtype type : k_weight_types) {
        std::vector<Shape> type_shapes(std::begin(shapes), std::end(shapes));
        if (is_block_type(type)) {
            type_shapes.clear();
            const int64_t b = block_elems(type);
            for (const Shape & bs : b == 32 ? std::vector<Shape>(std::begin(block_shapes_32), std::end(block_shapes_32))
                                            : std::vector<Shape>(std::begin(block_shapes_256), std::end(block_shapes_256))) {
                type_shapes.push_back({bs.n_embd * b, bs.n_ff * b, bs.n_tokens, bs.scale});
            }
        }
        for (const Shape & s : type_shapes) {
            SCOPED_TRACE(testing::Message() << dtype_name(type) << " n_embd " << s.n_embd << " n_ff " << s.n_ff
                                            << " n_tokens " << s.n_tokens);
            const size_t n_w = size_t(s.n_ff * s.n_embd);
            const Weights gate = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_embd)), rng);
            const Weights up = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_embd)), rng);
            const Weights down = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_ff)), rng);
            const std::vector<float> x = uniform(size_t(s.n_tokens * s.n_embd), -1.0f, 1.0f, rng);
            const std::vector<float> scale = s.scale ? uniform(size_t(s.n_tokens), 0.0f, 1.0f, rng) : std::vector<float>();
            const std::vector<float> out0 = uniform(size_t(s.n_tokens * s.n_embd), -1.0f, 1.0f, rng);
            DeviceBuffer d_gate = upload(gate.bytes);
            DeviceBuffer d_up = upload(up.bytes);
            DeviceBuffer d_down = upload(down.bytes);
            DeviceBuffer d_x = upload(x);
            DeviceBuffer d_scale = upload(scale);
            DeviceBuffer d_out = upload(out0);
            DeviceBuffer d_scratch(be_, ctx_, size_t(2 * s.n_tokens * s.n_ff) * sizeof(float));
            moesh_expert_ffn_args a = {.struct_size = sizeof(moesh_expert_ffn_args),
                                       .w_type = type,
                                       .gate = d_gate.get(),
                                       .up = d_up.get(),
                                       .down = d_down.get(),
                                       .x = d_x.as<float>(),
                                       .scale = s.scale ? d_scale.as<float>() : nullptr,
                                       .out = d_out.as<float>(),
                                       .scratch = d_scratch.as<float>(),
                                       .n_embd = s.n_embd,
                                       .n_ff = s.n_ff,
                                       .n_tokens = s.n_tokens};
            if (!offered(MOESH_OP_EXPERT_FFN, type)) {
                EXPECT_EQ(be_->expert_ffn(ctx_, &a), MOESH_ERR_UNSUPPORTED);
                continue;
            }
            ASSERT_EQ(be_->expert_ffn(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> out = download<float>(d_out, out0.size());

            std::vector<float> out_ref = out0;
            moesh_expert_ffn_args r = a;
            r.gate = gate.bytes.data();
            r.up = up.bytes.data();
            r.down = down.bytes.data();
            r.x = x.data();
            r.scale = s.scale ? scale.data() : nullptr;
            r.out = out_ref.data();
            r.scratch = nullptr;
            moesh::ref::expert_ffn(r);
            const std::vector<double> bound = expert_ffn_bound(r, gate, up, down, out0, out_ref);
            EXPECT_TRUE(within_bounds(out, out_ref, bound));
            if (packs(MOESH_OP_EXPERT_FFN, type)) {   // the same call on packed weights
                DeviceBuffer p_gate = pack(type, gate.bytes, s.n_ff, s.n_embd);
                DeviceBuffer p_up = pack(type, up.bytes, s.n_ff, s.n_embd);
                DeviceBuffer p_down = pack(type, down.bytes, s.n_embd, s.n_ff);
                DeviceBuffer d_out_p = upload(out0);
                moesh_expert_ffn_args p = a;
                p.w_type = int32_t(type) | MOESH_DTYPE_PACKED;
                p.gate = p_gate.get();
                p.up = p_up.get();
                p.down = p_down.get();
                p.out = d_out_p.as<float>();
                ASSERT_EQ(be_->expert_ffn(ctx_, &p), MOESH_OK) << last_error();
                EXPECT_TRUE(within_bounds(download<float>(d_out_p, out0.size()), out_ref, bound)) << "packed";
            }
        }
    }
}

// A token's result must not depend on the tokens it is batched with: continuous batching puts a
// request's tokens beside others', and a greedy answer should not change with the server's load.
// Each token of a batch against the same token alone: the same bits for block types, to float
// rounding for float ones (far below the 8-bit activations' rounding; a last-bit difference in h can
// round to the next 8-bit step before the down projection; SmolLM2's Q4_1 logits were 0.25 apart
// alone and batched while the cpu backend's one-token kernel added Q4_0/Q4_1 offsets every 8
// groups and the batched one at the end, and scaled each K-quant group where the batched one
// scales a super-block's int32 sum).
TEST_P(BackendConformance, ATokensResultDoesNotDependOnItsBatch) {
    std::mt19937 rng(5);
    for (moesh_dtype type : k_weight_types) {
        const int64_t b = is_block_type(type) && block_elems(type) == 256 ? 256 : 32;
        const int64_t n_in = (b == 32 ? 18 : 3) * b, n_out = 64, n_ff = (b == 32 ? 48 : 6) * b;   // SmolLM2-135M's: 18 groups, not whole vectors of 8
        for (int64_t n_tokens : {2, 17}) {
            SCOPED_TRACE(testing::Message() << dtype_name(type) << " n_tokens " << n_tokens);
            const std::vector<float> x = uniform(size_t(n_tokens * n_in), -1.0f, 1.0f, rng);
            // block types: the same bits (the kernels do the same integer and float steps for every
            // batch); float types: to rounding
            const double tol = is_block_type(type) ? 0.0 : 1e-5;
            auto close = [tol](const float * got, const float * want, int64_t n) {
                double mag = 0;
                for (int64_t i = 0; i < n; ++i) mag = std::max(mag, std::fabs(double(want[i])));
                double worst = 0;
                for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(got[i]) - double(want[i])));
                return worst <= tol * (mag + 1.0);
            };
            if (offered(MOESH_OP_MATMUL, type)) {
                const Weights w = make_weights(type, size_t(n_out * n_in), 1.0f, rng);
                for (const bool packed : {false, true}) {
                    if (packed && !packs(MOESH_OP_MATMUL, type)) continue;
                    DeviceBuffer d_w = packed ? pack(type, w.bytes, n_out, n_in) : upload(w.bytes);
                    auto run = [&](int64_t t0, int64_t n) {
                        DeviceBuffer d_x = upload(std::vector<float>(x.begin() + t0 * n_in, x.begin() + (t0 + n) * n_in));
                        DeviceBuffer d_y = upload(std::vector<float>(size_t(n * n_out), 0.0f));
                        moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args),
                                               .w_type = int32_t(type) | (packed ? MOESH_DTYPE_PACKED : 0), .w = d_w.get(),
                                               .bias = nullptr, .x = d_x.as<float>(), .y = d_y.as<float>(), .n_in = n_in,
                                               .n_out = n_out, .n_tokens = n, .x_stride = n_in, .y_stride = n_out};
                        EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
                        return download<float>(d_y, size_t(n * n_out));
                    };
                    const std::vector<float> all = run(0, n_tokens);
                    for (int64_t t = 0; t < n_tokens; ++t)
                        EXPECT_TRUE(close(all.data() + t * n_out, run(t, 1).data(), n_out)) << "matmul, token " << t << (packed ? ", packed" : "");
                }
            }
            if (offered(MOESH_OP_EXPERT_FFN, type)) {
                const size_t n_w = size_t(n_ff * n_in);
                const Weights gate = make_weights(type, n_w, 3.0f / std::sqrt(float(n_in)), rng);
                const Weights up = make_weights(type, n_w, 3.0f / std::sqrt(float(n_in)), rng);
                const Weights down = make_weights(type, n_w, 3.0f / std::sqrt(float(n_ff)), rng);
                DeviceBuffer d_gate = upload(gate.bytes), d_up = upload(up.bytes), d_down = upload(down.bytes);
                auto run = [&](int64_t t0, int64_t n) {
                    DeviceBuffer d_x = upload(std::vector<float>(x.begin() + t0 * n_in, x.begin() + (t0 + n) * n_in));
                    DeviceBuffer d_out = upload(std::vector<float>(size_t(n * n_in), 0.0f));
                    DeviceBuffer d_scratch(be_, ctx_, size_t(2 * n * n_ff) * sizeof(float));
                    moesh_expert_ffn_args a = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = type, .gate = d_gate.get(),
                                               .up = d_up.get(), .down = d_down.get(), .x = d_x.as<float>(), .scale = nullptr,
                                               .out = d_out.as<float>(), .scratch = d_scratch.as<float>(), .n_embd = n_in,
                                               .n_ff = n_ff, .n_tokens = n};
                    EXPECT_EQ(be_->expert_ffn(ctx_, &a), MOESH_OK) << last_error();
                    return download<float>(d_out, size_t(n * n_in));
                };
                const std::vector<float> all = run(0, n_tokens);
                for (int64_t t = 0; t < n_tokens; ++t)
                    EXPECT_TRUE(close(all.data() + t * n_in, run(t, 1).data(), n_in)) << "expert_ffn, token " << t;
            }
        }
    }
}

// moe_ffn (optional) must equal expert_ffn over each expert's rows, experts in
// order (which the test above holds to the reference): the same kernels on the
// same rows, so only the order of the final additions may differ (a few ulp).
TEST_P(BackendConformance, MoeFfnEqualsExpertFfnPerExpert) {
    if (!be_->moe_ffn || !be_->host_memory) {
        GTEST_SKIP() << "no moe_ffn (or not a host-memory backend, whose buffers this test reads directly)";
    }
    struct Shape {
        int64_t n_embd, n_ff, n_tokens, n_experts, top_k;   // n_embd, n_ff in blocks
        bool weights;
    };
    const Shape shapes[] = {{1, 1, 1, 2, 2, true},  {3, 5, 1, 8, 2, true},  {2, 3, 17, 5, 2, false},
                            {3, 4, 33, 8, 2, true}, {2, 5, 7, 4, 3, true},  {1, 2, 64, 6, 1, true}};
    std::mt19937 rng(11);
    for (moesh_dtype base : k_weight_types) {
        if (!is_block_type(base)) continue;
        for (const bool packed : {false, true}) {
            const int32_t type = int32_t(base) | (packed ? MOESH_DTYPE_PACKED : 0);
            if (packed && !packs(MOESH_OP_MOE_FFN, base)) continue;
            if (!be_->supports(ctx_, MOESH_OP_MOE_FFN, type)) continue;
            for (const Shape & sh : shapes) {
                // K-quant blocks are 256 wide: fewer of them keep the test fast
                const int64_t b = block_elems(base), n_embd = (b == 32 ? sh.n_embd : 1) * b,
                              n_ff = (b == 32 ? sh.n_ff : std::min<int64_t>(sh.n_ff, 2)) * b;
                SCOPED_TRACE(testing::Message() << dtype_name(base) << (packed ? " packed" : "") << " n_embd " << n_embd
                                                << " n_ff " << n_ff << " n_tokens " << sh.n_tokens);
                std::vector<Weights> w;   // gate, up, down of each expert
                std::vector<DeviceBuffer> d_w;
                for (int64_t e = 0; e < sh.n_experts; ++e) {
                    for (int m = 0; m < 3; ++m) {
                        w.push_back(make_weights(base, size_t(n_embd * n_ff), 3.0f / std::sqrt(float(m < 2 ? n_embd : n_ff)), rng));
                        d_w.push_back(packed ? pack(base, w.back().bytes, m < 2 ? n_ff : n_embd, m < 2 ? n_embd : n_ff)
                                             : upload(w.back().bytes));
                    }
                }
                // Routing: top_k distinct experts per token, never the last (an expert without tokens).
                std::vector<std::vector<int32_t>> toks(size_t(sh.n_experts));
                for (int64_t t = 0; t < sh.n_tokens; ++t) {
                    std::vector<int32_t> ids(size_t(sh.n_experts - 1));
                    std::iota(ids.begin(), ids.end(), 0);
                    std::shuffle(ids.begin(), ids.end(), rng);
                    for (int64_t k = 0; k < std::min<int64_t>(sh.top_k, sh.n_experts - 1); ++k) toks[size_t(ids[size_t(k)])].push_back(int32_t(t));
                }
                std::vector<moesh_moe_expert> ex;
                std::vector<int32_t> token;
                for (int64_t e = 0; e < sh.n_experts; ++e) {
                    ex.push_back({d_w[size_t(3 * e)].get(), d_w[size_t(3 * e + 1)].get(), d_w[size_t(3 * e + 2)].get(),
                                  int64_t(token.size()), int64_t(toks[size_t(e)].size())});
                    token.insert(token.end(), toks[size_t(e)].begin(), toks[size_t(e)].end());
                }
                const int64_t n_pairs = int64_t(token.size());
                const std::vector<float> weight = uniform(size_t(n_pairs), 0.0f, 1.0f, rng);
                const std::vector<float> x = uniform(size_t(sh.n_tokens * n_embd), -1.0f, 1.0f, rng);
                const std::vector<float> out0 = uniform(size_t(sh.n_tokens * n_embd), -1.0f, 1.0f, rng);
                std::vector<float> out = out0, scratch(size_t(n_pairs * n_ff));
                const moesh_moe_ffn_args a = {.struct_size = sizeof(moesh_moe_ffn_args), .w_type = type,
                                              .experts = ex.data(), .token = token.data(),
                                              .weight = sh.weights ? weight.data() : nullptr, .x = x.data(),
                                              .out = out.data(), .scratch = scratch.data(), .n_embd = n_embd,
                                              .n_ff = n_ff, .n_tokens = sh.n_tokens, .n_experts = sh.n_experts,
                                              .n_pairs = n_pairs};
                ASSERT_EQ(be_->moe_ffn(ctx_, &a), MOESH_OK) << last_error();

                std::vector<float> want = out0, s2(size_t(2 * sh.n_tokens * n_ff));
                std::vector<double> mag(out0.size());   // |out0| + the contributions' magnitudes
                for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::fabs(double(out0[i]));
                for (int64_t e = 0; e < sh.n_experts; ++e) {
                    const std::vector<int32_t> & te = toks[size_t(e)];
                    if (te.empty()) continue;
                    std::vector<float> xe, oe(te.size() * size_t(n_embd), 0.0f);
                    for (int32_t t : te) xe.insert(xe.end(), x.begin() + t * n_embd, x.begin() + (t + 1) * n_embd);
                    const moesh_expert_ffn_args f = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = type,
                                                     .gate = ex[size_t(e)].gate, .up = ex[size_t(e)].up,
                                                     .down = ex[size_t(e)].down, .x = xe.data(),
                                                     .scale = sh.weights ? weight.data() + ex[size_t(e)].first : nullptr,
                                                     .out = oe.data(), .scratch = s2.data(), .n_embd = n_embd,
                                                     .n_ff = n_ff, .n_tokens = int64_t(te.size())};
                    ASSERT_EQ(be_->expert_ffn(ctx_, &f), MOESH_OK) << last_error();
                    for (size_t i = 0; i < te.size(); ++i)
                        for (int64_t c = 0; c < n_embd; ++c) {
                            want[size_t(te[i] * n_embd + c)] += oe[i * size_t(n_embd) + size_t(c)];
                            mag[size_t(te[i] * n_embd + c)] += std::fabs(double(oe[i * size_t(n_embd) + size_t(c)]));
                        }
                }
                std::vector<double> bound(want.size());
                for (size_t i = 0; i < want.size(); ++i)
                    bound[i] = 4.0 * FLT_EPSILON * mag[i];
                EXPECT_TRUE(within_bounds(out, want, bound));
            }
        }
    }
}

// MOESH_ACTIVATIONS_PRECISE promises an activation rounding error at least
// 100x below FAST's: measured against the reference on the same inputs, the
// precise context's largest error must be under 1/100 of the fast one's (which
// must be visible at all), for matmul and expert_ffn of every block type.
TEST_P(BackendConformance, PreciseActivationsCutTheRoundingError) {
    if (!be_->host_memory) {
        GTEST_SKIP() << "written for host-memory backends that round activations to 8 bits";
    }
    moesh_backend * precise = create_context(MOESH_ACTIVATIONS_PRECISE);
    ASSERT_NE(precise, nullptr);
    std::mt19937 rng(9);
    auto worst = [](const std::vector<float> & a, const std::vector<float> & b) {
        double w = 0;
        for (size_t i = 0; i < a.size(); ++i) w = std::max(w, double(std::fabs(a[i] - b[i])));
        return w;
    };
    for (moesh_dtype type : k_weight_types) {
        if (!is_block_type(type) || !offered(MOESH_OP_MATMUL, type)) continue;
        SCOPED_TRACE(dtype_name(type));
        const int64_t n_in = 2 * 256, n_out = 24, n_ff = 256;
        for (int64_t n_tokens : {int64_t(1), int64_t(9)}) {
            const Weights w = make_weights(type, size_t(n_out * n_in), 3.0f / std::sqrt(float(n_in)), rng);
            const std::vector<float> x = uniform(size_t(n_tokens * n_in), -1.0f, 1.0f, rng);
            std::vector<float> ref(size_t(n_tokens * n_out)), fast(ref.size()), prec(ref.size());
            moesh_matmul_args a = {sizeof(moesh_matmul_args), type, w.bytes.data(), nullptr, x.data(), fast.data(),
                                   n_in, n_out, n_tokens, n_in, n_out};
            ASSERT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
            a.y = prec.data();
            ASSERT_EQ(be_->matmul(precise, &a), MOESH_OK) << be_->last_error(precise);
            a.y = ref.data();
            moesh::ref::matmul(a);
            const double e_fast = worst(fast, ref), e_prec = worst(prec, ref);
            EXPECT_GT(e_fast, 0.0) << "fast mode shows no rounding at all: is it still 8-bit?";
            EXPECT_LT(e_prec, e_fast / 100.0) << "matmul, " << n_tokens << " tokens";
            if (packs(MOESH_OP_MATMUL, type)) {
                DeviceBuffer d_p = pack(type, w.bytes, n_out, n_in);
                moesh_matmul_args p = a;
                p.w_type = int32_t(type) | MOESH_DTYPE_PACKED;
                p.w = d_p.get();
                p.y = prec.data();
                ASSERT_EQ(be_->matmul(precise, &p), MOESH_OK) << be_->last_error(precise);
                EXPECT_LT(worst(prec, ref), e_fast / 100.0) << "packed matmul, " << n_tokens << " tokens";
            }

            const Weights gate = make_weights(type, size_t(n_ff * n_in), 3.0f / std::sqrt(float(n_in)), rng);
            const Weights up = make_weights(type, size_t(n_ff * n_in), 3.0f / std::sqrt(float(n_in)), rng);
            const Weights down = make_weights(type, size_t(n_in * n_ff), 3.0f / std::sqrt(float(n_ff)), rng);
            const std::vector<float> scale = uniform(size_t(n_tokens), 0.0f, 1.0f, rng);
            std::vector<float> scratch(size_t(2 * n_tokens * n_ff));
            std::vector<float> o_ref(size_t(n_tokens * n_in), 0.0f), o_fast = o_ref, o_prec = o_ref;
            moesh_expert_ffn_args f = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = type,
                                       .gate = gate.bytes.data(), .up = up.bytes.data(), .down = down.bytes.data(),
                                       .x = x.data(), .scale = scale.data(), .out = o_fast.data(),
                                       .scratch = scratch.data(), .n_embd = n_in, .n_ff = n_ff, .n_tokens = n_tokens};
            ASSERT_EQ(be_->expert_ffn(ctx_, &f), MOESH_OK) << last_error();
            f.out = o_prec.data();
            ASSERT_EQ(be_->expert_ffn(precise, &f), MOESH_OK) << be_->last_error(precise);
            f.out = o_ref.data();
            f.scratch = nullptr;
            moesh::ref::expert_ffn(f);
            const double f_fast = worst(o_fast, o_ref), f_prec = worst(o_prec, o_ref);
            EXPECT_GT(f_fast, 0.0);
            EXPECT_LT(f_prec, f_fast / 100.0) << "expert_ffn, " << n_tokens << " tokens";
        }
    }
    be_->destroy(precise);
}

// Packing refuses what it does not pack, and ops refuse packed weights whose
// header says another type or shape.
TEST_P(BackendConformance, PackedWeightsAreCheckedAgainstTheCall) {
    if (!packs(MOESH_OP_MATMUL, MOESH_DTYPE_Q8_0)) {
        GTEST_SKIP() << "the backend does not pack q8_0";
    }
    size_t n = 0;
    EXPECT_EQ(be_->packed_size(ctx_, MOESH_DTYPE_F32, 8, 32, &n), MOESH_ERR_UNSUPPORTED);
    EXPECT_EQ(be_->packed_size(ctx_, MOESH_DTYPE_Q8_0, 8, 33, &n), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(be_->packed_size(ctx_, MOESH_DTYPE_Q8_0, 0, 32, &n), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(be_->packed_size(ctx_, MOESH_DTYPE_Q8_0, INT64_MAX / 2, 1 << 20, &n), MOESH_ERR_INVALID_ARGUMENT);
    std::mt19937 rng(4);
    const int64_t n_out = 12, n_in = 64;
    const Weights w = make_weights(MOESH_DTYPE_Q8_0, size_t(n_out * n_in), 1.0f, rng);
    ASSERT_EQ(be_->packed_size(ctx_, MOESH_DTYPE_Q8_0, n_out, n_in, &n), MOESH_OK);
    std::vector<uint8_t> small(n - 1);
    EXPECT_EQ(be_->pack_weights(ctx_, MOESH_DTYPE_Q8_0, w.bytes.data(), n_out, n_in, small.data(), small.size()),
              MOESH_ERR_INVALID_ARGUMENT);
    DeviceBuffer d_p = pack(MOESH_DTYPE_Q8_0, w.bytes, n_out, n_in);
    const std::vector<float> x = uniform(size_t(2 * n_in), -1.0f, 1.0f, rng);
    std::vector<float> y(size_t(2 * n_out));
    moesh_matmul_args a = {sizeof(moesh_matmul_args), MOESH_DTYPE_Q8_0 | MOESH_DTYPE_PACKED, d_p.get(), nullptr,
                           x.data(), y.data(), n_in, n_out, 2, n_in, n_out};
    EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
    a.n_out = n_out - 1;   // another shape
    EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(last_error()).find("pack_weights"), std::string::npos) << last_error();
    a.n_out = n_out;
    a.w_type = MOESH_DTYPE_Q4_0 | MOESH_DTYPE_PACKED;   // another type
    EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_ERR_INVALID_ARGUMENT);
    a.w_type = MOESH_DTYPE_Q8_0 | MOESH_DTYPE_PACKED;
    a.w = w.bytes.data();   // not packed at all
    EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_ERR_INVALID_ARGUMENT);
    a.w_type = MOESH_DTYPE_Q4_K | MOESH_DTYPE_PACKED;   // a type it never packs
    EXPECT_EQ(be_->matmul(ctx_, &a), MOESH_ERR_UNSUPPORTED);
}

// ctest runs this suite a second time with MOESH_CPU_SIMD=portable, so that
// the cpu plugin's non-AVX2 code (other CPUs' path) is checked too: it must
// then really run below AVX2.
TEST_P(BackendConformance, HonoursThePortableSimdSetting) {
    const char * v = std::getenv("MOESH_CPU_SIMD");
    if (!v || std::string(v) != "portable" || std::string(be_->name) != "cpu") {
        GTEST_SKIP() << "MOESH_CPU_SIMD=portable is not set";
    }
    moesh_backend * ctx = create_context();
    ASSERT_NE(ctx, nullptr);
    be_->destroy(ctx);
    EXPECT_NE(g_last_info.find("SIMD target"), std::string::npos) << g_last_info;
    EXPECT_EQ(g_last_info.find("AVX2"), std::string::npos) << g_last_info;
    EXPECT_EQ(g_last_info.find("AVX3"), std::string::npos) << g_last_info;
}

TEST_P(BackendConformance, RefusesAnUnknownActivationsMode) {
    moesh_backend_params params = {sizeof params, 1, 7};
    moesh_backend * ctx = nullptr;
    EXPECT_NE(be_->create(&params, &k_host, &ctx), MOESH_OK);
    EXPECT_EQ(ctx, nullptr);
}

// out == x: the FFN output is added to x in place.
TEST_P(BackendConformance, ExpertFfnInPlaceMatchesReference) {
    struct Shape {
        int64_t n_embd, n_ff, n_tokens;
    };
    const Shape shapes[] = {{13, 7, 3}, {64, 96, 5}};
    const Shape block_shapes[] = {{1, 3, 3}, {3, 1, 5}};   // in blocks
    std::mt19937 rng(8);
    for (moesh_dtype type : k_weight_types) {
        std::vector<Shape> type_shapes(std::begin(shapes), std::end(shapes));
        if (is_block_type(type)) {
            type_shapes.clear();
            for (const Shape & bs : block_shapes) {
                type_shapes.push_back({bs.n_embd * block_elems(type), bs.n_ff * block_elems(type), bs.n_tokens});
            }
        }
        for (const Shape & s : type_shapes) {
            SCOPED_TRACE(testing::Message() << dtype_name(type) << " n_embd " << s.n_embd << " n_ff " << s.n_ff
                                            << " n_tokens " << s.n_tokens);
            const size_t n_w = size_t(s.n_ff * s.n_embd);
            const Weights gate = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_embd)), rng);
            const Weights up = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_embd)), rng);
            const Weights down = make_weights(type, n_w, 3.0f / std::sqrt(float(s.n_ff)), rng);
            const std::vector<float> x = uniform(size_t(s.n_tokens * s.n_embd), -1.0f, 1.0f, rng);
            const std::vector<float> scale = uniform(size_t(s.n_tokens), 0.0f, 1.0f, rng);
            DeviceBuffer d_gate = upload(gate.bytes);
            DeviceBuffer d_up = upload(up.bytes);
            DeviceBuffer d_down = upload(down.bytes);
            DeviceBuffer d_x = upload(x);
            DeviceBuffer d_scale = upload(scale);
            DeviceBuffer d_scratch(be_, ctx_, size_t(2 * s.n_tokens * s.n_ff) * sizeof(float));
            moesh_expert_ffn_args a = {.struct_size = sizeof(moesh_expert_ffn_args),
                                       .w_type = type,
                                       .gate = d_gate.get(),
                                       .up = d_up.get(),
                                       .down = d_down.get(),
                                       .x = d_x.as<float>(),
                                       .scale = d_scale.as<float>(),
                                       .out = d_x.as<float>(),
                                       .scratch = d_scratch.as<float>(),
                                       .n_embd = s.n_embd,
                                       .n_ff = s.n_ff,
                                       .n_tokens = s.n_tokens};
            if (!offered(MOESH_OP_EXPERT_FFN, type)) {
                continue;
            }
            ASSERT_EQ(be_->expert_ffn(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> out = download<float>(d_x, x.size());

            std::vector<float> out_ref = x;
            moesh_expert_ffn_args r = a;
            r.gate = gate.bytes.data();
            r.up = up.bytes.data();
            r.down = down.bytes.data();
            r.x = x.data();
            r.scale = scale.data();
            r.out = out_ref.data();
            r.scratch = nullptr;
            moesh::ref::expert_ffn(r);
            EXPECT_TRUE(within_bounds(out, out_ref, expert_ffn_bound(r, gate, up, down, x, out_ref)));
        }
    }
}

// ---------------------------------------------------------------- rms_norm

TEST_P(BackendConformance, RmsNormMatchesReference) {
    struct Shape {
        int64_t n, n_rows;
    };
    const Shape shapes[] = {{1, 1}, {7, 3}, {64, 17}, {2048, 2}, {4099, 5}};
    std::mt19937 rng(3);
    for (const Shape & s : shapes) {
        for (bool in_place : {false, true}) {
            SCOPED_TRACE(testing::Message() << "n " << s.n << " n_rows " << s.n_rows << (in_place ? " in place" : ""));
            const std::vector<float> x = uniform(size_t(s.n * s.n_rows), -2.0f, 2.0f, rng);
            const std::vector<float> weight = uniform(size_t(s.n), 0.5f, 1.5f, rng);
            DeviceBuffer d_x = upload(x);
            DeviceBuffer d_weight = upload(weight);
            DeviceBuffer d_y = upload(std::vector<float>(x.size(), k_sentinel));
            moesh_rms_norm_args a = {.struct_size = sizeof(moesh_rms_norm_args),
                                     .eps = 1e-6f,
                                     .x = d_x.as<float>(),
                                     .weight = d_weight.as<float>(),
                                     .y = in_place ? d_x.as<float>() : d_y.as<float>(),
                                     .n = s.n,
                                     .n_rows = s.n_rows};
            ASSERT_EQ(be_->rms_norm(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> y = download<float>(in_place ? d_x : d_y, x.size());

            std::vector<float> y_ref(x.size());
            moesh_rms_norm_args r = a;
            r.x = x.data();
            r.weight = weight.data();
            r.y = y_ref.data();
            moesh::ref::rms_norm(r);
            // A float32 sum of n squares, then a sqrt, a divide and two multiplies.
            std::vector<double> bound(y.size());
            for (size_t i = 0; i < y.size(); ++i) {
                bound[i] = (sum_error(s.n) + 8.0 * k_u) * std::fabs(y_ref[i]) + k_tiny;
            }
            EXPECT_TRUE(within_bounds(y, y_ref, bound));
        }
    }
}

// ----------------------------------------------------------------- softmax

TEST_P(BackendConformance, SoftmaxMatchesReference) {
    struct Shape {
        int64_t n, n_rows;
        float lo, hi;
    };
    const Shape shapes[] = {
        {1, 1, -1.0f, 1.0f},   {5, 3, -8.0f, 8.0f},     {64, 17, -8.0f, 8.0f},
        {1000, 4, -20.0f, 20.0f}, {32000, 2, -8.0f, 8.0f},
        {37, 3, 80.0f, 100.0f},   // exp overflows unless the max is subtracted
    };
    std::mt19937 rng(4);
    for (const Shape & s : shapes) {
        SCOPED_TRACE(testing::Message() << "n " << s.n << " n_rows " << s.n_rows << " range " << s.lo << ".." << s.hi);
        const std::vector<float> x = uniform(size_t(s.n * s.n_rows), s.lo, s.hi, rng);
        DeviceBuffer d_x = upload(x);
        moesh_softmax_args a = {.struct_size = sizeof(moesh_softmax_args),
                                .reserved = 0,
                                .x = d_x.as<float>(),
                                .n = s.n,
                                .n_rows = s.n_rows};
        ASSERT_EQ(be_->softmax(ctx_, &a), MOESH_OK) << last_error();
        const std::vector<float> y = download<float>(d_x, x.size());

        std::vector<float> y_ref = x;
        moesh_softmax_args r = a;
        r.x = y_ref.data();
        moesh::ref::softmax(r);
        // x - max rounds by u|x - max| (exp turns that into a relative error),
        // exp and the divide by a few u, the sum of n positive terms by sum_error.
        std::vector<double> bound(y.size());
        for (int64_t r = 0; r < s.n_rows; ++r) {
            const float * row = x.data() + r * s.n;
            const float max = *std::max_element(row, row + s.n);
            for (int64_t i = 0; i < s.n; ++i) {
                const size_t k = size_t(r * s.n + i);
                bound[k] = (2.0 * k_u * std::fabs(double(row[i]) - max) + sum_error(s.n) + 8.0 * k_u) *
                               std::fabs(y_ref[k]) + k_tiny;
            }
        }
        EXPECT_TRUE(within_bounds(y, y_ref, bound));
    }
}

// -------------------------------------------------------------------- rope

TEST_P(BackendConformance, RopeMatchesReference) {
    struct Shape {
        int64_t head_dim, rot_dim, n_head, n_tokens;
        float attn_factor;
    };
    const Shape shapes[] = {
        {8, 8, 1, 1, 1.0f},   {8, 4, 3, 3, 1.0f},   {8, 2, 2, 17, 1.3f}, {64, 64, 3, 17, 1.0f},
        {64, 16, 2, 3, 1.0f}, {80, 80, 2, 3, 1.0f}, {80, 32, 3, 17, 1.3f}, {128, 128, 4, 5, 0.9f},
        {128, 64, 1, 1, 1.0f}, {20, 12, 2, 3, 1.0f},
    };
    std::mt19937 rng(5);
    for (moesh_rope_mode mode : {MOESH_ROPE_NEOX, MOESH_ROPE_NORM}) {
        for (const Shape & s : shapes) {
            SCOPED_TRACE(testing::Message() << (mode == MOESH_ROPE_NEOX ? "neox" : "norm") << " head_dim "
                                            << s.head_dim << " rot_dim " << s.rot_dim << " n_head " << s.n_head
                                            << " n_tokens " << s.n_tokens);
            const int64_t n_half = s.rot_dim / 2;
            // inv_freq as HF computes it: 1 / base^(arange(0, dim, 2) / dim), in float32.
            std::vector<float> inv_freq(static_cast<size_t>(n_half));
            for (int64_t i = 0; i < n_half; ++i) {
                inv_freq[size_t(i)] = 1.0f / std::pow(10000.0f, float(2 * i) / float(s.rot_dim));
            }
            std::vector<int32_t> pos(static_cast<size_t>(s.n_tokens));
            std::uniform_int_distribution<int32_t> pos_dist(0, 40000);
            for (size_t t = 0; t < pos.size(); ++t) {
                pos[t] = t == 0 ? 0 : pos_dist(rng);
            }
            const std::vector<float> x = uniform(size_t(s.n_tokens * s.n_head * s.head_dim), -2.0f, 2.0f, rng);
            DeviceBuffer d_x = upload(x);
            DeviceBuffer d_pos = upload(pos);
            DeviceBuffer d_inv_freq = upload(inv_freq);
            moesh_rope_args a = {.struct_size = sizeof(moesh_rope_args),
                                 .mode = mode,
                                 .attn_factor = s.attn_factor,
                                 .reserved = 0,
                                 .x = d_x.as<float>(),
                                 .pos = d_pos.as<int32_t>(),
                                 .inv_freq = d_inv_freq.as<float>(),
                                 .n_tokens = s.n_tokens,
                                 .n_head = s.n_head,
                                 .head_dim = s.head_dim,
                                 .rot_dim = s.rot_dim};
            ASSERT_EQ(be_->rope(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> y = download<float>(d_x, x.size());

            std::vector<float> y_ref = x;
            moesh_rope_args r = a;
            r.x = y_ref.data();
            r.pos = pos.data();
            r.inv_freq = inv_freq.data();
            moesh::ref::rope(r);
            // Both sides rotate by the same float32 angle pos * inv_freq; then
            // cos/sin (1 ulp), the attn_factor product and x0 c - x1 s cost a
            // few u of |x0| + |x1|. Dims past rot_dim must be untouched.
            std::vector<double> bound(y.size(), 0.0);
            for (int64_t th = 0; th < s.n_tokens * s.n_head; ++th) {
                const float * xh = x.data() + th * s.head_dim;
                for (int64_t i = 0; i < n_half; ++i) {
                    const int64_t i0 = mode == MOESH_ROPE_NEOX ? i : 2 * i;
                    const int64_t i1 = mode == MOESH_ROPE_NEOX ? i + n_half : 2 * i + 1;
                    const double mag = std::fabs(s.attn_factor) * (std::fabs(xh[i0]) + std::fabs(xh[i1]));
                    for (int64_t k : {i0, i1}) {
                        const size_t idx = size_t(th * s.head_dim + k);
                        bound[idx] = 8.0 * k_u * mag + k_u * std::fabs(y_ref[idx]) + k_tiny;
                    }
                }
            }
            EXPECT_TRUE(within_bounds(y, y_ref, bound));
        }
    }
}

// --------------------------------------------------------------- attention

// Bound on |out - ref| per output element, from float32 rounding:
//   s_j = scale q.k_j:        e_s,j = sum_error(head_dim) |scale| sum|q k_j| + u|s_j|
//   p_j = exp(s_j - m) / Z:   relative e_p,j = e_s,j + max e_s + 2u|s_j - m| + 4u + sum_error(n_ctx)
//   o = sum_j p_j v_j:        sum_j p_j |v_j| (e_p,j + sum_error(n_ctx)) + 2u|o|
std::vector<double> attention_bound(const moesh_attention_args & a, const std::vector<float> & out_ref) {
    const int64_t n_group = a.n_head / a.n_head_kv;
    std::vector<double> bound(out_ref.size());
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        const int64_t n_ctx = int64_t(a.pos[t]) + 1;
        for (int64_t h = 0; h < a.n_head; ++h) {
            const float * q = a.q + (t * a.n_head + h) * a.head_dim;
            auto kv = [&](const void * pool, int64_t p, int64_t d) {   // element d of position p's row, as f32
                const int64_t block = a.block_table[p / a.block_size];
                const int64_t i = ((block * a.block_size + p % a.block_size) * a.n_head_kv + h / n_group) * a.head_dim + d;
                return a.kv_type == MOESH_DTYPE_F16    ? moesh::ref::f16_to_f32(static_cast<const uint16_t *>(pool)[i])
                       : a.kv_type == MOESH_DTYPE_Q8_0 ? moesh::ref::load_weight(pool, MOESH_DTYPE_Q8_0, i)
                                                       : static_cast<const float *>(pool)[i];
            };
            std::vector<double> s(static_cast<size_t>(n_ctx)), e_s(static_cast<size_t>(n_ctx));
            double m = -std::numeric_limits<double>::infinity(), e_s_max = 0.0;
            for (int64_t j = 0; j < n_ctx; ++j) {
                double dot = 0, mag = 0;
                for (int64_t d = 0; d < a.head_dim; ++d) {
                    const double k = kv(a.k_pool, j, d);
                    dot += double(q[d]) * k;
                    mag += std::fabs(double(q[d]) * k);
                }
                s[size_t(j)] = dot * a.scale;
                e_s[size_t(j)] = sum_error(a.head_dim) * std::fabs(a.scale) * mag + k_u * std::fabs(s[size_t(j)]);
                m = std::max(m, s[size_t(j)]);
                e_s_max = std::max(e_s_max, e_s[size_t(j)]);
            }
            double z = 0;
            for (int64_t j = 0; j < n_ctx; ++j) {
                z += std::exp(s[size_t(j)] - m);
            }
            for (int64_t d = 0; d < a.head_dim; ++d) {
                double b = 0;
                for (int64_t j = 0; j < n_ctx; ++j) {
                    const double p = std::exp(s[size_t(j)] - m) / z;
                    const double e_p = e_s[size_t(j)] + e_s_max + 2.0 * k_u * std::fabs(s[size_t(j)] - m) + 4.0 * k_u +
                                       sum_error(n_ctx);
                    b += p * std::fabs(kv(a.v_pool, j, d)) * (e_p + sum_error(n_ctx));
                }
                const size_t idx = size_t((t * a.n_head + h) * a.head_dim + d);
                bound[idx] = b + 2.0 * k_u * std::fabs(out_ref[idx]) + k_tiny;
            }
        }
    }
    return bound;
}

TEST_P(BackendConformance, AttentionMatchesReference) {
    struct Shape {
        int64_t head_dim, n_head, n_head_kv, n_tokens, block_size, n_kv;
        float q_scale;
        bool random_pos;   // otherwise the last n_tokens positions, as in prefill/decode
    };
    const Shape shapes[] = {
        {8, 2, 2, 1, 16, 1, 1.0f, false},    {8, 4, 2, 3, 4, 13, 2.0f, false},
        {64, 6, 2, 17, 16, 70, 4.0f, false}, {80, 3, 3, 1, 16, 300, 4.0f, false},
        {80, 6, 3, 17, 5, 40, 4.0f, false},  {64, 4, 4, 3, 16, 50, 30.0f, false},   // peaked softmax
        {8, 6, 1, 5, 3, 20, 2.0f, true},     {64, 8, 2, 1, 16, 1000, 4.0f, false},
        {20, 4, 2, 3, 16, 37, 3.0f, false},  // head_dim not a multiple of any vector width
        {64, 8, 1, 5, 16, 40, 4.0f, false},  // 8 heads a kv head: the cpu plugin takes 8 a call, 4 or 2 a token alone
        {20, 4, 1, 3, 5, 30, 2.0f, false},   // 4 a kv head, with tails
    };
    std::mt19937 rng(6);
    for (const int32_t kv_type : {MOESH_DTYPE_F32, MOESH_DTYPE_F16, MOESH_DTYPE_Q8_0})
    for (const Shape & s : shapes) {
        if (!be_->supports(ctx_, MOESH_OP_ATTENTION, kv_type)) {
            EXPECT_FALSE(GetParam().all_weight_types) << "the cpu backend reads f16 and q8_0 KV pools";
            continue;
        }
        if (kv_type == MOESH_DTYPE_Q8_0 && s.head_dim % MOESH_QK_BLOCK != 0) continue;   // refused (RejectsInvalidAttentionArguments)
        SCOPED_TRACE(testing::Message() << "kv_type " << kv_type << " head_dim " << s.head_dim << " n_head " << s.n_head
                                        << " n_head_kv " << s.n_head_kv << " n_tokens " << s.n_tokens << " block_size "
                                        << s.block_size << " n_kv " << s.n_kv);
        // The sequence's blocks are a shuffled subset of a larger pool; every
        // other block, and the rows past n_kv, hold NaN, which poisons any
        // output that reads them.
        const int64_t n_blocks = (s.n_kv + s.block_size - 1) / s.block_size;
        const int64_t n_pool_blocks = n_blocks + 3;
        std::vector<int32_t> pool_ids(static_cast<size_t>(n_pool_blocks));
        std::iota(pool_ids.begin(), pool_ids.end(), 0);
        std::shuffle(pool_ids.begin(), pool_ids.end(), rng);
        const std::vector<int32_t> block_table(pool_ids.begin(), pool_ids.begin() + n_blocks);
        const size_t row_size = size_t(s.n_head_kv * s.head_dim);
        const size_t pool_size = size_t(n_pool_blocks * s.block_size) * row_size;
        std::vector<float> k_pool(pool_size, k_nan);
        std::vector<float> v_pool(pool_size, k_nan);
        std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
        for (int64_t p = 0; p < s.n_kv; ++p) {
            const size_t base = size_t(block_table[size_t(p / s.block_size)] * s.block_size + p % s.block_size) * row_size;
            for (size_t i = 0; i < row_size; ++i) {
                k_pool[base + i] = dist(rng);
                v_pool[base + i] = dist(rng);
            }
        }
        std::vector<int32_t> pos(static_cast<size_t>(s.n_tokens));
        std::uniform_int_distribution<int32_t> pos_dist(0, int32_t(s.n_kv - 1));
        for (int64_t t = 0; t < s.n_tokens; ++t) {
            pos[size_t(t)] = s.random_pos ? pos_dist(rng) : int32_t(s.n_kv - s.n_tokens + t);
        }
        const std::vector<float> q = uniform(size_t(s.n_tokens * s.n_head * s.head_dim), -s.q_scale, s.q_scale, rng);
        const KvPoolAs k_as(k_pool, kv_type), v_as(v_pool, kv_type);   // read by both sides
        DeviceBuffer d_q = upload(q);
        DeviceBuffer d_k = upload(k_as.bytes);
        DeviceBuffer d_v = upload(v_as.bytes);
        DeviceBuffer d_table = upload(block_table);
        DeviceBuffer d_pos = upload(pos);
        DeviceBuffer d_out = upload(std::vector<float>(q.size(), k_sentinel));
        moesh_attention_args a = {.struct_size = sizeof(moesh_attention_args),
                                  .scale = 1.0f / std::sqrt(float(s.head_dim)),
                                  .q = d_q.as<float>(),
                                  .k_pool = d_k.as<float>(),
                                  .v_pool = d_v.as<float>(),
                                  .block_table = d_table.as<int32_t>(),
                                  .pos = d_pos.as<int32_t>(),
                                  .out = d_out.as<float>(),
                                  .n_tokens = s.n_tokens,
                                  .n_head = s.n_head,
                                  .n_head_kv = s.n_head_kv,
                                  .head_dim = s.head_dim,
                                  .block_size = s.block_size,
                                  .n_blocks = n_pool_blocks,
                                  .n_kv = s.n_kv,
                                  .kv_type = kv_type,
                                  .reserved2 = 0};
        ASSERT_EQ(be_->attention(ctx_, &a), MOESH_OK) << last_error();
        const std::vector<float> out = download<float>(d_out, q.size());

        std::vector<float> out_ref(q.size());
        moesh_attention_args r = a;
        r.q = q.data();
        r.k_pool = k_as.bytes.data();
        r.v_pool = v_as.bytes.data();
        r.block_table = block_table.data();
        r.pos = pos.data();
        r.out = out_ref.data();
        moesh::ref::attention(r);
        EXPECT_TRUE(within_bounds(out, out_ref, attention_bound(r, out_ref)));

        // Each token alone gives the bits it got among the others: a kernel may share a cache
        // row's reads among more of a token's heads when the call has more tokens, but not
        // change its arithmetic, so that a sequence's logits do not depend on what it was
        // batched with (a served request's greedy tokens equal `moesh run`'s).
        const size_t q_row = size_t(s.n_head * s.head_dim);
        DeviceBuffer d_one = upload(std::vector<float>(q_row, k_sentinel));
        for (int64_t t = 0; t < s.n_tokens && s.n_tokens > 1; ++t) {
            moesh_attention_args one = a;
            one.q = d_q.as<float>() + size_t(t) * q_row;
            one.pos = d_pos.as<int32_t>() + t;
            one.out = d_one.as<float>();
            one.n_tokens = 1;
            ASSERT_EQ(be_->attention(ctx_, &one), MOESH_OK) << last_error();
            const std::vector<float> got = download<float>(d_one, q_row);
            EXPECT_EQ(std::memcmp(got.data(), out.data() + size_t(t) * q_row, q_row * sizeof(float)), 0) << "token " << t << " alone";
        }
    }
}

// An f16 cache holds inf (anything beyond 65504 is written so), NaN and subnormals; attention must
// read them as the reference does on every SIMD target (one position: the output is its row).
TEST_P(BackendConformance, AttentionReadsF16SpecialValues) {
    if (!be_->supports(ctx_, MOESH_OP_ATTENTION, MOESH_DTYPE_F16)) {
        GTEST_SKIP() << "f16 KV pools not offered";
    }
    const int64_t head_dim = 20;   // a vector part and a scalar tail on every target
    std::vector<float> v = uniform(size_t(head_dim), -2.0f, 2.0f, *std::make_unique<std::mt19937>(5));
    v[0] = INFINITY;
    v[1] = k_nan;
    v[2] = -INFINITY;
    v[3] = 65504.0f;
    v[4] = 5.9604644775390625e-8f;   // the smallest f16 subnormal
    v[5] = -0.0f;
    v[9] = -INFINITY;
    v[17] = 3.0f * 5.9604644775390625e-8f;
    v[19] = k_nan;
    std::vector<uint16_t> v16(v.size()), k16(v.size(), moesh::ref::f32_to_f16(0.5f));
    for (size_t i = 0; i < v.size(); ++i) v16[i] = moesh::ref::f32_to_f16(v[i]);
    DeviceBuffer d_q = upload(std::vector<float>(size_t(head_dim), 0.25f)), d_k = upload(k16), d_v = upload(v16);
    DeviceBuffer d_table = upload(std::vector<int32_t>{0}), d_pos = upload(std::vector<int32_t>{0});
    DeviceBuffer d_out = upload(std::vector<float>(size_t(head_dim), k_sentinel));
    const moesh_attention_args a = {.struct_size = sizeof(moesh_attention_args), .scale = 1.0f, .q = d_q.as<float>(),
                                    .k_pool = d_k.get(), .v_pool = d_v.get(), .block_table = d_table.as<int32_t>(),
                                    .pos = d_pos.as<int32_t>(), .out = d_out.as<float>(), .n_tokens = 1, .n_head = 1,
                                    .n_head_kv = 1, .head_dim = head_dim, .block_size = 1, .n_blocks = 1, .n_kv = 1,
                                    .kv_type = MOESH_DTYPE_F16, .reserved2 = 0};
    ASSERT_EQ(be_->attention(ctx_, &a), MOESH_OK) << last_error();
    const std::vector<float> out = download<float>(d_out, size_t(head_dim));
    for (int64_t d = 0; d < head_dim; ++d) {
        const float want = moesh::ref::f16_to_f32(v16[size_t(d)]);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(out[size_t(d)])) << "element " << d << ": " << out[size_t(d)];
        } else {
            EXPECT_EQ(out[size_t(d)], want) << "element " << d;
        }
    }
}

// attention_batch (optional) must equal one attention call per run, run by
// run: the same kernel on the same rows, so bit for bit on the cpu backend;
// here within the attention bound of the reference, run by run, to let other
// backends reorder. Sequences share one pool (interleaved blocks, NaN between
// them); a decode step's runs of one row and a prefill's longer runs mixed.
TEST_P(BackendConformance, AttentionBatchEqualsAttentionPerRun) {
    if (!be_->attention_batch) {
        GTEST_SKIP() << "no attention_batch";
    }
    struct Shape {
        int64_t head_dim, n_head, n_head_kv, block_size;
        std::vector<std::pair<int64_t, int64_t>> runs;   // (n_tokens, n_kv) per sequence
    };
    const Shape shapes[] = {
        {8, 2, 2, 16, {{1, 1}}},
        {64, 4, 2, 16, {{1, 20}, {1, 70}, {1, 3}, {1, 33}, {1, 16}}},   // decode step
        {20, 6, 3, 5, {{7, 7}, {1, 40}, {3, 12}, {1, 2}}},               // chunks and decodes
        {64, 8, 1, 16, {{17, 17}, {16, 100}}},
        {16, 2, 1, 4, std::vector<std::pair<int64_t, int64_t>>(70, {1, 9})},   // more runs than a GPU launch takes
    };
    const int64_t gap_every = 9;   // in the last shape, a row no run covers after every 9th run: left as it was
    std::mt19937 rng(14);
    for (const int32_t kv_type : {int32_t(MOESH_DTYPE_F32), int32_t(MOESH_DTYPE_F16), int32_t(MOESH_DTYPE_Q8_0)}) {
        if (!be_->supports(ctx_, MOESH_OP_ATTENTION, kv_type)) continue;
        for (const Shape & s : shapes) {
            if (kv_type == MOESH_DTYPE_Q8_0 && s.head_dim % MOESH_QK_BLOCK != 0) continue;
            SCOPED_TRACE(testing::Message() << (kv_type == MOESH_DTYPE_F16 ? "f16" : kv_type == MOESH_DTYPE_Q8_0 ? "q8_0" : "f32")
                                            << " KV, head_dim " << s.head_dim
                                            << " runs " << s.runs.size());
            const bool gaps = s.runs.size() > 64;
            std::vector<int64_t> n_blocks, gap_rows;
            int64_t n_pool_blocks = 0, n_rows = 0;
            for (size_t i = 0; i < s.runs.size(); ++i) {
                n_blocks.push_back((s.runs[i].second + s.block_size - 1) / s.block_size);
                n_pool_blocks += n_blocks.back() + 1;   // one NaN block per sequence
                n_rows += s.runs[i].first + (gaps && i % gap_every == gap_every - 1 ? 1 : 0);
            }
            std::vector<int32_t> pool_ids(static_cast<size_t>(n_pool_blocks));
            std::iota(pool_ids.begin(), pool_ids.end(), 0);
            std::shuffle(pool_ids.begin(), pool_ids.end(), rng);
            const size_t row_size = size_t(s.n_head_kv * s.head_dim);
            std::vector<float> k_pool(size_t(n_pool_blocks * s.block_size) * row_size, k_nan), v_pool = k_pool;
            std::vector<int32_t> tables, pos;
            std::vector<moesh_attention_run> runs;
            std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
            size_t next_block = 0;
            for (size_t i = 0; i < s.runs.size(); ++i) {
                const auto [n_tok, n_kv] = s.runs[i];
                runs.push_back({int64_t(pos.size()), n_tok, int64_t(tables.size()), n_kv});
                const size_t t0 = tables.size();
                for (int64_t b = 0; b < n_blocks[i]; ++b) tables.push_back(pool_ids[next_block++]);
                ++next_block;   // the NaN block
                for (int64_t p = 0; p < n_kv; ++p) {
                    const size_t base = size_t(tables[t0 + size_t(p / s.block_size)] * s.block_size + p % s.block_size) * row_size;
                    for (size_t j = 0; j < row_size; ++j) {
                        k_pool[base + j] = dist(rng);
                        v_pool[base + j] = dist(rng);
                    }
                }
                for (int64_t t = 0; t < n_tok; ++t) pos.push_back(int32_t(n_kv - n_tok + t));
                if (gaps && i % gap_every == gap_every - 1) {
                    gap_rows.push_back(int64_t(pos.size()));
                    pos.push_back(0);
                }
            }
            ASSERT_EQ(int64_t(pos.size()), n_rows);
            const size_t q_row = size_t(s.n_head * s.head_dim);
            const std::vector<float> q = uniform(size_t(n_rows) * q_row, -3.0f, 3.0f, rng);
            // The pools as the backend keeps them; the reference reads the same values.
            const KvPoolAs k_as(k_pool, kv_type), v_as(v_pool, kv_type);
            DeviceBuffer d_q = upload(q), d_k = upload(k_as.bytes), d_v = upload(v_as.bytes);
            DeviceBuffer d_tables = upload(tables), d_pos = upload(pos);
            DeviceBuffer d_out = upload(std::vector<float>(q.size(), k_sentinel));
            const moesh_attention_batch_args a = {.struct_size = sizeof(moesh_attention_batch_args),
                                                  .scale = 1.0f / std::sqrt(float(s.head_dim)), .q = d_q.as<float>(),
                                                  .k_pool = d_k.get(), .v_pool = d_v.get(),
                                                  .block_tables = d_tables.as<int32_t>(), .pos = d_pos.as<int32_t>(),
                                                  .out = d_out.as<float>(), .runs = runs.data(), .n_tokens = n_rows,
                                                  .n_runs = int64_t(runs.size()), .n_table = int64_t(tables.size()),
                                                  .n_head = s.n_head, .n_head_kv = s.n_head_kv, .head_dim = s.head_dim,
                                                  .block_size = s.block_size, .n_blocks = n_pool_blocks,
                                                  .kv_type = kv_type, .reserved2 = 0};
            ASSERT_EQ(be_->attention_batch(ctx_, &a), MOESH_OK) << last_error();
            const std::vector<float> out = download<float>(d_out, q.size());
            for (const int64_t g : gap_rows)
                for (size_t j = 0; j < q_row; ++j) ASSERT_EQ(out[size_t(g) * q_row + j], k_sentinel) << "row " << g << " is in no run";
            const std::vector<float> & k_ref = k_as.values;
            const std::vector<float> & v_ref = v_as.values;
            for (const moesh_attention_run & r : runs) {
                DeviceBuffer d_one = upload(std::vector<float>(size_t(r.n_tokens) * q_row, k_sentinel));
                moesh_attention_args b = {.struct_size = sizeof(moesh_attention_args), .scale = a.scale,
                                          .q = d_q.as<float>() + size_t(r.first) * q_row, .k_pool = d_k.get(),
                                          .v_pool = d_v.get(), .block_table = d_tables.as<int32_t>() + r.table,
                                          .pos = d_pos.as<int32_t>() + r.first, .out = d_one.as<float>(),
                                          .n_tokens = r.n_tokens, .n_head = s.n_head, .n_head_kv = s.n_head_kv,
                                          .head_dim = s.head_dim, .block_size = s.block_size, .n_blocks = n_pool_blocks,
                                          .n_kv = r.n_kv, .kv_type = kv_type, .reserved2 = 0};
                ASSERT_EQ(be_->attention(ctx_, &b), MOESH_OK) << last_error();
                const std::vector<float> one = download<float>(d_one, size_t(r.n_tokens) * q_row);
                const std::vector<float> got(out.begin() + r.first * int64_t(q_row),
                                             out.begin() + (r.first + r.n_tokens) * int64_t(q_row));
                EXPECT_EQ(std::memcmp(got.data(), one.data(), got.size() * sizeof(float)), 0) << "run at row " << r.first;
                std::vector<float> ref(one.size());
                b.q = q.data() + size_t(r.first) * q_row;
                b.k_pool = k_ref.data();
                b.v_pool = v_ref.data();
                b.block_table = tables.data() + r.table;
                b.pos = pos.data() + r.first;
                b.out = ref.data();
                b.kv_type = MOESH_DTYPE_F32;   // the reference reads the widened values
                moesh::ref::attention(b);
                EXPECT_TRUE(within_bounds(got, ref, attention_bound(b, ref))) << "run at row " << r.first;
            }
        }
    }
}

// --------------------------------------------------- argument validation

// Each case gets a fresh context so that its last_error is its own.
class Rejection {
public:
    Rejection(const moesh_backend_iface * be, moesh_backend * ctx) : be_(be), ctx_(ctx) {}
    ~Rejection() { be_->destroy(ctx_); }
    moesh_backend * ctx() const { return ctx_; }
    void expect(moesh_status got, moesh_status want, const char * what) const {
        EXPECT_EQ(got, want) << what;
        const char * msg = be_->last_error(ctx_);
        EXPECT_TRUE(msg != nullptr && msg[0] != '\0') << what << ": empty last_error";
    }

private:
    const moesh_backend_iface * be_;
    moesh_backend * ctx_;
};

// --------------------------------------------------------------- copy_rows

TEST_P(BackendConformance, CopyRowsMatchesReference) {
    ASSERT_NE(be_->copy_rows, nullptr) << "the forward pass needs copy_rows";
    struct Case {
        const char * what;
        int64_t n_rows, n_cols, src_n_rows, dst_n_rows, src_stride, dst_stride;
        bool src_idx, dst_idx, zeros, in_place;
        int32_t accumulate;
        float clamp;
    };
    const Case cases[] = {
        {"copy", 3, 5, 3, 3, 5, 5, false, false, false, false, 0, 0.0f},
        {"add (residual)", 4, 2048, 4, 4, 2048, 2048, false, false, false, false, 1, 0.0f},
        {"gather", 5, 67, 9, 5, 70, 67, true, false, false, false, 0, 0.0f},
        {"scatter-add", 5, 67, 5, 9, 67, 67, false, true, false, false, 1, 0.0f},
        {"gather and scatter", 7, 33, 11, 13, 33, 40, true, true, false, false, 0, 0.0f},
        {"zeros", 6, 100, 0, 8, 0, 100, false, true, true, false, 0, 0.0f},
        {"clamp in place", 3, 130, 3, 3, 130, 130, false, false, false, true, 0, 0.75f},
        {"many rows", 70000, 3, 70000, 70000, 3, 4, false, true, false, false, 1, 0.0f},
        {"no rows", 0, 8, 0, 0, 8, 8, false, false, false, false, 0, 0.0f},
    };
    std::mt19937 rng(13);
    for (const Case & c : cases) {
        SCOPED_TRACE(c.what);
        std::vector<float> src = uniform(size_t(std::max<int64_t>(1, c.src_n_rows * c.src_stride)), -1.0f, 1.0f, rng);
        std::vector<float> dst = uniform(size_t(std::max<int64_t>(1, c.dst_n_rows * c.dst_stride)), -1.0f, 1.0f, rng);
        if (c.clamp > 0.0f) {   // the clamp keeps a NaN (as std::clamp) and bounds infinities
            dst[1] = k_nan;
            dst[2] = INFINITY;
            dst[size_t(c.dst_stride + 129)] = -INFINITY;   // in a vector tail
            dst[size_t(2 * c.dst_stride + 128)] = k_nan;
        }
        std::vector<int32_t> src_rows(size_t(std::max<int64_t>(1, c.n_rows))), dst_rows(src_rows.size());
        for (int64_t i = 0; i < c.n_rows; ++i) src_rows[size_t(i)] = int32_t(rng() % uint32_t(std::max<int64_t>(1, c.src_n_rows)));
        std::vector<int32_t> perm(size_t(std::max<int64_t>(1, c.dst_n_rows)));   // distinct destinations
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        std::copy_n(perm.begin(), c.n_rows, dst_rows.begin());
        DeviceBuffer d_src = upload(src), d_dst = upload(dst), d_si = upload(src_rows), d_di = upload(dst_rows);
        moesh_copy_rows_args a = {.struct_size = sizeof(moesh_copy_rows_args),
                                  .accumulate = c.accumulate,
                                  .clamp = c.clamp,
                                  .reserved = 0,
                                  .src = c.zeros ? nullptr : c.in_place ? d_dst.as<float>() : d_src.as<float>(),
                                  .dst = d_dst.as<float>(),
                                  .src_rows = c.src_idx ? d_si.as<int32_t>() : nullptr,
                                  .dst_rows = c.dst_idx ? d_di.as<int32_t>() : nullptr,
                                  .n_rows = c.n_rows,
                                  .n_cols = c.n_cols,
                                  .src_stride = c.src_stride,
                                  .dst_stride = c.dst_stride,
                                  .src_n_rows = c.in_place ? c.dst_n_rows : c.src_n_rows,
                                  .dst_n_rows = c.dst_n_rows,
                                  .dst_type = MOESH_DTYPE_F32,
                                  .reserved2 = 0};
        ASSERT_EQ(be_->copy_rows(ctx_, &a), MOESH_OK) << last_error();
        const std::vector<float> got = download<float>(d_dst, dst.size());
        std::vector<float> want = dst;
        moesh_copy_rows_args r = a;
        r.src = c.zeros ? nullptr : c.in_place ? want.data() : src.data();
        r.dst = want.data();
        r.src_rows = c.src_idx ? src_rows.data() : nullptr;
        r.dst_rows = c.dst_idx ? dst_rows.data() : nullptr;
        moesh::ref::copy_rows(r);
        for (size_t i = 0; i < got.size(); ++i)   // one add per value at most: exact (a NaN stays NaN)
            if (!(std::isnan(want[i]) && std::isnan(got[i]))) {
                ASSERT_EQ(got[i], want[i]) << "element " << i;
            }
    }
}

TEST_P(BackendConformance, CopyRowsChecksIndicesAndShapes) {
    std::vector<float> host(64, 1.0f);
    DeviceBuffer d_src = upload(host), d_dst = upload(host);
    const std::vector<int32_t> bad_src = {0, 8}, bad_dst = {-1, 0}, good = {0, 1};
    DeviceBuffer d_bad_src = upload(bad_src), d_bad_dst = upload(bad_dst), d_good = upload(good);
    const moesh_copy_rows_args base = {.struct_size = sizeof(moesh_copy_rows_args),
                                       .accumulate = 0,
                                       .clamp = 0.0f,
                                       .reserved = 0,
                                       .src = d_src.as<float>(),
                                       .dst = d_dst.as<float>(),
                                       .src_rows = nullptr,
                                       .dst_rows = nullptr,
                                       .n_rows = 2,
                                       .n_cols = 8,
                                       .src_stride = 8,
                                       .dst_stride = 8,
                                       .src_n_rows = 8,
                                       .dst_n_rows = 8,
                                       .dst_type = MOESH_DTYPE_F32,
                                       .reserved2 = 0};
    // Indices live in backend memory: refused by the call or, asynchronously, by synchronize.
    for (int which = 0; which < 2; ++which) {
        SCOPED_TRACE(which == 0 ? "src_rows[1] = 8 of 8" : "dst_rows[0] = -1");
        Rejection rj(be_, create_context());
        moesh_copy_rows_args a = base;
        (which == 0 ? a.src_rows : a.dst_rows) = which == 0 ? d_bad_src.as<int32_t>() : d_bad_dst.as<int32_t>();
        moesh_status st = be_->copy_rows(rj.ctx(), &a);
        if (st == MOESH_OK) st = be_->synchronize(rj.ctx());
        rj.expect(st, MOESH_ERR_INVALID_ARGUMENT, "bad index");
        // The context still works afterwards.
        a = base;
        a.src_rows = d_good.as<int32_t>();
        EXPECT_EQ(be_->copy_rows(rj.ctx(), &a), MOESH_OK);
        EXPECT_EQ(be_->synchronize(rj.ctx()), MOESH_OK);
    }
    struct Bad {
        const char * what;
        void (*change)(moesh_copy_rows_args &);
    };
    const Bad bad[] = {
        {"dst NULL", [](moesh_copy_rows_args & a) { a.dst = nullptr; }},
        {"accumulate 2", [](moesh_copy_rows_args & a) { a.accumulate = 2; }},
        {"negative clamp", [](moesh_copy_rows_args & a) { a.clamp = -1.0f; }},
        {"NaN clamp", [](moesh_copy_rows_args & a) { a.clamp = std::nanf(""); }},
        {"reserved", [](moesh_copy_rows_args & a) { a.reserved = 1; }},
        {"n_cols 0", [](moesh_copy_rows_args & a) { a.n_cols = 0; }},
        {"negative n_rows", [](moesh_copy_rows_args & a) { a.n_rows = -1; }},
        {"stride < n_cols", [](moesh_copy_rows_args & a) { a.dst_stride = 4; }},
        {"more rows than dst", [](moesh_copy_rows_args & a) { a.n_rows = 9; }},
        {"more rows than src", [](moesh_copy_rows_args & a) { a.src_n_rows = 1; }},
        {"overflow", [](moesh_copy_rows_args & a) { a.dst_n_rows = INT64_MAX / 2; }},
        {"overlap", [](moesh_copy_rows_args & a) { a.src = static_cast<float *>(a.dst) + 4; a.src_n_rows = 2; }},
        {"in place with indices", [](moesh_copy_rows_args & a) { a.src = static_cast<float *>(a.dst); a.dst_rows = a.src_rows = nullptr; a.dst_stride = 8; a.src_stride = 16; }},
        {"dst_type bf16", [](moesh_copy_rows_args & a) { a.dst_type = MOESH_DTYPE_BF16; }},
        {"q8_0 dst, n_cols not a multiple of 32", [](moesh_copy_rows_args & a) { a.dst_type = MOESH_DTYPE_Q8_0; }},
        {"q8_0 dst with accumulate", [](moesh_copy_rows_args & a) {
             a.dst_type = MOESH_DTYPE_Q8_0;
             a.n_cols = a.src_stride = a.dst_stride = 32;
             a.accumulate = 1;
         }},
        {"reserved2", [](moesh_copy_rows_args & a) { a.reserved2 = 1; }},
    };
    for (const Bad & b : bad) {
        Rejection rj(be_, create_context());
        moesh_copy_rows_args a = base;
        b.change(a);
        rj.expect(be_->copy_rows(rj.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, b.what);
    }
}

// A q8_0 KV pool is valid by the ABI, so a backend whose supports() does not offer it must refuse
// such calls itself (UNSUPPORTED) rather than run its f32 kernels on 34/32 bytes a value.
TEST_P(BackendConformance, AQ8_0KvCallIsRefusedWhereNotOffered) {
    if (be_->supports(ctx_, MOESH_OP_ATTENTION, MOESH_DTYPE_Q8_0) && be_->supports(ctx_, MOESH_OP_COPY_ROWS, MOESH_DTYPE_Q8_0)) {
        GTEST_SKIP() << "q8_0 KV offered (AttentionMatchesReference, CopyRowsIntoQ8_0MatchesReference)";
    }
    const int64_t head_dim = 32, n_pool = 2 * 4 * head_dim;   // 2 blocks of 4 positions, 1 kv head
    DeviceBuffer pool = upload(std::vector<uint8_t>(size_t(n_pool) / 32 * 34, 0));
    DeviceBuffer q = upload(std::vector<float>(size_t(head_dim), 0.5f)), out = upload(std::vector<float>(size_t(head_dim), 0.0f));
    DeviceBuffer table = upload(std::vector<int32_t>{0}), pos = upload(std::vector<int32_t>{0});
    if (!be_->supports(ctx_, MOESH_OP_ATTENTION, MOESH_DTYPE_Q8_0)) {
        Rejection r(be_, create_context());
        const moesh_attention_args a = {.struct_size = sizeof(moesh_attention_args), .scale = 1.0f, .q = q.as<float>(),
                                        .k_pool = pool.get(), .v_pool = pool.get(), .block_table = table.as<int32_t>(),
                                        .pos = pos.as<int32_t>(), .out = out.as<float>(), .n_tokens = 1, .n_head = 1,
                                        .n_head_kv = 1, .head_dim = head_dim, .block_size = 4, .n_blocks = 2, .n_kv = 1,
                                        .kv_type = MOESH_DTYPE_Q8_0, .reserved2 = 0};
        r.expect(be_->attention(r.ctx(), &a), MOESH_ERR_UNSUPPORTED, "attention with a q8_0 pool");
    }
    if (!be_->supports(ctx_, MOESH_OP_COPY_ROWS, MOESH_DTYPE_Q8_0)) {
        Rejection r(be_, create_context());
        DeviceBuffer src = upload(std::vector<float>(size_t(head_dim), 1.0f));
        const moesh_copy_rows_args c = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = 0, .clamp = 0.0f, .reserved = 0,
                                        .src = src.as<float>(), .dst = pool.get(), .src_rows = nullptr, .dst_rows = nullptr,
                                        .n_rows = 1, .n_cols = head_dim, .src_stride = head_dim, .dst_stride = head_dim,
                                        .src_n_rows = 1, .dst_n_rows = 8, .dst_type = MOESH_DTYPE_Q8_0, .reserved2 = 0};
        r.expect(be_->copy_rows(r.ctx(), &c), MOESH_ERR_UNSUPPORTED, "copy_rows into q8_0");
    }
}

// copy_rows into a Q8_0 dst (KV cache writes): the reference's blocks byte for byte, with clamp,
// gathered and scattered rows, rows of zeros (no src), and rows beside them left as they were.
TEST_P(BackendConformance, CopyRowsIntoQ8_0MatchesReference) {
    if (!be_->supports(ctx_, MOESH_OP_COPY_ROWS, MOESH_DTYPE_Q8_0)) {
        EXPECT_FALSE(GetParam().all_weight_types) << "the cpu backend writes q8_0";
        GTEST_SKIP() << "copy_rows into q8_0 not offered";
    }
    std::mt19937 rng(13);
    for (const int64_t n_cols : {int64_t(32), int64_t(128)})
        for (const float clamp : {0.0f, 1.5f})
            for (const bool zeros : {false, true}) {
                SCOPED_TRACE(testing::Message() << "n_cols " << n_cols << " clamp " << clamp << " zeros " << zeros);
                const int64_t n_src = 8, n_dst = 10, n_rows = 6, src_stride = n_cols + 3, dst_stride = n_cols + 32;
                std::vector<float> src = uniform(size_t(n_src * src_stride), -4.0f, 4.0f, rng);
                src[size_t(3 * src_stride + 5)] = 0.0f;
                std::vector<uint8_t> dst(size_t(n_dst * dst_stride / 32 * 34));
                for (uint8_t & b : dst) b = uint8_t(rng());
                const std::vector<int32_t> src_rows = {7, 0, 3, 3, 5, 1}, dst_rows = {9, 2, 0, 4, 6, 1};
                DeviceBuffer d_src = upload(src), d_dst = upload(dst), d_sr = upload(src_rows), d_dr = upload(dst_rows);
                moesh_copy_rows_args a = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = 0, .clamp = clamp,
                                          .reserved = 0, .src = zeros ? nullptr : d_src.as<float>(), .dst = d_dst.get(),
                                          .src_rows = d_sr.as<int32_t>(), .dst_rows = d_dr.as<int32_t>(), .n_rows = n_rows,
                                          .n_cols = n_cols, .src_stride = src_stride, .dst_stride = dst_stride,
                                          .src_n_rows = n_src, .dst_n_rows = n_dst, .dst_type = MOESH_DTYPE_Q8_0, .reserved2 = 0};
                ASSERT_EQ(be_->copy_rows(ctx_, &a), MOESH_OK) << last_error();
                std::vector<uint8_t> want = dst;
                moesh_copy_rows_args r = a;
                r.src = zeros ? nullptr : src.data();
                r.dst = want.data();
                r.src_rows = src_rows.data();
                r.dst_rows = dst_rows.data();
                moesh::ref::copy_rows(r);
                ASSERT_EQ(be_->synchronize(ctx_), MOESH_OK) << last_error();
                EXPECT_EQ(download<uint8_t>(d_dst, dst.size()), want);
                // What was written reads back within half a quantization step of the (clamped) source,
                // plus the f16 rounding of the block's scale (2^-11 of the value at most).
                const std::vector<float> back = q8_0_values(want);
                for (size_t i = 0; i < src_rows.size(); ++i)
                    for (int64_t j = 0; j < n_cols; ++j) {
                        float x = zeros ? 0.0f : src[size_t(src_rows[i] * src_stride + j)];
                        if (clamp > 0.0f) x = std::clamp(x, -clamp, clamp);
                        const float step = (clamp > 0.0f ? clamp : 4.0f) / 127.0f;
                        EXPECT_NEAR(back[size_t(dst_rows[i] * dst_stride + j)], x, 0.5f * step * 1.01f + std::fabs(x) / 2048.0f)
                            << "row " << i << " col " << j;
                    }
            }
}

// copy_rows into an f16 dst (KV cache writes): bit for bit the reference's rounding to
// nearest even, with accumulate (dst read as f16) and clamp, gathered and scattered rows, and
// values that overflow f16, fall to its subnormals or sit halfway between two f16 values.
TEST_P(BackendConformance, CopyRowsIntoF16MatchesReference) {
    if (!be_->supports(ctx_, MOESH_OP_COPY_ROWS, MOESH_DTYPE_F16)) {
        EXPECT_FALSE(GetParam().all_weight_types) << "the cpu backend writes f16";
        GTEST_SKIP() << "copy_rows into f16 not offered";
    }
    std::mt19937 rng(12);
    for (const int64_t n_cols : {int64_t(5), int64_t(64), int64_t(67)})
        for (const int32_t accumulate : {0, 1})
            for (const float clamp : {0.0f, 3.0f}) {
                SCOPED_TRACE(testing::Message() << "n_cols " << n_cols << " accumulate " << accumulate << " clamp " << clamp);
                const int64_t n_src = 8, n_dst = 10, n_rows = 6, stride = n_cols + 3;
                std::vector<float> src = uniform(size_t(n_src * stride), -4.0f, 4.0f, rng);
                src[0] = 70000.0f;                       // beyond f16: inf (or the clamp)
                src[1] = 3e-6f;                          // an f16 subnormal
                src[2] = 1.0f + 1.0f / 2048.0f;          // halfway between two f16 values: to even
                src[3] = -(1.0f + 3.0f / 2048.0f);       // halfway, rounds away from zero to even
                src[4] = k_nan;                          // stays NaN, clamp or not
                src[size_t(n_cols - 1)] = k_nan;         // in the scalar tail too
                std::vector<uint16_t> dst(size_t(n_dst * stride));
                for (uint16_t & h : dst) h = moesh::ref::f32_to_f16(std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng));
                const std::vector<int32_t> src_rows = {7, 0, 3, 3, 5, 1}, dst_rows = {9, 2, 0, 4, 6, 1};
                DeviceBuffer d_src = upload(src), d_dst = upload(dst), d_sr = upload(src_rows), d_dr = upload(dst_rows);
                moesh_copy_rows_args a = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = accumulate,
                                          .clamp = clamp, .reserved = 0, .src = d_src.as<float>(), .dst = d_dst.get(),
                                          .src_rows = d_sr.as<int32_t>(), .dst_rows = d_dr.as<int32_t>(), .n_rows = n_rows,
                                          .n_cols = n_cols, .src_stride = stride, .dst_stride = stride, .src_n_rows = n_src,
                                          .dst_n_rows = n_dst, .dst_type = MOESH_DTYPE_F16, .reserved2 = 0};
                ASSERT_EQ(be_->copy_rows(ctx_, &a), MOESH_OK) << last_error();
                std::vector<uint16_t> want = dst;
                moesh_copy_rows_args r = a;
                r.src = src.data();
                r.dst = want.data();
                r.src_rows = src_rows.data();
                r.dst_rows = dst_rows.data();
                moesh::ref::copy_rows(r);
                // Bit for bit, except that any NaN matches a NaN: the payload a NaN carries depends on
                // the hardware's arithmetic (one canonical NaN on a GPU), which the ABI leaves open.
                const std::vector<uint16_t> got = download<uint16_t>(d_dst, dst.size());
                auto is_nan16 = [](uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; };
                for (size_t i = 0; i < got.size(); ++i)
                    if (!(is_nan16(got[i]) && is_nan16(want[i]))) {
                        ASSERT_EQ(got[i], want[i]) << "element " << i;
                    }
            }
}

TEST_P(BackendConformance, RejectsInvalidMatmulArguments) {
    // Host arrays: validation must fail before anything is read.
    std::vector<float> w(16, 0.5f), x(8, 1.0f), y(8);
    const moesh_matmul_args ok = {.struct_size = sizeof(moesh_matmul_args), .w_type = MOESH_DTYPE_F32, .w = w.data(),
                                  .bias = nullptr, .x = x.data(), .y = y.data(), .n_in = 4, .n_out = 4, .n_tokens = 1,
                                  .x_stride = 4, .y_stride = 4};
    auto check = [&](const char * what, auto mutate) {
        moesh_matmul_args a = ok;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->matmul(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    {
        Rejection r(be_, create_context());
        r.expect(be_->matmul(r.ctx(), nullptr), MOESH_ERR_INVALID_ARGUMENT, "args NULL");
    }
    check("w NULL", [](moesh_matmul_args & a) { a.w = nullptr; });
    check("x NULL", [](moesh_matmul_args & a) { a.x = nullptr; });
    check("y NULL", [](moesh_matmul_args & a) { a.y = nullptr; });
    check("n_in 0", [](moesh_matmul_args & a) { a.n_in = 0; });
    check("n_out -1", [](moesh_matmul_args & a) { a.n_out = -1; });
    check("n_tokens 0", [](moesh_matmul_args & a) { a.n_tokens = 0; });
    check("x_stride < n_in", [](moesh_matmul_args & a) { a.x_stride = 3; });
    check("y_stride < n_out", [](moesh_matmul_args & a) { a.y_stride = 2; });
    check("n_in huge", [](moesh_matmul_args & a) { a.n_in = a.x_stride = int64_t(1) << 62; });
}

// Block weight types need rows of whole blocks (32 or 256 elements).
TEST_P(BackendConformance, RejectsRowsOfPartialBlocks) {
    // Host arrays: validation must fail before anything is read.
    std::vector<uint8_t> w(8192, 0);
    std::vector<float> x(1024, 1.0f), y(1024), scratch(4096);
    for (moesh_dtype type : k_weight_types) {
        if (!is_block_type(type)) {
            continue;
        }
        SCOPED_TRACE(dtype_name(type));
        const int64_t b = block_elems(type);
        if (offered(MOESH_OP_MATMUL, type)) {
            for (int64_t n_in : {int64_t(1), int64_t(16), b + 16, b / 2, 2 * b - 16, int64_t(100)}) {
                moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args), .w_type = type, .w = w.data(),
                                       .bias = nullptr, .x = x.data(), .y = y.data(), .n_in = n_in, .n_out = 2,
                                       .n_tokens = 1, .x_stride = n_in, .y_stride = 2};
                Rejection r(be_, create_context());
                r.expect(be_->matmul(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, "matmul n_in not whole blocks");
            }
        }
        if (offered(MOESH_OP_EXPERT_FFN, type)) {
            const int64_t sizes[][2] = {{b + 16, b}, {b, b + 8}, {16, 16}, {b - 1, 2 * b}, {b / 2, b}};
            for (const auto & sz : sizes) {
                moesh_expert_ffn_args a = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = type,
                                           .gate = w.data(), .up = w.data(), .down = w.data(), .x = x.data(),
                                           .scale = nullptr, .out = y.data(), .scratch = scratch.data(),
                                           .n_embd = sz[0], .n_ff = sz[1], .n_tokens = 1};
                Rejection r(be_, create_context());
                r.expect(be_->expert_ffn(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT,
                         "expert_ffn n_embd or n_ff not whole blocks");
            }
        }
    }
}

TEST_P(BackendConformance, RejectsInvalidRmsNormSoftmaxArguments) {
    std::vector<float> x(8, 1.0f), w(8, 1.0f), y(8);
    const moesh_rms_norm_args ok = {.struct_size = sizeof(moesh_rms_norm_args), .eps = 1e-6f, .x = x.data(),
                                    .weight = w.data(), .y = y.data(), .n = 4, .n_rows = 2};
    auto check = [&](const char * what, auto mutate) {
        moesh_rms_norm_args a = ok;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->rms_norm(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    check("x NULL", [](moesh_rms_norm_args & a) { a.x = nullptr; });
    check("weight NULL", [](moesh_rms_norm_args & a) { a.weight = nullptr; });
    check("y NULL", [](moesh_rms_norm_args & a) { a.y = nullptr; });
    check("n 0", [](moesh_rms_norm_args & a) { a.n = 0; });
    check("n_rows -2", [](moesh_rms_norm_args & a) { a.n_rows = -2; });
    {
        Rejection r(be_, create_context());
        r.expect(be_->rms_norm(r.ctx(), nullptr), MOESH_ERR_INVALID_ARGUMENT, "rms_norm args NULL");
    }
    const moesh_softmax_args sm = {.struct_size = sizeof(moesh_softmax_args), .reserved = 0, .x = x.data(), .n = 4,
                                   .n_rows = 2};
    auto check_softmax = [&](const char * what, auto mutate) {
        moesh_softmax_args a = sm;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->softmax(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    check_softmax("softmax x NULL", [](moesh_softmax_args & a) { a.x = nullptr; });
    check_softmax("softmax n 0", [](moesh_softmax_args & a) { a.n = 0; });
    check_softmax("softmax n_rows 0", [](moesh_softmax_args & a) { a.n_rows = 0; });
    check_softmax("softmax reserved 1", [](moesh_softmax_args & a) { a.reserved = 1; });
}

TEST_P(BackendConformance, RejectsInvalidRopeArguments) {
    std::vector<float> x(64, 1.0f), inv_freq(8, 1.0f);
    std::vector<int32_t> pos(2, 0);
    const moesh_rope_args ok = {.struct_size = sizeof(moesh_rope_args), .mode = MOESH_ROPE_NEOX, .attn_factor = 1.0f,
                                .reserved = 0, .x = x.data(), .pos = pos.data(), .inv_freq = inv_freq.data(),
                                .n_tokens = 2, .n_head = 2, .head_dim = 16, .rot_dim = 16};
    auto check = [&](const char * what, auto mutate) {
        moesh_rope_args a = ok;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->rope(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    check("x NULL", [](moesh_rope_args & a) { a.x = nullptr; });
    check("pos NULL", [](moesh_rope_args & a) { a.pos = nullptr; });
    check("inv_freq NULL", [](moesh_rope_args & a) { a.inv_freq = nullptr; });
    check("n_tokens 0", [](moesh_rope_args & a) { a.n_tokens = 0; });
    check("n_head 0", [](moesh_rope_args & a) { a.n_head = 0; });
    check("head_dim -16", [](moesh_rope_args & a) { a.head_dim = -16; });
    check("rot_dim odd", [](moesh_rope_args & a) { a.rot_dim = 7; });
    check("rot_dim > head_dim", [](moesh_rope_args & a) { a.rot_dim = 18; });
    check("rot_dim 0", [](moesh_rope_args & a) { a.rot_dim = 0; });
    check("reserved 1", [](moesh_rope_args & a) { a.reserved = 1; });
}

TEST_P(BackendConformance, RejectsInvalidExpertFfnArguments) {
    std::vector<float> w(64, 0.1f), x(8, 1.0f), out(8), scratch(64);
    const moesh_expert_ffn_args ok = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = MOESH_DTYPE_F32,
                                      .gate = w.data(), .up = w.data(), .down = w.data(), .x = x.data(),
                                      .scale = nullptr, .out = out.data(), .scratch = scratch.data(), .n_embd = 4,
                                      .n_ff = 8, .n_tokens = 2};
    auto check = [&](const char * what, auto mutate) {
        moesh_expert_ffn_args a = ok;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->expert_ffn(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    {
        Rejection r(be_, create_context());
        r.expect(be_->expert_ffn(r.ctx(), nullptr), MOESH_ERR_INVALID_ARGUMENT, "args NULL");
    }
    check("gate NULL", [](moesh_expert_ffn_args & a) { a.gate = nullptr; });
    check("up NULL", [](moesh_expert_ffn_args & a) { a.up = nullptr; });
    check("down NULL", [](moesh_expert_ffn_args & a) { a.down = nullptr; });
    check("x NULL", [](moesh_expert_ffn_args & a) { a.x = nullptr; });
    check("out NULL", [](moesh_expert_ffn_args & a) { a.out = nullptr; });
    check("scratch NULL", [](moesh_expert_ffn_args & a) { a.scratch = nullptr; });
    check("n_embd -1", [](moesh_expert_ffn_args & a) { a.n_embd = -1; });
    check("n_ff 0", [](moesh_expert_ffn_args & a) { a.n_ff = 0; });
    check("n_tokens 0", [](moesh_expert_ffn_args & a) { a.n_tokens = 0; });
    std::vector<float> xo(12, 1.0f);
    check("out partly overlaps x", [&](moesh_expert_ffn_args & a) {
        a.x = xo.data();
        a.out = xo.data() + 2;
    });
    check("scratch overlaps out", [&](moesh_expert_ffn_args & a) { a.scratch = a.out; });
}

TEST_P(BackendConformance, RejectsInvalidMoeFfnArguments) {
    if (!be_->moe_ffn) {
        GTEST_SKIP() << "no moe_ffn";
    }
    if (!be_->supports(ctx_, MOESH_OP_MOE_FFN, MOESH_DTYPE_Q8_0)) {
        GTEST_SKIP() << "moe_ffn does not take q8_0";
    }
    std::mt19937 rng(12);
    const Weights wq = make_weights(MOESH_DTYPE_Q8_0, 64 * 32, 1.0f, rng);   // [64, 32] and [32, 64]
    std::vector<float> x(2 * 32, 0.5f), out(2 * 32), scratch(3 * 64), weight(3, 1.0f);
    std::vector<int32_t> token = {0, 1, 1};
    std::vector<moesh_moe_expert> ex = {{wq.bytes.data(), wq.bytes.data(), wq.bytes.data(), 0, 2},
                                        {nullptr, nullptr, nullptr, 2, 0},
                                        {wq.bytes.data(), wq.bytes.data(), wq.bytes.data(), 2, 1}};
    const moesh_moe_ffn_args ok = {.struct_size = sizeof(moesh_moe_ffn_args), .w_type = MOESH_DTYPE_Q8_0,
                                   .experts = ex.data(), .token = token.data(), .weight = weight.data(), .x = x.data(),
                                   .out = out.data(), .scratch = scratch.data(), .n_embd = 32, .n_ff = 64,
                                   .n_tokens = 2, .n_experts = 3, .n_pairs = 3};
    EXPECT_EQ(be_->moe_ffn(ctx_, &ok), MOESH_OK) << last_error();
    auto check = [&](const char * what, const char * says, auto mutate) {
        std::vector<moesh_moe_expert> e2 = ex;
        std::vector<int32_t> t2 = token;
        moesh_moe_ffn_args a = ok;
        a.experts = e2.data();
        a.token = t2.data();
        mutate(a, e2, t2);
        Rejection r(be_, create_context());
        r.expect(be_->moe_ffn(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
        EXPECT_NE(std::string(be_->last_error(r.ctx())).find(says), std::string::npos) << be_->last_error(r.ctx());
    };
    {
        Rejection r(be_, create_context());
        r.expect(be_->moe_ffn(r.ctx(), nullptr), MOESH_ERR_INVALID_ARGUMENT, "args NULL");
    }
    using E = std::vector<moesh_moe_expert>;
    using T = std::vector<int32_t>;
    check("experts NULL", "must not be NULL", [](moesh_moe_ffn_args & a, E &, T &) { a.experts = nullptr; });
    check("scratch NULL", "must not be NULL", [](moesh_moe_ffn_args & a, E &, T &) { a.scratch = nullptr; });
    check("n_pairs 0", "must be positive", [](moesh_moe_ffn_args & a, E &, T &) { a.n_pairs = 0; });
    check("n_ff not whole blocks", "multiples of 32", [](moesh_moe_ffn_args & a, E &, T &) { a.n_ff = 48; });
    check("token out of range", "token[2] = 2", [](moesh_moe_ffn_args &, E &, T & t) { t[2] = 2; });
    check("negative token", "token[0] = -1", [](moesh_moe_ffn_args &, E &, T & t) { t[0] = -1; });
    check("pairs overlap", "expert 2's pairs", [](moesh_moe_ffn_args &, E & e, T &) { e[2].first = 1; });
    check("pairs past n_pairs", "expert 2's pairs", [](moesh_moe_ffn_args &, E & e, T &) { e[2].n = 2; });
    check("negative count", "expert 1's pairs", [](moesh_moe_ffn_args &, E & e, T &) { e[1].n = -1; });
    check("huge first", "expert 2's pairs", [](moesh_moe_ffn_args &, E & e, T &) { e[2].first = INT64_MAX; });
    check("NULL weights of a used expert", "expert 0 has a NULL", [](moesh_moe_ffn_args &, E & e, T &) { e[0].up = nullptr; });
    check("out overlaps x", "must not overlap", [&](moesh_moe_ffn_args & a, E &, T &) { a.out = x.data(); });
    check("sizes overflow", "overflow", [](moesh_moe_ffn_args & a, E &, T &) { a.n_ff = INT64_MAX / 32 * 32; });
    if (packs(MOESH_OP_MOE_FFN, MOESH_DTYPE_Q8_0)) {
        check("unpacked weights as packed", "pack_weights", [](moesh_moe_ffn_args & a, E &, T &) {
            a.w_type = MOESH_DTYPE_Q8_0 | MOESH_DTYPE_PACKED;
        });
    }
    moesh_moe_ffn_args f = ok;
    f.w_type = MOESH_DTYPE_F32;
    if (!be_->supports(ctx_, MOESH_OP_MOE_FFN, MOESH_DTYPE_F32)) {
        EXPECT_EQ(be_->moe_ffn(ctx_, &f), MOESH_ERR_UNSUPPORTED);
    }
}

TEST_P(BackendConformance, RejectsInvalidAttentionBatchArguments) {
    if (!be_->attention_batch) {
        GTEST_SKIP() << "no attention_batch";
    }
    // Two sequences of 4-row blocks: rows 0-1 (n_kv 6, blocks 0-1), row 2 (n_kv 3, block 2).
    std::vector<float> q(3 * 2 * 8, 0.5f), out(q.size()), pool(4 * 4 * 1 * 8, 0.25f);
    std::vector<int32_t> tables = {0, 1, 2}, pos = {4, 5, 2};
    std::vector<moesh_attention_run> runs = {{0, 2, 0, 6}, {2, 1, 2, 3}};
    const moesh_attention_batch_args ok = {.struct_size = sizeof(moesh_attention_batch_args), .scale = 0.35f,
                                           .q = q.data(), .k_pool = pool.data(), .v_pool = pool.data(),
                                           .block_tables = tables.data(), .pos = pos.data(), .out = out.data(),
                                           .runs = runs.data(), .n_tokens = 3, .n_runs = 2, .n_table = 3,
                                           .n_head = 2, .n_head_kv = 1, .head_dim = 8, .block_size = 4, .n_blocks = 4,
                                           .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
    // These are host arrays: a device backend would read them in its kernels, so it is only
    // given calls that its own checks refuse before anything runs.
    if (be_->host_memory) {
        EXPECT_EQ(be_->attention_batch(ctx_, &ok), MOESH_OK) << last_error();
    }
    using R = std::vector<moesh_attention_run>;
    using T = std::vector<int32_t>;
    auto check = [&](const char * what, const char * says, auto mutate) {
        R r2 = runs;
        T t2 = tables, p2 = pos;
        moesh_attention_batch_args a = ok;
        a.runs = r2.data();
        a.block_tables = t2.data();
        a.pos = p2.data();
        mutate(a, r2, t2, p2);
        Rejection r(be_, create_context());
        r.expect(be_->attention_batch(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
        EXPECT_NE(std::string(be_->last_error(r.ctx())).find(says), std::string::npos) << be_->last_error(r.ctx());
    };
    {
        Rejection r(be_, create_context());
        r.expect(be_->attention_batch(r.ctx(), nullptr), MOESH_ERR_INVALID_ARGUMENT, "args NULL");
    }
    check("runs NULL", "must not be NULL", [](moesh_attention_batch_args & a, R &, T &, T &) { a.runs = nullptr; });
    check("n_runs 0", "must be positive", [](moesh_attention_batch_args & a, R &, T &, T &) { a.n_runs = 0; });
    check("head_dim 0", "must be positive", [](moesh_attention_batch_args & a, R &, T &, T &) { a.head_dim = 0; });
    check("sizes overflow", "overflow", [](moesh_attention_batch_args & a, R &, T &, T &) { a.n_tokens = INT64_MAX / 4; });
    check("runs overlap", "run 1's rows", [](moesh_attention_batch_args &, R & r, T &, T &) { r[1].first = 1; });
    check("run past n_tokens", "run 1's rows", [](moesh_attention_batch_args &, R & r, T &, T &) { r[1].n_tokens = 2; });
    check("empty run", "run 0's rows", [](moesh_attention_batch_args &, R & r, T &, T &) { r[0].n_tokens = 0; });
    check("huge first", "run 1's rows", [](moesh_attention_batch_args &, R & r, T &, T &) { r[1].first = INT64_MAX; });
    check("table past n_table", "run 1's block table", [](moesh_attention_batch_args &, R & r, T &, T &) { r[1].table = 3; });
    check("table too short for n_kv", "run 0's block table", [](moesh_attention_batch_args &, R & r, T &, T &) {
        r[0].table = 2;
    });
    if (be_->host_memory) {   // a device backend checks ids and positions in its kernel (reported at synchronize)
        check("bad block id", "run 0: block_table[1] = 4", [](moesh_attention_batch_args &, R &, T & t, T &) { t[1] = 4; });
        check("pos past n_kv", "run 1: pos[0] = 3", [](moesh_attention_batch_args &, R &, T &, T & p) { p[2] = 3; });
        check("negative pos", "run 0: pos[1] = -1", [](moesh_attention_batch_args &, R &, T &, T & p) { p[1] = -1; });
    }
    check("q NULL", "run 0: q, k_pool", [](moesh_attention_batch_args & a, R &, T &, T &) { a.q = nullptr; });
    check("n_head not a multiple", "not a multiple", [](moesh_attention_batch_args & a, R &, T &, T &) { a.n_head_kv = 3; });
    check("scale NaN", "scale must be finite", [](moesh_attention_batch_args & a, R &, T &, T &) { a.scale = NAN; });
}

// Block ids and positions live in backend memory: a bad one is refused by the call or, on a
// backend that checks them in its kernel, by the next synchronize; the context works afterwards.
TEST_P(BackendConformance, AttentionReportsBadBlockIdsAndPositions) {
    // pool: 4 blocks of [block_size 4, n_head_kv 1, head_dim 8]; one sequence of n_kv 6 (blocks 2, 0).
    DeviceBuffer d_q = upload(std::vector<float>(2 * 8, 0.5f)), d_pool = upload(std::vector<float>(4 * 4 * 8, 0.25f));
    DeviceBuffer d_out = upload(std::vector<float>(2 * 8, k_sentinel));
    DeviceBuffer d_table = upload(std::vector<int32_t>{2, 0}), d_pos = upload(std::vector<int32_t>{4, 5});
    DeviceBuffer d_bad_table = upload(std::vector<int32_t>{2, 4}), d_past = upload(std::vector<int32_t>{4, 6}),
                 d_negative = upload(std::vector<int32_t>{-1, 5});
    const moesh_attention_args base = {.struct_size = sizeof(moesh_attention_args), .scale = 0.35f, .q = d_q.as<float>(),
                                       .k_pool = d_pool.get(), .v_pool = d_pool.get(), .block_table = d_table.as<int32_t>(),
                                       .pos = d_pos.as<int32_t>(), .out = d_out.as<float>(), .n_tokens = 2, .n_head = 1,
                                       .n_head_kv = 1, .head_dim = 8, .block_size = 4, .n_blocks = 4, .n_kv = 6,
                                       .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
    struct Case {
        const char * what;
        const int32_t * table;
        const int32_t * pos;
    };
    const Case cases[] = {{"block id 4 of 4 blocks", d_bad_table.as<int32_t>(), d_pos.as<int32_t>()},
                          {"pos 6 of n_kv 6", d_table.as<int32_t>(), d_past.as<int32_t>()},
                          {"pos -1", d_table.as<int32_t>(), d_negative.as<int32_t>()}};
    for (const bool batch : {false, true}) {
        if (batch && !be_->attention_batch) continue;
        for (const Case & c : cases) {
            SCOPED_TRACE(testing::Message() << (batch ? "attention_batch: " : "attention: ") << c.what);
            Rejection rj(be_, create_context());
            moesh_attention_args a = base;
            a.block_table = c.table;
            a.pos = c.pos;
            const moesh_attention_run run = {0, 2, 0, 6};
            auto call = [&](const moesh_attention_args & x) {
                if (!batch) return be_->attention(rj.ctx(), &x);
                const moesh_attention_batch_args b = {.struct_size = sizeof(moesh_attention_batch_args), .scale = x.scale,
                                                      .q = x.q, .k_pool = x.k_pool, .v_pool = x.v_pool,
                                                      .block_tables = x.block_table, .pos = x.pos, .out = x.out,
                                                      .runs = &run, .n_tokens = 2, .n_runs = 1, .n_table = 2,
                                                      .n_head = 1, .n_head_kv = 1, .head_dim = 8, .block_size = 4,
                                                      .n_blocks = 4, .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
                return be_->attention_batch(rj.ctx(), &b);
            };
            moesh_status st = call(a);
            if (st == MOESH_OK) st = be_->synchronize(rj.ctx());
            rj.expect(st, MOESH_ERR_INVALID_ARGUMENT, c.what);
            EXPECT_EQ(call(base), MOESH_OK) << "a good call after it";
            EXPECT_EQ(be_->synchronize(rj.ctx()), MOESH_OK) << "the error was reported once";
        }
    }
}

TEST_P(BackendConformance, RejectsInvalidAttentionArguments) {
    std::vector<float> q(32, 1.0f), pool(256, 1.0f), out(32);
    std::vector<int32_t> table = {1, 0}, pos = {5};
    // pool: 4 blocks of [block_size 4, n_head_kv 2, head_dim 8]; table: ceil(n_kv 6 / 4) = 2 entries.
    const moesh_attention_args ok = {.struct_size = sizeof(moesh_attention_args), .scale = 0.35f, .q = q.data(),
                                     .k_pool = pool.data(), .v_pool = pool.data(), .block_table = table.data(),
                                     .pos = pos.data(), .out = out.data(), .n_tokens = 1, .n_head = 4, .n_head_kv = 2,
                                     .head_dim = 8, .block_size = 4, .n_blocks = 4, .n_kv = 6,
                                     .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
    auto check = [&](const char * what, auto mutate) {
        moesh_attention_args a = ok;
        mutate(a);
        Rejection r(be_, create_context());
        r.expect(be_->attention(r.ctx(), &a), MOESH_ERR_INVALID_ARGUMENT, what);
    };
    check("q NULL", [](moesh_attention_args & a) { a.q = nullptr; });
    check("k_pool NULL", [](moesh_attention_args & a) { a.k_pool = nullptr; });
    check("v_pool NULL", [](moesh_attention_args & a) { a.v_pool = nullptr; });
    check("block_table NULL", [](moesh_attention_args & a) { a.block_table = nullptr; });
    check("pos NULL", [](moesh_attention_args & a) { a.pos = nullptr; });
    check("out NULL", [](moesh_attention_args & a) { a.out = nullptr; });
    check("n_tokens 0", [](moesh_attention_args & a) { a.n_tokens = 0; });
    check("n_head_kv 0", [](moesh_attention_args & a) { a.n_head_kv = 0; });
    check("n_head % n_head_kv != 0", [](moesh_attention_args & a) { a.n_head = 3; });
    check("head_dim 0", [](moesh_attention_args & a) { a.head_dim = 0; });
    check("q8_0 KV, head_dim not a multiple of 32", [](moesh_attention_args & a) { a.kv_type = MOESH_DTYPE_Q8_0; });
    check("block_size 0", [](moesh_attention_args & a) { a.block_size = 0; });
    check("n_kv 0", [](moesh_attention_args & a) { a.n_kv = 0; });
    check("n_blocks 0", [](moesh_attention_args & a) { a.n_blocks = 0; });
    check("kv_type bf16", [](moesh_attention_args & a) { a.kv_type = MOESH_DTYPE_BF16; });
    check("reserved2", [](moesh_attention_args & a) { a.reserved2 = 1; });
    int32_t bad_pos = 6;   // == n_kv
    int32_t negative_pos = -1;
    std::vector<int32_t> bad_table = {1, -3};
    std::vector<int32_t> past_pool = {1, 4};   // == n_blocks
    // Reading pos and block_table to check them needs host pointers.
    if (be_->host_memory) {
        check("pos >= n_kv", [&](moesh_attention_args & a) { a.pos = &bad_pos; });
        check("pos < 0", [&](moesh_attention_args & a) { a.pos = &negative_pos; });
        check("negative block id", [&](moesh_attention_args & a) { a.block_table = bad_table.data(); });
        check("block id >= n_blocks", [&](moesh_attention_args & a) { a.block_table = past_pool.data(); });
    }
}

// A struct_size short of the v1 size is rejected before anything else is
// read, with a message naming the struct and both sizes.
TEST_P(BackendConformance, RejectsArgsShorterThanV1) {
    std::vector<float> f(64, 0.5f);
    std::vector<int32_t> i32(4, 0);
    auto check = [&](const char * type_name, size_t v1_size, auto call) {
        for (uint32_t size : {uint32_t(0), uint32_t(v1_size - 1)}) {
            Rejection r(be_, create_context());
            const std::string what = std::string(type_name) + " struct_size " + std::to_string(size);
            r.expect(call(r.ctx(), size), MOESH_ERR_INVALID_ARGUMENT, what.c_str());
            const std::string msg = be_->last_error(r.ctx());
            EXPECT_NE(msg.find(type_name), std::string::npos) << what << ": " << msg;
            std::string needle = " ";   // built piece by piece: GCC 12 warns falsely (-Wrestrict) on " " + to_string
            needle += std::to_string(size);
            needle += ' ';
            EXPECT_NE(msg.find(needle), std::string::npos) << what << ": " << msg;
            EXPECT_NE(msg.find(std::to_string(v1_size)), std::string::npos) << what << ": " << msg;
        }
    };
    check("moesh_matmul_args", sizeof(moesh_matmul_args), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_matmul_args a = {.struct_size = size, .w_type = MOESH_DTYPE_F32, .w = f.data(), .bias = nullptr,
                                     .x = f.data(), .y = f.data() + 32, .n_in = 4, .n_out = 4, .n_tokens = 1,
                                     .x_stride = 4, .y_stride = 4};
        return be_->matmul(ctx, &a);
    });
    check("moesh_rms_norm_args", sizeof(moesh_rms_norm_args), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_rms_norm_args a = {.struct_size = size, .eps = 1e-6f, .x = f.data(), .weight = f.data(),
                                       .y = f.data(), .n = 4, .n_rows = 1};
        return be_->rms_norm(ctx, &a);
    });
    check("moesh_rope_args", sizeof(moesh_rope_args), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_rope_args a = {.struct_size = size, .mode = MOESH_ROPE_NEOX, .attn_factor = 1.0f, .reserved = 0,
                                   .x = f.data(), .pos = i32.data(), .inv_freq = f.data() + 32, .n_tokens = 1,
                                   .n_head = 1, .head_dim = 8, .rot_dim = 8};
        return be_->rope(ctx, &a);
    });
    check("moesh_expert_ffn_args", sizeof(moesh_expert_ffn_args), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_expert_ffn_args a = {.struct_size = size, .w_type = MOESH_DTYPE_F32, .gate = f.data(),
                                         .up = f.data(), .down = f.data(), .x = f.data(), .scale = nullptr,
                                         .out = f.data(), .scratch = f.data() + 16, .n_embd = 4, .n_ff = 4,
                                         .n_tokens = 1};
        return be_->expert_ffn(ctx, &a);
    });
    check("moesh_softmax_args", sizeof(moesh_softmax_args), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_softmax_args a = {.struct_size = size, .reserved = 0, .x = f.data(), .n = 4, .n_rows = 1};
        return be_->softmax(ctx, &a);
    });
    check("moesh_attention_args", offsetof(moesh_attention_args, kv_type), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_attention_args a = {.struct_size = size, .scale = 1.0f, .q = f.data(), .k_pool = f.data(),
                                        .v_pool = f.data(), .block_table = i32.data(), .pos = i32.data(),
                                        .out = f.data() + 32, .n_tokens = 1, .n_head = 1, .n_head_kv = 1,
                                        .head_dim = 4, .block_size = 4, .n_blocks = 1, .n_kv = 1,
                                        .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
        return be_->attention(ctx, &a);
    });
    check("moesh_copy_rows_args", offsetof(moesh_copy_rows_args, dst_type), [&](moesh_backend * ctx, uint32_t size) {
        const moesh_copy_rows_args a = {.struct_size = size, .accumulate = 0, .clamp = 0.0f, .reserved = 0, .src = f.data(),
                                        .dst = f.data() + 32, .src_rows = nullptr, .dst_rows = nullptr, .n_rows = 1,
                                        .n_cols = 4, .src_stride = 4, .dst_stride = 4, .src_n_rows = 1, .dst_n_rows = 1,
                                        .dst_type = MOESH_DTYPE_F32, .reserved2 = 0};
        return be_->copy_rows(ctx, &a);
    });
    if (be_->attention_batch) {
        check("moesh_attention_batch_args", offsetof(moesh_attention_batch_args, kv_type), [&](moesh_backend * ctx, uint32_t size) {
            const moesh_attention_run run = {.first = 0, .n_tokens = 1, .table = 0, .n_kv = 1};
            const moesh_attention_batch_args a = {
                .struct_size = size, .scale = 1.0f, .q = f.data(), .k_pool = f.data(), .v_pool = f.data(),
                .block_tables = i32.data(), .pos = i32.data(), .out = f.data() + 32, .runs = &run, .n_tokens = 1,
                .n_runs = 1, .n_table = 1, .n_head = 1, .n_head_kv = 1, .head_dim = 4, .block_size = 4, .n_blocks = 1,
                .kv_type = MOESH_DTYPE_F32, .reserved2 = 0};
            return be_->attention_batch(ctx, &a);
        });
    }
}

// Members appended to a struct after its first release (attention's kv_type) read as their
// default when the caller's struct_size ends before them, whatever the bytes beyond say.
TEST_P(BackendConformance, AcceptsArgsFromBeforeAnAppendedMember) {
    const std::vector<float> q = {1.0f, 0.0f, 0.0f, 0.0f}, pool = {0.5f, 0.25f, -1.0f, 2.0f};
    DeviceBuffer d_q = upload(q), d_k = upload(pool), d_v = upload(pool);
    DeviceBuffer d_table = upload(std::vector<int32_t>{0}), d_pos = upload(std::vector<int32_t>{0});
    DeviceBuffer d_out = upload(std::vector<float>(4, k_sentinel));
    moesh_attention_args a = {.struct_size = uint32_t(offsetof(moesh_attention_args, kv_type)), .scale = 1.0f,
                              .q = d_q.as<float>(), .k_pool = d_k.get(), .v_pool = d_v.get(),
                              .block_table = d_table.as<int32_t>(), .pos = d_pos.as<int32_t>(), .out = d_out.as<float>(),
                              .n_tokens = 1, .n_head = 1, .n_head_kv = 1, .head_dim = 4, .block_size = 1, .n_blocks = 1,
                              .n_kv = 1, .kv_type = 77, .reserved2 = 9};   // beyond struct_size: not read
    ASSERT_EQ(be_->attention(ctx_, &a), MOESH_OK) << last_error();
    EXPECT_EQ(download<float>(d_out, 4), pool) << "one position: the output is its value row, read as f32";

    if (be_->attention_batch) {
        const moesh_attention_run run = {.first = 0, .n_tokens = 1, .table = 0, .n_kv = 1};
        DeviceBuffer d_out2 = upload(std::vector<float>(4, k_sentinel));
        const moesh_attention_batch_args b = {
            .struct_size = uint32_t(offsetof(moesh_attention_batch_args, kv_type)), .scale = 1.0f, .q = d_q.as<float>(),
            .k_pool = d_k.get(), .v_pool = d_v.get(), .block_tables = d_table.as<int32_t>(), .pos = d_pos.as<int32_t>(),
            .out = d_out2.as<float>(), .runs = &run, .n_tokens = 1, .n_runs = 1, .n_table = 1, .n_head = 1, .n_head_kv = 1,
            .head_dim = 4, .block_size = 1, .n_blocks = 1, .kv_type = 77, .reserved2 = 9};
        ASSERT_EQ(be_->attention_batch(ctx_, &b), MOESH_OK) << last_error();
        EXPECT_EQ(download<float>(d_out2, 4), pool);
    }
    DeviceBuffer d_dst = upload(std::vector<float>(4, 0.0f));
    const moesh_copy_rows_args c = {.struct_size = uint32_t(offsetof(moesh_copy_rows_args, dst_type)), .accumulate = 0,
                                    .clamp = 0.0f, .reserved = 0, .src = d_k.as<float>(), .dst = d_dst.get(),
                                    .src_rows = nullptr, .dst_rows = nullptr, .n_rows = 1, .n_cols = 4, .src_stride = 4,
                                    .dst_stride = 4, .src_n_rows = 1, .dst_n_rows = 1, .dst_type = 77, .reserved2 = 9};
    ASSERT_EQ(be_->copy_rows(ctx_, &c), MOESH_OK) << last_error();
    EXPECT_EQ(download<float>(d_dst, 4), pool) << "copy_rows without dst_type writes f32";
}

TEST_P(BackendConformance, AcceptsArgsLongerThanV1) {
    // A newer host appends members; a v1 plugin reads its v1 prefix and ignores the rest.
    std::vector<float> x = {0.0f, 1.0f, 2.0f, 3.0f};
    DeviceBuffer d_x = upload(x);
    struct Newer {
        moesh_softmax_args v1;
        int64_t appended[2];
    } newer = {{.struct_size = sizeof(Newer), .reserved = 0, .x = d_x.as<float>(), .n = 4, .n_rows = 1}, {-1, -1}};
    ASSERT_EQ(be_->softmax(ctx_, &newer.v1), MOESH_OK) << last_error();
    std::vector<float> ref = x;
    moesh_softmax_args r = newer.v1;
    r.x = ref.data();
    moesh::ref::softmax(r);
    const std::vector<float> y = download<float>(d_x, x.size());
    for (size_t i = 0; i < y.size(); ++i) {
        EXPECT_NEAR(y[i], ref[i], 1e-6) << i;
    }
}

TEST_P(BackendConformance, RejectsUnknownWeightDtypeAndRopeMode) {
    std::vector<float> w(64, 0.1f), x(8, 1.0f), y(8), scratch(64);
    std::vector<int32_t> pos(2, 0);
    {
        moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args), .w_type = 99, .w = w.data(), .bias = nullptr,
                               .x = x.data(), .y = y.data(), .n_in = 4, .n_out = 4, .n_tokens = 1, .x_stride = 4,
                               .y_stride = 4};
        Rejection r(be_, create_context());
        r.expect(be_->matmul(r.ctx(), &a), MOESH_ERR_UNSUPPORTED, "matmul dtype 99");
    }
    {
        moesh_expert_ffn_args a = {.struct_size = sizeof(moesh_expert_ffn_args), .w_type = -1, .gate = w.data(),
                                   .up = w.data(), .down = w.data(), .x = x.data(), .scale = nullptr, .out = y.data(),
                                   .scratch = scratch.data(), .n_embd = 4, .n_ff = 8, .n_tokens = 1};
        Rejection r(be_, create_context());
        r.expect(be_->expert_ffn(r.ctx(), &a), MOESH_ERR_UNSUPPORTED, "expert_ffn dtype -1");
    }
    {
        moesh_rope_args a = {.struct_size = sizeof(moesh_rope_args), .mode = 99, .attn_factor = 1.0f, .reserved = 0,
                             .x = x.data(), .pos = pos.data(), .inv_freq = w.data(), .n_tokens = 1, .n_head = 1,
                             .head_dim = 8, .rot_dim = 8};
        Rejection r(be_, create_context());
        r.expect(be_->rope(r.ctx(), &a), MOESH_ERR_UNSUPPORTED, "rope mode 99");
    }
}

// ------------------------------------------------- the rest of the table

TEST_P(BackendConformance, SupportsAnswersForEveryOp) {
    for (moesh_dtype t : k_weight_types) {
        offered(MOESH_OP_MATMUL, t);
        offered(MOESH_OP_EXPERT_FFN, t);
    }
    // Values no enumerator has, as any host may pass.
    EXPECT_EQ(be_->supports(ctx_, MOESH_OP_MATMUL, 99), 0);
    EXPECT_EQ(be_->supports(ctx_, MOESH_OP_EXPERT_FFN, -1), 0);
    EXPECT_EQ(be_->supports(ctx_, MOESH_OP_MOE_FFN, 99), 0);
    if (!be_->moe_ffn) {   // the optional op: only a plugin that has it may say yes
        for (moesh_dtype t : k_weight_types) EXPECT_EQ(be_->supports(ctx_, MOESH_OP_MOE_FFN, t), 0) << dtype_name(t);
    }
    EXPECT_EQ(be_->supports(ctx_, 99, MOESH_DTYPE_F32), 0);
    EXPECT_EQ(be_->supports(ctx_, INT32_MIN, MOESH_DTYPE_F32), 0);
    // Ops without weights ignore w_type; attention and copy_rows read it as the KV pools' / dst's
    // type: f32 always, f16 where offered, nothing else.
    for (moesh_op op : {MOESH_OP_RMS_NORM, MOESH_OP_ROPE, MOESH_OP_SOFTMAX}) {
        EXPECT_EQ(be_->supports(ctx_, op, MOESH_DTYPE_F32), 1) << "op " << op;
        EXPECT_EQ(be_->supports(ctx_, op, 99), 1) << "op " << op;
    }
    for (moesh_op op : {MOESH_OP_ATTENTION, MOESH_OP_COPY_ROWS}) {
        EXPECT_EQ(be_->supports(ctx_, op, MOESH_DTYPE_F32), 1) << "op " << op;
        EXPECT_EQ(be_->supports(ctx_, op, MOESH_DTYPE_BF16), 0) << "op " << op;
        EXPECT_EQ(be_->supports(ctx_, op, 99), 0) << "op " << op;
        if (GetParam().all_weight_types) {
            EXPECT_EQ(be_->supports(ctx_, op, MOESH_DTYPE_F16), 1) << "op " << op;
        }
    }
}

TEST_P(BackendConformance, InitChecksTheHostAbi) {
    const LoadedPlugin & p = load_plugin(plugin_path(GetParam().path));
    const moesh_backend_iface * table = nullptr;
    EXPECT_EQ(p.init(&k_host, nullptr), MOESH_ERR_INVALID_ARGUMENT);

    moesh_host_api old_host = k_host;
    old_host.abi_version = 0;
    EXPECT_EQ(p.init(&old_host, &table), MOESH_ERR_ABI_MISMATCH);
    EXPECT_EQ(table, nullptr);

    // A newer host has a longer table; appended members do not concern v1 plugins.
    struct NewerHost {
        moesh_host_api v1;
        void * appended[4];
    } newer = {k_host, {}};
    newer.v1.abi_version = MOESH_PLUGIN_ABI_VERSION + 1;
    newer.v1.struct_size = sizeof newer;
    EXPECT_EQ(p.init(&newer.v1, &table), MOESH_OK);
    ASSERT_NE(table, nullptr);
    EXPECT_EQ(table->abi_version, MOESH_PLUGIN_ABI_VERSION);
    EXPECT_EQ(table->struct_size, sizeof(moesh_backend_iface));
    EXPECT_STRNE(table->name, "");
    if (p.score) {
        EXPECT_GT(p.score(), 0);
    }
}

TEST_P(BackendConformance, CreatesContextWithDefaultThreadCount) {
    moesh_backend_params params = {sizeof params, 0, MOESH_ACTIVATIONS_FAST};
    moesh_backend * ctx = nullptr;
    ASSERT_EQ(be_->create(&params, &k_host, &ctx), MOESH_OK);
    ASSERT_NE(ctx, nullptr);
    EXPECT_NE(be_->last_error(ctx), nullptr);
    be_->destroy(ctx);
    EXPECT_NE(be_->last_error(nullptr), nullptr);
}

TEST_P(BackendConformance, ReportsMemoryAndCopiesBuffers) {
    uint64_t free_bytes = 0, total_bytes = 0;
    ASSERT_EQ(be_->memory_info(ctx_, &free_bytes, &total_bytes), MOESH_OK) << last_error();
    EXPECT_GT(total_bytes, 0u);
    EXPECT_LE(free_bytes, total_bytes);

    std::vector<uint8_t> data(1000);
    std::iota(data.begin(), data.end(), uint8_t(0));
    DeviceBuffer b = upload(data);
    if (be_->host_memory) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(b.get()) % 64, 0u) << "host buffers are 64-byte aligned";
    }
    EXPECT_EQ(download<uint8_t>(b, data.size()), data);

    void * huge = nullptr;
    EXPECT_EQ(be_->buffer_alloc(ctx_, size_t(1) << 62, &huge), MOESH_ERR_OUT_OF_MEMORY);
    EXPECT_EQ(huge, nullptr);
    EXPECT_STRNE(last_error(), "");

    // The refusal was reported once: the next op does not report it again (CUDA keeps a failed
    // call's error for the thread's next cudaGetLastError, which a kernel launch checks).
    const std::vector<float> x = {1.0f, -2.0f, 3.0f, 4.0f};
    DeviceBuffer src = upload(x), dst = upload(std::vector<float>(x.size(), 0.0f));
    const moesh_copy_rows_args c = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = 0, .clamp = 0.0f, .reserved = 0,
                                    .src = src.as<float>(), .dst = dst.as<float>(), .src_rows = nullptr, .dst_rows = nullptr,
                                    .n_rows = 2, .n_cols = 2, .src_stride = 2, .dst_stride = 2,
                                    .src_n_rows = 2, .dst_n_rows = 2, .dst_type = MOESH_DTYPE_F32, .reserved2 = 0};
    ASSERT_EQ(be_->copy_rows(ctx_, &c), MOESH_OK) << "an op after a refused allocation: " << last_error();
    ASSERT_EQ(be_->synchronize(ctx_), MOESH_OK) << last_error();
    EXPECT_EQ(download<float>(dst, x.size()), x);
}

// The optional copy queue (copy_to_device_async / copy_wait): copies land in ticket order, an op
// queued after copy_wait(ticket, 0) sees the copy, and an old ticket can still be waited for.
// Copies of 40 MiB span several of a backend's staging chunks.
TEST_P(BackendConformance, AsyncCopiesLandInTicketOrderAfterTheirWait) {
    if (!be_->copy_to_device_async || !be_->copy_wait) {
        GTEST_SKIP() << "no copy queue";
    }
    const int64_t n_cols = 1024, n_rows = 10240;   // 40 MiB of floats
    const size_t n = size_t(n_cols * n_rows);
    std::vector<float> a(n), b(n);
    for (size_t i = 0; i < n; ++i) {
        a[i] = float(i % 9973);
        b[i] = -float(i % 7919) - 1.0f;
    }
    DeviceBuffer d = upload(std::vector<float>(n, 0.0f));
    DeviceBuffer e = upload(std::vector<float>(n, 0.0f));
    uint64_t t1 = 0, t2 = 0;
    ASSERT_EQ(be_->copy_to_device_async(ctx_, d.get(), a.data(), n * 4, &t1), MOESH_OK) << last_error();
    ASSERT_EQ(be_->copy_to_device_async(ctx_, d.get(), b.data(), n * 2, &t2), MOESH_OK) << last_error();   // first half again
    EXPECT_GT(t1, 0u);
    EXPECT_GT(t2, t1);
    ASSERT_EQ(be_->copy_wait(ctx_, t2, 1), MOESH_OK) << last_error();
    std::vector<float> want(b.begin(), b.begin() + ptrdiff_t(n / 2));
    want.insert(want.end(), a.begin() + ptrdiff_t(n / 2), a.end());
    EXPECT_EQ(download<float>(d, n), want) << "copies land in ticket order";

    // The device waits, not the host: an op queued after copy_wait(t, 0) reads the new bytes.
    uint64_t t3 = 0;
    ASSERT_EQ(be_->copy_to_device_async(ctx_, d.get(), a.data(), n * 4, &t3), MOESH_OK) << last_error();
    ASSERT_EQ(be_->copy_wait(ctx_, t3, 0), MOESH_OK) << last_error();
    const moesh_copy_rows_args c = {.struct_size = sizeof(moesh_copy_rows_args), .accumulate = 0, .clamp = 0.0f, .reserved = 0,
                                    .src = d.as<float>(), .dst = e.as<float>(), .src_rows = nullptr, .dst_rows = nullptr,
                                    .n_rows = n_rows, .n_cols = n_cols, .src_stride = n_cols, .dst_stride = n_cols,
                                    .src_n_rows = n_rows, .dst_n_rows = n_rows, .dst_type = MOESH_DTYPE_F32, .reserved2 = 0};
    ASSERT_EQ(be_->copy_rows(ctx_, &c), MOESH_OK) << last_error();
    EXPECT_EQ(download<float>(e, n), a) << "the op ran before the copy it was ordered after";

    // Many small tickets; the first of them is waited for last.
    std::vector<uint64_t> tickets(300);
    for (size_t i = 0; i < tickets.size(); ++i)
        ASSERT_EQ(be_->copy_to_device_async(ctx_, d.as<float>() + i, b.data() + i, 4, &tickets[i]), MOESH_OK) << last_error();
    ASSERT_EQ(be_->copy_wait(ctx_, tickets.back(), 0), MOESH_OK) << last_error();
    ASSERT_EQ(be_->copy_wait(ctx_, tickets.front(), 1), MOESH_OK) << last_error();
    const std::vector<float> got = download<float>(d, tickets.size());
    EXPECT_EQ(got, std::vector<float>(b.begin(), b.begin() + ptrdiff_t(tickets.size())));
    uint64_t t0 = 0;
    EXPECT_EQ(be_->copy_to_device_async(ctx_, d.get(), nullptr, 0, &t0), MOESH_OK) << "0 bytes: " << last_error();
    EXPECT_GT(t0, tickets.back());
    EXPECT_EQ(be_->copy_wait(ctx_, t0, 1), MOESH_OK) << last_error();

    EXPECT_EQ(be_->copy_wait(ctx_, t0 + 1, 1), MOESH_ERR_INVALID_ARGUMENT) << "a ticket never issued";
    EXPECT_NE(std::string(last_error()).find("never issued"), std::string::npos) << last_error();
    EXPECT_EQ(be_->copy_wait(ctx_, t0, 2), MOESH_ERR_INVALID_ARGUMENT) << "wait_host 2";
    {
        Rejection r(be_, create_context());
        r.expect(be_->copy_wait(r.ctx(), 0, 0), MOESH_ERR_INVALID_ARGUMENT, "ticket 0");
    }
    {
        Rejection r(be_, create_context());
        r.expect(be_->copy_to_device_async(r.ctx(), d.get(), a.data(), 16, nullptr), MOESH_ERR_INVALID_ARGUMENT, "ticket NULL");
    }
    {
        Rejection r(be_, create_context());
        uint64_t t = 0;
        r.expect(be_->copy_to_device_async(r.ctx(), nullptr, a.data(), 16, &t), MOESH_ERR_INVALID_ARGUMENT, "dst NULL");
    }
}

// copy_elapsed: once a copy has been waited for, the device's time for it, for the host's cost
// model. At least the last 64 tickets are kept; older ones may be forgotten (-1).
TEST_P(BackendConformance, CopyQueueReportsDeviceTimes) {
    if (!be_->copy_to_device_async || !be_->copy_wait || !be_->copy_elapsed) {
        GTEST_SKIP() << "no copy queue, or it keeps no times";
    }
    const size_t n = size_t(10) << 20;   // 40 MiB of floats
    const std::vector<float> a(n, 1.5f);
    DeviceBuffer d = upload(std::vector<float>(n, 0.0f));
    uint64_t big = 0;
    ASSERT_EQ(be_->copy_to_device_async(ctx_, d.get(), a.data(), n * 4, &big), MOESH_OK) << last_error();
    ASSERT_EQ(be_->copy_wait(ctx_, big, 1), MOESH_OK) << last_error();
    double s = -2;
    ASSERT_EQ(be_->copy_elapsed(ctx_, big, &s), MOESH_OK) << last_error();
    EXPECT_GT(s, 0.0) << "a 40 MiB copy that has been waited for";
    EXPECT_LT(s, 60.0);
    EXPECT_LT(double(n * 4) / s, 1e13) << "faster than 10 TB/s: not the copy's time";

    std::vector<uint64_t> small(100);
    for (size_t i = 0; i < small.size(); ++i)
        ASSERT_EQ(be_->copy_to_device_async(ctx_, d.as<float>() + i, a.data() + i, 4, &small[i]), MOESH_OK) << last_error();
    ASSERT_EQ(be_->synchronize(ctx_), MOESH_OK) << last_error();
    for (size_t i = small.size() - 64; i < small.size(); ++i) {
        s = -2;
        ASSERT_EQ(be_->copy_elapsed(ctx_, small[i], &s), MOESH_OK) << last_error();
        EXPECT_GE(s, 0.0) << "ticket " << small[i] << ", one of the last 64, after synchronize";
        EXPECT_LT(s, 60.0);
    }
    s = -2;
    ASSERT_EQ(be_->copy_elapsed(ctx_, big, &s), MOESH_OK) << "an old ticket: " << last_error();
    EXPECT_TRUE(s == -1.0 || (s > 0.0 && s < 60.0)) << s;

    EXPECT_EQ(be_->copy_elapsed(ctx_, small.back() + 1, &s), MOESH_ERR_INVALID_ARGUMENT) << "the next ticket, not issued yet";
    EXPECT_NE(std::string(last_error()).find("never issued"), std::string::npos) << last_error();
    {
        Rejection r(be_, create_context());
        r.expect(be_->copy_elapsed(r.ctx(), 0, &s), MOESH_ERR_INVALID_ARGUMENT, "ticket 0");
    }
    EXPECT_EQ(be_->copy_elapsed(ctx_, big, nullptr), MOESH_ERR_INVALID_ARGUMENT) << "seconds NULL";
}

// The workers' hand-off (spinning, then sleeping) under many short calls,
// some after the workers have gone to sleep: every result must be the same.
// The matmul is just big enough (1M multiply-adds) for the cpu backend to
// share it between threads; the softmax between them is too small to.
TEST_P(BackendConformance, ManyShortCallsGiveTheSameResult) {
    std::mt19937 rng(7);
    const int64_t n_in = 2048, n_out = 520;
    const Weights w = make_weights(MOESH_DTYPE_BF16, size_t(n_in * n_out), 1.0f, rng);
    const std::vector<float> x = uniform(size_t(n_in), -1.0f, 1.0f, rng);
    DeviceBuffer d_w = upload(w.bytes);
    DeviceBuffer d_x = upload(x);
    DeviceBuffer d_y = upload(std::vector<float>(size_t(n_out)));
    DeviceBuffer d_s = upload(std::vector<float>(8, 0.0f));
    moesh_matmul_args a = {.struct_size = sizeof(moesh_matmul_args), .w_type = MOESH_DTYPE_BF16, .w = d_w.get(),
                           .bias = nullptr, .x = d_x.as<float>(), .y = d_y.as<float>(), .n_in = n_in,
                           .n_out = n_out, .n_tokens = 1, .x_stride = n_in, .y_stride = n_out};
    if (!offered(MOESH_OP_MATMUL, MOESH_DTYPE_BF16)) {
        GTEST_SKIP() << "bf16 matmul not offered";
    }
    ASSERT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
    const std::vector<float> first = download<float>(d_y, size_t(n_out));
    // too small to wake the workers
    moesh_softmax_args small = {.struct_size = sizeof(moesh_softmax_args), .reserved = 0, .x = d_s.as<float>(), .n = 8,
                                .n_rows = 1};
    for (int i = 0; i < 2000; ++i) {
        ASSERT_EQ(be_->matmul(ctx_, &a), MOESH_OK) << last_error();
        ASSERT_EQ(be_->softmax(ctx_, &small), MOESH_OK) << last_error();
        if (i % 500 == 499) {
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
        if (i % 100 == 0) {
            ASSERT_EQ(download<float>(d_y, size_t(n_out)), first) << "call " << i;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendConformance, ::testing::ValuesIn(k_backends),
                         [](const ::testing::TestParamInfo<BackendCase> & info) { return std::string(info.param.name); });

} // namespace
