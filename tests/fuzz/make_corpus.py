#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (standard library only).

    python3 tests/fuzz/make_corpus.py        # rewrites tests/fuzz/corpus/{safetensors,model_config,npy,gguf,route_trace,request,openai,grammar,json_schema}/

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


# ---- GGUF: images built field by field (see runtime/gguf.h for the layout)

def g_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


G_U8, G_I8, G_U16, G_I16, G_U32, G_I32, G_F32, G_BOOL, G_STR, G_ARR, G_U64, G_I64, G_F64 = range(13)
G_FMT = {G_U8: "B", G_I8: "b", G_U16: "H", G_I16: "h", G_U32: "I", G_I32: "i", G_F32: "f", G_BOOL: "B",
         G_U64: "Q", G_I64: "q", G_F64: "d"}
T_F32, T_F16, T_Q4_0, T_Q8_0, T_Q4_K, T_BF16, T_MXFP4 = 0, 1, 2, 8, 12, 30, 39
T_SIZE = {T_F32: (1, 4), T_F16: (1, 2), T_Q4_0: (32, 18), T_Q8_0: (32, 34), T_Q4_K: (256, 144), T_BF16: (1, 2),
          T_MXFP4: (32, 17)}


def g_val(vtype, value):
    if vtype == G_STR:
        return g_str(value)
    if vtype == G_ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(g_val(etype, v) for v in items)
    return struct.pack("<" + G_FMT[vtype], value)


def g_kv(key, vtype, value):
    return g_str(key) + struct.pack("<I", vtype) + g_val(vtype, value)


def g_nbytes(ttype, ne):
    block, size = T_SIZE[ttype]
    n = ne[0] // block * size
    for d in ne[1:]:
        n *= d
    return n


