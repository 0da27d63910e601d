#include "runtime/error.h"
#include "runtime/mapped_file.h"
#include "test_support.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <unistd.h>

namespace moesh {
namespace {

using test::TempDir;

std::string error_of(const std::filesystem::path & p) {
    try {
        MappedFile f(p);
    } catch (const Error & e) {
        return e.what();
    }
    return "(no error)";
}

TEST(MappedFile, MapsWholeFileContents) {
    TempDir dir;
    std::string bytes(10000, '\0');
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7);
    auto p = dir.write("x.bin", bytes);
    MappedFile f(p);
    EXPECT_EQ(f.path(), p);
    ASSERT_EQ(f.size(), bytes.size());
    EXPECT_EQ(std::memcmp(f.data(), bytes.data(), bytes.size()), 0);
}

TEST(MappedFile, MoveTransfersTheMapping) {
    TempDir dir;
    auto p = dir.write("x.bin", "hello");
    MappedFile a(p);
    const uint8_t * data = a.data();
    MappedFile b(std::move(a));
    EXPECT_EQ(b.data(), data);
    EXPECT_EQ(b.size(), 5u);
    EXPECT_EQ(a.data(), nullptr);
    EXPECT_EQ(a.size(), 0u);
    auto q = dir.write("y.bin", "other file");
    MappedFile c(q);
    c = std::move(b);
    EXPECT_EQ(c.data(), data);
    EXPECT_EQ(c.path(), p);
    EXPECT_EQ(std::memcmp(c.data(), "hello", 5), 0);
}

TEST(MappedFile, RejectsEmptyFile) {
    TempDir dir;
    auto p = dir.write("empty.bin", "");
    EXPECT_EQ(error_of(p), p.string() + ": file is empty");
}

TEST(MappedFile, RejectsDirectory) {
    TempDir dir;
    EXPECT_EQ(error_of(dir.path()), dir.path().string() + ": is a directory, expected a file");
}

TEST(MappedFile, RejectsMissingFileWithReason) {
    TempDir dir;
    auto p = dir.path() / "missing.bin";
    EXPECT_EQ(error_of(p), p.string() + ": cannot open: No such file or directory");
}

TEST(MappedFile, RejectsNonRegularFile) {
    EXPECT_EQ(error_of("/dev/null"), "/dev/null: not a regular file");
}

TEST(MappedFile, AdviceIsAcceptedAnywhereInTheFile) {
    TempDir dir;
    auto p = dir.write("x.bin", std::string(100000, 'a'));
    MappedFile f(p);
    f.advise(MappedFile::Advice::WillNeed);
    f.advise(MappedFile::Advice::Sequential, 4097, 10);
    f.advise(MappedFile::Advice::Random, 99999, 1000000);
    f.advise(MappedFile::Advice::DontNeed, 200000, 1); // past the end: ignored
    f.advise(MappedFile::Advice::Normal);
    EXPECT_EQ(f.data()[99999], 'a');
}

} // namespace
} // namespace moesh
