// The loader against real shared libraries: every sample plugin under
// MOESH_TEST_PLUGIN_DIR/<case>/ goes through dlopen, init, validation and create.
#include "plugin_loader.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using moesh::PluginProbe;

namespace {

std::string case_dir(const std::string & c) { return std::string(MOESH_TEST_PLUGIN_DIR) + "/" + c; }

std::string case_lib(const std::string & c, const std::string & name) {
    return case_dir(c) + "/libmoesh_backend_" + name + ".so";
}

std::string case_lib(const std::string & c) { return case_lib(c, c); }

PluginProbe probe_one(const std::string & c) {
    const std::vector<moesh::PluginProbe> probes = moesh::probe_plugins({case_dir(c)});
    EXPECT_EQ(probes.size(), 1u) << c;
    return probes.empty() ? moesh::PluginProbe{} : probes[0];
}

moesh::PluginOptions options(std::vector<std::string> cases) {
    moesh::PluginOptions opts;
    for (const std::string & c : cases) opts.search_dirs.push_back(case_dir(c));
    return opts;
}

// Sets (or unsets) an environment variable for one test.
class ScopedEnv {
public:
    ScopedEnv(const char * name, const char * value) : name_(name) {
        if (const char * old = std::getenv(name)) old_ = old;
        if (value) setenv(name, value, 1);
        else unsetenv(name);
    }
    ~ScopedEnv() {
        if (old_) setenv(name_, old_->c_str(), 1);
        else unsetenv(name_);
    }

private:
    const char * name_;
    std::optional<std::string> old_;
};

class TempDir {
public:
    TempDir() {
        path_ = fs::temp_directory_path() /
                ("moesh_plugin_test_" + std::to_string(getpid()) + "_" +
                 ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::remove_all(path_);
        fs::create_directories(path_);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path_, ec);
    }
    std::string str() const { return path_.string(); }

private:
    fs::path path_;
};

struct LogLine {
    moesh_log_level level;
    std::string plugin;
    std::string msg;
};

// Captures plugin log messages for one test, then restores stderr and the default level.
class CapturedLog {
public:
    explicit CapturedLog(moesh_log_level level) {
        moesh::set_plugin_log_level(level);
        moesh::set_plugin_log_sink(
            [this](moesh_log_level l, std::string_view p, std::string_view m) {
                std::lock_guard lock(mu_);
                lines_.push_back({l, std::string(p), std::string(m)});
            });
    }
    ~CapturedLog() {
        moesh::set_plugin_log_sink(nullptr);
        moesh::set_plugin_log_level(MOESH_LOG_WARN);
    }
    std::vector<LogLine> lines() {
        std::lock_guard lock(mu_);
        return lines_;
    }

private:
    std::mutex mu_;
    std::vector<LogLine> lines_;
};

} // namespace

// ---- validation, one misbehaving plugin each ------------------------------------------------

TEST(PluginProbe, AcceptsValidPluginWithItsNameAndScore) {
    const PluginProbe p = probe_one("good");
    EXPECT_TRUE(p.ok) << p.reason;
    EXPECT_EQ(p.path, case_lib("good"));
    EXPECT_EQ(p.name, "good");
    EXPECT_EQ(p.score, 5);
    EXPECT_EQ(p.reason, "");
}

TEST(PluginProbe, RejectsWrongAbiVersionNamingBothVersions) {
    const PluginProbe p = probe_one("wrong_version");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "built for ABI v2, this moesh speaks v1");
}

TEST(PluginProbe, RejectsNullRequiredSlotNamingTheSlot) {
    const PluginProbe p = probe_one("missing_slot");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.name, "missing_slot");
    EXPECT_EQ(p.reason, "required slot 'attention' is NULL");
}

TEST(PluginProbe, RejectsHalfOfTheAsyncCopyPair) {
    const PluginProbe p = probe_one("half_async");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "table has one of 'copy_to_device_async' and 'copy_wait' but not the other");
}

