// .npy reading against files written by numpy itself (bytes embedded below,
// from numpy 2.4 np.save / np.lib.format.write_array), and writing.
#include "runtime/error.h"
#include "runtime/npy.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <unistd.h>

namespace moesh {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes from_hex(std::string_view hex) {
    Bytes out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
    return out;
}

// np.save(f, np.arange(6, dtype='<f4').reshape(2, 3) * np.float32(0.5) - 1)
const char * const k_v1_2x3 =
    "934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c73652c202773686170"
    "65273a2028322c2033292c207d20202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a000080bf000000bf000000000000003f0000803f0000c03f";
// write_array(f, np.array([1.5, -2.25, 3e-8], dtype='<f4'), version=(2, 0))
const char * const k_v2_3 =
    "934e554d50590200740000007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c73652c20277368"
    "617065273a2028332c292c207d20202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a0000c03f000010c059d90033";
// write_array(f, np.array(7.0, dtype='<f4'), version=(3, 0))
const char * const k_v3_scalar =
    "934e554d50590300740000007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c73652c20277368"
    "617065273a2028292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a0000e040";
// np.save(f, np.zeros((0, 4), dtype='<f4'))
const char * const k_v1_empty =
    "934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c73652c202773686170"
    "65273a2028302c2034292c207d20202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a";

NpyArray parse(const Bytes & b) { return parse_npy_f32(b.data(), b.size(), "ref.npy"); }

// A v1 file with the given header dict text (padded as numpy does) and data.
Bytes npy_image(const std::string & dict, const Bytes & data, uint8_t major = 1) {
    std::string header = dict;
    size_t prefix = major == 1 ? 10 : 12;
    header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
    header += '\n';
    Bytes out = {0x93, 'N', 'U', 'M', 'P', 'Y', major, 0};
    for (size_t b = 0; b < prefix - 8; ++b) out.push_back(static_cast<uint8_t>(header.size() >> (8 * b)));
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

void expect_error(const Bytes & b, std::initializer_list<std::string_view> facts) {
    try {
        parse(b);
        FAIL() << "parsed without error";
    } catch (const Error & e) {
        std::string message = e.what();
        EXPECT_EQ(message.rfind("ref.npy: ", 0), 0u) << message;
        for (std::string_view fact : facts) EXPECT_NE(message.find(fact), std::string::npos) << "'" << fact << "' not in: " << message;
    }
}

TEST(Npy, ReadsFileWrittenByNumpySave) {
    NpyArray a = parse(from_hex(k_v1_2x3));
    EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(a.data, (std::vector<float>{-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f}));
}

TEST(Npy, ReadsVersion2And3Headers) {
    NpyArray a = parse(from_hex(k_v2_3));
    EXPECT_EQ(a.shape, (std::vector<int64_t>{3}));
    EXPECT_EQ(a.data, (std::vector<float>{1.5f, -2.25f, 3e-8f}));
    NpyArray s = parse(from_hex(k_v3_scalar));
    EXPECT_TRUE(s.shape.empty());
    EXPECT_EQ(s.data, (std::vector<float>{7.0f}));
}

TEST(Npy, ReadsEmptyArray) {
    NpyArray a = parse(from_hex(k_v1_empty));
    EXPECT_EQ(a.shape, (std::vector<int64_t>{0, 4}));
    EXPECT_TRUE(a.data.empty());
}

TEST(Npy, ReadsKeysInAnyOrderWithDoubleQuotesAndPython2Longs) {
    NpyArray a = parse(npy_image("{\"shape\": (2L,), \"fortran_order\": False, \"descr\": \"<f4\"}", Bytes(8)));
    EXPECT_EQ(a.shape, (std::vector<int64_t>{2}));
}

TEST(Npy, WritesHeaderPaddedTo64BytesWithNewline) {
    const float v[6] = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
    Bytes b = encode_npy_f32(v, {2, 3});
    ASSERT_GE(b.size(), 10u);
    EXPECT_EQ(std::memcmp(b.data(), "\x93NUMPY\x01\x00", 8), 0);
    size_t header_len = b[8] | (b[9] << 8);
    EXPECT_EQ((10 + header_len) % 64, 0u);
    EXPECT_EQ(b[10 + header_len - 1], '\n');
    std::string header(b.begin() + 10, b.begin() + 10 + header_len);
    EXPECT_EQ(header.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0), 0u) << header;
    EXPECT_EQ(b.size(), 10 + header_len + sizeof v);
    // the data bytes are those numpy wrote for the same array
    Bytes ref = from_hex(k_v1_2x3);
    EXPECT_TRUE(std::equal(b.end() - 24, b.end(), ref.end() - 24));
}

TEST(Npy, WritesOneElementTupleWithTrailingComma) {
    const float v[1] = {2.0f};
    Bytes b = encode_npy_f32(v, {1});
    EXPECT_NE(std::string(b.begin(), b.end()).find("'shape': (1,), }"), std::string::npos);
    Bytes s = encode_npy_f32(v, {});
    EXPECT_NE(std::string(s.begin(), s.end()).find("'shape': (), }"), std::string::npos);
}

TEST(Npy, RoundTripsThroughAFile) {
    static std::atomic<int> counter{0};
    std::random_device rd;
    auto path = std::filesystem::temp_directory_path() /
                ("moesh_npy_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" + std::to_string(rd()) + ".npy");
    std::vector<float> v(3 * 5 * 7);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.25f - 3.0f;
    write_npy_f32(path, v.data(), {3, 5, 7});
    NpyArray a = read_npy_f32(path);
    std::filesystem::remove(path);
    EXPECT_EQ(a.shape, (std::vector<int64_t>{3, 5, 7}));
    EXPECT_EQ(a.data, v);
    EXPECT_EQ(a.n_elements(), 105);
}

TEST(Npy, WriteRejectsNegativeDimensionAndMissingDirectory) {
    const float v[1] = {0};
    EXPECT_THROW(encode_npy_f32(v, {-1}), Error);
    try {
        write_npy_f32("/nonexistent-moesh-dir/x.npy", v, {1});
        FAIL();
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("/nonexistent-moesh-dir/x.npy: cannot create"), std::string::npos) << e.what();
    }
}

