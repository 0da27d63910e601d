#!/usr/bin/env python3
"""Train moesh-tiny-py: a small Qwen3-MoE language model of Python source, on the CPU.

The real run (the lead's; not run here):
    python3 scripts/train_tiny_moe.py --work /work/tiny-train --out models/moesh-tiny-py --minutes 60
Expected wall time: 60 minutes in all (the budget covers preparation, ~40 s the first time, and the
final measurements, ~1.5-2 min). On 2 shared cores training runs at ~3000 tokens/s when the machine
is otherwise quiet (measured: 2200-3600 tokens/s per step at load average ~2), so an hour gives about
10 M tokens, ~1.1 epochs of the 8.8 M training tokens; a busy machine gives proportionally fewer
(the schedule adapts, see 4). Interrupted (Ctrl-C, kill, reboot)? Run the same command again.

Smoke test of the whole pipeline (tiny model, corpus subset, ~2 minutes):
    python3 scripts/train_tiny_moe.py --smoke --work /tmp/tiny-smoke --out /tmp/tiny-smoke-out
    python3 scripts/check_tiny_moe.py --model /tmp/tiny-smoke-out --perplexity   # moesh vs transformers

What it does
  1. Corpus: the .py files of the running interpreter's standard library
     (sysconfig.get_paths()["stdlib"]), test suites included, read as UTF-8 (files that are not
     valid UTF-8, or empty, are skipped and counted). Excluded: site-packages/, __pycache__/,
     config-*/ and _sysconfigdata*.py (machine-generated, different on every install) and
     pydoc_data/topics.py (750 kB of documentation prose in one string). The test suites are kept:
     they are ordinary Python and more than half of the code, so an hour of training sees the
     corpus about once instead of a third of it three times. Files in the sorted order of their
     relative paths; a file is held out when int.from_bytes(sha256(relative path)[:8], "big") % 1000
     < 30 (about 3 %, the same on every machine for the same Python version). Python 3.11.7 gives
     1691 training files (29.5 MB, 8.78 M tokens) and 64 held out (1.2 MB, 387.5 k tokens).
  2. Tokenizer: byte-level BPE trained with `tokenizers` on the training files only: 4096 ids
     (3.36 bytes per token on the training text, 3.09 held out; 8192 would give only 9 % fewer
     tokens for a 25 % slower step here, and a larger file), <|endoftext|> = id 0, GPT-2's ByteLevel
     pre-tokenizer with its split regex and no prefix space, ByteLevel decoder. Its post-processor
     prepends <|endoftext|> as BOS: the training stream is `<|endoftext|> file1 <|endoftext|> file2
     ...`, so a prompt starts as a file does. Saved as tokenizer.json + tokenizer_config.json
     (transformers.AutoTokenizer and moesh's runtime/tokenizer_json.cpp give the same ids).
  3. Model: transformers' Qwen3MoeForCausalLM: 4 layers, hidden 256, 4 heads of 64 with 2 KV
     heads and per-head q/k RMSNorm, 8 experts of 320 with top-2 routing (norm_topk_prob), no
     shared expert, tied embeddings, RoPE theta 10000, 1024 positions: 9.71 M parameters (1.05 M
     embedding, 7.86 M in experts, 3.81 M active per token). Stored as bfloat16: model.safetensors
     19.4 MB; `moesh quantize --type q8_0` makes a 10.3 MB GGUF of it.
  4. Training: windows of 512 tokens (+1 for the targets), 8 per step, float32, AdamW (lr 1.5e-3,
     betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices only, gradient clip 1.0), 100 steps of
     linear warm-up then cosine decay to a tenth (see Schedule: with --minutes the decay is paced
     by the measured speed so that it ends with the budget; with --steps N it is the fixed cosine
     over N steps). Loss = cross entropy + 0.01 x a per-layer Switch-Transformer load-balancing
     loss (E * sum_e f_e * P_e, mean over layers; 1.0 when balanced), computed here from the router
     logits (transformers' own pools the counts of all layers, so one layer could starve an expert).
     Each epoch visits the training stream's windows in a random order from a random offset, both
     drawn from (seed, epoch), so the data position is (epoch, batch). Seeds fixed (torch, random,
     numpy), torch.set_num_threads(2), RAYON/OMP threads 2.
  5. Checkpoints (model, optimizer, RNG states, step, data position, schedule progress, time used)
     go to --work every 5 minutes and on SIGINT/SIGTERM, atomically; the same command resumes from
     the last one. With --steps the result is bit-identical to an uninterrupted run (checked with a
     SIGTERM and a SIGKILL); with --minutes the budget is the whole run's, so a resumed run gets
     what is left, and the steps after the checkpoint are paced by the new measurements.
  6. At the end, from the saved bfloat16 weights reloaded with AutoModelForCausalLM in float32
     (what moesh loads), on the held-out files: mean NLL per token over fixed windows; llama.cpp's
     perplexity over heldout.txt at n_ctx 512 (what `moesh perplexity --ctx 512` computes; they
     agree to 1e-9 relative); per-layer expert usage, the share of the top 25 % of experts, and the
     temporal locality of expert choices, each next to a uniform random router's.

Outputs in --out:
    config.json, generation_config.json, model.safetensors (bfloat16), tokenizer.json,
    tokenizer_config.json, heldout.txt (the held-out files joined by <|endoftext|>; 1.2 MB),
    train_log.jsonl (one line per step: step, tokens, train_loss, aux_loss, lr, grad_norm,
    tokens_per_s, elapsed_s, progress; eval_loss on evaluation steps, ~40 in a run, step 0
    included), loss.png (train and eval loss), experts.png (usage heat map and locality), eval.json
    (final losses and how they were computed, expert statistics, corpus, model, training facts).
In --work: run.json (the run's options: a rerun must match), corpus.json, tokenizer.json,
train_tokens.npy, heldout_tokens.npy, ckpt.pt, train_log.jsonl.

Needs: pip install -r scripts/requirements-train.txt
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import pathlib
import random
import signal
import sys
import sysconfig
import time

# Both cores, no more (the machine is shared); set before tokenizers/torch start their pools.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EOT = "<|endoftext|>"
HELDOUT_PER_MILLE = 30

# name -> settings. "real" is what ships; "smoke" only tests the pipeline.
PRESETS = {
    "real": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=320,
        max_position_embeddings=1024,
        ctx=512, batch=8, lr=1.5e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1,
        aux_coef=0.01, n_eval_windows=24, eval_batch=8, ckpt_minutes=5.0, minutes=60.0,
        train_bytes=None, heldout_bytes=None,
    ),
    "smoke": dict(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        max_position_embeddings=256,
        ctx=128, batch=8, lr=3e-3, min_lr_ratio=0.1, warmup_steps=5, weight_decay=0.1,
        aux_coef=0.01, n_eval_windows=8, eval_batch=8, ckpt_minutes=0.25, minutes=2.0,
        train_bytes=1_500_000, heldout_bytes=120_000,
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Corpus


def excluded(rel: str) -> bool:
    parts = rel.split("/")
    if "site-packages" in parts or "__pycache__" in parts:
        return True
    if parts[0].startswith("config-"):
        return True
    if parts[-1].startswith("_sysconfigdata"):
        return True
    return rel == "pydoc_data/topics.py"


def is_heldout(rel: str) -> bool:
    h = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") % 1000 < HELDOUT_PER_MILLE


def collect_corpus(p: dict) -> dict:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):  # symbolic links to folders are not followed
        rel_dir = pathlib.Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if not excluded(d if rel_dir == "." else f"{rel_dir}/{d}")]
        rels += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames
                 if f.endswith(".py") and os.path.isfile(os.path.join(dirpath, f))]
    rels.sort()
    n_excluded = n_undecodable = n_empty = 0
    train, heldout = [], []
    for rel in rels:
        if excluded(rel):
            n_excluded += 1
            continue
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            n_undecodable += 1
            continue
        if not text:
            n_empty += 1
            continue
        (heldout if is_heldout(rel) else train).append((rel, text))
    n_train_all, n_heldout_all = len(train), len(heldout)

    def take(files, budget):
        if budget is None:
            return files
        out, n = [], 0
        for f in files:
            if n >= budget:
                break
            out.append(f)
            n += len(f[1].encode("utf-8"))
        return out

    train, heldout = take(train, p["train_bytes"]), take(heldout, p["heldout_bytes"])
    return dict(
        root=str(root), python=sys.version, python_version=".".join(map(str, sys.version_info[:3])),
        n_py_files=len(rels), n_excluded=n_excluded, n_undecodable=n_undecodable, n_empty=n_empty,
        n_train_files_all=n_train_all, n_heldout_files_all=n_heldout_all,
        train=train, heldout=heldout,
    )


def corpus_summary(c: dict) -> dict:
    s = {k: v for k, v in c.items() if k not in ("train", "heldout")}
    for split in ("train", "heldout"):
        s[f"n_{split}_files"] = len(c[split])
        s[f"{split}_bytes"] = sum(len(t.encode("utf-8")) for _, t in c[split])
        s[f"{split}_files_sha256"] = hashlib.sha256("\n".join(r for r, _ in c[split]).encode()).hexdigest()
    s["heldout_files"] = [r for r, _ in c["heldout"]]
    s["split_rule"] = f"held out when int(sha256(relative path)[:8 bytes], big-endian) % 1000 < {HELDOUT_PER_MILLE}"
    s["excluded_rule"] = ("site-packages/, __pycache__/, config-*/, _sysconfigdata*.py, pydoc_data/topics.py; "
                          "files that are not valid UTF-8 or empty")
    return s


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOT) == 0
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, 0)])
    return tok


def save_tokenizer_files(tok, folder: pathlib.Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=model_max_length)
    fast.save_pretrained(str(folder))
    # transformers 5 writes its own class name (TokenizersBackend); the older alias loads in 4.x and 5.x alike
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode_files(tok, texts: list[str]) -> np.ndarray:
    """`<|endoftext|> file1 <|endoftext|> file2 ...` as uint16 ids (each file encoded on its own:
    the special token splits the text anyway, so this equals encoding the joined text)."""
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(np.array([0] + enc.ids, dtype=np.uint16))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# Model


def model_config(p: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
        head_dim=p["head_dim"], num_experts=p["num_experts"], num_experts_per_tok=p["num_experts_per_tok"],
        moe_intermediate_size=p["moe_intermediate_size"], intermediate_size=4 * p["hidden_size"],
        norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=p["max_position_embeddings"],
        rope_theta=10000.0, rms_norm_eps=1e-6, router_aux_loss_coef=p["aux_coef"], output_router_logits=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=True, initializer_range=0.02)


def build_model(cfg, experts_impl: str):
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM._from_config(cfg, attn_implementation="sdpa", experts_implementation=experts_impl)


def param_counts(model, cfg) -> dict:
    n = sum(p.numel() for p in model.parameters())
    n_emb = model.model.embed_tokens.weight.numel()
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_expert_all = per_expert * cfg.num_experts * cfg.num_hidden_layers
    active = n - n_expert_all + per_expert * cfg.num_experts_per_tok * cfg.num_hidden_layers
    return dict(total=n, embedding=n_emb, experts=n_expert_all, active_per_token=active,
                safetensors_bf16_bytes_approx=2 * n, q8_0_gguf_bytes_approx=int(n * 34 / 32))


def balance_loss(router_logits, k: int) -> torch.Tensor:
    """Switch-Transformer load balancing per layer: E * sum_e f_e * P_e, mean over layers.
    f_e: share of the k routed slots that go to expert e; P_e: mean router probability."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        n_exp = probs.shape[-1]
        top = torch.topk(probs, k, dim=-1).indices
        f = torch.zeros(n_exp, dtype=probs.dtype).scatter_add_(0, top.reshape(-1), torch.ones(top.numel()))
        f = f / top.numel()
        losses.append(n_exp * torch.sum(f * probs.mean(dim=0)))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Data order


