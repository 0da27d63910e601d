#!/usr/bin/env python3
"""Generate golden reference fixtures for moesh from Hugging Face transformers.

Usage:
    python3 scripts/make_fixtures.py [--out tests/fixtures] [--only NAME]

Requirements: torch (CPU is enough), transformers, safetensors, numpy.
Only this generator needs them -- the fixtures it writes are committed to the
repository, and the C++ tests / CI read them without any Python ML stack.

For every fixture (see FIXTURES below) the script:
  1. builds a tiny random-weight model of the given architecture with fixed
     seeds (weights are re-drawn by this script with explicit scales, so the
     logits are peaky and the router decisions are not near ties),
  2. saves it with ``save_pretrained`` (Hub-style per-expert tensor names,
     optional bf16/f16 storage, optional sharding, optional v4-style
     ``rope_theta``/``rope_scaling`` keys in config.json),
  3. re-loads it from disk in float32 (eager attention, eager experts) and
     computes the references from the re-loaded model only:
       * 40 greedy tokens per prompt via ``model.generate`` (no EOS),
       * teacher-forced float32 logits over prompt + generated[:-1]
         -> ``prompt<i>.logits.npy`` with shape [len(prompt) + 39, vocab],
  4. checks that every greedy step has a clear top-1/top-2 logit gap, that the
     router top-k boundary is never a near tie and that every expert is used;
     otherwise it re-seeds and tries again,
  5. writes ``reference.json`` and (re)writes ``<out>/README.md``.

The run is deterministic (fixed seeds, 1 thread, deterministic algorithms).
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys

import numpy as np
import torch

import safetensors
import transformers
from safetensors import safe_open

N_GENERATE = 40
MAX_ATTEMPTS = 200
# Greedy-step acceptance: top1 - top2 >= max(ABS, REL * max|logit|).
LOGIT_GAP_ABS = 1e-3
LOGIT_GAP_REL = 1e-3
# Router acceptance: p[k-1] - p[k] (sorted softmax probabilities) must exceed this.
ROUTER_GAP_MIN = 1e-5
# Every generated continuation must contain at least this many distinct tokens
# (random tiny models easily fall into "same token forever" loops).
MIN_DISTINCT_GENERATED = 8
# The float32 reference must agree with a float64 recomputation (same weights)
# to this max relative error (max|diff| / max|logit|), with the same greedy tokens.
MAX_REL_ERR_VS_F64 = 5e-6

TF_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])


# ----------------------------------------------------------------------------
# Fixture specifications
# ----------------------------------------------------------------------------
# Configs are given with v4-style rope keys (rope_theta / rope_scaling); both
# transformers 4.x and 5.x accept these as constructor arguments.

FIXTURES = {
    "llama_gqa_tied": dict(
        arch="LlamaForCausalLM",
        config_cls="LlamaConfig",
        config=dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        save_dtype="bfloat16",
        shards=1,
        hub_style_config=True,
        prompt_lens=[1, 6, 12],
        seed=1000,
        gains=dict(embed=1.0, qk=3.0, out=3.0, lm_head=None, router=None),
        exercises=(
            "GQA (4 q heads / 2 kv heads), tied embeddings (no lm_head.weight in the file), "
            "llama3 rope scaling (one high-freq pair unchanged, one pair in the smoothed band, "
            "the rest divided by factor), bf16 storage upcast to f32, 3 layers"
        ),
    ),
    "llama_mha_linear": dict(
        arch="LlamaForCausalLM",
        config_cls="LlamaConfig",
        config=dict(
            vocab_size=200,
            hidden_size=60,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=5,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            attention_bias=True,
            rope_theta=10000.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
        save_dtype="float32",
        shards=1,
        hub_style_config=True,
        prompt_lens=[9, 1, 4],
        seed=2000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=None),
        exercises=(
            "MHA with an odd head count (5 heads, head_dim 12), untied lm_head, linear rope "
            "scaling (factor 2), attention_bias=true (biases on q/k/v AND o_proj), f32"
        ),
    ),
    "mixtral_top2": dict(
        arch="MixtralForCausalLM",
        config_cls="MixtralConfig",
        config=dict(
            vocab_size=256,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=6,
            num_experts_per_tok=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
        ),
        save_dtype="float32",
        shards=2,
        hub_style_config=False,
        prompt_lens=[5, 1, 11],
        seed=3000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "Mixtral sparse MoE (6 experts, top-2, softmax over all experts then top-k "
            "renormalised), GQA 4/2, sharded checkpoint (2 files + model.safetensors.index.json), "
            "block_sparse_moe.experts.E.w1/w2/w3 naming, f32"
        ),
    ),
    "qwen2_moe_shared": dict(
        arch="Qwen2MoeForCausalLM",
        config_cls="Qwen2MoeConfig",
        config=dict(
            vocab_size=256,
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[2],
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
        ),
        save_dtype="float16",
        shards=1,
        hub_style_config=False,
        prompt_lens=[1, 8, 3],
        seed=4000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "Qwen2-MoE: 8 experts top-4 without renormalisation (norm_topk_prob=false), shared "
            "expert gated by sigmoid(shared_expert_gate), dense layer 2 via mlp_only_layers "
            "(uses intermediate_size, MoE layers use moe_intermediate_size), q/k/v biases, "
            "GQA 6/2 (head_dim 8), f16 storage upcast to f32"
        ),
    ),
    "qwen2_moe_fused_bf16": dict(
        arch="Qwen2MoeForCausalLM",
        config_cls="Qwen2MoeConfig",
        config=dict(
            vocab_size=192,
            hidden_size=40,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=5,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
        save_dtype="bfloat16",
        shards=1,
        hub_style_config=False,
        save_kwargs=dict(save_original_format=False),
        prompt_lens=[6, 1, 11],
        seed=4500,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "Qwen2-MoE in transformers 5's fused in-memory expert layout (save_original_format="
            "False: mlp.experts.gate_up_proj (E, 2*ff, hidden) and mlp.experts.down_proj "
            "(E, hidden, ff)), top-2 with renormalisation, shared expert, multi-head attention with "
            "an odd head count (5), tied embeddings, bf16 storage upcast to f32"
        ),
    ),
    "qwen3_moe_qknorm": dict(
        arch="Qwen3MoeForCausalLM",
        config_cls="Qwen3MoeConfig",
        config=dict(
            vocab_size=192,
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
        ),
        save_dtype="float32",
        shards=1,
        hub_style_config=False,
        prompt_lens=[7, 1, 12],
        seed=5000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "Qwen3-MoE: per-head q_norm/k_norm (RMSNorm over head_dim, before rope), explicit "
            "head_dim=16 != hidden/heads=12 (q_proj out 64 != hidden 48), 8 experts top-1 with "
            "norm_topk_prob=true (routing weight is exactly 1), GQA 4/2, f32"
        ),
    ),
    "qwen3_moe_top3": dict(
        arch="Qwen3MoeForCausalLM",
        config_cls="Qwen3MoeConfig",
        config=dict(
            vocab_size=160,
            hidden_size=40,
            intermediate_size=56,
            moe_intermediate_size=24,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=20,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        ),
        save_dtype="float32",
        shards=1,
        hub_style_config=False,
        prompt_lens=[3, 10, 1],
        seed=6000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "Qwen3-MoE: 6 experts top-3 without renormalisation, decoder_sparse_step=2 (layers 1 "
            "and 3 MoE, layers 0 and 2 dense with intermediate_size), MQA (4 q heads / 1 kv head), "
            "head_dim=20 != hidden/heads=10, yarn rope (factor 4, original 64: ramp-blended "
            "inv_freq and cos/sin scaled by attention_factor 0.1*ln(4)+1), q/k norm, f32"
        ),
    ),
    "olmoe_clip": dict(
        arch="OlmoeForCausalLM",
        config_cls="OlmoeConfig",
        config=dict(
            vocab_size=224,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            clip_qkv=1.0,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        save_dtype="float32",
        shards=1,
        hub_style_config=False,
        prompt_lens=[1, 12, 5],
        seed=7000,
        gains=dict(embed=1.0, qk=2.0, out=3.0, lm_head=3.0, router=2.0),
        exercises=(
            "OLMoE: 8 experts top-2 without renormalisation, q_norm/k_norm over the WHOLE "
            "projection (hidden_size / kv_heads*head_dim, not per head), clip_qkv=1.0 applied "
            "after q/k norm and before rope (clips a large fraction of q/k/v entries), f32, "
            "checkpoint in save_pretrained's native layout"
        ),
    ),
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def setup_determinism():
    torch.set_num_threads(1)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover - best effort
        pass


def versions():
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def is_moe(spec):
    return spec["arch"] != "LlamaForCausalLM"


def make_config(spec):
    cls = getattr(transformers, spec["config_cls"])
    kw = dict(spec["config"])
    # No EOS / BOS / PAD in the vocabulary: generation must never stop early.
    kw.update(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return cls(**kw)


def init_weights(model, seed, gains):
    """Re-draw every parameter with explicit, deterministic scales.

    - embeddings: N(0, gains.embed^2)
    - RMSNorm weights: 1 + 0.2 * N(0,1) (so that a missing norm weight shows)
    - biases: 0.2 * N(0,1)
    - lm_head: gains.lm_head / sqrt(hidden) (logits std ~ gain -> peaky)
    - router (mlp.gate / block_sparse_moe.gate): gains.router / sqrt(hidden)
    - every other matrix W[..., out, in]: N(0, gain^2/in) with gain = gains.qk for
      q_proj/k_proj (peaky attention), gains.out for o_proj/down_proj (layer
      outputs dominate the residual stream), 1 otherwise. Without these the
      random models quickly fall into "repeat one token forever" loops.
    Parameters are visited in sorted-name order; tied parameters once.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embed_tokens" in name:
                val = noise * gains["embed"]
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                val = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                val = 0.2 * noise
            elif name.startswith("lm_head"):
                val = noise * (gains["lm_head"] / math.sqrt(hidden))
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                val = noise * (gains["router"] / math.sqrt(hidden))
            elif p.dim() >= 2:
                gain = 1.0
                if "q_proj" in name or "k_proj" in name:
                    gain = gains.get("qk", 1.0)
                elif "o_proj" in name or "down_proj" in name or name.endswith(".w2.weight"):
                    gain = gains.get("out", 1.0)
                val = noise * (gain / math.sqrt(p.shape[-1]))
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(val.to(p.dtype))


