// GGUF reading and writing: round trips through GgufWriter, a file written by
// the reference `gguf` Python package, and one malformed file per failure
// mode, built byte by byte in memory (llama.cpp's test-gguf style).
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/gguf_writer.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <random>
#include <string>

namespace moesh {
namespace {

using json = nlohmann::json;
using Bytes = std::vector<uint8_t>;

constexpr uint32_t k_string = 8;
constexpr uint32_t k_array = 9;
constexpr uint32_t k_u32 = 4;
constexpr uint32_t k_f32_type = 0;  // ggml type id of F32
constexpr uint32_t k_q8_0_type = 8;

// A GGUF image written field by field, so that any field can be wrong.
struct Raw {
    Bytes b;

    Raw & u8(uint8_t v) { b.push_back(v); return *this; }
    Raw & u32(uint32_t v) { for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i))); return *this; }
    Raw & u64(uint64_t v) { for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i))); return *this; }
    Raw & i64(int64_t v) { return u64(static_cast<uint64_t>(v)); }
    Raw & str(std::string_view s) { u64(s.size()); b.insert(b.end(), s.begin(), s.end()); return *this; }
    Raw & zeros(size_t n) { b.resize(b.size() + n, 0); return *this; }
    Raw & header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
        b.insert(b.end(), {'G', 'G', 'U', 'F'});
        return u32(version).u64(n_tensors).u64(n_kv);
    }
    Raw & kv_u32(std::string_view key, uint32_t v) { return str(key).u32(k_u32).u32(v); }
    Raw & kv_string(std::string_view key, std::string_view v) { return str(key).u32(k_string).str(v); }
    Raw & tensor(std::string_view name, const std::vector<int64_t> & ne, uint32_t type, uint64_t offset) {
        str(name).u32(static_cast<uint32_t>(ne.size()));
        for (int64_t n : ne) i64(n);
        return u32(type).u64(offset);
    }
    Raw & pad(size_t align = 32) { return zeros((align - b.size() % align) % align); }
};

GgufContents parse(const Bytes & file) { return parse_gguf(file.data(), file.size(), "bad.gguf"); }

// Parsing must fail with a moesh::Error naming the file, an offset and every fact given.
void expect_error(const Bytes & file, std::initializer_list<std::string_view> facts) {
    try {
        parse(file);
        FAIL() << "parsed without error; expected a message with '" << *facts.begin() << "'";
    } catch (const Error & e) {
        std::string message = e.what();
        EXPECT_EQ(message.rfind("bad.gguf: ", 0), 0u) << message;
        EXPECT_NE(message.find(", at byte offset "), std::string::npos) << message;
        for (std::string_view fact : facts) EXPECT_NE(message.find(fact), std::string::npos) << "'" << fact << "' not in: " << message;
    }
}

template <typename F> std::string error_of(F && f) {
    try {
        f();
    } catch (const Error & e) {
        return e.what();
    }
    return "(no error)";
}

Bytes random_bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    Bytes out(n);
    for (auto & x : out) x = static_cast<uint8_t>(rng());
    return out;
}

// One F32 tensor "w" of 8 elements after one key-value: the smallest file with every section.
Bytes minimal_valid() {
    Raw r;
    r.header(1, 1).kv_string("general.architecture", "llama").tensor("w", {8}, k_f32_type, 0).pad();
    return r.zeros(32).b;
}

// ---- types

TEST(GgmlType, TraitsMatchGgufPackageQuantSizes) {
    struct Expect { GgmlType type; uint32_t id; std::string_view name; uint32_t block; uint32_t bytes; };
    for (const Expect & e : std::initializer_list<Expect>{
             {GgmlType::F32, 0, "F32", 1, 4}, {GgmlType::F16, 1, "F16", 1, 2}, {GgmlType::Q4_0, 2, "Q4_0", 32, 18},
             {GgmlType::Q4_1, 3, "Q4_1", 32, 20}, {GgmlType::Q5_0, 6, "Q5_0", 32, 22}, {GgmlType::Q5_1, 7, "Q5_1", 32, 24},
             {GgmlType::Q8_0, 8, "Q8_0", 32, 34}, {GgmlType::Q8_1, 9, "Q8_1", 32, 40}, {GgmlType::Q2_K, 10, "Q2_K", 256, 84},
             {GgmlType::Q3_K, 11, "Q3_K", 256, 110}, {GgmlType::Q4_K, 12, "Q4_K", 256, 144},
             {GgmlType::Q5_K, 13, "Q5_K", 256, 176}, {GgmlType::Q6_K, 14, "Q6_K", 256, 210},
             {GgmlType::Q8_K, 15, "Q8_K", 256, 292}, {GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66},
             {GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74}, {GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98},
             {GgmlType::IQ1_S, 19, "IQ1_S", 256, 50}, {GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18},
             {GgmlType::IQ3_S, 21, "IQ3_S", 256, 110}, {GgmlType::IQ2_S, 22, "IQ2_S", 256, 82},
             {GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136}, {GgmlType::I8, 24, "I8", 1, 1}, {GgmlType::I16, 25, "I16", 1, 2},
             {GgmlType::I32, 26, "I32", 1, 4}, {GgmlType::I64, 27, "I64", 1, 8}, {GgmlType::F64, 28, "F64", 1, 8},
             {GgmlType::IQ1_M, 29, "IQ1_M", 256, 56}, {GgmlType::BF16, 30, "BF16", 1, 2},
             {GgmlType::TQ1_0, 34, "TQ1_0", 256, 54}, {GgmlType::TQ2_0, 35, "TQ2_0", 256, 66},
             {GgmlType::MXFP4, 39, "MXFP4", 32, 17}, {GgmlType::NVFP4, 40, "NVFP4", 64, 36},
             {GgmlType::Q1_0, 41, "Q1_0", 128, 18}}) {
        SCOPED_TRACE(std::string(e.name));
        EXPECT_EQ(static_cast<uint32_t>(e.type), e.id);
        EXPECT_EQ(ggml_type_from_id(e.id), e.type);
        EXPECT_EQ(ggml_type_name(e.type), e.name);
        EXPECT_EQ(ggml_type_traits(e.type).block_size, e.block);
        EXPECT_EQ(ggml_type_traits(e.type).block_bytes, e.bytes);
    }
    EXPECT_EQ(ggml_all_types().size(), 34u);
}

