#include "plugin_loader.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <utility>

namespace fs = std::filesystem;

namespace moesh {

namespace {

constexpr const char * k_file_prefix = "libmoesh_backend_";
constexpr const char * k_file_suffix = ".so";

// The v1 table ends at its last required slot; a plugin may hand us more (a newer minor
// layout), never less. Anything past this is plainly not a table.
constexpr size_t k_min_iface_size =
    offsetof(moesh_backend_iface, attention) + sizeof(moesh_backend_iface::attention);
constexpr uint32_t k_max_plausible_iface_size = 64 * 1024;

struct RequiredSlot {
    const char * name;
    size_t offset;
};

#define MOESH_SLOT(member) RequiredSlot{#member, offsetof(moesh_backend_iface, member)}
constexpr RequiredSlot k_required_slots[] = {
    MOESH_SLOT(create),         MOESH_SLOT(destroy),      MOESH_SLOT(last_error),
    MOESH_SLOT(memory_info),    MOESH_SLOT(buffer_alloc), MOESH_SLOT(buffer_free),
    MOESH_SLOT(copy_to_device), MOESH_SLOT(copy_to_host), MOESH_SLOT(synchronize),
    MOESH_SLOT(supports),       MOESH_SLOT(matmul),       MOESH_SLOT(rms_norm),
    MOESH_SLOT(rope),           MOESH_SLOT(expert_ffn),   MOESH_SLOT(softmax),
    MOESH_SLOT(attention),
};
#undef MOESH_SLOT

using AnyFn = void (*)(void);
static_assert(sizeof(AnyFn) == sizeof(moesh_backend_iface::create));

// ---- host logger -------------------------------------------------------------------------

struct LogState {
    std::mutex mu;
    PluginLogSink sink; // guarded by mu
};

LogState & log_state() {
    static LogState s;
    return s;
}

std::atomic<int> g_min_log_level{MOESH_LOG_WARN};

const char * level_name(moesh_log_level level) {
    switch (level) {
    case MOESH_LOG_DEBUG: return "debug";
    case MOESH_LOG_INFO: return "info";
    case MOESH_LOG_WARN: return "warn";
    case MOESH_LOG_ERROR: return "error";
    }
    return "log";
}

} // namespace

namespace detail {

// One per opened library: the plugin may keep the host pointer from init or create for as
// long as it is loaded, so this lives at a stable address until after dlclose.
struct HostState {
    moesh_host_api api{};
    std::string plugin;        // for the log prefix: <name> of libmoesh_backend_<name>.so
    std::mutex mu;
    std::string last_error;    // last MOESH_LOG_ERROR message, guarded by mu