TEST(PluginProbe, RejectsCopyElapsedWithoutTheCopyQueue) {
    const PluginProbe p = probe_one("lone_elapsed");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "table has 'copy_elapsed' without the copy queue ('copy_to_device_async', 'copy_wait')");
}

// A table that ends before copy_elapsed (a plugin built before it) loads; what lies past its
// struct_size is not read, so the stray pointer there is not taken for a lone copy_elapsed.
TEST(PluginProbe, AcceptsATableEndingBeforeCopyElapsed) {
    const PluginProbe p = probe_one("old_table");
    EXPECT_TRUE(p.ok) << p.reason;
    EXPECT_EQ(p.reason, "");
}

TEST(PluginProbe, RejectsLibraryWithoutInitSymbol) {
    const PluginProbe p = probe_one("no_init");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "no moesh_plugin_init symbol");
}

TEST(PluginProbe, RejectsFailingInitWithStatusAndPluginMessage) {
    const PluginProbe p = probe_one("init_fails");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "moesh_plugin_init failed: MOESH_ERR_INTERNAL: no usable device found");
}

TEST(PluginProbe, RejectsInitThatReturnsOkWithoutTable) {
    const PluginProbe p = probe_one("null_table");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "moesh_plugin_init returned OK but no table");
}

TEST(PluginProbe, RejectsNegativeScoreAsCannotRunHere) {
    const PluginProbe p = probe_one("negative_score");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.name, "negative_score");
    EXPECT_EQ(p.score, -1);
    EXPECT_EQ(p.reason, "moesh_plugin_score returned -1: cannot run on this machine");
}

TEST(PluginProbe, RejectsTableSmallerThanV1NamingBothSizes) {
    const PluginProbe p = probe_one("small_struct");
    EXPECT_FALSE(p.ok);
    const size_t have = offsetof(moesh_backend_iface, attention); // ends before the last slot
    const size_t need = have + sizeof(void *);
    EXPECT_EQ(p.reason, "table struct_size " + std::to_string(have) + " is smaller than the " +
                            std::to_string(need) + " bytes ABI v1 requires");
}

TEST(PluginProbe, RejectsGarbageStructSize) {
    const PluginProbe p = probe_one("huge_struct");
    EXPECT_FALSE(p.ok);
    EXPECT_EQ(p.reason, "table struct_size 4294967295 is implausible (more than 65536 bytes)");
}

TEST(PluginProbe, RejectsFileThatIsNotALibrary) {
    TempDir dir;
    std::ofstream(dir.str() + "/libmoesh_backend_garbage.so") << "not an ELF file\n";
    const std::vector<PluginProbe> probes = moesh::probe_plugins({dir.str()});
    ASSERT_EQ(probes.size(), 1u);
    EXPECT_FALSE(probes[0].ok);
    EXPECT_EQ(probes[0].reason.rfind("dlopen failed: ", 0), 0u) << probes[0].reason;
}

TEST(PluginProbe, IgnoresFilesThatAreNotNamedLikePlugins) {
    TempDir dir;
    fs::copy_file(case_lib("good"), dir.str() + "/libgood.so");
    fs::copy_file(case_lib("good"), dir.str() + "/libmoesh_backend_good.so.bak");
    fs::copy_file(case_lib("good"), dir.str() + "/libmoesh_backend_good.so");
    const std::vector<PluginProbe> probes = moesh::probe_plugins({dir.str()});
    ASSERT_EQ(probes.size(), 1u);
    EXPECT_EQ(probes[0].path, dir.str() + "/libmoesh_backend_good.so");
    EXPECT_TRUE(probes[0].ok);
}

TEST(PluginProbe, SkipsMissingFoldersQuietlyWhenSomethingIsFound) {
    const std::vector<PluginProbe> probes =
        moesh::probe_plugins({"/nonexistent/moesh/plugins", case_dir("good")});
    ASSERT_EQ(probes.size(), 1u);
    EXPECT_EQ(probes[0].name, "good");
}

