// The CUDA backend plugin: the moesh_backend_iface table over one NVIDIA GPU.
// Weights, activations and the KV cache live in device memory that the host
// allocates through buffer_alloc (cudaMalloc at set-up time, never inside an
// op); ops are queued on a compute stream and run asynchronously until
// synchronize or a copy back. Three streams:
//   compute  every op, in call order.
//   copy     copy_to_device / copy_to_host, through two pinned staging buffers,
//            after the compute work queued before them; small router reads go
//            here, so they never queue behind an expert upload.
//   upload   copy_to_device_async, fed by a plugin thread (started on first
//            use): copying from pageable memory blocks the thread that issues
//            it, and the host thread must not. Each ticket waits (on the GPU)
//            for an event recorded on compute at call time and records a done
//            event that copy_wait makes compute wait for; start and end events
//            around the copy time it for copy_elapsed.
// Without a device the score is negative and create fails with a message, so
// the loader falls back to another plugin (the CPU).
#include <moesh/plugin.h>

#include "common/plugin_support.h"
#include "cuda_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

namespace {

constexpr int32_t k_score = 100;          // above the CPU plugin's
constexpr size_t k_staging_bytes = size_t(16) << 20;   // per pinned buffer: two for copies, k_upload_chunks for uploads
// Tickets queued but not yet taken by the uploader before copy_to_device_async
// blocks; also how many of the latest tickets keep their own done event.
constexpr uint64_t k_upload_slots = 256;
constexpr int k_upload_chunks = 4;        // pinned chunks of k_staging_bytes for the uploader

// Ticket t lives in slot t % k_upload_slots.
struct UploadSlot {
    void * dst = nullptr;
    const void * src = nullptr;
    size_t n_bytes = 0;
    cudaEvent_t compute_mark = nullptr;   // on compute at call time; the copy waits for it
    cudaEvent_t done = nullptr;           // on upload after the copy of the slot's latest ticket
    cudaEvent_t start = nullptr, end = nullptr;   // timing events around that copy (done stays a cheap event)
    uint64_t timed = 0;                   // the ticket start and end were last recorded for; 0: none, or it failed
};

// copy_to_device_async's queue and the thread that drains it.
struct Uploader {
    cudaStream_t stream = nullptr;
    UploadSlot slots[k_upload_slots];
    void * staging[k_upload_chunks] = {};         // pinned host memory, [k_staging_bytes] each
    cudaEvent_t staged[k_upload_chunks] = {};     // a chunk is refilled once its transfer is done
    std::thread worker;
    std::mutex mutex;
    std::condition_variable cv;                   // every change below is notified
    // Under mutex:
    uint64_t queued = 0;    // last ticket handed out
    uint64_t started = 0;   // last ticket whose compute_mark the worker has waited on (its slot is free)
    uint64_t issued = 0;    // last ticket whose done event is recorded
    int pinned = -1;        // slot whose done event the host is synchronizing; not re-recorded meanwhile
    bool stop = false;
    bool dead = false;      // the worker ended early; every call fails from then on
    moesh_status status = MOESH_OK;   // a worker error not yet reported
    char error[512] = "";
};

} // namespace

struct moesh_backend {
    moesh_host_api host{};
    int device = 0;
    cudaStream_t compute = nullptr;
    cudaStream_t copy = nullptr;
    cudaEvent_t compute_done = nullptr;       // recorded before a copy
    void * staging[2] = {nullptr, nullptr};   // pinned host memory
    cudaEvent_t staged[2] = {nullptr, nullptr};
    int32_t * error_flag = nullptr;           // device: set by kernels that find bad indices
    Uploader up;
    char last_error[512] = "";
};

