#include "runtime/error.h"
#include "runtime/run_config.h"
#include "test_support.h"

#include <gtest/gtest.h>

#include <fstream>

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

TEST(RunConfig, LoadsTheShippedServeConfig) {
    const RunConfig rc = load_run_config(std::string(MOESH_SOURCE_DIR) + "/configs/serve.toml");
    EXPECT_EQ(rc.server.endpoint, "tcp://127.0.0.1:5555");
    EXPECT_EQ(rc.server.http, "127.0.0.1:8090");
    EXPECT_EQ(rc.server.http_max_connections, 256);
    EXPECT_EQ(rc.server.default_max_tokens, 256);
    EXPECT_TRUE(rc.server.prefix_cache);
    EXPECT_EQ(rc.server.log_interval_s, 10);
    EXPECT_FALSE(parse_run_config("[server]\nprefix_cache = false\n", "x").server.prefix_cache);
    EXPECT_FALSE(rc.server.kv_up_front);   // on demand
    EXPECT_TRUE(parse_run_config("[server]\nkv_allocation = \"up_front\"\n", "x").server.kv_up_front);
    std::string address;
    uint16_t port = 0;
    ASSERT_TRUE(parse_host_port(rc.server.http, &address, &port));
    EXPECT_EQ(address, "127.0.0.1");
    EXPECT_EQ(port, 8090);
}

TEST(RunConfig, SecurityFilesAreFoundBesideTheConfig) {
    test::TempDir tmp;
    const std::string dir = tmp.path().string();
    const std::string path = dir + "/serve.toml";
    std::ofstream(path) << "[server]\ncurve_secret_key = \"keys/server.key_secret\"\ncurve_authorized_keys = \"/etc/moesh/clients\"\n"
                           "api_key_file = \"api_keys\"\n";
    const RunConfig rc = load_run_config(path);
    EXPECT_EQ(rc.server.curve_secret_key, dir + "/keys/server.key_secret");
    EXPECT_EQ(rc.server.curve_authorized_keys, "/etc/moesh/clients");
    EXPECT_EQ(rc.server.api_key_file, dir + "/api_keys");
}