TEST(PluginProbe, ReportsEachFolderWhenNothingIsFound) {
    TempDir empty;
    const std::vector<PluginProbe> probes =
        moesh::probe_plugins({"/nonexistent/moesh/plugins", empty.str()});
    ASSERT_EQ(probes.size(), 2u);
    EXPECT_EQ(probes[0].path, "/nonexistent/moesh/plugins");
    EXPECT_EQ(probes[0].reason, "folder does not exist");
    EXPECT_FALSE(probes[0].ok);
    EXPECT_EQ(probes[1].path, empty.str());
    EXPECT_EQ(probes[1].reason, "no libmoesh_backend_*.so in this folder");
}

TEST(PluginProbe, SearchesEachFolderOnceEvenWhenSpelledTwice) {
    const std::vector<PluginProbe> probes =
        moesh::probe_plugins({case_dir("good"), case_dir("good") + "/", case_dir("good") + "/."});
    EXPECT_EQ(probes.size(), 1u);
}

TEST(PluginProbe, EarlierFolderShadowsSameBackendNameEvenWithLowerScore) {
    const std::vector<PluginProbe> probes =
        moesh::probe_plugins({case_dir("good"), case_dir("good_copy")});
    ASSERT_EQ(probes.size(), 2u);
    EXPECT_TRUE(probes[0].ok);
    EXPECT_FALSE(probes[1].ok);
    EXPECT_EQ(probes[1].reason, "shadowed by " + case_lib("good") +
                                    " (same backend name, earlier in the search order)");
}

