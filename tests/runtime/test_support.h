// Helpers shared by the runtime tests: opening the CPU plugin from the build tree.
#pragma once

#include "plugins/loader/plugin_loader.h"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace moesh::test {

inline std::unique_ptr<Backend> open_cpu_backend(int n_threads, bool precise_activations = false) {
    PluginOptions po;
    po.precise_activations = precise_activations;
    po.search_dirs = {MOESH_PLUGIN_BUILD_DIR};
    po.preferred = "cpu";
    po.n_threads = n_threads;
    std::string report;
    auto be = load_backend(po, &report);
    EXPECT_NE(be, nullptr) << report;
    return be;
}

// A test plugin of build/test_plugins/<name> (devsim, or a sample plugin), by its table name.
inline std::unique_ptr<Backend> open_test_plugin(const std::string & name) {
    PluginOptions po;
    po.search_dirs = {std::string(MOESH_TEST_PLUGIN_DIR) + "/" + name};
    po.preferred = name;
    std::string report;
    auto be = load_backend(po, &report);
    EXPECT_NE(be, nullptr) << report;
    return be;
}

// tests/plugins/devsim: a device-memory backend (reference kernels, buffers
// the host cannot touch) that runs the forward pass's device path without a GPU.
inline std::unique_ptr<Backend> open_devsim_backend() { return open_test_plugin("devsim"); }

// A fresh folder under the system temp dir, removed with everything in it.
class TempDir {
public:
    TempDir() {
        static std::atomic<int> counter{0};
        std::random_device rd;
        path_ = std::filesystem::temp_directory_path() / ("moesh_test_" + std::to_string(::getpid()) + "_" +
                                                          std::to_string(counter++) + "_" + std::to_string(rd()));
        std::filesystem::create_directories(path_);
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    TempDir(const TempDir &) = delete;
    TempDir & operator=(const TempDir &) = delete;

    const std::filesystem::path & path() const { return path_; }
    std::filesystem::path write(const std::string & name, const std::vector<uint8_t> & bytes) const {
        auto p = path_ / name;
        std::ofstream(p, std::ios::binary)
            .write(reinterpret_cast<const char *>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        return p;
    }
    std::filesystem::path write(const std::string & name, const std::string & text) const {
        return write(name, std::vector<uint8_t>(text.begin(), text.end()));
    }

private:
    std::filesystem::path path_;
};

inline std::string fixtures_dir() { return std::string(MOESH_SOURCE_DIR) + "/tests/fixtures"; }

struct CommandResult {
    int status = -1;
    std::string out; // stdout (+ stderr)
};

// Runs the built `moesh` executable with these arguments through the shell.
// env: "NAME=value ..." assignments for this command only.
inline CommandResult run_moesh(const std::string & args, bool with_stderr = true, const std::string & env = "") {
    const std::string cmd =
        (env.empty() ? "" : "env " + env + " ") + std::string(MOESH_BIN) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
    CommandResult r;
    FILE * p = popen(cmd.c_str(), "r");
    if (!p) return r;
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int st = pclose(p);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return r;
}

} // namespace moesh::test
