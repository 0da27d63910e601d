#!/usr/bin/env python3
"""Greedy tokens of the shipped model (models/moesh-tiny-py) under sampling penalties, from
implementations not written here, for tests/runtime/shipped_model_test.cpp:

  logit bias   transformers' SequenceBiasLogitsProcessor with one-token sequences
  repetition   transformers' RepetitionPenaltyLogitsProcessor (prompt and output tokens)
  frequency,   llama.cpp's penalties sampler (llama_sampler_init_penalties, through
  presence     llama-cpp-python's C API) fed the output tokens only, as OpenAI defines them

and together in vLLM's order (bias, repetition, then frequency and presence). Logits come from
transformers' forward over the whole sequence at each step (float32, 1 thread), as in
scripts/make_shipped_model_references.py (not generate(): see there).

    pip install -r scripts/requirements-train.txt
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36   # builds llama.cpp from the sdist
    python3 scripts/make_penalty_references.py [--model models/moesh-tiny-py] \\
        [--out tests/fixtures/shipped/moesh-tiny-py/penalties.json]

Writes one JSON file: versions, and per case and prompt the 24 greedy tokens and the smallest
gap between the two largest penalized logits met on the way (a tie would make the case fragile);
and "rows": per case, a seeded random row of 64 logits, a prompt and an output history (with
repeats, and ids the row's tokens on both sides of 0), and the whole row after the penalties, so
that each penalty's arithmetic is checked value by value, not only where it moves an argmax.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import pathlib
import platform
import sys

PROMPT_IDS_FROM = "tests/fixtures/shipped/moesh-tiny-py/reference.json"   # the same prompts as the other references
N_GENERATE = 24
CASES = [
    dict(repetition_penalty=1.3, frequency_penalty=0.0, presence_penalty=0.0),
    dict(repetition_penalty=1.0, frequency_penalty=0.5, presence_penalty=0.3),
    dict(repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=-0.2),
    dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.0, logit_bias=[[277, -100.0], [339, 4.0], [12, -2.5]]),
]
ROW_BIAS = [[5, -3.0], [9, 2.0], [40, 1.5]]   # ids within the 64-logit rows


class LlamaPenalties:
    """llama.cpp's penalties sampler over a row of logits (its window holds every accepted token)."""

    def __init__(self, llama_cpp, n_vocab: int, frequency: float, presence: float):
        self.ll = llama_cpp
        # (n_vocab, last_n, repeat, frequency, presence): a window of 64 holds all 24 output tokens
        self.smpl = llama_cpp.llama_sampler_init_penalties(n_vocab, 64, 1.0, frequency, presence)

    def accept(self, token: int):
        self.ll.llama_sampler_accept(self.smpl, token)

    def apply(self, logits):
        ll = self.ll
        n = len(logits)
        data = (ll.llama_token_data * n)()
        for i, v in enumerate(logits):
            data[i].id, data[i].logit, data[i].p = i, float(v), 0.0
        arr = ll.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(ll.llama_token_data)), size=n,
                                        selected=-1, sorted=False)
        ll.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        assert arr.size == n and not arr.sorted, "the penalties sampler should keep the array as it is"
        out = [0.0] * n
        for i in range(n):
            out[data[i].id] = data[i].logit
        return out

    def close(self):
        self.ll.llama_sampler_free(self.smpl)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/moesh-tiny-py")
    ap.add_argument("--out", default="tests/fixtures/shipped/moesh-tiny-py/penalties.json")
    args = ap.parse_args()

    import llama_cpp
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    def biased(case, ids, row, bias):
        if not bias:
            return row
        return SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias])(torch.tensor([ids]), row)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    prompts = [p["ids"] for p in json.loads(pathlib.Path(PROMPT_IDS_FROM).read_text())["prompts"]]

    cases = []
    with torch.no_grad():
        for case in CASES:
            runs = []
            for ids in prompts:
                rep = RepetitionPenaltyLogitsProcessor(case["repetition_penalty"]) if case["repetition_penalty"] != 1.0 else None
                pen = None
                if case["frequency_penalty"] or case["presence_penalty"]:
                    pen = LlamaPenalties(llama_cpp, model.config.vocab_size, case["frequency_penalty"],
                                         case["presence_penalty"])
                seq, min_gap = list(ids), math.inf
                for _ in range(N_GENERATE):
                    row = model(input_ids=torch.tensor([seq])).logits[0, -1:].float()
                    row = biased(case, seq, row, case.get("logit_bias"))
                    if rep is not None:
                        row = rep(torch.tensor([seq]), row)
                    row = row[0].numpy().astype(np.float32)
                    if pen is not None:
                        row = np.array(pen.apply(row.tolist()), dtype=np.float32)
                    top2 = np.sort(row)[-2:]
                    min_gap = min(min_gap, float(top2[1] - top2[0]))
                    t = int(row.argmax())
                    seq.append(t)
                    if pen is not None:
                        pen.accept(t)
                if pen is not None:
                    pen.close()
                runs.append(dict(ids=ids, generated=seq[len(ids):], min_top2_gap=min_gap))
                print(f"{case}: {runs[-1]['generated']} (smallest top-2 gap {min_gap:.3g})")
                assert min_gap > 1e-3, "a near tie: choose other penalties"
            cases.append(dict(**{"logit_bias": [], **case}, prompts=runs))

    rng = np.random.default_rng(7)
    rows = []
    for case in CASES:
        logits = (rng.standard_normal(64) * 3).astype(np.float32)
        prompt = [int(t) for t in rng.integers(0, 64, 10)]
        output = [int(t) for t in rng.integers(0, 64, 20)] + [5, 5, 5, 9]   # repeats for the counts
        bias = ROW_BIAS if "logit_bias" in case else []
        row = biased(case, prompt + output, torch.tensor(logits)[None, :], bias)
        if case["repetition_penalty"] != 1.0:
            row = RepetitionPenaltyLogitsProcessor(case["repetition_penalty"])(torch.tensor([prompt + output]), row)
        row = row[0].numpy().astype(np.float32)
        if case["frequency_penalty"] or case["presence_penalty"]:
            pen = LlamaPenalties(llama_cpp, 64, case["frequency_penalty"], case["presence_penalty"])
            for t in output:
                pen.accept(t)
            row = np.array(pen.apply(row.tolist()), dtype=np.float32)
            pen.close()
        rows.append(dict(**{**case, "logit_bias": bias}, logits=[float(v) for v in logits], prompt=prompt, output=output,
                         penalized=[float(v) for v in row]))

    out = dict(
        model=args.model,
        generator="scripts/make_penalty_references.py",
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                      llama_cpp_python=llama_cpp.__version__, numpy=np.__version__),
        n_generate=N_GENERATE,
        cases=cases,
        rows=rows,
    )
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
