// libFuzzer target for parse_gguf: the parser must either accept the input
// with every invariant of its result holding, or throw moesh::Error. Accepted
// files also go through every accessor and expert_view, touching the bytes
// they point at (ASan checks those stay inside the input), and through the
// model binding (model_config_from_gguf, gguf_weight_source).
#include "fuzz_targets.h"

#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/gguf_model.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace moesh::fuzz {

namespace {

void check(bool ok, const char * what) { require(ok, "gguf", what); }

struct Image {
    const uint8_t * begin;
    const uint8_t * end;
    bool holds(const void * p, uint64_t n) const {
        const auto * b = static_cast<const uint8_t *>(p);
        return b >= begin && b <= end && n <= static_cast<uint64_t>(end - b);
    }
};

volatile uint8_t g_sink;

void touch(const uint8_t * p, uint64_t n) {
    if (n == 0) return;
    g_sink = p[0];
    g_sink = p[n - 1];
}

// Calls the typed getter matching the value's type (must succeed) and one
// that does not (must throw moesh::Error, never anything else).
void exercise_accessors(const GgufContents & g, const GgufKv & kv, const Image & image) {
    const GgufValue & v = kv.value;
    switch (v.type) {
    case GgufValueType::String: {
        std::string_view s = g.get_string(kv.key);
        check(image.holds(s.data(), s.size()), "string value outside the input");
        touch(reinterpret_cast<const uint8_t *>(s.data()), s.size());
        break;
    }
    case GgufValueType::Bool: check(v.u <= 1 && g.get_bool(kv.key) == (v.u == 1), "bool value"); break;
    case GgufValueType::F32:
    case GgufValueType::F64: (void)g.get_f64(kv.key); break;
    case GgufValueType::Array: check(&g.get_array(kv.key) == v.array, "array accessor"); break;
    default:
        try {
            (void)g.get_i64(kv.key);
        } catch (const Error &) {
            check(v.type == GgufValueType::U64 && v.u > uint64_t{INT64_MAX}, "get_i64 refused an integer that fits");
        }
        break;
    }
    try {
        (void)g.get_u32(kv.key);
        check(v.is_integer(), "get_u32 accepted a non-integer");
    } catch (const Error &) {
    }
    try {
        (void)g.get_string(kv.key);
        check(v.type == GgufValueType::String, "get_string accepted a non-string");
    } catch (const Error &) {
    }
}

void walk_array(const GgufArray & a, const Image & image, int depth) {
    check(depth <= static_cast<int>(k_gguf_max_array_depth), "array nesting above the limit");
    const size_t n_elem = gguf_value_type_size(a.type());
    if (n_elem) check(image.holds(a.raw(), a.size() * n_elem), "scalar array outside the input");
    for (uint64_t i = 0; i < a.size(); ++i) {
        GgufValue v = a.at(i);
        check(v.type == a.type(), "element type differs from the array's");
        if (v.type == GgufValueType::String) {
            check(image.holds(v.str.data(), v.str.size()), "array string outside the input");
            check(a.string(i) == v.str, "string(i) differs from at(i)");
        } else if (v.type == GgufValueType::Array) {
            check(v.array != nullptr, "nested array missing");
            walk_array(*v.array, image, depth + 1);
        } else if (v.type == GgufValueType::Bool) {
            check(v.u <= 1, "bool element not 0 or 1");
        }
    }
}

} // namespace

// The file as a model: its metadata as a ModelConfig (or a clear refusal),
// its tensors under Hugging Face names, every expert view inside the input.
void exercise_model_binding(const GgufContents & g, const Image & image) {
    ModelConfig c;
    try {
        c = model_config_from_gguf(g);
    } catch (const Error &) {
        return;
    }
    check(c.n_layer >= 1 && c.n_embd >= 1 && c.n_head >= 1 && c.n_head % c.n_head_kv == 0, "config out of range");
    check(c.layer_is_moe.size() == size_t(c.n_layer), "layer_is_moe size");
    std::unique_ptr<WeightSource> src;
    try {
        src = gguf_weight_source(std::shared_ptr<const GgufContents>(&g, [](const GgufContents *) {}), c.arch);
    } catch (const Error &) {
        return; // the same weight twice
    }
    for (const std::string & n : src->names()) {
        const SourceTensor * t = src->find(n);
        check(t != nullptr, "a listed tensor is not found");
        int64_t elems = 1;
        for (int64_t d : t->shape) elems *= d;
        check(elems > 0, "empty tensor shape");
        check(image.holds(t->data, 1), "tensor data outside the input");
        check(!src->file_name_of(n).empty(), "no file name");
    }
    (void)src->file_name_of("model.layers.0.mlp.experts.3.up_proj.weight");
}