TEST(GgmlType, RemovedAndFutureIdsAreUnknown) {
    for (uint32_t id : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u, 42u, 0xFFFFFFFFu}) EXPECT_FALSE(ggml_type_from_id(id)) << id;
}

TEST(GgmlType, RowBytesCountWholeBlocks) {
    EXPECT_EQ(ggml_row_bytes(GgmlType::Q8_0, 4096), 4096u / 32 * 34);
    EXPECT_EQ(ggml_row_bytes(GgmlType::Q4_K, 2048), 2048u / 256 * 144);
    EXPECT_EQ(ggml_row_bytes(GgmlType::BF16, 3), 6u);
}

TEST(GgufValueTypeNames, NameEveryType) {
    EXPECT_EQ(gguf_value_type_name(GgufValueType::U32), "u32");
    EXPECT_EQ(gguf_value_type_name(GgufValueType::String), "string");
    EXPECT_EQ(gguf_value_type_name(GgufValueType::F64), "f64");
    EXPECT_EQ(gguf_value_type_size(GgufValueType::I16), 2u);
    EXPECT_EQ(gguf_value_type_size(GgufValueType::String), 0u);
}

// ---- writer round trips

TEST(GgufWriter, RoundTripsEveryScalarTypeStringsAndArrays) {
    GgufWriter w;
    w.add_u8("a.u8", 250);
    w.add_i8("a.i8", -7);
    w.add_u16("a.u16", 65000);
    w.add_i16("a.i16", -32000);
    w.add_u32("a.u32", 4000000000u);
    w.add_i32("a.i32", -2000000000);
    w.add_u64("a.u64", 1ull << 63);
    w.add_i64("a.i64", std::numeric_limits<int64_t>::min());
    w.add_f32("a.f32", 0.15625f);
    w.add_f64("a.f64", -1e300);
    w.add_bool("a.bool", true);
    w.add_string("a.string", "h\xc3\xa9llo");
    w.add_string("a.empty_string", "");
    w.add_array<int32_t>("a.i32s", {1, -2, 3});
    w.add_array<float>("a.f32s", {0.5f, -1.5f});
    w.add_array<bool>("a.bools", {true, false});
    w.add_array<uint64_t>("a.empty_u64s", {});
    w.add_string_array("a.strings", {"x", "", "yz"});
    Bytes image = w.to_bytes();
    GgufContents g = parse(image);

    EXPECT_EQ(g.version(), 3u);
    EXPECT_EQ(g.kvs().size(), 18u);
    EXPECT_EQ(g.kvs()[0].key, "a.u8");
    EXPECT_EQ(g.get_u8("a.u8"), 250);
    EXPECT_EQ(g.get_i32("a.i8"), -7);
    EXPECT_EQ(g.get_u32("a.u16"), 65000u);
    EXPECT_EQ(g.get_i32("a.i16"), -32000);
    EXPECT_EQ(g.get_u32("a.u32"), 4000000000u);
    EXPECT_EQ(g.get_i32("a.i32"), -2000000000);
    EXPECT_EQ(g.get_u64("a.u64"), 1ull << 63);
    EXPECT_EQ(g.get_i64("a.i64"), std::numeric_limits<int64_t>::min());
    EXPECT_EQ(g.get_f32("a.f32"), 0.15625f);
    EXPECT_EQ(g.get_f64("a.f64"), -1e300);
    EXPECT_TRUE(g.get_bool("a.bool"));
    EXPECT_EQ(g.get_string("a.string"), "h\xc3\xa9llo");
    EXPECT_EQ(g.get_string("a.empty_string"), "");
    const GgufArray & i32s = g.get_array("a.i32s");
    ASSERT_EQ(i32s.type(), GgufValueType::I32);
    ASSERT_EQ(i32s.size(), 3u);
    EXPECT_EQ(i32s.at(1).i, -2);
    EXPECT_EQ(g.get_array("a.f32s").at(1).f, -1.5);
    EXPECT_EQ(g.get_array("a.bools").at(0).u, 1u);
    EXPECT_EQ(g.get_array("a.empty_u64s").size(), 0u);
    const GgufArray & strings = g.get_array("a.strings");
    ASSERT_EQ(strings.size(), 3u);
    EXPECT_EQ(strings.string(0), "x");
    EXPECT_EQ(strings.string(1), "");
    EXPECT_EQ(strings.string(2), "yz");
    // views into the image, not copies
    const auto * p = reinterpret_cast<const uint8_t *>(strings.string(2).data());
    EXPECT_TRUE(p >= image.data() && p < image.data() + image.size());
    EXPECT_THROW(i32s.at(3), std::out_of_range);
    EXPECT_THROW(i32s.string(0), std::logic_error);
}

