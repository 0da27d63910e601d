#include "thread_pool.h"

#include <chrono>

namespace moesh::cpu {

namespace {

// How long an idle worker polls before it sleeps: longer than the gap between
// the kernels of one decode step, short enough not to burn a core when idle.
constexpr auto k_spin_time = std::chrono::microseconds(200);
// Polls of the caller for parts still running before it yields its core (to
// the very worker it waits for, if they share one).
constexpr int k_caller_spins = 2000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

constexpr uint64_t pack(uint64_t gen, int n_active) { return gen << 16 | uint64_t(n_active); }
constexpr uint64_t gen_of(uint64_t task) { return task >> 16; }
constexpr int n_active_of(uint64_t task) { return int(task & 0xffff); }

} // namespace

ThreadPool::ThreadPool(int n_threads)
    : n_threads_(n_threads < 1 ? 1 : (n_threads > 0xffff ? 0xffff : n_threads)),
      claimed_(new std::atomic<uint64_t>[size_t(n_threads_) * k_parts_per_thread]) {
    for (int64_t i = 0; i < int64_t(n_threads_) * k_parts_per_thread; ++i) {
        claimed_[size_t(i)].store(0, std::memory_order_relaxed);
    }
    workers_.reserve(size_t(n_threads_ - 1));
    try {
        for (int i = 1; i < n_threads_; ++i) {
            workers_.emplace_back([this, i] { worker_main(i); });
        }
    } catch (...) {
        shutdown();
        throw;
    }
}

ThreadPool::~ThreadPool() { shutdown(); }

void ThreadPool::shutdown() {
    stop_.store(true);
    task_.fetch_add(pack(1, 0));
    {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
    }
    for (auto & w : workers_) {
        w.join();
    }
    workers_.clear();
}

bool ThreadPool::claim(int64_t part, uint64_t gen) {
    std::atomic<uint64_t> & c = claimed_[size_t(part)];
    uint64_t stamp = c.load(std::memory_order_relaxed);
    while (stamp < gen) {
        if (c.compare_exchange_weak(stamp, gen, std::memory_order_acq_rel, std::memory_order_relaxed)) {
            return true;
        }
    }
    return false;
}

void ThreadPool::work(int ith, uint64_t gen, int n_active) {
    const int64_t n_parts = int64_t(n_active) * k_parts_per_thread;
    const int64_t own = int64_t(ith) * k_parts_per_thread;
    auto do_part = [&](int64_t part) {
        if (claim(part, gen)) {
            fn_(ctx_, ith, part, n_parts);
            n_parts_done_.fetch_add(1, std::memory_order_release);
        }
    };
    for (int64_t p = own; p < own + k_parts_per_thread; ++p) {
        do_part(p);
    }
    // Then others' parts from the far end, where their owners arrive last.
    for (int64_t p = n_parts - 1; p >= 0; --p) {
        if (p < own || p >= own + k_parts_per_thread) {
            do_part(p);
        }
    }
}

void ThreadPool::run(int n_active, bool short_task, TaskFn fn, void * ctx) {
    if (n_active > n_threads_) {
        n_active = n_threads_;
    }
    if (n_active <= 1) {
        fn(ctx, 0, 0, 1);
        return;
    }
    if (short_task && n_sleeping_.load(std::memory_order_relaxed) == n_threads_ - 1) {
        fn(ctx, 0, 0, 1);
        return;
    }
    fn_ = fn;
    ctx_ = ctx;
    n_parts_done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = gen_of(task_.load(std::memory_order_relaxed)) + 1;
    // seq_cst on both sides (here and in wait_for_task) guarantees that either
    // we see a worker's n_sleeping_ increment or it sees the new task.
    task_.store(pack(gen, n_active), std::memory_order_seq_cst);
    if (n_sleeping_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
    }
    work(0, gen, n_active);
    const int64_t n_parts = int64_t(n_active) * k_parts_per_thread;
    for (int i = 0; n_parts_done_.load(std::memory_order_acquire) != n_parts; ++i) {
        if (i < k_caller_spins) {
            cpu_relax();
        } else {
            std::this_thread::yield();
        }
    }
}

uint64_t ThreadPool::wait_for_task(uint64_t seen_gen) {
    const auto t_start = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
        const uint64_t task = task_.load(std::memory_order_acquire);
        if (gen_of(task) != seen_gen) {
            return task;
        }
        cpu_relax();
        // Now and then, give the core to any other thread that is ready (a server's I/O
        // threads, a client on the same machine): with only compute threads to run, a
        // spinning worker made them wait for its time slice, up to milliseconds. With
        // nothing else ready the yield returns at once.
        if (i % 64 == 0) {
            std::this_thread::yield();
        }
        if (i % 256 == 0 && std::chrono::steady_clock::now() - t_start > k_spin_time) {
            break;
        }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    n_sleeping_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t task = 0;
    wake_.wait(lock, [&] {
        task = task_.load(std::memory_order_seq_cst);
        return gen_of(task) != seen_gen;
    });
    n_sleeping_.fetch_sub(1, std::memory_order_relaxed);
    return task;
}

void ThreadPool::worker_main(int ith) {
    uint64_t seen_gen = 0;
    for (;;) {
        const uint64_t task = wait_for_task(seen_gen);
        if (stop_.load(std::memory_order_acquire)) {
            return;
        }
        seen_gen = gen_of(task);
        if (ith < n_active_of(task)) {
            work(ith, seen_gen, n_active_of(task));
        }
    }
}

} // namespace moesh::cpu
