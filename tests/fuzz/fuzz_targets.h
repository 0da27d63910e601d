// Entry points shared by the libFuzzer executables (MOESH_FUZZ=ON, where each
// *_fuzz.cpp also defines LLVMFuzzerTestOneInput) and the corpus replay test
// (plain gtest, any compiler). Each returns true when the input was accepted,
// false when it was rejected with moesh::Error; any other exception, crash or
// failed invariant (abort) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace moesh::fuzz {

// A failed invariant is a finding: say which target's and what, then abort.
inline void require(bool ok, const char * target, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "%s invariant violated: %s\n", target, what);
        std::abort();
    }
}

bool safetensors_one_input(const uint8_t * data, size_t size);
bool model_config_one_input(const uint8_t * data, size_t size);
bool npy_one_input(const uint8_t * data, size_t size);
bool run_config_one_input(const uint8_t * data, size_t size);
bool gguf_one_input(const uint8_t * data, size_t size);
bool tokenizer_json_one_input(const uint8_t * data, size_t size);
bool tokenizer_gguf_one_input(const uint8_t * data, size_t size);
bool route_trace_one_input(const uint8_t * data, size_t size);
bool request_one_input(const uint8_t * data, size_t size);   // transport/protocol.h: parse_request
bool openai_one_input(const uint8_t * data, size_t size);    // transport/openai.h: translate
bool grammar_one_input(const uint8_t * data, size_t size);       // runtime/grammar.h: Grammar::parse, matching
bool json_schema_one_input(const uint8_t * data, size_t size);   // runtime/json_schema.h
bool jinja_one_input(const uint8_t * data, size_t size);         // runtime/jinja.h: parse and render
bool tool_calls_one_input(const uint8_t * data, size_t size);    // runtime/tool_calls.h: reading model output
bool security_one_input(const uint8_t * data, size_t size);      // transport/security.h: certificates, key lists, API keys

} // namespace moesh::fuzz
