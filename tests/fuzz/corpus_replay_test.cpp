// Replays every file of tests/fuzz/corpus/<target>/ through the fuzz entry
// points, so CI re-checks past findings without clang or libFuzzer. Seeds
// named valid_* must be accepted and invalid_* rejected with moesh::Error;
// any other file (minimized crashers, fuzzer finds) must only not crash.
#include "fuzz_targets.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace moesh::fuzz {
namespace {

using Entry = bool (*)(const uint8_t *, size_t);

std::vector<std::filesystem::path> corpus(const std::string & target) {
    std::vector<std::filesystem::path> files;
    for (const auto & e : std::filesystem::directory_iterator(std::filesystem::path(MOESH_FUZZ_CORPUS_DIR) / target))
        if (e.is_regular_file()) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    return files;
}

void replay(const std::string & target, Entry entry, size_t n_min_files) {
    auto files = corpus(target);
    EXPECT_GE(files.size(), n_min_files) << "corpus of " << target << " is smaller than expected";
    size_t n_valid = 0, n_invalid = 0;
    for (const auto & path : files) {
        SCOPED_TRACE(path.string());
        std::ifstream in(path, std::ios::binary);
        std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        bool accepted = entry(bytes.data(), bytes.size());
        const std::string name = path.filename().string();
        if (name.rfind("valid_", 0) == 0) {
            EXPECT_TRUE(accepted) << "seed marked valid was rejected";
            ++n_valid;
        } else if (name.rfind("invalid_", 0) == 0) {
            EXPECT_FALSE(accepted) << "seed marked invalid was accepted";
            ++n_invalid;
        }
    }
    EXPECT_GT(n_valid, 0u);
    EXPECT_GT(n_invalid, 0u);
}

TEST(FuzzCorpus, SafetensorsSeedsParseAsLabelledAndNothingCrashes) { replay("safetensors", safetensors_one_input, 12); }

TEST(FuzzCorpus, ModelConfigSeedsParseAsLabelledAndNothingCrashes) { replay("model_config", model_config_one_input, 8); }

TEST(FuzzCorpus, RunConfigSeedsParseAsLabelledAndNothingCrashes) { replay("run_config", run_config_one_input, 8); }

TEST(FuzzCorpus, RouteTraceSeedsParseAsLabelledAndNothingCrashes) { replay("route_trace", route_trace_one_input, 16); }

TEST(FuzzCorpus, RequestSeedsParseAsLabelledAndNothingCrashes) { replay("request", request_one_input, 30); }

TEST(FuzzCorpus, OpenAiSeedsParseAsLabelledAndNothingCrashes) { replay("openai", openai_one_input, 20); }

TEST(FuzzCorpus, GrammarSeedsParseAsLabelledAndNothingCrashes) { replay("grammar", grammar_one_input, 12); }
TEST(FuzzCorpus, JinjaSeedsParseAsLabelledAndNothingCrashes) { replay("jinja", jinja_one_input, 30); }

TEST(FuzzCorpus, ToolCallSeedsReadAsLabelledAndNothingCrashes) { replay("tool_calls", tool_calls_one_input, 30); }

TEST(FuzzCorpus, SecuritySeedsReadAsLabelledAndNothingCrashes) { replay("security", security_one_input, 16); }

TEST(FuzzCorpus, JsonSchemaSeedsParseAsLabelledAndNothingCrashes) { replay("json_schema", json_schema_one_input, 12); }

TEST(FuzzCorpus, NpySeedsParseAsLabelledAndNothingCrashes) { replay("npy", npy_one_input, 8); }

TEST(FuzzCorpus, GgufSeedsParseAsLabelledAndNothingCrashes) { replay("gguf", gguf_one_input, 16); }

TEST(FuzzCorpus, TokenizerJsonSeedsParseAsLabelledAndNothingCrashes) {
    replay("tokenizer_json", tokenizer_json_one_input, 12);
}

TEST(FuzzCorpus, TokenizerGgufSeedsParseAsLabelledAndNothingCrashes) {
    replay("tokenizer_gguf", tokenizer_gguf_one_input, 12);
}

} // namespace
} // namespace moesh::fuzz
