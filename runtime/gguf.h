// Reading GGUF files (llama.cpp's model format), versions 3 and 2.
//
//   moesh::GgufFile f("models/olmoe-q8_0.gguf");                  // throws moesh::Error
//   uint32_t n_layer = f.get_u32("llama.block_count");            // Error names key and types if wrong
//   std::string_view arch = f.get_string("general.architecture");
//   const moesh::GgufArray & vocab = f.get_array("tokenizer.ggml.tokens");  // vocab.string(i)
//   const moesh::GgufTensor & w = f.require_tensor("blk.0.ffn_gate_exps.weight");
//   // w.ne == {n_embd, n_ff, n_expert, 1}, w.type == GgmlType::Q8_0, w.data -> mmap'd bytes
//   moesh::GgufSlice e3 = w.expert_view(3);                       // expert 3's bytes, no copy
//
//   // in memory, e.g. from a fuzzer or a test (the image must outlive the result):
//   moesh::GgufContents g = moesh::parse_gguf(bytes, n_bytes, "blob");
//
// Format (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
//   "GGUF", u32 version, u64 n_tensors, u64 n_kv,
//   n_kv x { string key, u32 value type, value },
//   n_tensors x { string name, u32 n_dims, i64 ne[n_dims], u32 ggml type, u64 offset },
//   padding to general.alignment (u32, default 32), then the data section;
//   tensor offsets are relative to it and multiples of the alignment.
//   A string is u64 length + bytes (no NUL); an array is u32 element type +
//   u64 count + elements. ne[0] is the fastest-varying dimension (the reverse
//   of NumPy's shape); a layer's routed experts are one 3-D tensor
//   [ne0, ne1, n_expert] whose expert slices are contiguous.
// Version 2 has the same layout as 3 (v3 only added big-endian files, which
// are refused here); version 1 (32-bit counts) is refused.
//
// Everything is validated before use, so a file that parses can be indexed
// without further checks: counts against the bytes left, string and array
// lengths, value and ggml types, duplicate keys and tensor names, shapes,
// block-size divisibility, alignment, tensor ranges (inside the file, no
// overlap). Errors are moesh::Error("<source>: <what>, at byte offset N").
//
// Keys, strings and tensor data are views into the image / mapping, never copies.
//
// Thread safety: all const member functions may be called concurrently once
// the object is built. Views and pointers stay valid for the life of the
// GgufFile (including after a move), or of the image given to parse_gguf.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/mapped_file.h"

namespace moesh {

// Metadata value types, numbered as in the file.
enum class GgufValueType : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7,
    String = 8, Array = 9, U64 = 10, I64 = 11, F64 = 12,
};

std::string_view gguf_value_type_name(GgufValueType type);  // "u32", "string", "array", ...
size_t gguf_value_type_size(GgufValueType type);            // bytes of a scalar; 0 for string and array

// ggml tensor types, numbered as in the file (gguf-py 0.19 GGMLQuantizationType).
// Ids 4, 5 (Q4_2, Q4_3), 31-33 and 36-38 were removed from ggml and are unknown here.
enum class GgmlType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
    IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
    TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39, NVFP4 = 40, Q1_0 = 41,
};

struct GgmlTypeTraits {
    std::string_view name;    // "Q8_0"
    uint32_t block_size;      // elements per block (1 for plain types)
    uint32_t block_bytes;     // bytes per block
};

// nullopt if the id is not a known ggml type.
std::optional<GgmlType> ggml_type_from_id(uint32_t id);
const GgmlTypeTraits & ggml_type_traits(GgmlType type);
std::string_view ggml_type_name(GgmlType type);
// Bytes of a row of n elements; n must be a multiple of the block size.
uint64_t ggml_row_bytes(GgmlType type, int64_t n);
// Every known type, in id order.
const std::vector<GgmlType> & ggml_all_types();

constexpr uint32_t k_gguf_default_alignment = 32;
constexpr uint64_t k_gguf_max_name_bytes = 65535;  // keys (as the spec says) and tensor names
constexpr uint32_t k_gguf_max_array_depth = 2;     // an array of arrays of scalars, no deeper
constexpr uint32_t k_gguf_max_dims = 4;

class GgufArray;

// One metadata value. Scalars are widened into u/i/f; strings and arrays view the image.
struct GgufValue {
    GgufValueType type = GgufValueType::U8;
    uint64_t u = 0;           // U8, U16, U32, U64, Bool (0 or 1)
    int64_t i = 0;            // I8, I16, I32, I64
    double f = 0;             // F32, F64
    std::string_view str;     // String
    const GgufArray * array = nullptr;  // Array; owned by the GgufContents

    bool is_integer() const;
    bool is_float() const { return type == GgufValueType::F32 || type == GgufValueType::F64; }
    // The integer value if it is an integer type and fits in T; nullopt otherwise.
    template <typename T> std::optional<T> as_int() const {
        if (!is_integer()) return std::nullopt;
        if (type == GgufValueType::I8 || type == GgufValueType::I16 || type == GgufValueType::I32 ||
            type == GgufValueType::I64) {
            if (!std::in_range<T>(i)) return std::nullopt;
            return static_cast<T>(i);
        }
        if (!std::in_range<T>(u)) return std::nullopt;
        return static_cast<T>(u);
    }
};

