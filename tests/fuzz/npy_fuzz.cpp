// libFuzzer target for parse_npy_f32 (reference arrays for golden tests).
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/npy.h"

#include <cstdio>
#include <cstdlib>

namespace moesh::fuzz {

bool npy_one_input(const uint8_t * data, size_t size) {
    NpyArray a;
    try {
        a = parse_npy_f32(data, size, "fuzz.npy");
    } catch (const Error &) {
        return false;
    }
    uint64_t n = 1;
    for (int64_t d : a.shape) {
        if (d < 0) std::abort();
        n *= static_cast<uint64_t>(d);
    }
    if (n != a.data.size() || a.data.size() * sizeof(float) > size) {
        std::fprintf(stderr, "npy invariant violated: element count does not match shape and file size\n");
        std::abort();
    }
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::npy_one_input(data, size);
    return 0;
}
#endif
