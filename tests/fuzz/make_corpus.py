#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (standard library only).

    python3 tests/fuzz/make_corpus.py        # rewrites tests/fuzz/corpus/{safetensors,model_config,npy}/

Seeds named valid_* must be accepted and invalid_* rejected: the corpus replay
test (moesh_fuzz_corpus_tests) checks that, so the seeds double as regression
tests. Minimized crashers found by the fuzzer are added next to them under
their own names (crash-<sha1>), which this script leaves alone.
"""
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent


def safetensors(header, data=b"", n_header=None, pad=True):
    """A file image: u64 LE header length, header (JSON text or bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text) if n_header is None else n_header) + text + data


def tensors(specs, metadata=None):
    """Valid file from [(name, dtype, shape, bytes)], laid out as the reference writer does."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in specs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors(header, data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
f16 = struct.pack("<2H", 0x3C00, 0xC000)
bf16 = struct.pack("<3H", 0x3F80, 0xC000, 0x3F00)
sizes = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "F16": 2,
         "BF16": 2, "F32": 4, "F64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
         "F8_E5M2FNUZ": 1, "F8_E8M0": 1}

SAFETENSORS = {
    "valid_f32_f16_bf16.safetensors": tensors(
        [("model.layers.0.w", "F32", [2, 2], f32), ("b.f16", "F16", [2], f16), ("c.bf16", "BF16", [1, 3], bf16)],
        {"format": "pt"}),
    "valid_no_tensors.safetensors": safetensors({}),
    "valid_scalar_and_empty.safetensors": tensors(
        [("scalar", "F32", [], f32[:4]), ("empty", "BF16", [0, 4096], b""), ("ids", "I64", [2], bytes(16))]),
    "valid_every_dtype.safetensors": tensors(
        [(d.lower(), d, [2], bytes(2 * n)) for d, n in sizes.items()]
        + [("f4", "F4", [2, 2], bytes(2)), ("f6a", "F6_E2M3", [4], bytes(3)), ("f6b", "F6_E3M2", [4], bytes(3))]),
    "valid_unordered_offsets.safetensors": safetensors(
        {"z": entry("U8", [2], 0, 2), "a": entry("U8", [1], 2, 3), "__metadata__": None}, b"\1\2\3"),
    "invalid_truncated.safetensors": b"\x10\x00\x00",
    "invalid_header_past_end.safetensors": safetensors({"a": entry("U8", [1], 0, 1)}, b"", n_header=4096),
    "invalid_huge_header_length.safetensors": safetensors({}, n_header=1 << 62),
    "invalid_zero_header_length.safetensors": struct.pack("<Q", 0) + b"{}",
    "invalid_not_json.safetensors": safetensors(b'{"a": nope}'),
    "invalid_not_object.safetensors": safetensors(b"[1, 2, 3]"),
    "invalid_nul_in_header.safetensors": safetensors(b'{"a":{}}\x00{', pad=False),
    "invalid_offset_past_end.safetensors": safetensors({"w": entry("F32", [4], 0, 16)}, bytes(8)),
    "invalid_overlap.safetensors": safetensors({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, bytes(6)),
    "invalid_hole.safetensors": safetensors({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, bytes(6)),
    "invalid_trailing_bytes.safetensors": safetensors({"a": entry("U8", [2], 0, 2)}, bytes(5)),
    "invalid_unknown_dtype.safetensors": safetensors({"w": entry("F128", [1], 0, 16)}, bytes(16)),
    "invalid_byte_count.safetensors": safetensors({"w": entry("F32", [2, 2], 0, 12)}, bytes(12)),
    "invalid_negative_shape.safetensors": safetensors({"w": entry("F32", [-1, 4], 0, 16)}, bytes(16)),
    "invalid_float_shape.safetensors": safetensors({"w": entry("F32", [2.0], 0, 8)}, bytes(8)),
    "invalid_overflow_shape.safetensors": safetensors({"w": entry("F32", [1 << 32, 1 << 32], 0, 0)}),
    "invalid_rank_9.safetensors": safetensors({"w": entry("U8", [1] * 9, 0, 1)}, bytes(1)),
    "invalid_missing_offsets.safetensors": safetensors({"w": {"dtype": "U8", "shape": [1]}}, bytes(1)),
    "invalid_duplicate_names.safetensors": safetensors(
        b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        bytes(2)),
    "invalid_unknown_key.safetensors": safetensors({"w": dict(entry("U8", [1], 0, 1), offset=0)}, bytes(1)),
    "invalid_metadata_not_string.safetensors": safetensors({"__metadata__": {"n": 1}}),
    "invalid_f6_partial_byte.safetensors": safetensors({"w": entry("F6_E2M3", [2], 0, 2)}, bytes(2)),
    "invalid_number_overflow.safetensors": safetensors(b'{"w":1e999}'),
}


def config(arch, **extra):
    base = {"architectures": [arch], "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    base.update(extra)
    return (json.dumps(base, indent=2) + "\n").encode()


MODEL_CONFIG = {
    "valid_llama.json": config("LlamaForCausalLM", intermediate_size=128),
    "valid_llama3_rope.json": config("LlamaForCausalLM", intermediate_size=128, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}, eos_token_id=[2, 3]),
    "valid_llama_linear_rope.json": config("LlamaForCausalLM", intermediate_size=128,
                                           rope_scaling={"type": "linear", "factor": 2.0}),
    "valid_mixtral.json": config("MixtralForCausalLM", intermediate_size=96, num_local_experts=8,
                                 num_experts_per_tok=2, sliding_window=None, rope_theta=1e6),
    "valid_qwen2_moe.json": config("Qwen2MoeForCausalLM", intermediate_size=128, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=4,
                                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
                                   use_sliding_window=False, qkv_bias=True),
    "valid_qwen3_moe_yarn.json": config("Qwen3MoeForCausalLM", moe_intermediate_size=32, num_experts=8,
                                        num_experts_per_tok=2, head_dim=32, norm_topk_prob=True,
                                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 128}),
    "valid_olmoe.json": config("OlmoeForCausalLM", intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                               clip_qkv=None, rms_norm_eps=1e-5),
    "invalid_not_json.json": b'{"architectures": ["LlamaForCausalLM"], ',
    "invalid_architecture.json": config("GPT2LMHeadModel"),
    "invalid_missing_hidden_size.json": config("LlamaForCausalLM", intermediate_size=128).replace(
        b'"hidden_size": 64,', b""),
    "invalid_experts_per_tok.json": config("MixtralForCausalLM", intermediate_size=96, num_local_experts=2,
                                           num_experts_per_tok=3),
    "invalid_rope_type.json": config("LlamaForCausalLM", intermediate_size=128,
                                     rope_scaling={"rope_type": "longrope", "factor": 2.0}),
    "invalid_head_split.json": config("LlamaForCausalLM", intermediate_size=128, num_key_value_heads=3),
}


def npy(header_dict, data, version=1):
    """A .npy image laid out as numpy.save does (header padded to 64 bytes with a final newline)."""
    prefix = 10 if version == 1 else 12
    text = header_dict.encode()
    text += b" " * ((64 - (prefix + len(text) + 1) % 64) % 64) + b"\n"
    size = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + data


def npy_dict(shape, descr="<f4", fortran="False"):
    return f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"


NPY = {
    "valid_2x3.npy": npy(npy_dict("(2, 3)"), struct.pack("<6f", -1, -0.5, 0, 0.5, 1, 1.5)),
    "valid_v2_vector.npy": npy(npy_dict("(3,)"), struct.pack("<3f", 1.5, -2.25, 3e-8), version=2),
    "valid_v3_scalar.npy": npy(npy_dict("()"), struct.pack("<f", 7.0), version=3),
    "valid_empty.npy": npy(npy_dict("(0, 4)"), b""),
    "valid_python2_longs.npy": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 1L), }", bytes(8)),
    "invalid_float64.npy": npy(npy_dict("(2,)", descr="<f8"), bytes(16)),
    "invalid_big_endian.npy": npy(npy_dict("(2,)", descr=">f4"), bytes(8)),
    "invalid_fortran_order.npy": npy(npy_dict("(2, 3)", fortran="True"), bytes(24)),
    "invalid_truncated_data.npy": npy(npy_dict("(2, 3)"), bytes(23)),
    "invalid_version_4.npy": npy(npy_dict("(2,)"), bytes(8))[:6] + b"\x04\x00" + npy(npy_dict("(2,)"), bytes(8))[8:],
    "invalid_overflow_shape.npy": npy(npy_dict("(4294967296, 4294967296)"), bytes(8)),
    "invalid_missing_key.npy": npy("{'descr': '<f4', 'shape': (2,), }", bytes(8)),
}


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        assert len(data) < 4096, name
        (folder / name).write_bytes(data)


if __name__ == "__main__":
    write(HERE / "corpus" / "safetensors", SAFETENSORS)
    write(HERE / "corpus" / "model_config", MODEL_CONFIG)
    write(HERE / "corpus" / "npy", NPY)
    print(f"wrote {len(SAFETENSORS)} safetensors, {len(MODEL_CONFIG)} config.json and {len(NPY)} .npy seeds "
          f"under {HERE / 'corpus'}")