// An array value: scalars stay packed in the image (read through at()),
// strings are views, nested arrays are GgufArrays.
class GgufArray {
public:
    GgufValueType type() const { return type_; }  // element type
    uint64_t size() const { return n_; }

    GgufValue at(uint64_t i) const;           // any element type; throws std::out_of_range
    std::string_view string(uint64_t i) const; // String arrays only (else std::logic_error)
    const uint8_t * raw() const { return raw_; } // scalar arrays: [size() * element size] bytes, little-endian, unaligned

private:
    friend class GgufParser;
    GgufValueType type_ = GgufValueType::U8;
    uint64_t n_ = 0;
    const uint8_t * raw_ = nullptr;
    std::vector<std::string_view> strings_;  // [n_] for String arrays
    std::vector<const GgufArray *> arrays_;  // [n_] for Array arrays
};

struct GgufKv {
    std::string_view key;
    GgufValue value;
    uint64_t file_offset = 0;  // where the key-value starts in the file, for messages
};

// A view of expert e's bytes in a merged expert tensor.
struct GgufSlice {
    const uint8_t * data = nullptr;  // [n_bytes]
    uint64_t n_bytes = 0;
};

struct GgufTensor {
    std::string_view name;
    uint32_t n_dims = 0;                   // 1..4
    std::array<int64_t, 4> ne = {1, 1, 1, 1}; // ne[0] fastest; ne[i] = 1 for i >= n_dims
    GgmlType type = GgmlType::F32;
    uint64_t offset = 0;                   // relative to the data section
    uint64_t n_bytes = 0;
    const uint8_t * data = nullptr;        // [n_bytes] inside the image
    uint64_t info_offset = 0;              // where the tensor info starts in the file

    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    uint64_t row_bytes() const { return ggml_row_bytes(type, ne[0]); }
    // Expert e of a merged expert tensor [ne0, ne1, n_expert]: ne1 rows of ne0
    // elements, contiguous. Throws moesh::Error if the tensor is not 3-D and
    // std::out_of_range unless 0 <= e < ne[2].
    GgufSlice expert_view(int64_t e) const;
    std::string shape_string() const;      // "[4096, 1024, 64]" in ne order
};

// The parsed header of a GGUF image. Movable; views point into the image.
class GgufContents {
public:
    uint32_t version() const { return version_; }
    uint32_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }  // absolute start of the data section
    const std::string & source() const { return source_; }

    const std::vector<GgufKv> & kvs() const { return kvs_; }            // file order
    const std::vector<GgufTensor> & tensors() const { return tensors_; } // file order
    const GgufKv * find(std::string_view key) const;                   // nullptr if absent
    const GgufTensor * find_tensor(std::string_view name) const;       // nullptr if absent
    // Throws moesh::Error("<source>: missing tensor 'name'").
    const GgufTensor & require_tensor(std::string_view name) const;

    // Typed accessors: throw moesh::Error naming the key if it is missing or
    // has another type (naming both types), or if an integer does not fit.
    // Integer getters accept any integer type whose value fits; float getters
    // accept f32 and f64; get_bool only bool; get_string only string.
    uint8_t get_u8(std::string_view key) const;
    uint32_t get_u32(std::string_view key) const;
    int32_t get_i32(std::string_view key) const;
    uint64_t get_u64(std::string_view key) const;
    int64_t get_i64(std::string_view key) const;
    float get_f32(std::string_view key) const;
    double get_f64(std::string_view key) const;
    bool get_bool(std::string_view key) const;
    std::string_view get_string(std::string_view key) const;
    const GgufArray & get_array(std::string_view key) const;
    // The same, but nullopt when the key is absent (a wrong type still throws).
    std::optional<uint32_t> find_u32(std::string_view key) const;
    std::optional<float> find_f32(std::string_view key) const;
    std::optional<std::string_view> find_string(std::string_view key) const;

private:
    friend class GgufParser;
    const GgufKv & require(std::string_view key) const;
    [[noreturn]] void wrong_type(const GgufKv & kv, std::string_view expected) const;
    template <typename T> T get_int(std::string_view key, std::string_view expected) const;
    template <typename T> T int_of(const GgufKv & kv, std::string_view expected) const;

    std::string source_;
    uint32_t version_ = 0;
    uint32_t alignment_ = k_gguf_default_alignment;
    uint64_t data_offset_ = 0;
    std::vector<GgufKv> kvs_;
    std::vector<GgufTensor> tensors_;
    std::vector<std::unique_ptr<GgufArray>> arrays_;       // every array value, owned
    std::map<std::string_view, size_t, std::less<>> kv_index_;     // key -> position in kvs_
    std::map<std::string_view, size_t, std::less<>> tensor_index_; // name -> position in tensors_
};

// Parses a whole GGUF image [data, data + size). source_name is what error
// messages call the file. Throws moesh::Error on any problem.
GgufContents parse_gguf(const uint8_t * data, size_t size, std::string_view source_name);

namespace detail {
struct GgufMapping {
    explicit GgufMapping(const std::filesystem::path & path) : file(path) {}
    MappedFile file;
};
} // namespace detail

// A GGUF file, mmap'd and parsed; every GgufContents accessor applies.
class GgufFile : private detail::GgufMapping, public GgufContents {
public:
    explicit GgufFile(const std::filesystem::path & path);

    const std::filesystem::path & path() const { return file.path(); }
    const MappedFile & mapping() const { return file; }
};

} // namespace moesh