def load_kwargs(spec):
    kw = {"attn_implementation": "eager"}
    if TF_VERSION >= (4, 56):
        kw["dtype"] = torch.float32
    else:
        kw["torch_dtype"] = torch.float32
    if is_moe(spec) and TF_VERSION >= (5, 0):
        kw["experts_implementation"] = "eager"
    return kw


def load_model(spec, path):
    cls = getattr(transformers, spec["arch"])
    model = cls.from_pretrained(path, **load_kwargs(spec))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def state_nbytes(model):
    seen = set()
    total = 0
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def to_hub_style_config(path):
    """Rewrite config.json with v4/Hub-style keys: rope_theta + rope_scaling, torch_dtype."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "rope_parameters" in cfg:
        rp = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = dict(sorted(rp.items()))
        else:
            cfg["rope_scaling"] = None
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")


def rope_signature(model):
    rot = model.model.rotary_emb
    return rot.inv_freq.detach().clone(), float(rot.attention_scaling), rot.rope_type


def save_model(spec, model, out_dir):
    dtype = getattr(torch, spec["save_dtype"])
    model = model.to(dtype)
    kw = {}
    if spec["shards"] > 1:
        total = state_nbytes(model)
        kw["max_shard_size"] = int(total / spec["shards"] * 1.1)
    kw.update(spec.get("save_kwargs", {}))  # e.g. save_original_format=False for fused experts
    model.save_pretrained(out_dir, **kw)


def list_tensors(out_dir):
    """Return {tensor_name: (file, dtype_str, shape)} over all safetensors files."""
    result = {}
    for fn in sorted(os.listdir(out_dir)):
        if not fn.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(out_dir, fn), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                result[k] = (fn, sl.get_dtype(), tuple(sl.get_shape()))
    return result


def softmax_gap_stats(router_logits, k):
    """Min gap p[k-1]-p[k] of the sorted softmax probabilities, and per-expert counts."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    srt = torch.sort(probs, dim=-1, descending=True).values
    gap = float((srt[:, k - 1] - srt[:, k]).min()) if probs.shape[-1] > k else float("inf")
    idx = torch.topk(probs, k, dim=-1).indices
    counts = torch.bincount(idx.reshape(-1), minlength=probs.shape[-1])
    return gap, counts