def epoch_order(seed: int, epoch: int, n_tokens: int, ctx: int):
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(0, ctx))
    n_windows = (n_tokens - offset - 1) // ctx
    return offset, rng.permutation(n_windows)


def get_batch(train: np.ndarray, p: dict, seed: int, pos: dict, cache: dict):
    """Next batch at data position pos = {epoch, batch}; pos is advanced. Returns int64 [B, ctx+1]."""
    ctx, bsz = p["ctx"], p["batch"]
    while True:
        if cache.get("epoch") != pos["epoch"]:
            cache["epoch"] = pos["epoch"]
            cache["offset"], cache["perm"] = epoch_order(seed, pos["epoch"], len(train), ctx)
        perm = cache["perm"]
        if (pos["batch"] + 1) * bsz <= len(perm):
            break
        pos["epoch"] += 1
        pos["batch"] = 0
    idx = perm[pos["batch"] * bsz:(pos["batch"] + 1) * bsz]
    starts = cache["offset"] + idx * ctx
    rows = np.stack([train[s:s + ctx + 1] for s in starts]).astype(np.int64)
    pos["batch"] += 1
    return torch.from_numpy(rows)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def windows_nll(model, stream: np.ndarray, ctx: int, n_windows: int | None, batch: int, routing=None):
    """Mean NLL over windows stream[i*ctx : i*ctx+ctx+1] (input the first ctx, every next token scored).
    routing: a dict to fill with per-layer top-k expert ids [n_windows, ctx, k] when given."""
    was_training = model.training
    model.eval()
    n_all = (len(stream) - 1) // ctx
    n = n_all if n_windows is None else min(n_windows, n_all)
    total, count = 0.0, 0
    k = model.config.num_experts_per_tok
    for b0 in range(0, n, batch):
        rows = np.stack([stream[i * ctx:i * ctx + ctx + 1] for i in range(b0, min(n, b0 + batch))]).astype(np.int64)
        x = torch.from_numpy(rows)
        out = model(input_ids=x[:, :-1], output_router_logits=routing is not None, use_cache=False)
        nll = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
        if routing is not None:
            for il, logits in enumerate(out.router_logits):
                top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
                routing.setdefault(il, []).append(top.reshape(x.shape[0], ctx, k).numpy().astype(np.int16))
    if routing is not None:
        for il in list(routing):
            routing[il] = np.concatenate(routing[il])
    model.train(was_training)
    return total / max(1, count), n, count


