#include "runtime/gguf.h"

#include "runtime/error.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <type_traits>

namespace moesh {

namespace {

struct TypeEntry {
    GgmlType type;
    GgmlTypeTraits traits;
};

constexpr uint32_t k_qk_k = 256;

// Block sizes and bytes from gguf-py 0.19's GGML_QUANT_SIZES.
const std::vector<TypeEntry> & type_table() {
    static const std::vector<TypeEntry> table = {
        {GgmlType::F32, {"F32", 1, 4}},
        {GgmlType::F16, {"F16", 1, 2}},
        {GgmlType::Q4_0, {"Q4_0", 32, 2 + 16}},
        {GgmlType::Q4_1, {"Q4_1", 32, 2 + 2 + 16}},
        {GgmlType::Q5_0, {"Q5_0", 32, 2 + 4 + 16}},
        {GgmlType::Q5_1, {"Q5_1", 32, 2 + 2 + 4 + 16}},
        {GgmlType::Q8_0, {"Q8_0", 32, 2 + 32}},
        {GgmlType::Q8_1, {"Q8_1", 32, 4 + 4 + 32}},
        {GgmlType::Q2_K, {"Q2_K", k_qk_k, 2 + 2 + k_qk_k / 16 + k_qk_k / 4}},
        {GgmlType::Q3_K, {"Q3_K", k_qk_k, 2 + k_qk_k / 4 + k_qk_k / 8 + 12}},
        {GgmlType::Q4_K, {"Q4_K", k_qk_k, 2 + 2 + k_qk_k / 2 + 12}},
        {GgmlType::Q5_K, {"Q5_K", k_qk_k, 2 + 2 + k_qk_k / 2 + k_qk_k / 8 + 12}},
        {GgmlType::Q6_K, {"Q6_K", k_qk_k, 2 + k_qk_k / 2 + k_qk_k / 4 + k_qk_k / 16}},
        {GgmlType::Q8_K, {"Q8_K", k_qk_k, 4 + k_qk_k + k_qk_k / 8}},
        {GgmlType::IQ2_XXS, {"IQ2_XXS", k_qk_k, 2 + k_qk_k / 4}},
        {GgmlType::IQ2_XS, {"IQ2_XS", k_qk_k, 2 + k_qk_k / 4 + k_qk_k / 32}},
        {GgmlType::IQ3_XXS, {"IQ3_XXS", k_qk_k, 2 + k_qk_k / 4 + k_qk_k / 8}},
        {GgmlType::IQ1_S, {"IQ1_S", k_qk_k, 2 + k_qk_k / 8 + k_qk_k / 16}},
        {GgmlType::IQ4_NL, {"IQ4_NL", 32, 2 + 16}},
        {GgmlType::IQ3_S, {"IQ3_S", k_qk_k, 2 + k_qk_k / 4 + k_qk_k / 8 + k_qk_k / 32 + 4}},
        {GgmlType::IQ2_S, {"IQ2_S", k_qk_k, 2 + k_qk_k / 4 + k_qk_k / 16}},
        {GgmlType::IQ4_XS, {"IQ4_XS", k_qk_k, 2 + 2 + k_qk_k / 2 + k_qk_k / 64}},
        {GgmlType::I8, {"I8", 1, 1}},
        {GgmlType::I16, {"I16", 1, 2}},
        {GgmlType::I32, {"I32", 1, 4}},
        {GgmlType::I64, {"I64", 1, 8}},
        {GgmlType::F64, {"F64", 1, 8}},
        {GgmlType::IQ1_M, {"IQ1_M", k_qk_k, k_qk_k / 8 + k_qk_k / 16 + k_qk_k / 32}},
        {GgmlType::BF16, {"BF16", 1, 2}},
        {GgmlType::TQ1_0, {"TQ1_0", k_qk_k, 2 + 4 * 13}},
        {GgmlType::TQ2_0, {"TQ2_0", k_qk_k, 2 + 64}},
        {GgmlType::MXFP4, {"MXFP4", 32, 1 + 16}},
        {GgmlType::NVFP4, {"NVFP4", 64, 4 + 32}},
        {GgmlType::Q1_0, {"Q1_0", 128, 2 + 16}},
    };
    return table;
}

std::string quote(std::string_view s) { return quote_untrusted(s, false); }

uint32_t load_u32(const uint8_t * p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

uint64_t load_u64(const uint8_t * p) { return uint64_t(load_u32(p)) | uint64_t(load_u32(p + 4)) << 32; }

bool known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::F64); }

bool is_power_of_two(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// One scalar element at p (little-endian, unaligned), widened.
GgufValue scalar_at(GgufValueType type, const uint8_t * p) {
    GgufValue v;
    v.type = type;
    switch (type) {
    case GgufValueType::U8: v.u = p[0]; break;
    case GgufValueType::Bool: v.u = p[0]; break;
    case GgufValueType::I8: v.i = static_cast<int8_t>(p[0]); break;
    case GgufValueType::U16: v.u = uint16_t(p[0] | p[1] << 8); break;
    case GgufValueType::I16: v.i = static_cast<int16_t>(uint16_t(p[0] | p[1] << 8)); break;
    case GgufValueType::U32: v.u = load_u32(p); break;
    case GgufValueType::I32: v.i = static_cast<int32_t>(load_u32(p)); break;
    case GgufValueType::U64: v.u = load_u64(p); break;
    case GgufValueType::I64: v.i = static_cast<int64_t>(load_u64(p)); break;
    case GgufValueType::F32: {
        uint32_t bits = load_u32(p);
        float f;
        std::memcpy(&f, &bits, 4);
        v.f = f;
        break;
    }
    case GgufValueType::F64: {
        uint64_t bits = load_u64(p);
        std::memcpy(&v.f, &bits, 8);
        break;
    }
    case GgufValueType::String:
    case GgufValueType::Array: throw std::logic_error("scalar_at: not a scalar type");
    }
    return v;
}

std::string value_string(const GgufValue & v) {
    if (v.is_integer()) {
        bool is_signed = v.type == GgufValueType::I8 || v.type == GgufValueType::I16 || v.type == GgufValueType::I32 ||
                         v.type == GgufValueType::I64;
        return is_signed ? std::to_string(v.i) : std::to_string(v.u);
    }
    if (v.is_float()) return std::to_string(v.f);
    if (v.type == GgufValueType::Bool) return v.u ? "true" : "false";
    if (v.type == GgufValueType::String) return quote(v.str);
    return "array";
}

} // namespace

// ---- types

std::string_view gguf_value_type_name(GgufValueType type) {
    switch (type) {
    case GgufValueType::U8: return "u8";
    case GgufValueType::I8: return "i8";
    case GgufValueType::U16: return "u16";
    case GgufValueType::I16: return "i16";
    case GgufValueType::U32: return "u32";
    case GgufValueType::I32: return "i32";
    case GgufValueType::F32: return "f32";
    case GgufValueType::Bool: return "bool";
    case GgufValueType::String: return "string";
    case GgufValueType::Array: return "array";
    case GgufValueType::U64: return "u64";
    case GgufValueType::I64: return "i64";
    case GgufValueType::F64: return "f64";
    }
    return "?";
}

size_t gguf_value_type_size(GgufValueType type) {
    switch (type) {
    case GgufValueType::U8:
    case GgufValueType::I8:
    case GgufValueType::Bool: return 1;
    case GgufValueType::U16:
    case GgufValueType::I16: return 2;
    case GgufValueType::U32:
    case GgufValueType::I32:
    case GgufValueType::F32: return 4;
    case GgufValueType::U64:
    case GgufValueType::I64:
    case GgufValueType::F64: return 8;
    case GgufValueType::String:
    case GgufValueType::Array: return 0;
    }
    return 0;
}

std::optional<GgmlType> ggml_type_from_id(uint32_t id) {
    for (const TypeEntry & e : type_table())
        if (static_cast<uint32_t>(e.type) == id) return e.type;
    return std::nullopt;
}

const GgmlTypeTraits & ggml_type_traits(GgmlType type) {
    for (const TypeEntry & e : type_table())
        if (e.type == type) return e.traits;
    throw std::logic_error("GgmlType out of range: " + std::to_string(static_cast<uint32_t>(type)));
}

std::string_view ggml_type_name(GgmlType type) { return ggml_type_traits(type).name; }

uint64_t ggml_row_bytes(GgmlType type, int64_t n) {
    const GgmlTypeTraits & t = ggml_type_traits(type);
    if (n < 0 || n % t.block_size != 0)
        throw std::logic_error("ggml_row_bytes: " + std::to_string(n) + " is not a multiple of " +
                               std::string(t.name) + "'s block size");
    return static_cast<uint64_t>(n) / t.block_size * t.block_bytes;
}

const std::vector<GgmlType> & ggml_all_types() {
    static const std::vector<GgmlType> all = [] {
        std::vector<GgmlType> v;
        for (const TypeEntry & e : type_table()) v.push_back(e.type);
        return v;
    }();
    return all;
}

// ---- values

bool GgufValue::is_integer() const {
    switch (type) {
    case GgufValueType::U8:
    case GgufValueType::I8:
    case GgufValueType::U16:
    case GgufValueType::I16:
    case GgufValueType::U32:
    case GgufValueType::I32:
    case GgufValueType::U64:
    case GgufValueType::I64: return true;
    default: return false;
    }
}

GgufValue GgufArray::at(uint64_t i) const {
    if (i >= n_) throw std::out_of_range("GgufArray::at: index " + std::to_string(i) + " of " + std::to_string(n_));
    if (type_ == GgufValueType::String) {
        GgufValue v;
        v.type = type_;
        v.str = strings_[i];
        return v;
    }
    if (type_ == GgufValueType::Array) {
        GgufValue v;
        v.type = type_;
        v.array = arrays_[i];
        return v;
    }
    return scalar_at(type_, raw_ + i * gguf_value_type_size(type_));
}

std::string_view GgufArray::string(uint64_t i) const {
    if (type_ != GgufValueType::String)
        throw std::logic_error("GgufArray::string: array of " + std::string(gguf_value_type_name(type_)));
    if (i >= n_)
        throw std::out_of_range("GgufArray::string: index " + std::to_string(i) + " of " + std::to_string(n_));
    return strings_[i];
}

// ---- tensors

GgufSlice GgufTensor::expert_view(int64_t e) const {
    if (n_dims != 3)
        throw Error("tensor " + quote(name) + ": expected a 3-D merged expert tensor [ne0, ne1, n_expert], got " +
                    std::to_string(n_dims) + "-D " + shape_string());
    if (e < 0 || e >= ne[2])
        throw std::out_of_range("tensor " + quote(name) + ": expert " + std::to_string(e) + " of " +
                                std::to_string(ne[2]));
    // validated at parse time: ne0 is a whole number of blocks and the product fits
    const uint64_t n_slice = row_bytes() * static_cast<uint64_t>(ne[1]);
    return GgufSlice{data + n_slice * static_cast<uint64_t>(e), n_slice};
}

std::string GgufTensor::shape_string() const {
    std::string s = "[";
    for (uint32_t d = 0; d < n_dims && d < 4; ++d) {
        if (d) s += ", ";
        s += std::to_string(ne[d]);
    }
    return s + "]";
}

// ---- parser

class GgufParser {
public:
    GgufParser(const uint8_t * data, size_t size, std::string_view source, GgufContents & out)
        : data_(data), size_(size), out_(out) {
        out_.source_ = std::string(source);
    }

