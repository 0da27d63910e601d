#!/usr/bin/env python3
"""Writes the model card (README.md) of the shipped model from what scripts/train_tiny_moe.py recorded
(eval.json) and what moesh measures on it now: `moesh perplexity` on the same held-out text (the
issue's 1% agreement), the Q8_0 GGUF's size and perplexity, and a sample completion with timings.

    python3 scripts/write_model_card.py [--model models/moesh-tiny-py] [--moesh build/bin/moesh]

Needs only the Python standard library and a built moesh.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys


def moesh(exe: str, *args: str) -> str:
    r = subprocess.run([exe, *args], capture_output=True, text=True, check=True)
    return r.stdout


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/moesh-tiny-py")
    ap.add_argument("--moesh", default="build/bin/moesh")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = pathlib.Path(args.model)
    ev = json.loads((m / "eval.json").read_text())
    cfg = json.loads((m / "config.json").read_text())
    tr, ex, co, pr = ev["training"], ev["experts"], ev["corpus"], ev["model"]["params"]
    ppl_ref = ev["ppl_llamacpp_style"]
    n_ctx = ppl_ref["n_ctx"]
    t = str(args.threads)

    ours = last_json(moesh(args.moesh, "perplexity", "--model", str(m), "--file", str(m / "heldout.txt"), "--ctx",
                           str(n_ctx), "--output", "json", "-t", t))
    gguf = m / "model.q8_0.gguf"
    gguf_ppl = None
    if gguf.exists():
        gguf_ppl = last_json(moesh(args.moesh, "perplexity", "--model", str(gguf), "--file", str(m / "heldout.txt"),
                                   "--ctx", str(n_ctx), "--output", "json", "-t", t))
    prompt = "def fibonacci(n):"
    run = last_json(moesh(args.moesh, "run", "--model", str(m), "--prompt", prompt, "-n", "48", "--output", "json",
                          "-t", t))
    rel = abs(ours["ppl"] - ppl_ref["ppl"]) / ppl_ref["ppl"]
    sizes = {p.name: p.stat().st_size for p in sorted(m.iterdir()) if p.is_file()}
    total = sum(sizes.values())

    layers = []
    for il, (share, loc) in enumerate(zip(ex["top25_share"], ex["locality"])):
        used = ex["usage_fraction"][il]
        layers.append(f"| {il} | {min(used):.3f} | {max(used):.3f} | {share:.3f} | {loc['frac_tokens_with_reuse']:.3f} | "
                      f"{loc['mean_reused_over_k']:.3f} |")
    uni = ex["locality_uniform_random_router"]

    card = f"""# moesh-tiny-py

A small Mixture-of-Experts language model of Python source code, trained on the CPU by
`scripts/train_tiny_moe.py` so that moesh works out of the box (`moesh run` without `--model` uses it)
and so that the placement work has routing with real structure. It writes plausible-looking
Python; it is not useful for anything else.

## Architecture
Hugging Face `Qwen3MoeForCausalLM`: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']},
{cfg['num_attention_heads']} heads of {cfg['head_dim']} ({cfg['num_key_value_heads']} KV heads), per-head q/k RMSNorm,
{cfg.get('num_experts', cfg.get('num_local_experts'))} experts per layer (FFN width {cfg['moe_intermediate_size']}), top-{cfg['num_experts_per_tok']}
routing with normalised weights, no shared expert, tied embeddings, RoPE theta {cfg['rope_parameters']['rope_theta'] if 'rope_parameters' in cfg else cfg.get('rope_theta')},
vocabulary {cfg['vocab_size']} (byte-level BPE trained with `tokenizers` on the training files; `<|endoftext|>` is BOS, EOS
and the separator between files), context {cfg['max_position_embeddings']}. Parameters: {pr['total'] / 1e6:.2f} M in all,
{pr['experts'] / 1e6:.2f} M in experts, {pr['active_per_token'] / 1e6:.2f} M active per token. Weights stored in bfloat16.

## Data
The `.py` files of the Python {co['python_version']} standard library ({co['root']}): {co['n_train_files']} files
for training ({mb(co['train_bytes'])}, {co['train_tokens'] / 1e6:.2f} M tokens) and {co['n_heldout_files']} held
out ({mb(co['heldout_bytes'])}, {co['heldout_tokens'] / 1e3:.0f} k tokens, `heldout.txt`), split by a hash of the
relative path ({co['split_rule']}). Excluded: {co['excluded_rule']}.