@torch.no_grad()
def llamacpp_ppl(model, tokenizer, text_path: pathlib.Path, n_ctx: int, batch: int) -> dict:
    """llama.cpp's perplexity (and runtime/perplexity.cpp's): the file, less one trailing newline,
    tokenized with BOS as the tokenizer adds it; chunks of n_ctx tokens, each from an empty context
    with its first token replaced by BOS; the predictions of tokens [n_ctx/2 + 1, n_ctx) scored."""
    text = text_path.read_bytes().decode("utf-8")  # as bytes: read_text would turn \r\n and \r into \n
    if text.endswith("\n"):
        text = text[:-1]
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    add_bos = len(ids) > 0 and ids[0] == bos
    n_chunk = len(ids) // n_ctx
    first = n_ctx // 2
    total, count = 0.0, 0
    model.eval()
    for c0 in range(0, n_chunk, batch):
        chunks = np.array([ids[c * n_ctx:(c + 1) * n_ctx] for c in range(c0, min(n_chunk, c0 + batch))], dtype=np.int64)
        inp = torch.from_numpy(chunks.copy())
        if add_bos:
            inp[:, 0] = bos
        logits = model(input_ids=inp, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, first:n_ctx - 1], dim=-1)
        tgt = torch.from_numpy(chunks[:, first + 1:n_ctx])
        total -= float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
        count += tgt.numel()
    mean = total / max(1, count)
    return dict(n_ctx=n_ctx, ppl=math.exp(mean), mean_nll=mean, n_chunks=n_chunk, n_scored=count,
                n_tokens=len(ids), bos_added=add_bos, file="heldout.txt",
                method=("llama.cpp perplexity: text = heldout.txt less one trailing newline, tokenized with BOS "
                        "(<|endoftext|>, id 0) prepended by the tokenizer; chunks of n_ctx consecutive tokens "
                        "(the remainder dropped), each evaluated from an empty context with its first token "
                        "replaced by BOS; scored: for j in [n_ctx/2, n_ctx-1) the log-probability of "
                        "chunk[j+1] from the logits at j; ppl = exp(mean NLL). Same as `moesh perplexity "
                        "--ctx n_ctx`."))


