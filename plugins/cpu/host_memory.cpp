#include "host_memory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace moesh::cpu {

namespace {

// First line of a small text file, without the newline; empty if unreadable.
std::string read_line(const std::string & path) {
    std::string line;
    if (FILE * f = std::fopen(path.c_str(), "r")) {
        char buf[512];
        if (std::fgets(buf, sizeof buf, f)) {
            line = buf;
            while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) {
                line.pop_back();
            }
        }
        std::fclose(f);
    }
    return line;
}

// A decimal byte count; false for "max", empty or garbage.
bool parse_u64(const std::string & s, uint64_t * out) {
    if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) {
        return false;
    }
    *out = std::strtoull(s.c_str(), nullptr, 10);
    return true;
}

uint64_t mem_available_from_proc() {
    uint64_t kib = 0;
    if (FILE * f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        while (std::fgets(line, sizeof line, f)) {
            unsigned long long v = 0;
            if (std::sscanf(line, "MemAvailable: %llu kB", &v) == 1) {
                kib = v;
                break;
            }
        }
        std::fclose(f);
    }
    return kib * 1024;
}

// Path of this process's cgroup for a v1 controller ("memory") or v2 (""),
// from /proc/self/cgroup lines "id:controllers:path".
std::string cgroup_path(const char * controller) {
    std::string result;
    if (FILE * f = std::fopen("/proc/self/cgroup", "r")) {
        char line[1024];
        while (std::fgets(line, sizeof line, f)) {
            const char * c1 = std::strchr(line, ':');
            const char * c2 = c1 ? std::strchr(c1 + 1, ':') : nullptr;
            if (!c2) {
                continue;
            }
            const std::string controllers(c1 + 1, c2);
            bool match = controllers == controller;
            if (!match && *controller) {
                // "cpu,cpuacct"-style lists
                size_t start = 0;
                while (start <= controllers.size()) {
                    size_t end = controllers.find(',', start);
                    if (end == std::string::npos) {
                        end = controllers.size();
                    }
                    if (controllers.compare(start, end - start, controller) == 0) {
                        match = true;
                        break;
                    }
                    start = end + 1;
                }
            }
            if (match) {
                result = c2 + 1;
                while (!result.empty() && result.back() == '\n') {
                    result.pop_back();
                }
                break;
            }
        }
        std::fclose(f);
    }
    return result;
}

// Value of a "key value" line of a cgroup memory.stat file, 0 if absent.
uint64_t stat_value(const std::string & path, const char * key) {
    uint64_t value = 0;
    if (FILE * f = std::fopen(path.c_str(), "r")) {
        char name[128];
        unsigned long long v = 0;
        while (std::fscanf(f, "%127s %llu", name, &v) == 2) {
            if (std::strcmp(name, key) == 0) {
                value = v;
                break;
            }
        }
        std::fclose(f);
    }
    return value;
}

// Limit and usage of the cgroup; false when there is no limit. Usage leaves
// out inactive page cache (the kernel reclaims it before it refuses memory),
// as container runtimes do for their "working set".
bool cgroup_limit(uint64_t * limit, uint64_t * usage) {
    struct Candidate {
        std::string dir;
        const char * limit_file;
        const char * usage_file;
        const char * inactive_key;   // in memory.stat
    };
    const std::string v1 = cgroup_path("memory");
    const std::string v2 = cgroup_path("");
    const Candidate candidates[] = {
        {"/sys/fs/cgroup" + v2, "memory.max", "memory.current", "inactive_file"},
        {"/sys/fs/cgroup/memory" + v1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"},
        // Inside a container the namespaced root is the process's own group.
        {"/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"},
        {"/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"},
    };
    for (const Candidate & c : candidates) {
        uint64_t l = 0;
        if (parse_u64(read_line(c.dir + "/" + c.limit_file), &l)) {
            uint64_t u = 0;
            parse_u64(read_line(c.dir + "/" + c.usage_file), &u);
            // v1 reports "no limit" as a huge page-aligned number.
            if (l >= (uint64_t(1) << 60)) {
                continue;
            }
            const uint64_t inactive = stat_value(c.dir + "/memory.stat", c.inactive_key);
            *limit = l;
            *usage = u > inactive ? u - inactive : 0;
            return true;
        }
    }
    return false;
}

} // namespace

bool query_host_memory(HostMemory * out) {
    const long n_pages = sysconf(_SC_PHYS_PAGES);
    const long page_size = sysconf(_SC_PAGESIZE);
    if (n_pages <= 0 || page_size <= 0) {
        return false;
    }
    uint64_t total = uint64_t(n_pages) * uint64_t(page_size);
    uint64_t avail = mem_available_from_proc();
    if (avail == 0) {
        const long n_avail = sysconf(_SC_AVPHYS_PAGES);
        avail = n_avail > 0 ? uint64_t(n_avail) * uint64_t(page_size) : 0;
    }
    uint64_t limit = 0;
    uint64_t usage = 0;
    if (cgroup_limit(&limit, &usage) && limit < total) {
        total = limit;
        avail = std::min(avail, limit > usage ? limit - usage : 0);
    }
    out->total_bytes = total;
    out->free_bytes = std::min(avail, total);
    return true;
}

} // namespace moesh::cpu
