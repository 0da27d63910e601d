#!/usr/bin/env python3
"""moesh vs llama.cpp decoding a model whose experts do not fit in memory (issue #6, measure b).

    sudo python3 scripts/bench/placement_bench.py \\
        --model /work/llama-ref/models/moe/moe-mid-q8_0.gguf \\
        --llama-bench /work/llama-ref/build/bin/llama-bench --moesh build/bin/moesh \\
        [--percents 25,50] [--threads 2] [--tokens 32] [--configs heat,heat-prefetch]

Both engines run under the same cgroup-v1 memory limit, which also bounds the page cache:
    limit = non-expert bytes + X% of the expert bytes + 150 MB
(expert bytes: the GGUF's merged expert tensors, *_exps; non-expert: every other tensor).
llama.cpp mmaps the file (its default); moesh gets --expert-budget X% of the expert bytes
(the rest of its memory - attention, embeddings, KV cache, activations - must fit in the
remaining non-expert + 150 MB). Needs root (cgroup v1 memory controller at
/sys/fs/cgroup/memory, and /proc/sys/vm/drop_caches). Per percentage, in this order:
  1. the disk's sequential read bandwidth: dd iflag=direct bs=8M over the model file
     (page cache dropped first);
  2. llama-bench -m MODEL -t T -p 0 -n N -r 1 -o jsonl in the cgroup (page cache dropped first);
  3. moesh run with random prompt ids (16) and N + 1 tokens sampled at temperature 100 (close
     to uniform over the vocabulary, as llama-bench's random tokens), --expert-budget,
     --output json --trace, once per --configs entry (a [placement] policy, "-prefetch" for
     prefetch on), in the cgroup (page cache dropped first);
  4. moesh sim --replay steps on that trace at the store's slot count: Belady's misses, the
     yardstick, on the accesses the engine made (the prompt's tokens, computed in one forward
     pass, fetch each expert once; before, the sim counted them token by token, which made
     Belady read more than it would have and flattered moesh's ratio to it).
Bytes read from disk come from /usr/bin/time -v ("File system inputs", 512-byte blocks):
everything the process read, load included. moesh's own count of expert bytes read
(disk_bytes_per_token) is reported beside it. One JSON line per run on stdout.
Also one unconstrained run of each engine (no cgroup, warm page cache) for scale.
"""

import argparse
import json
import os
import pathlib
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time

CG_ROOT = pathlib.Path("/sys/fs/cgroup/memory")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def drop_caches():
    subprocess.run(["sync"], check=True)
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")


def gguf_split(path):
    import gguf  # PyPI gguf
    r = gguf.GGUFReader(path)
    experts = others = 0
    for t in r.tensors:
        if "_exps" in t.name:
            experts += int(t.n_bytes)
        else:
            others += int(t.n_bytes)
    return experts, others


def disk_gbps(path):
    drop_caches()
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"], capture_output=True, text=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", p.stderr)
    return int(m.group(1)) / float(m.group(2)) / 1e9 if m else None


class Cgroup:
    def __init__(self, name, limit):
        self.path = CG_ROOT / name
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        try:   # no swap beyond the limit where the kernel accounts it
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            pass

    def stat(self, key):
        return int((self.path / key).read_text())

    def close(self):
        try:
            self.path.rmdir()
        except OSError as e:
            log(f"note: cannot remove {self.path}: {e}")


def timed(cmd, cgroup, timeout):
    """Runs cmd (list) under /usr/bin/time -v, inside cgroup if given.
    -> dict(rc, stdout, stderr, read_bytes, max_rss_kb, wall)."""
    inner = ["/usr/bin/time", "-v"] + cmd
    if cgroup:
        inner = ["sh", "-c", f'echo $$ > {cgroup.path}/cgroup.procs && exec "$@"', "sh"] + inner
    t0 = time.time()
    try:
        p = subprocess.run(inner, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", (e.stderr or "") + "\n(timed out)"
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
    wall = time.time() - t0
    fs_in = re.search(r"File system inputs: (\d+)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {"rc": rc, "stdout": out, "stderr": err, "wall": wall,
            "read_bytes": int(fs_in.group(1)) * 512 if fs_in else None,
            "max_rss_kb": int(rss.group(1)) if rss else None}


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None


def run_llama(args, cgroup):
    cmd = [args.llama_bench, "-m", args.model, "-t", str(args.threads), "-p", "0", "-n", str(args.tokens), "-r", "1",
           "-o", "jsonl"]
    r = timed(cmd, cgroup, args.timeout)
    row = {"engine": "llama.cpp", "cmd": shlex.join(cmd), "rc": r["rc"], "wall_s": r["wall"], "read_bytes": r["read_bytes"],
           "max_rss_kb": r["max_rss_kb"]}
    j = None
    for line in r["stdout"].splitlines():
        if line.strip().startswith("{"):
            j = json.loads(line)
    if j:
        row["decode_tps"] = j.get("avg_ts")
        # llama-bench reads during load and a warm-up decode too: per generated token, load included
        row["read_bytes_per_token"] = r["read_bytes"] / args.tokens if r["read_bytes"] is not None else None
    else:
        row["error"] = r["stderr"][-800:]
    return row


def run_moesh(args, cgroup, budget, policy, prefetch, trace):
    random.seed(1)
    ids = ",".join(str(random.randrange(args.vocab)) for _ in range(16))
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f'[placement]\npolicy = "{policy}"\nprefetch = {"true" if prefetch else "false"}\n')
        config = f.name
    cmd = [args.moesh, "run", "-m", args.model, "--prompt-ids", ids, "-n", str(args.tokens + 1), "-t", str(args.threads),
           "--temperature", "100", "--seed", "3", "--output", "json", "--config", config]
    if budget:
        cmd += ["--expert-budget", str(budget), "--trace", trace]
    r = timed(cmd, cgroup, args.timeout)
    os.unlink(config)
    row = {"engine": "moesh", "policy": policy, "prefetch": prefetch, "cmd": shlex.join(cmd), "rc": r["rc"],
           "wall_s": r["wall"], "read_bytes": r["read_bytes"], "max_rss_kb": r["max_rss_kb"]}
    j = last_json(r["stdout"])
    if j and r["rc"] == 0:
        row["decode_tps"] = j["timings"]["decode_tokens_per_second"]
        row["prefill_tps"] = j["timings"]["prompt_tokens_per_second"]
        n_tok = j["timings"]["prompt_tokens"] + len(j["tokens"])
        row["read_bytes_per_token"] = r["read_bytes"] / n_tok if r["read_bytes"] is not None else None
        if "placement" in j:
            row["placement"] = j["placement"]
        slots = re.search(r"experts: (\d+) slots of", r["stderr"])
        row["slots"] = int(slots.group(1)) if slots else None
    else:
        row["error"] = r["stderr"][-800:]
    return row


