// How long rendering a chat template takes (the server does it per request, on its scheduler
// thread), for the real templates of tests/fixtures/chat_templates/jinja.json, short and long
// conversations, with tools. One JSON line per case. scripts/bench/chat_template_bench_jinja2.py
// times jinja2 (what transformers and vLLM run) on the same cases.
//
//   moesh_bench_chat_template [--reps N]
#include "runtime/chat_template.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

using ojson = nlohmann::ordered_json;

int main(int argc, char ** argv) {
    int reps = 200;
    for (int i = 1; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[i + 1]));
    std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/chat_templates/jinja.json");
    const ojson doc = ojson::parse(in);
    for (const char * name : {"Qwen-Qwen3-0.6B", "openai-gpt-oss-120b", "meta-llama-Llama-3.1-8B-Instruct", "deepseek-ai-DeepSeek-V3.1"}) {
        for (const auto & t : doc["templates"]) {
            if (t["name"] != name) continue;
            const moesh::ChatTemplate ct(t["template"].get<std::string>(), "<s>", "</s>");
            const ojson extra = {{"tools", t["cases"][5]["vars"]["tools"]}};   // the fixture's tools case
            for (int n : {2, 50}) {
                ojson msgs = ojson::array();
                for (int m = 0; m < n; ++m)
                    msgs.push_back({{"role", m % 2 ? "assistant" : "user"}, {"content", std::string(200, char('a' + m % 26))}});
                size_t bytes = ct.render(msgs, true, extra).size();
                const auto t0 = std::chrono::steady_clock::now();
                for (int r = 0; r < reps; ++r) bytes = ct.render(msgs, true, extra).size();
                const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
                std::printf("{\"bench\":\"chat_template\",\"engine\":\"moesh\",\"template\":\"%s\",\"messages\":%d,\"tools\":1,"
                            "\"render_us\":%.1f,\"prompt_bytes\":%zu}\n",
                            name, n, us, bytes);
            }
        }
    }
}