TEST(RunConfig, HttpAddresses) {
    std::string a;
    uint16_t p = 1;
    EXPECT_TRUE(parse_host_port("[::1]:0", &a, &p));
    EXPECT_EQ(a, "::1");
    EXPECT_EQ(p, 0);
    for (const char * bad : {"8080", ":8080", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:80a", "a b:80", "[::1:80"})
        EXPECT_FALSE(parse_host_port(bad, &a, &p)) << bad;
    EXPECT_EQ(parse_run_config("[server]\nhttp = ''\n", "x").server.http, "");
    const std::string e = error_of("[server]\nhttp = 'localhost'\n");
    EXPECT_NE(e.find("moesh.toml:2:"), std::string::npos) << e;
    EXPECT_NE(e.find("ADDRESS:PORT"), std::string::npos) << e;
    EXPECT_NE(error_of("[server]\nhttp_request_timeout_s = 0\n").find("server.http_request_timeout_s"), std::string::npos);
}

TEST(RunConfig, ParsesAllKeys) {
    RunConfig rc = parse_run_config("[plugins]\ndirs=['/a','b']\npreferred='cpu'\n[runtime]\nthreads=3\nkv_block_size=32\n", "x");
    EXPECT_EQ(rc.plugin_dirs.size(), 2u);
    EXPECT_EQ(rc.preferred_plugin, "cpu");
    EXPECT_EQ(rc.threads, 3);
    EXPECT_EQ(rc.kv_block_size, 32);
    EXPECT_EQ(rc.kv_type, -1);   // the default: auto, f16 where the backend offers it
    rc = parse_run_config("[runtime]\nkv_type = 'f16'\n", "x");
    EXPECT_EQ(rc.kv_type, MOESH_DTYPE_F16);
    rc = parse_run_config("[runtime]\nkv_type = 'f32'\n", "x");
    EXPECT_EQ(rc.kv_type, MOESH_DTYPE_F32);
    rc = parse_run_config("[runtime]\nkv_type = 'auto'\n", "x");
    EXPECT_EQ(rc.kv_type, -1);
    rc = parse_run_config("[runtime]\nkv_type = 'q8_0'\n", "x");
    EXPECT_EQ(rc.kv_type, MOESH_DTYPE_Q8_0);
}

TEST(RunConfig, ErrorsNameFileLineColumnAndKey) {
    std::string e = error_of("[runtime]\nthreads = 'two'\n");
    EXPECT_NE(e.find("moesh.toml:2:"), std::string::npos) << e;
    EXPECT_NE(e.find("runtime.threads"), std::string::npos) << e;
    e = error_of("[runtime]\nthreads = -1\n");
    EXPECT_NE(e.find("out of range"), std::string::npos) << e;
    e = error_of("[runtime]\nthread = 1\n");
    EXPECT_NE(e.find("unknown key"), std::string::npos) << e;
    e = error_of("[placements]\n");
    EXPECT_NE(e.find("unknown table"), std::string::npos) << e;
    e = error_of("[runtime]\nkv_type = 'q4_0'\n");
    EXPECT_NE(e.find("moesh.toml:2:"), std::string::npos) << e;
    EXPECT_NE(e.find("expected \"auto\", \"f16\""), std::string::npos) << e;
    e = error_of("[plugins]\ndirs = 'x'\n");
    EXPECT_NE(e.find("array of strings"), std::string::npos) << e;
    e = error_of("[plugins\n");
    EXPECT_NE(e.find("moesh.toml:1:"), std::string::npos) << e;
    e = error_of("plugins = 3\n");
    EXPECT_NE(e.find("expected a table"), std::string::npos) << e;
}

} // namespace
} // namespace moesh

namespace moesh {
namespace {

TEST(PlacementConfig, TheExampleLoads) {
    const RunConfig rc = load_run_config(std::string(MOESH_SOURCE_DIR) + "/configs/placement.toml");
    const PlacementConfig & p = rc.placement;
    ASSERT_EQ(p.tiers.size(), 3u);
    EXPECT_EQ(p.tiers[0].name, "gpu0");
    EXPECT_EQ(p.tiers[0].kind, TierKind::Gpu);
    EXPECT_EQ(p.tiers[0].budget, uint64_t(20) << 30);
    EXPECT_EQ(p.tiers[2].kind, TierKind::Disk);
    EXPECT_EQ(p.tiers[2].budget, 0u);
    EXPECT_TRUE(p.direct_io);
    EXPECT_EQ(p.policy, "lookahead");
    EXPECT_DOUBLE_EQ(p.heat_decay, 0.95);
    ASSERT_EQ(p.pins.size(), 1u);
    EXPECT_TRUE(p.pins[0].layers.contains(3));
    EXPECT_FALSE(p.pins[0].layers.contains(4));
    EXPECT_TRUE(p.pins[0].experts.all());
}

TEST(PlacementConfig, SizesWithUnits) {
    uint64_t b = 0;
    EXPECT_TRUE(parse_byte_size("1.5GiB", &b));
    EXPECT_EQ(b, uint64_t(3) << 29);
    EXPECT_TRUE(parse_byte_size("512 MiB", &b));
    EXPECT_EQ(b, uint64_t(512) << 20);
    EXPECT_TRUE(parse_byte_size("2GB", &b));
    EXPECT_EQ(b, 2000000000u);
    EXPECT_TRUE(parse_byte_size("4096", &b));
    EXPECT_EQ(b, 4096u);
    for (const char * bad : {"", "GiB", "12 parsecs", "-1GiB", "1e30GiB", "nan"}) EXPECT_FALSE(parse_byte_size(bad, &b)) << bad;
}

TEST(PlacementConfig, MistakesNameTheLineAndColumn) {
    struct Bad {
        const char * toml;
        const char * want;
    };
    const Bad bad[] = {
        {"[[tier]]\nkind = \"ssd\"\nbudget = 1\n", "t.toml:2:8: key 'tier.kind': unknown tier kind"},
        {"[[tier]]\nkind = \"host\"\n", "t.toml:1:1: key 'tier': missing 'budget'"},
        {"[[tier]]\nkind = \"host\"\nbudget = \"lots\"\n", "t.toml:3:10: key 'tier.budget'"},
        {"[[tier]]\nkind = \"host\"\nbudget = 0\n", "key 'tier.budget'"},
        {"[[tier]]\nkind = \"host\"\nbudget = 1\n[[tier]]\nkind = \"host\"\nbudget = 2\n", "a second tier named 'host'"},
        {"[placement]\npolicy = \"mru\"\n", "t.toml:2:10: key 'placement.policy': unknown policy"},
        {"[placement]\nheat_decay = 1.5\n", "key 'placement.heat_decay'"},
        {"[[placement.pin]]\ntier = \"gpu0\"\nlayers = \"3-1\"\n", "key 'placement.pin.layers': range 3-1"},
        {"[[placement.pin]]\ntier = \"gpu0\"\nexperts = \"x\"\n", "key 'placement.pin.experts': expected"},
        {"[[tier]]\nkind = \"host\"\nbudget = 1\n[[placement.pin]]\ntier = \"gpu0\"\n", "no [[tier]] named 'gpu0'"},
        {"[placement]\nbudget = 1\n", "unknown key (known: policy"},
        {"[[tier]]\nkind = \"disk\"\nbudget = \"1GiB\"\n", "t.toml:1:1: key 'tier.budget': a disk tier has no budget"},
        {"[placement]\ndirect_io = 1\n", "t.toml:2:13: key 'placement.direct_io': expected true or false"},
        {"[server]\nprefix_cache = \"yes\"\n", "t.toml:2:16: key 'server.prefix_cache': expected true or false"},
        {"[server]\nkv_allocation = \"lazy\"\n", "t.toml:2:17: key 'server.kv_allocation': expected \"on_demand\""},
        {"[server]\nlog_interval_s = -1\n", "key 'server.log_interval_s': expected seconds"},
        {"[server]\ncurve_authorized_keys = \"clients\"\n", "t.toml:2:25: key 'server.curve_authorized_keys': needs server.curve_secret_key"},
        {"[server]\napi_key_file = \"\"\n", "key 'server.api_key_file': expected a path"},
        {"[server]\ncurve_secret_key = 1\n", "key 'server.curve_secret_key'"},
        {"tier = 3\n", "expected [[tier]] tables"},
    };
    for (const Bad & b : bad) {
        try {
            parse_run_config(b.toml, "t.toml");
            ADD_FAILURE() << "accepted:\n" << b.toml;
        } catch (const Error & e) {
            EXPECT_NE(std::string(e.what()).find(b.want), std::string::npos) << e.what() << "\nwanted: " << b.want;
        }
    }
}

// Pins become the keys the cache simulator takes (layer * n_expert + expert): only the
// tier asked for, dense layers passed over, overlaps once; ranges past the model are errors.
TEST(PlacementConfig, PinsBecomeExpertKeysOfOneTier) {
    const std::string tiers = "[[tier]]\nname = \"fast\"\nkind = \"gpu\"\nbudget = 1\n"
                              "[[tier]]\nname = \"slow\"\nkind = \"host\"\nbudget = 1\n";
    const PlacementConfig pc = parse_run_config(tiers +
                                                    "[[placement.pin]]\ntier = \"fast\"\nlayers = \"*\"\nexperts = \"1\"\n"
                                                    "[[placement.pin]]\ntier = \"fast\"\nlayers = \"0-1\"\nexperts = \"1-2\"\n"
                                                    "[[placement.pin]]\ntier = \"slow\"\nlayers = \"2\"\nexperts = \"*\"\n",
                                                "t.toml")
                                    .placement;
    const std::vector<bool> moe = {true, false, true};   // layer 1 is dense
    EXPECT_EQ(pinned_expert_keys(pc, "fast", moe, 4), (std::vector<int64_t>{1, 2, 9}));
    EXPECT_EQ(pinned_expert_keys(pc, "slow", moe, 4), (std::vector<int64_t>{8, 9, 10, 11}));
    EXPECT_TRUE(pinned_expert_keys(pc, "none", moe, 4).empty());

    auto error_of_pin = [&](const std::string & pin) {
        const PlacementConfig p = parse_run_config(tiers + "[[placement.pin]]\ntier = \"fast\"\n" + pin, "t.toml").placement;
        try {
            pinned_expert_keys(p, "fast", moe, 4);
        } catch (const PlacementError & e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_EQ(error_of_pin("layers = \"2-3\"\n"),
              "[[placement.pin]] 1 (tier 'fast'): layers 2-3 go past the model's 3 layers (0-2)");
    EXPECT_EQ(error_of_pin("experts = \"4\"\n"),
              "[[placement.pin]] 1 (tier 'fast'): experts 4 go past the model's 4 experts per layer (0-3)");
    EXPECT_EQ(error_of_pin("layers = \"2\"\nexperts = \"3\"\n"), "");
}

} // namespace
} // namespace moesh