TEST(PluginProbe, SamplePluginExportsOnlyItsEntryPoints) {
    void * h = dlopen(case_lib("good").c_str(), RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(h, nullptr) << dlerror();
    EXPECT_NE(dlsym(h, MOESH_PLUGIN_INIT_SYMBOL), nullptr);
    EXPECT_NE(dlsym(h, MOESH_PLUGIN_SCORE_SYMBOL), nullptr);
    EXPECT_EQ(dlsym(h, "sample_internal_helper"), nullptr);
    dlclose(h);
}

// ---- choosing and creating ---------------------------------------------------------------

TEST(LoadBackend, PicksHighestScore) {
    std::string report;
    auto be = moesh::load_backend(options({"good", "better"}), &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->name(), "better");
    EXPECT_EQ(be->score(), 20);
    EXPECT_EQ(be->path(), case_lib("better"));
    EXPECT_NE(be->ctx(), nullptr);
    EXPECT_EQ(be->iface().abi_version, MOESH_PLUGIN_ABI_VERSION);
}

TEST(LoadBackend, PreferredBeatsScore) {
    moesh::PluginOptions opts = options({"good", "better"});
    opts.preferred = "good";
    std::string report;
    auto be = moesh::load_backend(opts, &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->name(), "good");
}

TEST(LoadBackend, MissingPreferredFailsListingWhatWasFound) {
    moesh::PluginOptions opts = options({"good", "wrong_version"});
    opts.preferred = "cuda";
    std::string report;
    EXPECT_EQ(moesh::load_backend(opts, &report), nullptr);
    EXPECT_NE(report.find("backend 'cuda' was requested but not found"), std::string::npos)
        << report;
    EXPECT_NE(report.find(case_lib("good") + " (good, score 5): usable, not chosen"),
              std::string::npos) << report;
    EXPECT_NE(report.find(case_lib("wrong_version") +
                          ": rejected: built for ABI v2, this moesh speaks v1"),
              std::string::npos) << report;
    EXPECT_NE(report.find("set --plugin-dir or MOESH_PLUGIN_DIR to the folder holding "
                          "libmoesh_backend_cuda.so"),
              std::string::npos) << report;
}

TEST(LoadBackend, RejectedPreferredFailsWithItsReason) {
    moesh::PluginOptions opts = options({"good", "missing_slot"});
    opts.preferred = "missing_slot";
    std::string report;
    EXPECT_EQ(moesh::load_backend(opts, &report), nullptr);
    EXPECT_NE(report.find("backend 'missing_slot' was requested but rejected: required slot "
                          "'attention' is NULL"),
              std::string::npos) << report;
}

TEST(LoadBackend, AllowedListFiltersBeforeScore) {
    moesh::PluginOptions opts = options({"good", "better"});
    opts.allowed = {"good"};
    std::string report;
    auto be = moesh::load_backend(opts, &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->name(), "good");
    EXPECT_NE(report.find(case_lib("better") +
                          ": rejected: 'better' is not in the allowed list (good)"),
              std::string::npos) << report;
}

TEST(LoadBackend, PreferredOutsideAllowedListIsRejected) {
    moesh::PluginOptions opts = options({"good", "better"});
    opts.allowed = {"good"};
    opts.preferred = "better";
    std::string report;
    EXPECT_EQ(moesh::load_backend(opts, &report), nullptr);
    EXPECT_NE(report.find("backend 'better' was requested but rejected: 'better' is not in the "
                          "allowed list (good)"),
              std::string::npos) << report;
}

TEST(LoadBackend, FallsBackToNextScoreWhenCreateFails) {
    std::string report;
    auto be = moesh::load_backend(options({"create_fails", "good"}), &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->name(), "good");
    EXPECT_NE(report.find(case_lib("create_fails") + " (create_fails, score 100): rejected: "
                          "create failed: MOESH_ERR_OUT_OF_MEMORY: device is busy"),
              std::string::npos) << report;
}

TEST(LoadBackend, PreferredWhoseCreateFailsDoesNotFallBack) {
    moesh::PluginOptions opts = options({"create_fails", "good"});
    opts.preferred = "create_fails";
    std::string report;
    EXPECT_EQ(moesh::load_backend(opts, &report), nullptr);
    EXPECT_NE(report.find("backend 'create_fails' was requested but rejected: create failed: "
                          "MOESH_ERR_OUT_OF_MEMORY: device is busy"),
              std::string::npos) << report;
}

TEST(LoadBackend, ReportOnSuccessHasOneLinePerCandidate) {
    std::string report;
    auto be = moesh::load_backend(options({"good", "better", "wrong_version"}), &report);
    ASSERT_NE(be, nullptr) << report;
    const std::string expected =
        "moesh: using backend 'better' from " + case_lib("better") + "\n" +
        "searched: " + case_dir("good") + ", " + case_dir("better") + ", " +
        case_dir("wrong_version") + "\n" +
        "  " + case_lib("good") + " (good, score 5): usable, not chosen\n" +
        "  " + case_lib("better") + " (better, score 20): chosen\n" +
        "  " + case_lib("wrong_version") + ": rejected: built for ABI v2, this moesh speaks v1\n";
    EXPECT_EQ(report, expected);
}

TEST(LoadBackend, ReportOnFailureNamesEveryPluginAndWhatToDo) {
    std::string report;
    auto be = moesh::load_backend(
        options({"wrong_version", "missing_slot", "no_init", "init_fails", "negative_score",
                 "small_struct"}),
        &report);
    EXPECT_EQ(be, nullptr);
    EXPECT_EQ(report.rfind("moesh: no usable backend plugin\n", 0), 0u) << report;
    for (const char * c : {"wrong_version", "missing_slot", "no_init", "init_fails",
                           "negative_score", "small_struct"}) {
        EXPECT_NE(report.find(case_lib(c)), std::string::npos) << c << "\n" << report;
    }
    EXPECT_NE(report.find("required slot 'attention' is NULL"), std::string::npos) << report;
    EXPECT_NE(report.find("no moesh_plugin_init symbol"), std::string::npos) << report;
    EXPECT_NE(report.find("set --plugin-dir or MOESH_PLUGIN_DIR to the folder holding "
                          "libmoesh_backend_cpu.so\n"),
              std::string::npos) << report;
}

TEST(LoadBackend, ReportOnEmptySearchPathSaysWhereItLooked) {
    moesh::PluginOptions opts;
    opts.search_dirs = {"/nonexistent/moesh/plugins"};
    std::string report;
    EXPECT_EQ(moesh::load_backend(opts, &report), nullptr);
    EXPECT_NE(report.find("  /nonexistent/moesh/plugins: rejected: folder does not exist\n"),
              std::string::npos) << report;
}

TEST(LoadBackend, WorksWithoutReport) {
    EXPECT_NE(moesh::load_backend(options({"good"}), nullptr), nullptr);
    EXPECT_EQ(moesh::load_backend(options({"no_init"}), nullptr), nullptr);
}

TEST(LoadBackend, PassesThreadCountToCreateAndForwardsPluginLogs) {
    CapturedLog log(MOESH_LOG_INFO);
    moesh::PluginOptions opts = options({"good"});
    opts.n_threads = 3;
    {
        auto be = moesh::load_backend(opts, nullptr);
        ASSERT_NE(be, nullptr);
    }
    const std::vector<LogLine> lines = log.lines();
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[0].plugin, "good");
    EXPECT_EQ(lines[0].level, MOESH_LOG_INFO);
    EXPECT_EQ(lines[0].msg, "created with n_threads=3");
    EXPECT_EQ(lines[1].msg, "destroyed"); // destroy runs before the library is unloaded
}

