// Reading safetensors files and Hugging Face model folders of them.
//
//   auto store = moesh::TensorStore::open("models/olmoe");         // throws moesh::Error
//   const moesh::StTensor & w = store.require("model.embed_tokens.weight", "the token embedding");
//   // w.info.dtype == StDtype::BF16, w.info.shape == {n_vocab, n_embd}, w.data -> mmap'd bytes
//
//   // in memory, e.g. from a fuzzer or a test:
//   std::vector<StTensorInfo> infos = moesh::parse_safetensors(bytes, n_bytes, "blob");
//
// Format (https://huggingface.co/docs/safetensors): u64 little-endian N, then
// N bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]},
// "__metadata__": {str: str}}, then the data section; offsets are relative to
// the data section. Every rule the reference implementation enforces is
// enforced here too, so a file is accepted only if Hugging Face's own loader
// would read it, plus a few stricter ones (rank <= 8, no unknown keys in a
// tensor entry, no duplicated key anywhere in the header). Tensor data is little-endian, C order, and not necessarily
// aligned to its element size (the writer pads the header to 8 bytes only).
//
// Thread safety: all const member functions may be called concurrently once
// the object is built. Pointers to tensor data and StTensor entries stay valid
// for the life of the SafetensorsFile / TensorStore, including after a move.
#pragma once

#include <moesh/plugin.h>

#include <nlohmann/json_fwd.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/mapped_file.h"

namespace moesh {

// Every dtype the format defines (safetensors 0.6), spelled as in the file.
enum class StDtype : uint8_t {
    BOOL, U8, I8, I16, U16, I32, U32, I64, U64,
    F16, BF16, F32, F64, C64,
    F8_E4M3, F8_E5M2, F8_E4M3FNUZ, F8_E5M2FNUZ, F8_E8M0,
    F6_E2M3, F6_E3M2, F4,
};

std::string_view st_dtype_name(StDtype dtype);                      // "BF16"
std::optional<StDtype> st_dtype_from_name(std::string_view name);  // nullopt if unknown
uint32_t st_dtype_bits(StDtype dtype);   // bits per element: 4 (F4), 6 (F6_*), else 8..64
size_t st_dtype_size(StDtype dtype);     // bytes per element; 0 for the sub-byte F4 and F6_*
// The moesh_dtype the runtime computes with (F32, F16, BF16); nullopt = unsupported.
std::optional<moesh_dtype> st_dtype_to_moesh(StDtype dtype);

constexpr uint64_t k_st_max_header_bytes = 100'000'000; // as the reference implementation
constexpr size_t k_st_max_rank = 8;

struct StTensorInfo {
    std::string name;
    StDtype dtype = StDtype::F32;
    std::vector<int64_t> shape;  // outermost first (C order); {} for a scalar
    uint64_t begin = 0;          // absolute byte offsets in the file: [begin, end)
    uint64_t end = 0;

    uint64_t n_bytes() const { return end - begin; }
    int64_t n_elements() const;  // product of shape; 1 for a scalar
};

// Parses a whole safetensors file image [data, data + size) and validates
// header, dtypes, shapes and offsets (in range, matching dtype x shape,
// covering the data section exactly: no overlap, no hole, no trailing bytes).
// Returns the tensors in file order (by begin offset). source_name is what
// error messages call the file. On success *metadata_out (if given) is set to
// the "__metadata__" object (an object of strings; empty object if absent).
// Throws moesh::Error("<source>: tensor 'name': ...") on any problem.
std::vector<StTensorInfo> parse_safetensors(const uint8_t * data, size_t size,
                                            std::string_view source_name,
                                            nlohmann::json * metadata_out = nullptr);

// One safetensors file, mmap'd and parsed.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::filesystem::path & path);

    const std::filesystem::path & path() const { return file_.path(); }
    const std::vector<StTensorInfo> & tensors() const { return tensors_; } // file order
    const StTensorInfo * find(std::string_view name) const;                // nullptr if absent
    // Start of the tensor's bytes; info must come from this file.
    const void * data(const StTensorInfo & info) const;
    const std::map<std::string, std::string> & metadata() const { return metadata_; }
    const MappedFile & mapping() const { return file_; }

private:
    MappedFile file_;
    std::vector<StTensorInfo> tensors_;
    std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
    std::map<std::string, std::string> metadata_;
};

struct StTensor {
    StTensorInfo info;
    const void * data = nullptr;  // [info.n_bytes()] bytes inside the store's mapping
    std::filesystem::path file;   // the file it lives in
};

// The weights of a Hugging Face model folder, chosen as transformers does:
//   1. model.safetensors, if present;
//   2. else model.safetensors.index.json: its "weight_map" {tensor: shard file};
//      shard names must be plain file names in the folder; every mapped tensor
//      must be in its shard; tensors of those shards missing from the map are
//      kept too (transformers loads whole shards);
//   3. else every *.safetensors file in the folder (sorted; dot-files skipped).
// A tensor name found in two files is an error.
class TensorStore {
public:
    static TensorStore open(const std::filesystem::path & folder);

    const StTensor * find(std::string_view name) const;  // nullptr if absent
    // Throws moesh::Error("<folder>: missing tensor 'name' (needed by <what>)").
    const StTensor & require(std::string_view name, std::string_view what) const;
    std::vector<std::string_view> names() const;          // sorted
    const std::vector<StTensor> & tensors() const { return tensors_; } // file by file, file order
    uint64_t total_bytes() const;                          // sum of all tensors' bytes
    const std::filesystem::path & folder() const { return folder_; }
    const std::vector<SafetensorsFile> & files() const { return files_; }

private:
    TensorStore() = default;
    void add_file(SafetensorsFile file);

    std::filesystem::path folder_;
    std::vector<SafetensorsFile> files_;
    std::vector<StTensor> tensors_;
    std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
};

} // namespace moesh
