#include "bandwidth_probe.h"


#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bandwidth_probe.cpp"
#include <hwy/foreach_target.h>
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace moesh::bench::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Four independent accumulators so the loop is bound by loads, not adds.
float sum_floats(const float * HWY_RESTRICT p, size_t n) {
    const hn::ScalableTag<float> d;
    const size_t N = hn::Lanes(d);
    auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    size_t i = 0;
    for (; i + 4 * N <= n; i += 4 * N) {
        a0 = hn::Add(a0, hn::Load(d, p + i));
        a1 = hn::Add(a1, hn::Load(d, p + i + N));
        a2 = hn::Add(a2, hn::Load(d, p + i + 2 * N));
        a3 = hn::Add(a3, hn::Load(d, p + i + 3 * N));
    }
    float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
    for (; i < n; ++i) s += p[i];
    return s;
}

} // namespace moesh::bench::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <new>
#include <thread>
#include <vector>

namespace moesh::bench {

HWY_EXPORT(sum_floats);

double measure_read_bandwidth(size_t buffer_bytes, int n_threads, int n_passes) {
    const size_t n = buffer_bytes / sizeof(float);
    // On transparent huge pages where the kernel offers them, as the cpu backend's weight buffers
    // are (plugins/cpu): the roofline is measured with the page size the kernels read through.
    constexpr size_t huge = size_t(2) << 20;
    const size_t bytes = (n * sizeof(float) + huge - 1) / huge * huge;
    void * raw = nullptr;
    if (posix_memalign(&raw, huge, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(raw, bytes, MADV_HUGEPAGE);
#endif
    const std::unique_ptr<float, decltype(&std::free)> buf(static_cast<float *>(raw), &std::free);
    // touch every page from the threads that will read it (first-touch NUMA placement)
    const size_t per = n / size_t(n_threads);
    {
        std::vector<std::thread> ts;
        for (int t = 0; t < n_threads; ++t)
            ts.emplace_back([&, t] {
                for (size_t i = size_t(t) * per; i < (t + 1 == n_threads ? n : size_t(t + 1) * per); ++i)
                    buf.get()[i] = float(i & 7);
            });
        for (auto & t : ts) t.join();
    }
    double best = 0.0;
    std::atomic<float> sink{0.0f};
    for (int pass = 0; pass < n_passes; ++pass) {
        std::atomic<int> ready{0};
        std::atomic<bool> go{false};
        std::vector<std::thread> ts;
        for (int t = 0; t < n_threads; ++t)
            ts.emplace_back([&, t] {
                const size_t b = size_t(t) * per, e = t + 1 == n_threads ? n : b + per;
                ready.fetch_add(1);
                while (!go.load()) {
                }
                float s = HWY_DYNAMIC_DISPATCH(sum_floats)(buf.get() + b, e - b);
                float cur = sink.load();
                while (!sink.compare_exchange_weak(cur, cur + s)) {
                }
            });
        while (ready.load() < n_threads) {
        }
        auto t0 = std::chrono::steady_clock::now();
        go.store(true);
        for (auto & t : ts) t.join();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, double(n * sizeof(float)) / s);
    }
    return best;
}

} // namespace moesh::bench
#endif