def expert_stats(routing: dict, n_expert: int, k: int, seed: int) -> dict:
    usage, top_share, locality, shuffled = [], [], [], []
    n_top = max(1, round(0.25 * n_expert))
    rng = np.random.default_rng(seed)
    for il in sorted(routing):
        top = routing[il].astype(np.int64)  # [n_windows, ctx, k]
        counts = np.bincount(top.reshape(-1), minlength=n_expert).astype(np.float64)
        frac = counts / counts.sum()
        usage.append(frac.tolist())
        top_share.append(float(np.sort(frac)[::-1][:n_top].sum()))
        # same layer, previous token in the same window
        reused = (top[:, 1:, :, None] == top[:, :-1, None, :]).any(-1).sum(-1)  # [n_windows, ctx-1]
        locality.append(dict(frac_tokens_with_reuse=float((reused > 0).mean()),
                             mean_reused_over_k=float(reused.mean() / k)))
        flat = top.reshape(-1, k)
        other = flat[rng.permutation(len(flat))]
        r2 = (flat[:, :, None] == other[:, None, :]).any(-1).sum(-1)
        shuffled.append(dict(frac_tokens_with_reuse=float((r2 > 0).mean()), mean_reused_over_k=float(r2.mean() / k)))
    p_none = math.comb(n_expert - k, k) / math.comb(n_expert, k)
    return dict(
        n_expert=n_expert, k=k, n_tokens_routed=int(routing[0].shape[0] * routing[0].shape[1]),
        usage_fraction=usage,
        top25_experts=n_top, top25_share=top_share, top25_share_uniform=n_top / n_expert,
        locality=locality,
        locality_uniform_random_router=dict(frac_tokens_with_reuse=1 - p_none, mean_reused_over_k=k / n_expert),
        locality_shuffled_tokens=shuffled,
        notes=("usage_fraction[layer][expert]: share of the layer's routed slots (k per token) over the held-out "
               "windows. top25_share: share taken by the most used 25 % of experts (uniform: 0.25). locality: "
               "for each token after the first of its window, how many of its k experts the previous token "
               "also chose in that layer; frac_tokens_with_reuse = share of tokens with at least one, "
               "mean_reused_over_k = mean count / k. Uniform random router (k distinct experts, independent "
               "tokens): 1 - C(E-k,k)/C(E,k) and k/E. locality_shuffled_tokens: the same measure against a "
               "random other token of the held-out set, i.e. what the measured imbalance alone gives."),
    )


# ---------------------------------------------------------------------------------------------
# Plots


