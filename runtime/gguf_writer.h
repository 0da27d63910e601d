// Writing GGUF v3 files: metadata and tensors given as raw bytes in any ggml type.
//
//   moesh::GgufWriter w;                                    // alignment 32 unless general.alignment says otherwise
//   w.add_string("general.architecture", "llama");
//   w.add_u32("llama.expert_count", 8);
//   w.add_array<float>("some.floats", {1.f, 2.f});
//   w.add_string_array("tokenizer.ggml.tokens", {"<s>", "a"});
//   w.add_tensor("blk.0.ffn_gate_exps.weight", moesh::GgmlType::Q8_0, {64, 16, 8}, std::move(bytes)); // ne order
//   w.write_file("out.gguf");                               // or: std::vector<uint8_t> image = w.to_bytes();
//
// The writer checks what it is given (no duplicate keys or tensor names, a
// valid shape for the type, bytes matching type x shape, alignment a power of
// two) and throws moesh::Error otherwise; what it writes parses with
// parse_gguf. Layout as gguf-py and llama.cpp write it: header, key-values in
// insertion order, tensor infos, padding, each tensor's data at the next
// multiple of the alignment, the file padded to the alignment at the end.
//
// Thread safety: none; one writer per thread. add_tensor_view borrows the
// bytes, which must stay valid until the last write.
#pragma once

#include "runtime/gguf.h"

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

class GgufWriter {
public:
    void add_u8(std::string_view key, uint8_t v);
    void add_i8(std::string_view key, int8_t v);
    void add_u16(std::string_view key, uint16_t v);
    void add_i16(std::string_view key, int16_t v);
    void add_u32(std::string_view key, uint32_t v);  // "general.alignment" also sets the alignment
    void add_i32(std::string_view key, int32_t v);
    void add_u64(std::string_view key, uint64_t v);
    void add_i64(std::string_view key, int64_t v);
    void add_f32(std::string_view key, float v);
    void add_f64(std::string_view key, double v);
    void add_bool(std::string_view key, bool v);
    void add_string(std::string_view key, std::string_view v);

    // Arrays of scalars: T is one of uint8_t, int8_t, uint16_t, int16_t,
    // uint32_t, int32_t, uint64_t, int64_t, float, double, bool.
    template <typename T> void add_array(std::string_view key, std::span<const T> values);
    template <typename T> void add_array(std::string_view key, std::initializer_list<T> values) {
        add_array<T>(key, std::span<const T>(values.begin(), values.size()));
    }
    void add_string_array(std::string_view key, const std::vector<std::string_view> & values);
    void add_string_array(std::string_view key, std::initializer_list<std::string_view> values) {
        add_string_array(key, std::vector<std::string_view>(values));
    }

    // ne in GGUF order (ne[0] fastest), 1 to 4 dimensions; bytes must be
    // exactly ggml_row_bytes(type, ne[0]) * ne[1] * ... bytes.
    void add_tensor(std::string_view name, GgmlType type, const std::vector<int64_t> & ne, std::vector<uint8_t> bytes);
    // The same without copying: bytes must outlive every write.
    void add_tensor_view(std::string_view name, GgmlType type, const std::vector<int64_t> & ne,
                         std::span<const uint8_t> bytes);

    uint32_t alignment() const { return alignment_; }
    size_t n_kv() const { return n_kv_; }
    size_t n_tensors() const { return tensors_.size(); }

    std::vector<uint8_t> to_bytes() const;
    // Writes to path + ".tmp" then renames, so a failed write leaves no partial file.
    void write_file(const std::filesystem::path & path) const;

private:
    struct Tensor {
        std::string name;
        GgmlType type;
        std::vector<int64_t> ne;
        std::vector<uint8_t> owned;              // add_tensor
        std::span<const uint8_t> borrowed;       // add_tensor_view
        std::span<const uint8_t> bytes() const { return owned.empty() ? borrowed : std::span<const uint8_t>(owned); }
    };
    template <typename Sink> void write_to(Sink & sink) const;
    void begin_kv(std::string_view key, GgufValueType type);
    void put_string(std::string_view s);
    void put_raw(const void * p, size_t n);
    void add_scalar_array(std::string_view key, GgufValueType type, const void * values, size_t n, size_t elem_size);
    Tensor & new_tensor(std::string_view name, GgmlType type, const std::vector<int64_t> & ne, size_t n_bytes);

    uint32_t alignment_ = k_gguf_default_alignment;
    size_t n_kv_ = 0;
    std::vector<uint8_t> kv_bytes_;  // every key-value, serialised in insertion order
    std::set<std::string, std::less<>> keys_;
    std::vector<Tensor> tensors_;
    std::set<std::string, std::less<>> tensor_names_;
};

} // namespace moesh