namespace {

using moesh::plugin::fail;
using moesh::plugin::guarded;
using moesh::plugin::host_log;
using moesh::plugin::ll;
using moesh::plugin::product_fits;
using moesh::plugin::read_args;

// A CUDA call's error as a status, with the call named in last_error.
moesh_status cuda_check(moesh_backend * be, cudaError_t e, const char * what) {
    if (e == cudaSuccess) return MOESH_OK;
    return fail(be, e == cudaErrorMemoryAllocation ? MOESH_ERR_OUT_OF_MEMORY : MOESH_ERR_INTERNAL, "%s: %s (%s)", what,
                cudaGetErrorString(e), cudaGetErrorName(e));
}

// A kernel launch's own error. cudaGetLastError() after <<<>>> also returns the error of an
// earlier call of this thread that was reported already (a refused cudaMalloc), so that one is
// cleared first; a sticky error (a broken context) survives the clearing and fails the launch.
template <class F>
moesh_status launched(moesh_backend * be, const char * what, F && launch) {
    (void)cudaGetLastError();
    return cuda_check(be, launch(), what);
}

#define MOESH_CUDA_CALL(expr, what)                                     \
    do {                                                                \
        const moesh_status st_ = cuda_check(be, (expr), what);          \
        if (st_ != MOESH_OK) return st_;                                \
    } while (0)

int64_t block_elems(int32_t w_type) {
    switch (w_type) {
    case MOESH_DTYPE_Q8_0:
    case MOESH_DTYPE_Q4_0: return MOESH_QK_BLOCK;
    case MOESH_DTYPE_Q4_K: return MOESH_QK_K;
    default: return 1;
    }
}

// The copy stream waits for the compute work queued so far (GPU side, no host wait).
moesh_status order_copy_after_compute(moesh_backend * be) {
    MOESH_CUDA_CALL(cudaEventRecord(be->compute_done, be->compute), "cudaEventRecord");
    MOESH_CUDA_CALL(cudaStreamWaitEvent(be->copy, be->compute_done, 0), "cudaStreamWaitEvent");
    return MOESH_OK;
}

// ---------------------------------------------------------------- uploader

// Keeps the first unreported worker error (caller holds up.mutex).
__attribute__((format(printf, 3, 4)))
void upload_error(Uploader & up, moesh_status status, const char * fmt, ...) {
    if (up.status != MOESH_OK || up.dead) return;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(up.error, sizeof up.error, fmt, ap);
    va_end(ap);
    up.status = status;
}

// A stored worker error as this call's status, reported once (caller holds up.mutex).
moesh_status take_upload_error(moesh_backend * be) {
    Uploader & up = be->up;
    if (up.dead) return fail(be, MOESH_ERR_INTERNAL, "%s", up.error);
    if (up.status == MOESH_OK) return MOESH_OK;
    const moesh_status s = up.status;
    up.status = MOESH_OK;
    return fail(be, s, "%s", up.error);
}

// One ticket's bytes through the pinned chunks, round robin across tickets.
cudaError_t upload_staged(Uploader & up, const UploadSlot & job, int * chunk, const char ** what) {
    for (size_t off = 0; off < job.n_bytes; off += k_staging_bytes) {
        const size_t n = std::min(k_staging_bytes, job.n_bytes - off);
        const int k = *chunk;
        *chunk = (k + 1) % k_upload_chunks;
        *what = "cudaEventSynchronize";
        cudaError_t e = cudaEventSynchronize(up.staged[k]);
        if (e != cudaSuccess) return e;
        std::memcpy(up.staging[k], static_cast<const uint8_t *>(job.src) + off, n);
        *what = "cudaMemcpyAsync";
        e = cudaMemcpyAsync(static_cast<uint8_t *>(job.dst) + off, up.staging[k], n, cudaMemcpyHostToDevice, up.stream);
        if (e != cudaSuccess) return e;
        *what = "cudaEventRecord";
        e = cudaEventRecord(up.staged[k], up.stream);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

// The uploader thread: tickets in order until stop, then the rest. Every
// ticket gets its done event recorded, failed or not, so no waiter hangs.
void upload_worker(moesh_backend * be) noexcept {
    Uploader & up = be->up;
    const cudaError_t dev_e = cudaSetDevice(be->device);
    try {
        std::unique_lock<std::mutex> lock(up.mutex);
        if (dev_e != cudaSuccess) {
            upload_error(up, MOESH_ERR_INTERNAL, "copy_to_device_async: upload thread: cudaSetDevice(%d): %s (%s)",
                         be->device, cudaGetErrorString(dev_e), cudaGetErrorName(dev_e));
        }
        int chunk = 0;
        for (;;) {
            up.cv.wait(lock, [&] { return up.stop || up.started < up.queued; });
            if (up.started == up.queued) return;
            const uint64_t t = up.started + 1;
            const size_t s = size_t(t % k_upload_slots);
            const UploadSlot job = up.slots[s];
            lock.unlock();
            const char * what = "cudaStreamWaitEvent";
            cudaError_t e = cudaStreamWaitEvent(up.stream, job.compute_mark, 0);
            lock.lock();
            // start and end are re-recorded only under the mutex, where copy_elapsed reads them.
            up.slots[s].timed = 0;
            if (e == cudaSuccess && (e = cudaEventRecord(job.start, up.stream)) != cudaSuccess) what = "cudaEventRecord";
            up.started = t;   // compute_mark is captured: the host may reuse the slot
            up.cv.notify_all();
            lock.unlock();
            if (e == cudaSuccess) e = upload_staged(up, job, &chunk, &what);
            lock.lock();
            up.cv.wait(lock, [&] { return up.pinned != int(s); });
            if (e == cudaSuccess && (e = cudaEventRecord(job.end, up.stream)) != cudaSuccess) what = "cudaEventRecord";
            const cudaError_t r = cudaEventRecord(job.done, up.stream);
            if (e == cudaSuccess && r != cudaSuccess) {
                e = r;
                what = "cudaEventRecord";
            }
            if (e != cudaSuccess) {
                upload_error(up, e == cudaErrorMemoryAllocation ? MOESH_ERR_OUT_OF_MEMORY : MOESH_ERR_INTERNAL,
                             "copy_to_device_async (ticket %llu, %zu bytes): %s: %s (%s)", (unsigned long long)t,
                             job.n_bytes, what, cudaGetErrorString(e), cudaGetErrorName(e));
            } else {
                up.slots[s].timed = t;
            }
            up.issued = t;
            up.cv.notify_all();
        }
    } catch (...) {
        // The mutex and the condition variable can throw (std::system_error); an exception must not end the process.
        try {
            std::lock_guard<std::mutex> g(up.mutex);
            std::snprintf(up.error, sizeof up.error, "copy_to_device_async: the upload thread stopped on an exception");
            up.dead = true;
            up.cv.notify_all();
        } catch (...) {
        }
    }
}

// The uploader's stream, events, pinned chunks and thread, on first use (a
// failure leaves what was made for the next try, or for release).
moesh_status start_uploader(moesh_backend * be) {
    Uploader & up = be->up;
    if (up.worker.joinable()) return MOESH_OK;
    if (!up.stream) {
        MOESH_CUDA_CALL(cudaStreamCreateWithFlags(&up.stream, cudaStreamNonBlocking),
                        "copy_to_device_async: cudaStreamCreateWithFlags");
    }
    for (UploadSlot & slot : up.slots) {
        for (cudaEvent_t * ev : {&slot.compute_mark, &slot.done}) {
            if (!*ev) {
                MOESH_CUDA_CALL(cudaEventCreateWithFlags(ev, cudaEventDisableTiming),
                                "copy_to_device_async: cudaEventCreateWithFlags");
            }
        }
        for (cudaEvent_t * ev : {&slot.start, &slot.end}) {   // timed: copy_elapsed
            if (!*ev) MOESH_CUDA_CALL(cudaEventCreate(ev), "copy_to_device_async: cudaEventCreate");
        }
    }
    for (int k = 0; k < k_upload_chunks; ++k) {
        if (!up.staging[k]) {
            MOESH_CUDA_CALL(cudaHostAlloc(&up.staging[k], k_staging_bytes, cudaHostAllocDefault),
                            "copy_to_device_async: cudaHostAlloc");
        }
        if (!up.staged[k]) {
            MOESH_CUDA_CALL(cudaEventCreateWithFlags(&up.staged[k], cudaEventDisableTiming),
                            "copy_to_device_async: cudaEventCreateWithFlags");
        }
    }
    up.worker = std::thread(upload_worker, be);
    return MOESH_OK;
}

// Lets the worker finish the queued tickets, then joins it. noexcept: a
// mutex that cannot be locked here is a broken invariant, and aborts.
void stop_uploader(Uploader & up) noexcept {
    if (!up.worker.joinable()) return;
    {
        std::lock_guard<std::mutex> g(up.mutex);
        up.stop = true;
    }
    up.cv.notify_all();
    up.worker.join();
}

// ---------------------------------------------------------------- lifetime

void release(moesh_backend * be) {
    Uploader & up = be->up;
    stop_uploader(up);
    if (be->compute) cudaStreamSynchronize(be->compute);
    if (be->copy) cudaStreamSynchronize(be->copy);
    if (up.stream) cudaStreamSynchronize(up.stream);
    for (UploadSlot & slot : up.slots) {
        if (slot.compute_mark) cudaEventDestroy(slot.compute_mark);
        if (slot.start) cudaEventDestroy(slot.start);
        if (slot.end) cudaEventDestroy(slot.end);
        if (slot.done) cudaEventDestroy(slot.done);
    }
    for (int k = 0; k < k_upload_chunks; ++k) {
        if (up.staged[k]) cudaEventDestroy(up.staged[k]);
        if (up.staging[k]) cudaFreeHost(up.staging[k]);
    }
    if (up.stream) cudaStreamDestroy(up.stream);
    for (int i = 0; i < 2; ++i) {
        if (be->staged[i]) cudaEventDestroy(be->staged[i]);
        if (be->staging[i]) cudaFreeHost(be->staging[i]);
    }
    if (be->compute_done) cudaEventDestroy(be->compute_done);
    if (be->error_flag) cudaFree(be->error_flag);
    if (be->compute) cudaStreamDestroy(be->compute);
    if (be->copy) cudaStreamDestroy(be->copy);
}

moesh_status cuda_create(const moesh_backend_params * params, const moesh_host_api * host, moesh_backend ** out) {
    if (!out) return MOESH_ERR_INVALID_ARGUMENT;
    *out = nullptr;
    if (params && params->struct_size >= offsetof(moesh_backend_params, activations) + sizeof(params->activations) &&
        params->activations != MOESH_ACTIVATIONS_FAST && params->activations != MOESH_ACTIVATIONS_PRECISE) {
        host_log(host, MOESH_LOG_ERROR, "cuda backend: create: unknown activations mode %d", int(params->activations));
        return MOESH_ERR_UNSUPPORTED;
    }
    int n_devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&n_devices);
    if (e != cudaSuccess || n_devices == 0) {
        host_log(host, MOESH_LOG_ERROR, "cuda backend: no CUDA device (%s); use another backend (the cpu plugin)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
        return MOESH_ERR_UNSUPPORTED;
    }
    auto be = std::unique_ptr<moesh_backend>(new (std::nothrow) moesh_backend());
    if (!be) return MOESH_ERR_OUT_OF_MEMORY;
    if (host) {
        std::memcpy(&be->host, host, std::min<size_t>(host->struct_size, sizeof be->host));
        be->host.struct_size = std::min<uint32_t>(host->struct_size, sizeof be->host);
    }
    auto setup = [&]() -> cudaError_t {
        cudaError_t r;
        if ((r = cudaSetDevice(be->device)) != cudaSuccess) return r;
        if ((r = cudaStreamCreateWithFlags(&be->compute, cudaStreamNonBlocking)) != cudaSuccess) return r;
        if ((r = cudaStreamCreateWithFlags(&be->copy, cudaStreamNonBlocking)) != cudaSuccess) return r;
        if ((r = cudaEventCreateWithFlags(&be->compute_done, cudaEventDisableTiming)) != cudaSuccess) return r;
        for (int i = 0; i < 2; ++i) {
            if ((r = cudaHostAlloc(&be->staging[i], k_staging_bytes, cudaHostAllocDefault)) != cudaSuccess) return r;
            if ((r = cudaEventCreateWithFlags(&be->staged[i], cudaEventDisableTiming)) != cudaSuccess) return r;
        }
        if ((r = cudaMalloc(reinterpret_cast<void **>(&be->error_flag), sizeof(int32_t))) != cudaSuccess) return r;
        return cudaMemset(be->error_flag, 0, sizeof(int32_t));
    };
    const cudaError_t r = setup();
    if (r != cudaSuccess) {
        host_log(host, MOESH_LOG_ERROR, "cuda backend: create: %s", cudaGetErrorString(r));
        release(be.get());
        return r == cudaErrorMemoryAllocation ? MOESH_ERR_OUT_OF_MEMORY : MOESH_ERR_INTERNAL;
    }
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, be->device);
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    host_log(&be->host, MOESH_LOG_INFO, "cuda backend: device %d %s (sm_%d%d), %.1f of %.1f GiB free", be->device,
             prop.name, prop.major, prop.minor, double(free_b) / double(1u << 30), double(total_b) / double(1u << 30));
    *out = be.release();
    return MOESH_OK;
}

void cuda_destroy(moesh_backend * be) {
    if (!be) return;
    release(be);
    delete be;
}

const char * cuda_last_error(moesh_backend * be) { return be ? be->last_error : "cuda backend: NULL context"; }

// ---------------------------------------------------------------- memory

moesh_status cuda_memory_info(moesh_backend * be, uint64_t * free_bytes, uint64_t * total_bytes) {
    return guarded(be, "memory_info", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(free_bytes && total_bytes, "memory_info: free_bytes and total_bytes must not be NULL");
        size_t f = 0, t = 0;
        MOESH_CUDA_CALL(cudaMemGetInfo(&f, &t), "memory_info: cudaMemGetInfo");
        *free_bytes = f;
        *total_bytes = t;
        return MOESH_OK;
    });
}

moesh_status cuda_buffer_alloc(moesh_backend * be, size_t n_bytes, void ** out) {
    return guarded(be, "buffer_alloc", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(out, "buffer_alloc: out is NULL");
        *out = nullptr;
        MOESH_PLUGIN_REQUIRE(n_bytes > 0, "buffer_alloc: n_bytes is 0");
        MOESH_PLUGIN_REQUIRE(n_bytes <= SIZE_MAX - 255, "buffer_alloc: n_bytes %zu is too large", n_bytes);
        // Whole 256-byte units, so vector loads past a row's end stay inside.
        MOESH_CUDA_CALL(cudaMalloc(out, (n_bytes + 255) & ~size_t(255)), "buffer_alloc: cudaMalloc");
        return MOESH_OK;
    });
}