bool gguf_one_input(const uint8_t * data, size_t size) {
    GgufContents g;
    try {
        g = parse_gguf(data, size, "fuzz.gguf");
    } catch (const Error &) {
        return false;
    }
    const Image image{data, data + size};
    check(g.version() == 2 || g.version() == 3, "version");
    check(g.alignment() != 0 && (g.alignment() & (g.alignment() - 1)) == 0, "alignment not a power of two");
    check(g.data_offset() % g.alignment() == 0, "data section not aligned");

    for (const GgufKv & kv : g.kvs()) {
        check(!kv.key.empty() && kv.key.size() <= k_gguf_max_name_bytes, "key length");
        check(image.holds(kv.key.data(), kv.key.size()), "key outside the input");
        check(g.find(kv.key) == &kv, "find does not return the key-value");
        check(kv.file_offset < size, "key-value offset outside the input");
        exercise_accessors(g, kv, image);
        if (kv.value.type == GgufValueType::Array) walk_array(*kv.value.array, image, 1);
    }

    std::vector<const GgufTensor *> by_offset;
    for (const GgufTensor & t : g.tensors()) {
        check(g.find_tensor(t.name) == &t, "find_tensor does not return the tensor");
        check(!t.name.empty() && image.holds(t.name.data(), t.name.size()), "tensor name");
        check(t.n_dims >= 1 && t.n_dims <= k_gguf_max_dims, "n_dims");
        for (uint32_t d = 0; d < 4; ++d) check(d < t.n_dims ? t.ne[d] > 0 : t.ne[d] == 1, "ne");
        const GgmlTypeTraits & traits = ggml_type_traits(t.type);
        check(ggml_type_from_id(static_cast<uint32_t>(t.type)) == t.type, "type id does not round-trip");
        check(t.ne[0] % traits.block_size == 0, "ne[0] not a whole number of blocks");
        check(t.offset % g.alignment() == 0, "tensor offset not aligned");
        check(t.data == data + g.data_offset() + t.offset, "data pointer does not match the offset");
        check(t.n_bytes == t.row_bytes() * static_cast<uint64_t>(t.ne[1]) * static_cast<uint64_t>(t.ne[2]) *
                               static_cast<uint64_t>(t.ne[3]),
              "byte size does not match type x shape");
        check(t.n_elements() > 0, "element count");
        check(image.holds(t.data, t.n_bytes), "tensor data outside the input");
        touch(t.data, t.n_bytes);
        if (t.n_dims == 3) {
            for (int64_t e : {int64_t{0}, t.ne[2] / 2, t.ne[2] - 1}) {
                GgufSlice s = t.expert_view(e);
                check(s.n_bytes * static_cast<uint64_t>(t.ne[2]) == t.n_bytes, "expert slice size");
                check(s.data >= t.data && image.holds(s.data, s.n_bytes) &&
                          s.data + s.n_bytes <= t.data + t.n_bytes,
                      "expert slice outside the tensor");
                touch(s.data, s.n_bytes);
            }
        } else {
            try {
                (void)t.expert_view(0);
                check(false, "expert_view accepted a tensor that is not 3-D");
            } catch (const Error &) {
            }
        }
        by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const GgufTensor * a, const GgufTensor * b) { return a->offset < b->offset; });
    for (size_t i = 1; i < by_offset.size(); ++i)
        check(by_offset[i - 1]->offset + by_offset[i - 1]->n_bytes <= by_offset[i]->offset, "tensors overlap");
    exercise_model_binding(g, image);
    return true;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::gguf_one_input(data, size);
    return 0;
}
#endif