def moe_layer_indices(spec, config):
    n = config.num_hidden_layers
    if spec["arch"] in ("MixtralForCausalLM", "OlmoeForCausalLM"):
        return list(range(n))
    step = config.decoder_sparse_step
    return [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % step == 0]


def make_prompts(spec, seed, vocab):
    g = torch.Generator().manual_seed(seed + 17)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in spec["prompt_lens"]]


# ----------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------


def compute_references(spec, model, prompts):
    """Greedy-generate and teacher-force; return data and acceptance stats."""
    cfg = model.config
    moe = is_moe(spec)
    k = cfg.num_experts_per_tok if moe else 0
    moe_layers = moe_layer_indices(spec, cfg) if moe else []
    generated, logits_list = [], []
    min_abs_gap = float("inf")
    min_rel_gap = float("inf")
    max_gen_vs_tf = 0.0
    max_gen_vs_tf_rel = 0.0
    router_gap = float("inf")
    usage = None
    clip_frac = None
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=N_GENERATE,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        seq = out.sequences[0].tolist()
        if len(seq) != len(prompt) + N_GENERATE or seq[: len(prompt)] != prompt:
            raise RuntimeError(f"generate returned {len(seq)} tokens")
        gen = seq[len(prompt):]
        full = torch.tensor([prompt + gen[:-1]], dtype=torch.long)
        fwd_kw = {"output_router_logits": True} if moe else {}
        with torch.no_grad():
            res = model(full, use_cache=False, **fwd_kw)
        logits = res.logits[0].float().contiguous()
        assert logits.shape == (len(prompt) + N_GENERATE - 1, cfg.vocab_size)
        # Greedy steps: rows len(prompt)-1 ... end predict gen[0..39].
        steps = logits[len(prompt) - 1:]
        if steps.argmax(-1).tolist() != gen:
            raise RuntimeError("teacher-forced argmax disagrees with generate()")
        scores = torch.stack([s[0].float() for s in out.scores])
        max_gen_vs_tf = max(max_gen_vs_tf, float((scores - steps).abs().max()))
        max_gen_vs_tf_rel = max(max_gen_vs_tf_rel, float((scores - steps).abs().max() / steps.abs().max()))
        for rows in (steps, scores):
            top2 = torch.topk(rows, 2, dim=-1).values
            gap = top2[:, 0] - top2[:, 1]
            amax = rows.abs().max(-1).values
            min_abs_gap = min(min_abs_gap, float(gap.min()))
            min_rel_gap = min(min_rel_gap, float((gap / amax).min()))
        if moe:
            rl = res.router_logits
            assert len(rl) == len(moe_layers), (len(rl), moe_layers)
            if usage is None:
                usage = [torch.zeros(cfg.num_experts if hasattr(cfg, "num_experts") else cfg.num_local_experts,
                                     dtype=torch.long) for _ in moe_layers]
            for li, r in enumerate(rl):
                gp, cnt = softmax_gap_stats(r.reshape(-1, r.shape[-1]), k)
                router_gap = min(router_gap, gp)
                usage[li] += cnt
        generated.append(gen)
        logits_list.append(logits.numpy().astype(np.float32))
    if spec["arch"] == "OlmoeForCausalLM":
        clip_frac = olmoe_clip_fraction(model, prompts, generated)
    # Numerical robustness: recompute the teacher-forced logits in float64 from the
    # same (float32) weights. The difference is the float32 rounding noise of
    # the reference itself; a correct float32 implementation should see errors
    # of the same order.
    model.double()
    max_rel64 = 0.0
    for prompt, gen, lg in zip(prompts, generated, logits_list):
        with torch.no_grad():
            l64 = model(torch.tensor([prompt + gen[:-1]], dtype=torch.long), use_cache=False).logits[0]
        max_rel64 = max(max_rel64, float((torch.from_numpy(lg).double() - l64).abs().max() / l64.abs().max()))
        if l64[len(prompt) - 1:].argmax(-1).tolist() != gen:
            max_rel64 = float("inf")
    model.float()
    stats = {
        "min_greedy_top1_top2_gap_abs": min_abs_gap,
        "min_greedy_top1_top2_gap_rel": min_rel_gap,
        "max_abs_diff_generate_scores_vs_teacher_forced": max_gen_vs_tf,
        "max_rel_diff_generate_scores_vs_teacher_forced": max_gen_vs_tf_rel,
        "distinct_generated_tokens": [len(set(g)) for g in generated],
        "max_rel_err_f32_reference_vs_f64": max_rel64,
    }
    if moe:
        stats["moe_layers"] = moe_layers
        stats["min_router_topk_prob_gap"] = router_gap
        stats["expert_usage_per_moe_layer"] = [u.tolist() for u in usage]
    if clip_frac is not None:
        stats["clip_qkv_clipped_fraction"] = clip_frac
    return generated, logits_list, stats