def plot_losses(log_rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log_rows if "train_loss" in r]
    train = [r["train_loss"] for r in log_rows if "train_loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in log_rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    if train:
        ax.plot(steps, train, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        ema, out = None, []
        for v in train:
            ema = v if ema is None else 0.95 * ema + 0.05 * v
            out.append(ema)
        ax.plot(steps, out, color="tab:blue", lw=1.6, label="train (EMA 0.95)")
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="tab:red", ms=3, lw=1.4,
                label="held-out eval (fixed windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_experts(stats: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = np.array(stats["usage_fraction"])
    n_layer, n_exp = usage.shape
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * n_layer + 3), dpi=110,
                                  gridspec_kw=dict(width_ratios=[3, 2]))
    im = ax.imshow(usage, cmap="viridis", aspect="auto", vmin=0)
    for i in range(n_layer):
        for j in range(n_exp):
            ax.text(j, i, f"{usage[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if usage[i, j] < usage.max() * 0.6 else "black")
    ax.set_xticks(range(n_exp))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"share of routed slots on held-out text (uniform = {1 / n_exp:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    x = np.arange(n_layer)
    measured = [d["frac_tokens_with_reuse"] for d in stats["locality"]]
    shuffled = [d["frac_tokens_with_reuse"] for d in stats["locality_shuffled_tokens"]]
    ax2.bar(x - 0.2, measured, 0.4, label="previous token")
    ax2.bar(x + 0.2, shuffled, 0.4, label="random other token")
    ax2.axhline(stats["locality_uniform_random_router"]["frac_tokens_with_reuse"], color="k", ls="--",
                label="uniform random router")
    ax2.set_xticks(x)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("share of tokens reusing >= 1 expert")
    ax2.set_ylim(0, 1)
    ax2.set_title("temporal locality")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def read_log(path: pathlib.Path, max_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if max_step is None or r["step"] <= max_step]


def write_log(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


class Schedule:
    """Learning rate: linear warm-up over warmup_steps, then cosine from lr to lr * min_lr_ratio as the
    progress u goes from 0 to 1.
    --steps N: u = (step - warmup) / (N - warmup), a fixed schedule (bit-identical reruns).
    --minutes M: u advances each step by (1 - u) / (steps that still fit in the budget, estimated from
    the recent wall time per step, evaluations and checkpoints included); so the decay ends when the
    budget does even when the machine's speed changes during the run (it is shared). u is part of the
    checkpoint and every step's lr is in train_log.jsonl."""

    def __init__(self, p: dict, total_steps: int | None):
        self.p, self.total = p, total_steps
        self.u = 0.0

    def lr(self, step: int) -> float:
        p = self.p
        if step < p["warmup_steps"]:
            return p["lr"] * (step + 1) / p["warmup_steps"]
        u = self.u
        if self.total is not None:
            u = (step - p["warmup_steps"]) / max(1, self.total - p["warmup_steps"])
        floor = p["lr"] * p["min_lr_ratio"]
        return floor + 0.5 * (p["lr"] - floor) * (1 + math.cos(math.pi * min(1.0, u)))

    def advance(self, step_done: int, steps_left: float) -> None:
        """After step `step_done` (1-based count of steps done), with about steps_left steps to go."""
        if self.total is None and step_done > self.p["warmup_steps"]:
            self.u = 1.0 if steps_left < 1 else self.u + (1.0 - self.u) / steps_left

    def done(self, step: int) -> bool:
        return step >= self.total if self.total is not None else self.u >= 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the top of this file for details.")
    ap.add_argument("--work", required=True, help="folder for the tokenizer, token caches, checkpoints, log")
    ap.add_argument("--out", default="models/moesh-tiny-py", help="final model folder")
    ap.add_argument("--minutes", type=float,
                    help="wall-time budget of the whole run, preparation and final measurements included, summed "
                         "over resumed invocations (default 60; smoke 2). With --steps: a limit for this "
                         "invocation only (default none)")
    ap.add_argument("--steps", type=int, help="train exactly this many steps (fixed cosine schedule, reproducible)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and corpus subset, to test the pipeline")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"],
                    help="transformers' experts implementation for training (same math; grouped_mm is ~4x faster "
                         "than eager on the CPU)")
    args = ap.parse_args()

    t_start = time.time()
    preset = "smoke" if args.smoke else "real"
    p = dict(PRESETS[preset])
    mode = "steps" if args.steps is not None else "minutes"
    minutes = args.minutes if args.minutes is not None else (None if mode == "steps" else p["minutes"])
    work = pathlib.Path(args.work)
    out = pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # -- the run's identity: a rerun must match it (the --minutes budget may change)
    run_id = dict(preset=preset, seed=args.seed, mode=mode, steps=args.steps, experts_impl=args.experts_impl,
                  settings={k: v for k, v in p.items() if k not in ("minutes", "ckpt_minutes")})
    run_path = work / "run.json"
    if run_path.exists():
        prev = json.loads(run_path.read_text())
        if prev != run_id:
            diff = {k: (prev.get(k), v) for k, v in run_id.items() if prev.get(k) != v}
            raise SystemExit(f"{run_path}: this work folder belongs to another run (was, now: {diff}); "
                             f"use the same options or a new --work")
    else:
        run_path.write_text(json.dumps(run_id, indent=1))

    # -- corpus
    corpus = collect_corpus(p)
    summary = corpus_summary(corpus)
    corpus_path = work / "corpus.json"
    if corpus_path.exists():
        prev = json.loads(corpus_path.read_text())
        for key in ("train_files_sha256", "heldout_files_sha256", "train_bytes", "heldout_bytes"):
            if prev[key] != summary[key]:
                raise SystemExit(f"{corpus_path}: the corpus changed ({key}); was the work folder made with another "
                                 f"Python? ({prev['python_version']} then, {summary['python_version']} now)")
    log(f"corpus: Python {summary['python_version']} stdlib {summary['root']}: {summary['n_train_files']} train files "
        f"({summary['train_bytes'] / 1e6:.1f} MB), {summary['n_heldout_files']} held out "
        f"({summary['heldout_bytes'] / 1e6:.2f} MB); {summary['n_excluded']} excluded, "
        f"{summary['n_undecodable']} not UTF-8, {summary['n_empty']} empty")

    # -- tokenizer (trained once per work folder)
    from tokenizers import Tokenizer

    tok_path = work / "tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        t0 = time.time()
        tok = train_tokenizer([t for _, t in corpus["train"]], p["vocab_size"])
        tok.save(str(tok_path) + ".tmp")
        os.replace(str(tok_path) + ".tmp", tok_path)
        log(f"tokenizer: trained {tok.get_vocab_size()} ids in {time.time() - t0:.1f} s")

    # -- token streams (cached)
    streams = {}
    for split in ("train", "heldout"):
        path = work / f"{split}_tokens.npy"
        if path.exists():
            streams[split] = np.load(path)
        else:
            t0 = time.time()
            streams[split] = encode_files(tok, [t for _, t in corpus[split]])
            np.save(path, streams[split])
            log(f"tokens: {split} {len(streams[split])} in {time.time() - t0:.1f} s")
    train_ids, heldout_ids = streams["train"], streams["heldout"]
    summary["train_tokens"] = int(len(train_ids))
    summary["heldout_tokens"] = int(len(heldout_ids))
    summary["train_bytes_per_token"] = summary["train_bytes"] / max(1, len(train_ids))
    summary["heldout_bytes_per_token"] = summary["heldout_bytes"] / max(1, len(heldout_ids))
    corpus_path.write_text(json.dumps(summary, indent=1))

    # heldout.txt: the held-out files joined by the separator; with the tokenizer's BOS it tokenizes to
    # exactly heldout_ids, the training stream's format (checked).
    heldout_txt = EOT.join(t for _, t in corpus["heldout"])
    if tok.encode(heldout_txt, add_special_tokens=True).ids != heldout_ids.tolist():
        raise SystemExit("heldout.txt does not tokenize to the held-out token stream (tokenizer or separator issue)")

    # -- model, optimizer, state
    cfg = model_config(p)
    model = build_model(cfg, args.experts_impl)
    counts = param_counts(model, cfg)
    log(f"model: {counts['total'] / 1e6:.2f} M parameters ({counts['embedding'] / 1e6:.2f} M embedding, "
        f"{counts['experts'] / 1e6:.2f} M in experts, {counts['active_per_token'] / 1e6:.2f} M active per token)")
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=p["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)], lr=p["lr"], betas=(0.9, 0.95), eps=1e-8)
    sched = Schedule(p, args.steps)

    step, pos, tokens_seen = 0, dict(epoch=0, batch=0), 0
    train_seconds = 0.0  # forward + backward + optimizer, summed
    wall_used = 0.0      # the training loop's wall time (evaluations, checkpoints included), summed over invocations
    eval_seconds = None  # one periodic evaluation
    ckpt_path = work / "ckpt.pt"
    log_path = work / "train_log.jsonl"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, pos, tokens_seen = state["step"], state["pos"], state["tokens_seen"]
        train_seconds, wall_used, eval_seconds = state["train_seconds"], state["wall_used"], state["eval_seconds"]
        sched.u = state["u"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log(f"resumed at step {step} (epoch {pos['epoch']}, batch {pos['batch']}, progress {sched.u:.3f}, "
            f"{wall_used / 60:.1f} min of training done)")
    rows = read_log(log_path, max_step=step if ckpt_path.exists() else -1)
    write_log(log_path, rows)

    def save_ckpt():
        state = dict(
            model=model.state_dict(), optimizer=opt.state_dict(), step=step, pos=dict(pos), u=sched.u,
            tokens_seen=tokens_seen, train_seconds=train_seconds, wall_used=wall_used, eval_seconds=eval_seconds,
            rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
        torch.save(state, str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)

    ctx, bsz = p["ctx"], p["batch"]
    n_eval = p["n_eval_windows"]  # the fixed eval set: the first n_eval windows of the held-out stream

    def eval_now():
        t0 = time.time()
        loss, _, _ = windows_nll(model, heldout_ids, ctx, n_eval, p["eval_batch"])
        return loss, time.time() - t0

    if step == 0:
        loss0, eval_seconds = eval_now()
        rows.append(dict(step=0, tokens=0, eval_loss=loss0, elapsed_s=0.0))
        write_log(log_path, rows)
        log(f"step 0: eval loss {loss0:.4f} ({eval_seconds:.1f} s for {n_eval} windows)")

    # the final measurements: two passes over the held-out stream (fixed windows with routing, llama.cpp
    # chunks), 1.5x for a busy machine, plus saving and reloading
    final_reserve = 1.5 * 2 * eval_seconds * len(heldout_ids) / (n_eval * ctx) + 20.0
    setup_s = time.time() - t_start
    budget_s = minutes * 60.0 if minutes is not None else None

    def time_left() -> float:
        """Seconds of training loop left in the budget (None: no budget)."""
        if budget_s is None:
            return math.inf
        if mode == "minutes":  # the whole run's budget; earlier invocations' loops count
            return budget_s - setup_s - wall_used - final_reserve
        return budget_s - (time.time() - t_start) - final_reserve

    stop_signal = []

    def on_signal(signum, frame):
        stop_signal.append(signum)
        log(f"signal {signum}: stopping after this step")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if mode == "minutes":
        log(f"budget: {minutes} min in all; {setup_s:.0f} s of preparation, {final_reserve:.0f} s kept for the "
            f"final measurements, {max(0.0, time_left()) / 60:.1f} min of training left")
    eval_every_steps = max(1, args.steps // 40) if args.steps else None
    eval_every_s = budget_s / 40 if mode == "minutes" else None
    last_eval_wall, last_ckpt = wall_used, time.time()
    recent = [(wall_used, step)]  # (wall_used, step) for the throughput estimate
    interval_t0, interval_tokens = time.time(), 0
    ended_by_budget = False
    model.train()
    cache = {}
    while not sched.done(step):
        if time_left() <= 0:
            ended_by_budget = True
            break
        t_loop = time.time()
        lr = sched.lr(step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(train_ids, p, args.seed, pos, cache)
        out_ = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out_.logits.float().reshape(-1, out_.logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = balance_loss(out_.router_logits, cfg.num_experts_per_tok)
        loss = ce + p["aux_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t_loop
        ce, aux, gnorm = ce.item(), aux.item(), gnorm.item()
        step += 1
        train_seconds += dt
        tokens_seen += bsz * ctx
        interval_tokens += bsz * ctx
        row = dict(step=step, tokens=tokens_seen, train_loss=ce, aux_loss=aux, lr=lr, grad_norm=gnorm, tokens_per_s=bsz * ctx / dt, elapsed_s=round(wall_used + dt, 2))

        # progress of the schedule (--minutes): steps that still fit, at the recent pace
        if mode == "minutes":
            recent.append((wall_used + dt, step))
            while len(recent) > 2 and (recent[-1][0] - recent[1][0] > 120 and recent[-1][1] - recent[1][1] > 20):
                recent.pop(0)
            (w0, s0), (w1, s1) = recent[0], recent[-1]
            sec_per_step = (w1 - w0) / max(1, s1 - s0)
            left_after = budget_s - setup_s - (wall_used + dt) - final_reserve
            sched.advance(step, left_after / max(1e-6, sec_per_step))
            row["progress"] = round(sched.u, 5)
        done = sched.done(step)
        if done or (eval_every_steps and step % eval_every_steps == 0) or \
                (eval_every_s and wall_used + dt - last_eval_wall >= eval_every_s):
            row["eval_loss"], eval_seconds = eval_now()
            last_eval_wall = wall_used + dt
        rows.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if step % 10 == 0 or "eval_loss" in row or done:
            tps = interval_tokens / max(1e-9, time.time() - interval_t0)
            total = args.steps if args.steps else "?"
            log(f"step {step}/{total} loss {ce:.4f} aux {aux:.3f} lr {lr:.2e} {tps:.0f} tok/s"
                + (f" progress {sched.u:.3f}" if mode == "minutes" and step > p["warmup_steps"] else "")
                + (f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""))
            interval_t0, interval_tokens = time.time(), 0
        wall_used += time.time() - t_loop
        if done or stop_signal or time.time() - last_ckpt > p["ckpt_minutes"] * 60:
            save_ckpt()
            last_ckpt = time.time()
        if stop_signal:
            log(f"stopped at step {step}; checkpoint saved; rerun the same command to continue")
            return 130

    if ended_by_budget:
        save_ckpt()
        if mode == "steps":
            log(f"this invocation's --minutes ran out at step {step} of {args.steps}; writing outputs from here "
                f"(rerun the command to continue)")
        else:
            log(f"the time budget ran out at step {step} (schedule progress {sched.u:.3f}); writing outputs")
    completed = sched.done(step) or (mode == "minutes" and ended_by_budget)
    # the float32 training weights on the periodic set, to see what bfloat16 storage costs
    f32_eval_loss, _ = eval_now()

    # -- outputs
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    model_bf16.save_pretrained(str(out))
    del model_bf16
    save_tokenizer_files(tok, out, cfg.max_position_embeddings)
    (out / "heldout.txt").write_bytes(heldout_txt.encode("utf-8"))  # some files hold \r: no newline translation
    write_log(out / "train_log.jsonl", rows)

    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length" on whole files is expected
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    if hf_tok(heldout_txt)["input_ids"] != heldout_ids.tolist():
        raise SystemExit("AutoTokenizer does not reproduce the trained tokenizer's ids on heldout.txt")
    t0 = time.time()
    routing = {}
    eval_all, n_win, n_scored = windows_nll(ref, heldout_ids, ctx, None, p["eval_batch"], routing=routing)
    eval_fixed, _, _ = windows_nll(ref, heldout_ids, ctx, n_eval, p["eval_batch"])
    ppl = llamacpp_ppl(ref, hf_tok, out / "heldout.txt", ctx, p["eval_batch"])
    stats = expert_stats(routing, cfg.num_experts, cfg.num_experts_per_tok, args.seed)
    log(f"final: held-out NLL {eval_all:.4f} over {n_scored} tokens; llama.cpp-style ppl {ppl['ppl']:.3f} "
        f"(n_ctx {ctx}); {time.time() - t0:.1f} s")

    tps_values = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    result = dict(
        completed=completed,
        eval_loss=dict(
            mean_nll=eval_all, ppl=math.exp(eval_all), n_windows=n_win, n_scored=n_scored, window=ctx, stride=ctx,
            method=(f"held-out token stream = <|endoftext|> file1 <|endoftext|> file2 ... (= heldout.txt tokenized "
                    f"with BOS); windows stream[i*{ctx} : i*{ctx}+{ctx}+1] for every i that fits, input the first "
                    f"{ctx} tokens, all {ctx} next-token predictions scored (mean NLL in nats per token); no extra "
                    f"BOS: a window starts wherever it falls (only the first window starts at a BOS). Computed with "
                    f"the saved bfloat16 weights reloaded by AutoModelForCausalLM in float32."),
        ),
        eval_loss_fixed_windows=dict(mean_nll=eval_fixed, n_windows=n_eval,
                                     note="the periodic eval set of train_log.jsonl: the first n_windows windows"),
        eval_loss_fixed_windows_float32_weights=f32_eval_loss,
        ppl_llamacpp_style=ppl,
        experts=stats,
        corpus={k: v for k, v in summary.items() if k != "heldout_files"},
        heldout_files=summary["heldout_files"],
        model=dict(preset=preset, params=counts, config=cfg.to_dict() | {"transformers_version": None},
                   safetensors_bytes=(out / "model.safetensors").stat().st_size, stored_dtype="bfloat16"),
        training=dict(
            mode=mode, minutes=minutes, steps_requested=args.steps, steps_done=step,
            ended_by_time_budget=ended_by_budget, schedule_progress=sched.u if mode == "minutes" else None,
            schedule=Schedule.__doc__.replace("\n    ", " ").strip(),
            tokens_seen=tokens_seen, epochs=tokens_seen / max(1, len(train_ids)), batch=bsz, ctx=ctx,
            lr=p["lr"], min_lr=p["lr"] * p["min_lr_ratio"], warmup_steps=p["warmup_steps"],
            weight_decay=p["weight_decay"], betas=[0.9, 0.95], grad_clip=1.0, aux_coef=p["aux_coef"],
            aux_loss="per-layer Switch load balancing E*sum(f*P), mean over layers (1.0 = balanced)",
            seed=args.seed, threads=args.threads, experts_impl=args.experts_impl,
            train_seconds=train_seconds, loop_wall_seconds=wall_used,
            tokens_per_s_mean=tokens_seen / max(1e-9, train_seconds),
            tokens_per_s_median_step=float(np.median(tps_values)) if tps_values else None,
            torch=torch.__version__, transformers=__import__("transformers").__version__,
            tokenizers=__import__("tokenizers").__version__, command=" ".join(sys.argv),
        ),
    )
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    plot_losses(rows, out / "loss.png", f"moesh-tiny-py ({preset}): {counts['total'] / 1e6:.1f} M params, "
                f"{tokens_seen / 1e6:.1f} M tokens")
    plot_experts(stats, out / "experts.png")
    log(f"wrote {out} ({time.time() - t_start:.0f} s in this invocation; completed: {completed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
