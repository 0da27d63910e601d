// The real `moesh` executable, as a user runs it.
#include "runtime/npy.h"
#include "test_support.h"
#include "xml_check.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sys/wait.h>

namespace moesh {
namespace {

namespace fs = std::filesystem;

using Result = test::CommandResult;

Result run(const std::string & args, bool with_stderr = true, const std::string & env = "") {
    return test::run_moesh(args, with_stderr, env);
}

const std::string k_fixture = std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/mixtral_top2";

nlohmann::json last_json_line(const std::string & out) {
    return nlohmann::json::parse(out.substr(out.rfind('\n', out.size() - 2) + 1));
}

TEST(Cli, HelpExplainsSubcommandsAndOptions) {
    Result r = run("--help");
    EXPECT_EQ(r.status, 0);
    EXPECT_NE(r.out.find("run"), std::string::npos);
    EXPECT_NE(r.out.find("inspect"), std::string::npos);
    r = run("run --help");
    EXPECT_EQ(r.status, 0);
    for (const char * opt : {"--prompt-ids", "--temperature", "--top-k", "--top-p", "--seed", "--threads", "--output",
                             "--dump-logits", "--plugin-dir"})
        EXPECT_NE(r.out.find(opt), std::string::npos) << opt;
}

TEST(Cli, RunJsonOutputAndLogitsDump) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    std::ifstream in(k_fixture + "/reference.json");
    const auto ref = nlohmann::json::parse(in);
    const auto prompt = ref["prompts"][0].get<std::vector<int32_t>>();
    const auto expected = ref["generated"][0].get<std::vector<int32_t>>();
    std::string ids;
    for (size_t i = 0; i < prompt.size(); ++i) (ids += i ? "," : "") += std::to_string(prompt[i]);
    const fs::path npy = fs::temp_directory_path() / ("moesh_cli_logits_" + std::to_string(getpid()) + ".npy");

    Result r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 8 --threads 2 --output json --dump-logits " +
                       npy.string(),
                   false);
    ASSERT_EQ(r.status, 0) << r.out;
    const std::string last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
    const auto j = nlohmann::json::parse(last);
    for (const char * k : {"prompt_ids", "tokens", "text", "timings", "experts"}) EXPECT_TRUE(j.contains(k)) << k;
    EXPECT_EQ(j["prompt_ids"].get<std::vector<int32_t>>(), prompt);
    const auto tokens = j["tokens"].get<std::vector<int32_t>>();
    EXPECT_EQ(tokens, std::vector<int32_t>(expected.begin(), expected.begin() + 8));
    EXPECT_GT(j["timings"]["decode_tokens_per_second"].get<double>(), 0.0);
    uint64_t routed = 0;
    for (const auto & layer : j["experts"]["activation_counts"])
        if (!layer.is_null())
            for (const auto & c : layer) routed += c.get<uint64_t>();
    const auto n_used = j["experts"]["n_expert_used"].get<uint64_t>();
    // every token that went through the model (prompt + 7 decode steps) was routed in every layer
    EXPECT_EQ(routed % ((prompt.size() + 7) * n_used), 0u);
    EXPECT_GT(routed, 0u);

    NpyArray a = read_npy_f32(npy);
    ASSERT_EQ(a.shape.size(), 2u);
    EXPECT_EQ(a.shape[0], int64_t(prompt.size() + 7));
    fs::remove(npy);
}

// A GPU plugin on a machine without a GPU: the run still happens, on the CPU, and says so.
TEST(Cli, RequestedBackendThatCannotRunFallsBackToTheCpu) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    if (!fs::exists(fs::path(MOESH_PLUGIN_BUILD_DIR) / "libmoesh_backend_cuda.so")) GTEST_SKIP() << "no cuda plugin built";
    Result r = run("run --model " + k_fixture + " --prompt-ids 1,2,3 -n 2 --backend cuda");
    if (r.out.find("falling back") == std::string::npos && r.out.find("backend 'cuda'") != std::string::npos)
        GTEST_SKIP() << "this machine has a GPU: the cuda plugin was taken";
    EXPECT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("warning: backend 'cuda' was requested but rejected"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("falling back to backend 'cpu'"), std::string::npos) << r.out;
    r = run("run --model " + k_fixture + " --prompt-ids 1,2,3 -n 2 --backend nosuch");   // a typo is an error
    EXPECT_NE(r.status, 0);
    EXPECT_EQ(r.out.find("falling back"), std::string::npos) << r.out;
}