TEST(GgufWriter, RoundTripsATensorOfEveryGgmlType) {
    GgufWriter w;
    std::vector<Bytes> data;
    for (GgmlType type : ggml_all_types()) {
        const auto & t = ggml_type_traits(type);
        std::vector<int64_t> ne = {2 * static_cast<int64_t>(t.block_size), 3};
        data.push_back(random_bytes(ggml_row_bytes(type, ne[0]) * 3, static_cast<uint32_t>(type)));
        w.add_tensor("t." + std::string(t.name), type, ne, data.back());
    }
    Bytes image = w.to_bytes();
    EXPECT_EQ(image.size() % 32, 0u);
    GgufContents g = parse(image);
    ASSERT_EQ(g.tensors().size(), ggml_all_types().size());
    for (size_t i = 0; i < g.tensors().size(); ++i) {
        const GgufTensor & t = g.tensors()[i];
        SCOPED_TRACE(std::string(t.name));
        EXPECT_EQ(t.type, ggml_all_types()[i]);
        EXPECT_EQ(t.n_dims, 2u);
        EXPECT_EQ(t.ne[2], 1);
        EXPECT_EQ(t.offset % 32, 0u);
        EXPECT_EQ((g.data_offset() + t.offset) % 32, 0u);
        ASSERT_EQ(t.n_bytes, data[i].size());
        EXPECT_EQ(std::memcmp(t.data, data[i].data(), t.n_bytes), 0);
        EXPECT_EQ(g.find_tensor(t.name), &t);
    }
}

TEST(GgufWriter, HonoursCustomAlignment) {
    GgufWriter w;
    w.add_u32("general.alignment", 256);
    w.add_tensor("a", GgmlType::F32, {3}, random_bytes(12, 1));
    w.add_tensor("b", GgmlType::F16, {5, 2}, random_bytes(20, 2));
    Bytes image = w.to_bytes();
    GgufContents g = parse(image);
    EXPECT_EQ(g.alignment(), 256u);
    EXPECT_EQ(g.data_offset() % 256, 0u);
    EXPECT_EQ(g.tensors()[1].offset, 256u);
    EXPECT_EQ(image.size() % 256, 0u);
}

TEST(GgufWriter, RejectsInvalidInput) {
    GgufWriter w;
    w.add_u32("k", 1);
    EXPECT_NE(error_of([&] { w.add_string("k", "again"); }).find("duplicate key 'k'"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_u32("general.alignment", 48); }).find("power of two"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_u64("general.alignment", 64); }).find("must be u32"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_tensor("q", GgmlType::Q8_0, {33}, Bytes(34)); }).find("block size 32"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_tensor("q", GgmlType::Q8_0, {32, 2}, Bytes(34)); }).find("34 bytes given"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_tensor("q", GgmlType::F32, {}, Bytes()); }).find("0 dimensions"), std::string::npos);
    EXPECT_NE(error_of([&] { w.add_tensor("q", GgmlType::F32, {0}, Bytes()); }).find("not positive"), std::string::npos);
    w.add_tensor("q", GgmlType::F32, {1}, Bytes(4));
    EXPECT_NE(error_of([&] { w.add_tensor("q", GgmlType::F32, {1}, Bytes(4)); }).find("added twice"), std::string::npos);
    // what was refused left nothing behind
    const Bytes image = w.to_bytes();  // the parse result views it
    GgufContents g = parse(image);
    EXPECT_EQ(g.kvs().size(), 1u);
    EXPECT_EQ(g.tensors().size(), 1u);
}

TEST(GgufFile, OpensWrittenFileAndDataSurvivesAMove) {
    test::TempDir dir;
    GgufWriter w;
    w.add_string("general.architecture", "llama");
    Bytes bytes = random_bytes(64 * 34 / 32 * 4, 7);
    w.add_tensor_view("blk.0.ffn_up_exps.weight", GgmlType::Q8_0, {64, 1, 4}, bytes);
    const auto path = dir.path() / "model.gguf";
    w.write_file(path);
    EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp"));

    GgufFile f(path);
    const GgufTensor * t = f.find_tensor("blk.0.ffn_up_exps.weight");
    ASSERT_NE(t, nullptr);
    const uint8_t * data = t->data;
    EXPECT_EQ(data, f.mapping().data() + f.data_offset());
    GgufFile moved = std::move(f);
    EXPECT_EQ(moved.require_tensor("blk.0.ffn_up_exps.weight").data, data);
    EXPECT_EQ(moved.get_string("general.architecture"), "llama");
    EXPECT_EQ(std::memcmp(data, bytes.data(), bytes.size()), 0);
    EXPECT_EQ(moved.path(), path);
}