moesh_status wait_uploads(moesh_backend * be);

void cuda_buffer_free(moesh_backend * be, void * ptr) {
    if (!ptr) return;
    // cudaFree waits for work already on a stream, not for tickets the uploader has not issued
    // yet (an error path may free a tier's slots with copies queued); its error shows on the next call.
    if (be) (void)wait_uploads(be);
    cudaFree(ptr);
}

moesh_status cuda_copy_to_device(moesh_backend * be, void * dst, const void * src, size_t n_bytes) {
    return guarded(be, "copy_to_device", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(n_bytes == 0 || (dst && src), "copy_to_device: dst and src must not be NULL");
        if (n_bytes == 0) return MOESH_OK;
        const moesh_status s = order_copy_after_compute(be);
        if (s != MOESH_OK) return s;
        // Two pinned buffers in turn: filling one overlaps the other's transfer.
        for (size_t off = 0, i = 0; off < n_bytes; off += k_staging_bytes, ++i) {
            const size_t n = std::min(k_staging_bytes, n_bytes - off);
            const int k = int(i % 2);
            MOESH_CUDA_CALL(cudaEventSynchronize(be->staged[k]), "copy_to_device: cudaEventSynchronize");
            std::memcpy(be->staging[k], static_cast<const uint8_t *>(src) + off, n);
            MOESH_CUDA_CALL(cudaMemcpyAsync(static_cast<uint8_t *>(dst) + off, be->staging[k], n,
                                            cudaMemcpyHostToDevice, be->copy),
                            "copy_to_device: cudaMemcpyAsync");
            MOESH_CUDA_CALL(cudaEventRecord(be->staged[k], be->copy), "copy_to_device: cudaEventRecord");
        }
        MOESH_CUDA_CALL(cudaStreamSynchronize(be->copy), "copy_to_device");
        return MOESH_OK;
    });
}