// Prompt i of the Mixtral fixture as comma-separated ids, and the tokens transformers generated.
std::pair<std::string, std::vector<int32_t>> fixture_case(size_t i) {
    std::ifstream in(k_fixture + "/reference.json");
    const auto ref = nlohmann::json::parse(in);
    const auto prompt = ref["prompts"][i].get<std::vector<int32_t>>();
    std::string ids;
    for (size_t k = 0; k < prompt.size(); ++k) (ids += k ? "," : "") += std::to_string(prompt[k]);
    return {ids, ref["generated"][i].get<std::vector<int32_t>>()};
}

// The device-memory path end to end (the devsim test plugin): the tokens transformers
// generates, the upload announced; a device too small for the model says what it needs.
TEST(Cli, RunOnADeviceMemoryBackendUploadsTheModel) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    const auto [ids, expected] = fixture_case(1);
    const std::string devsim = std::string(MOESH_TEST_PLUGIN_DIR) + "/devsim";
    Result r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 6 --output json --backend devsim --plugin-dir " +
                   devsim);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("uploaded"), std::string::npos) << r.out;
    const std::string last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
    EXPECT_EQ(nlohmann::json::parse(last)["tokens"].get<std::vector<int32_t>>(),
              std::vector<int32_t>(expected.begin(), expected.begin() + 6));

    r = run("run --model " + k_fixture + " --prompt-ids 1,2 -n 2 --backend devsim --plugin-dir " + devsim,
            true, "MOESH_DEVSIM_MEMORY=100000");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("does not fit in backend 'devsim' memory"), std::string::npos) << r.out;
}