    void run();

private:
    [[noreturn]] void fail(const std::string & what, uint64_t at) const {
        throw Error(out_.source_ + ": " + what + ", at byte offset " + std::to_string(at));
    }
    uint64_t left() const { return size_ - pos_; }
    // `what` describes the field for messages: a string, or a callable that
    // builds one, so that reading a 150k-entry vocabulary builds no strings.
    template <typename What> static std::string describe(const What & what) {
        if constexpr (std::is_invocable_v<What>) return what();
        else return std::string(what);
    }
    template <typename What> void need(uint64_t n, const What & what) const {
        if (n > left())
            fail(describe(what) + " runs past the end of the file (needs " + std::to_string(n) + " bytes, " +
                     std::to_string(left()) + " left)",
                 pos_);
    }
    template <typename What> uint32_t read_u32(const What & what) {
        need(4, what);
        uint32_t v = load_u32(data_ + pos_);
        pos_ += 4;
        return v;
    }
    template <typename What> uint64_t read_u64(const What & what) {
        need(8, what);
        uint64_t v = load_u64(data_ + pos_);
        pos_ += 8;
        return v;
    }
    template <typename What> std::string_view read_string(const What & what, uint64_t max_len);
    GgufValue read_value(GgufValueType type, const std::string & what, uint32_t depth);
    const GgufArray * read_array(const std::string & what, uint32_t depth);
    void read_header();
    void read_kvs(uint64_t n_kv);
    void read_alignment();
    void read_tensor_infos(uint64_t n_tensors);
    void check_tensor_ranges();