moesh_status cuda_copy_to_host(moesh_backend * be, void * dst, const void * src, size_t n_bytes) {
    return guarded(be, "copy_to_host", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(n_bytes == 0 || (dst && src), "copy_to_host: dst and src must not be NULL");
        if (n_bytes == 0) return MOESH_OK;
        const moesh_status s = order_copy_after_compute(be);
        if (s != MOESH_OK) return s;
        for (size_t off = 0; off < n_bytes; off += k_staging_bytes) {
            const size_t n = std::min(k_staging_bytes, n_bytes - off);
            MOESH_CUDA_CALL(cudaMemcpyAsync(be->staging[0], static_cast<const uint8_t *>(src) + off, n,
                                            cudaMemcpyDeviceToHost, be->copy),
                            "copy_to_host: cudaMemcpyAsync");
            MOESH_CUDA_CALL(cudaStreamSynchronize(be->copy), "copy_to_host");
            std::memcpy(static_cast<uint8_t *>(dst) + off, be->staging[0], n);
        }
        return MOESH_OK;
    });
}

moesh_status cuda_copy_to_device_async(moesh_backend * be, void * dst, const void * src, size_t n_bytes,
                                       uint64_t * ticket) {
    return guarded(be, "copy_to_device_async", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(ticket, "copy_to_device_async: ticket is NULL");
        *ticket = 0;
        MOESH_PLUGIN_REQUIRE(n_bytes == 0 || (dst && src), "copy_to_device_async: dst and src must not be NULL");
        moesh_status s = start_uploader(be);
        if (s != MOESH_OK) return s;
        Uploader & up = be->up;
        std::unique_lock<std::mutex> lock(up.mutex);
        if ((s = take_upload_error(be)) != MOESH_OK) return s;
        const uint64_t t = up.queued + 1;
        // Blocks only with k_upload_slots tickets queued that the worker has not reached.
        up.cv.wait(lock, [&] { return up.dead || t - up.started <= k_upload_slots; });
        if (up.dead) return take_upload_error(be);
        UploadSlot & slot = up.slots[t % k_upload_slots];
        MOESH_CUDA_CALL(cudaEventRecord(slot.compute_mark, be->compute), "copy_to_device_async: cudaEventRecord");
        slot.dst = dst;
        slot.src = src;
        slot.n_bytes = n_bytes;
        up.queued = t;
        up.cv.notify_all();
        *ticket = t;
        return MOESH_OK;
    });
}