// A gpu tier smaller than the experts: the rest are promoted or computed on the cpu backend, and the
// tokens stay transformers'. A budget the device cannot hold is refused at start.
TEST(Cli, GpuTierOnADeviceMemoryBackendKeepsTheTokens) {
    const auto [ids, expected] = fixture_case(0);
    const std::string devsim = std::string(MOESH_TEST_PLUGIN_DIR) + "/devsim";
    test::TempDir dir;
    const std::string config =
        dir.write("gpu.toml", "[[tier]]\nname = \"gpu0\"\nkind = \"gpu\"\nbudget = \"100KiB\"\n[placement]\npolicy = \"heat\"\n").string();
    Result r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 12 --output json --backend devsim --plugin-dir " +
                       devsim + " --config " + config,
                   false);
    ASSERT_EQ(r.status, 0) << r.out;
    const nlohmann::json j = last_json_line(r.out);
    EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), std::vector<int32_t>(expected.begin(), expected.begin() + 12));
    ASSERT_TRUE(j.contains("gpu_tier")) << r.out;
    EXPECT_EQ(j["gpu_tier"]["hits"].get<int64_t>() + j["gpu_tier"]["promotions"].get<int64_t>() +
                  j["gpu_tier"]["in_place"].get<int64_t>(),
              j["gpu_tier"]["requests"].get<int64_t>());
    // devsim has a copy queue: uploads go beside the compute, and the next layer is predicted
    EXPECT_GT(j["gpu_tier"]["async_uploads"].get<int64_t>(), 0) << r.out;
    EXPECT_GT(j["gpu_tier"]["async_bytes_timed"].get<int64_t>(), 0) << "devsim times its copies: " << r.out;
    EXPECT_GT(j["gpu_tier"]["prefetch_recall"].get<double>(), 0.0) << r.out;
    // three tiers: 3 experts in VRAM, 2 in RAM, the rest read from the model's files on a miss
    const std::string three = dir.write("three.toml", "[[tier]]\nname = \"gpu0\"\nkind = \"gpu\"\nbudget = \"100KiB\"\n"
                                                      "[[tier]]\nname = \"ram\"\nkind = \"host\"\nbudget = \"110KiB\"\n"
                                                      "[[tier]]\nname = \"disk\"\nkind = \"disk\"\n")
                                  .string();
    r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 12 --output json --backend devsim --plugin-dir " + devsim +
                " --config " + three,
            false);
    ASSERT_EQ(r.status, 0) << r.out;
    const nlohmann::json t = last_json_line(r.out);
    EXPECT_EQ(t["tokens"].get<std::vector<int32_t>>(), std::vector<int32_t>(expected.begin(), expected.begin() + 12));
    ASSERT_TRUE(t.contains("gpu_tier") && t.contains("placement")) << r.out;
    EXPECT_GT(t["placement"]["misses"].get<int64_t>(), 0) << r.out;
    EXPECT_EQ(t["placement"]["requests"].get<int64_t>(), t["gpu_tier"]["requests"].get<int64_t>() - t["gpu_tier"]["hits"].get<int64_t>());
    // MOESH_LOG=debug shows each cost-model decision with both estimates
    r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 2 --backend devsim --plugin-dir " + devsim + " --config " + three,
            true, "MOESH_LOG=debug");
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("moesh: debug: cost: layer "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" in place "), std::string::npos) << r.out;
    // on the cpu backend the gpu tier is ignored, with a warning
    r = run("run --model " + k_fixture + " --prompt-ids " + ids + " -n 2 --config " + config);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("the gpu tier is ignored"), std::string::npos) << r.out;
    // a tier budget beyond the device's memory
    const std::string big = dir.write("big.toml", "[[tier]]\nkind = \"gpu\"\nbudget = \"64GiB\"\n").string();
    r = run("run --model " + k_fixture + " --prompt-ids 1,2 -n 2 --backend devsim --plugin-dir " + devsim + " --config " + big,
            true, "MOESH_DEVSIM_MEMORY=200000000");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("gpu tier expert slots"), std::string::npos) << r.out;
}

TEST(Cli, RunWritesTheRoutingTrace) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    test::TempDir dir;
    const std::string trace = (dir.path() / "t.jsonl").string();
    Result r = run("run --model " + k_fixture + "/ --prompt-ids 1,2,3 -n 4 --trace " + trace);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("wrote the routing of 6 tokens"), std::string::npos) << r.out;
    std::ifstream in(trace);
    std::string header;
    std::getline(in, header);
    EXPECT_EQ(nlohmann::json::parse(header)["model"], "mixtral_top2");
    EXPECT_EQ(nlohmann::json::parse(header)["n_predicted"], 4);   // the prefetch prediction's 2k best

    // moesh sim replays it: every policy at every size, none above Belady's optimum.
    r = run("sim --trace " + trace + " --sizes 25,50 --output json", false);
    ASSERT_EQ(r.status, 0) << r.out;
    const auto j = nlohmann::json::parse(r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1));
    std::map<double, double> best;
    for (const auto & row : j["results"])
        if (row["policy"] == "belady") best[row["cache_percent"].get<double>()] = row["hit_rate"].get<double>();
    ASSERT_EQ(j["results"].size(), 12u);   // static, lru, lfu, heat, lookahead, belady at 2 sizes
    EXPECT_EQ(j["prediction"]["ranks"], 2);
    EXPECT_EQ(j["prediction"]["visits"], 6 * 2);
    for (const auto & row : j["results"]) {
        EXPECT_EQ(row["requests"].get<int64_t>(), 6 * 2 * 2);   // tokens x MoE layers x k
        if (row["policy"] != "static") {
            EXPECT_LE(row["hit_rate"].get<double>(), best[row["cache_percent"].get<double>()]) << row.dump();
        }
    }
    r = run("sim --trace " + trace + " --policies window --window 2", false);   // an oracle of 2 layer visits
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("knows the next 2 layer visits"), std::string::npos) << r.out;
    r = run("sim --trace " + trace + " --policies lookahead --predicted 5");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("records 4 predicted experts per layer"), std::string::npos) << r.out;
    r = run("sim --trace " + trace + " --policies mru");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("unknown policy 'mru'"), std::string::npos) << r.out;
    // --replay steps: the 3 prompt tokens were one forward pass, then 3 passes of one token
    // each; each expert a pass wanted counts once, so at most 2 x 4 + 3 x 2 x 2 requests.
    r = run("sim --trace " + trace + " --sizes 50 --replay steps --output json", false);
    ASSERT_EQ(r.status, 0) << r.out;
    const auto js = nlohmann::json::parse(r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1));
    EXPECT_EQ(js["replay"], "steps");
    EXPECT_EQ(js["steps"], 4);
    for (const auto & row : js["results"]) {
        EXPECT_LE(row["requests"].get<int64_t>(), 2 * 4 + 3 * 2 * 2) << row.dump();
        EXPECT_GE(row["requests"].get<int64_t>(), 2 * 2 + 3 * 2 * 2) << row.dump();
    }
    // A trace that does not say which tokens went together cannot be replayed by step.
    std::ifstream full(trace);
    std::string old_trace, line;
    while (std::getline(full, line)) {
        const size_t at = line.find(",\"step\":");
        if (at != std::string::npos) line.erase(at, line.find(',', at + 1) - at);
        old_trace += line + "\n";
    }
    const std::string old_path = dir.write("old.jsonl", old_trace).string();
    r = run("sim --trace " + old_path + " --sizes 50 --replay steps");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("does not say which tokens were computed together"), std::string::npos) << r.out;
    EXPECT_EQ(run("sim --trace " + old_path + " --sizes 50", false).status, 0);
}