    const uint8_t * data_;
    uint64_t size_;
    uint64_t pos_ = 0;
    GgufContents & out_;
};

template <typename What>
std::string_view GgufParser::read_string(const What & what, uint64_t max_len) {
    const uint64_t at = pos_;
    uint64_t n = read_u64([&] { return describe(what) + " length"; });
    if (n > max_len)
        fail(describe(what) + " is " + std::to_string(n) + " bytes long, the limit is " + std::to_string(max_len), at);
    if (n > left())
        fail(describe(what) + " of " + std::to_string(n) + " bytes runs past the end of the file (" + std::to_string(left()) +
                 " bytes left)",
             at);
    std::string_view s(reinterpret_cast<const char *>(data_ + pos_), n);
    pos_ += n;
    return s;
}

GgufValue GgufParser::read_value(GgufValueType type, const std::string & what, uint32_t depth) {
    GgufValue v;
    v.type = type;
    if (type == GgufValueType::String) {
        v.str = read_string(what, std::numeric_limits<uint64_t>::max());
        return v;
    }
    if (type == GgufValueType::Array) {
        v.array = read_array(what, depth + 1);
        return v;
    }
    const size_t n = gguf_value_type_size(type);
    need(n, [&] { return what + " (" + std::string(gguf_value_type_name(type)) + ")"; });
    v = scalar_at(type, data_ + pos_);
    if (type == GgufValueType::Bool && v.u > 1)
        fail(what + ": bool value is " + std::to_string(v.u) + ", expected 0 or 1", pos_);
    pos_ += n;
    return v;
}

const GgufArray * GgufParser::read_array(const std::string & what, uint32_t depth) {
    const uint64_t at = pos_;
    uint32_t elem_id = read_u32([&] { return what + ": array element type"; });
    if (!known_value_type(elem_id)) fail(what + ": unknown array element type " + std::to_string(elem_id), at);
    const auto elem = static_cast<GgufValueType>(elem_id);
    if (elem == GgufValueType::Array && depth >= k_gguf_max_array_depth)
        fail(what + ": arrays nested deeper than " + std::to_string(k_gguf_max_array_depth) + " levels", at);
    const uint64_t count_at = pos_;
    uint64_t n = read_u64([&] { return what + ": array count"; });
    // the least each element takes: a scalar's size, a string's length field, an array's type + count
    uint64_t min_elem = elem == GgufValueType::String ? 8 : elem == GgufValueType::Array ? 12 : gguf_value_type_size(elem);
    if (n > left() / min_elem)
        fail(what + ": array of " + std::to_string(n) + " " + std::string(gguf_value_type_name(elem)) +
                 " elements needs at least " + (n > std::numeric_limits<uint64_t>::max() / min_elem
                                                    ? std::string("2^64")
                                                    : std::to_string(n * min_elem)) +
                 " bytes, " + std::to_string(left()) + " left",
             count_at);

    auto array = std::make_unique<GgufArray>();
    array->type_ = elem;
    array->n_ = n;
    array->raw_ = data_ + pos_;
    if (elem == GgufValueType::String) {
        array->strings_.reserve(n);
        for (uint64_t i = 0; i < n; ++i)
            array->strings_.push_back(read_string([&] { return what + "[" + std::to_string(i) + "]"; },
                                                  std::numeric_limits<uint64_t>::max()));
    } else if (elem == GgufValueType::Array) {
        array->arrays_.reserve(n);
        for (uint64_t i = 0; i < n; ++i) array->arrays_.push_back(read_array(what + "[" + std::to_string(i) + "]", depth + 1));
    } else {
        if (elem == GgufValueType::Bool)
            for (uint64_t i = 0; i < n; ++i)
                if (data_[pos_ + i] > 1)
                    fail(what + "[" + std::to_string(i) + "]: bool value is " + std::to_string(data_[pos_ + i]) +
                             ", expected 0 or 1",
                         pos_ + i);
        pos_ += n * min_elem;
    }
    out_.arrays_.push_back(std::move(array));
    return out_.arrays_.back().get();
}

void GgufParser::read_header() {
    if (size_ < 4) fail("file of " + std::to_string(size_) + " bytes is too short for the GGUF magic", 0);
    if (std::memcmp(data_, "GGUF", 4) != 0)
        fail("not a GGUF file: magic is " + quote(std::string_view(reinterpret_cast<const char *>(data_), 4)) +
                 ", expected 'GGUF'",
             0);
    pos_ = 4;
    uint32_t version = read_u32("version");
    if (version == 1)
        fail("GGUF version 1 is not supported (32-bit counts; re-convert the model with a current llama.cpp)", 4);
    const uint32_t swapped = __builtin_bswap32(version);
    if (swapped == 2 || swapped == 3)
        fail("big-endian GGUF file (version field reads " + std::to_string(version) + ") is not supported", 4);
    if (version != 2 && version != 3)
        fail("unsupported GGUF version " + std::to_string(version) + " (moesh reads versions 2 and 3)", 4);
    out_.version_ = version;
}

void GgufParser::read_kvs(uint64_t n_kv) {
    out_.kvs_.reserve(n_kv);
    for (uint64_t i = 0; i < n_kv; ++i) {
        const uint64_t at = pos_;
        const std::string where = "key-value #" + std::to_string(i);
        std::string_view key = read_string(where + ": key", k_gguf_max_name_bytes);
        if (key.empty()) fail(where + " has an empty key", at);
        const std::string what = "key " + quote(key);
        auto [it, inserted] = out_.kv_index_.emplace(key, out_.kvs_.size());
        if (!inserted)
            fail("duplicate key " + quote(key) + " (first at byte offset " +
                     std::to_string(out_.kvs_[it->second].file_offset) + ")",
                 at);
        const uint64_t type_at = pos_;
        uint32_t type_id = read_u32(what + ": value type");
        if (!known_value_type(type_id)) fail(what + ": unknown value type " + std::to_string(type_id), type_at);
        GgufKv kv;
        kv.key = key;
        kv.file_offset = at;
        kv.value = read_value(static_cast<GgufValueType>(type_id), what, 0);
        out_.kvs_.push_back(kv);
    }
}

void GgufParser::read_alignment() {
    const GgufKv * kv = out_.find("general.alignment");
    if (!kv) return;
    if (kv->value.type != GgufValueType::U32)
        fail("key 'general.alignment' must be u32, got " + std::string(gguf_value_type_name(kv->value.type)),
             kv->file_offset);
    if (!is_power_of_two(kv->value.u))
        fail("key 'general.alignment' is " + std::to_string(kv->value.u) + ", expected a nonzero power of two",
             kv->file_offset);
    out_.alignment_ = static_cast<uint32_t>(kv->value.u);
}

void GgufParser::read_tensor_infos(uint64_t n_tensors) {
    out_.tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
        GgufTensor t;
        t.info_offset = pos_;
        const std::string where = "tensor info #" + std::to_string(i);
        t.name = read_string(where + ": name", k_gguf_max_name_bytes);
        if (t.name.empty()) fail(where + " has an empty name", t.info_offset);
        const std::string what = "tensor " + quote(t.name);
        auto [it, inserted] = out_.tensor_index_.emplace(t.name, out_.tensors_.size());
        if (!inserted)
            fail("duplicate tensor name " + quote(t.name) + " (first at byte offset " +
                     std::to_string(out_.tensors_[it->second].info_offset) + ")",
                 t.info_offset);

        uint64_t field_at = pos_;
        t.n_dims = read_u32(what + ": n_dims");
        if (t.n_dims < 1 || t.n_dims > k_gguf_max_dims)
            fail(what + ": n_dims is " + std::to_string(t.n_dims) + ", expected 1.." + std::to_string(k_gguf_max_dims),
                 field_at);
        int64_t n_elements = 1;
        for (uint32_t d = 0; d < t.n_dims; ++d) {
            field_at = pos_;
            const std::string dim = what + ": ne[" + std::to_string(d) + "]";
            const auto ne = static_cast<int64_t>(read_u64(dim));
            if (ne <= 0) fail(dim + " is " + std::to_string(ne) + ", every dimension must be positive", field_at);
            t.ne[d] = ne;
            if (__builtin_mul_overflow(n_elements, ne, &n_elements))
                fail(what + ": element count of shape " + t.shape_string() + " overflows 64 bits", field_at);
        }

        field_at = pos_;
        uint32_t type_id = read_u32(what + ": ggml type");
        auto type = ggml_type_from_id(type_id);
        if (!type) fail(what + ": unknown ggml type " + std::to_string(type_id), field_at);
        t.type = *type;
        const GgmlTypeTraits & traits = ggml_type_traits(t.type);
        if (t.ne[0] % traits.block_size != 0)
            fail(what + ": ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of " + std::string(traits.name) +
                     "'s block size " + std::to_string(traits.block_size),
                 field_at);
        uint64_t n_bytes = static_cast<uint64_t>(t.ne[0]) / traits.block_size * traits.block_bytes;
        for (uint32_t d = 1; d < 4; ++d)
            if (__builtin_mul_overflow(n_bytes, static_cast<uint64_t>(t.ne[d]), &n_bytes))
                fail(what + ": byte size of shape " + t.shape_string() + " in " + std::string(traits.name) +
                         " overflows 64 bits",
                     field_at);
        t.n_bytes = n_bytes;

        field_at = pos_;
        t.offset = read_u64(what + ": offset");
        if (t.offset % out_.alignment_ != 0)
            fail(what + ": offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                     std::to_string(out_.alignment_),
                 field_at);
        out_.tensors_.push_back(t);
    }
}

