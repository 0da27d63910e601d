#!/usr/bin/env python3
"""Reference outputs of the shipped model (models/moesh-tiny-py), from Hugging Face transformers only,
for tests/runtime/shipped_model_test.cpp (which runs moesh on the same inputs in CI).

    pip install -r scripts/requirements-train.txt
    python3 scripts/make_shipped_model_references.py [--model models/moesh-tiny-py] \
        [--out tests/fixtures/shipped/moesh-tiny-py]

Writes into --out:
  reference.json      versions; per prompt: the text, its ids (AutoTokenizer, BOS added as the
                      tokenizer does) and 24 greedy tokens: the argmax of the model's forward over the
                      whole sequence, step by step (float32, no EOS stop), and the smallest top-1/top-2
                      logit gap met on the way;
                      the perplexity of the first 8 chunks of 512 tokens of heldout.txt, as llama.cpp's
                      perplexity tool (and `moesh perplexity --ctx 512 --chunks 8`) defines it
  prompt<i>.logits.npy  float32 teacher-forced logits over prompt + generated[:-1], [n, vocab]
Deterministic: float32, 1 thread, greedy.

Why not model.generate(): with transformers 5.24 on this model, generate()'s logits differ from the
model's own forward on the same ids (seen: 4.85 vs 5.04 for one token, enough to change the greedy
choice), with or without its KV cache; moesh agrees with the forward to ~1e-6. Not investigated
further.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys

import numpy as np

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n    def __init__(self",
    "    for key, value in sorted(items.items()):\n        if",
]
N_GENERATE = 24
N_CTX = 512
N_CHUNKS = 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/moesh-tiny-py")
    ap.add_argument("--out", default="tests/fixtures/shipped/moesh-tiny-py")
    ap.add_argument("--n-ctx", type=int, default=N_CTX, help="perplexity chunk length")
    args = ap.parse_args()
    n_ctx = args.n_ctx

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    folder = pathlib.Path(args.model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()

    prompts = []
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            ids = tok(text)["input_ids"]
            seq, min_gap = list(ids), math.inf
            for _ in range(N_GENERATE):
                last = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                top2 = torch.topk(last, 2).values
                min_gap = min(min_gap, float(top2[0] - top2[1]) / float(last.abs().max()))
                seq.append(int(last.argmax()))
            new = seq[len(ids):]
            logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0].float().numpy()
            assert (logits[len(ids) - 1:].argmax(-1) == np.array(new)).all(), f"prompt {i}: teacher-forced argmax differs"
            np.save(out / f"prompt{i}.logits.npy", logits.astype(np.float32))
            prompts.append(dict(text=text, ids=ids, generated=new, min_top2_gap_relative=min_gap))
            print(f"prompt {i}: {len(ids)} ids -> {json.dumps(tok.decode(new))} "
                  f"(smallest top-2 gap {min_gap:.2e} of the largest logit)")
            assert min_gap > 1e-4, f"prompt {i}: a near tie; choose another prompt"

        # llama.cpp's perplexity over the first N_CHUNKS chunks of heldout.txt (less one trailing newline, BOS added)
        text = (folder / "heldout.txt").read_bytes().decode("utf-8")
        if text.endswith("\n"):
            text = text[:-1]
        ids = tok(text, add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id
        add_bos = len(ids) > 0 and ids[0] == bos
        n_chunk = min(N_CHUNKS, len(ids) // n_ctx)
        first = n_ctx // 2
        nll, count = 0.0, 0
        for c in range(n_chunk):
            chunk = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
            if add_bos:
                chunk[0, 0] = bos
            lp = torch.log_softmax(model(input_ids=chunk, use_cache=False).logits[0].float(), dim=-1)
            for j in range(first, n_ctx - 1):
                nll -= float(lp[j, int(chunk[0, j + 1])])
                count += 1
    ppl = math.exp(nll / count)
    print(f"perplexity, {n_chunk} chunks of {n_ctx}: {ppl:.6f} ({count} scored)")

    ref = dict(
        model=str(folder),
        generator="scripts/make_shipped_model_references.py",
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                      tokenizers=__import__("tokenizers").__version__, numpy=np.__version__),
        n_generate=N_GENERATE,
        prompts=prompts,
        perplexity=dict(n_ctx=n_ctx, n_chunks=n_chunk, ppl=ppl, n_scored=count, bos_added=add_bos, file="heldout.txt"),
    )
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