moesh_status cuda_copy_wait(moesh_backend * be, uint64_t ticket, int32_t wait_host) {
    return guarded(be, "copy_wait", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(wait_host == 0 || wait_host == 1, "copy_wait: wait_host is %d, must be 0 or 1",
                             int(wait_host));
        Uploader & up = be->up;
        std::unique_lock<std::mutex> lock(up.mutex);
        MOESH_PLUGIN_REQUIRE(ticket != 0 && ticket <= up.queued,
                             "copy_wait: ticket %llu was never issued (the last one is %llu)",
                             (unsigned long long)ticket, (unsigned long long)up.queued);
        // Only an issued ticket has a done event to wait for.
        up.cv.wait(lock, [&] { return up.dead || up.issued >= ticket; });
        if (up.dead) return take_upload_error(be);
        // The latest k_upload_slots tickets still hold their own done event. An
        // older one's slot was recycled; it completed before the oldest kept
        // ticket, which is the closest one to wait for instead.
        const uint64_t oldest_kept = up.issued >= k_upload_slots ? up.issued - k_upload_slots + 1 : 1;
        const size_t s = size_t(std::max(ticket, oldest_kept) % k_upload_slots);
        MOESH_CUDA_CALL(cudaStreamWaitEvent(be->compute, up.slots[s].done, 0), "copy_wait: cudaStreamWaitEvent");
        if (wait_host) {
            up.pinned = int(s);
            lock.unlock();
            const cudaError_t e = cudaEventSynchronize(up.slots[s].done);
            lock.lock();
            up.pinned = -1;
            up.cv.notify_all();
            MOESH_CUDA_CALL(e, "copy_wait: cudaEventSynchronize");
        }
        return take_upload_error(be);
    });
}

moesh_status cuda_copy_elapsed(moesh_backend * be, uint64_t ticket, double * seconds) {
    return guarded(be, "copy_elapsed", [&]() -> moesh_status {
        MOESH_PLUGIN_REQUIRE(seconds, "copy_elapsed: seconds is NULL");
        *seconds = -1;
        Uploader & up = be->up;
        std::lock_guard<std::mutex> lock(up.mutex);
        MOESH_PLUGIN_REQUIRE(ticket != 0 && ticket <= up.queued,
                             "copy_elapsed: ticket %llu was never issued (the last one is %llu)",
                             (unsigned long long)ticket, (unsigned long long)up.queued);
        const UploadSlot & slot = up.slots[ticket % k_upload_slots];
        if (slot.timed != ticket) return MOESH_OK;   // not recorded yet, failed, or its slot recycled
        const cudaError_t q = cudaEventQuery(slot.end);
        if (q == cudaErrorNotReady) return MOESH_OK;
        MOESH_CUDA_CALL(q, "copy_elapsed: cudaEventQuery");
        float ms = 0;
        MOESH_CUDA_CALL(cudaEventElapsedTime(&ms, slot.start, slot.end), "copy_elapsed: cudaEventElapsedTime");
        *seconds = double(ms) * 1e-3;
        return MOESH_OK;
    });
}

// Every queued upload issued and finished; a worker error is reported here.
moesh_status wait_uploads(moesh_backend * be) {
    Uploader & up = be->up;
    if (!up.worker.joinable()) return MOESH_OK;
    std::unique_lock<std::mutex> lock(up.mutex);
    up.cv.wait(lock, [&] { return up.dead || up.issued == up.queued; });
    if (!up.dead) {
        lock.unlock();   // the worker is idle: only this thread queues
        MOESH_CUDA_CALL(cudaStreamSynchronize(up.stream), "synchronize: upload stream");
        lock.lock();
    }
    return take_upload_error(be);
}

moesh_status cuda_synchronize(moesh_backend * be) {
    return guarded(be, "synchronize", [&]() -> moesh_status {
        const moesh_status s = wait_uploads(be);
        if (s != MOESH_OK) {
            cudaStreamSynchronize(be->compute);   // still a full wait; its error shows on the next call
            return s;
        }
        MOESH_CUDA_CALL(cudaStreamSynchronize(be->compute), "synchronize");
        int32_t flag = 0;
        MOESH_CUDA_CALL(cudaMemcpy(&flag, be->error_flag, sizeof flag, cudaMemcpyDeviceToHost), "synchronize");
        if (flag != 0) {
            MOESH_CUDA_CALL(cudaMemset(be->error_flag, 0, sizeof flag), "synchronize");
            return fail(be, MOESH_ERR_INVALID_ARGUMENT,
                        "attention or copy_rows: a position, KV block id or row index was outside its range "
                        "(attention wrote NaN there, copy_rows skipped the row)");
        }
        return MOESH_OK;
    });
}

