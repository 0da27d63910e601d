#!/usr/bin/env python3
"""Read-only memory bandwidth probe; prints one JSON line {"gbps": ..., ...}.

    python3 scripts/bench/bw_probe.py [--gib 1] [--threads 1] [--reps 5]

Reads a float32 buffer of --gib GiB with np.max (a SIMD max, cheaper than np.sum's
pairwise sum; ufunc reductions release the GIL, so --threads N
splits the buffer into N slices reduced by N Python threads). Reports the best of
--reps passes (GB/s = 1e9 bytes/s) and the median. A rough probe for notes and for
scripts/bench/compare_llamacpp.py --probe; it is not a STREAM replacement.
"""
import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n = int(a.gib * (1 << 30)) // 4
    buf = np.ones(n, dtype=np.float32)  # touched, so pages are resident
    parts = np.array_split(buf, a.threads)
    times = []
    with ThreadPoolExecutor(a.threads) as ex:
        list(ex.map(np.max, parts))  # warm-up
        for _ in range(a.reps):
            t0 = time.perf_counter()
            list(ex.map(np.max, parts))
            times.append(time.perf_counter() - t0)
    nbytes = buf.nbytes
    print(json.dumps({"probe": "numpy-max", "bytes": nbytes, "threads": a.threads, "reps": a.reps,
                      "gbps": nbytes / min(times) / 1e9,
                      "gbps_median": nbytes / statistics.median(times) / 1e9}))


if __name__ == "__main__":
    main()