TEST(GgufFile, ErrorsNameThePath) {
    test::TempDir dir;
    auto path = dir.write("broken.gguf", Bytes{'G', 'G', 'U', 'F', 1, 0, 0, 0});
    std::string message = error_of([&] { GgufFile f(path); });
    EXPECT_NE(message.find(path.string() + ": GGUF version 1"), std::string::npos) << message;
    EXPECT_NE(error_of([&] { GgufFile f(dir.path() / "absent.gguf"); }).find("absent.gguf"), std::string::npos);
}

// ---- the reference package's file

TEST(GgufParse, ReadsFileWrittenByTheGgufPackage) {
    const std::string dir = test::fixtures_dir() + "/gguf";
    json expected = json::parse(std::ifstream(dir + "/tiny_llama_moe.json"));
    GgufFile f(dir + "/tiny_llama_moe.gguf");
    EXPECT_EQ(f.version(), expected["gguf_version"].get<uint32_t>());
    EXPECT_EQ(f.alignment(), expected["alignment"].get<uint32_t>());
    EXPECT_EQ(f.data_offset(), expected["data_offset"].get<uint64_t>());
    EXPECT_EQ(f.mapping().size(), expected["file_size"].get<uint64_t>());

    // typed access as a model loader uses it
    EXPECT_EQ(f.get_string("general.architecture"), "llama");
    EXPECT_EQ(f.get_u32("llama.block_count"), 1u);
    EXPECT_EQ(f.get_u32("llama.embedding_length"), 64u);
    EXPECT_EQ(f.get_u32("llama.expert_count"), 4u);
    EXPECT_EQ(f.get_u32("llama.expert_used_count"), 2u);
    EXPECT_EQ(f.get_f32("llama.rope.freq_base"), 10000.f);
    EXPECT_EQ(f.get_f32("llama.attention.layer_norm_rms_epsilon"), 1e-5f);
    EXPECT_TRUE(f.get_bool("tokenizer.ggml.add_bos_token"));
    EXPECT_EQ(f.get_array("tokenizer.ggml.tokens").string(1), "<s>");

    ASSERT_EQ(f.kvs().size(), expected["kv"].size());
    for (const auto & [key, e] : expected["kv"].items()) {
        SCOPED_TRACE(key);
        const GgufKv * kv = f.find(key);
        ASSERT_NE(kv, nullptr);
        const std::string type = e["type"];
        EXPECT_EQ(gguf_value_type_name(kv->value.type), type);
        if (type == "array") {
            const GgufArray & a = *kv->value.array;
            EXPECT_EQ(gguf_value_type_name(a.type()), e["element_type"].get<std::string>());
            ASSERT_EQ(a.size(), e["count"].get<uint64_t>());
            for (uint64_t i = 0; i < a.size(); ++i) {
                const json & want = e["value"][i];
                GgufValue v = a.at(i);
                if (a.type() == GgufValueType::String) EXPECT_EQ(v.str, want.get<std::string>());
                else if (a.type() == GgufValueType::Bool) EXPECT_EQ(v.u != 0, want.get<bool>());
                else if (v.is_float()) EXPECT_EQ(v.f, want.get<double>());
                else EXPECT_EQ(v.as_int<int64_t>(), want.get<int64_t>());
            }
        } else if (type == "string") {
            EXPECT_EQ(kv->value.str, e["value"].get<std::string>());
        } else if (type == "bool") {
            EXPECT_EQ(kv->value.u != 0, e["value"].get<bool>());
        } else if (type == "f32" || type == "f64") {
            EXPECT_EQ(kv->value.f, e["value"].get<double>());
        } else if (type == "u64") {
            EXPECT_EQ(kv->value.u, e["value"].get<uint64_t>());
        } else {
            EXPECT_EQ(kv->value.as_int<int64_t>(), e["value"].get<int64_t>());
        }
    }

    const json & tensors = expected["tensors"];
    ASSERT_EQ(f.tensors().size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
        const json & e = tensors[i];
        const GgufTensor & t = f.tensors()[i];
        SCOPED_TRACE(std::string(t.name));
        EXPECT_EQ(t.name, e["name"].get<std::string>());
        EXPECT_EQ(ggml_type_name(t.type), e["type"].get<std::string>());
        std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
        EXPECT_EQ(ne, e["ne"].get<std::vector<int64_t>>());
        EXPECT_EQ(t.n_bytes, e["n_bytes"].get<uint64_t>());
        EXPECT_EQ(t.offset, e["offset"].get<uint64_t>());
        EXPECT_EQ(std::accumulate(t.data, t.data + t.n_bytes, uint64_t{0}), e["byte_sum"].get<uint64_t>());
        if (e.contains("expert_byte_sums")) {
            const auto sums = e["expert_byte_sums"].get<std::vector<uint64_t>>();
            ASSERT_EQ(t.ne[2], static_cast<int64_t>(sums.size()));
            for (int64_t x = 0; x < t.ne[2]; ++x) {
                GgufSlice s = t.expert_view(x);
                EXPECT_EQ(s.n_bytes * sums.size(), t.n_bytes);
                EXPECT_EQ(std::accumulate(s.data, s.data + s.n_bytes, uint64_t{0}), sums[x]) << "expert " << x;
            }
        }
    }
    const GgufTensor & gate = f.require_tensor("blk.0.ffn_gate_exps.weight");
    EXPECT_EQ(gate.type, GgmlType::Q8_0);
    EXPECT_EQ(gate.shape_string(), "[64, 32, 4]");
    EXPECT_NE(error_of([&] { f.require_tensor("blk.1.ffn_gate_exps.weight"); }).find("missing tensor 'blk.1.ffn_gate_exps.weight'"),
              std::string::npos);
}