// A trace by hand: 2 MoE layers of 4 experts, top-2, 4 tokens (16 expert requests).
//   layer 0: [0,1] [2,3] [0,2] [1,3]     layer 1: [0,2] [1,0] [3,2] [0,1]
std::string hand_trace(const std::string & model_json = "\"hand\"") {
    std::string t = "{\"moesh_route_trace\": 1, \"model\": " + model_json +
                    ", \"n_layer\": 2, \"n_expert\": 4, \"n_expert_used\": 2, \"moe_layers\": [true, true]}\n";
    const char * experts[] = {"[[0, 1], [0, 2]]", "[[2, 3], [1, 0]]", "[[0, 2], [3, 2]]", "[[1, 3], [0, 1]]"};
    for (int i = 0; i < 4; ++i)
        t += "{\"seq\": 0, \"pos\": " + std::to_string(i) + ", \"token\": 1, \"experts\": " + experts[i] +
             ", \"weights\": [[0.5, 0.5], [0.5, 0.5]]}\n";
    return t;
}


TEST(Cli, HeatmapDrawsATraceAsAnSvg) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    test::TempDir dir;
    const std::string trace = (dir.path() / "t.jsonl").string(), svg = (dir.path() / "h.svg").string();
    Result r = run("run --model " + k_fixture + " --prompt-ids 1,2,3 -n 4 --trace " + trace);
    ASSERT_EQ(r.status, 0) << r.out;
    r = run("heatmap --trace " + trace + " --output " + svg);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("wrote " + svg + ": expert activations of 6 tokens of mixtral_top2, 2 layers x 6 experts"),
              std::string::npos) << r.out;
    std::ifstream in(svg);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(test::xml_well_formed(text), "");
    size_t cells = 0;
    for (size_t p = text.find("<rect class=\"cell"); p != std::string::npos; p = text.find("<rect class=\"cell", p + 1)) ++cells;
    EXPECT_EQ(cells, 2u * 6u);

    r = run("heatmap --help");
    EXPECT_EQ(r.status, 0);
    for (const char * opt : {"--trace", "--output", "moesh heatmap --trace trace.jsonl"}) EXPECT_NE(r.out.find(opt), std::string::npos) << opt;
    r = run("heatmap --trace " + (dir.path() / "none.jsonl").string() + " --output " + svg);
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find("none.jsonl: cannot open the routing trace"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("--trace FILE"), std::string::npos) << r.out;
    r = run("heatmap --trace " + trace + " --output /nonexistent-moesh-dir/h.svg");
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find("/nonexistent-moesh-dir/h.svg: cannot create the file (does its folder exist"), std::string::npos)
        << r.out;
    r = run("heatmap --trace " + trace);
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("--output is required"), std::string::npos) << r.out;
}