TEST(LoadBackend, LogLevelFiltersPluginMessages) {
    CapturedLog log(MOESH_LOG_WARN);
    EXPECT_NE(moesh::load_backend(options({"good"}), nullptr), nullptr);
    EXPECT_TRUE(log.lines().empty());
    moesh::probe_plugins({case_dir("init_fails")});
    const std::vector<LogLine> lines = log.lines();
    ASSERT_EQ(lines.size(), 1u);
    EXPECT_EQ(lines[0].level, MOESH_LOG_ERROR);
    EXPECT_EQ(lines[0].plugin, "init_fails");
    EXPECT_EQ(lines[0].msg, "no usable device found");
}

TEST(LoadBackend, HonoursPluginDirEnvironmentVariable) {
    ScopedEnv env("MOESH_PLUGIN_DIR", ("/nonexistent/a:" + case_dir("good")).c_str());
    moesh::PluginOptions opts; // no search_dirs: the defaults, which read the variable
    opts.preferred = "good";
    std::string report;
    auto be = moesh::load_backend(opts, &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->path(), case_lib("good"));
}

// ---- search path -------------------------------------------------------------------------

TEST(DefaultPluginDirs, OrderIsCliThenEnvThenConfigThenExeRelative) {
    ScopedEnv env("MOESH_PLUGIN_DIR", "/env/a::/env/b");
    const std::vector<std::string> dirs = moesh::default_plugin_dirs("/cli", {"/cfg/1", "/cfg/2"});
    const std::string exe_rel =
        (fs::read_symlink("/proc/self/exe").parent_path() / ".." / "lib" / "moesh")
            .lexically_normal()
            .string();
    EXPECT_EQ(dirs, (std::vector<std::string>{"/cli", "/env/a", "/env/b", "/cfg/1", "/cfg/2",
                                              exe_rel}));
}

TEST(DefaultPluginDirs, SkipsEmptyAndRepeatedEntries) {
    ScopedEnv env("MOESH_PLUGIN_DIR", nullptr);
    const std::vector<std::string> dirs = moesh::default_plugin_dirs("", {"/cfg", "", "/cfg"});
    ASSERT_EQ(dirs.size(), 2u);
    EXPECT_EQ(dirs[0], "/cfg");
    EXPECT_EQ(fs::path(dirs[1]).filename(), "moesh");
}

// ---- Backend -----------------------------------------------------------------------------

