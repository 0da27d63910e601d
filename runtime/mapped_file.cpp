#include "runtime/mapped_file.h"

#include "runtime/error.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moesh {

namespace {

[[noreturn]] void fail_errno(const std::filesystem::path & path, const char * what, int err) {
    throw Error(path.string() + ": " + what + ": " + std::strerror(err));
}

// Closes the descriptor on every path out of the constructor; the mapping
// outlives it.
struct Fd {
    int fd = -1;
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

} // namespace

MappedFile::MappedFile(const std::filesystem::path & path) : path_(path) {
    Fd fd;
    do {
        fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd.fd < 0 && errno == EINTR);
    if (fd.fd < 0) fail_errno(path, "cannot open", errno);

    struct stat st {};
    if (::fstat(fd.fd, &st) != 0) fail_errno(path, "cannot stat", errno);
    if (S_ISDIR(st.st_mode)) throw Error(path.string() + ": is a directory, expected a file");
    if (!S_ISREG(st.st_mode)) throw Error(path.string() + ": not a regular file");
    if (st.st_size == 0) throw Error(path.string() + ": file is empty");
    if (static_cast<uint64_t>(st.st_size) > std::numeric_limits<size_t>::max())
        throw Error(path.string() + ": file of " + std::to_string(st.st_size) +
                    " bytes is too large to map on this platform");

    size_t size = static_cast<size_t>(st.st_size);
    void * p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.fd, 0);
    if (p == MAP_FAILED) fail_errno(path, "cannot mmap", errno);
    data_ = static_cast<const uint8_t *>(p);
    size_ = size;
}

MappedFile::~MappedFile() { release(); }

MappedFile::MappedFile(MappedFile && other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile & MappedFile::operator=(MappedFile && other) noexcept {
    if (this != &other) {
        release();
        path_ = std::move(other.path_);
        data_ = std::exchange(other.data_, nullptr);
        size_ = std::exchange(other.size_, 0);
    }
    return *this;
}

void MappedFile::release() noexcept {
    if (data_) ::munmap(const_cast<uint8_t *>(data_), size_);
    data_ = nullptr;
    size_ = 0;
}

void MappedFile::advise(Advice advice, size_t offset, size_t length) const noexcept {
    if (!data_ || offset >= size_) return;
    length = std::min(length, size_ - offset);
    int flag = MADV_NORMAL;
    switch (advice) {
    case Advice::Normal: flag = MADV_NORMAL; break;
    case Advice::Sequential: flag = MADV_SEQUENTIAL; break;
    case Advice::Random: flag = MADV_RANDOM; break;
    case Advice::WillNeed: flag = MADV_WILLNEED; break;
    case Advice::DontNeed: flag = MADV_DONTNEED; break;
    }
    // madvise wants a page-aligned start; the mapping itself is page-aligned.
    static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    size_t begin = offset - offset % page;
    ::madvise(const_cast<uint8_t *>(data_) + begin, length + (offset - begin), flag);
}

std::string read_text_file(const std::filesystem::path & path, std::string_view what) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path.string() + ": cannot open " + std::string(what) + " (" + std::strerror(errno) + ")");
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw Error(path.string() + ": read error in " + std::string(what));
    return ss.str();
}

} // namespace moesh
