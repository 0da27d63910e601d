#!/usr/bin/env python3
"""Copy a GGUF, adding GPT-2-style tokenizer metadata taken from a Hugging Face tokenizer.json.

    python3 scripts/bench/gguf_add_tokenizer.py models/moesh-tiny-py/model.q8_0.gguf \\
        models/moesh-tiny-py/tokenizer.json /tmp/moesh-tiny-tok-q8_0.gguf

moesh reads the shipped model's tokenizer from its folder; llama.cpp (llama-server, llama-bench)
insists on tokenizer keys inside the GGUF. The serving benchmark (serve_load.py) sends token ids,
so only the vocabulary's size and ids have to be right: tensors and every other key are copied
unchanged. Ids the tokenizer.json leaves unassigned become unused "[PADn]" tokens. BOS/EOS ids come from the config.json next to the tokenizer.json.
Needs the `gguf` package (pip install gguf).
"""
import json
import os
import sys

import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def copy_fields(reader, writer):
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            if field.types[1] == GGUFValueType.STRING:
                writer.add_array(name, [bytes(field.parts[i]).decode() for i in field.data])
            else:
                writer.add_array(name, [field.parts[i].tolist()[0] for i in field.data])
        elif kind == GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[-1]).decode())
        else:
            writer.add_key_value(name, field.parts[-1].tolist()[0], kind)


def add_tokenizer(writer, tokenizer_json):
    tj = json.load(open(tokenizer_json, encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    n = max(list(vocab.values()) + list(added.values())) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for text, i in added.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return n, len(merges)


def write_with_tokenizer(src, tokenizer_json, dst):
    """dst: src with the tokenizer's keys, and BOS/EOS ids from the config.json beside the
    tokenizer.json when there is one (without them llama.cpp takes GPT-2's defaults, which
    are another token of this vocabulary). Returns (tokens, merges)."""
    reader = GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = GGUFWriter(dst, arch)
    copy_fields(reader, writer)
    n_tokens, n_merges = add_tokenizer(writer, tokenizer_json)
    config = os.path.join(os.path.dirname(os.path.abspath(tokenizer_json)), "config.json")
    if os.path.exists(config):
        cfg = json.load(open(config, encoding="utf-8"))
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
            if isinstance(cfg.get(key), int):
                add(cfg[key])
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n_tokens, n_merges


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, tokenizer_json, dst = sys.argv[1:4]
    n_tokens, n_merges = write_with_tokenizer(src, tokenizer_json, dst)
    print(f"wrote {dst}: {n_tokens} tokens, {n_merges} merges")


if __name__ == "__main__":
    main()