// An XML parser nobody here wrote agrees that the picture is well-formed, model name included.
TEST(Cli, HeatmapSvgParsesWithPythonsXmlParser) {
    if (std::system("python3 -c 'import xml.dom.minidom' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3 with xml.dom.minidom";
    test::TempDir dir;
    const fs::path trace = dir.write("t.jsonl", hand_trace("\"<moe & \\\"friends\\\">\""));
    const std::string svg = (dir.path() / "h.svg").string();
    Result r = run("heatmap --trace " + trace.string() + " --output " + svg);
    ASSERT_EQ(r.status, 0) << r.out;
    const std::string cmd = "python3 -c 'import sys, xml.dom.minidom as m; d = m.parse(sys.argv[1]); "
                            "print(len(d.getElementsByTagName(\"rect\"))); print(d.getElementsByTagName(\"title\")[0].firstChild.data)' " +
                            svg + " 2>&1";
    FILE * p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    EXPECT_EQ(pclose(p), 0) << out;
    // 8 cells, the background and the colour bar; the title decoded back to the model's name
    EXPECT_EQ(out, "10\n<moe & \"friends\">: expert activations per layer, 4 tokens\n");
}

// sim --config: the [placement] heat decay and the pins of the host tier (the cache), for every policy.
TEST(Cli, SimTakesHeatDecayAndPinsFromAConfig) {
    test::TempDir dir;
    const std::string trace = dir.write("t.jsonl", hand_trace()).string();
    const std::string tiers = "[[tier]]\nname = \"slow\"\nkind = \"gpu\"\nbudget = \"8GiB\"\n"
                              "[[tier]]\nname = \"fast\"\nkind = \"host\"\nbudget = \"1GiB\"\n";
    const std::string config = dir.write("p.toml", tiers +
                                                       "[placement]\npolicy = \"lru\"\nheat_decay = 0.5\n"
                                                       "[[placement.pin]]\ntier = \"fast\"\nlayers = \"1\"\nexperts = \"2-3\"\n"
                                                       "[[placement.pin]]\ntier = \"slow\"\nlayers = \"*\"\nexperts = \"*\"\n")
                                   .string();
    auto rows = [](const nlohmann::json & j) {
        std::map<std::string, nlohmann::json> by;
        for (const auto & row : j["results"]) by[row["policy"].get<std::string>() + "@" + row["cache_percent"].dump()] = row;
        return by;
    };

    // Without --config (as before): static pins the 2 most used experts, layer 1 expert 0 (3 uses)
    // and layer 0 expert 0 (2 uses, the lowest key of the ties): 5 of 16 requests.
    Result r = run("sim --trace " + trace + " --sizes 25,50 --output json", false);
    ASSERT_EQ(r.status, 0) << r.out;
    nlohmann::json j = last_json_line(r.out);
    EXPECT_FALSE(j.contains("config"));
    EXPECT_DOUBLE_EQ(j["heat_decay"].get<double>(), 0.95);
    EXPECT_EQ(rows(j)["static@25.0"]["hits"], 5);

    // With it: only layer 1's experts 2 and 3 are pinned (the gpu tier's pin is not the cache's):
    // 3 of 16 requests for static at both sizes, and every policy hits at least those.
    r = run("sim --trace " + trace + " --sizes 25,50 --output json --config " + config, false);
    ASSERT_EQ(r.status, 0) << r.out;
    j = last_json_line(r.out);
    EXPECT_DOUBLE_EQ(j["heat_decay"].get<double>(), 0.5);
    EXPECT_EQ(j["config"]["pinned"], 2);
    EXPECT_EQ(j["config"]["tier"], "fast");
    EXPECT_EQ(j["config"]["policy"], "lru");
    auto by = rows(j);
    EXPECT_EQ(by["static@25.0"]["hits"], 3);
    EXPECT_EQ(by["static@50.0"]["hits"], 3);
    for (const auto & row : j["results"]) {
        EXPECT_GE(row["hits"].get<int64_t>(), 3) << row.dump();
        EXPECT_LE(row["hits"].get<int64_t>(), by["belady@" + row["cache_percent"].dump()]["hits"].get<int64_t>()) << row.dump();
    }
    r = run("sim --trace " + trace + " --sizes 25 --output json --decay 0.8 --config " + config, false);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_DOUBLE_EQ(last_json_line(r.out)["heat_decay"].get<double>(), 0.8);   // the command line wins
    r = run("sim --trace " + trace + " --sizes 25 --config " + config);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("[placement] policy lru, heat decay 0.5; 2 experts pinned on tier 'fast' (pins on other tiers left out: 1)"),
              std::string::npos) << r.out;

    // Pins that do not fit a cache size, or name layers the trace's model lacks, are errors.
    r = run("sim --trace " + trace + " --sizes 10,50 --config " + config);
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find(config + ": the pins on tier 'fast' name 2 experts, more than a cache of 10% (1 of 8 routed "
                                  "experts) holds; pass larger --sizes or pin fewer experts"),
              std::string::npos) << r.out;
    const std::string wide = dir.write("w.toml", tiers + "[[placement.pin]]\ntier = \"fast\"\nlayers = \"0-5\"\n").string();
    r = run("sim --trace " + trace + " --config " + wide);
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find(wide + ": [[placement.pin]] 1 (tier 'fast'): layers 0-5 go past the model's 2 layers (0-1)"),
              std::string::npos) << r.out;
    r = run("sim --trace " + trace + " --config " + (dir.path() / "missing.toml").string());
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find("missing.toml"), std::string::npos) << r.out;
}