    std::string take_last_error() {
        std::lock_guard lock(mu);
        return std::exchange(last_error, {});
    }
};

} // namespace detail

namespace {

// A level from a plugin, as one of ours: below DEBUG is DEBUG, above ERROR (a newer
// plugin's level, say) is ERROR.
moesh_log_level known_level(int32_t level) {
    if (level <= MOESH_LOG_DEBUG) return MOESH_LOG_DEBUG;
    if (level >= MOESH_LOG_ERROR) return MOESH_LOG_ERROR;
    return static_cast<moesh_log_level>(level);
}

// C callback handed to plugins: nothing may escape it.
void host_log(void * ctx, int32_t raw_level, const char * msg) noexcept {
    try {
        const moesh_log_level level = known_level(raw_level);
        auto * host = static_cast<detail::HostState *>(ctx);
        std::string_view text = msg ? msg : "(null)";
        std::string_view plugin = host ? std::string_view(host->plugin) : "?";
        if (host && level >= MOESH_LOG_ERROR) {
            std::lock_guard lock(host->mu);
            host->last_error = text;
        }
        if (static_cast<int>(level) < g_min_log_level.load(std::memory_order_relaxed)) {
            return;
        }
        LogState & ls = log_state();
        std::lock_guard lock(ls.mu);
        if (ls.sink) {
            ls.sink(level, plugin, text);
        } else {
            std::fprintf(stderr, "[moesh plugin %.*s] %s: %.*s\n", int(plugin.size()),
                         plugin.data(), level_name(level), int(text.size()), text.data());
        }
    } catch (...) {
    }
}

std::unique_ptr<detail::HostState> make_host(std::string plugin) {
    auto host = std::make_unique<detail::HostState>();
    host->plugin = std::move(plugin);
    host->api.abi_version = MOESH_PLUGIN_ABI_VERSION;
    host->api.struct_size = sizeof(moesh_host_api);
    host->api.ctx = host.get();
    host->api.log = host_log;
    return host;
}

struct DlCloser {
    void operator()(void * h) const noexcept {
        if (h) dlclose(h);
    }
};
using LibHandle = std::unique_ptr<void, DlCloser>;

// A probed plugin. The library stays open while the candidate lives, so that the chosen one
// is created from the very table that was validated (init runs once per load).
struct Candidate {
    PluginProbe probe;
    std::unique_ptr<detail::HostState> host; // declared before lib: destroyed after dlclose
    LibHandle lib;
    moesh_backend_iface iface{};
    bool scored = false; // the score step was reached, so probe.score means something
};

std::string stem_name(const std::string & file) {
    // libmoesh_backend_<name>.so -> <name>
    const size_t pre = std::strlen(k_file_prefix), suf = std::strlen(k_file_suffix);
    return file.substr(pre, file.size() - pre - suf);
}

bool is_plugin_file(const std::string & file) {
    const size_t pre = std::strlen(k_file_prefix), suf = std::strlen(k_file_suffix);
    return file.size() > pre + suf && file.compare(0, pre, k_file_prefix) == 0 &&
           file.compare(file.size() - suf, suf, k_file_suffix) == 0;
}

std::string join(const std::vector<std::string> & items, const char * sep) {
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += sep;
        out += items[i];
    }
    return out;
}

bool contains(const std::vector<std::string> & v, const std::string & s) {
    return std::find(v.begin(), v.end(), s) != v.end();
}

// Opens and validates one plugin; on success the candidate keeps the library open.
Candidate probe_file(const std::string & path, const std::string & stem) {
    Candidate c;
    c.probe.path = path;
    auto reject = [&](std::string reason) {
        c.probe.ok = false;
        c.probe.reason = std::move(reason);
        c.lib.reset();
        return std::move(c);
    };

    dlerror();
    c.lib.reset(dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL));
    if (!c.lib) {
        const char * err = dlerror();
        return reject(std::string("dlopen failed: ") + (err ? err : "unknown error"));
    }
    auto init =
        reinterpret_cast<moesh_plugin_init_fn>(dlsym(c.lib.get(), MOESH_PLUGIN_INIT_SYMBOL));
    if (!init) return reject("no " MOESH_PLUGIN_INIT_SYMBOL " symbol");

    c.host = make_host(stem);
    const moesh_backend_iface * table = nullptr;
    const moesh_status st = init(&c.host->api, &table);
    if (st != MOESH_OK) {
        std::string reason = MOESH_PLUGIN_INIT_SYMBOL " failed: " + status_name(st);
        if (std::string said = c.host->take_last_error(); !said.empty()) reason += ": " + said;
        return reject(std::move(reason));
    }
    if (!table) return reject(MOESH_PLUGIN_INIT_SYMBOL " returned OK but no table");

