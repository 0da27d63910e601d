// Persistent worker threads of one CPU backend context.
//
//     ThreadPool pool(4);                       // the caller plus 3 workers
//     auto task = [&](int ith, int64_t part, int64_t n_parts) { ... };
//     pool.run(4, /* short_task = */ false, task);
//
// run() cuts a task into n_active * k_parts_per_thread parts. Thread i first
// takes its own contiguous parts (i * k_parts_per_thread ...), so rows stream
// in order; a thread that is done takes parts nobody has started, so a worker
// that is descheduled (another process, a slower core) delays the call by at
// most the part it is in. The calling thread is thread 0 and returns when all
// parts are done. Workers spin briefly between tasks because decode issues
// calls ~100 us apart and a futex wake-up costs tens of microseconds, yielding
// the core every few microseconds to any other ready thread; then they sleep on
// a condition variable.
// Thread safety: run() is called by one thread at a time (the context's owner).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moesh::cpu {

class ThreadPool {
public:
    static constexpr int k_parts_per_thread = 4;

    // Does part `part` of n_parts; ith (< n_active) indexes per-thread scratch.
    // Must not throw.
    using TaskFn = void (*)(void * ctx, int ith, int64_t part, int64_t n_parts);

    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    int n_threads() const { return n_threads_; }

    // n_active <= 1 runs fn(ctx, 0, 0, 1) on the calling thread. So does a
    // short task (the caller's estimate) while every worker sleeps: waking one
    // costs the caller tens of microseconds on a VM, more than such a task
    // takes. Workers still spinning after a longer task do take part.
    void run(int n_active, bool short_task, TaskFn fn, void * ctx);

    template <class F>
    void run(int n_active, bool short_task, F & f) {
        run(n_active, short_task,
            [](void * ctx, int ith, int64_t part, int64_t n_parts) { (*static_cast<F *>(ctx))(ith, part, n_parts); },
            &f);
    }

private:
    void worker_main(int ith);
    void shutdown();
    uint64_t wait_for_task(uint64_t seen_gen);
    void work(int ith, uint64_t gen, int n_active);
    bool claim(int64_t part, uint64_t gen);

    int n_threads_;
    std::vector<std::thread> workers_;   // [n_threads - 1]

    // Written by run() before it publishes a generation, read by a worker only
    // after it has claimed a part of that generation (run() cannot finish the
    // generation before that part is done).
    TaskFn fn_ = nullptr;
    void * ctx_ = nullptr;

    // generation << 16 | n_active: one word, so that a worker never pairs one
    // task's generation with another's size.
    alignas(64) std::atomic<uint64_t> task_{0};
    alignas(64) std::atomic<int64_t> n_parts_done_{0};
    alignas(64) std::atomic<int> n_sleeping_{0};
    std::atomic<bool> stop_{false};
    // Generation that last claimed each part: a part is free in generation g
    // while its stamp is below g. Every part of g is claimed before run()
    // returns, so a worker that wakes late cannot claim an old task's part.
    std::unique_ptr<std::atomic<uint64_t>[]> claimed_;   // [n_threads * k_parts_per_thread]
    std::mutex mutex_;
    std::condition_variable wake_;
};

} // namespace moesh::cpu
