#!/usr/bin/env python3
"""Writes a synthetic Mixtral-shaped MoE GGUF for benchmarking (random weights).

    pip install gguf numpy            # tested with gguf 0.19.0, numpy 2.4.6
    python3 scripts/bench/make_moe_gguf.py --shape moe-mid --type q4_0 --out DIR
    python3 scripts/bench/make_moe_gguf.py --shape all --type all --out DIR   # all four files

Output: DIR/<shape>-<type>.gguf, e.g. moe-mid-q4_0.gguf, plus DIR/<shape>-<type>.json
(shape, types, per-tensor byte sizes, and the bytes a decoder must read per token).

Layout (what llama.cpp loads as architecture "llama" with experts, i.e. Mixtral):
  token_embd.weight            [n_embd, n_vocab]                    --type (Q8_0 or Q4_0)
  blk.N.attn_norm.weight       [n_embd]                             F32, all ones
  blk.N.attn_q/k/v.weight      [n_embd, n_head*hd | n_kv*hd]        --type
  blk.N.attn_output.weight     [n_head*hd, n_embd]                  --type
  blk.N.ffn_norm.weight        [n_embd]                             F32, all ones
  blk.N.ffn_gate_inp.weight    [n_embd, n_expert]                   F32 (router; llama.cpp's
                                                                    converter/quantizer keep it F32)
  blk.N.ffn_gate_exps.weight   [n_embd, n_ff, n_expert]             --type
  blk.N.ffn_up_exps.weight     [n_embd, n_ff, n_expert]             --type
  blk.N.ffn_down_exps.weight   [n_ff, n_embd, n_expert]             --type
  output_norm.weight           [n_embd]                             F32, all ones
  output.weight                [n_embd, n_vocab]                    --type
(ggml order: ne[0] fastest.)  token_embd and output use the same quant type as every
other matrix; only norms and the router are F32.

Weights: standard normal * 0.02 (float32), quantized with gguf.quants.quantize; norms = 1.
Each tensor draws from its own numpy Generator seeded with (--seed, tensor index), so the
file is byte-identical for a given gguf/numpy version and seed. Writing is streamed
tensor by tensor (peak memory ~ one expert tensor in f32 + its quantized copy).

Tokenizer: a synthetic byte-level BPE ("gpt2" model, pre "default") so llama.cpp's vocab
loader is satisfied (it requires tokenizer.ggml.merges for gpt2): ids 0..255 are the 256
GPT-2 byte tokens (bytes_to_unicode, in byte order), ids 256..n_vocab-2 are tokens built
by merges "A B" of existing tokens (printable-ASCII pairs, then triples, ...), and the
last id is "<|endoftext|>" (CONTROL), used as BOS and EOS; add_bos_token = false.
llama-bench feeds token ids directly, so the vocabulary content does not affect timing.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

SHAPES = {
    # name: hidden, layers, experts, top-k, expert ffn, heads, kv heads, vocab
    "moe-small": dict(n_embd=512, n_layer=4, n_expert=8, n_expert_used=2, n_ff=1408,
                      n_head=8, n_head_kv=4, n_vocab=32000),
    "moe-mid": dict(n_embd=2048, n_layer=8, n_expert=8, n_expert_used=2, n_ff=5632,
                    n_head=16, n_head_kv=8, n_vocab=32000),
}
TYPES = {"q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
         "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
SCALE = 0.02
CONTEXT_LENGTH = 4096
ROPE_FREQ_BASE = 1e6  # Mixtral's
RMS_EPS = 1e-5


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_vocab(n_vocab):
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    merges = []
    chars = [b2u[b] for b in range(32, 127)]  # printable ASCII, ' ' is 'Ġ'
    n_merged = n_vocab - 256 - 1
    frontier = chars[:]
    while len(merges) < n_merged:
        nxt = []
        for left in frontier:
            for c in chars:
                t = left + c
                if t in seen:
                    continue
                seen.add(t)
                tokens.append(t)
                merges.append(f"{left} {c}")
                nxt.append(t)
                if len(merges) == n_merged:
                    break
            if len(merges) == n_merged:
                break
        frontier = nxt
    tokens.append("<|endoftext|>")
    types = [gguf.TokenType.NORMAL] * (n_vocab - 1) + [gguf.TokenType.CONTROL]
    assert len(tokens) == n_vocab
    return tokens, types, merges


def tensor_plan(s, qtype):
    """[(name, numpy shape (outer..inner), ggml type, kind)] in file order."""
    hd = s["n_embd"] // s["n_head"]
    E, F, V, X = s["n_embd"], s["n_ff"], s["n_vocab"], s["n_expert"]
    plan = [("token_embd.weight", (V, E), qtype, "mat")]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (E,), Q.F32, "ones"),
            (p + "attn_q.weight", (s["n_head"] * hd, E), qtype, "mat"),
            (p + "attn_k.weight", (s["n_head_kv"] * hd, E), qtype, "mat"),
            (p + "attn_v.weight", (s["n_head_kv"] * hd, E), qtype, "mat"),
            (p + "attn_output.weight", (E, s["n_head"] * hd), qtype, "mat"),
            (p + "ffn_norm.weight", (E,), Q.F32, "ones"),
            (p + "ffn_gate_inp.weight", (X, E), Q.F32, "mat"),
            (p + "ffn_gate_exps.weight", (X, F, E), qtype, "mat"),
            (p + "ffn_up_exps.weight", (X, F, E), qtype, "mat"),
            (p + "ffn_down_exps.weight", (X, E, F), qtype, "mat"),
        ]
    plan += [("output_norm.weight", (E,), Q.F32, "ones"),
             ("output.weight", (V, E), qtype, "mat")]
    return plan


def nbytes(shape, t):
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    assert shape[-1] % bs == 0, (shape, t)
    return int(np.prod(shape[:-1])) * shape[-1] // bs * ts


def make_data(shape, t, kind, seed, idx):
    if kind == "ones":
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, idx])
    if len(shape) == 3:  # quantize one expert at a time to bound memory
        parts = []
        for _ in range(shape[0]):
            x = rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(SCALE)
            parts.append(gguf.quants.quantize(x, t))
        return np.stack(parts)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(SCALE)
    return gguf.quants.quantize(x, t)


def write_one(shape_name, type_name, out_dir, seed):
    s = SHAPES[shape_name]
    qtype, ftype = TYPES[type_name]
    path = out_dir / f"{shape_name}-{type_name}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-{shape_name}-{type_name}")
    w.add_description(f"random weights (normal*{SCALE}, seed {seed}) for benchmarking; "
                      "written by moesh scripts/bench/make_moe_gguf.py")
    w.add_file_type(ftype)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_expert_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_rope_freq_base(ROPE_FREQ_BASE)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_expert_count(s["n_expert"])
    w.add_expert_used_count(s["n_expert_used"])
    w.add_vocab_size(s["n_vocab"])
    tokens, types, merges = make_vocab(s["n_vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(s["n_vocab"] - 1)
    w.add_eos_token_id(s["n_vocab"] - 1)
    w.add_add_bos_token(False)

    plan = tensor_plan(s, qtype)
    sizes = {}
    for name, shape, t, _ in plan:
        nb = nbytes(shape, t)
        sizes[name] = nb
        if t == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nb)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nb, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (name, shape, t, kind) in enumerate(plan):
        data = make_data(shape, t, kind, seed, idx)
        assert data.nbytes == sizes[name], (name, data.nbytes, sizes[name])
        w.write_tensor_data(data)
        print(f"  {name:28s} {t.name:5s} {sizes[name]:>12d} B", file=sys.stderr)
    w.close()

    # bytes a decoder reads per generated token (weights only, no KV cache / activations):
    # every non-expert matrix and vector, top-k of n_expert experts per layer, one row of
    # token_embd, and all of output.
    k, X = s["n_expert_used"], s["n_expert"]
    exp = sum(v for n, v in sizes.items() if "_exps." in n)
    emb_row = sizes["token_embd.weight"] // s["n_vocab"]
    non_exp = sum(v for n, v in sizes.items() if "_exps." not in n and n != "token_embd.weight")
    info = dict(file=path.name, shape=shape_name, type=type_name, seed=seed, scale=SCALE,
                hparams=s, gguf_version=_version("gguf"), numpy_version=np.__version__,
                file_bytes=path.stat().st_size, tensor_bytes=sizes,
                bytes_per_token=dict(non_expert_incl_output=non_exp, experts_topk=exp * k // X,
                                     embedding_row=emb_row,
                                     total=non_exp + exp * k // X + emb_row))
    (out_dir / f"{shape_name}-{type_name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {path} ({info['file_bytes']} bytes; {info['bytes_per_token']['total']} weight bytes/token)")


def _version(pkg):
    from importlib.metadata import version
    return version(pkg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=[*SHAPES, "all"], required=True)
    ap.add_argument("--type", choices=[*TYPES, "all"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20241128)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for sh in (SHAPES if a.shape == "all" else [a.shape]):
        for ty in (TYPES if a.type == "all" else [a.type]):
            write_one(sh, ty, out, a.seed)


if __name__ == "__main__":
    main()