// ---- accessors and expert views

TEST(GgufAccessors, WrongTypeNamesKeyExpectedAndActualType) {
    GgufWriter w;
    w.add_string("llama.block_count", "twelve");
    w.add_array<uint32_t>("llama.arr", {1});
    const Bytes image = w.to_bytes();  // the parse result views it
    GgufContents g = parse(image);
    std::string message = error_of([&] { g.get_u32("llama.block_count"); });
    EXPECT_NE(message.find("bad.gguf: key 'llama.block_count' has type string, expected u32"), std::string::npos) << message;
    EXPECT_NE(message.find("at byte offset 24"), std::string::npos) << message;
    EXPECT_NE(error_of([&] { g.get_string("llama.arr"); }).find("has type array of u32, expected string"), std::string::npos);
    EXPECT_NE(error_of([&] { g.get_f32("llama.arr"); }).find("expected f32 or f64"), std::string::npos);
    EXPECT_NE(error_of([&] { g.get_bool("llama.arr"); }).find("expected bool"), std::string::npos);
    EXPECT_NE(error_of([&] { g.get_array("llama.block_count"); }).find("expected array"), std::string::npos);
}

TEST(GgufAccessors, IntegerGettersAcceptAnyIntegerTypeWhoseValueFits) {
    GgufWriter w;
    w.add_u8("u8", 7);
    w.add_i64("i64", 12);
    w.add_u64("u64", 1ull << 40);
    w.add_i32("neg", -1);
    const Bytes image = w.to_bytes();  // the parse result views it
    GgufContents g = parse(image);
    EXPECT_EQ(g.get_u32("u8"), 7u);
    EXPECT_EQ(g.get_u32("i64"), 12u);
    EXPECT_EQ(g.get_i64("u64"), int64_t{1} << 40);
    EXPECT_EQ(g.get_i32("neg"), -1);
    std::string message = error_of([&] { g.get_u32("u64"); });
    EXPECT_NE(message.find("key 'u64' is 1099511627776 (u64), which does not fit in u32"), std::string::npos) << message;
    EXPECT_NE(error_of([&] { g.get_u64("neg"); }).find("key 'neg' is -1 (i32), which does not fit in u64"), std::string::npos);
    EXPECT_EQ(g.get_u8("i64"), 12);
}

TEST(GgufAccessors, MissingKeyIsNamedAndFindReturnsNothing) {
    const Bytes image = GgufWriter().to_bytes();
    GgufContents g = parse(image);
    EXPECT_EQ(g.find("llama.block_count"), nullptr);
    EXPECT_FALSE(g.find_u32("llama.block_count"));
    EXPECT_FALSE(g.find_f32("x"));
    EXPECT_FALSE(g.find_string("x"));
    EXPECT_EQ(error_of([&] { g.get_u32("llama.block_count"); }), "bad.gguf: missing key 'llama.block_count'");
    EXPECT_EQ(g.find_tensor("w"), nullptr);
}

TEST(GgufAccessors, OptionalGettersStillRejectWrongTypes) {
    GgufWriter w;
    w.add_string("n", "4");
    w.add_f64("f", 0.25);
    w.add_u32("u", 9);
    const Bytes image = w.to_bytes();  // the parse result views it
    GgufContents g = parse(image);
    EXPECT_NE(error_of([&] { g.find_u32("n"); }).find("expected u32"), std::string::npos);
    EXPECT_EQ(g.find_f32("f"), 0.25f);
    EXPECT_EQ(g.find_u32("u"), 9u);
    EXPECT_EQ(g.find_string("n"), "4");
}

TEST(GgufTensor, ExpertViewReturnsContiguousSliceOfMergedExpertTensor) {
    GgufWriter w;
    const int64_t ne0 = 64, ne1 = 3, n_expert = 5;
    Bytes bytes = random_bytes(ggml_row_bytes(GgmlType::Q4_0, ne0) * ne1 * n_expert, 3);
    w.add_tensor("blk.0.ffn_down_exps.weight", GgmlType::Q4_0, {ne0, ne1, n_expert}, bytes);
    Bytes image = w.to_bytes();
    GgufContents g = parse(image);
    const GgufTensor & t = g.require_tensor("blk.0.ffn_down_exps.weight");
    const uint64_t n_slice = ggml_row_bytes(GgmlType::Q4_0, ne0) * ne1;
    for (int64_t e = 0; e < n_expert; ++e) {
        GgufSlice s = t.expert_view(e);
        EXPECT_EQ(s.n_bytes, n_slice);
        EXPECT_EQ(s.data, t.data + e * n_slice);
        EXPECT_EQ(std::memcmp(s.data, bytes.data() + e * n_slice, n_slice), 0);
    }
    EXPECT_THROW(t.expert_view(n_expert), std::out_of_range);
    EXPECT_THROW(t.expert_view(-1), std::out_of_range);
}

