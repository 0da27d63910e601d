// Finds, validates and opens moesh backend plugins (libmoesh_backend_<name>.so).
//
// Usage:
//     moesh::PluginOptions opts;
//     opts.search_dirs = moesh::default_plugin_dirs(cli.plugin_dir, config.plugin_dirs);
//     opts.allowed = config.allowed_plugins;      // empty = any
//     opts.preferred = cli.backend;                // empty = highest score
//     std::string report;
//     std::unique_ptr<moesh::Backend> be = moesh::load_backend(opts, &report);
//     if (!be) { fprintf(stderr, "%s", report.c_str()); return 1; }
//     if (verbose) fprintf(stderr, "%s", report.c_str());
//     be->check(be->iface().matmul(be->ctx(), &args), "matmul");  // throws BackendError
//
// Thread safety: probe_plugins, load_backend and default_plugin_dirs may be called from any
// thread. A Backend (its moesh_backend context) is used by one thread at a time, as plugin.h
// requires; const accessors are safe to share. set_plugin_log_level/sink are thread-safe; the
// sink is called from whatever thread the plugin logs on, under a lock.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "moesh/plugin.h"

namespace moesh {

// A plugin call returned a non-OK status (see Backend::check).
class BackendError : public std::runtime_error {
public:
    BackendError(const std::string & msg, moesh_status status)
        : std::runtime_error(msg), status_(status) {}
    moesh_status status() const { return status_; }

private:
    moesh_status status_;
};

// "MOESH_ERR_UNSUPPORTED", ...; "MOESH_STATUS_<n>" for values this host does not know.
std::string status_name(moesh_status s);

struct PluginOptions {
    std::vector<std::string> search_dirs;  // empty = default_plugin_dirs("", {})
    std::vector<std::string> allowed;      // backend names; empty = all
    std::string preferred;                 // backend name; empty = best score
    int n_threads = 0;                     // <= 0: the plugin decides
    bool precise_activations = false;      // MOESH_ACTIVATIONS_PRECISE (see plugin.h)
};

namespace detail {
struct HostState;       // host api table + logger context handed to one plugin library
struct BackendFactory;  // the loader's way in to Backend's private constructor
} // namespace detail

// An opened plugin with a created context. Destruction destroys the context, then unloads
// the library. The table is a copy of the plugin's, zero-filled past its struct_size, so
// optional slots newer than the plugin read as NULL.
class Backend {
public:
    Backend(Backend && other) noexcept;
    Backend & operator=(Backend && other) noexcept;
    Backend(const Backend &) = delete;
    Backend & operator=(const Backend &) = delete;
    ~Backend();

    const moesh_backend_iface & iface() const { return iface_; }
    moesh_backend * ctx() const { return ctx_; }
    const std::string & name() const { return name_; }
    const std::string & path() const { return path_; }
    int32_t score() const { return score_; }

    // Throws BackendError "<name>: <what> failed: <status name>: <last_error()>" unless s is OK.
    void check(moesh_status s, const char * what) const;
    // iface().supports(ctx(), op, w_type) != 0; op is a moesh_op, w_type a moesh_dtype.
    bool supports(int32_t op, int32_t w_type) const;
    // Kernels take host pointers (iface().host_memory).
    bool host_memory() const { return iface_.host_memory != 0; }
    // copy_to_device / copy_to_host; throw BackendError naming `what`.
    void upload(void * dst, const void * src, size_t n_bytes, const char * what) const;
    void download(void * dst, const void * src, size_t n_bytes, const char * what) const;
    // copy_to_device_async and copy_wait are offered (a copy queue beside the ops).
    bool has_async_upload() const;
    // copy_to_device_async: returns the ticket; wait_upload: copy_wait(ticket, host).
    uint64_t upload_async(void * dst, const void * src, size_t n_bytes, const char * what) const;
    void wait_upload(uint64_t ticket, bool host, const char * what) const;
    // copy_elapsed: the device's seconds for ticket's copy, or -1 when not known (not offered,
    // still running, or too old).
    double upload_seconds(uint64_t ticket, const char * what) const;

private:
    friend struct detail::BackendFactory;
    Backend() = default;
    void release() noexcept;

    void * handle_ = nullptr;              // dlopen handle
    std::unique_ptr<detail::HostState> host_; // must outlive the context and the library
    moesh_backend_iface iface_{};
    moesh_backend * ctx_ = nullptr;
    std::string name_;
    std::string path_;
    int32_t score_ = 0;
};

// A buffer from the backend's buffer_alloc, released with its buffer_free. The
// backend must outlive it. Empty (get() == nullptr) when default-constructed.
class BackendBuffer {
public:
    BackendBuffer() = default;
    // Throws BackendError (MOESH_ERR_OUT_OF_MEMORY when it does not fit) naming `what`.
    BackendBuffer(const Backend & backend, size_t n_bytes, const char * what);
    BackendBuffer(BackendBuffer && other) noexcept;
    BackendBuffer & operator=(BackendBuffer && other) noexcept;
    BackendBuffer(const BackendBuffer &) = delete;
    BackendBuffer & operator=(const BackendBuffer &) = delete;
    ~BackendBuffer();

    void * get() const { return ptr_; }
    template <class T>
    T * as() const { return static_cast<T *>(ptr_); }
    size_t bytes() const { return bytes_; }

private:
    void release() noexcept;

    const Backend * backend_ = nullptr;
    void * ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Where to look, in order: cli_dir (if non-empty), each entry of $MOESH_PLUGIN_DIR
// (colon-separated), config_dirs, then <dir of /proc/self/exe>/../lib/moesh. Empty entries
// and repeats are dropped; the first occurrence keeps its place.
std::vector<std::string> default_plugin_dirs(const std::string & cli_dir,
                                             const std::vector<std::string> & config_dirs);

struct PluginProbe {
    std::string path;      // the .so, or the searched folder when nothing was found at all
    bool ok = false;       // loadable: valid table, non-negative score
    std::string name;      // backend name from the table (empty if it never got that far)
    int32_t score = 0;
    std::string reason;    // why not ok; empty when ok
};

// Opens every libmoesh_backend_*.so in dirs (folder order, then file name order), checks its
// table and score, and unloads it again. Missing folders are skipped; if no plugin file is
// found at all, the result holds one entry per folder saying what was there instead.
// A name seen earlier in the search order shadows later files with the same name.
std::vector<PluginProbe> probe_plugins(const std::vector<std::string> & dirs);

// Probes, filters by allowed, picks preferred (or the highest score, earliest folder on a
// tie, falling back to the next one if create fails) and creates a context. Returns nullptr
// on failure. report (may be null) gets one line per candidate, on success too, and on
// failure what to do about it.
std::unique_ptr<Backend> load_backend(const PluginOptions & opts, std::string * report);

// Host logger for plugin messages: stderr, "[moesh plugin <name>] msg", at or above the
// level (default MOESH_LOG_WARN). A sink replaces stderr (pass nullptr to restore it).
using PluginLogSink = std::function<void(moesh_log_level level, std::string_view plugin,
                                         std::string_view msg)>;
void set_plugin_log_level(moesh_log_level min_level);
void set_plugin_log_sink(PluginLogSink sink);

} // namespace moesh
