// safetensors parsing and model-folder loading: one malformed file per failure
// mode, built in memory (llama.cpp's test-gguf style), plus valid files built
// here and one written by the reference Python library.
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <random>
#include <string>
#include <unistd.h>

namespace moesh {
namespace {

using json = nlohmann::json;
using Bytes = std::vector<uint8_t>;

// Whole file image: u64 LE header length (n_header overrides it), header, data.
Bytes image(const std::string & header, const Bytes & data = {}, std::optional<uint64_t> n_header = {}) {
    uint64_t n = n_header.value_or(header.size());
    Bytes out;
    out.reserve(8 + header.size() + data.size());
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

struct Spec {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    Bytes bytes;
};

// A valid file as the reference writer lays it out: tensors back to back,
// header padded with spaces to a multiple of 8.
Bytes build(const std::vector<Spec> & specs, const json & metadata = nullptr) {
    json header = json::object();
    if (!metadata.is_null()) header["__metadata__"] = metadata;
    Bytes data;
    for (const Spec & s : specs) {
        header[s.name] = {{"dtype", s.dtype}, {"shape", s.shape}, {"data_offsets", {data.size(), data.size() + s.bytes.size()}}};
        data.insert(data.end(), s.bytes.begin(), s.bytes.end());
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    return image(text, data);
}

template <typename T>
Bytes bytes_of(std::initializer_list<T> values) {
    Bytes out(values.size() * sizeof(T));
    std::memcpy(out.data(), std::data(values), out.size());
    return out;
}

Bytes from_hex(std::string_view hex) {
    Bytes out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
    return out;
}

std::vector<StTensorInfo> parse(const Bytes & file, json * metadata = nullptr) {
    return parse_safetensors(file.data(), file.size(), "bad.safetensors", metadata);
}

// Parsing must fail with a moesh::Error whose message holds every fact given.
void expect_error(const Bytes & file, std::initializer_list<std::string_view> facts) {
    try {
        parse(file);
        FAIL() << "parsed without error; expected a message with '" << *facts.begin() << "'";
    } catch (const Error & e) {
        std::string message = e.what();
        EXPECT_NE(message.find("bad.safetensors: "), std::string::npos) << message;
        for (std::string_view fact : facts) EXPECT_NE(message.find(fact), std::string::npos) << "'" << fact << "' not in: " << message;
    }
}

std::string entry(const std::string & dtype, const std::string & shape, const std::string & offsets) {
    return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

// ---- dtypes

TEST(SafetensorsDtype, NamesRoundTripForEveryDtypeOfTheFormat) {
    for (std::string_view name : {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64", "C64",
                                  "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"}) {
        auto dtype = st_dtype_from_name(name);
        ASSERT_TRUE(dtype.has_value()) << name;
        EXPECT_EQ(st_dtype_name(*dtype), name);
    }
    EXPECT_FALSE(st_dtype_from_name("f32").has_value());
    EXPECT_FALSE(st_dtype_from_name("Q4_0").has_value());
}

TEST(SafetensorsDtype, ElementSizesMatchTheFormat) {
    EXPECT_EQ(st_dtype_size(StDtype::BOOL), 1u);
    EXPECT_EQ(st_dtype_size(StDtype::BF16), 2u);
    EXPECT_EQ(st_dtype_size(StDtype::F32), 4u);
    EXPECT_EQ(st_dtype_size(StDtype::C64), 8u);
    EXPECT_EQ(st_dtype_size(StDtype::F8_E4M3), 1u);
    EXPECT_EQ(st_dtype_bits(StDtype::F4), 4u);
    EXPECT_EQ(st_dtype_bits(StDtype::F6_E3M2), 6u);
    EXPECT_EQ(st_dtype_size(StDtype::F4), 0u);
}

TEST(SafetensorsDtype, MapsOnlyComputeTypesToMoeshDtype) {
    EXPECT_EQ(st_dtype_to_moesh(StDtype::F32), MOESH_DTYPE_F32);
    EXPECT_EQ(st_dtype_to_moesh(StDtype::F16), MOESH_DTYPE_F16);
    EXPECT_EQ(st_dtype_to_moesh(StDtype::BF16), MOESH_DTYPE_BF16);
    EXPECT_FALSE(st_dtype_to_moesh(StDtype::I64).has_value());
    EXPECT_FALSE(st_dtype_to_moesh(StDtype::F8_E4M3).has_value());
}

// ---- valid files

TEST(SafetensorsParse, ReadsFileWrittenByTheReferenceLibrary) {
    // safetensors.torch.save({"w.bf16": bf16 [[1, -2, 0.5]], "w.f16": f16 [1, -2],
    //   "w.f32": f32 [[1.5, 2.5], [-3, 0]], "ids": i64 [7]}, metadata={"format": "pt"})
    const Bytes file = from_hex(
        "10010000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c22696473223a7b226474797065223a22"
        "493634222c227368617065223a5b315d2c22646174615f6f666673657473223a5b302c385d7d2c22772e663332223a7b226474797065223a"
        "22463332222c227368617065223a5b322c325d2c22646174615f6f666673657473223a5b382c32345d7d2c22772e62663136223a7b226474"
        "797065223a2242463136222c227368617065223a5b312c335d2c22646174615f6f666673657473223a5b32342c33305d7d2c22772e663136"
        "223a7b226474797065223a22463136222c227368617065223a5b325d2c22646174615f6f666673657473223a5b33302c33345d7d7d202020"
        "07000000000000000000c03f00002040000040c000000000803f00c0003f003c00c0");
    json metadata;
    auto tensors = parse(file, &metadata);
    ASSERT_EQ(tensors.size(), 4u);
    EXPECT_EQ(metadata, json({{"format", "pt"}}));
    // file order
    EXPECT_EQ(tensors[0].name, "ids");
    EXPECT_EQ(tensors[1].name, "w.f32");
    EXPECT_EQ(tensors[2].name, "w.bf16");
    EXPECT_EQ(tensors[3].name, "w.f16");
    const uint64_t data_begin = 8 + 0x110;
    EXPECT_EQ(tensors[1].dtype, StDtype::F32);
    EXPECT_EQ(tensors[1].shape, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(tensors[1].begin, data_begin + 8);
    EXPECT_EQ(tensors[1].end, data_begin + 24);
    float f32[4];
    std::memcpy(f32, file.data() + tensors[1].begin, sizeof f32);
    EXPECT_EQ(f32[0], 1.5f);
    EXPECT_EQ(f32[2], -3.0f);
    EXPECT_EQ(tensors[2].dtype, StDtype::BF16);
    EXPECT_EQ(tensors[2].n_elements(), 3);
    uint16_t bf16[3];
    std::memcpy(bf16, file.data() + tensors[2].begin, sizeof bf16);
    EXPECT_EQ(bf16[0], 0x3f80); // 1.0
    EXPECT_EQ(bf16[1], 0xc000); // -2.0
    uint16_t f16[2];
    std::memcpy(f16, file.data() + tensors[3].begin, sizeof f16);
    EXPECT_EQ(f16[0], 0x3c00); // 1.0
    EXPECT_EQ(f16[1], 0xc000); // -2.0
}

TEST(SafetensorsParse, ParsesValidFileWithF32F16Bf16Tensors) {
    const Bytes f32 = bytes_of<float>({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f});
    const Bytes f16 = bytes_of<uint16_t>({0x3c00, 0xc000});
    const Bytes bf16 = bytes_of<uint16_t>({0x3f80, 0x4000, 0x4040});
    json metadata;
    auto tensors = parse(build({{"a.f32", "F32", {2, 3}, f32}, {"b.f16", "F16", {2}, f16}, {"c.bf16", "BF16", {3, 1}, bf16}},
                               {{"format", "pt"}, {"note", "x"}}),
                         &metadata);
    ASSERT_EQ(tensors.size(), 3u);
    EXPECT_EQ(metadata["note"], "x");
    EXPECT_EQ(tensors[0].name, "a.f32");
    EXPECT_EQ(tensors[0].n_bytes(), 24u);
    EXPECT_EQ(tensors[0].n_elements(), 6);
    EXPECT_EQ(tensors[1].dtype, StDtype::F16);
    EXPECT_EQ(tensors[2].dtype, StDtype::BF16);
    EXPECT_EQ(tensors[2].shape, (std::vector<int64_t>{3, 1}));
    EXPECT_EQ(tensors[1].begin, tensors[0].end);
}

TEST(SafetensorsParse, AcceptsScalarEmptyAndSubByteTensors) {
    auto tensors = parse(build({{"scalar", "F32", {}, bytes_of<float>({7.0f})},
                                {"empty", "F32", {0, 4096}, {}},
                                {"huge_but_empty", "BF16", {int64_t(1) << 62, int64_t(1) << 62, 0}, {}},
                                {"fp4", "F4", {2, 3}, Bytes(3)},
                                {"fp6", "F6_E2M3", {4}, Bytes(3)},
                                {"fp8", "F8_E4M3", {5}, Bytes(5)}}));
    ASSERT_EQ(tensors.size(), 6u);
    for (const auto & t : tensors) {
        if (t.name == "scalar") {
            EXPECT_TRUE(t.shape.empty());
            EXPECT_EQ(t.n_elements(), 1);
            EXPECT_EQ(t.n_bytes(), 4u);
        }
        if (t.name == "huge_but_empty") {
            EXPECT_EQ(t.n_elements(), 0);
        }
    }
}

TEST(SafetensorsParse, AcceptsFileWithNoTensors) {
    json metadata;
    EXPECT_TRUE(parse(image("{}      "), &metadata).empty());
    EXPECT_TRUE(metadata.is_object() && metadata.empty());
}

TEST(SafetensorsParse, AcceptsNullMetadataAsAbsent) {
    json metadata;
    auto tensors = parse(image(R"({"__metadata__":null,"a":)" + entry("U8", "[1]", "[0,1]") + "}", {9}), &metadata);
    EXPECT_EQ(tensors.size(), 1u);
    EXPECT_TRUE(metadata.empty());
}

TEST(SafetensorsParse, AcceptsTensorsListedOutOfFileOrder) {
    auto tensors = parse(image(R"({"z":)" + entry("U8", "[2]", "[0,2]") + R"(,"a":)" + entry("U8", "[1]", "[2,3]") + "}", {1, 2, 3}));
    ASSERT_EQ(tensors.size(), 2u);
    EXPECT_EQ(tensors[0].name, "z");
    EXPECT_EQ(tensors[1].name, "a");
}

// ---- malformed files, one per failure mode

TEST(SafetensorsParse, RejectsFileTooShortForHeaderLength) {
    expect_error(Bytes{1, 0, 0}, {"3 bytes", "too small"});
    expect_error(Bytes{}, {"0 bytes"});
}

TEST(SafetensorsParse, RejectsZeroHeaderLength) { expect_error(image("", {1, 2, 3}), {"header length is 0"}); }

TEST(SafetensorsParse, RejectsHeaderLengthPastEndOfFile) {
    // a truncated file: the header says 100 bytes, 10 follow
    expect_error(image("{\"a\":1234}", {}, 100), {"header length 100", "past the end of the file", "10 bytes"});
}

TEST(SafetensorsParse, RejectsHugeHeaderLength) {
    expect_error(image("{}", {}, uint64_t(1) << 40), {"header length 1099511627776", "limit of 100000000"});
    expect_error(image("{}", {}, ~uint64_t(0)), {"exceeds the limit"});
}

TEST(SafetensorsParse, RejectsHeaderThatIsNotJson) {
    expect_error(image("{\"a\": nope}"), {"not valid JSON", "near byte 15"});
    // nlohmann alone would stop reading at the NUL and accept the file
    expect_error(image(std::string("{\"a\":{}}\0{", 10)), {"not valid JSON", "NUL byte at byte 16"});
}

TEST(SafetensorsParse, RejectsNumberTooLargeForADouble) {
    // nlohmann reports this as out_of_range, not parse_error
    expect_error(image(R"({"w":)" + entry("U8", "[1e999]", "[0,1]") + "}", Bytes(1)), {"not valid JSON", "number overflow"});
}

TEST(SafetensorsParse, RejectsHeaderThatIsNotAnObject) {
    expect_error(image("[1, 2, 3]"), {"header must be a JSON object", "array"});
}

TEST(SafetensorsParse, RejectsByteOrderMark) {
    expect_error(image("\xEF\xBB\xBF{}"), {"byte order mark"});
}

TEST(SafetensorsParse, RejectsInvalidUtf8InHeader) {
    expect_error(image("{\"a\xff\":1}"), {"not valid JSON", "UTF-8"});
}

TEST(SafetensorsParse, RejectsTensorOffsetPastEndOfFile) {
    expect_error(image(R"({"w":)" + entry("F32", "[4]", "[0,16]") + "}", Bytes(8)),
                 {"tensor 'w'", "data_offsets [0, 16] end past the data section (8 bytes)"});
}

TEST(SafetensorsParse, RejectsOverlappingTensors) {
    expect_error(image(R"({"a":)" + entry("U8", "[4]", "[0,4]") + R"(,"b":)" + entry("U8", "[4]", "[2,6]") + "}", Bytes(6)),
                 {"tensor 'b'", "data_offsets [2, 6] overlap tensor 'a' [0, 4]"});
}

TEST(SafetensorsParse, RejectsEmptyTensorInsideAnother) {
    expect_error(image(R"({"a":)" + entry("U8", "[4]", "[0,4]") + R"(,"e":)" + entry("U8", "[0]", "[2,2]") + "}", Bytes(4)),
                 {"tensor 'e'", "overlap tensor 'a'"});
}

TEST(SafetensorsParse, RejectsHoleBetweenTensors) {
    expect_error(image(R"({"a":)" + entry("U8", "[2]", "[0,2]") + R"(,"b":)" + entry("U8", "[2]", "[4,6]") + "}", Bytes(6)),
                 {"bytes [2, 4] of the data section are not covered", "before tensor 'b'"});
}

TEST(SafetensorsParse, RejectsTrailingBytesAfterLastTensor) {
    expect_error(image(R"({"a":)" + entry("U8", "[2]", "[0,2]") + "}", Bytes(5)),
                 {"last 3 bytes of the data section (5 bytes) are not covered"});
}

TEST(SafetensorsParse, RejectsUnknownDtype) {
    expect_error(image(R"({"w":)" + entry("F128", "[1]", "[0,16]") + "}", Bytes(16)), {"tensor 'w'", "unknown dtype 'F128'"});
}

TEST(SafetensorsParse, RejectsNonStringDtype) {
    expect_error(image(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", Bytes(1)), {"tensor 'w'", "dtype must be a string"});
}

TEST(SafetensorsParse, RejectsByteCountNotMatchingShape) {
    expect_error(image(R"({"w":)" + entry("F32", "[2,2]", "[0,12]") + "}", Bytes(12)),
                 {"tensor 'w'", "data_offsets [0, 12] hold 12 bytes but F32 x shape [2, 2] needs 16"});
}

TEST(SafetensorsParse, RejectsSubByteTensorOfPartialBytes) {
    expect_error(image(R"({"w":)" + entry("F6_E2M3", "[2]", "[0,2]") + "}", Bytes(2)),
                 {"tensor 'w'", "12 bits, not a whole number of bytes"});
}

TEST(SafetensorsParse, RejectsNegativeShapeDimension) {
    expect_error(image(R"({"w":)" + entry("F32", "[-1,4]", "[0,16]") + "}", Bytes(16)), {"tensor 'w'", "non-negative integers", "[-1,4]"});
}

TEST(SafetensorsParse, RejectsNonIntegerShapeDimension) {
    expect_error(image(R"({"w":)" + entry("F32", "[2.0]", "[0,8]") + "}", Bytes(8)), {"tensor 'w'", "non-negative integers"});
    expect_error(image(R"({"w":)" + entry("F32", "[\"2\"]", "[0,8]") + "}", Bytes(8)), {"tensor 'w'", "non-negative integers"});
    expect_error(image(R"({"w":)" + entry("F32", "2", "[0,8]") + "}", Bytes(8)), {"tensor 'w'", "shape must be an array"});
}

TEST(SafetensorsParse, RejectsOverflowingShapeProduct) {
    expect_error(image(R"({"w":)" + entry("F32", "[4294967296,4294967296]", "[0,0]") + "}"),
                 {"tensor 'w'", "shape [4294967296, 4294967296] has too many elements"});
    // fits in 64 bits as elements, not as bytes
    expect_error(image(R"({"w":)" + entry("F64", "[4611686018427387904]", "[0,0]") + "}"), {"tensor 'w'", "overflows"});
    expect_error(image(R"({"w":)" + entry("U8", "[18446744073709551615]", "[0,0]") + "}"), {"tensor 'w'", "too large"});
}

TEST(SafetensorsParse, RejectsRankAboveEight) {
    expect_error(image(R"({"w":)" + entry("U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]") + "}", Bytes(1)), {"tensor 'w'", "rank 9"});
}

TEST(SafetensorsParse, RejectsMissingDataOffsets) {
    expect_error(image(R"({"w":{"dtype":"U8","shape":[1]}})", Bytes(1)), {"tensor 'w'", "missing 'data_offsets'"});
}

TEST(SafetensorsParse, RejectsMissingDtype) {
    expect_error(image(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", Bytes(1)), {"tensor 'w'", "missing 'dtype'"});
}

TEST(SafetensorsParse, RejectsMissingShape) {
    expect_error(image(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", Bytes(1)), {"tensor 'w'", "missing 'shape'"});
}

TEST(SafetensorsParse, RejectsMalformedDataOffsets) {
    expect_error(image(R"({"w":)" + entry("U8", "[1]", "[0,1,1]") + "}", Bytes(1)), {"tensor 'w'", "two non-negative integers", "[0,1,1]"});
    expect_error(image(R"({"w":)" + entry("U8", "[1]", "[-1,0]") + "}", Bytes(1)), {"tensor 'w'", "two non-negative integers"});
    expect_error(image(R"({"w":)" + entry("U8", "[1]", "{}") + "}", Bytes(1)), {"tensor 'w'", "two non-negative integers"});
}

TEST(SafetensorsParse, RejectsBeginAfterEnd) {
    expect_error(image(R"({"w":)" + entry("U8", "[1]", "[2,1]") + "}", Bytes(2)), {"tensor 'w'", "data_offsets [2, 1] begin after end"});
}

TEST(SafetensorsParse, RejectsDuplicateTensorNames) {
    expect_error(image(R"({"w":)" + entry("U8", "[1]", "[0,1]") + R"(,"w":)" + entry("U8", "[1]", "[1,2]") + "}", Bytes(2)),
                 {"tensor 'w' appears twice"});
}

TEST(SafetensorsParse, RejectsDuplicateKeyInTensorEntry) {
    expect_error(image(R"({"w":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", Bytes(1)),
                 {"tensor 'w'", "key 'dtype' appears twice"});
}

TEST(SafetensorsParse, RejectsUnknownKeyInTensorEntry) {
    expect_error(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"offset":0}})", Bytes(1)),
                 {"tensor 'w'", "unknown key 'offset'"});
}

TEST(SafetensorsParse, RejectsTensorEntryThatIsNotAnObject) {
    expect_error(image(R"({"w":[1,2]})"), {"tensor 'w'", "entry must be an object"});
}

TEST(SafetensorsParse, RejectsNonStringMetadata) {
    expect_error(image(R"({"__metadata__":{"n":1}})"), {"__metadata__ key 'n' must be a string"});
    expect_error(image(R"({"__metadata__":"x"})"), {"__metadata__ must be an object of strings"});
}

TEST(SafetensorsParse, EscapesControlCharactersInMessages) {
    try {
        parse(image(R"({"a\nb":)" + entry("X", "[1]", "[0,1]") + "}", Bytes(1)));
        FAIL();
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("tensor 'a\\x0ab'"), std::string::npos) << e.what();
    }
}

// ---- files on disk

using test::TempDir;

// Store errors must name the folder or file and hold every fact given.
void expect_store_error(const std::filesystem::path & folder, std::initializer_list<std::string_view> facts) {
    try {
        TensorStore::open(folder);
        FAIL() << "opened without error; expected a message with '" << *facts.begin() << "'";
    } catch (const Error & e) {
        std::string message = e.what();
        for (std::string_view fact : facts) EXPECT_NE(message.find(fact), std::string::npos) << "'" << fact << "' not in: " << message;
    }
}

const Bytes k_two = bytes_of<float>({1.0f, 2.0f});
const Bytes k_bf16 = bytes_of<uint16_t>({0x3f80, 0xc000, 0x3f00});

TEST(SafetensorsFile, OpensFileAndPointsAtTensorData) {
    TempDir dir;
    auto p = dir.write("x.safetensors", build({{"a", "F32", {2}, k_two}, {"b", "BF16", {3}, k_bf16}}, {{"k", "v"}}));
    SafetensorsFile file(p);
    EXPECT_EQ(file.path(), p);
    ASSERT_EQ(file.tensors().size(), 2u);
    EXPECT_EQ(file.metadata().at("k"), "v");
    const StTensorInfo * b = file.find("b");
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(file.find("c"), nullptr);
    EXPECT_EQ(std::memcmp(file.data(*b), k_bf16.data(), k_bf16.size()), 0);
    SafetensorsFile moved = std::move(file);
    EXPECT_EQ(std::memcmp(moved.data(*moved.find("a")), k_two.data(), k_two.size()), 0);
}

TEST(SafetensorsFile, RejectsEmptyFileNamingThePath) {
    TempDir dir;
    auto p = dir.write("empty.safetensors", Bytes{});
    try {
        SafetensorsFile file(p);
        FAIL();
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find(p.string() + ": file is empty"), std::string::npos) << e.what();
    }
}

TEST(SafetensorsFile, ErrorsNameThePath) {
    TempDir dir;
    auto p = dir.write("bad.safetensors", image("{\"w\":" + entry("F32", "[4]", "[0,16]") + "}", Bytes(8)));
    try {
        SafetensorsFile file(p);
        FAIL();
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find(p.string() + ": tensor 'w'"), std::string::npos) << e.what();
    }
}

TEST(TensorStore, OpensSingleModelSafetensors) {
    TempDir dir;
    dir.write("model.safetensors", build({{"w.f32", "F32", {2}, k_two}, {"w.bf16", "BF16", {1, 3}, k_bf16}}));
    dir.write("other.safetensors", Bytes{1, 2, 3}); // ignored: model.safetensors wins
    TensorStore store = TensorStore::open(dir.path());
    EXPECT_EQ(store.names(), (std::vector<std::string_view>{"w.bf16", "w.f32"}));
    EXPECT_EQ(store.total_bytes(), 8u + 6u);
    const StTensor & w = store.require("w.bf16", "test");
    EXPECT_EQ(w.info.dtype, StDtype::BF16);
    EXPECT_EQ(w.file, dir.path() / "model.safetensors");
    EXPECT_EQ(std::memcmp(w.data, k_bf16.data(), k_bf16.size()), 0);
    EXPECT_EQ(store.find("nope"), nullptr);
}

TEST(TensorStore, OpensShardsListedInIndex) {
    TempDir dir;
    dir.write("model-00001-of-00002.safetensors", build({{"a", "F32", {2}, k_two}, {"b", "F16", {1}, bytes_of<uint16_t>({0x3c00})}}));
    dir.write("model-00002-of-00002.safetensors", build({{"c", "BF16", {3}, k_bf16}}));
    dir.write("model.safetensors.index.json", R"({"metadata": {"total_size": 16}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}})");
    TensorStore store = TensorStore::open(dir.path());
    ASSERT_EQ(store.files().size(), 2u);
    EXPECT_EQ(store.names(), (std::vector<std::string_view>{"a", "b", "c"}));
    EXPECT_EQ(store.require("c", "x").file.filename(), "model-00002-of-00002.safetensors");
    EXPECT_EQ(std::memcmp(store.require("c", "x").data, k_bf16.data(), k_bf16.size()), 0);
    EXPECT_EQ(store.total_bytes(), 8u + 2u + 6u);
}

TEST(TensorStore, OpensAllSafetensorsFilesWithoutIndex) {
    TempDir dir;
    dir.write("b.safetensors", build({{"y", "F32", {2}, k_two}}));
    dir.write("a.safetensors", build({{"x", "BF16", {3}, k_bf16}}));
    dir.write(".hidden.safetensors", Bytes{0}); // dot-files are skipped
    dir.write("notes.txt", "not weights");
    TensorStore store = TensorStore::open(dir.path());
    ASSERT_EQ(store.files().size(), 2u);
    EXPECT_EQ(store.files()[0].path().filename(), "a.safetensors");
    EXPECT_EQ(store.names(), (std::vector<std::string_view>{"x", "y"}));
}

TEST(TensorStore, TensorPointersSurviveMove) {
    TempDir dir;
    dir.write("model.safetensors", build({{"a", "F32", {2}, k_two}}));
    TensorStore store = TensorStore::open(dir.path());
    const StTensor * a = store.find("a");
    TensorStore moved = std::move(store);
    EXPECT_EQ(moved.find("a"), a);
    EXPECT_EQ(std::memcmp(a->data, k_two.data(), k_two.size()), 0);
}

TEST(TensorStore, RequireNamesFolderTensorAndPurpose) {
    TempDir dir;
    dir.write("model.safetensors", build({{"a", "F32", {2}, k_two}}));
    TensorStore store = TensorStore::open(dir.path());
    try {
        store.require("model.norm.weight", "the final norm");
        FAIL();
    } catch (const Error & e) {
        EXPECT_EQ(std::string(e.what()), dir.path().string() + ": missing tensor 'model.norm.weight' (needed by the final norm)");
    }
}

TEST(TensorStore, RejectsIndexPointingAtMissingShard) {
    TempDir dir;
    dir.write("model-00001-of-00002.safetensors", build({{"a", "F32", {2}, k_two}}));
    dir.write("model.safetensors.index.json",
              R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors'", "tensor 'b'", "missing"});
}

TEST(TensorStore, RejectsIndexPointingOutsideTheFolder) {
    TempDir dir;
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "../x.safetensors"}})");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "tensor 'a'", "'../x.safetensors'", "not a plain file name"});
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": ".."}})");
    expect_store_error(dir.path(), {"'..'", "not a plain file name"});
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "/etc/passwd"}})");
    expect_store_error(dir.path(), {"'/etc/passwd'", "not a plain file name"});
}