    // Only the two leading members are read before the size is known to be sane.
    uint32_t abi_version = 0, struct_size = 0;
    std::memcpy(&abi_version, reinterpret_cast<const char *>(table) +
                offsetof(moesh_backend_iface, abi_version), sizeof abi_version);
    std::memcpy(&struct_size, reinterpret_cast<const char *>(table) +
                offsetof(moesh_backend_iface, struct_size), sizeof struct_size);
    if (abi_version != MOESH_PLUGIN_ABI_VERSION) {
        return reject("built for ABI v" + std::to_string(abi_version) + ", this moesh speaks v" +
                      std::to_string(MOESH_PLUGIN_ABI_VERSION));
    }
    if (struct_size < k_min_iface_size) {
        return reject("table struct_size " + std::to_string(struct_size) +
                      " is smaller than the " + std::to_string(k_min_iface_size) +
                      " bytes ABI v" + std::to_string(MOESH_PLUGIN_ABI_VERSION) + " requires");
    }
    if (struct_size > k_max_plausible_iface_size) {
        return reject("table struct_size " + std::to_string(struct_size) +
                      " is implausible (more than " + std::to_string(k_max_plausible_iface_size) +
                      " bytes)");
    }
    // Copy what both sides know; slots this host has but the plugin lacks stay NULL.
    std::memcpy(&c.iface, table, std::min<size_t>(struct_size, sizeof c.iface));

    if (!c.iface.name || !*c.iface.name) return reject("table name is NULL or empty");
    c.probe.name = c.iface.name;
    for (const RequiredSlot & slot : k_required_slots) {
        AnyFn fn = nullptr;
        std::memcpy(&fn, reinterpret_cast<const char *>(&c.iface) + slot.offset, sizeof fn);
        if (!fn) return reject(std::string("required slot '") + slot.name + "' is NULL");
    }

    if (!c.iface.copy_to_device_async != !c.iface.copy_wait)
        return reject("table has one of 'copy_to_device_async' and 'copy_wait' but not the other");
    if (c.iface.copy_elapsed && !c.iface.copy_wait)
        return reject("table has 'copy_elapsed' without the copy queue ('copy_to_device_async', 'copy_wait')");

    if (auto score = reinterpret_cast<moesh_plugin_score_fn>(
            dlsym(c.lib.get(), MOESH_PLUGIN_SCORE_SYMBOL))) {
        c.probe.score = score();
        c.scored = true;
        if (c.probe.score < 0) {
            return reject(MOESH_PLUGIN_SCORE_SYMBOL " returned " + std::to_string(c.probe.score) +
                          ": cannot run on this machine");
        }
    }
    c.scored = true;
    c.probe.ok = true;
    return c;
}

std::string describe_dir(const fs::path & dir) {
    std::error_code ec;
    if (!fs::exists(dir, ec)) return "folder does not exist";
    if (!fs::is_directory(dir, ec)) return "not a folder";
    return std::string("no ") + k_file_prefix + "*" + k_file_suffix + " in this folder";
}

// Probes every plugin file in dirs. allowed (non-empty) is applied to the file name before
// opening, so code we were told not to use never runs, and to the table name after.
std::vector<Candidate> probe_all(const std::vector<std::string> & dirs,
                                 const std::vector<std::string> & allowed) {
    std::vector<Candidate> out;
    std::set<fs::path> seen_dirs;
    std::vector<std::string> searched;
    for (const std::string & d : dirs) {
        if (d.empty()) continue;
        std::error_code ec;
        fs::path canon = fs::weakly_canonical(d, ec);
        if (ec) canon = fs::path(d).lexically_normal();
        if (!seen_dirs.insert(canon).second) continue;
        searched.push_back(d);

        std::vector<std::string> files;
        fs::directory_iterator it(d, ec);
        if (ec) continue; // missing or unreadable folders are skipped quietly
        for (const fs::directory_entry & e : it) {
            const std::string file = e.path().filename().string();
            if (is_plugin_file(file)) files.push_back(file);
        }
        std::sort(files.begin(), files.end());
        for (const std::string & file : files) {
            const std::string path = (fs::path(d) / file).string();
            const std::string stem = stem_name(file);
            if (!allowed.empty() && !contains(allowed, stem)) {
                Candidate c;
                c.probe.path = path;
                c.probe.reason = "'" + stem + "' is not in the allowed list (" +
                                 join(allowed, ", ") + ")";
                out.push_back(std::move(c));
                continue;
            }
            out.push_back(probe_file(path, stem));
        }
    }

    if (out.empty()) {
        for (const std::string & d : searched) {
            Candidate c;
            c.probe.path = d;
            c.probe.reason = describe_dir(d);
            out.push_back(std::move(c));
        }
        return out;
    }

    for (size_t i = 0; i < out.size(); ++i) {
        Candidate & c = out[i];
        if (!c.probe.ok) continue;
        if (!allowed.empty() && !contains(allowed, c.probe.name)) {
            c.probe.ok = false;
            c.probe.reason = "backend name '" + c.probe.name + "' is not in the allowed list (" +
                             join(allowed, ", ") + ")";
            c.lib.reset();
            continue;
        }
        // The first usable copy of a name wins: a --plugin-dir build overrides an installed one.
        for (size_t j = 0; j < i; ++j) {
            if (out[j].probe.ok && out[j].probe.name == c.probe.name) {
                c.probe.ok = false;
                c.probe.reason = "shadowed by " + out[j].probe.path +
                                 " (same backend name, earlier in the search order)";
                c.lib.reset();
                break;
            }
        }
    }
    return out;
}