TEST(GgufTensor, ExpertViewRejectsTensorThatIsNot3D) {
    GgufWriter w;
    w.add_tensor("blk.0.ffn_gate_inp.weight", GgmlType::F32, {4, 2}, Bytes(32));
    const Bytes image = w.to_bytes();  // the parse result views it
    GgufContents g = parse(image);
    std::string message = error_of([&] { g.tensors()[0].expert_view(0); });
    EXPECT_NE(message.find("tensor 'blk.0.ffn_gate_inp.weight': expected a 3-D merged expert tensor"), std::string::npos)
        << message;
    EXPECT_NE(message.find("got 2-D [4, 2]"), std::string::npos) << message;
}

// ---- valid edge cases

TEST(GgufParse, AcceptsVersion2) {
    Raw r;
    r.header(0, 1, 2).kv_u32("llama.block_count", 2);
    GgufContents g = parse(r.b);
    EXPECT_EQ(g.version(), 2u);
    EXPECT_EQ(g.get_u32("llama.block_count"), 2u);
}

TEST(GgufParse, AcceptsFileWithoutTensorsOrPadding) {
    Raw r;
    r.header(0, 1).kv_string("general.architecture", "llama");
    EXPECT_EQ(parse(r.b).tensors().size(), 0u);
    EXPECT_EQ(parse(Raw().header(0, 0).b).kvs().size(), 0u);
}

TEST(GgufParse, AcceptsArraysNestedTwoDeep) {
    Raw r;
    r.header(0, 1).str("nested").u32(k_array).u32(k_array).u64(2);
    r.u32(k_u32).u64(1).u32(42);
    r.u32(k_string).u64(2).str("a").str("bc");
    GgufContents g = parse(r.b);
    const GgufArray & outer = g.get_array("nested");
    ASSERT_EQ(outer.size(), 2u);
    EXPECT_EQ(outer.type(), GgufValueType::Array);
    EXPECT_EQ(outer.at(0).array->at(0).u, 42u);
    EXPECT_EQ(outer.at(1).array->string(1), "bc");
}

TEST(GgufParse, AcceptsTensorsOutOfOffsetOrderAndTrailingBytes) {
    Raw r;
    r.header(2, 0).tensor("b", {8}, k_f32_type, 32).tensor("a", {8}, k_f32_type, 0).pad().zeros(64 + 5);
    GgufContents g = parse(r.b);
    EXPECT_EQ(g.tensors()[0].name, "b");
    EXPECT_EQ(g.tensors()[0].data, g.tensors()[1].data + 32);
}

// ---- malformed files, one per failure mode

TEST(GgufParse, RejectsBadMagic) {
    Bytes b = minimal_valid();
    b[0] = 'g';
    expect_error(b, {"not a GGUF file: magic is 'gGUF'", "at byte offset 0"});
    expect_error(Bytes{'G', 'G'}, {"too short for the GGUF magic"});
}

TEST(GgufParse, RejectsVersion1ByName) { expect_error(Raw().header(0, 0, 1).b, {"GGUF version 1 is not supported", "offset 4"}); }

TEST(GgufParse, RejectsVersion99) { expect_error(Raw().header(0, 0, 99).b, {"unsupported GGUF version 99"}); }

TEST(GgufParse, RejectsBigEndianFile) { expect_error(Raw().header(0, 0, 0x03000000).b, {"big-endian GGUF file"}); }

TEST(GgufParse, RejectsHugeKvCount) {
    Raw r;
    r.header(0, 1ull << 40).kv_u32("a", 1);
    expect_error(r.b, {"n_kv is 1099511627776", "each key-value needs at least 12", "offset 16"});
}

TEST(GgufParse, RejectsHugeTensorCount) {
    Raw r;
    r.header(1ull << 40, 0).tensor("w", {8}, k_f32_type, 0);
    expect_error(r.b, {"n_tensors is 1099511627776", "each tensor info needs at least 32", "offset 8"});
}

TEST(GgufParse, RejectsTensorCountNegativeAsI64) {
    expect_error(Raw().header(static_cast<uint64_t>(-1), 0).b, {"n_tensors is 18446744073709551615", "-1 as a signed"});
    expect_error(Raw().header(0, static_cast<uint64_t>(-2)).b, {"n_kv is", "-2 as a signed"});
}

TEST(GgufParse, RejectsKvCountLargerThanTheKeyValuesPresent) {
    Raw r;
    r.header(0, 2).kv_u32("a", 1).zeros(7);
    expect_error(r.b, {"key-value #1: key length", "runs past the end"});
}

TEST(GgufParse, RejectsDuplicateKeys) {
    Raw r;
    r.header(0, 2).kv_u32("llama.block_count", 1).kv_string("llama.block_count", "x");
    expect_error(r.b, {"duplicate key 'llama.block_count' (first at byte offset 24)", "at byte offset 57"});
}

