#!/usr/bin/env python3
"""Greedy tokens of `moesh run` on the shipped model against transformers' references.

    python3 scripts/check_golden.py --moesh build/bin/moesh [--backend cuda] [--plugin-dir D]
        [--gpu-budget 7MiB] [--model models/moesh-tiny-py]
        [--reference tests/fixtures/shipped/moesh-tiny-py/reference.json]

For each reference prompt (written by scripts/make_shipped_model_references.py with transformers,
not by moesh) runs `moesh run --prompt-ids IDS -n N --output json` and compares the tokens. With
--gpu-budget, a [[tier]] of kind "gpu" with that budget holds part of the routed experts (the
rest promoted or computed on the cpu plugin), so a device backend's copy queue and prefetch into
device memory are exercised too. scripts/device-check.sh runs it on a lent GPU (cuda); here it
runs with --backend devsim --plugin-dir build/test_plugins/devsim or with the cpu plugin.
Prints one JSON line per prompt and a summary line; exits 1 on any mismatch or failed run.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moesh", default=str(ROOT / "build" / "bin" / "moesh"))
    ap.add_argument("--backend", help="moesh run --backend (default: moesh's choice)")
    ap.add_argument("--plugin-dir", help="moesh run --plugin-dir")
    ap.add_argument("--gpu-budget", help="a gpu tier of this budget (e.g. 7MiB) holds part of the experts")
    ap.add_argument("--model", default=str(ROOT / "models" / "moesh-tiny-py"))
    ap.add_argument("--reference", default=str(ROOT / "tests" / "fixtures" / "shipped" / "moesh-tiny-py" / "reference.json"))
    ap.add_argument("--timeout", type=float, default=120, help="seconds per run")
    args = ap.parse_args()

    ref = json.load(open(args.reference))
    config = None
    if args.gpu_budget:
        f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        f.write(f'[[tier]]\nname = "gpu0"\nkind = "gpu"\nbudget = "{args.gpu_budget}"\n')
        f.close()
        config = f.name
    failed = 0
    try:
        for i, p in enumerate(ref["prompts"]):
            want = p["generated"]
            cmd = [args.moesh, "run", "--model", args.model, "--prompt-ids", ",".join(map(str, p["ids"])),
                   "-n", str(len(want)), "--output", "json"]
            if args.backend:
                cmd += ["--backend", args.backend]
            if args.plugin_dir:
                cmd += ["--plugin-dir", args.plugin_dir]
            if config:
                cmd += ["--config", config]
            line = {"check": "golden", "prompt": i, "backend": args.backend, "gpu_budget": args.gpu_budget}
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                line.update(ok=False, error="timed out")
                print(json.dumps(line), flush=True)
                failed += 1
                continue
            out = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if r.returncode != 0 or not out:
                line.update(ok=False, error=f"exit {r.returncode}: {(r.stderr or r.stdout)[-300:]}")
                print(json.dumps(line), flush=True)
                failed += 1
                continue
            j = json.loads(out[-1])
            got = j.get("tokens", [])
            first_diff = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
            ok = got == want
            line.update(ok=ok, n=len(want), first_diff=first_diff, backend_used=j.get("backend"),
                        min_top2_gap_relative=p.get("min_top2_gap_relative"))
            if "gpu_tier" in j:
                g = j["gpu_tier"]
                line["gpu_tier"] = {k: g.get(k) for k in ("requests", "hits", "promotions", "in_place",
                                                          "async_uploads", "async_bytes_timed", "async_upload_seconds",
                                                          "prefetches", "prefetch_hits")}
            if not ok:
                line.update(got=got, want=want)
                failed += 1
            print(json.dumps(line), flush=True)
    finally:
        if config:
            os.unlink(config)
    print(json.dumps({"check": "golden_summary", "prompts": len(ref["prompts"]), "failed": failed,
                      "backend": args.backend, "gpu_budget": args.gpu_budget}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