std::string candidate_line(const Candidate & c, const std::string & verdict) {
    const PluginProbe & p = c.probe;
    std::string line = "  " + p.path;
    if (c.scored) line += " (" + p.name + ", score " + std::to_string(p.score) + ")";
    else if (!p.name.empty()) line += " (" + p.name + ")";
    return line + ": " + verdict + "\n";
}

} // namespace

std::string status_name(moesh_status s) {
    switch (s) {
    case MOESH_OK: return "MOESH_OK";
    case MOESH_ERR_INVALID_ARGUMENT: return "MOESH_ERR_INVALID_ARGUMENT";
    case MOESH_ERR_UNSUPPORTED: return "MOESH_ERR_UNSUPPORTED";
    case MOESH_ERR_OUT_OF_MEMORY: return "MOESH_ERR_OUT_OF_MEMORY";
    case MOESH_ERR_INTERNAL: return "MOESH_ERR_INTERNAL";
    case MOESH_ERR_ABI_MISMATCH: return "MOESH_ERR_ABI_MISMATCH";
    }
    return "MOESH_STATUS_" + std::to_string(static_cast<int>(s));
}

// ---- Backend -----------------------------------------------------------------------------

Backend::Backend(Backend && other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)),
      host_(std::move(other.host_)),
      iface_(std::exchange(other.iface_, moesh_backend_iface{})),
      ctx_(std::exchange(other.ctx_, nullptr)),
      name_(std::move(other.name_)),
      path_(std::move(other.path_)),
      score_(other.score_) {}

Backend & Backend::operator=(Backend && other) noexcept {
    if (this != &other) {
        release();
        handle_ = std::exchange(other.handle_, nullptr);
        host_ = std::move(other.host_);
        iface_ = std::exchange(other.iface_, moesh_backend_iface{});
        ctx_ = std::exchange(other.ctx_, nullptr);
        name_ = std::move(other.name_);
        path_ = std::move(other.path_);
        score_ = other.score_;
    }
    return *this;
}

Backend::~Backend() { release(); }

void Backend::release() noexcept {
    if (ctx_ && iface_.destroy) iface_.destroy(ctx_);
    ctx_ = nullptr;
    if (handle_) dlclose(handle_);
    handle_ = nullptr;
    host_.reset(); // after dlclose: the plugin may log from its destroy or its destructors
}

void Backend::check(moesh_status s, const char * what) const {
    if (s == MOESH_OK) return;
    const char * err = (ctx_ && iface_.last_error) ? iface_.last_error(ctx_) : nullptr;
    throw BackendError(name_ + ": " + (what ? what : "call") + " failed: " + status_name(s) + ": " +
                           (err && *err ? err : "no message"),
                       s);
}