int32_t cuda_supports(moesh_backend *, int32_t op, int32_t w_type) {
    switch (op) {
    case MOESH_OP_MATMUL:
    case MOESH_OP_EXPERT_FFN: return moesh::cuda::matmul_supports(w_type) ? 1 : 0;
    case MOESH_OP_ATTENTION:   // KV pools, and copy_rows destinations, of f32 or f16
    case MOESH_OP_COPY_ROWS: return w_type == MOESH_DTYPE_F32 || w_type == MOESH_DTYPE_F16 ? 1 : 0;
    case MOESH_OP_RMS_NORM:
    case MOESH_OP_ROPE:
    case MOESH_OP_SOFTMAX: return 1;
    default: return 0;
    }
}

// ---------------------------------------------------------------- ops

moesh_status cuda_matmul(moesh_backend * be, const moesh_matmul_args * args) {
    return guarded(be, "matmul", [&]() -> moesh_status {
        moesh_matmul_args a;
        if (!read_args(be, args, "matmul", "moesh_matmul_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        MOESH_PLUGIN_REQUIRE(a.w && a.x && a.y, "matmul: w, x and y must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_in > 0 && a.n_out > 0 && a.n_tokens > 0,
                           "matmul: n_in (%lld), n_out (%lld) and n_tokens (%lld) must be positive", ll(a.n_in),
                           ll(a.n_out), ll(a.n_tokens));
        MOESH_PLUGIN_REQUIRE(a.x_stride >= a.n_in && a.y_stride >= a.n_out,
                           "matmul: x_stride (%lld) and y_stride (%lld) must be at least n_in and n_out",
                           ll(a.x_stride), ll(a.y_stride));
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_out, a.n_in) && product_fits(a.n_tokens, a.x_stride) &&
                               product_fits(a.n_tokens, a.y_stride),
                           "matmul: sizes overflow");
        if (!moesh::cuda::matmul_supports(a.w_type)) {
            return fail(be, MOESH_ERR_UNSUPPORTED,
                        "matmul: weight dtype %d is not supported by the cuda backend (f32, f16, bf16, q8_0, q4_0, q4_K are)",
                        int(a.w_type));
        }
        MOESH_PLUGIN_REQUIRE(a.n_in % block_elems(a.w_type) == 0,
                           "matmul: n_in (%lld) is not a multiple of %lld, as block weight dtype %d needs", ll(a.n_in),
                           ll(block_elems(a.w_type)), int(a.w_type));
        return launched(be, "matmul", [&] { return moesh::cuda::launch_matmul(a, be->compute); });
    });
}

moesh_status cuda_rms_norm(moesh_backend * be, const moesh_rms_norm_args * args) {
    return guarded(be, "rms_norm", [&]() -> moesh_status {
        moesh_rms_norm_args a;
        if (!read_args(be, args, "rms_norm", "moesh_rms_norm_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        MOESH_PLUGIN_REQUIRE(a.x && a.weight && a.y, "rms_norm: x, weight and y must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n > 0 && a.n_rows > 0 && a.n_rows <= INT32_MAX,
                           "rms_norm: n (%lld) and n_rows (%lld) must be positive", ll(a.n), ll(a.n_rows));
        MOESH_PLUGIN_REQUIRE(a.eps >= 0.0f && a.eps <= 3.4e38f, "rms_norm: eps must be finite and >= 0");
        MOESH_PLUGIN_REQUIRE(product_fits(a.n, a.n_rows), "rms_norm: sizes overflow");
        return launched(be, "rms_norm", [&] { return moesh::cuda::launch_rms_norm(a, be->compute); });
    });
}

moesh_status cuda_rope(moesh_backend * be, const moesh_rope_args * args) {
    return guarded(be, "rope", [&]() -> moesh_status {
        moesh_rope_args a;
        if (!read_args(be, args, "rope", "moesh_rope_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        MOESH_PLUGIN_REQUIRE(a.x && a.pos && a.inv_freq, "rope: x, pos and inv_freq must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.reserved == 0, "rope: reserved is %u, must be 0", unsigned(a.reserved));
        if (a.mode != MOESH_ROPE_NEOX && a.mode != MOESH_ROPE_NORM) {
            return fail(be, MOESH_ERR_UNSUPPORTED, "rope: unknown mode %d", int(a.mode));
        }
        MOESH_PLUGIN_REQUIRE(a.n_tokens > 0 && a.n_head > 0 && a.head_dim > 0,
                           "rope: n_tokens (%lld), n_head (%lld) and head_dim (%lld) must be positive", ll(a.n_tokens),
                           ll(a.n_head), ll(a.head_dim));
        MOESH_PLUGIN_REQUIRE(a.rot_dim > 0 && a.rot_dim % 2 == 0 && a.rot_dim <= a.head_dim,
                           "rope: rot_dim (%lld) must be even, positive and <= head_dim (%lld)", ll(a.rot_dim),
                           ll(a.head_dim));
        int64_t n = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_tokens, a.n_head, &n) && product_fits(n, a.head_dim),
                           "rope: sizes overflow");
        return launched(be, "rope", [&] { return moesh::cuda::launch_rope(a, be->compute); });
    });
}