void GgufParser::check_tensor_ranges() {
    const uint64_t end_of_infos = pos_;
    const uint64_t align = out_.alignment_;
    out_.data_offset_ = (end_of_infos + align - 1) / align * align;
    if (out_.tensors_.empty()) return;  // no data section needed (llama.cpp accepts such files unpadded)
    if (out_.data_offset_ > size_)
        fail("data section starts at byte " + std::to_string(out_.data_offset_) +
                 " (after the tensor infos, padded to the alignment " + std::to_string(align) +
                 "), past the end of the file (" + std::to_string(size_) + " bytes)",
             end_of_infos);
    const uint64_t n_data = size_ - out_.data_offset_;
    for (GgufTensor & t : out_.tensors_) {
        if (t.offset > n_data || t.n_bytes > n_data - t.offset)
            fail("tensor " + quote(t.name) + ": data at offset " + std::to_string(t.offset) + " (" +
                     std::to_string(t.n_bytes) + " bytes, " + std::string(ggml_type_name(t.type)) + " " +
                     t.shape_string() + ") runs past the end of the data section (" + std::to_string(n_data) +
                     " bytes)",
                 t.info_offset);
        t.data = data_ + out_.data_offset_ + t.offset;
    }
    std::vector<size_t> order(out_.tensors_.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return out_.tensors_[a].offset < out_.tensors_[b].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
        const GgufTensor & prev = out_.tensors_[order[k - 1]];
        const GgufTensor & t = out_.tensors_[order[k]];
        if (t.offset < prev.offset + prev.n_bytes)
            fail("tensor " + quote(t.name) + ": data at offset " + std::to_string(t.offset) + " overlaps tensor " +
                     quote(prev.name) + " at [" + std::to_string(prev.offset) + ", " +
                     std::to_string(prev.offset + prev.n_bytes) + ")",
                 t.info_offset);
    }
}