TEST(GgufParse, RejectsStringLengthPastEnd) {
    Raw r;
    r.header(0, 1).str("general.name").u32(k_string).u64(1000).zeros(10);
    expect_error(r.b, {"key 'general.name' of 1000 bytes runs past the end of the file (10 bytes left)"});
    Raw k;
    k.header(0, 1).u64(~0ull).zeros(8);
    expect_error(k.b, {"key-value #0: key is 18446744073709551615 bytes long, the limit is 65535"});
}

TEST(GgufParse, RejectsEmptyKey) {
    Raw r;
    r.header(0, 1).kv_u32("", 1);
    expect_error(r.b, {"key-value #0 has an empty key", "at byte offset 24"});
}

TEST(GgufParse, RejectsUnknownValueType) {
    Raw r;
    r.header(0, 1).str("general.x").u32(13).u32(0);
    expect_error(r.b, {"key 'general.x': unknown value type 13"});
    Raw a;
    a.header(0, 1).str("general.x").u32(k_array).u32(77).u64(0);
    expect_error(a.b, {"key 'general.x': unknown array element type 77"});
}

TEST(GgufParse, RejectsBoolOtherThanZeroOrOne) {
    Raw r;
    r.header(0, 1).str("b").u32(7).u8(2);
    expect_error(r.b, {"key 'b': bool value is 2, expected 0 or 1"});
    Raw a;
    a.header(0, 1).str("bs").u32(k_array).u32(7).u64(3).u8(1).u8(0).u8(9);
    expect_error(a.b, {"key 'bs'[2]: bool value is 9"});
}

TEST(GgufParse, RejectsArrayCountOverflow) {
    Raw r;
    r.header(0, 1).str("a").u32(k_array).u32(12).u64(1ull << 61).zeros(64);
    expect_error(r.b, {"key 'a': array of 2305843009213693952 f64 elements needs at least 2^64 bytes"});
}

TEST(GgufParse, RejectsArrayCountPastEnd) {
    Raw r;
    r.header(0, 1).str("tokenizer.ggml.tokens").u32(k_array).u32(k_string).u64(3).str("a").str("b");
    expect_error(r.b, {"key 'tokenizer.ggml.tokens': array of 3 string elements needs at least 24 bytes, 18 left"});
    Raw s;
    s.header(0, 1).str("tokenizer.ggml.tokens").u32(k_array).u32(k_string).u64(3).str("a").str("b").u64(5);
    expect_error(s.b, {"key 'tokenizer.ggml.tokens'[2] of 5 bytes runs past the end"});
}

TEST(GgufParse, RejectsArraysNestedThreeDeep) {
    Raw r;
    r.header(0, 1).str("deep").u32(k_array).u32(k_array).u64(1).u32(k_array).u64(1).u32(k_u32).u64(0);
    expect_error(r.b, {"key 'deep'[0]: arrays nested deeper than 2 levels"});
}

TEST(GgufParse, RejectsAlignmentZero) {
    Raw r;
    r.header(0, 1).kv_u32("general.alignment", 0);
    expect_error(r.b, {"key 'general.alignment' is 0, expected a nonzero power of two"});
}

TEST(GgufParse, RejectsAlignmentNotPowerOfTwo) {
    Raw r;
    r.header(0, 1).kv_u32("general.alignment", 3);
    expect_error(r.b, {"key 'general.alignment' is 3, expected a nonzero power of two"});
}

TEST(GgufParse, RejectsAlignmentNotU32) {
    Raw r;
    r.header(0, 1).str("general.alignment").u32(10).u64(32);
    expect_error(r.b, {"key 'general.alignment' must be u32, got u64"});
}

TEST(GgufParse, RejectsTensorOffsetPastEnd) {
    Raw r;
    r.header(1, 0).tensor("blk.0.attn_q.weight", {8}, k_f32_type, 1024).pad().zeros(32);
    expect_error(r.b, {"tensor 'blk.0.attn_q.weight': data at offset 1024 (32 bytes, F32 [8]) runs past the end of the data section (32 bytes)"});
    Raw h;
    h.header(1, 0).tensor("w", {8}, k_f32_type, ~uint64_t{31}).pad().zeros(32);
    expect_error(h.b, {"tensor 'w': data at offset 18446744073709551584", "runs past the end"});
}

TEST(GgufParse, RejectsTensorSizePastEnd) {
    Raw r;
    r.header(1, 0).tensor("blk.0.ffn_up_exps.weight", {32, 4, 8}, k_q8_0_type, 0).pad().zeros(34 * 32 - 1);
    expect_error(r.b, {"tensor 'blk.0.ffn_up_exps.weight': data at offset 0 (1088 bytes, Q8_0 [32, 4, 8]) runs past the end",
                       "(1087 bytes)"});
}

TEST(GgufParse, RejectsMisalignedTensorOffset) {
    Raw r;
    r.header(1, 0).tensor("w", {8}, k_f32_type, 16).pad().zeros(64);
    expect_error(r.b, {"tensor 'w': offset 16 is not a multiple of the alignment 32"});
}

TEST(GgufParse, RejectsOverlappingTensors) {
    Raw r;
    r.header(2, 0).tensor("a", {16}, k_f32_type, 0).tensor("b", {8}, k_f32_type, 32).pad().zeros(128);
    expect_error(r.b, {"tensor 'b': data at offset 32 overlaps tensor 'a' at [0, 64)"});
}

