#include "thread_pool.h"

#include <chrono>

namespace moesh::cpu {

namespace {

// How long an idle worker polls before it sleeps: longer than the gap between
// the kernels of one decode step, short enough not to burn a core when idle.
constexpr auto k_spin_time = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

} // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    workers_.reserve(size_t(n_threads_ - 1));
    try {
        for (int i = 1; i < n_threads_; ++i) {
            workers_.emplace_back([this, i] { worker_main(i); });
        }
    } catch (...) {
        stop_.store(true);
        generation_.fetch_add(1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            wake_.notify_all();
        }
        for (auto & w : workers_) {
            w.join();
        }
        throw;
    }
}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
    }
    for (auto & w : workers_) {
        w.join();
    }
}

void ThreadPool::run(int n_active, TaskFn fn, void * ctx) {
    if (n_active > n_threads_) {
        n_active = n_threads_;
    }
    if (n_active <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    fn_ = fn;
    ctx_ = ctx;
    n_active_ = n_active;
    n_pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    // seq_cst on both sides (here and in wait_for_task) guarantees that either
    // we see a worker's n_sleeping_ increment or it sees the new generation.
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (n_sleeping_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
    }
    fn(ctx, 0, n_active);
    for (int i = 0; n_pending_.load(std::memory_order_acquire) != 0; ++i) {
        if (i < 100000) {
            cpu_relax();
        } else {
            std::this_thread::yield();   // a worker was descheduled: let it run
        }
    }
}

uint64_t ThreadPool::wait_for_task(uint64_t seen) {
    const auto t_start = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
        const uint64_t g = generation_.load(std::memory_order_acquire);
        if (g != seen) {
            return g;
        }
        cpu_relax();
        if (i % 256 == 0 && std::chrono::steady_clock::now() - t_start > k_spin_time) {
            break;
        }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    n_sleeping_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t g = seen;
    wake_.wait(lock, [&] {
        g = generation_.load(std::memory_order_seq_cst);
        return g != seen;
    });
    n_sleeping_.fetch_sub(1, std::memory_order_relaxed);
    return g;
}

void ThreadPool::worker_main(int ith) {
    uint64_t seen = 0;
    for (;;) {
        seen = wait_for_task(seen);
        if (stop_.load(std::memory_order_acquire)) {
            return;
        }
        if (ith < n_active_) {
            fn_(ctx_, ith, n_active_);
        }
        n_pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

} // namespace moesh::cpu
