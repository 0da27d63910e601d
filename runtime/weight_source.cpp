#include "runtime/weight_source.h"

#include "experts/expert.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"

#include <algorithm>
#include <cstring>

namespace moesh {

void * MemoryWeightSource::add(const std::string & name, moesh_dtype dtype, std::vector<int64_t> shape) {
    size_t n = dtype_size(dtype);
    for (int64_t d : shape) n *= size_t(d);
    // 64-byte aligned storage, so SIMD kernels see what an mmap'd file gives them
    auto buf = std::make_unique<uint8_t[]>(n + 64);
    std::memset(buf.get(), 0, n + 64);
    auto addr = reinterpret_cast<uintptr_t>(buf.get());
    void * data = buf.get() + ((64 - addr % 64) % 64);
    storage_.push_back(std::move(buf));
    SourceTensor t;
    t.name = name;
    t.data = data;
    t.dtype = int(dtype);
    t.dtype_name = dtype_name(dtype);
    t.shape = std::move(shape);
    t.origin = description_;
    tensors_[name] = std::move(t);
    return data;
}

const SourceTensor * MemoryWeightSource::find(std::string_view name) const {
    auto it = tensors_.find(std::string(name));
    return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<std::string> MemoryWeightSource::names() const {
    std::vector<std::string> out;
    for (const auto & [n, t] : tensors_) out.push_back(n);
    std::sort(out.begin(), out.end());
    return out;
}

namespace {

class SafetensorsWeightSource final : public WeightSource {
public:
    explicit SafetensorsWeightSource(const std::string & folder)
        : folder_(folder), store_(TensorStore::open(folder)) {
        for (const StTensor & t : store_.tensors()) {
            SourceTensor s;
            s.name = t.info.name;
            s.data = t.data;
            auto md = st_dtype_to_moesh(t.info.dtype);
            s.dtype = md ? int(*md) : -1;
            s.dtype_name = std::string(st_dtype_name(t.info.dtype));
            s.shape = t.info.shape;
            s.origin = t.file.string();
            tensors_.emplace(s.name, std::move(s));
        }
    }
    const SourceTensor * find(std::string_view name) const override {
        auto it = tensors_.find(std::string(name));
        return it == tensors_.end() ? nullptr : &it->second;
    }
    std::vector<std::string> names() const override {
        std::vector<std::string> out;
        for (const auto & [n, t] : tensors_) out.push_back(n);
        std::sort(out.begin(), out.end());
        return out;
    }
    std::string describe() const override { return folder_; }
    std::vector<MappedRegion> mapped_files() const override {
        std::vector<MappedRegion> out;
        for (const SafetensorsFile & f : store_.files()) out.push_back({f.path().string(), f.mapping().data(), f.mapping().size()});
        return out;
    }

private:
    std::string folder_;
    TensorStore store_;
    std::unordered_map<std::string, SourceTensor> tensors_;
};

} // namespace

std::unique_ptr<WeightSource> open_safetensors_folder(const std::string & folder) {
    return std::make_unique<SafetensorsWeightSource>(folder);
}

} // namespace moesh
