// Host RAM as a process on this machine may use it: physical memory and
// MemAvailable, both capped by the memory limit of the process's cgroup (v2
// memory.max or v1 memory.limit_in_bytes) when one is set.
#pragma once

#include <cstdint>

namespace moesh::cpu {

struct HostMemory {
    uint64_t free_bytes = 0;
    uint64_t total_bytes = 0;
};

// Reads /proc and /sys; false when not even the physical size is known.
bool query_host_memory(HostMemory * out);

} // namespace moesh::cpu