TEST(GgufParse, RejectsZeroDims) {
    Raw r;
    r.header(1, 0).str("w").u32(0).u32(k_f32_type).u64(0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': n_dims is 0, expected 1..4"});
}

TEST(GgufParse, RejectsFiveDims) {
    Raw r;
    r.header(1, 0).tensor("w", {1, 1, 1, 1, 1}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': n_dims is 5, expected 1..4"});
}

TEST(GgufParse, RejectsZeroDimension) {
    Raw r;
    r.header(1, 0).tensor("w", {8, 0}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': ne[1] is 0, every dimension must be positive"});
}

TEST(GgufParse, RejectsNegativeDimension) {
    Raw r;
    r.header(1, 0).tensor("w", {8, 2, -3}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': ne[2] is -3, every dimension must be positive"});
}

TEST(GgufParse, RejectsElementCountOverflow) {
    Raw r;
    r.header(1, 0).tensor("w", {1ll << 32, 1ll << 32}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': element count of shape [4294967296, 4294967296] overflows 64 bits"});
}

TEST(GgufParse, RejectsByteSizeOverflow) {
    Raw r;
    r.header(1, 0).tensor("w", {1ll << 31, 1ll << 31}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': byte size of shape [2147483648, 2147483648] in F32 overflows 64 bits"});
}

TEST(GgufParse, RejectsNe0NotMultipleOfBlockSize) {
    Raw r;
    r.header(1, 0).tensor("blk.0.attn_k.weight", {48, 2}, k_q8_0_type, 0).pad().zeros(256);
    expect_error(r.b, {"tensor 'blk.0.attn_k.weight': ne[0] = 48 is not a multiple of Q8_0's block size 32"});
}

TEST(GgufParse, RejectsUnknownGgmlType) {
    Raw r;
    r.header(1, 0).tensor("w", {8}, 4, 0).pad().zeros(32);
    expect_error(r.b, {"tensor 'w': unknown ggml type 4"});
}

TEST(GgufParse, RejectsDuplicateTensorNames) {
    Raw r;
    r.header(2, 0).tensor("w", {8}, k_f32_type, 0).tensor("w", {8}, k_f32_type, 32).pad().zeros(64);
    expect_error(r.b, {"duplicate tensor name 'w' (first at byte offset 24)"});
}

TEST(GgufParse, RejectsEmptyTensorName) {
    Raw r;
    r.header(1, 0).tensor("", {8}, k_f32_type, 0).pad().zeros(32);
    expect_error(r.b, {"tensor info #0 has an empty name"});
}

TEST(GgufParse, RejectsDataSectionStartPastEnd) {
    Raw r;
    r.header(1, 0).tensor("w", {8}, k_f32_type, 0);
    expect_error(r.b, {"data section starts at byte 64", "past the end of the file (57 bytes)"});
}

TEST(GgufParse, EscapesControlCharactersInNames) {
    Raw r;
    r.header(0, 1).str(std::string("a\nb\0c", 5)).u32(99);
    expect_error(r.b, {"key 'a\\x0ab\\x00c': unknown value type 99"});
}

TEST(GgufParse, RejectsEveryTruncationOfAValidFile) {
    GgufWriter w;
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.expert_count", 2);
    w.add_array<float>("a", {1.f, 2.f});
    w.add_string_array("tokenizer.ggml.tokens", {"<s>", "b"});
    w.add_tensor("blk.0.ffn_gate_exps.weight", GgmlType::Q8_0, {32, 1, 2}, random_bytes(68, 5));
    w.add_tensor("output_norm.weight", GgmlType::F32, {4}, random_bytes(16, 6));
    Bytes image = w.to_bytes();
    ASSERT_NO_THROW(parse(image));
    // the last tensor ends 16 bytes before the padded end of the file
    const size_t n_needed = image.size() - 16;
    for (size_t n = 0; n < n_needed; ++n) {
        Bytes prefix(image.begin(), image.begin() + static_cast<std::ptrdiff_t>(n));
        EXPECT_THROW(parse_gguf(prefix.data(), prefix.size(), "bad.gguf"), Error) << "prefix of " << n << " bytes";
    }
    EXPECT_NO_THROW(parse_gguf(image.data(), n_needed, "bad.gguf"));
}

TEST(GgufParse, RejectsTruncationsOfTheGgufPackageFile) {
    MappedFile f(test::fixtures_dir() + "/gguf/tiny_llama_moe.gguf");
    const size_t data_offset = parse_gguf(f.data(), f.size(), "tiny").data_offset();
    // every cut in the header, then cuts through the data section (its last tensor ends at the end of the file)
    std::vector<size_t> cuts(data_offset + 64);
    std::iota(cuts.begin(), cuts.end(), size_t{0});
    for (size_t n = data_offset + 64; n < f.size(); n += 97) cuts.push_back(n);
    cuts.push_back(f.size() - 1);
    for (size_t n : cuts) EXPECT_THROW(parse_gguf(f.data(), n, "bad.gguf"), Error) << "prefix of " << n << " bytes";
}

} // namespace
} // namespace moesh