bool Backend::supports(int32_t op, int32_t w_type) const {
    return ctx_ && iface_.supports && iface_.supports(ctx_, op, w_type) != 0;
}

void Backend::upload(void * dst, const void * src, size_t n_bytes, const char * what) const {
    if (n_bytes == 0) return;
    check(iface_.copy_to_device(ctx_, dst, src, n_bytes), what);
}

bool Backend::has_async_upload() const { return iface_.copy_to_device_async && iface_.copy_wait; }

uint64_t Backend::upload_async(void * dst, const void * src, size_t n_bytes, const char * what) const {
    uint64_t ticket = 0;
    check(iface_.copy_to_device_async(ctx_, dst, src, n_bytes, &ticket), what);
    return ticket;
}

void Backend::wait_upload(uint64_t ticket, bool host, const char * what) const {
    check(iface_.copy_wait(ctx_, ticket, host ? 1 : 0), what);
}

double Backend::upload_seconds(uint64_t ticket, const char * what) const {
    if (!iface_.copy_elapsed) return -1;
    double seconds = -1;
    check(iface_.copy_elapsed(ctx_, ticket, &seconds), what);
    return seconds >= 0 && std::isfinite(seconds) ? seconds : -1;   // a plugin's answer is not trusted blindly
}

void Backend::download(void * dst, const void * src, size_t n_bytes, const char * what) const {
    if (n_bytes == 0) return;
    check(iface_.copy_to_host(ctx_, dst, src, n_bytes), what);
}

BackendBuffer::BackendBuffer(const Backend & backend, size_t n_bytes, const char * what) : backend_(&backend) {
    void * p = nullptr;
    backend.check(backend.iface().buffer_alloc(backend.ctx(), n_bytes == 0 ? 1 : n_bytes, &p), what);
    ptr_ = p;
    bytes_ = n_bytes;
}

BackendBuffer::BackendBuffer(BackendBuffer && o) noexcept : backend_(o.backend_), ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
}

BackendBuffer & BackendBuffer::operator=(BackendBuffer && o) noexcept {
    if (this != &o) {
        release();
        backend_ = o.backend_;
        ptr_ = o.ptr_;
        bytes_ = o.bytes_;
        o.ptr_ = nullptr;
        o.bytes_ = 0;
    }
    return *this;
}

BackendBuffer::~BackendBuffer() { release(); }

void BackendBuffer::release() noexcept {
    if (ptr_) backend_->iface().buffer_free(backend_->ctx(), ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
}

namespace detail {

struct BackendFactory {
    static std::unique_ptr<Backend> make(Candidate & c, moesh_backend * ctx) {
        std::unique_ptr<Backend> be(new Backend());
        be->host_ = std::move(c.host);
        be->handle_ = c.lib.release();
        be->iface_ = c.iface;
        be->ctx_ = ctx;
        be->name_ = c.probe.name;
        be->path_ = c.probe.path;
        be->score_ = c.probe.score;
        return be;
    }
};

} // namespace detail

// ---- search path and loading -------------------------------------------------------------

std::vector<std::string> default_plugin_dirs(const std::string & cli_dir,
                                             const std::vector<std::string> & config_dirs) {
    std::vector<std::string> dirs;
    auto add = [&](const std::string & d) {
        if (!d.empty() && !contains(dirs, d)) dirs.push_back(d);
    };
    add(cli_dir);
    if (const char * env = std::getenv("MOESH_PLUGIN_DIR")) {
        std::string_view rest = env;
        while (true) {
            const size_t colon = rest.find(':');
            add(std::string(rest.substr(0, colon)));
            if (colon == std::string_view::npos) break;
            rest.remove_prefix(colon + 1);
        }
    }
    for (const std::string & d : config_dirs) add(d);
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) add((exe.parent_path() / ".." / "lib" / "moesh").lexically_normal().string());
    return dirs;
}

