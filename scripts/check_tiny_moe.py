#!/usr/bin/env python3
"""Check that moesh runs a model folder written by scripts/train_tiny_moe.py as transformers does.

  1. Tokenizer: `moesh tokenize --add-special` gives the ids of transformers.AutoTokenizer on a few
     Python snippets and on the whole heldout.txt.
  2. Logits: `moesh run --prompt ... --dump-logits` against Qwen3MoeForCausalLM in float32 fed the
     same ids (the prompt and the tokens moesh generated, teacher-forced): max |diff| over all rows,
     relative to the largest |logit|.
  3. Optionally (--perplexity) `moesh perplexity --file heldout.txt --ctx N` against
     eval.json's ppl_llamacpp_style.

Usage:
    python3 scripts/check_tiny_moe.py --model models/moesh-tiny-py [--moesh build/bin/moesh] [--perplexity]
Exit status 0 when everything agrees within the tolerances (--rtol for logits, --ppl-rtol).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

SNIPPETS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\nclass Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self, x=1):\n"
    "        self.x = x  # comment\n",
    "for i in range(10):\n\tprint(f'{i:>3} \\u00e9\\N{BULLET} caf\u00e9 \u65e5\u672c\u8a9e', end='')\n",
    "x = [1, 2.5e-3, 0x1F, 'a''b', r\"\\d+\"]  \n\n\n   \n",
    "<|endoftext|>def main():\n    return 0<|endoftext|>",
    "  leading spaces and trailing   ",
    "a = 1\r\nb = '\r'\r\n",
    "\u00a0non-breaking\u2003space \U0001F600 emoji",
]


def moesh(exe: str, *args: str) -> str:
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"moesh {' '.join(args[:3])} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--moesh", default="build/bin/moesh")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rtol", type=float, default=1e-4, help="max |diff| / max |logit| allowed")
    ap.add_argument("--perplexity", action="store_true")
    ap.add_argument("--ppl-rtol", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder = pathlib.Path(args.model)
    ok = True
    tok = AutoTokenizer.from_pretrained(str(folder))

    # 1. tokenizer
    texts = list(SNIPPETS)
    heldout = folder / "heldout.txt"
    for i, text in enumerate(texts):
        want = tok(text)["input_ids"]
        got = json.loads(moesh(args.moesh, "tokenize", "--model", str(folder), "--text", text, "--add-special",
                               "--output", "json").splitlines()[-1])["ids"]
        if got != want:
            ok = False
            print(f"tokenize snippet {i}: DIFFERENT\n  moesh {got}\n  hf    {want}")
    print(f"tokenize: {len(texts)} snippets compared")
    if heldout.exists():
        want = tok(heldout.read_bytes().decode("utf-8"), verbose=False)["input_ids"]  # keep \r as it is
        got = json.loads(moesh(args.moesh, "tokenize", "--model", str(folder), "--file", str(heldout), "--add-special",
                               "--output", "json").splitlines()[-1])["ids"]
        same = got == want
        ok &= same
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        print(f"tokenize heldout.txt: {len(want)} ids, {'same' if same else f'DIFFERENT from index {first}'}")

    # 2. logits
    npy = folder.parent / f".{folder.name}.check_logits.npy"
    run = json.loads(moesh(args.moesh, "run", "--model", str(folder), "--prompt", args.prompt, "-n", str(args.n),
                           "--output", "json", "--dump-logits", str(npy), "-t", str(args.threads)).splitlines()[-1])
    got = np.load(npy)
    npy.unlink()
    ids = run["prompt_ids"] + run["tokens"][:-1]
    if run["prompt_ids"] != tok(args.prompt)["input_ids"]:
        ok = False
        print("prompt ids differ from AutoTokenizer's")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    if got.shape != want.shape:
        print(f"logits: shape {got.shape} from moesh, {want.shape} from transformers")
        return 1
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    argmax_same = bool((got.argmax(-1) == want.argmax(-1)).all())
    rel = diff / scale
    ok &= rel <= args.rtol
    print(f"logits: {got.shape[0]} rows x {got.shape[1]}: max |diff| {diff:.3e}, max |logit| {scale:.3f}, "
          f"relative {rel:.2e} ({'ok' if rel <= args.rtol else 'TOO LARGE'}); argmax same on every row: {argmax_same}")
    print(f"moesh generated: {json.dumps(run['text'])}")

    # 3. perplexity
    if args.perplexity:
        ev = json.loads((folder / "eval.json").read_text())["ppl_llamacpp_style"]
        r = json.loads(moesh(args.moesh, "perplexity", "--model", str(folder), "--file", str(heldout), "--ctx",
                             str(ev["n_ctx"]), "--output", "json", "-t", str(args.threads)).splitlines()[-1])
        rel = abs(r["ppl"] - ev["ppl"]) / ev["ppl"]
        ok &= rel <= args.ppl_rtol and r["scored"] == ev["n_scored"]
        print(f"perplexity n_ctx {ev['n_ctx']}: moesh {r['ppl']:.5f} ({r['scored']} scored, {r['tokens']} tokens), "
              f"eval.json {ev['ppl']:.5f} ({ev['n_scored']} scored, {ev['n_tokens']} tokens): relative diff {rel:.2e}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
