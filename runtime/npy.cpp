#include "runtime/npy.h"

#include "runtime/error.h"
#include "runtime/mapped_file.h"

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

namespace moesh {

namespace {

constexpr char k_magic[] = "\x93NUMPY";
constexpr size_t k_magic_size = 6;
constexpr size_t k_align = 64; // numpy's ARRAY_ALIGN

std::string shape_tuple(const std::vector<int64_t> & shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    if (shape.size() == 1) s += ",";
    return s + ")";
}

void put_floats_le(uint8_t * out, const float * data, size_t n) {
    if constexpr (std::endian::native == std::endian::little) {
        if (n) std::memcpy(out, data, n * sizeof(float));
    } else {
        for (size_t i = 0; i < n; ++i) {
            uint32_t bits = std::bit_cast<uint32_t>(data[i]);
            for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<uint8_t>(bits >> (8 * b));
        }
    }
}

void get_floats_le(float * out, const uint8_t * data, size_t n) {
    if constexpr (std::endian::native == std::endian::little) {
        if (n) std::memcpy(out, data, n * sizeof(float));
    } else {
        for (size_t i = 0; i < n; ++i) {
            uint32_t bits = 0;
            for (int b = 3; b >= 0; --b) bits = (bits << 8) | data[4 * i + b];
            out[i] = std::bit_cast<float>(bits);
        }
    }
}

// The header is a Python dict literal, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// This reads exactly the literals numpy writes there: quoted strings,
// True/False and tuples of non-negative integers.
class HeaderParser {
public:
    HeaderParser(std::string_view text, std::string source) : s_(text), source_(std::move(source)) {}

    [[noreturn]] void fail(const std::string & what) const {
        std::string shown(s_.substr(0, 120));
        for (char & c : shown)
            if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
        throw Error(source_ + ": bad .npy header: " + what + " at character " + std::to_string(pos_) +
                    " of \"" + shown + (s_.size() > 120 ? "..." : "") + "\"");
    }

    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }
    bool eat(char c) {
        skip_ws();
        if (pos_ < s_.size() && s_[pos_] == c) {
            ++pos_;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!eat(c)) fail(std::string("expected '") + c + "'");
    }
    bool at_end() {
        skip_ws();
        return pos_ == s_.size();
    }

    std::string string_literal() {
        skip_ws();
        if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) fail("expected a quoted string");
        char quote = s_[pos_++];
        size_t start = pos_;
        while (pos_ < s_.size() && s_[pos_] != quote) {
            if (s_[pos_] == '\\' || s_[pos_] == '\n') fail("unsupported character in string");
            ++pos_;
        }
        if (pos_ >= s_.size()) fail("unterminated string");
        return std::string(s_.substr(start, pos_++ - start));
    }

    bool bool_literal() {
        skip_ws();
        if (s_.substr(pos_, 4) == "True") {
            pos_ += 4;
            return true;
        }
        if (s_.substr(pos_, 5) == "False") {
            pos_ += 5;
            return false;
        }
        fail("expected True or False");
    }

    std::vector<int64_t> shape_tuple() {
        std::vector<int64_t> shape;
        expect('(');
        if (eat(')')) return shape;
        for (;;) {
            skip_ws();
            if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') fail("expected a non-negative integer");
            uint64_t v = 0;
            while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
                uint64_t digit = static_cast<uint64_t>(s_[pos_++] - '0');
                if (v > (static_cast<uint64_t>(INT64_MAX) - digit) / 10) fail("dimension too large");
                v = v * 10 + digit;
            }
            if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_; // Python 2 numpy wrote longs as 3L
            shape.push_back(static_cast<int64_t>(v));
            if (shape.size() > 64) fail("too many dimensions");
            if (eat(')')) {
                if (shape.size() == 1) fail("a 1-element tuple needs a trailing comma");
                return shape;
            }
            expect(',');
            if (eat(')')) return shape;
        }
    }

private:
    std::string_view s_;
    std::string source_;
    size_t pos_ = 0;
};

} // namespace

std::vector<uint8_t> encode_npy_f32(const float * data, const std::vector<int64_t> & shape) {
    uint64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) throw Error("encode_npy_f32: negative dimension in shape " + shape_tuple(shape));
        if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n) || n > SIZE_MAX / sizeof(float))
            throw Error("encode_npy_f32: shape " + shape_tuple(shape) + " is too large");
    }
    if (n > 0 && !data) throw Error("encode_npy_f32: no data for shape " + shape_tuple(shape));

    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_tuple(shape) + ", }";
    auto padding = [&](size_t prefix) { return (k_align - (prefix + header.size() + 1) % k_align) % k_align; };
    // Version 1.0 has a u16 header length; 2.0 a u32 one.
    const bool v2 = header.size() + padding(10) + 1 > 65535;
    const size_t prefix = v2 ? 12 : 10;
    header.append(padding(prefix), ' ');
    header += '\n';

    std::vector<uint8_t> out(prefix + header.size() + n * sizeof(float));
    std::memcpy(out.data(), k_magic, k_magic_size);
    out[6] = v2 ? 2 : 1;
    out[7] = 0;
    uint64_t header_len = header.size();
    for (size_t b = 0; b < (v2 ? 4u : 2u); ++b) out[8 + b] = static_cast<uint8_t>(header_len >> (8 * b));
    std::memcpy(out.data() + prefix, header.data(), header.size());
    put_floats_le(out.data() + prefix + header.size(), data, n);
    return out;
}