// Expert budgets through the executable: the plan before loading, the same tokens with experts
// streamed from the file, the cache's statistics, and a budget that cannot work refused.
TEST(Cli, ExpertBudgetPlansAndRunsWithTheSameTokens) {
    const std::string model = std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py";
    Result r = run("plan --model " + model + " --expert-budget 2MiB", false);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("streaming: 4 of 32 experts fit in 'host'"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("KV cache"), std::string::npos) << r.out;
    r = run("plan --model " + model + " --config " + std::string(MOESH_SOURCE_DIR) + "/configs/placement.toml", false);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("every routed expert fits"), std::string::npos) << r.out;
    test::TempDir dir;   // a gpu tier alone: listed, with the mapping as the experts' host copies
    r = run("plan --model " + model + " --config " +
                dir.write("gpu.toml", "[[tier]]\nname = \"gpu0\"\nkind = \"gpu\"\nbudget = \"2MiB\"\n").string(),
            false);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("gpu0     gpu    budget 2.0 MiB = 4 slots"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("host copies of the experts: the model file's mapping"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("no [[tier]] configured"), std::string::npos) << r.out;
    r = run("plan --model " + model + " --expert-budget 600KiB");   // one slot
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("at least 2"), std::string::npos) << r.out;

    const std::string args = "run --model " + model + " --prompt-ids 785,3110,402,13,576 -n 24 --output json";
    Result free_run = run(args, false);
    ASSERT_EQ(free_run.status, 0) << free_run.out;
    Result budget = run(args + " --expert-budget 2MiB", false);
    ASSERT_EQ(budget.status, 0) << budget.out;
    const nlohmann::json a = last_json_line(free_run.out), b = last_json_line(budget.out);
    EXPECT_EQ(a["tokens"], b["tokens"]);
    // The default KV cache on the cpu plugin is f16 (auto): --kv-type f32 takes twice the bytes and
    // gives the same tokens on this model
    Result full = run(args + " --kv-type f32", false);
    ASSERT_EQ(full.status, 0) << full.out;
    const nlohmann::json f = last_json_line(full.out);
    EXPECT_EQ(f["tokens"], a["tokens"]);
    EXPECT_EQ(f["kv_cache_bytes"].get<int64_t>(), 2 * a["kv_cache_bytes"].get<int64_t>());
    EXPECT_EQ(last_json_line(run(args + " --kv-type f16", false).out)["kv_cache_bytes"], a["kv_cache_bytes"]);
    EXPECT_FALSE(a.contains("placement"));
    ASSERT_TRUE(b.contains("placement"));
    EXPECT_GT(b["placement"]["misses"].get<int64_t>(), 0);
    EXPECT_GT(b["placement"]["disk_bytes_read"].get<int64_t>(), 0);
    EXPECT_EQ(b["placement"]["hits"].get<int64_t>() + b["placement"]["misses"].get<int64_t>(),
              b["placement"]["requests"].get<int64_t>());
    r = run("run --model " + model + " --prompt-ids 785,3110 -n 4 --expert-budget 2MiB --stats", false);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("disk -> host:"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("recall"), std::string::npos) << r.out;
    r = run("run --model " + model + " --prompt-ids 1,2 -n 2 --expert-budget lots");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("--expert-budget: 'lots' is not a size"), std::string::npos) << r.out;
}