void GgufParser::run() {
    read_header();
    const uint64_t n_tensors_at = pos_;
    const uint64_t n_tensors = read_u64("n_tensors");
    const uint64_t n_kv_at = pos_;
    const uint64_t n_kv = read_u64("n_kv");
    // Each key-value takes at least a key length and a value type (12 bytes),
    // each tensor info a name length, n_dims, ne[0], type and offset (32):
    // refuse counts the file cannot hold before reserving anything.
    constexpr uint64_t k_min_kv = 8 + 4;
    constexpr uint64_t k_min_tensor = 8 + 4 + 8 + 4 + 8;
    if (n_tensors > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail("n_tensors is " + std::to_string(n_tensors) + " (" + std::to_string(static_cast<int64_t>(n_tensors)) +
                 " as a signed 64-bit count)",
             n_tensors_at);
    if (n_kv > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail("n_kv is " + std::to_string(n_kv) + " (" + std::to_string(static_cast<int64_t>(n_kv)) +
                 " as a signed 64-bit count)",
             n_kv_at);
    if (n_kv > left() / k_min_kv)
        fail("n_kv is " + std::to_string(n_kv) + " but only " + std::to_string(left()) +
                 " bytes follow the header (each key-value needs at least " + std::to_string(k_min_kv) + ")",
             n_kv_at);
    if (n_tensors > (left() - n_kv * k_min_kv) / k_min_tensor)
        fail("n_tensors is " + std::to_string(n_tensors) + " but only " + std::to_string(left()) +
                 " bytes follow the header (each tensor info needs at least " + std::to_string(k_min_tensor) +
                 " besides " + std::to_string(n_kv) + " key-values of at least " + std::to_string(k_min_kv) + ")",
             n_tensors_at);
    read_kvs(n_kv);
    read_alignment();
    read_tensor_infos(n_tensors);
    check_tensor_ranges();
}

GgufContents parse_gguf(const uint8_t * data, size_t size, std::string_view source_name) {
    GgufContents out;
    GgufParser(data, size, source_name, out).run();
    return out;
}

// ---- accessors

const GgufKv * GgufContents::find(std::string_view key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kvs_[it->second];
}

const GgufTensor * GgufContents::find_tensor(std::string_view name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensor & GgufContents::require_tensor(std::string_view name) const {
    if (const GgufTensor * t = find_tensor(name)) return *t;
    throw Error(source_ + ": missing tensor " + quote(name));
}

const GgufKv & GgufContents::require(std::string_view key) const {
    if (const GgufKv * kv = find(key)) return *kv;
    throw Error(source_ + ": missing key " + quote(key));
}

void GgufContents::wrong_type(const GgufKv & kv, std::string_view expected) const {
    std::string actual(gguf_value_type_name(kv.value.type));
    if (kv.value.type == GgufValueType::Array)
        actual += " of " + std::string(gguf_value_type_name(kv.value.array->type()));
    throw Error(source_ + ": key " + quote(kv.key) + " has type " + actual + ", expected " + std::string(expected) +
                ", at byte offset " + std::to_string(kv.file_offset));
}

template <typename T>
T GgufContents::int_of(const GgufKv & kv, std::string_view expected) const {
    if (!kv.value.is_integer()) wrong_type(kv, expected);
    std::optional<T> v = kv.value.template as_int<T>();
    if (!v)
        throw Error(source_ + ": key " + quote(kv.key) + " is " + value_string(kv.value) + " (" +
                    std::string(gguf_value_type_name(kv.value.type)) + "), which does not fit in " +
                    std::string(expected) + ", at byte offset " + std::to_string(kv.file_offset));
    return *v;
}

template <typename T>
T GgufContents::get_int(std::string_view key, std::string_view expected) const {
    return int_of<T>(require(key), expected);
}

uint8_t GgufContents::get_u8(std::string_view key) const { return get_int<uint8_t>(key, "u8"); }
uint32_t GgufContents::get_u32(std::string_view key) const { return get_int<uint32_t>(key, "u32"); }
int32_t GgufContents::get_i32(std::string_view key) const { return get_int<int32_t>(key, "i32"); }
uint64_t GgufContents::get_u64(std::string_view key) const { return get_int<uint64_t>(key, "u64"); }
int64_t GgufContents::get_i64(std::string_view key) const { return get_int<int64_t>(key, "i64"); }

double GgufContents::get_f64(std::string_view key) const {
    const GgufKv & kv = require(key);
    if (!kv.value.is_float()) wrong_type(kv, "f32 or f64");
    return kv.value.f;
}

float GgufContents::get_f32(std::string_view key) const { return static_cast<float>(get_f64(key)); }

bool GgufContents::get_bool(std::string_view key) const {
    const GgufKv & kv = require(key);
    if (kv.value.type != GgufValueType::Bool) wrong_type(kv, "bool");
    return kv.value.u != 0;
}

std::string_view GgufContents::get_string(std::string_view key) const {
    const GgufKv & kv = require(key);
    if (kv.value.type != GgufValueType::String) wrong_type(kv, "string");
    return kv.value.str;
}

const GgufArray & GgufContents::get_array(std::string_view key) const {
    const GgufKv & kv = require(key);
    if (kv.value.type != GgufValueType::Array) wrong_type(kv, "array");
    return *kv.value.array;
}

std::optional<uint32_t> GgufContents::find_u32(std::string_view key) const {
    const GgufKv * kv = find(key);
    if (!kv) return std::nullopt;
    return int_of<uint32_t>(*kv, "u32");
}

std::optional<float> GgufContents::find_f32(std::string_view key) const {
    if (!find(key)) return std::nullopt;
    return get_f32(key);
}

std::optional<std::string_view> GgufContents::find_string(std::string_view key) const {
    if (!find(key)) return std::nullopt;
    return get_string(key);
}

// ---- GgufFile

GgufFile::GgufFile(const std::filesystem::path & path)
    : detail::GgufMapping(path), GgufContents(parse_gguf(file.data(), file.size(), path.string())) {}

} // namespace moesh