TEST(Backend, CheckThrowsWithBackendNameCallStatusAndLastError) {
    auto be = moesh::load_backend(options({"good"}), nullptr);
    ASSERT_NE(be, nullptr);
    EXPECT_NO_THROW(be->check(MOESH_OK, "matmul"));
    try {
        be->check(be->iface().matmul(be->ctx(), nullptr), "matmul");
        FAIL() << "expected BackendError";
    } catch (const moesh::BackendError & e) {
        EXPECT_STREQ(e.what(),
                     "good: matmul failed: MOESH_ERR_INVALID_ARGUMENT: matmul args is NULL");
        EXPECT_EQ(e.status(), MOESH_ERR_INVALID_ARGUMENT);
    }
}

TEST(Backend, SupportsAsksThePlugin) {
    auto be = moesh::load_backend(options({"good"}), nullptr);
    ASSERT_NE(be, nullptr);
    EXPECT_TRUE(be->supports(MOESH_OP_MATMUL, MOESH_DTYPE_F32));
    EXPECT_FALSE(be->supports(MOESH_OP_MATMUL, MOESH_DTYPE_BF16));
    EXPECT_FALSE(be->supports(MOESH_OP_SOFTMAX, MOESH_DTYPE_F32));
}

TEST(Backend, MoveTransfersOwnership) {
    auto be = moesh::load_backend(options({"good"}), nullptr);
    ASSERT_NE(be, nullptr);
    moesh_backend * ctx = be->ctx();
    moesh::Backend moved(std::move(*be));
    EXPECT_EQ(moved.ctx(), ctx);
    EXPECT_EQ(moved.name(), "good");
    EXPECT_EQ(be->ctx(), nullptr);
    EXPECT_FALSE(be->supports(MOESH_OP_MATMUL, MOESH_DTYPE_F32));
    be.reset(); // destroying the moved-from shell must not touch the plugin
    EXPECT_TRUE(moved.supports(MOESH_OP_MATMUL, MOESH_DTYPE_F32));

    auto other = moesh::load_backend(options({"better"}), nullptr);
    ASSERT_NE(other, nullptr);
    moved = std::move(*other); // releases good, takes better
    EXPECT_EQ(moved.name(), "better");
    EXPECT_TRUE(moved.supports(MOESH_OP_MATMUL, MOESH_DTYPE_F32));
}

TEST(Backend, UnloadsTheLibraryWhenDestroyed) {
    const std::string lib = case_lib("good");
    {
        auto be = moesh::load_backend(options({"good"}), nullptr);
        ASSERT_NE(be, nullptr);
        void * h = dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD);
        EXPECT_NE(h, nullptr);
        if (h) dlclose(h);
    }
    EXPECT_EQ(dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD), nullptr);
}

TEST(StatusName, NamesKnownAndUnknownCodes) {
    EXPECT_EQ(moesh::status_name(MOESH_OK), "MOESH_OK");
    EXPECT_EQ(moesh::status_name(MOESH_ERR_ABI_MISMATCH), "MOESH_ERR_ABI_MISMATCH");
    EXPECT_EQ(moesh::status_name(static_cast<moesh_status>(7)), "MOESH_STATUS_7");
}

// ---- the real CPU plugin -----------------------------------------------------------------

TEST(CpuPlugin, LoadsFromBuildTreeByName) {
#ifdef MOESH_HAVE_CPU_PLUGIN
    const std::string lib = std::string(MOESH_PLUGIN_BUILD_DIR) + "/libmoesh_backend_cpu.so";
    if (!fs::exists(lib)) GTEST_SKIP() << lib << " is not built";
    moesh::PluginOptions opts;
    opts.search_dirs = {MOESH_PLUGIN_BUILD_DIR};
    opts.preferred = "cpu";
    std::string report;
    auto be = moesh::load_backend(opts, &report);
    ASSERT_NE(be, nullptr) << report;
    EXPECT_EQ(be->name(), "cpu");
    EXPECT_EQ(be->path(), lib);
#else
    GTEST_SKIP() << "no moesh_backend_cpu target in this build";
#endif
}