TEST(TensorStore, RejectsIndexTensorMissingFromShard) {
    TempDir dir;
    dir.write("s1.safetensors", build({{"a", "F32", {2}, k_two}}));
    dir.write("s2.safetensors", build({{"c", "F32", {2}, k_two}}));
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "tensor 'b' is mapped to shard 's1.safetensors'", "no such tensor"});
    // in another shard than the map says
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "s2.safetensors", "c": "s2.safetensors"}})");
    dir.write("s2.safetensors", build({{"c", "F32", {2}, k_two}}));
    expect_store_error(dir.path(), {"tensor 'a' is mapped to shard 's2.safetensors'"});
}

TEST(TensorStore, RejectsTensorPresentInTwoShards) {
    TempDir dir;
    dir.write("s1.safetensors", build({{"a", "F32", {2}, k_two}}));
    dir.write("s2.safetensors", build({{"a", "F32", {2}, k_two}, {"b", "F32", {2}, k_two}}));
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
    expect_store_error(dir.path(), {dir.path().string(), "tensor 'a' is in both 's1.safetensors' and 's2.safetensors'"});
}

TEST(TensorStore, RejectsTensorListedTwiceInWeightMap) {
    TempDir dir;
    dir.write("s1.safetensors", build({{"a", "F32", {2}, k_two}}));
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}})");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "tensor 'a' appears twice in weight_map"});
}