TEST(Cli, InspectListsTensorsAndExpertBytes) {
    if (!fs::exists(k_fixture)) GTEST_SKIP() << "fixture missing: " << k_fixture;
    Result r = run("inspect --model " + k_fixture);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("MixtralForCausalLM"), std::string::npos);
    EXPECT_NE(r.out.find("bytes per expert"), std::string::npos);
    EXPECT_NE(r.out.find("w1.weight"), std::string::npos);
}

// Writes text to a temp file so it reaches the executable byte for byte (no shell quoting).
fs::path temp_text(const std::string & text) {
    static int counter = 0;
    fs::path p = fs::temp_directory_path() / ("moesh_cli_text_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    std::ofstream(p, std::ios::binary) << text;
    return p;
}

// `moesh tokenize --model <model>` on every stride-th case of a tokenizer fixture gives HF tokenizers' ids.
void check_tokenize_cli(const std::string & flavour, const std::string & model_file, size_t stride) {
    const std::string dir = std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/tokenizers/" + flavour;
    std::ifstream in(dir + "/cases.json");
    const auto cases = nlohmann::json::parse(in)["cases"];
    for (size_t i = 0; i < cases.size(); i += stride) { // a spread of the cases; all are checked in tokenizer tests
        const fs::path f = temp_text(cases[i]["text"].get<std::string>());
        for (bool special : {false, true}) {
            Result r = run("tokenize --model " + dir + model_file + " --file " + f.string() + " --output json" +
                               (special ? " --add-special" : ""),
                           false);
            ASSERT_EQ(r.status, 0) << r.out;
            const std::string last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
            EXPECT_EQ(nlohmann::json::parse(last)["ids"], cases[i][special ? "ids_special" : "ids"]) << flavour << " case " << i;
        }
        fs::remove(f);
    }
}

TEST(Cli, TokenizeMatchesHuggingFaceTokenizers) {
    for (const char * flavour : {"qwen2", "llama3"}) check_tokenize_cli(flavour, "", 9);
}

TEST(Cli, TokenizeReadsTheTokenizerOfAGgufFile) {
    for (const char * flavour : {"smollm", "spm"}) check_tokenize_cli(flavour, "/tokenizer.gguf", 13);
}

TEST(Cli, RunWithPromptTextEqualsRunWithItsIds) {
    const std::string model = std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/llama_gqa_tied";
    const fs::path f = temp_text("The quick brown fox");
    Result t = run("tokenize --model " + model + " --file " + f.string() + " --add-special --output json", false);
    ASSERT_EQ(t.status, 0) << t.out;
    const auto ids = nlohmann::json::parse(t.out.substr(t.out.rfind('\n', t.out.size() - 2) + 1))["ids"];
    std::string id_list;
    for (size_t i = 0; i < ids.size(); ++i) (id_list += i ? "," : "") += std::to_string(ids[i].get<int>());
    fs::remove(f);

    Result a = run("run --model " + model + " --prompt 'The quick brown fox' -n 12 --output json", false);
    Result b = run("run --model " + model + " --prompt-ids " + id_list + " -n 12 --output json", false);
    ASSERT_EQ(a.status, 0) << a.out;
    ASSERT_EQ(b.status, 0) << b.out;
    const auto ja = nlohmann::json::parse(a.out.substr(a.out.rfind('\n', a.out.size() - 2) + 1));
    const auto jb = nlohmann::json::parse(b.out.substr(b.out.rfind('\n', b.out.size() - 2) + 1));
    EXPECT_EQ(ja["prompt_ids"], ids);
    EXPECT_EQ(ja["tokens"], jb["tokens"]);
    EXPECT_TRUE(ja["text"].is_string());
    EXPECT_EQ(ja["text"], jb["text"]);
}

TEST(Cli, InspectGgufListsMetadataAndEveryTensorFormat) {
    const std::string file = std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/gguf/tiny_llama_moe.gguf";
    Result r = run("inspect --model " + file);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("GGUF v3, alignment 64, 9 tensors"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("llama.expert_count"), std::string::npos);
    EXPECT_NE(r.out.find("array of 32 string"), std::string::npos);
    EXPECT_NE(r.out.find("token_embd.weight"), std::string::npos);
    EXPECT_NE(r.out.find("Q8_0"), std::string::npos);
    EXPECT_NE(r.out.find("merged tensors of 4 experts"), std::string::npos);
    const fs::path bad = temp_text("GGUF not really");
    const fs::path bad_gguf = bad.string() + ".gguf";
    fs::rename(bad, bad_gguf);
    r = run("inspect --model " + bad_gguf.string());
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find(bad_gguf.string()), std::string::npos) << r.out;
    fs::remove(bad_gguf);
}

