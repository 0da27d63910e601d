#!/usr/bin/env python3
"""PyTorch's own bf16 rates on the GPU, the yardstick for moesh_bench_cuda's numbers.

    python3 scripts/bench/torch_bench.py [--seconds 0.5]

Prints JSON lines:
  {"bench": "torch_matmul", "dtype": "bf16", "m": 8192, "n": 8192, "k": 8192, "tflops": ...}
  {"bench": "torch_gemv", "dtype": "bf16", "n_out": 14336, "n_in": 4096, "weight_gbps": ...}
The GEMV rotates over copies of W (>= 512 MiB in all) so that every call reads W from device
memory. Times are CUDA-event times, best of the trials. Exits with 77 (skipped) when torch is
missing or sees no CUDA device. Run by scripts/device-check.sh.
"""

import argparse
import json
import sys


def best_seconds(torch, fn, n_per_trial, seconds):
    """Best per-call time over trials of n_per_trial calls, for about `seconds` in all."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    best, spent = None, 0.0
    while spent < seconds or best is None:
        start.record()
        for _ in range(n_per_trial):
            fn()
        stop.record()
        stop.synchronize()
        t = start.elapsed_time(stop) / 1e3
        spent += t
        best = t / n_per_trial if best is None else min(best, t / n_per_trial)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(f"torch_bench: no torch here ({e}): skipped", file=sys.stderr)
        return 77
    if not torch.cuda.is_available():
        print(f"torch_bench: torch {torch.__version__} sees no CUDA device: skipped", file=sys.stderr)
        return 77
    dev = torch.device("cuda")
    print(json.dumps({"bench": "torch_device", "torch": torch.__version__, "cuda": torch.version.cuda,
                      "name": torch.cuda.get_device_name(0)}), flush=True)

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    s = best_seconds(torch, lambda: torch.matmul(a, b), 10, args.seconds)
    print(json.dumps({"bench": "torch_matmul", "dtype": "bf16", "m": n, "n": n, "k": n,
                      "us_per_call": s * 1e6, "tflops": 2.0 * n ** 3 / s / 1e12}), flush=True)
    del a, b

    n_out, n_in = 14336, 4096
    w_bytes = n_out * n_in * 2
    n_copies = max(2, -(-(512 << 20) // w_bytes))
    ws = [torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) for _ in range(n_copies)]
    x = torch.randn(n_in, device=dev, dtype=torch.bfloat16)
    i = [0]

    def gemv():
        i[0] += 1
        return torch.mv(ws[i[0] % n_copies], x)

    s = best_seconds(torch, gemv, 50, args.seconds)
    print(json.dumps({"bench": "torch_gemv", "dtype": "bf16", "n_out": n_out, "n_in": n_in, "n_copies": n_copies,
                      "us_per_call": s * 1e6, "weight_gbps": w_bytes / s / 1e9}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
