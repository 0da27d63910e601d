#include "runtime/safetensors.h"

#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <set>
#include <system_error>
#include <utility>

namespace moesh {

using json = nlohmann::json;

namespace {

struct DtypeEntry {
    StDtype dtype;
    std::string_view name;
    uint32_t bits;
};

constexpr std::array<DtypeEntry, 22> k_dtypes = {{
    {StDtype::BOOL, "BOOL", 8},
    {StDtype::U8, "U8", 8},
    {StDtype::I8, "I8", 8},
    {StDtype::I16, "I16", 16},
    {StDtype::U16, "U16", 16},
    {StDtype::I32, "I32", 32},
    {StDtype::U32, "U32", 32},
    {StDtype::I64, "I64", 64},
    {StDtype::U64, "U64", 64},
    {StDtype::F16, "F16", 16},
    {StDtype::BF16, "BF16", 16},
    {StDtype::F32, "F32", 32},
    {StDtype::F64, "F64", 64},
    {StDtype::C64, "C64", 64},
    {StDtype::F8_E4M3, "F8_E4M3", 8},
    {StDtype::F8_E5M2, "F8_E5M2", 8},
    {StDtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {StDtype::F8_E8M0, "F8_E8M0", 8},
    {StDtype::F6_E2M3, "F6_E2M3", 6},
    {StDtype::F6_E3M2, "F6_E3M2", 6},
    {StDtype::F4, "F4", 4},
}};

const DtypeEntry & dtype_entry(StDtype dtype) {
    for (const auto & e : k_dtypes)
        if (e.dtype == dtype) return e;
    throw std::logic_error("StDtype out of range");
}

std::string quote(std::string_view s) { return quote_untrusted(s, true); }

std::string brief(const json & j) {
    std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
    if (s.size() > 80) s = s.substr(0, 77) + "...";
    return s;
}

std::string shape_str(const std::vector<int64_t> & shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

std::string range_str(uint64_t a, uint64_t b) {
    // appended piecewise: "[" + std::to_string(a) trips GCC 12's -Wrestrict false positive
    std::string s = "[";
    s += std::to_string(a);
    s += ", ";
    s += std::to_string(b);
    s += "]";
    return s;
}

// Called with the chain of object keys leading to the object that holds a
// duplicated key, and the key; returns the error message (without source).
using DuplicateMessage = std::string (*)(const std::vector<std::string> & parents, const std::string & key);

// nlohmann keeps the last of duplicated keys silently; a parser callback sees
// every key as it is read, which is where duplicates are caught.
json parse_json_strict(const uint8_t * begin, const uint8_t * end, const std::string & source,
                       uint64_t file_offset, DuplicateMessage duplicate_message) {
    struct Frame {
        bool is_object;
        std::string name;      // key under which this container sits ("[]" in an array)
        std::set<std::string> keys;
        std::string last_key;
    };
    // nlohmann stops at a NUL byte as if the input ended there, which would
    // let anything after it pass unread; raw NULs are never valid JSON.
    if (const void * nul = std::memchr(begin, 0, static_cast<size_t>(end - begin)))
        throw Error(source + ": header is not valid JSON: NUL byte at byte " +
                    std::to_string(file_offset + static_cast<uint64_t>(static_cast<const uint8_t *>(nul) - begin)) +
                    " of the file");
    std::vector<Frame> stack;
    auto enter = [&](bool is_object) {
        std::string name = stack.empty() ? "" : (stack.back().is_object ? stack.back().last_key : "[]");
        stack.push_back(Frame{is_object, std::move(name), {}, {}});
    };
    json::parser_callback_t cb = [&](int, json::parse_event_t event, json & parsed) -> bool {
        switch (event) {
        case json::parse_event_t::object_start: enter(true); break;
        case json::parse_event_t::array_start: enter(false); break;
        case json::parse_event_t::object_end:
        case json::parse_event_t::array_end:
            if (!stack.empty()) stack.pop_back();
            break;
        case json::parse_event_t::key: {
            Frame & top = stack.back();
            const std::string & key = parsed.get_ref<const std::string &>();
            if (!top.keys.insert(key).second) {
                std::vector<std::string> parents;
                for (size_t i = 1; i < stack.size(); ++i) parents.push_back(stack[i].name);
                throw Error(source + ": " + duplicate_message(parents, key));
            }
            top.last_key = key;
            break;
        }
        case json::parse_event_t::value: break;
        }
        return true;
    };
    // "[json.exception.parse_error.101] parse error at line 1, column 5: ..." -> the tail, printable
    auto reason = [](const json::exception & e) {
        std::string what = e.what();
        size_t colon = what.find(": ");
        if (colon != std::string::npos) what = what.substr(colon + 2);
        else if (what.find("] ") != std::string::npos) what = what.substr(what.find("] ") + 2);
        if (what.size() > 200) what = what.substr(0, 197) + "...";
        for (char & c : what)
            if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
        return what;
    };
    try {
        return json::parse(begin, end, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::parse_error & e) {
        uint64_t byte = e.byte > 0 ? e.byte - 1 : 0;
        throw Error(source + ": header is not valid JSON (near byte " + std::to_string(file_offset + byte) +
                    " of the file): " + reason(e));
    } catch (const json::exception & e) {
        // out_of_range.406: a number too large for a double (1e999)
        throw Error(source + ": header is not valid JSON: " + reason(e));
    }
}

std::string header_duplicate(const std::vector<std::string> & parents, const std::string & key) {
    if (parents.empty()) return "tensor " + quote(key) + " appears twice in the header";
    if (parents.size() == 1 && parents[0] == "__metadata__")
        return "__metadata__ key " + quote(key) + " appears twice";
    if (parents.size() == 1) return "tensor " + quote(parents[0]) + ": key " + quote(key) + " appears twice";
    return "key " + quote(key) + " appears twice in the header";
}

bool checked_mul(uint64_t a, uint64_t b, uint64_t & out) {
    return !__builtin_mul_overflow(a, b, &out);
}

StTensorInfo parse_entry(const std::string & source, const std::string & name, const json & entry,
                         uint64_t data_begin, uint64_t data_size) {
    const std::string where = source + ": tensor " + quote(name) + ": ";
    if (!entry.is_object()) throw Error(where + "entry must be an object, got " + brief(entry));
    for (const auto & [key, value] : entry.items())
        if (key != "dtype" && key != "shape" && key != "data_offsets")
            throw Error(where + "unknown key " + quote(key) + " (expected dtype, shape, data_offsets)");

    StTensorInfo info;
    info.name = name;

    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end()) throw Error(where + "missing 'dtype'");
    if (!dtype_it->is_string()) throw Error(where + "dtype must be a string, got " + brief(*dtype_it));
    const std::string & dtype_name = dtype_it->get_ref<const std::string &>();
    auto dtype = st_dtype_from_name(dtype_name);
    if (!dtype) throw Error(where + "unknown dtype " + quote(dtype_name));
    info.dtype = *dtype;

    auto shape_it = entry.find("shape");
    if (shape_it == entry.end()) throw Error(where + "missing 'shape'");
    if (!shape_it->is_array()) throw Error(where + "shape must be an array, got " + brief(*shape_it));
    if (shape_it->size() > k_st_max_rank)
        throw Error(where + "shape has rank " + std::to_string(shape_it->size()) + ", at most " +
                    std::to_string(k_st_max_rank) + " is supported");
    uint64_t n_elements = 1;
    bool overflow = false;
    for (const json & dim : *shape_it) {
        // nlohmann reads non-negative integers as unsigned, negative ones as
        // signed and anything with a fraction, exponent or > 2^64 as float.
        if (!dim.is_number_unsigned())
            throw Error(where + "shape must hold non-negative integers, got " + brief(*shape_it));
        uint64_t d = dim.get<uint64_t>();
        if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            throw Error(where + "shape dimension " + std::to_string(d) + " is too large");
        info.shape.push_back(static_cast<int64_t>(d));
        overflow = overflow || !checked_mul(n_elements, d, n_elements);
    }
    if (overflow) {
        // A zero dimension makes the tensor empty however large the others are.
        if (std::find(info.shape.begin(), info.shape.end(), 0) == info.shape.end())
            throw Error(where + "shape " + shape_str(info.shape) + " has too many elements (overflows 64 bits)");
        n_elements = 0;
    }

    auto offsets_it = entry.find("data_offsets");
    if (offsets_it == entry.end()) throw Error(where + "missing 'data_offsets'");
    const json & offsets = *offsets_it;
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
        throw Error(where + "data_offsets must be two non-negative integers [begin, end], got " + brief(offsets));
    uint64_t begin = offsets[0].get<uint64_t>();
    uint64_t end = offsets[1].get<uint64_t>();
    const std::string offsets_text = "data_offsets " + range_str(begin, end);
    if (begin > end) throw Error(where + offsets_text + " begin after end");

    uint32_t bits = st_dtype_bits(info.dtype);
    uint64_t n_bits = 0;
    if (!checked_mul(n_elements, bits, n_bits))
        throw Error(where + "shape " + shape_str(info.shape) + " of " + std::string(st_dtype_name(info.dtype)) +
                    " is too large (byte count overflows 64 bits)");
    if (n_bits % 8 != 0)
        throw Error(where + "shape " + shape_str(info.shape) + " of " + std::string(st_dtype_name(info.dtype)) +
                    " is " + std::to_string(n_bits) + " bits, not a whole number of bytes");
    uint64_t n_bytes = n_bits / 8;
    if (end - begin != n_bytes)
        throw Error(where + offsets_text + " hold " + std::to_string(end - begin) + " bytes but " +
                    std::string(st_dtype_name(info.dtype)) + " x shape " + shape_str(info.shape) + " needs " +
                    std::to_string(n_bytes));
    if (end > data_size)
        throw Error(where + offsets_text + " end past the data section (" + std::to_string(data_size) + " bytes)");

    info.begin = data_begin + begin;
    info.end = data_begin + end;
    return info;
}

} // namespace

std::string_view st_dtype_name(StDtype dtype) { return dtype_entry(dtype).name; }

std::optional<StDtype> st_dtype_from_name(std::string_view name) {
    for (const auto & e : k_dtypes)
        if (e.name == name) return e.dtype;
    return std::nullopt;
}

uint32_t st_dtype_bits(StDtype dtype) { return dtype_entry(dtype).bits; }

size_t st_dtype_size(StDtype dtype) {
    uint32_t bits = st_dtype_bits(dtype);
    return bits % 8 == 0 ? bits / 8 : 0;
}

std::optional<moesh_dtype> st_dtype_to_moesh(StDtype dtype) {
    switch (dtype) {
    case StDtype::F32: return MOESH_DTYPE_F32;
    case StDtype::F16: return MOESH_DTYPE_F16;
    case StDtype::BF16: return MOESH_DTYPE_BF16;
    default: return std::nullopt;
    }
}

int64_t StTensorInfo::n_elements() const {
    // Parsed shapes are checked: the product fits unless a dimension is 0
    // (then the others may be anything).
    uint64_t n = 1;
    for (int64_t d : shape) {
        if (d == 0) return 0;
        n *= static_cast<uint64_t>(d);
    }
    return static_cast<int64_t>(n);
}

std::vector<StTensorInfo> parse_safetensors(const uint8_t * data, size_t size, std::string_view source_name,
                                            json * metadata_out) {
    const std::string source(source_name);
    if (size < 8)
        throw Error(source + ": file is " + std::to_string(size) +
                    " bytes, too small for the 8-byte header length of a safetensors file");
    uint64_t n_header = 0;
    for (int i = 7; i >= 0; --i) n_header = (n_header << 8) | data[i];
    if (n_header == 0) throw Error(source + ": header length is 0");
    if (n_header > k_st_max_header_bytes)
        throw Error(source + ": header length " + std::to_string(n_header) + " exceeds the limit of " +
                    std::to_string(k_st_max_header_bytes) + " bytes (not a safetensors file?)");
    if (n_header > size - 8)
        throw Error(source + ": header length " + std::to_string(n_header) + " runs past the end of the file (" +
                    std::to_string(size - 8) + " bytes follow the length field; truncated file?)");

    // nlohmann would skip a UTF-8 byte order mark; the reference loader refuses it.
    if (n_header >= 3 && data[8] == 0xEF && data[9] == 0xBB && data[10] == 0xBF)
        throw Error(source + ": header starts with a UTF-8 byte order mark, expected '{'");
    const uint64_t data_begin = 8 + n_header;
    const uint64_t data_size = size - data_begin;
    json header = parse_json_strict(data + 8, data + data_begin, source, 8, header_duplicate);
    if (!header.is_object())
        throw Error(source + ": header must be a JSON object, got " + std::string(header.type_name()));

    json metadata = json::object();
    std::vector<StTensorInfo> tensors;
    tensors.reserve(header.size());
    for (const auto & [name, entry] : header.items()) {
        if (name == "__metadata__") {
            // The reference implementation reads null as "no metadata".
            if (entry.is_null()) continue;
            if (!entry.is_object())
                throw Error(source + ": __metadata__ must be an object of strings, got " + brief(entry));
            for (const auto & [key, value] : entry.items())
                if (!value.is_string())
                    throw Error(source + ": __metadata__ key " + quote(key) + " must be a string, got " +
                                brief(value));
            metadata = entry;
            continue;
        }
        tensors.push_back(parse_entry(source, name, entry, data_begin, data_size));
    }

    std::sort(tensors.begin(), tensors.end(), [](const StTensorInfo & a, const StTensorInfo & b) {
        return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    // The spec says the data section is "entirely indexed, without holes"
    // (which rules out polyglot files), and the reference loader rejects holes
    // and trailing bytes, so no real file has them: both are errors here.
    uint64_t cursor = data_begin;
    const StTensorInfo * prev = nullptr;
    for (const StTensorInfo & t : tensors) {
        if (t.begin < cursor)
            throw Error(source + ": tensor " + quote(t.name) + ": data_offsets " +
                        range_str(t.begin - data_begin, t.end - data_begin) + " overlap tensor " + quote(prev->name) +
                        " " + range_str(prev->begin - data_begin, prev->end - data_begin));
        if (t.begin > cursor)
            throw Error(source + ": bytes " + range_str(cursor - data_begin, t.begin - data_begin) +
                        " of the data section are not covered by any tensor (a hole before tensor " +
                        quote(t.name) + ")");
        if (t.end > cursor || !prev) prev = &t;
        cursor = t.end;
    }
    if (cursor != size)
        throw Error(source + ": the last " + std::to_string(size - cursor) + " bytes of the data section (" +
                    std::to_string(data_size) + " bytes) are not covered by any tensor");

    if (metadata_out) *metadata_out = std::move(metadata);
    return tensors;
}

// ---- SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::filesystem::path & path) : file_(path) {
    json metadata;
    tensors_ = parse_safetensors(file_.data(), file_.size(), path.string(), &metadata);
    for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
    for (const auto & [key, value] : metadata.items()) metadata_.emplace(key, value.get<std::string>());
}

const StTensorInfo * SafetensorsFile::find(std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
}

const void * SafetensorsFile::data(const StTensorInfo & info) const {
    if (info.begin > info.end || info.end > file_.size())
        throw std::logic_error("SafetensorsFile::data: tensor '" + info.name + "' is not from " + path().string());
    return file_.data() + info.begin;
}

// ---- TensorStore

namespace {

std::string index_duplicate(const std::vector<std::string> & parents, const std::string & key) {
    if (parents.size() == 1 && parents[0] == "weight_map")
        return "tensor " + quote(key) + " appears twice in weight_map";
    return "key " + quote(key) + " appears twice";
}

bool is_plain_file_name(const std::string & name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
           name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

bool is_file(const std::filesystem::path & p) {
    std::error_code ec;
    return std::filesystem::is_regular_file(p, ec); // follows symlinks (the HF cache uses them)
}

} // namespace

void TensorStore::add_file(SafetensorsFile file) {
    for (const StTensorInfo & info : file.tensors()) {
        auto [it, inserted] = index_.emplace(info.name, tensors_.size());
        if (!inserted)
            throw Error(folder_.string() + ": tensor " + quote(info.name) + " is in both " +
                        quote(tensors_[it->second].file.filename().string()) + " and " +
                        quote(file.path().filename().string()));
        tensors_.push_back(StTensor{info, file.data(info), file.path()});
    }
    files_.push_back(std::move(file));
}

TensorStore TensorStore::open(const std::filesystem::path & folder) {
    TensorStore store;
    store.folder_ = folder;
    const std::string folder_name = folder.string();
    std::error_code ec;
    if (!std::filesystem::exists(folder, ec)) throw Error(folder_name + ": model folder does not exist");
    if (!std::filesystem::is_directory(folder, ec)) throw Error(folder_name + ": not a directory");

    const auto single = folder / "model.safetensors";
    const auto index_path = folder / "model.safetensors.index.json";
    if (is_file(single)) {
        store.add_file(SafetensorsFile(single));
    } else if (is_file(index_path)) {
        const std::string index_name = index_path.string();
        MappedFile index_file(index_path);
        json index = parse_json_strict(index_file.data(), index_file.data() + index_file.size(), index_name, 0,
                                       index_duplicate);
        if (!index.is_object()) throw Error(index_name + ": must be a JSON object");
        auto map_it = index.find("weight_map");
        if (map_it == index.end()) throw Error(index_name + ": missing 'weight_map'");
        if (!map_it->is_object())
            throw Error(index_name + ": 'weight_map' must be an object {tensor: shard file}, got " + brief(*map_it));

        if (map_it->empty()) throw Error(index_name + ": 'weight_map' is empty");
        std::map<std::string, std::string> shard_of_first_tensor; // shard -> a tensor naming it, for messages
        for (const auto & [name, shard] : map_it->items()) {
            if (!shard.is_string())
                throw Error(index_name + ": weight_map: tensor " + quote(name) + " maps to " + brief(shard) +
                            ", expected a shard file name");
            const std::string & shard_name = shard.get_ref<const std::string &>();
            if (!is_plain_file_name(shard_name))
                throw Error(index_name + ": weight_map: tensor " + quote(name) + " maps to " + quote(shard_name) +
                            ", which is not a plain file name inside the model folder");
            shard_of_first_tensor.emplace(shard_name, name);
        }
        for (const auto & [shard_name, first_tensor] : shard_of_first_tensor) {
            if (!is_file(folder / shard_name))
                throw Error(index_name + ": shard " + quote(shard_name) + " (holding tensor " + quote(first_tensor) +
                            ") is missing from " + folder_name);
            store.add_file(SafetensorsFile(folder / shard_name));
        }
        for (const auto & [name, shard] : map_it->items()) {
            const std::string & shard_name = shard.get_ref<const std::string &>();
            const StTensor * t = store.find(name);
            if (!t || t->file.filename() != shard_name)
                throw Error(index_name + ": tensor " + quote(name) + " is mapped to shard " + quote(shard_name) +
                            " but that shard has no such tensor");
        }
    } else {
        std::vector<std::filesystem::path> paths;
        try {
            for (const auto & entry : std::filesystem::directory_iterator(folder)) {
                const auto & p = entry.path();
                std::string file_name = p.filename().string();
                if (p.extension() == ".safetensors" && file_name[0] != '.' && is_file(p)) paths.push_back(p);
            }
        } catch (const std::filesystem::filesystem_error & e) {
            throw Error(folder_name + ": cannot list the folder: " + e.code().message());
        }
        if (paths.empty())
            throw Error(folder_name +
                        ": no model.safetensors, model.safetensors.index.json or *.safetensors file in the folder");
        std::sort(paths.begin(), paths.end());
        for (const auto & p : paths) store.add_file(SafetensorsFile(p));
    }
    return store;
}

const StTensor * TensorStore::find(std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
}

const StTensor & TensorStore::require(std::string_view name, std::string_view what) const {
    if (const StTensor * t = find(name)) return *t;
    std::string message = folder_.string() + ": missing tensor " + quote(name);
    if (!what.empty()) message += " (needed by " + std::string(what) + ")";
    throw Error(message);
}

std::vector<std::string_view> TensorStore::names() const {
    std::vector<std::string_view> out;
    out.reserve(index_.size());
    for (const auto & [name, i] : index_) out.push_back(name);
    return out;
}

uint64_t TensorStore::total_bytes() const {
    uint64_t n = 0;
    for (const StTensor & t : tensors_) n += t.info.n_bytes();
    return n;
}

} // namespace moesh