def belady(args, trace, slots, n_routed, expert_bytes_each):
    pct = 100.0 * slots / n_routed
    p = subprocess.run([args.moesh, "sim", "--trace", trace, "--sizes", repr(pct), "--policies", "heat,lookahead,belady",
                        "--replay", "steps", "--output", "json"], capture_output=True, text=True)
    j = last_json(p.stdout)
    if not j:
        return {"error": p.stderr[-400:]}
    out = {"cache_percent": pct, "tokens": j["tokens"], "replay": j.get("replay"), "steps": j.get("steps")}
    for row in j["results"]:
        misses = row["requests"] - row["hits"]
        out[row["policy"]] = {"hit_rate": row["hit_rate"], "misses_per_token": misses / j["tokens"],
                              "bytes_per_token": misses * expert_bytes_each / j["tokens"]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--moesh", default="build/bin/moesh")
    ap.add_argument("--percents", default="25,50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--configs", default="heat,heat-prefetch", help="placement policies; -prefetch: prefetch on")
    ap.add_argument("--slack-mb", type=int, default=150)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--skip-unconstrained", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or not CG_ROOT.is_dir():
        sys.exit("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")

    expert_bytes, other_bytes = gguf_split(args.model)
    import gguf
    r = gguf.GGUFReader(args.model)
    n_layer = n_expert = None
    for k, f in r.fields.items():
        if k.endswith(".block_count"):
            n_layer = int(f.parts[-1][0])
        if k.endswith(".expert_count"):
            n_expert = int(f.parts[-1][0])
    n_routed = n_layer * n_expert
    each = expert_bytes / n_routed
    base = {"bench": "placement", "model": args.model, "threads": args.threads, "tokens": args.tokens,
            "expert_bytes": expert_bytes, "non_expert_bytes": other_bytes, "date": time.strftime("%Y-%m-%d %H:%M")}
    log(f"experts {expert_bytes / 1e9:.3f} GB ({n_routed} of {each / 1e6:.1f} MB), other tensors {other_bytes / 1e9:.3f} GB")

    if not args.skip_unconstrained:
        for fn in (lambda: run_llama(args, None), lambda: run_moesh(args, None, 0, "heat", False, None)):
            fn()   # warm the page cache
            row = fn()
            print(json.dumps({**base, "percent": 100, "limit_bytes": None, **row}), flush=True)

    for pct in [float(x) for x in args.percents.split(",")]:
        limit = int(other_bytes + pct / 100 * expert_bytes + args.slack_mb * 1e6)
        budget = int(pct / 100 * expert_bytes)
        gbps = disk_gbps(args.model)
        log(f"X = {pct}%: limit {limit / 1e9:.3f} GB, moesh expert budget {budget / 1e9:.3f} GB, disk {gbps:.2f} GB/s")
        common = {**base, "percent": pct, "limit_bytes": limit, "disk_seq_gbps": gbps}
        cg = Cgroup(f"moesh-bench-{int(pct)}", limit)
        try:
            drop_caches()
            row = run_llama(args, cg)
            row["cgroup_max_usage"] = cg.stat("memory.max_usage_in_bytes")
            print(json.dumps({**common, **row}), flush=True)
            for c in args.configs.split(","):
                policy, prefetch = c.replace("-prefetch", ""), c.endswith("-prefetch")
                (cg.path / "memory.max_usage_in_bytes").write_text("0")
                drop_caches()
                trace = tempfile.mktemp(suffix=".jsonl")
                row = run_moesh(args, cg, budget, policy, prefetch, trace)
                row["cgroup_max_usage"] = cg.stat("memory.max_usage_in_bytes")
                row["cgroup_oom_kills"] = int(re.search(r"oom_kill (\d+)", (cg.path / "memory.oom_control").read_text()).group(1)) \
                    if "oom_kill" in (cg.path / "memory.oom_control").read_text() else None
                if row.get("slots") and os.path.exists(trace):
                    row["sim"] = belady(args, trace, row["slots"], n_routed, each)
                if os.path.exists(trace):
                    os.unlink(trace)
                print(json.dumps({**common, **row}), flush=True)
        finally:
            cg.close()


if __name__ == "__main__":
    main()
