// NumPy .npy files of float32, for golden tests: reference logits written by
// numpy.save, and our outputs written back for inspection with numpy.load.
//
//   moesh::write_npy_f32("logits.npy", logits, {n_tokens, n_vocab});
//   moesh::NpyArray ref = moesh::read_npy_f32("ref_logits.npy"); // throws moesh::Error
//   ref.shape == {n_tokens, n_vocab}; ref.data.size() == n_tokens * n_vocab
//
// Reads what numpy.save writes for a float32 array (format versions 1.0, 2.0
// and 3.0, descr '<f4', C order); anything else is refused with a message
// naming the file and the problem. Thread safety: plain functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string_view>
#include <vector>

namespace moesh {

struct NpyArray {
    std::vector<int64_t> shape;  // outermost first; {} for a 0-d array
    std::vector<float> data;     // [product(shape)], C order

    int64_t n_elements() const { return static_cast<int64_t>(data.size()); }
};

// Writes format 1.0 (2.0 if the header would not fit), '<f4', C order, the
// header padded with spaces and a final '\n' to a multiple of 64 bytes as
// numpy does. data holds product(shape) floats. Throws moesh::Error.
void write_npy_f32(const std::filesystem::path & path, const float * data, std::vector<int64_t> shape);

// The bytes write_npy_f32 would write.
std::vector<uint8_t> encode_npy_f32(const float * data, const std::vector<int64_t> & shape);

NpyArray read_npy_f32(const std::filesystem::path & path);

// Parses a whole .npy image; source_name is what error messages call it.
NpyArray parse_npy_f32(const uint8_t * data, size_t size, std::string_view source_name);

} // namespace moesh
