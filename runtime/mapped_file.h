// A whole file mapped read-only into memory.
//
//   moesh::MappedFile f("model/model.safetensors");   // throws moesh::Error
//   const uint8_t * p = f.data();                     // [f.size()] bytes
//   f.advise(moesh::MappedFile::Advice::WillNeed, offset, n_bytes); // prefetch, best effort
//
// Empty files, directories and other non-regular files are refused: a
// zero-length mapping does not exist, and nothing we map is ever empty.
// If another process truncates the file while it is mapped, touching the lost
// pages raises SIGBUS; model files are not expected to change under us.
//
// Thread safety: data() may be read from any number of threads; the object
// itself is move-only and not synchronised.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>

namespace moesh {

// The whole contents of a small text file (configs, tokenizer.json, prompts).
// Throws moesh::Error("<path>: cannot open (<reason>)") naming `what` the file is.
std::string read_text_file(const std::filesystem::path & path, std::string_view what);

class MappedFile {
public:
    enum class Advice { Normal, Sequential, Random, WillNeed, DontNeed };

    // Opens and maps the whole file; throws moesh::Error naming the path and
    // the reason (strerror for system calls).
    explicit MappedFile(const std::filesystem::path & path);
    ~MappedFile();

    MappedFile(MappedFile && other) noexcept;
    MappedFile & operator=(MappedFile && other) noexcept;
    MappedFile(const MappedFile &) = delete;
    MappedFile & operator=(const MappedFile &) = delete;

    const uint8_t * data() const { return data_; }   // [size()], nullptr once moved from
    size_t size() const { return size_; }
    const std::filesystem::path & path() const { return path_; }

    // madvise over [offset, offset + length) clipped to the file and widened to
    // whole pages. A hint only: failures are ignored.
    void advise(Advice advice, size_t offset = 0,
                size_t length = std::numeric_limits<size_t>::max()) const noexcept;

private:
    void release() noexcept;

    std::filesystem::path path_;
    const uint8_t * data_ = nullptr;
    size_t size_ = 0;
};

} // namespace moesh