def olmoe_clip_fraction(model, prompts, generated):
    """Fraction of q/k/v entries (after q/k norm, before clipping) that clip_qkv clips."""
    c = model.config.clip_qkv
    counts = [0, 0]

    def hook(mod, args, kwargs):
        h = kwargs.get("hidden_states")
        if h is None:
            h = args[0]
        for t in (mod.q_norm(mod.q_proj(h)), mod.k_norm(mod.k_proj(h)), mod.v_proj(h)):
            counts[0] += t.numel()
            counts[1] += int((t.abs() > c).sum())

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        for prompt, gen in zip(prompts, generated):
            with torch.no_grad():
                model(torch.tensor([prompt + gen[:-1]], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return counts[1] / max(counts[0], 1)


# ----------------------------------------------------------------------------
# Main per-fixture driver
# ----------------------------------------------------------------------------


def build_fixture(name, spec, out_root):
    out_dir = os.path.join(out_root, name)
    for attempt in range(MAX_ATTEMPTS):
        seed = spec["seed"] + attempt
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        torch.manual_seed(seed)
        config = make_config(spec)
        model = getattr(transformers, spec["arch"])(config)
        model.eval()
        init_weights(model, seed, spec["gains"])
        save_model(spec, model, out_dir)
        del model

        hub_note = None
        if spec["hub_style_config"]:
            # Load with the library-written config, rewrite to Hub style, reload and
            # verify that rope setup and the forward pass are bit-identical.
            ref_model = load_model(spec, out_dir)
            rope_a = rope_signature(ref_model)
            probe = torch.arange(min(16, config.vocab_size)).unsqueeze(0)
            with torch.no_grad():
                la = ref_model(probe).logits
            del ref_model
            to_hub_style_config(out_dir)
            chk = load_model(spec, out_dir)
            rope_b = rope_signature(chk)
            with torch.no_grad():
                lb = chk(probe).logits
            same = (torch.equal(rope_a[0], rope_b[0]) and rope_a[1] == rope_b[1]
                    and rope_a[2] == rope_b[2] and torch.equal(la, lb))
            if not same:
                raise RuntimeError(f"{name}: Hub-style config does not reload identically")
            hub_note = "config.json rewritten to v4/Hub keys (rope_theta, rope_scaling, torch_dtype); reload verified bit-identical"
            del chk

        model = load_model(spec, out_dir)
        prompts = make_prompts(spec, seed, model.config.vocab_size)
        generated, logits_list, stats = compute_references(spec, model, prompts)

        ok = (stats["min_greedy_top1_top2_gap_abs"] >= LOGIT_GAP_ABS
              and stats["min_greedy_top1_top2_gap_rel"] >= LOGIT_GAP_REL)
        reasons = []
        if not ok:
            reasons.append("logit near-tie")
        if stats["max_rel_err_f32_reference_vs_f64"] > MAX_REL_ERR_VS_F64:
            ok = False
            reasons.append("f32 reference not close to f64 recomputation")
        if min(len(set(g)) for g in generated) < MIN_DISTINCT_GENERATED:
            ok = False
            reasons.append("repetitive generation")
        if is_moe(spec):
            if stats["min_router_topk_prob_gap"] < ROUTER_GAP_MIN:
                ok = False
                reasons.append("router near-tie")
            if any(min(u) == 0 for u in stats["expert_usage_per_moe_layer"]):
                ok = False
                reasons.append("unused expert")
        if not ok:
            print(f"  {name}: seed {seed} rejected ({', '.join(reasons)}): gap abs "
                  f"{stats['min_greedy_top1_top2_gap_abs']:.3g} rel {stats['min_greedy_top1_top2_gap_rel']:.3g}"
                  f" f64 {stats['max_rel_err_f32_reference_vs_f64']:.3g}"
                  + (f" router {stats['min_router_topk_prob_gap']:.3g}" if is_moe(spec) else ""), file=sys.stderr)
            continue

        tensors = list_tensors(out_dir)
        dtypes = sorted({v[1] for v in tensors.values()})
        expected = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[spec["save_dtype"]]
        if dtypes != [expected]:
            raise RuntimeError(f"{name}: stored dtypes {dtypes}, expected {expected}")
        st_files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
        if len(st_files) != spec["shards"]:
            raise RuntimeError(f"{name}: {len(st_files)} safetensors files, expected {spec['shards']}")
        if spec["shards"] > 1 and not os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
            raise RuntimeError(f"{name}: missing index json")

        for i, lg in enumerate(logits_list):
            np.save(os.path.join(out_dir, f"prompt{i}.logits.npy"), np.ascontiguousarray(lg, dtype=np.float32))

        cfg = model.config
        notes = [spec["exercises"] + "."]
        notes.append(
            "Weights re-drawn by make_fixtures.init_weights (seeded); references computed in float32 "
            "from the model re-loaded from these files (attn_implementation=eager, experts eager)."
        )
        if hub_note:
            notes.append(hub_note + ".")
        ref = {
            "architecture": spec["arch"],
            "prompts": prompts,
            "generated": generated,
            "n_generate": N_GENERATE,
            "weights_dtype": spec["save_dtype"],
            "versions": versions(),
            "seed": seed,
            "attempts": attempt + 1,
            "notes": " ".join(notes),
            "logits_files": [f"prompt{i}.logits.npy" for i in range(len(prompts))],
            "logits_shapes": [list(lg.shape) for lg in logits_list],
            "checks": stats,
            "acceptance": {
                "logit_gap_abs": LOGIT_GAP_ABS,
                "logit_gap_rel": LOGIT_GAP_REL,
                "router_gap": ROUTER_GAP_MIN,
                "min_distinct_generated": MIN_DISTINCT_GENERATED,
                "max_rel_err_vs_f64": MAX_REL_ERR_VS_F64,
                "every_expert_used_in_every_moe_layer": True,
            },
            "summary": summarize(spec, cfg, out_dir, tensors),
        }
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            f.write(dump_json(ref) + "\n")
        print(f"{name}: seed {seed} ok; min gap abs {stats['min_greedy_top1_top2_gap_abs']:.4g} rel "
              f"{stats['min_greedy_top1_top2_gap_rel']:.4g} f64 {stats['max_rel_err_f32_reference_vs_f64']:.3g}"
              + (f"; router gap {stats['min_router_topk_prob_gap']:.3g}" if is_moe(spec) else ""),
              file=sys.stderr)
        return ref
    raise RuntimeError(f"{name}: no acceptable seed in {MAX_ATTEMPTS} attempts")


def dump_json(obj):
    """Indented JSON, but lists of scalars (token ids, shapes, counts) on one line."""
    text = json.dumps(obj, indent=1)
    def compact(m):
        try:
            return json.dumps(json.loads(m.group(0)))
        except json.JSONDecodeError:  # brackets inside a string, e.g. "[E, 2*ff, hidden]"
            return m.group(0)

    return re.sub(r"\[[^\[\]{}]*\]", compact, text)


def summarize(spec, cfg, out_dir, tensors):
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg_json = json.load(f)
    rope = {k: cfg_json[k] for k in ("rope_parameters", "rope_theta", "rope_scaling") if k in cfg_json}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    s = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_in_config_json": rope,
        "safetensors_files": sorted({v[0] for v in tensors.values()}),
        "n_tensors": len(tensors),
        "total_weight_bytes": sum(os.path.getsize(os.path.join(out_dir, f))
                                  for f in sorted({v[0] for v in tensors.values()})),
    }
    if is_moe(spec):
        s["num_experts"] = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        s["num_experts_per_tok"] = cfg.num_experts_per_tok
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                    "decoder_sparse_step", "mlp_only_layers", "clip_qkv"):
            if hasattr(cfg, key):
                s[key] = getattr(cfg, key)
        moe0 = "model.layers.%d." % moe_layer_indices(spec, cfg)[0]
        ex = sorted(k for k in tensors if k.startswith(moe0) and ("expert" in k or "gate." in k))
        s["first_moe_layer_tensor_names"] = ex
        if any(re.search(r"experts\.\d+\.", k) for k in tensors):
            s["expert_tensor_layout"] = "per-expert (Hub): experts.E.<proj>.weight"
        else:
            s["expert_tensor_layout"] = "fused: experts.gate_up_proj [E, 2*ff, hidden], experts.down_proj [E, hidden, ff]"
    return s


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------


