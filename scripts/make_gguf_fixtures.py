#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/tiny_llama_moe.gguf with the reference `gguf` package.

    pip install gguf numpy
    python3 scripts/make_gguf_fixtures.py [--out tests/fixtures/gguf]

The file is a tiny llama-architecture MoE (1 layer, 4 experts, top-2) with
llama.cpp's metadata keys and tensor names, F32/F16/Q8_0 tensors (Q8_0
quantized by gguf.quants) and a custom alignment of 64. Next to it,
tiny_llama_moe.json records the gguf package version and what the C++ test
(tests/runtime/gguf_test.cpp) checks: every key with its type and value, and
every tensor's name, ggml type, ne (ne[0] fastest), byte size, offset and the
sum of its bytes, plus the byte sum of each expert slice of the merged
expert tensors. Deterministic: the same package version writes the same file.
"""

import argparse
import json
import pathlib

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

N_VOCAB, N_EMBD, N_FF, N_EXPERT, N_EXPERT_USED, N_HEAD, N_HEAD_KV = 32, 64, 32, 4, 2, 4, 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/gguf"))
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny_llama_moe.gguf"
    rng = np.random.default_rng(1234)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_name("tiny-llama-moe")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_expert_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    w.add_file_type(7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(N_VOCAB - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(N_VOCAB)])
    w.add_token_types([2, 3, 3] + [1] * (N_VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    # one key of each remaining scalar type, to check the readers agree on every encoding
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_int32("test.i32", -2000000000)
    w.add_uint64("test.u64", 2**40 + 3)
    w.add_int64("test.i64", -(2**40) - 5)
    w.add_float64("test.f64", 2.5e-300)
    w.add_key_value("test.u16_array", [1, 2, 65535], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT16)
    w.add_key_value("test.bool_array", [True, False, True], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)

    def f32(shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = []  # (name, array as written, ggml type, numpy shape)

    def add(name, data, qtype):
        raw = gguf.quants.quantize(data, qtype)  # quantized types: uint8 rows of whole blocks
        w.add_tensor(name, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        tensors.append((name, raw, qtype, data.shape))

    add("token_embd.weight", f32((N_VOCAB, N_EMBD)), Q.F16)
    add("blk.0.attn_norm.weight", 1 + f32((N_EMBD,)), Q.F32)
    add("blk.0.attn_q.weight", f32((N_EMBD, N_EMBD)), Q.Q8_0)
    add("blk.0.attn_k.weight", f32((N_EMBD // N_HEAD * N_HEAD_KV, N_EMBD)), Q.Q8_0)
    add("blk.0.ffn_gate_inp.weight", f32((N_EXPERT, N_EMBD)), Q.F32)
    add("blk.0.ffn_gate_exps.weight", f32((N_EXPERT, N_FF, N_EMBD)), Q.Q8_0)
    add("blk.0.ffn_up_exps.weight", f32((N_EXPERT, N_FF, N_EMBD)), Q.Q8_0)
    add("blk.0.ffn_down_exps.weight", f32((N_EXPERT, N_EMBD, N_FF)), Q.F16)
    add("output_norm.weight", 1 + f32((N_EMBD,)), Q.F32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # What the reference reader sees, recorded for the C++ test.
    reader = gguf.GGUFReader(str(path))
    type_names = {
        gguf.GGUFValueType.UINT8: "u8", gguf.GGUFValueType.INT8: "i8", gguf.GGUFValueType.UINT16: "u16",
        gguf.GGUFValueType.INT16: "i16", gguf.GGUFValueType.UINT32: "u32", gguf.GGUFValueType.INT32: "i32",
        gguf.GGUFValueType.FLOAT32: "f32", gguf.GGUFValueType.BOOL: "bool", gguf.GGUFValueType.STRING: "string",
        gguf.GGUFValueType.ARRAY: "array", gguf.GGUFValueType.UINT64: "u64", gguf.GGUFValueType.INT64: "i64",
        gguf.GGUFValueType.FLOAT64: "f64",
    }
    kv = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        entry = {"type": type_names[field.types[0]]}
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            entry["element_type"] = type_names[field.types[-1]]
            entry["count"] = len(field.data)
            entry["value"] = field.contents()
        else:
            value = field.contents()
            entry["value"] = float(value) if isinstance(value, (float, np.floating)) else value
        kv[field.name] = entry
    by_name = {t.name: t for t in reader.tensors}
    expected_tensors = []
    for name, raw, qtype, shape in tensors:
        t = by_name[name]
        raw_bytes = np.ascontiguousarray(raw).tobytes()
        assert bytes(t.data.tobytes()) == raw_bytes, name
        entry = {
            "name": name,
            "type": qtype.name,
            "ne": [int(n) for n in t.shape],
            "n_bytes": len(raw_bytes),
            "offset": int(t.data_offset - reader.data_offset),
            "byte_sum": int(np.frombuffer(raw_bytes, dtype=np.uint8).sum(dtype=np.uint64)),
        }
        if len(shape) == 3:
            entry["expert_byte_sums"] = [int(np.frombuffer(np.ascontiguousarray(raw[e]).tobytes(), dtype=np.uint8)
                                             .sum(dtype=np.uint64)) for e in range(shape[0])]
        expected_tensors.append(entry)
    expected = {
        "generator": "scripts/make_gguf_fixtures.py",
        "gguf_package_version": gguf.__version__ if hasattr(gguf, "__version__") else _package_version(),
        "file": path.name,
        "file_size": path.stat().st_size,
        "gguf_version": 3,
        "alignment": 64,
        "data_offset": int(reader.data_offset),
        "kv": kv,
        "tensors": expected_tensors,
    }
    (out / "tiny_llama_moe.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) and {out / 'tiny_llama_moe.json'}")


def _package_version():
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
