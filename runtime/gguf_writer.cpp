#include "runtime/gguf_writer.h"

#include "runtime/error.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <system_error>
#include <type_traits>

namespace moesh {

namespace {

template <typename T> constexpr GgufValueType value_type_of() {
    if constexpr (std::is_same_v<T, bool>) return GgufValueType::Bool;
    else if constexpr (std::is_same_v<T, uint8_t>) return GgufValueType::U8;
    else if constexpr (std::is_same_v<T, int8_t>) return GgufValueType::I8;
    else if constexpr (std::is_same_v<T, uint16_t>) return GgufValueType::U16;
    else if constexpr (std::is_same_v<T, int16_t>) return GgufValueType::I16;
    else if constexpr (std::is_same_v<T, uint32_t>) return GgufValueType::U32;
    else if constexpr (std::is_same_v<T, int32_t>) return GgufValueType::I32;
    else if constexpr (std::is_same_v<T, uint64_t>) return GgufValueType::U64;
    else if constexpr (std::is_same_v<T, int64_t>) return GgufValueType::I64;
    else if constexpr (std::is_same_v<T, float>) return GgufValueType::F32;
    else if constexpr (std::is_same_v<T, double>) return GgufValueType::F64;
    else static_assert(sizeof(T) == 0, "not a GGUF scalar type");
}

void append_le(std::vector<uint8_t> & out, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t pad_to(uint64_t n, uint64_t align) { return (n + align - 1) / align * align; }

struct VectorSink {
    std::vector<uint8_t> & out;
    void operator()(const void * p, size_t n) {
        const auto * b = static_cast<const uint8_t *>(p);
        out.insert(out.end(), b, b + n);
    }
};

struct FileSink {
    std::ofstream & out;
    const std::string & name;
    void operator()(const void * p, size_t n) {
        out.write(static_cast<const char *>(p), static_cast<std::streamsize>(n));
        if (!out) throw Error(name + ": write failed");
    }
};

} // namespace

void GgufWriter::put_raw(const void * p, size_t n) {
    const auto * b = static_cast<const uint8_t *>(p);
    kv_bytes_.insert(kv_bytes_.end(), b, b + n);
}

void GgufWriter::put_string(std::string_view s) {
    append_le(kv_bytes_, s.size(), 8);
    put_raw(s.data(), s.size());
}

void GgufWriter::begin_kv(std::string_view key, GgufValueType type) {
    if (key.empty()) throw Error("GgufWriter: empty key");
    if (key.size() > k_gguf_max_name_bytes)
        throw Error("GgufWriter: key of " + std::to_string(key.size()) + " bytes is too long");
    if (key == "general.alignment" && type != GgufValueType::U32)
        throw Error("GgufWriter: general.alignment must be u32");
    if (!keys_.emplace(key).second) throw Error("GgufWriter: duplicate key '" + std::string(key) + "'");
    put_string(key);
    append_le(kv_bytes_, static_cast<uint32_t>(type), 4);
    ++n_kv_;
}

void GgufWriter::add_u8(std::string_view key, uint8_t v) {
    begin_kv(key, GgufValueType::U8);
    append_le(kv_bytes_, v, 1);
}

void GgufWriter::add_i8(std::string_view key, int8_t v) {
    begin_kv(key, GgufValueType::I8);
    append_le(kv_bytes_, static_cast<uint8_t>(v), 1);
}

void GgufWriter::add_u16(std::string_view key, uint16_t v) {
    begin_kv(key, GgufValueType::U16);
    append_le(kv_bytes_, v, 2);
}

void GgufWriter::add_i16(std::string_view key, int16_t v) {
    begin_kv(key, GgufValueType::I16);
    append_le(kv_bytes_, static_cast<uint16_t>(v), 2);
}

void GgufWriter::add_i32(std::string_view key, int32_t v) {
    begin_kv(key, GgufValueType::I32);
    append_le(kv_bytes_, static_cast<uint32_t>(v), 4);
}

void GgufWriter::add_u64(std::string_view key, uint64_t v) {
    begin_kv(key, GgufValueType::U64);
    append_le(kv_bytes_, v, 8);
}

void GgufWriter::add_i64(std::string_view key, int64_t v) {
    begin_kv(key, GgufValueType::I64);
    append_le(kv_bytes_, static_cast<uint64_t>(v), 8);
}

void GgufWriter::add_bool(std::string_view key, bool v) {
    begin_kv(key, GgufValueType::Bool);
    append_le(kv_bytes_, v ? 1 : 0, 1);
}

void GgufWriter::add_string(std::string_view key, std::string_view v) {
    begin_kv(key, GgufValueType::String);
    put_string(v);
}

void GgufWriter::add_u32(std::string_view key, uint32_t v) {
    if (key == "general.alignment" && (v == 0 || (v & (v - 1)) != 0))
        throw Error("GgufWriter: general.alignment " + std::to_string(v) + " is not a nonzero power of two");
    begin_kv(key, GgufValueType::U32);
    append_le(kv_bytes_, v, 4);
    if (key == "general.alignment") alignment_ = v;
}

void GgufWriter::add_f32(std::string_view key, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    begin_kv(key, GgufValueType::F32);
    append_le(kv_bytes_, bits, 4);
}

void GgufWriter::add_f64(std::string_view key, double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    begin_kv(key, GgufValueType::F64);
    append_le(kv_bytes_, bits, 8);
}

void GgufWriter::add_scalar_array(std::string_view key, GgufValueType type, const void * values, size_t n,
                                  size_t elem_size) {
    begin_kv(key, GgufValueType::Array);
    append_le(kv_bytes_, static_cast<uint32_t>(type), 4);
    append_le(kv_bytes_, n, 8);
    const auto * p = static_cast<const uint8_t *>(values);
    for (size_t i = 0; i < n; ++i) {
        uint64_t bits = 0;
        if (type == GgufValueType::Bool) bits = *reinterpret_cast<const bool *>(p + i * elem_size) ? 1 : 0;
        else std::memcpy(&bits, p + i * elem_size, elem_size);  // host is little-endian (x86-64, arm64)
        append_le(kv_bytes_, bits, elem_size);
    }
}

template <typename T> void GgufWriter::add_array(std::string_view key, std::span<const T> values) {
    add_scalar_array(key, value_type_of<T>(), values.data(), values.size(), sizeof(T));
}

template void GgufWriter::add_array<uint8_t>(std::string_view, std::span<const uint8_t>);
template void GgufWriter::add_array<int8_t>(std::string_view, std::span<const int8_t>);
template void GgufWriter::add_array<uint16_t>(std::string_view, std::span<const uint16_t>);
template void GgufWriter::add_array<int16_t>(std::string_view, std::span<const int16_t>);
template void GgufWriter::add_array<uint32_t>(std::string_view, std::span<const uint32_t>);
template void GgufWriter::add_array<int32_t>(std::string_view, std::span<const int32_t>);
template void GgufWriter::add_array<uint64_t>(std::string_view, std::span<const uint64_t>);
template void GgufWriter::add_array<int64_t>(std::string_view, std::span<const int64_t>);
template void GgufWriter::add_array<float>(std::string_view, std::span<const float>);
template void GgufWriter::add_array<double>(std::string_view, std::span<const double>);
template void GgufWriter::add_array<bool>(std::string_view, std::span<const bool>);

void GgufWriter::add_string_array(std::string_view key, const std::vector<std::string_view> & values) {
    begin_kv(key, GgufValueType::Array);
    append_le(kv_bytes_, static_cast<uint32_t>(GgufValueType::String), 4);
    append_le(kv_bytes_, values.size(), 8);
    for (std::string_view s : values) put_string(s);
}

GgufWriter::Tensor & GgufWriter::new_tensor(std::string_view name, GgmlType type, const std::vector<int64_t> & ne,
                                            size_t n_bytes) {
    const std::string where = "GgufWriter: tensor '" + std::string(name) + "': ";
    if (name.empty()) throw Error("GgufWriter: empty tensor name");
    if (name.size() > k_gguf_max_name_bytes) throw Error(where + "name is too long");
    if (tensor_names_.count(name)) throw Error(where + "added twice");
    if (ne.empty() || ne.size() > k_gguf_max_dims)
        throw Error(where + std::to_string(ne.size()) + " dimensions, expected 1..4");
    const GgmlTypeTraits & traits = ggml_type_traits(type);
    uint64_t expected = 0;
    for (size_t d = 0; d < ne.size(); ++d) {
        if (ne[d] <= 0) throw Error(where + "ne[" + std::to_string(d) + "] = " + std::to_string(ne[d]) + " is not positive");
        if (d == 0) {
            if (ne[0] % traits.block_size != 0)
                throw Error(where + "ne[0] = " + std::to_string(ne[0]) + " is not a multiple of " +
                            std::string(traits.name) + "'s block size " + std::to_string(traits.block_size));
            expected = static_cast<uint64_t>(ne[0]) / traits.block_size * traits.block_bytes;
        } else if (__builtin_mul_overflow(expected, static_cast<uint64_t>(ne[d]), &expected)) {
            throw Error(where + "byte size overflows");
        }
    }
    if (expected != n_bytes)
        throw Error(where + std::to_string(n_bytes) + " bytes given, " + std::string(traits.name) + " of this shape takes " +
                    std::to_string(expected));
    tensor_names_.emplace(name);
    Tensor & t = tensors_.emplace_back();
    t.name = std::string(name);
    t.type = type;
    t.ne = ne;
    return t;
}

void GgufWriter::add_tensor(std::string_view name, GgmlType type, const std::vector<int64_t> & ne,
                            std::vector<uint8_t> bytes) {
    Tensor & t = new_tensor(name, type, ne, bytes.size());
    t.owned = std::move(bytes);
}

void GgufWriter::add_tensor_view(std::string_view name, GgmlType type, const std::vector<int64_t> & ne,
                                 std::span<const uint8_t> bytes) {
    Tensor & t = new_tensor(name, type, ne, bytes.size());
    t.borrowed = bytes;
}

template <typename Sink> void GgufWriter::write_to(Sink & sink) const {
    std::vector<uint8_t> head;
    head.insert(head.end(), {'G', 'G', 'U', 'F'});
    append_le(head, 3, 4);
    append_le(head, tensors_.size(), 8);
    append_le(head, n_kv_, 8);
    sink(head.data(), head.size());
    sink(kv_bytes_.data(), kv_bytes_.size());
    uint64_t pos = head.size() + kv_bytes_.size();

    std::vector<uint8_t> infos;
    uint64_t offset = 0;
    for (const Tensor & t : tensors_) {
        append_le(infos, t.name.size(), 8);
        infos.insert(infos.end(), t.name.begin(), t.name.end());
        append_le(infos, t.ne.size(), 4);
        for (int64_t n : t.ne) append_le(infos, static_cast<uint64_t>(n), 8);
        append_le(infos, static_cast<uint32_t>(t.type), 4);
        append_le(infos, offset, 8);
        offset = pad_to(offset + t.bytes().size(), alignment_);
    }
    pos += infos.size();
    infos.resize(infos.size() + (pad_to(pos, alignment_) - pos), 0);
    sink(infos.data(), infos.size());

    const std::vector<uint8_t> zeros(alignment_, 0);
    for (const Tensor & t : tensors_) {
        std::span<const uint8_t> b = t.bytes();
        if (!b.empty()) sink(b.data(), b.size());
        sink(zeros.data(), pad_to(b.size(), alignment_) - b.size());
    }
}

std::vector<uint8_t> GgufWriter::to_bytes() const {
    std::vector<uint8_t> out;
    VectorSink sink{out};
    write_to(sink);
    return out;
}

void GgufWriter::write_file(const std::filesystem::path & path) const {
    const std::filesystem::path tmp = path.string() + ".tmp";
    const std::string name = path.string();
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) throw Error(name + ": cannot open " + tmp.string() + " for writing");
        FileSink sink{out, name};
        try {
            write_to(sink);
            out.close();
            if (!out) throw Error(name + ": write failed");
        } catch (...) {
            out.close();
            std::error_code ec;
            std::filesystem::remove(tmp, ec);
            throw;
        }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw Error(name + ": cannot rename " + tmp.string() + ": " + ec.message());
}

} // namespace moesh