## Training
{tr['steps_done']} steps of {tr['batch']} x {tr['ctx']} tokens ({tr['tokens_seen'] / 1e6:.2f} M tokens, {tr['epochs']:.2f} epochs),
AdamW (lr {tr['lr']:g} to {tr['min_lr']:g}, warm-up {tr['warmup_steps']} steps, cosine; weight decay {tr['weight_decay']},
betas {tr['betas']}, gradient clip {tr['grad_clip']}), load-balancing loss: {tr['aux_loss']}, coefficient {tr['aux_coef']}.
Seed {tr['seed']}, {tr['threads']} threads, {tr['train_seconds'] / 60:.1f} minutes of training at
{tr['tokens_per_s_mean']:.0f} tokens/s on a 2-vCPU AMD EPYC VM; torch {tr['torch']}, transformers {tr['transformers']},
tokenizers {tr['tokenizers']}.

![train and eval loss](loss.png)

Reproduce (about an hour on 2 cores; `--work` keeps checkpoints, and the same command resumes):

    pip install -r scripts/requirements-train.txt
    python3 scripts/train_tiny_moe.py --work /tmp/tiny-train --out models/moesh-tiny-py --minutes 60
    build/bin/moesh quantize models/moesh-tiny-py models/moesh-tiny-py/model.q8_0.gguf --type q8_0
    python3 scripts/make_shipped_model_references.py      # the CI test's references
    python3 scripts/write_model_card.py                   # this file

With `--minutes`, the learning-rate schedule follows the measured speed, so a rerun on another
machine trains for the same time, not the same number of steps; `--steps {tr['steps_done']}` fixes the schedule.

## Results on the held-out text
- Eval loss (mean NLL per token, windows of {ev['eval_loss']['window']} tokens): **{ev['eval_loss']['mean_nll']:.4f}**
  (perplexity {ev['eval_loss']['ppl']:.2f}).
- llama.cpp's perplexity definition (chunks of {n_ctx}, second halves scored, BOS first), computed by the training
  script with transformers: {ppl_ref['ppl']:.4f} ({ppl_ref['n_scored']} predictions). `moesh perplexity --model
  models/moesh-tiny-py --file models/moesh-tiny-py/heldout.txt --ctx {n_ctx}`: **{ours['ppl']:.4f}** ({ours['scored']}
  predictions): {rel * 100:.4f}% apart.
""" + (f"""- The Q8_0 GGUF (`model.q8_0.gguf`, {mb(sizes['model.q8_0.gguf'])}): perplexity {gguf_ppl['ppl']:.4f}
  ({(gguf_ppl['ppl'] / ours['ppl'] - 1) * 100:+.2f}% from the bf16 weights).
""" if gguf_ppl else "") + f"""- moesh's logits equal transformers' within 1e-4 relative (measured ~1e-6; CI test
  `tests/runtime/shipped_model_test.cpp` with references from `scripts/make_shipped_model_references.py`).

`moesh run --prompt "{prompt}" -n 48` (greedy):

```
{prompt}{run['text']}
```
prompt {run['timings']['prompt_tokens']} tokens; decode {run['timings']['decode_tokens_per_second']:.0f} tokens/s
({args.threads} threads, this VM).

## Experts
Routing on the held-out text ({ex['n_tokens_routed']} tokens): per layer, the smallest and largest share of routed
slots taken by one expert (uniform: {1 / ex['n_expert']:.3f}), the share taken by the top 25% of experts
({ex['top25_experts']} of {ex['n_expert']}; uniform: {ex['top25_share_uniform']:.3f}), and temporal locality: the fraction of
tokens that reuse at least one expert of the previous token in the same layer, and the mean number reused / k
(a uniformly random router: {uni['frac_tokens_with_reuse']:.3f} and {uni['mean_reused_over_k']:.3f}).

| layer | min share | max share | top-25% share | tokens reusing an expert | reused / k |
|---|---|---|---|---|---|
""" + "\n".join(layers) + f"""

![expert usage per layer](experts.png)

## Files
""" + "\n".join(f"- `{n}`: {mb(s)}" for n, s in sizes.items() if n != "README.md") + f"""

{mb(total)} in all (before this card).
"""
    (m / "README.md").write_text(card)
    print(f"wrote {m / 'README.md'}: moesh ppl {ours['ppl']:.4f} vs {ppl_ref['ppl']:.4f} ({rel * 100:.4f}%)")
    return 0 if rel <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
