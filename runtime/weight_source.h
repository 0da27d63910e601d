// Named tensors that a model is built from: a Hugging Face folder's
// safetensors shards (mmap'd), or tensors made in memory (benchmarks, tests).
// Thread safety: read-only after construction.
#pragma once

#include "experts/expert_store.h"

#include <moesh/plugin.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace moesh {

struct SourceTensor {
    std::string name;
    const void * data = nullptr;
    int dtype = -1;                 // a moesh_dtype, or -1 when moesh cannot compute with it
    std::string dtype_name;         // as the file spells it ("BF16", "I64", ...)
    std::vector<int64_t> shape;     // outermost first (NumPy order)
    std::string origin;             // file it lives in, for messages
    std::string file_name;          // its name in that file, when the source renames it
};

class WeightSource {
public:
    virtual ~WeightSource() = default;
    virtual const SourceTensor * find(std::string_view name) const = 0;
    virtual std::vector<std::string> names() const = 0;
    virtual std::string describe() const = 0; // e.g. the model folder
    // What the file calls the tensor `name` (for messages); `name` itself unless renamed.
    virtual std::string file_name_of(std::string_view name) const { return std::string(name); }
    // The files the tensors are mapped from, so an expert can be read from its
    // file instead of through the mapping (ExpertStore); none for memory.
    virtual std::vector<MappedRegion> mapped_files() const { return {}; }
};

// Tensors owned in memory.
class MemoryWeightSource final : public WeightSource {
public:
    explicit MemoryWeightSource(std::string description) : description_(std::move(description)) {}

    // Adds a tensor with zeroed storage and returns its bytes to fill.
    void * add(const std::string & name, moesh_dtype dtype, std::vector<int64_t> shape);

    const SourceTensor * find(std::string_view name) const override;
    std::vector<std::string> names() const override;
    std::string describe() const override { return description_; }

private:
    std::string description_;
    std::unordered_map<std::string, SourceTensor> tensors_;
    std::vector<std::unique_ptr<uint8_t[]>> storage_;
};

// The weights of a Hugging Face model folder (model.safetensors, shards with
// model.safetensors.index.json, or every *.safetensors), mmap'd.
std::unique_ptr<WeightSource> open_safetensors_folder(const std::string & folder);

} // namespace moesh