TEST(Cli, ErrorsSayWhatIsWrong) {
    Result r = run("run --model /nonexistent/model --prompt-ids 1,2");
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.out.find("/nonexistent/model: no such file or folder (expected a Hugging Face model folder or a .gguf file)"),
              std::string::npos) << r.out;
    if (fs::exists(k_fixture)) {
        r = run("run --model " + k_fixture + " --prompt-ids 1,x,3");
        EXPECT_EQ(r.status, 1);
        EXPECT_NE(r.out.find("'x' at index 1"), std::string::npos) << r.out;
        r = run("run --model " + k_fixture + " --prompt-ids 1,99999999");
        EXPECT_EQ(r.status, 1);
        EXPECT_NE(r.out.find("outside the vocabulary"), std::string::npos) << r.out;
        r = run("run --model " + k_fixture + " --prompt hello");
        EXPECT_EQ(r.status, 1);
        EXPECT_NE(r.out.find("no tokenizer (tokenizer.json or GGUF vocabulary)"), std::string::npos) << r.out;
        r = run("run --model " + k_fixture + " --prompt-ids 1 --plugin-dir /nonexistent --backend nosuch");
        EXPECT_EQ(r.status, 1);
        EXPECT_NE(r.out.find("nosuch"), std::string::npos) << r.out;
    }
    // Without --model, the shipped model next to the executable is used; a copy of the executable
    // elsewhere has none and says what to do.
    r = run("run --prompt-ids 1 -n 2");
    EXPECT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("using the shipped model"), std::string::npos) << r.out;
    test::TempDir dir;
    fs::create_directories(dir.path() / "bin");
    fs::copy_file(MOESH_BIN, dir.path() / "bin" / "moesh");
    const std::string cmd = (dir.path() / "bin" / "moesh").string() + " run --prompt-ids 1 2>&1";
    FILE * p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    EXPECT_NE(pclose(p), 0);
    EXPECT_NE(out.find("no --model given, and the shipped model"), std::string::npos) << out;
}

} // namespace
} // namespace moesh