TEST(Npy, RejectsMissingMagic) { expect_error(Bytes{'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0, 0}, {"not a .npy file"}); }

TEST(Npy, RejectsUnsupportedVersion) {
    Bytes b = from_hex(k_v1_2x3);
    b[6] = 4;
    expect_error(b, {"format version 4.0"});
}

TEST(Npy, RejectsFloat64) {
    expect_error(npy_image("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", Bytes(16)), {"dtype '<f8'", "'<f4'"});
}

TEST(Npy, RejectsBigEndianFloat32) {
    expect_error(npy_image("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", Bytes(8)), {"dtype '>f4'"});
}

TEST(Npy, RejectsFortranOrder) {
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", Bytes(24)), {"Fortran order"});
}

TEST(Npy, RejectsTruncatedData) {
    Bytes b = from_hex(k_v1_2x3);
    b.pop_back();
    expect_error(b, {"shape (2, 3)", "needs 24 bytes", "has 23"});
}

TEST(Npy, RejectsTrailingData) {
    Bytes b = from_hex(k_v1_2x3);
    b.push_back(0);
    expect_error(b, {"needs 24 bytes", "has 25"});
}

TEST(Npy, RejectsHeaderLengthPastEndOfFile) {
    Bytes b = from_hex(k_v1_2x3);
    b[8] = 0xff;
    b[9] = 0xff;
    expect_error(b, {"header length 65535 runs past the end"});
}

TEST(Npy, RejectsMalformedHeaderDict) {
    expect_error(npy_image("{'descr': '<f4', 'shape': (2,), }", Bytes(8)), {"needs the keys"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}", Bytes(8)), {"unexpected or repeated key 'extra'"});
    expect_error(npy_image("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", Bytes(8)), {"repeated key 'descr'"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", Bytes(8)), {"non-negative integer"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2), }", Bytes(8)), {"trailing comma"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }", Bytes(8)), {"expected True or False"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } x", Bytes(8)), {"unexpected text after the dict"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", Bytes(8)), {"dimension too large"});
}

TEST(Npy, RejectsOverflowingShape) {
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", Bytes(8)), {"too large"});
    expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", Bytes(8)), {"needs more bytes"});
}

} // namespace
} // namespace moesh
