// Persistent worker threads of one CPU backend context.
//
//     ThreadPool pool(4);                       // the caller plus 3 workers
//     pool.run(4, [&](int ith, int nth) { ... rows of thread ith ... });
//
// run() hands the same task to n_active threads (the calling thread is thread
// 0) and returns when all of them are done. Workers spin briefly after a task
// because decode issues calls ~100 us apart and a futex wake-up costs tens of
// microseconds; then they sleep on a condition variable.
// Thread safety: run() is called by one thread at a time (the context's owner).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace moesh::cpu {

class ThreadPool {
public:
    using TaskFn = void (*)(void * ctx, int ith, int nth);

    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    int n_threads() const { return n_threads_; }

    // fn must not throw.
    void run(int n_active, TaskFn fn, void * ctx);

    template <class F>
    void run(int n_active, F & f) {
        run(n_active, [](void * ctx, int ith, int nth) { (*static_cast<F *>(ctx))(ith, nth); }, &f);
    }

private:
    void worker_main(int ith);
    uint64_t wait_for_task(uint64_t seen);

    int n_threads_;
    std::vector<std::thread> workers_;   // [n_threads - 1]

    // Task of the current generation; written by run() before it bumps
    // generation_, read by workers after they see the new generation.
    TaskFn fn_ = nullptr;
    void * ctx_ = nullptr;
    int n_active_ = 0;

    alignas(64) std::atomic<uint64_t> generation_{0};
    alignas(64) std::atomic<int> n_pending_{0};     // workers not yet done with this generation
    alignas(64) std::atomic<int> n_sleeping_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
};

} // namespace moesh::cpu
