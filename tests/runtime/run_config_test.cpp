#include "runtime/error.h"
#include "runtime/run_config.h"

#include <gtest/gtest.h>

namespace moesh {
namespace {

std::string error_of(const std::string & toml) {
    try {
        parse_run_config(toml, "moesh.toml");
    } catch (const Error & e) {
        return e.what();
    }
    return "";
}

TEST(RunConfig, LoadsTheShippedDefault) {
    RunConfig rc = load_run_config(std::string(MOESH_SOURCE_DIR) + "/configs/default.toml");
    ASSERT_EQ(rc.plugin_dirs.size(), 1u);
    EXPECT_NE(rc.plugin_dirs[0].find("build/lib/moesh"), std::string::npos);
    EXPECT_EQ(rc.allowed_plugins, (std::vector<std::string>{"cpu", "cuda"}));
    EXPECT_EQ(rc.max_batch, 64);
}

TEST(RunConfig, ParsesAllKeys) {
    RunConfig rc = parse_run_config("[plugins]\ndirs=['/a','b']\npreferred='cpu'\n[runtime]\nthreads=3\nkv_block_size=32\n", "x");
    EXPECT_EQ(rc.plugin_dirs.size(), 2u);
    EXPECT_EQ(rc.preferred_plugin, "cpu");
    EXPECT_EQ(rc.threads, 3);
    EXPECT_EQ(rc.kv_block_size, 32);
}

TEST(RunConfig, ErrorsNameFileLineColumnAndKey) {
    std::string e = error_of("[runtime]\nthreads = 'two'\n");
    EXPECT_NE(e.find("moesh.toml:2:"), std::string::npos) << e;
    EXPECT_NE(e.find("runtime.threads"), std::string::npos) << e;
    e = error_of("[runtime]\nthreads = -1\n");
    EXPECT_NE(e.find("out of range"), std::string::npos) << e;
    e = error_of("[runtime]\nthread = 1\n");
    EXPECT_NE(e.find("unknown key"), std::string::npos) << e;
    e = error_of("[placement]\n");
    EXPECT_NE(e.find("unknown table"), std::string::npos) << e;
    e = error_of("[plugins]\ndirs = 'x'\n");
    EXPECT_NE(e.find("array of strings"), std::string::npos) << e;
    e = error_of("[plugins\n");
    EXPECT_NE(e.find("moesh.toml:1:"), std::string::npos) << e;
    e = error_of("plugins = 3\n");
    EXPECT_NE(e.find("expected a table"), std::string::npos) << e;
}

} // namespace
} // namespace moesh
