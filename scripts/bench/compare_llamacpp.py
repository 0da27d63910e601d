#!/usr/bin/env python3
"""moesh vs llama.cpp on the synthetic MoE GGUFs, with a memory-bandwidth roofline.

    python3 scripts/bench/compare_llamacpp.py \
        --models-dir /work/llama-ref/models/moe \
        --llama-bench /work/llama-ref/build/bin/llama-bench \
        --probe "build/bin/moesh_bench_gguf --probe-only --probe-gib 1 --threads {threads}" \
        --moesh "build/bin/moesh_bench_gguf --model {model} --threads {threads} --prompt {prompt} --gen {tokens} --reps 3 --probe-gib 0.25" \
        [--shapes moe-small,moe-mid] [--types q8_0,q4_0] [--threads 1,2] [--reps 3]

For every shape x type x threads it runs, in this order:
  1. the probe (template; {threads} substituted) - must print a JSON line with "gbps";
  2. llama-bench -m MODEL -p 128 -n 64 -d 0,128 -t THREADS -r REPS -o jsonl  (pp128 at depth 0
     and tg64 at depth 128, i.e. 64 tokens decoded after a 128-token context;
     llama_cpp.prefill_tps / decode_tps are the MEDIAN of llama-bench's per-repetition
     samples, robust to preemption on a shared machine; *_mean/_stddev are llama-bench's
     own avg_ts/stddev_ts, *_best the fastest repetition, *_samples all of them);
  3. the moesh command (template; {model} {threads} {prompt} {tokens} substituted) - must
     print JSON lines with "prefill_tps" and/or "decode_tps" (moesh_bench_gguf prints the
     median of its repetitions, as taken from llama-bench above); if it is missing, fails or
     prints neither, the row says so in moesh.error and the ratios are null;
  4. the probe again.
and prints one JSON line per combination (stdout; progress on stderr).

Models are MODELS_DIR/<shape>-<type>.gguf as written by scripts/bench/make_moe_gguf.py
(--generate writes missing ones). Roofline: weight bytes read per decoded token, from the
GGUF's own tensor sizes = every tensor that is not an expert tensor (attention, norms,
router, shared experts, output; token_embd excluded) + top-k/n_expert of each merged
expert tensor (*_exps) + one row of token_embd (+ all of token_embd if there is no
output.weight, i.e. tied embeddings). roofline_decode_tps = bandwidth / bytes_per_token
with bandwidth = mean of the probe before and after; decode_roofline_fraction =
measured decode t/s / roofline_decode_tps. KV-cache and activation traffic are ignored,
so the fraction is an upper-bound-style efficiency measure (at 64 tokens KV is tiny).
Each row also records the 1-minute load average before and after: on a shared machine,
runs with threads == cores are easily wrecked by other processes (spinning barriers).
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, timeout):
    """-> (rc, stdout, stderr); rc is None when it could not start or timed out."""
    try:
        p = subprocess.run(cmd if isinstance(cmd, list) else shlex.split(cmd), capture_output=True,
                           text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except FileNotFoundError as e:
        return None, "", f"cannot start: {e}"
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"timed out after {timeout}s"


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def probe(template, threads, timeout):
    if not template:
        return {"error": "no --probe given"}
    cmd = template.format(threads=threads)
    rc, out, err = run(cmd, timeout)
    rows = [j for j in json_lines(out) if "gbps" in j]
    if rc != 0 or not rows:
        return {"cmd": cmd, "error": f"rc={rc}; {err.strip()[-500:]}"}
    return {"cmd": cmd, "gbps": float(rows[-1]["gbps"])}


def bytes_per_token(model_path):
    import gguf
    r = gguf.GGUFReader(str(model_path))
    arch = r.fields["general.architecture"].contents()

    def kv(name, default=None):
        f = r.fields.get(f"{arch}.{name}")
        return f.contents() if f is not None else default

    n_expert = int(kv("expert_count", 0) or 0)
    n_used = int(kv("expert_used_count", 0) or 0)
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    emb = sizes.get("token_embd.weight", 0)
    n_vocab = next((int(t.shape[1]) for t in r.tensors if t.name == "token_embd.weight"), 1)
    experts = sum(v for n, v in sizes.items() if "_exps." in n)
    non_expert = sum(v for n, v in sizes.items() if "_exps." not in n and n != "token_embd.weight")
    tied = "output.weight" not in sizes
    total = non_expert + (experts * n_used // n_expert if n_expert else experts) + emb // n_vocab + (emb if tied else 0)
    return {"total": total, "non_expert": non_expert, "experts_all": experts, "n_expert": n_expert,
            "n_expert_used": n_used, "embedding_row": emb // n_vocab, "tied_output": tied,
            "file_bytes": model_path.stat().st_size}


def llama_bench(binary, model, threads, prompt, tokens, reps, timeout):
    # depth 0 and `prompt`: prefill from an empty context, decode after a prompt-long one (as moesh measures)
    cmd = [str(binary), "-m", str(model), "-p", str(prompt), "-n", str(tokens), "-t", str(threads),
           "-d", f"0,{prompt}", "-r", str(reps), "-o", "jsonl"]
    rc, out, err = run(cmd, timeout)
    res = {"cmd": " ".join(shlex.quote(c) for c in cmd)}
    rows = json_lines(out)
    if rc != 0 or not rows:
        res["error"] = f"rc={rc}; {err.strip()[-800:]}"
        return res
    for j in rows:
        depth = j.get("n_depth", 0)
        if j.get("n_prompt") == prompt and j.get("n_gen") == 0 and depth == 0:
            key = "prefill"
        elif j.get("n_gen") == tokens and j.get("n_prompt") == 0 and depth == prompt:
            key = "decode"
        else:
            continue
        samples = sorted(j.get("samples_ts") or [j["avg_ts"]])
        res[f"{key}_tps"] = statistics.median(samples)
        res[f"{key}_tps_mean"], res[f"{key}_tps_stddev"] = j["avg_ts"], j["stddev_ts"]
        res[f"{key}_tps_best"], res[f"{key}_tps_samples"] = samples[-1], j.get("samples_ts")
    res["build"] = f'{rows[0].get("build_number")} ({rows[0].get("build_commit")})'
    res["cpu_info"] = rows[0].get("cpu_info")
    return res


def moesh(template, model, threads, prompt, tokens, timeout):
    if not template:
        return {"error": "no --moesh command given"}
    try:
        cmd = template.format(model=model, threads=threads, prompt=prompt, tokens=tokens)
    except (KeyError, IndexError) as e:
        return {"error": f"bad --moesh template: {e}"}
    rc, out, err = run(cmd, timeout)
    res = {"cmd": cmd}
    rows = json_lines(out)
    for j in rows:
        for k in ("prefill_tps", "decode_tps"):
            if k in j:
                res[k] = float(j[k])
    if rc != 0 or not any(k in res for k in ("prefill_tps", "decode_tps")):
        what = ("could not run" if rc is None else f"exited with status {rc}" if rc != 0
                else "printed no prefill_tps/decode_tps JSON line")
        res["error"] = f"moesh command {what}; stderr tail: {err.strip()[-800:]!r}"
    return res


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--probe", default=f"{sys.executable} {HERE / 'bw_probe.py'} --threads {{threads}}")
    ap.add_argument("--moesh", default="")
    ap.add_argument("--shapes", default="moe-small,moe-mid")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per command")
    ap.add_argument("--generate", action="store_true", help="write missing GGUFs with make_moe_gguf.py")
    a = ap.parse_args()

    mdir = pathlib.Path(a.models_dir)
    n_fail = 0
    for shape in a.shapes.split(","):
        for qtype in a.types.split(","):
            model = mdir / f"{shape}-{qtype}.gguf"
            if not model.exists() and a.generate:
                subprocess.run([sys.executable, str(HERE / "make_moe_gguf.py"), "--shape", shape, "--type", qtype,
                                "--out", str(mdir)], check=True)
            if not model.exists():
                print(json.dumps({"shape": shape, "type": qtype, "model": str(model), "error": "model missing"}))
                n_fail += 1
                continue
            bpt = bytes_per_token(model)
            for threads in [int(t) for t in a.threads.split(",")]:
                log(f"== {model.name} threads={threads}")
                t0 = time.time()
                load0 = os.getloadavg()[0]
                p0 = probe(a.probe, threads, a.timeout)
                lb = llama_bench(a.llama_bench, model, threads, a.prompt, a.tokens, a.reps, a.timeout)
                ms = moesh(a.moesh, model, threads, a.prompt, a.tokens, a.timeout)
                p1 = probe(a.probe, threads, a.timeout)
                bws = [p["gbps"] for p in (p0, p1) if "gbps" in p]
                bw = sum(bws) / len(bws) if bws else None
                roof = bw * 1e9 / bpt["total"] if bw else None
                row = {
                    "shape": shape, "type": qtype, "model": str(model), "threads": threads,
                    "prompt": a.prompt, "tokens": a.tokens,
                    "bandwidth_gbps_before": p0.get("gbps"), "bandwidth_gbps_after": p1.get("gbps"),
                    "bandwidth_gbps": bw, "probe_errors": [p["error"] for p in (p0, p1) if "error" in p] or None,
                    "bytes_per_token": bpt, "roofline_decode_tps": roof,
                    "llama_cpp": lb, "moesh": ms,
                    "ratio_moesh_over_llamacpp": {"prefill": ratio(ms.get("prefill_tps"), lb.get("prefill_tps")),
                                                  "decode": ratio(ms.get("decode_tps"), lb.get("decode_tps"))},
                    "decode_roofline_fraction": {"llama_cpp": ratio(lb.get("decode_tps"), roof),
                                                 "moesh": ratio(ms.get("decode_tps"), roof)},
                    "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
                    "wall_s": round(time.time() - t0, 1),
                }
                n_fail += "error" in lb or "error" in ms
                if "error" in ms:
                    log(f"   moesh: {ms['error']}")
                if "error" in lb:
                    log(f"   llama-bench: {lb['error']}")
                print(json.dumps(row), flush=True)
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