IMPLEMENTATION_NOTES = """\
## What a re-implementation must match (transformers {TF}, checked against these fixtures)

An independent float64 numpy forward pass written from the notes below reproduces every
fixture to <= 5.2e-6 max relative error with identical greedy tokens.

* **RMSNorm** (all): `w * x / sqrt(mean(x^2) + rms_norm_eps)`, in f32. Plain `w`, not `1 + w`.
  No embedding scaling.
* **RoPE** (all): rotate-half / NeoX pairing `(i, i + head_dim/2)`, not interleaved pairs.
  `inv_freq[i] = 1 / theta^(2i/head_dim)`, position = absolute 0-based index,
  `cos/sin = cos/sin(pos * inv_freq)` repeated twice, then multiplied by the rope
  `attention_factor` (1 except yarn). Applied after Qwen3 q/k norm and after OLMoE norm+clip.
  `head_dim` = config `head_dim` if present and not null, else hidden/heads; the score
  scale is `head_dim^-0.5`. `rope_theta` defaults to 10000 when absent.
  * `linear`: `inv_freq / factor`.
  * `llama3`: `wl = 2*pi/inv_freq`; `wl > orig/low_freq_factor` -> `inv/factor`;
    `wl < orig/high_freq_factor` -> unchanged; otherwise (both bounds inclusive)
    `s = (orig/wl - low)/(high - low)`, `inv = (1-s)*inv/factor + s*inv`.
  * `yarn`: `low = floor(d*ln(orig/(beta_fast*2*pi))/(2*ln theta))`,
    `high = ceil(d*ln(orig/(beta_slow*2*pi))/(2*ln theta))` (no floor/ceil if `truncate`
    is false), clamped to `[0, d-1]`, `high += 0.001` if equal; beta_fast/slow default 32/1;
    `ramp = clamp((i - low)/(high - low), 0, 1)` for `i < d/2`;
    `inv = inv/factor * ramp + inv * (1 - ramp)`; `attention_factor` = config value, else
    `0.1*ln(factor) + 1` (or the mscale/mscale_all_dim ratio). It scales cos AND sin, so the
    attention logits grow by `attention_factor^2`. `original_max_position_embeddings`
    defaults to `max_position_embeddings` when missing from the rope dict.
* **Attention** (eager): causal softmax in f32; GQA query head `h` reads kv head
  `h // (heads / kv_heads)`.
  * Llama `attention_bias=true`: biases on q, k, v AND o_proj.
  * Qwen2-MoE: biases on q, k, v only (`qkv_bias`, default true); o_proj has none.
  * Qwen3-MoE: `q_norm`/`k_norm` weights `[head_dim]`, RMSNorm of each head separately,
    before RoPE.
  * OLMoE: `q_norm` weight `[hidden]`, `k_norm` weight `[kv_heads*hidden/heads]`: RMSNorm over
    the whole projection (all heads together), THEN `clip_qkv` clamps q, k and v to
    `[-clip, clip]`, then RoPE.
* **MLP / experts**: `down(silu(gate(x)) * up(x))`; Mixtral `w1 = gate`, `w3 = up`, `w2 = down`.
* **Routers** (no bias): `logits = x @ gate.weight^T`, softmax over ALL experts in f32,
  top-k of the probabilities. Mixtral always renormalises the top-k weights to sum to 1
  (it has no `norm_topk_prob` key); Qwen2/Qwen3/OLMoE only when `norm_topk_prob` is true
  (otherwise the weights are the raw full-softmax probabilities). The routed output is
  `sum_k w_k * expert_k(x)`.
  * Qwen2-MoE shared expert: `sigmoid(x @ shared_expert_gate.weight^T) * shared_expert(x)`,
    added to the routed sum (same input x as the router).
  * Qwen2/Qwen3: layer `i` is MoE iff `i not in mlp_only_layers` and `num_experts > 0` and
    `(i+1) % decoder_sparse_step == 0`; other layers are a dense MLP of `intermediate_size`
    named `mlp.gate_proj/up_proj/down_proj`; experts use `moe_intermediate_size`.
* **Weights**: bf16/f16 tensors are upcast to f32 and everything is computed in f32.
  Tied models have no `lm_head.weight`: use `model.embed_tokens.weight`.
* **config.json** as written by transformers 5: `rope_parameters` (with `rope_type`,
  `rope_theta`, scaling keys) instead of `rope_theta`/`rope_scaling`, `dtype` instead of
  `torch_dtype`; Mixtral writes `"head_dim": null`; Qwen3-MoE writes `num_local_experts`
  (Hub checkpoints say `num_experts`; transformers reads both); Qwen2-MoE writes `qkv_bias`,
  `layer_types`, `sliding_window: 0` (window is off unless `use_sliding_window`). The llama
  fixtures use the Hub/v4 keys (`rope_theta`, `rope_scaling`, `torch_dtype`). Old configs may
  say `"type"` instead of `"rope_type"` inside `rope_scaling`.
"""


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def write_readme(out_root):
    names = [n for n in FIXTURES if os.path.exists(os.path.join(out_root, n, "reference.json"))]
    refs = {}
    for n in names:
        with open(os.path.join(out_root, n, "reference.json")) as f:
            refs[n] = json.load(f)
    lines = []
    lines.append("# Golden reference fixtures")
    lines.append("")
    lines.append("Generated by `python3 scripts/make_fixtures.py [--out tests/fixtures] [--only NAME]`")
    lines.append("(needs torch, transformers, safetensors, numpy; CI only reads the committed files).")
    lines.append("Do not edit by hand; re-run the script. Tiny random-weight models, one folder each:")
    lines.append("")
    lines.append("* `config.json`, `generation_config.json`, `model*.safetensors` (+ index when sharded):")
    lines.append("  exactly what `save_pretrained` wrote (llama fixtures: config rewritten to Hub/v4 keys).")
    lines.append("* `prompt<i>.logits.npy`: float32 C-order `[len(prompt) + n_generate - 1, vocab]`,")
    lines.append("  teacher-forced logits over `prompt + generated[:-1]` in one forward pass.")
    lines.append("  Row `len(prompt) - 1 + j` is the distribution that produced `generated[j]`.")
    lines.append("* `reference.json`: prompts, 40 greedy tokens per prompt, seed, versions, checks.")
    lines.append("")
    lines.append("All references were computed in float32 from the re-loaded files")
    lines.append("(`attn_implementation=\"eager\"`, `experts_implementation=\"eager\"`), i.e. bf16/f16")
    lines.append("weights are upcast to f32 and everything afterwards is f32.")
    lines.append("Acceptance (the seed is bumped until all hold): every greedy step has")
    lines.append(f"top1 - top2 >= max({LOGIT_GAP_ABS:g}, {LOGIT_GAP_REL:g} * max|logit|); the sorted router probabilities")
    lines.append(f"have p[k-1] - p[k] >= {ROUTER_GAP_MIN:g} for every token and MoE layer; every expert is used in")
    lines.append(f"every MoE layer; each continuation has >= {MIN_DISTINCT_GENERATED} distinct tokens; and a float64")
    lines.append(f"recomputation from the same weights agrees to <= {MAX_REL_ERR_VS_F64:g} (max|diff| / max|logit|)")
    lines.append("with the same greedy tokens. That last number is the f32 noise floor of each reference")
    lines.append("(`checks.max_rel_err_f32_reference_vs_f64`); a 1e-4 max-relative tolerance leaves ~20x margin.")
    lines.append("Relative error here means max|a - b| / max|b| per logits array; elementwise relative error")
    lines.append("is meaningless for logits near zero.")
    lines.append("")
    if refs:
        v = next(iter(refs.values()))["versions"]
        lines.append("Package versions used: " + ", ".join(f"{k} {v[k]}" for k in
                                                          ("python", "torch", "transformers", "safetensors", "numpy")))
        lines.append("")
    lines.append("| fixture | arch | layers | hidden | heads/kv | head_dim | experts (top-k) | ff | vocab | stored | size |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    total = 0
    for n in names:
        r = refs[n]
        s = r["summary"]
        sz = dir_size(os.path.join(out_root, n))
        total += sz
        if "num_experts" in s:
            ex = f"{s['num_experts']} (top-{s['num_experts_per_tok']})"
            ff = f"moe {s.get('moe_intermediate_size', s['intermediate_size'])}"
            if "moe_intermediate_size" in s:
                ff += f", dense {s['intermediate_size']}"
            if s.get("shared_expert_intermediate_size"):
                ff += f", shared {s['shared_expert_intermediate_size']}"
        else:
            ex = "-"
            ff = str(s["intermediate_size"])
        lines.append(
            f"| `{n}` | {r['architecture']} | {s['num_hidden_layers']} | {s['hidden_size']} | "
            f"{s['num_attention_heads']}/{s['num_key_value_heads']} | {s['head_dim']} | {ex} | {ff} | "
            f"{s['vocab_size']} | {r['weights_dtype']} | {sz // 1024} KiB |"
        )
    lines.append("")
    lines.append(f"Total: {total // 1024} KiB.")
    lines.append("")
    for n in names:
        r = refs[n]
        s = r["summary"]
        lines.append(f"## `{n}`")
        lines.append("")
        lines.append(FIXTURES[n]["exercises"] + ".")
        lines.append("")
        lines.append(f"* seed {r['seed']}, prompt lengths {[len(p) for p in r['prompts']]}, "
                     f"files: {', '.join(s['safetensors_files'])}")
        lines.append(f"* rope in config.json: `{json.dumps(s['rope_in_config_json'], sort_keys=True)}`")
        c = r["checks"]
        lines.append(f"* min greedy gap: {c['min_greedy_top1_top2_gap_abs']:.3g} abs, "
                     f"{c['min_greedy_top1_top2_gap_rel']:.3g} rel; generate-vs-teacher-forced max |diff| "
                     f"{c['max_abs_diff_generate_scores_vs_teacher_forced']:.2g} "
                     f"({c['max_rel_diff_generate_scores_vs_teacher_forced']:.2g} rel); f32-vs-f64 "
                     f"{c['max_rel_err_f32_reference_vs_f64']:.2g} rel; distinct generated tokens "
                     f"{c['distinct_generated_tokens']}")
        if "min_router_topk_prob_gap" in c:
            lines.append(f"* MoE layers {c['moe_layers']}, min router top-k probability gap "
                         f"{c['min_router_topk_prob_gap']:.3g}, expert usage {c['expert_usage_per_moe_layer']}")
            lines.append(f"* expert tensor layout: {s['expert_tensor_layout']}")
            names_ = s.get('first_moe_layer_tensor_names', [])
            shown = [t for t in names_ if not re.search(r"experts\.([1-9]|\d\d+)\.", t)]
            lines.append(f"* first MoE layer tensors (expert 0 shown): {', '.join('`' + t + '`' for t in shown)}")
        if "clip_qkv_clipped_fraction" in c:
            lines.append(f"* clip_qkv clips {100 * c['clip_qkv_clipped_fraction']:.1f}% of q/k/v entries")
        lines.append("")
    lines.append(IMPLEMENTATION_NOTES.replace("{TF}", transformers.__version__))
    with open(os.path.join(out_root, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    ap.add_argument("--only", action="append", choices=sorted(FIXTURES), help="build only this fixture (repeatable)")
    args = ap.parse_args()
    setup_determinism()
    transformers.logging.set_verbosity_error()
    out_root = os.path.normpath(args.out)
    os.makedirs(out_root, exist_ok=True)
    for name in args.only or list(FIXTURES):
        build_fixture(name, FIXTURES[name], out_root)
    write_readme(out_root)
    print(f"fixtures written to {out_root}", file=sys.stderr)


if __name__ == "__main__":
    main()
