// Helpers shared by the runtime tests: opening the CPU plugin from the build tree.
#pragma once

#include "plugins/loader/plugin_loader.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace moesh::test {

inline std::unique_ptr<Backend> open_cpu_backend(int n_threads) {
    PluginOptions po;
    po.search_dirs = {MOESH_PLUGIN_BUILD_DIR};
    po.preferred = "cpu";
    po.n_threads = n_threads;
    std::string report;
    auto be = load_backend(po, &report);
    EXPECT_NE(be, nullptr) << report;
    return be;
}

inline std::string fixtures_dir() { return std::string(MOESH_SOURCE_DIR) + "/tests/fixtures"; }

} // namespace moesh::test