std::vector<PluginProbe> probe_plugins(const std::vector<std::string> & dirs) {
    std::vector<Candidate> cands = probe_all(dirs, {});
    std::vector<PluginProbe> out;
    out.reserve(cands.size());
    for (Candidate & c : cands) out.push_back(std::move(c.probe));
    return out;
}

std::unique_ptr<Backend> load_backend(const PluginOptions & opts, std::string * report) {
    const std::vector<std::string> dirs =
        opts.search_dirs.empty() ? default_plugin_dirs("", {}) : opts.search_dirs;
    std::vector<Candidate> cands = probe_all(dirs, opts.allowed);

    // Creation order: the preferred one alone, or every usable one by score (stable, so the
    // earlier folder wins a tie).
    std::vector<size_t> order;
    for (size_t i = 0; i < cands.size(); ++i) {
        if (!cands[i].probe.ok) continue;
        if (opts.preferred.empty() || cands[i].probe.name == opts.preferred) order.push_back(i);
    }
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return cands[a].probe.score > cands[b].probe.score;
    });

    std::unique_ptr<Backend> chosen;
    size_t chosen_index = cands.size();
    for (size_t i : order) {
        Candidate & c = cands[i];
        moesh_backend_params params{};
        params.struct_size = sizeof params;
        params.n_threads = opts.n_threads;
        params.activations = opts.precise_activations ? MOESH_ACTIVATIONS_PRECISE : MOESH_ACTIVATIONS_FAST;
        moesh_backend * ctx = nullptr;
        c.host->take_last_error();
        const moesh_status st = c.iface.create(&params, &c.host->api, &ctx);
        if (st == MOESH_OK && ctx) {
            chosen = detail::BackendFactory::make(c, ctx);
            chosen_index = i;
            break;
        }
        std::string reason = st == MOESH_OK ? std::string("create returned OK but no context")
                                            : "create failed: " + status_name(st);
        if (std::string said = c.host->take_last_error(); !said.empty()) reason += ": " + said;
        c.probe.ok = false;
        c.probe.reason = std::move(reason);
    }

    if (report) {
        std::string r;
        if (chosen) {
            r = "moesh: using backend '" + chosen->name() + "' from " + chosen->path() + "\n";
        } else if (!opts.preferred.empty()) {
            // By table name, or by file name for files the allowed list kept closed.
            auto it = std::find_if(cands.begin(), cands.end(), [&](const Candidate & c) {
                if (c.probe.name == opts.preferred) return true;
                const std::string file = fs::path(c.probe.path).filename().string();
                return c.probe.name.empty() && is_plugin_file(file) &&
                       stem_name(file) == opts.preferred;
            });
            r = "moesh: backend '" + opts.preferred + "' was requested but " +
                (it == cands.end() ? "not found" : "rejected: " + it->probe.reason) + "\n";
        } else {
            r = "moesh: no usable backend plugin\n";
        }
        r += "searched: " + (dirs.empty() ? std::string("(no folders)") : join(dirs, ", ")) +
             "\n";
        for (size_t i = 0; i < cands.size(); ++i) {
            const PluginProbe & p = cands[i].probe;
            const std::string verdict = i == chosen_index ? "chosen"
                                        : p.ok            ? "usable, not chosen"
                                                          : "rejected: " + p.reason;
            r += candidate_line(cands[i], verdict);
        }
        if (!chosen) {
            const std::string want = opts.preferred.empty() ? "cpu" : opts.preferred;
            r += "set --plugin-dir or MOESH_PLUGIN_DIR to the folder holding " +
                 std::string(k_file_prefix) + want + k_file_suffix + "\n";
        }
        *report = std::move(r);
    }
    return chosen;
}

void set_plugin_log_level(moesh_log_level min_level) {
    g_min_log_level.store(static_cast<int>(min_level), std::memory_order_relaxed);
}

void set_plugin_log_sink(PluginLogSink sink) {
    LogState & ls = log_state();
    std::lock_guard lock(ls.mu);
    ls.sink = std::move(sink);
}

} // namespace moesh
