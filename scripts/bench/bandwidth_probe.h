// Read-only memory bandwidth probe: vectorised sums over a buffer much larger
// than the caches, on n threads, best of several passes. The ceiling that a
// memory-bound decode step is compared with.
#pragma once

#include <cstddef>

namespace moesh::bench {

// Bytes per second; buffer_bytes is rounded down to whole vectors.
double measure_read_bandwidth(size_t buffer_bytes, int n_threads, int n_passes);

} // namespace moesh::bench
