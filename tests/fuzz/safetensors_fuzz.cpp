// libFuzzer target for parse_safetensors: the parser must either accept the
// input with every invariant of its result holding, or throw moesh::Error.
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/safetensors.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "safetensors", what); }

} // namespace

bool safetensors_one_input(const uint8_t * data, size_t size) {
    nlohmann::json metadata;
    std::vector<StTensorInfo> tensors;
    try {
        tensors = parse_safetensors(data, size, "fuzz.safetensors", &metadata);
    } catch (const Error &) {
        return false;
    }
    check(size >= 8, "accepted a file shorter than 8 bytes");
    uint64_t n_header = 0;
    for (int i = 7; i >= 0; --i) n_header = (n_header << 8) | data[i];
    uint64_t cursor = 8 + n_header;
    check(metadata.is_object(), "metadata is not an object");
    for (const auto & [key, value] : metadata.items()) check(value.is_string(), "metadata value is not a string");
    for (const StTensorInfo & t : tensors) {
        check(t.begin == cursor, "tensors do not tile the data section");
        check(t.begin <= t.end && t.end <= size, "tensor outside the file");
        check(t.shape.size() <= k_st_max_rank, "rank above the limit");
        bool empty = false;
        for (int64_t d : t.shape) {
            check(d >= 0, "negative dimension");
            empty = empty || d == 0;
        }
        int64_t n = t.n_elements();
        check(n >= 0, "negative element count");
        if (!empty) {
            uint64_t bits = static_cast<uint64_t>(n) * st_dtype_bits(t.dtype);
            check(bits % 8 == 0 && bits / 8 == t.n_bytes(), "byte count does not match dtype x shape");
        } else {
            check(t.n_bytes() == 0, "empty tensor with bytes");
        }
        check(st_dtype_from_name(st_dtype_name(t.dtype)) == t.dtype, "dtype name does not round-trip");
        cursor = t.end;
    }
    check(cursor == size, "data section not fully covered");
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::safetensors_one_input(data, size);
    return 0;
}
#endif
