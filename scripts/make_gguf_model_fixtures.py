#!/usr/bin/env python3
"""Converts the tiny Hugging Face fixtures in tests/fixtures/<name>/ to GGUF
(tests/fixtures/<name>/model.gguf), the way llama.cpp's convert_hf_to_gguf.py
lays such models out, so the golden test can check that a GGUF file gives the
same logits as transformers did for the folder.

    pip install gguf numpy torch safetensors
    python3 scripts/make_gguf_model_fixtures.py [name ...]

Conventions followed (from convert_hf_to_gguf.py and gguf-py's tensor map):
  - tensor names token_embd, output_norm, output, blk.N.{attn_norm, ffn_norm,
    attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm, ffn_gate,
    ffn_up, ffn_down, ffn_gate_inp, ffn_{gate,up,down}_exps (3-D, experts
    stacked), ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp}; output omitted
    when the embeddings are tied;
  - architecture "llama" for Llama and Mixtral (Mixtral adds expert_count);
    its q/k weights and biases are permuted per head so rotary pairs become
    adjacent (LlamaModel.permute), which is why llama files use ggml's
    adjacent-pair RoPE;
  - llama-3 RoPE scaling is baked into a rope_freqs.weight tensor of
    per-frequency divisors (LlamaModel.generate_extra_tensors); linear scaling
    is rope.scaling.type/factor;
  - 1-D tensors (norms, biases) are F32; matrices keep the checkpoint's dtype
    (F32, F16 or BF16).
Qwen2-MoE dense layers (mlp_only_layers), which llama.cpp does not convert, are
written as plain blk.N.ffn_{gate,up,down}; norm_topk_prob is written as
<arch>.expert_weights_norm. Fixtures using YaRN are skipped (moesh does not
read YaRN from GGUF yet). Deterministic for a given gguf version.
"""
import importlib.metadata
import json
import math
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import gguf

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NAMES = ["llama_gqa_tied", "llama_mha_linear", "mixtral_top2", "olmoe_clip", "qwen2_moe_fused_bf16",
         "qwen2_moe_shared", "qwen3_moe_qknorm"]
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe",
             "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe"}


def load_weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def permute_rows(w, n_head):
    """Within each head, reorder rows (i, i + d/2) into adjacent pairs (2i, 2i+1)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def add(writer, name, t):
    t = t.contiguous()
    if t.dim() == 1 or t.dtype == torch.float32:
        writer.add_tensor(name, t.float().numpy())
    elif t.dtype == torch.float16:
        writer.add_tensor(name, t.numpy())
    elif t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().view(np.uint8)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        raise SystemExit(f"{name}: unexpected dtype {t.dtype}")


def rope_params(cfg):
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return rp, theta


def llama3_freq_divisors(rp, theta, head_dim):
    factor, low, high = rp["factor"], rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def convert(name):
    folder = ROOT / name
    cfg = json.loads((folder / "config.json").read_text())
    hf_arch = cfg["architectures"][0]
    arch = GGUF_ARCH[hf_arch]
    rp, theta = rope_params(cfg)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "yarn":
        print(f"{name}: skipped (YaRN)")
        return
    W = load_weights(folder)
    n_embd, n_layer, n_head = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or n_embd // n_head
    n_expert = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    is_llama = arch == "llama"

    path = folder / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    if cfg.get("intermediate_size") and (not n_expert or hf_arch != "MixtralForCausalLM"):
        w.add_feed_forward_length(cfg["intermediate_size"])
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        ff_expert = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        if hf_arch == "MixtralForCausalLM":
            w.add_feed_forward_length(ff_expert)
        else:
            w.add_expert_feed_forward_length(ff_expert)
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        if "norm_topk_prob" in cfg:
            w.add_bool(f"{arch}.expert_weights_norm", bool(cfg["norm_topk_prob"]))
    if cfg.get("clip_qkv"):
        w.add_clamp_kqv(float(cfg["clip_qkv"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    add(w, "token_embd.weight", W["model.embed_tokens.weight"])
    add(w, "output_norm.weight", W["model.norm.weight"])
    if not cfg.get("tie_word_embeddings", False):
        add(w, "output.weight", W["lm_head.weight"])
    if rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_freq_divisors(rp, theta, head_dim))

    for il in range(n_layer):
        p, b = f"model.layers.{il}.", f"blk.{il}."
        add(w, b + "attn_norm.weight", W[p + "input_layernorm.weight"])
        add(w, b + "ffn_norm.weight", W[p + "post_attention_layernorm.weight"])
        for hf, gg in [("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")]:
            for kind in ("weight", "bias"):
                key = f"{p}self_attn.{hf}_proj.{kind}"
                if key not in W:
                    continue
                t = W[key]
                if is_llama and hf in ("q", "k"):
                    t = permute_rows(t, n_head if hf == "q" else n_head_kv)
                add(w, f"{b}{gg}.{kind}", t)
        for hf, gg in [("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")]:
            if f"{p}self_attn.{hf}.weight" in W:
                add(w, f"{b}{gg}.weight", W[f"{p}self_attn.{hf}.weight"])

        moe = p + ("block_sparse_moe." if f"{p}block_sparse_moe.gate.weight" in W else "mlp.")
        if f"{moe}gate.weight" not in W:  # dense layer
            for k in ("gate", "up", "down"):
                add(w, f"{b}ffn_{k}.weight", W[f"{p}mlp.{k}_proj.weight"])
            continue
        add(w, b + "ffn_gate_inp.weight", W[moe + "gate.weight"])
        if moe + "experts.gate_up_proj" in W:  # transformers 5 fused layout
            gu = W[moe + "experts.gate_up_proj"]
            ff = gu.shape[1] // 2
            stacks = {"gate": gu[:, :ff, :], "up": gu[:, ff:, :], "down": W[moe + "experts.down_proj"]}
        else:
            names = ({"gate": "w1", "up": "w3", "down": "w2"} if "block_sparse_moe" in moe
                     else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
            stacks = {k: torch.stack([W[f"{moe}experts.{e}.{v}.weight"] for e in range(n_expert)])
                      for k, v in names.items()}
        for k, t in stacks.items():
            add(w, f"{b}ffn_{k}_exps.weight", t)
        if moe + "shared_expert.gate_proj.weight" in W:
            for k in ("gate", "up", "down"):
                add(w, f"{b}ffn_{k}_shexp.weight", W[f"{moe}shared_expert.{k}_proj.weight"])
            add(w, b + "ffn_gate_inp_shexp.weight", W[moe + "shared_expert_gate.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{name}: wrote {path} ({path.stat().st_size} bytes, gguf {importlib.metadata.version('gguf')})")


def main():
    for name in (sys.argv[1:] or NAMES):
        convert(name)


if __name__ == "__main__":
    main()