moesh_status cuda_expert_ffn(moesh_backend * be, const moesh_expert_ffn_args * args) {
    return guarded(be, "expert_ffn", [&]() -> moesh_status {
        moesh_expert_ffn_args a;
        if (!read_args(be, args, "expert_ffn", "moesh_expert_ffn_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        MOESH_PLUGIN_REQUIRE(a.gate && a.up && a.down && a.x && a.out && a.scratch,
                           "expert_ffn: gate, up, down, x, out and scratch must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.n_embd > 0 && a.n_ff > 0 && a.n_tokens > 0,
                           "expert_ffn: n_embd (%lld), n_ff (%lld) and n_tokens (%lld) must be positive",
                           ll(a.n_embd), ll(a.n_ff), ll(a.n_tokens));
        int64_t n_w = 0;
        MOESH_PLUGIN_REQUIRE(product_fits(a.n_ff, a.n_embd, &n_w) && product_fits(a.n_tokens, a.n_embd) &&
                               product_fits(2 * a.n_tokens, a.n_ff) && product_fits(3 * n_w, a.n_tokens),
                           "expert_ffn: sizes overflow");
        if (!moesh::cuda::matmul_supports(a.w_type)) {
            return fail(be, MOESH_ERR_UNSUPPORTED,
                        "expert_ffn: weight dtype %d is not supported by the cuda backend (f32, f16, bf16, q8_0, q4_0, "
                        "q4_K are)",
                        int(a.w_type));
        }
        MOESH_PLUGIN_REQUIRE(a.n_embd % block_elems(a.w_type) == 0 && a.n_ff % block_elems(a.w_type) == 0,
                           "expert_ffn: n_embd (%lld) and n_ff (%lld) must be multiples of %lld for dtype %d",
                           ll(a.n_embd), ll(a.n_ff), ll(block_elems(a.w_type)), int(a.w_type));
        // The ABI's aliasing rules, checked as the cpu backend checks them (device addresses compare alike).
        const size_t x_bytes = size_t(a.n_tokens * a.n_embd) * sizeof(float), h_bytes = size_t(2 * a.n_tokens * a.n_ff) * sizeof(float);
        MOESH_PLUGIN_REQUIRE(moesh::plugin::disjoint(a.scratch, h_bytes, a.x, x_bytes) && moesh::plugin::disjoint(a.scratch, h_bytes, a.out, x_bytes),
                           "expert_ffn: scratch overlaps x or out");
        MOESH_PLUGIN_REQUIRE(a.out == a.x || moesh::plugin::disjoint(a.out, x_bytes, a.x, x_bytes),
                           "expert_ffn: out partly overlaps x (only out == x is allowed)");
        return launched(be, "expert_ffn", [&] { return moesh::cuda::launch_expert_ffn(a, be->compute); });
    });
}

moesh_status cuda_softmax(moesh_backend * be, const moesh_softmax_args * args) {
    return guarded(be, "softmax", [&]() -> moesh_status {
        moesh_softmax_args a;
        if (!read_args(be, args, "softmax", "moesh_softmax_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        MOESH_PLUGIN_REQUIRE(a.x, "softmax: x must not be NULL");
        MOESH_PLUGIN_REQUIRE(a.reserved == 0, "softmax: reserved is %u, must be 0", unsigned(a.reserved));
        MOESH_PLUGIN_REQUIRE(a.n > 0 && a.n_rows > 0 && a.n_rows <= INT32_MAX,
                           "softmax: n (%lld) and n_rows (%lld) must be positive", ll(a.n), ll(a.n_rows));
        MOESH_PLUGIN_REQUIRE(product_fits(a.n, a.n_rows), "softmax: sizes overflow");
        return launched(be, "softmax", [&] { return moesh::cuda::launch_softmax(a, be->compute); });
    });
}

// The checks of one attention call (op names it in messages): MOESH_OK when the kernel may run it.
moesh_status check_attention(moesh_backend * be, const moesh_attention_args & a, const char * op) {
    const moesh_status s = moesh::plugin::check_attention_shape(be, a, op);
    if (s != MOESH_OK) return s;
    if (a.kv_type == MOESH_DTYPE_Q8_0) {   // valid by the ABI, not offered here (supports says 0)
        return fail(be, MOESH_ERR_UNSUPPORTED, "%s: the cuda backend reads KV pools of f32 or f16, not q8_0; use --kv-type f16", op);
    }
    if (a.head_dim > moesh::cuda::attention_max_head_dim()) {
        return fail(be, MOESH_ERR_UNSUPPORTED, "%s: head_dim %lld is more than the cuda backend's %lld", op,
                    ll(a.head_dim), ll(moesh::cuda::attention_max_head_dim()));
    }
    int64_t n_items = 0, kv_row = 0, n_pool_rows = 0;
    MOESH_PLUGIN_REQUIRE(product_fits(a.n_tokens, a.n_head, &n_items) && n_items <= INT32_MAX &&
                             product_fits(a.n_head_kv, a.head_dim, &kv_row) &&
                             product_fits(a.n_blocks, a.block_size, &n_pool_rows) && product_fits(n_pool_rows, kv_row),
                         "%s: sizes overflow", op);
    MOESH_PLUGIN_REQUIRE(a.scale == a.scale && a.scale - a.scale == 0.0f, "%s: scale must be finite", op);
    return MOESH_OK;
}

moesh_status cuda_attention(moesh_backend * be, const moesh_attention_args * args) {
    return guarded(be, "attention", [&]() -> moesh_status {
        moesh_attention_args a;
        if (!read_args(be, args, "attention", "moesh_attention_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        const moesh_status s = check_attention(be, a, "attention");
        if (s != MOESH_OK) return s;
        return launched(be, "attention", [&] { return moesh::cuda::launch_attention(a, be->error_flag, be->compute); });
    });
}

// Every run is checked as the attention call it stands for; the runs (host memory) travel to the
// GPU in the kernels' parameters, so nothing is allocated or copied for them.
moesh_status cuda_attention_batch(moesh_backend * be, const moesh_attention_batch_args * args) {
    return guarded(be, "attention_batch", [&]() -> moesh_status {
        moesh_attention_batch_args b;
        if (!read_args(be, args, "attention_batch", "moesh_attention_batch_args", &b)) return MOESH_ERR_INVALID_ARGUMENT;
        int64_t q_row = 0, n_items = 0;
        moesh_status s = moesh::plugin::check_attention_batch(be, b, &q_row);
        if (s != MOESH_OK) return s;
        MOESH_PLUGIN_REQUIRE(product_fits(b.n_tokens, b.n_head, &n_items) && n_items <= INT32_MAX,
                             "attention_batch: sizes overflow");   // the blocks of a launch
        int64_t end = 0;
        for (int64_t r = 0; r < b.n_runs; ++r) {
            moesh_attention_args a{};
            if ((s = moesh::plugin::attention_batch_run(be, b, r, q_row, &end, &a)) != MOESH_OK) return s;
            char op[64];
            std::snprintf(op, sizeof op, "attention_batch: run %lld", ll(r));
            if ((s = check_attention(be, a, op)) != MOESH_OK) return s;
        }
        return launched(be, "attention_batch", [&] { return moesh::cuda::launch_attention_batch(b, be->error_flag, be->compute); });
    });
}

moesh_status cuda_copy_rows(moesh_backend * be, const moesh_copy_rows_args * args) {
    return guarded(be, "copy_rows", [&]() -> moesh_status {
        moesh_copy_rows_args a;
        if (!read_args(be, args, "copy_rows", "moesh_copy_rows_args", &a)) return MOESH_ERR_INVALID_ARGUMENT;
        const moesh_status s = moesh::plugin::check_copy_rows(be, a);
        if (s != MOESH_OK) return s;
        if (a.dst_type == MOESH_DTYPE_Q8_0)   // valid by the ABI, not offered here (supports says 0)
            return fail(be, MOESH_ERR_UNSUPPORTED, "copy_rows: the cuda backend writes f32 or f16, not q8_0; use --kv-type f16");
        if (a.n_rows == 0) return s;
        // The indices are device memory: the kernel checks them and sets error_flag.
        return launched(be, "copy_rows", [&] { return moesh::cuda::launch_copy_rows(a, be->error_flag, be->compute); });
    });
}

const moesh_backend_iface k_cuda_iface = {
    /* .abi_version    = */ MOESH_PLUGIN_ABI_VERSION,
    /* .struct_size    = */ sizeof(moesh_backend_iface),
    /* .name           = */ "cuda",
    /* .host_memory    = */ 0,
    /* .create         = */ cuda_create,
    /* .destroy        = */ cuda_destroy,
    /* .last_error     = */ cuda_last_error,
    /* .memory_info    = */ cuda_memory_info,
    /* .buffer_alloc   = */ cuda_buffer_alloc,
    /* .buffer_free    = */ cuda_buffer_free,
    /* .copy_to_device = */ cuda_copy_to_device,
    /* .copy_to_host   = */ cuda_copy_to_host,
    /* .synchronize    = */ cuda_synchronize,
    /* .supports       = */ cuda_supports,
    /* .matmul         = */ cuda_matmul,
    /* .rms_norm       = */ cuda_rms_norm,
    /* .rope           = */ cuda_rope,
    /* .expert_ffn     = */ cuda_expert_ffn,
    /* .softmax        = */ cuda_softmax,
    /* .attention      = */ cuda_attention,
    /* .packed_size    = */ nullptr,   // not yet: weights stay in the GGUF layout
    /* .pack_weights   = */ nullptr,
    /* .copy_rows      = */ cuda_copy_rows,
    /* .moe_ffn        = */ nullptr,   // expert_ffn per expert
    /* .attention_batch = */ cuda_attention_batch,
    /* .copy_to_device_async = */ cuda_copy_to_device_async,
    /* .copy_wait = */ cuda_copy_wait,
    /* .copy_elapsed = */ cuda_copy_elapsed,
};

} // namespace

extern "C" {

MOESH_PLUGIN_EXPORT moesh_status moesh_plugin_init(const moesh_host_api * host, const moesh_backend_iface ** out) {
    if (!out) return MOESH_ERR_INVALID_ARGUMENT;
    *out = nullptr;
    if (!host) return MOESH_ERR_INVALID_ARGUMENT;
    if (host->abi_version < MOESH_PLUGIN_ABI_VERSION ||
        host->struct_size < offsetof(moesh_host_api, log) + sizeof(host->log)) {
        host_log(host, MOESH_LOG_ERROR, "cuda backend: host ABI version %u is older than the plugin's %u",
                 unsigned(host->abi_version), unsigned(MOESH_PLUGIN_ABI_VERSION));
        return MOESH_ERR_ABI_MISMATCH;
    }
    *out = &k_cuda_iface;
    return MOESH_OK;
}

// Negative (cannot run here) without a usable device, so the loader skips it.
MOESH_PLUGIN_EXPORT int32_t moesh_plugin_score(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? k_score : -1;
}

} // extern "C"
