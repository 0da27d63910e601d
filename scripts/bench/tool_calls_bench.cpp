// What streaming a tool call as it is written costs the server: tool_call_prefix runs on the
// calls' text at every token (runtime/tool_calls.h), so a long call (a file's content as an
// argument) costs more per token as it grows. One JSON line per format and argument length:
// microseconds per token, mean and at the call's end, for 4 bytes per token.
//
//   moesh_bench_tool_calls [--bytes 4096,65536]
#include "runtime/tool_calls.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    std::vector<size_t> lengths = {4096, 65536};
    for (int i = 1; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], "--bytes") == 0) {
            lengths.clear();
            for (const char * p = argv[i + 1]; *p;) {
                lengths.push_back(size_t(std::strtoull(p, const_cast<char **>(&p), 10)));
                if (*p == ',') ++p;
            }
        }
    const std::string tools = R"([{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}])";
    using moesh::ToolCallFormat;
    for (const size_t n : lengths) {
        std::string body;   // code-like text: lines, quotes, a tab now and then
        while (body.size() < n) body += "    if (x == \"a\") {\treturn f(x, 42);\n";
        body.resize(n);
        std::string escaped;   // as a JSON string's content
        for (const char c : body) escaped += c == '"' ? "\\\"" : c == '\n' ? "\\n" : c == '\t' ? "\\t" : std::string(1, c);
        const std::pair<ToolCallFormat, std::string> cases[] = {
            {ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"a.cpp\", \"content\": \"" + escaped + "\"}}\n</tool_call>"},
            {ToolCallFormat::QwenXml, "<tool_call>\n<function=write_file>\n<parameter=path>\na.cpp\n</parameter>\n<parameter=content>\n" + body +
                                          "\n</parameter>\n</function>\n</tool_call>"},
            {ToolCallFormat::Harmony, "<|channel|>commentary to=functions.write_file <|constrain|>json<|message|>{\"path\": \"a.cpp\", \"content\": \"" +
                                          escaped + "\"}"},
        };
        for (const auto & [f, text] : cases) {
            double total = 0, last = 0;
            size_t tokens = 0, streamed = 0;
            for (size_t k = 4; k <= text.size() + 3; k += 4, ++tokens) {
                const auto t0 = std::chrono::steady_clock::now();
                const std::vector<moesh::PartialCall> calls = tool_call_prefix(f, std::string_view(text).substr(0, std::min(k, text.size())), tools);
                last = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
                total += last;
                if (!calls.empty()) streamed = calls[0].arguments.size();
            }
            std::printf("{\"bench\":\"tool_call_stream\",\"format\":\"%s\",\"argument_bytes\":%zu,\"tokens\":%zu,\"us_per_token\":%.2f,"
                        "\"us_at_end\":%.2f,\"streamed_bytes\":%zu}\n",
                        std::string(moesh::tool_call_format_name(f)).c_str(), n, tokens, total / double(tokens), last, streamed);
        }
    }
}
