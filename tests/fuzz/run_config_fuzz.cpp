// libFuzzer target for parse_run_config (moesh's TOML settings): moesh::Error is
// the only way to refuse, and an accepted config keeps its documented ranges.
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/run_config.h"

#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace moesh::fuzz {

bool run_config_one_input(const uint8_t * data, size_t size) {
    RunConfig rc;
    try {
        rc = parse_run_config(std::string_view(reinterpret_cast<const char *>(data), size), "fuzz.toml");
    } catch (const Error &) {
        return false;
    }
    if (rc.threads < 0 || rc.max_batch < 1 || rc.kv_block_size < 1 ||
        (rc.kv_type != -1 && rc.kv_type != MOESH_DTYPE_F32 && rc.kv_type != MOESH_DTYPE_F16 && rc.kv_type != MOESH_DTYPE_Q8_0)) {
        std::fprintf(stderr, "run_config invariant violated: out-of-range value accepted\n");
        std::abort();
    }
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::run_config_one_input(data, size);
    return 0;
}
#endif