def gguf(kvs, tensors, version=3, align=32, n_kv=None, n_tensors=None, data=None):
    """kvs: [(key, type, value)]; tensors: [(name, ne, ggml type, offset or None)], laid out
    back to back at aligned offsets when offset is None; data defaults to a byte pattern."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    out += b"".join(g_kv(*kv) for kv in kvs)
    cursor, end = 0, 0
    for name, ne, ttype, offset in tensors:
        if offset is None:
            offset = cursor
        cursor = -(-(offset + g_nbytes(ttype, ne)) // align) * align
        end = max(end, offset + g_nbytes(ttype, ne))
        out += g_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", ttype, offset)
    if tensors:
        out += bytes(-len(out) % align)
        out += bytes(i * 37 % 251 for i in range(end)) if data is None else data
    return out


G_LLAMA = [("general.architecture", G_STR, "llama"), ("llama.block_count", G_U32, 1),
           ("llama.embedding_length", G_U32, 64), ("llama.expert_count", G_U32, 4),
           ("llama.expert_used_count", G_U32, 2), ("llama.rope.freq_base", G_F32, 10000.0)]
G_TOKENS = [("tokenizer.ggml.tokens", G_ARR, (G_STR, ["<s>", "</s>", "a", "b"])),
            ("tokenizer.ggml.scores", G_ARR, (G_F32, [0.0, -1.0, -2.0, -3.0]))]
G_ONE = [("w", [8], T_F32, None)]

GGUF = {
    "valid_minimal.gguf": gguf([("general.architecture", G_STR, "llama")], G_ONE),
    "valid_v2.gguf": gguf([("general.architecture", G_STR, "llama")], G_ONE, version=2),
    "valid_no_tensors.gguf": gguf(G_LLAMA, []),
    "valid_empty.gguf": gguf([], []),
    "valid_tiny_moe.gguf": gguf(G_LLAMA + G_TOKENS, [
        ("token_embd.weight", [32, 4], T_F16, None), ("blk.0.ffn_gate_inp.weight", [32, 4], T_F32, None),
        ("blk.0.ffn_gate_exps.weight", [32, 2, 4], T_Q8_0, None), ("blk.0.ffn_down_exps.weight", [32, 1, 4], T_Q4_0, None),
        ("output_norm.weight", [32], T_BF16, None)]),
    "valid_alignment_64.gguf": gguf([("general.alignment", G_U32, 64)], [("a", [3], T_F32, None), ("b", [32, 1, 2], T_MXFP4, None)],
                                    align=64),
    "valid_every_scalar_type.gguf": gguf([(f"k.{t}", t, v) for t, v in [
        (G_U8, 200), (G_I8, -3), (G_U16, 60000), (G_I16, -300), (G_U32, 7), (G_I32, -7), (G_F32, 0.5), (G_BOOL, 1),
        (G_U64, 2**63), (G_I64, -2**62), (G_F64, 1e-300), (G_STR, "s")]], []),
    "valid_nested_array.gguf": gguf([("nested", G_ARR, (G_ARR, [(G_U32, [1, 2]), (G_STR, ["x"]), (G_BOOL, [])]))], []),
    "valid_q4_k_4d.gguf": gguf([], [("k", [256, 1, 2, 1], T_Q4_K, None)]),
    "valid_unordered_offsets.gguf": gguf([], [("b", [8], T_F32, 32), ("a", [8], T_F32, 0)], data=bytes(64)),
    "invalid_magic.gguf": b"GGUG" + gguf([], G_ONE)[4:],
    "invalid_version_1.gguf": gguf([], [], version=1),
    "invalid_version_99.gguf": gguf([], [], version=99),
    "invalid_huge_n_kv.gguf": gguf(G_LLAMA, [], n_kv=2**40),
    "invalid_negative_n_tensors.gguf": gguf([], G_ONE, n_tensors=2**64 - 1),
    "invalid_duplicate_key.gguf": gguf([("a", G_U32, 1), ("a", G_U32, 2)], []),
    "invalid_empty_key.gguf": gguf([("", G_U32, 1)], []),
    "invalid_string_past_end.gguf": gguf([("general.name", G_STR, "abc")], [])[:-1],
    "invalid_value_type.gguf": gguf([], [], n_kv=1) + g_str("k") + struct.pack("<II", 13, 0),
    "invalid_array_count.gguf": gguf([], [], n_kv=1) + g_str("k") + struct.pack("<IIQ", G_ARR, G_F64, 2**61) + bytes(16),
    "invalid_nested_3_deep.gguf": gguf([("d", G_ARR, (G_ARR, [(G_ARR, [])]))], []),
    "invalid_bool_2.gguf": gguf([("b", G_U8, 2)], [])[:-5] + struct.pack("<IB", G_BOOL, 2),
    "invalid_alignment_3.gguf": gguf([("general.alignment", G_U32, 3)], []),
    "invalid_alignment_u64.gguf": gguf([("general.alignment", G_U64, 32)], []),
    "invalid_offset_past_end.gguf": gguf([], [("w", [8], T_F32, 1024)], data=bytes(32)),
    "invalid_size_past_end.gguf": gguf([], [("w", [32, 4], T_Q8_0, None)])[:-1],
    "invalid_misaligned.gguf": gguf([], [("w", [8], T_F32, 16)], data=bytes(64)),
    "invalid_overlap.gguf": gguf([], [("a", [16], T_F32, 0), ("b", [8], T_F32, 32)], data=bytes(128)),
    "invalid_n_dims_5.gguf": gguf([], [("w", [1, 1, 1, 1, 1], T_F32, None)]),
    "invalid_ne_zero.gguf": gguf([], [("w", [8, 0], T_F32, 0)], data=bytes(32)),
    "invalid_ne_overflow.gguf": gguf([], [("w", [2**32, 2**32], T_F32, 0)], data=bytes(32)),
    "invalid_block_size.gguf": gguf([], [("w", [64], T_Q8_0, None)]).replace(struct.pack("<q", 64), struct.pack("<q", 48), 1),
    "invalid_ggml_type.gguf": gguf([], G_ONE).replace(struct.pack("<qIQ", 8, T_F32, 0), struct.pack("<qIQ", 8, 4, 0), 1),
    "invalid_duplicate_tensor.gguf": gguf([], [("w", [8], T_F32, None), ("w", [8], T_F32, None)]),
    "invalid_truncated_infos.gguf": gguf(G_LLAMA, [("blk.0.ffn_gate_exps.weight", [32, 2, 4], T_Q8_0, None)])[:300],
}

# ---- routing traces (runtime/route_trace.h) ----
T_HEAD = ('{"moesh_route_trace":1,"model":"m","n_layer":3,"n_expert":4,"n_expert_used":2,'
          '"moe_layers":[true,false,true]}\n')
T_TOK = '{"seq":0,"pos":%d,"token":%d,"experts":[[%d,%d],null,[0,3]],"weights":[[0.7,0.3],null,[0.5,0.5]]}\n'
T_PHEAD = T_HEAD.replace('"moe_layers"', '"n_predicted":3,"moe_layers"')
T_PTOK = T_TOK.replace('}\n', ',"predicted":[%s,null,[1,2,3]]}\n')
T_STOK = T_PTOK.replace('"token":%d,', '"token":%d,"step":%d,')
ROUTE_TRACE = {
    "valid_header_only.jsonl": T_HEAD.encode(),
    "valid_three_tokens.jsonl": (T_HEAD + T_TOK % (0, 5, 1, 2) + T_TOK % (1, 9, 2, 3) + T_TOK % (2, 1, 0, 1)).encode(),
    "valid_dense_model.jsonl": b'{"moesh_route_trace":1,"model":"d","n_layer":1,"n_expert":0,"n_expert_used":0,'
                               b'"moe_layers":[false]}\n{"seq":0,"pos":0,"token":1,"experts":[null],"weights":[null]}\n',
    "invalid_empty.jsonl": b"",
    "invalid_no_header.jsonl": (T_TOK % (0, 5, 1, 2)).encode(),
    "invalid_expert_range.jsonl": (T_HEAD + T_TOK % (0, 5, 1, 4)).encode(),
    "invalid_repeat.jsonl": (T_HEAD + T_TOK % (0, 5, 2, 2)).encode(),
    "invalid_truncated.jsonl": (T_HEAD + T_TOK % (0, 5, 1, 2))[:-20].encode(),
    "invalid_huge_layers.jsonl": b'{"moesh_route_trace":1,"model":"m","n_layer":999999999,"n_expert":4,"n_expert_used":2,'
                                 b'"moe_layers":[]}\n',
    # with the prefetch predictions (header "n_predicted", per token "predicted")
    "valid_predicted.jsonl": (T_PHEAD + T_PTOK % (0, 5, 1, 2, "[1,2,0]") + T_PTOK % (1, 9, 2, 3, "null")).encode(),
    "invalid_predicted_repeat.jsonl": (T_PHEAD + T_PTOK % (0, 5, 1, 2, "[1,1,0]")).encode(),
    "invalid_predicted_range.jsonl": (T_PHEAD + T_PTOK % (0, 5, 1, 2, "[1,2,4]")).encode(),
    "invalid_predicted_length.jsonl": (T_PHEAD + T_PTOK % (0, 5, 1, 2, "[1,2]")).encode(),
    "invalid_predicted_missing.jsonl": (T_PHEAD + T_TOK % (0, 5, 1, 2)).encode(),
    "invalid_predicted_without_header.jsonl": (T_HEAD + T_PTOK % (0, 5, 1, 2, "[1,2,0]")).encode(),
    "invalid_predicted_dense.jsonl": (T_PHEAD + T_PTOK.replace(',null,[1,2,3]]}', ',[0,1,2],[1,2,3]]}')
                                      % (0, 5, 1, 2, "[1,2,0]")).encode(),
    # with the forward pass of each token ("step")
    "valid_steps.jsonl": (T_PHEAD + T_STOK % (0, 5, 0, 1, 2, "[1,2,0]") + T_STOK % (1, 9, 0, 2, 3, "null")
                          + T_STOK % (2, 1, 1, 0, 1, "[3,2,1]")).encode(),
    "invalid_step_back.jsonl": (T_PHEAD + T_STOK % (0, 5, 1, 1, 2, "[1,2,0]") + T_STOK % (1, 9, 0, 2, 3, "null")).encode(),
    "invalid_step_missing.jsonl": (T_PHEAD + T_STOK % (0, 5, 0, 1, 2, "[1,2,0]") + T_PTOK % (1, 9, 2, 3, "null")).encode(),
}

# Client protocol requests (transport/protocol.h), read with the fuzz target's
# limits: 2048-byte messages, n_vocab 32000, 4 stop strings of 16 bytes, 16-byte
# ids, 8 messages. frame_* seeds are server frames for parse_response, which
# the target also runs; the replay test only checks they do not crash.
def req(**fields):
    return json.dumps(fields, separators=(",", ":")).encode()


def gen(**fields):
    return req(**{"id": "r1", "prompt": "Hello", **fields})


USER = {"role": "user", "content": "Hi"}
REQUEST = {
    "valid_minimal.json": req(id="r1", prompt="Hello"),
    "valid_grammar.json": req(id="r1", prompt="Is it?", grammar='root ::= "yes" | "no"'),
    "valid_json_schema.json": req(id="r1", prompt="x", json_schema={"type": "object", "properties": {"z": {}, "a": {"type": "integer"}}}),
    "invalid_grammar_and_schema.json": req(id="r1", prompt="x", grammar='root ::= "a"', json_schema={}),
    "invalid_empty_grammar.json": req(id="r1", prompt="x", grammar=""),
    "invalid_schema_not_object.json": req(id="r1", prompt="x", json_schema="{}"),
    "valid_tools.json": req(id="r1", messages=[USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
                            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                            tool_choice={"type": "function", "function": {"name": "f"}}, chat_template_kwargs={"x": 1}),
    "invalid_tools_without_messages.json": req(id="r1", prompt="x", tools=[{"type": "function", "function": {"name": "f"}}]),
    "invalid_tool_message_without_id.json": req(id="r1", messages=[{"role": "tool", "content": "x"}]),
    "invalid_tool_choice_unknown.json": req(id="r1", messages=[USER], tools=[{"type": "function", "function": {"name": "f"}}],
                                            tool_choice={"type": "function", "function": {"name": "g"}}),
    "valid_every_field.json": req(type="generate", id="abc-123", prompt="Once upon a time", max_tokens=64,
                                  temperature=0.7, top_p=0.9, top_k=40, seed=18446744073709551615,
                                  stop=["\n\n", "END"], stream=True),
    "valid_prompt_ids.json": req(id="r2", prompt_ids=[1, 2, 31999], max_tokens=4096),
    "valid_messages.json": req(id="r3", messages=[{"role": "system", "content": "Be brief."}, USER,
                                                   {"role": "assistant", "content": ""}], stream=True),
    "valid_cancel.json": req(type="cancel", id="r1"),
    "valid_ping.json": req(type="ping"),
    "valid_ping_with_id.json": req(type="ping", id="p1"),
    "valid_stop_string.json": gen(stop="</s>", temperature=0, top_k=0),
    "valid_unicode.json": rb'{"id":"u1","prompt":"caf\u00e9 \ud83d\ude00 \u0000 \"q\" \/ ' + "日本語".encode() + b'"}',
    "valid_whitespace.json": b'\n {\n\t"id" : "w1" ,\r\n "prompt" : "x",  "temperature": 1e-3, "top_p": 1.0 }\n',
    "valid_negative_zero_seed.json": b'{"id":"z","prompt":"x","seed":-0,"temperature":-0.0}',
    "valid_logprobs_penalties.json": gen(logprobs=20, repetition_penalty=1.3, frequency_penalty=-2, presence_penalty=0.5,
                                         logit_bias={"0": 100, "31999": -100}, echo=True, prompt_logprobs=2, max_tokens=0),
    "invalid_empty.json": b"",
    "invalid_not_json.json": b"generate please",
    "invalid_array.json": b'[{"id":"r1","prompt":"Hello"}]',
    "invalid_truncated.json": gen()[:-3],
    "invalid_trailing_data.json": gen() + b" {}",
    "invalid_utf8.json": b'{"id":"r1","prompt":"a\xff"}',
    "invalid_lone_surrogate.json": b'{"id":"r1","prompt":"\\ud800"}',
    "invalid_nan.json": b'{"id":"r1","prompt":"x","temperature":NaN}',
    "invalid_duplicate_field.json": b'{"id":"r1","prompt":"a","prompt":"b"}',
    "invalid_deep_nesting.json": b'{"id":"r1","prompt":"a","x":' + b"[" * 50 + b"]" * 50 + b"}",
    "invalid_too_large.json": gen(prompt="x" * 2100),
    "invalid_unknown_field.json": gen(temprature=0.5),
    "invalid_type.json": gen(type="complete"),
    "invalid_missing_id.json": req(prompt="Hello"),
    "invalid_id_too_long.json": gen(id="i" * 17),
    "invalid_id_control.json": gen(id="a\nb"),
    "invalid_missing_prompt.json": req(id="r1", max_tokens=3),
    "invalid_two_prompts.json": gen(prompt_ids=[1]),
    "invalid_empty_prompt.json": gen(prompt=""),
    "valid_priority.json": gen(prompt="x", priority=-2),
    "invalid_priority.json": gen(prompt="x", priority=5000),
    "invalid_prompt_ids_range.json": req(id="r1", prompt_ids=[1, 32000]),
    "invalid_prompt_ids_float.json": req(id="r1", prompt_ids=[1.0]),
    "invalid_messages_role.json": req(id="r1", messages=[{"role": "tool", "content": "x"}]),
    "invalid_message_extra_field.json": req(id="r1", messages=[{**USER, "name": "bob"}]),
    "invalid_too_many_messages.json": req(id="r1", messages=[USER] * 9),
    "invalid_max_tokens_negative.json": gen(max_tokens=-5),
    "invalid_max_tokens_float.json": gen(max_tokens=5.0),
    "invalid_max_tokens_huge.json": gen(max_tokens=4097),
    "invalid_temperature_overflow.json": b'{"id":"r1","prompt":"x","temperature":1e999}',
    "invalid_temperature_range.json": gen(temperature=100.5),
    "invalid_top_p_zero.json": gen(top_p=0),
    "invalid_top_p_underflow.json": gen(top_p=1e-300),
    "invalid_top_k_range.json": gen(top_k=32001),
    "invalid_seed_negative.json": gen(seed=-1),
    "invalid_logprobs_range.json": gen(logprobs=21),
    "invalid_repetition_penalty_zero.json": gen(repetition_penalty=0),
    "invalid_presence_penalty_range.json": gen(presence_penalty=2.5),
    "invalid_logit_bias_key.json": gen(logit_bias={"07": 1}),
    "invalid_logit_bias_value.json": gen(logit_bias={"7": 100.5}),
    "invalid_seed_overflow.json": b'{"id":"r1","prompt":"x","seed":18446744073709551616}',
    "invalid_stop_empty.json": gen(stop=[""]),
    "invalid_stop_too_many.json": gen(stop=["a", "b", "c", "d", "e"]),
    "invalid_stop_too_long.json": gen(stop="s" * 17),
    "invalid_stream_string.json": gen(stream="true"),
    "invalid_null_field.json": gen(max_tokens=None),
    "invalid_cancel_with_prompt.json": req(type="cancel", id="r1", prompt="x"),
    "frame_token.json": req(type="token", id="r1", index=0, token=15, text=" world"),
    "frame_token_logprobs.json": req(type="token", id="r1", index=0, token=15, text=" world",
                                     logprobs={"token": 15, "logprob": -0.5, "text": " world", "bytes": [32, 119],
                                               "top_logprobs": [{"token": 15, "logprob": -0.5}, {"token": 3, "logprob": None}]}),
    "frame_done.json": req(type="done", id="r1", tokens=[15, 16], text=" world!", finish_reason="eos",
                           usage={"prompt_tokens": 5, "completion_tokens": 2},
                           timings={"queue_ms": 0.1, "ttft_ms": 12.5, "total_ms": 30.0, "decode_tokens_per_second": None}),
    "frame_error.json": req(type="error", id=None, code="busy", message="queue full", retry_after_ms=100),
    "frame_pong.json": req(type="pong", id="p1", info={"model": "m", "queue": {"waiting": 0}}),
}


def write(folder, files, max_bytes=4096):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        assert len(data) < max_bytes, name
        (folder / name).write_bytes(data)


# OpenAI-compatible bodies (transport/openai.h), translated as /v1/completions and
# as /v1/chat/completions: valid_* is accepted by one of them (the protocol may
# still refuse a value later), invalid_* by neither. 2048-byte body limit.
def body(**fields):
    return json.dumps(fields, separators=(",", ":")).encode()


OPENAI = {
    "valid_completion.json": body(model="m", prompt="def add(a, b):", max_tokens=16, temperature=0),
    "valid_completion_stream.json": body(model="m", prompt="x", stream=True, stream_options={"include_usage": True}),
    "valid_completion_ids.json": body(prompt=[1, 2, 3], max_tokens=4),
    "valid_completion_nested.json": body(prompt=[[5, 6]], n=1, echo=False, logprobs=None, best_of=1, suffix=""),
    "valid_completion_one_string.json": body(prompt=["Hello"], stop=["\n", "END"], seed=7, top_p=0.9, top_k=40),
    "valid_completion_nulls.json": body(model=None, prompt="x", max_tokens=None, stop=None, user="u", presence_penalty=0,
                                        frequency_penalty=0.0, logit_bias={}),
    "valid_chat.json": body(model="m", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    "valid_chat_parts.json": body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}]),
    "valid_chat_developer.json": body(messages=[{"role": "developer", "content": "x", "name": "n"},
                                                {"role": "assistant", "content": None}, {"role": "user", "content": "y"}],
                                      max_completion_tokens=8, response_format={"type": "text"}, tools=[],
                                      tool_choice="none", logprobs=False, store=False),
    "valid_chat_stream.json": body(messages=[{"role": "user", "content": "Hi"}], stream=True, temperature=0.5),
    "valid_protocol_refuses.json": body(prompt="x", max_tokens=-5, temperature="hot"),
    "valid_completion_logprobs.json": body(prompt="x", logprobs=3, presence_penalty=0.5, frequency_penalty=-0.5,
                                           repetition_penalty=1.1, logit_bias={"5": -100, "17": 2.5}),
    "valid_completion_echo.json": body(prompt=[[1, 2, 3]], echo=True, max_tokens=1, logprobs=1, temperature=0),
    "valid_chat_logprobs.json": body(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=5),
    "invalid_not_json.json": b"{prompt: hello}",
    "invalid_array.json": b"[1,2,3]",
    "invalid_empty.json": b"",
    "invalid_deep.json": b'{"prompt":' + b"[" * 20 + b"]" * 20 + b"}",
    "invalid_duplicate.json": b'{"prompt":"a","prompt":"b"}',
    "invalid_unknown_field.json": body(prompt="x", temprature=0.5),
    "invalid_no_prompt.json": body(max_tokens=3),
    "valid_prompts.json": body(prompt=["a", [1, 2]], n=2, seed=3),
    "invalid_prompts_times_n.json": body(prompt=["a", "b", "c", "d", "e"], n=16),
    "invalid_prompt_item.json": body(prompt=["a", 3]),
    "invalid_prompt_type.json": body(prompt={"text": "a"}),
    "valid_completion_n.json": body(prompt="x", n=3),
    "invalid_n_too_many.json": body(prompt="x", n=17),
    "invalid_suffix.json": body(prompt="x", suffix="y"),
    "invalid_logprobs.json": body(messages=[{"role": "user", "content": "x"}], logprobs=3),
    "invalid_top_logprobs_alone.json": body(messages=[{"role": "user", "content": "x"}], top_logprobs=2),
    "invalid_stream_options_alone.json": body(prompt="x", stream_options={"include_usage": True}),
    "invalid_stream_type.json": body(prompt="x", stream="yes"),
    "invalid_role.json": body(messages=[{"role": "function", "content": "x"}]),
    "invalid_image_part.json": body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    "invalid_tools.json": body(prompt="x", tools=[{"type": "function"}]),   # chat only
    "valid_tools.json": body(messages=[{"role": "user", "content": "Weather?"},
                                       {"role": "assistant", "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function",
                                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                                       {"role": "tool", "tool_call_id": "abcDEF123", "content": "21 C"}],
                             tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                                 "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
                             tool_choice="auto", parallel_tool_calls=True, chat_template_kwargs={"enable_thinking": False}),
    "valid_json_mode.json": body(messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}),
    "valid_json_schema.json": body(messages=[{"role": "user", "content": "x"}], response_format={
        "type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
            "type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", 1]}}, "required": ["b"]}}}),
    "valid_grammar.json": body(prompt="x", grammar='root ::= "yes" | "no"'),
    "invalid_response_format.json": body(prompt="x", response_format={"type": "regex"}),
    "invalid_two_constraints.json": body(prompt="x", grammar='root ::= "a"', json_schema={}),
    "invalid_max_disagree.json": body(messages=[{"role": "user", "content": "x"}], max_tokens=3, max_completion_tokens=4),
    "invalid_too_large.json": body(prompt="x" * 3000),
    "invalid_bad_utf8.json": b'{"prompt":"\xff\xfe"}',
}


# GBNF grammars (runtime/grammar.h): the grammars of the llama.cpp reference fixture are valid;
# one invalid seed per way the parser refuses. JSON Schemas (runtime/json_schema.h): valid_*
# convert, invalid_* are refused.
def grammars():
    masks = json.loads((HERE.parent / "fixtures" / "grammar" / "masks.json").read_text())
    out = {f"valid_{g['name']}.gbnf": g["text"].encode() for g in masks["grammars"]}
    for name, text in {
        "undefined": 'root ::= a\n', "left_recursion": 'root ::= root "a" | "b"\n',
        "hidden_left_recursion": 'root ::= e? x\ne ::= ""\nx ::= root "a" | "b"\n', "bad_escape": 'root ::= "\\q"\n',
        "unclosed_group": 'root ::= ("a" | "b"\n', "empty_class": "root ::= []\n", "reversed_range": "root ::= [z-a]\n",
        "repeat_nothing": "root ::= *\n", "twice": 'root ::= "a"\nroot ::= "b"\n', "no_root": 'x ::= "a"\n',
        "max_below_min": 'root ::= "a"{3,1}\n', "negated_token": "root ::= !<[12]>\n", "double_repeat": 'root ::= "a"**\n',
        "unclosed_token": "root ::= <think\n", "token_id_word": "root ::= <[twelve]>\n",
    }.items():
        out[f"invalid_{name}.gbnf"] = text.encode()
    # token references: \x01 in the walked text stands for a special token (grammar_check.h)
    out["valid_token_refs.gbnf"] = b'root ::= <[257]> "a"* (<[258]> | "b") <think> <[259]>{0,2}\n'
    out["valid_token_refs_mixed.gbnf"] = b'root ::= (<[97]> | "a" "b") <[260]>? [a-z]+\n'
    out["invalid_bad_utf8.gbnf"] = b'root ::= "\xff"\n'
    return out


JSON_SCHEMA = {f"valid_{k}.json": json.dumps(v).encode() for k, v in {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
               "tags": {"type": "array", "items": {"enum": ["a", "b", 1, None]}, "maxItems": 3}}, "required": ["name", "age"]},
    "any_object": {"type": "object"}, "any": {}, "true": True,
    "type_list": {"type": ["string", "null"], "maxLength": 3},
    "tree": {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array",
             "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "date-time"},
                "u": {"type": "string", "format": "uuid"}}},
    "tuple": {"type": "array", "prefixItems": [{"type": "number"}, {"const": {"a": [1, 2]}}], "items": False},
    "any_of": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 1, "maximum": 12}]},
    "map": {"type": "object", "additionalProperties": {"type": "number"}},
    "bounded_array": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "definitions_allof": {"definitions": {"p": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                          "additionalProperties": False}}, "allOf": [{"$ref": "#/definitions/p"}]},
}.items()}
JSON_SCHEMA.update({f"invalid_{k}.json": json.dumps(v).encode() for k, v in {
    "pattern": {"type": "string", "pattern": "a+"}, "not": {"not": {"type": "string"}},
    "number_min": {"type": "number", "minimum": 0}, "false": False, "bad_ref": {"$ref": "#/$defs/nope"},
    "foreign_ref": {"$ref": "http://example.com/s.json"}, "items_bounds": {"type": "array", "minItems": 3, "maxItems": 1},
    "unknown_type": {"type": "decimal"}, "big_range": {"type": "integer", "minimum": 0, "maximum": 100000},
    "required_unknown": {"type": "object", "properties": {"a": {}}, "required": ["b"]},
    "multiple_of": {"type": "integer", "multipleOf": 3},
}.items()})
JSON_SCHEMA["invalid_not_json.json"] = b'{"type": '


# Jinja chat templates (runtime/jinja.h): valid_* parse (the real templates of the reference
# fixture, and templates whose rendering fails), invalid_* are refused by the parser.
def jinja_templates():
    doc = json.loads((HERE.parent / "fixtures" / "chat_templates" / "jinja.json").read_text())
    out = {f"valid_{t['name']}.jinja": t["template"].encode() for t in doc["templates"]}
    for name, text in {
        "unclosed_if": "{% if x %}a", "unknown_filter": "{{ x | nosuch }}", "unclosed_string": "{{ 'a }}",
        "stray_end": "{% endfor %}", "include": "{% include 'x' %}", "deep": "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
        "bad_escape": "{{ '\\x4' }}", "break_outside": "{% break %}", "unclosed_comment": "{# never",
    }.items():
        out[f"invalid_{name}.jinja"] = text.encode()
    # parse, then fail while rendering (the target checks the error names the line)
    for name, text in {
        "raise": "{{ raise_exception('no') }}", "undefined_attr": "{{ nothing.here }}", "type_error": "{{ 'a' + 1 }}",
        "range_limit": "{% for i in range(100000) %}{% endfor %}", "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    }.items():
        out[f"valid_render_fails_{name}.jinja"] = text.encode()
    out["valid_snippets.jinja"] = ("{% set ns = namespace(n=0) %}{% for m in messages if m.role != 'tool' %}{% set ns.n = ns.n + 1 %}"
                                   "{{ loop.index }}{{ m.role|upper }}{{ m.content|string|trim|tojson }}{% endfor %}{{ ns.n }}"
                                   "{{ tools|map(attribute='function')|list|tojson(indent=2) }}{{ '%s'|length }}{{ 'a,b'.split(',') }}").encode()
    return out


# Model output with tool calls (runtime/tool_calls.h): valid_* hold a call some format reads (what
# the real templates write, tests/fixtures/chat_templates/tool_calls.json), invalid_* none.
def tool_call_outputs():
    doc = json.loads((HERE.parent / "fixtures" / "chat_templates" / "tool_calls.json").read_text())
    out = {}
    for t in doc["templates"]:
        for i, c in enumerate(t["cases"]):
            out[f"valid_{t['name']}_{i}.txt"] = c["text"].encode()
    for name, text in {
        "plain": "The weather in Paris is mild.",
        "hermes_not_json": '<tool_call>{"name": "f", "arguments": {"x": </tool_call>',
        "llama3_no_parameters": '{"name": "f"}',
        "mistral_cut": '[TOOL_CALLS][{"name": "f", "arguments": {}',
        "mistral_args_no_args": "[TOOL_CALLS]f{}",
        "deepseek_no_sep": "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>f{}",
        "kimi_deep": "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>" + "[" * 600,
        "qwen_xml_unclosed": "<tool_call>\n<function=f>\n<parameter=i>\n1\n</tool_call>",
        "glm_no_value": "<tool_call>f\n<arg_key>i</arg_key>\n</tool_call>",
        "harmony_not_json": "<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json<|call|>",
    }.items():
        out[f"invalid_{name}.txt"] = text.encode()
    return out


# Who may connect (transport/security.h): CURVE certificates (valid_* read as a public
# certificate), key lists, API key files and Authorization headers. Keys: the zmq_curve(7)
# example pairs.
def security_inputs():
    spub, ssec = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
    cpub, csec = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID", "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs"
    pyzmq = ("#   ****  Generated on 2026-11-30 by pyzmq  ****\n#   ZeroMQ CURVE **Secret** Certificate\n\n"
             "metadata\n    name = \"server\"\ncurve\n    public-key = \"{pub}\"\n{sec}")
    files = {
        "valid_pyzmq_public.key": pyzmq.format(pub=spub, sec=""),
        "valid_pyzmq_secret.key_secret": pyzmq.format(pub=spub, sec=f'    secret-key = "{ssec}"\n'),
        "valid_secret_only.key_secret": f'curve\n    secret-key = "{csec}"\n',
        "valid_bare_public.txt": f"{cpub}\n",
        "valid_single_quotes.key": f"public-key = '{cpub}'\n",
        "invalid_mismatched_pair.key_secret": pyzmq.format(pub=spub, sec=f'    secret-key = "{csec}"\n'),
        "invalid_short_key.key": 'curve\n    public-key = "rq:rM>}U?@Lns47E1%kR"\n',
        "invalid_quote_in_key.key": 'public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf"7"\n',
        "invalid_two_bare_keys.txt": f"{spub}\n{cpub}\n",
        "invalid_twice.key": f'public-key = "{spub}"\npublic-key = "{spub}"\n',
        "invalid_empty.key": "",
        "invalid_text.key": "hello world\n",
        "key_list.txt": f"# clients\n{spub}\n\n  {cpub}\n",
        "api_keys.txt": "# team\nsk-moesh-0123456789abcdef\nsk-other-0123456789abcdef\n",
        "authorization_bearer.txt": "Bearer sk-fuzz-0123456789abcdef",
        "authorization_basic.txt": "Basic dXNlcjpwYXNz",
    }
    out = {k: v.encode() for k, v in files.items()}
    out["invalid_binary.key"] = b"public-key = \"\x00\xff" + b"a" * 38 + b"\"\n"
    return out


if __name__ == "__main__":
    write(HERE / "corpus" / "safetensors", SAFETENSORS)
    write(HERE / "corpus" / "model_config", MODEL_CONFIG)
    write(HERE / "corpus" / "npy", NPY)
    write(HERE / "corpus" / "gguf", GGUF)
    write(HERE / "corpus" / "route_trace", ROUTE_TRACE)
    write(HERE / "corpus" / "request", REQUEST)
    write(HERE / "corpus" / "openai", OPENAI)
    write(HERE / "corpus" / "grammar", grammars())
    write(HERE / "corpus" / "json_schema", JSON_SCHEMA)
    write(HERE / "corpus" / "jinja", jinja_templates(), max_bytes=32768)   # real chat templates run to 15 kB
    write(HERE / "corpus" / "tool_calls", tool_call_outputs())
    write(HERE / "corpus" / "security", security_inputs())
    print(f"wrote {len(SAFETENSORS)} safetensors, {len(MODEL_CONFIG)} config.json, {len(NPY)} .npy and {len(GGUF)} GGUF seeds "
          f"and {len(REQUEST)} request seeds under {HERE / 'corpus'}")