void write_npy_f32(const std::filesystem::path & path, const float * data, std::vector<int64_t> shape) {
    std::vector<uint8_t> bytes = encode_npy_f32(data, shape);
    std::FILE * f = std::fopen(path.c_str(), "wb");
    if (!f) throw Error(path.string() + ": cannot create: " + std::strerror(errno));
    size_t written = std::fwrite(bytes.data(), 1, bytes.size(), f);
    int write_errno = errno;
    if (std::fclose(f) != 0 || written != bytes.size())
        throw Error(path.string() + ": cannot write: " + std::strerror(written != bytes.size() ? write_errno : errno));
}

NpyArray parse_npy_f32(const uint8_t * data, size_t size, std::string_view source_name) {
    const std::string source(source_name);
    if (size < k_magic_size + 4 || std::memcmp(data, k_magic, k_magic_size) != 0)
        throw Error(source + ": not a .npy file (no \\x93NUMPY magic)");
    const uint8_t major = data[6], minor = data[7];
    if (major < 1 || major > 3 || minor != 0)
        throw Error(source + ": unsupported .npy format version " + std::to_string(major) + "." +
                    std::to_string(minor) + " (1.0, 2.0 and 3.0 are read)");
    size_t prefix = major == 1 ? 10 : 12;
    if (size < prefix) throw Error(source + ": truncated .npy header");
    uint64_t header_len = 0;
    for (size_t b = prefix - 8; b-- > 0;) header_len = (header_len << 8) | data[8 + b];
    if (header_len > size - prefix)
        throw Error(source + ": .npy header length " + std::to_string(header_len) + " runs past the end of the file (" +
                    std::to_string(size) + " bytes)");

    std::string_view text(reinterpret_cast<const char *>(data + prefix), header_len);
    HeaderParser p(text, source);
    std::optional<std::string> descr;
    std::optional<bool> fortran_order;
    std::optional<std::vector<int64_t>> shape;
    p.expect('{');
    while (!p.eat('}')) {
        std::string key = p.string_literal();
        p.expect(':');
        if (key == "descr" && !descr) {
            descr = p.string_literal();
        } else if (key == "fortran_order" && !fortran_order) {
            fortran_order = p.bool_literal();
        } else if (key == "shape" && !shape) {
            shape = p.shape_tuple();
        } else {
            p.fail("unexpected or repeated key '" + key + "'");
        }
        if (!p.eat(',')) {
            p.expect('}');
            break;
        }
    }
    if (!p.at_end()) p.fail("unexpected text after the dict");
    if (!descr || !fortran_order || !shape) p.fail("the dict needs the keys descr, fortran_order and shape");
    if (*descr != "<f4")
        throw Error(source + ": .npy dtype '" + *descr + "' is not supported, expected '<f4' (float32, "
                    "little-endian; save with arr.astype('<f4'))");
    if (*fortran_order)
        throw Error(source + ": .npy array is in Fortran order; save a C-ordered array (np.ascontiguousarray)");

    uint64_t n = 1;
    for (int64_t d : *shape)
        if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n))
            throw Error(source + ": .npy shape " + shape_tuple(*shape) + " is too large");
    const uint64_t data_offset = prefix + header_len;
    const uint64_t n_data = size - data_offset;
    if (n > n_data / sizeof(float) || n * sizeof(float) != n_data)
        throw Error(source + ": .npy shape " + shape_tuple(*shape) + " of float32 needs " +
                    (n > UINT64_MAX / sizeof(float) ? std::string("more") : std::to_string(n * sizeof(float))) +
                    " bytes of data, the file has " + std::to_string(n_data));

    NpyArray out;
    out.shape = std::move(*shape);
    out.data.resize(static_cast<size_t>(n));
    get_floats_le(out.data.data(), data + data_offset, static_cast<size_t>(n));
    return out;
}

NpyArray read_npy_f32(const std::filesystem::path & path) {
    MappedFile file(path);
    return parse_npy_f32(file.data(), file.size(), path.string());
}

} // namespace moesh