TEST(TensorStore, RejectsMalformedIndex) {
    TempDir dir;
    dir.write("model.safetensors.index.json", R"({"metadata": {}})");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "missing 'weight_map'"});
    dir.write("model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
    expect_store_error(dir.path(), {"tensor 'a' maps to 3"});
    dir.write("model.safetensors.index.json", R"({"weight_map": )");
    expect_store_error(dir.path(), {"model.safetensors.index.json", "not valid JSON"});
}

TEST(TensorStore, RejectsDuplicateTensorAcrossFilesWithoutIndex) {
    TempDir dir;
    dir.write("a.safetensors", build({{"w", "F32", {2}, k_two}}));
    dir.write("b.safetensors", build({{"w", "F32", {2}, k_two}}));
    expect_store_error(dir.path(), {"tensor 'w' is in both 'a.safetensors' and 'b.safetensors'"});
}

TEST(TensorStore, RejectsBadShardNamingTheShard) {
    TempDir dir;
    auto p = dir.write("model.safetensors", image("{\"w\":" + entry("F32", "[4]", "[0,16]") + "}", Bytes(8)));
    expect_store_error(dir.path(), {p.string() + ": tensor 'w'", "end past the data section"});
}

TEST(TensorStore, RejectsFolderWithoutWeights) {
    TempDir dir;
    dir.write("config.json", "{}");
    expect_store_error(dir.path(), {dir.path().string(), "no model.safetensors"});
}

TEST(TensorStore, RejectsMissingFolder) {
    TempDir dir;
    expect_store_error(dir.path() / "nope", {"nope: model folder does not exist"});
    auto file = dir.write("file", "x");
    expect_store_error(file, {"not a directory"});
}

} // namespace
} // namespace moesh
