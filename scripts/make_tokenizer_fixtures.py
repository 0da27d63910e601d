#!/usr/bin/env python3
"""Trains small byte-level BPE tokenizers with Hugging Face `tokenizers` and
records the ids it produces, as references for tests/runtime/tokenizer_test.cpp.

    python3 scripts/make_tokenizer_fixtures.py [out_dir]
    python3 scripts/make_tokenizer_fixtures.py --fuzz-corpus   # rewrites tests/fuzz/corpus/tokenizer_json/

Writes <out_dir>/<flavour>/tokenizer.json and cases.json for five flavours:
  gpt2         ByteLevel pre-tokenizer (GPT-2 regex), non-special added tokens
               with lstrip/rstrip/single_word/normalized flags
  gpt2_prefix  the same model with ByteLevel(add_prefix_space=True)
  llama3       Split(Llama-3 regex, Isolated) + ByteLevel(use_regex=False),
               ignore_merges, BOS via TemplateProcessing, <|begin_of_text|> ...
  splits       llama3's model behind Split with every behaviour, invert, a
               literal pattern, NFKC and ByteLevel(add_prefix_space, use_regex)
  qwen2        NFC normalizer, Split(Qwen2 regex) + ByteLevel(use_regex=False),
               <|endoftext|>, <|im_start|>, <|im_end|>
cases.json: {"versions": {...}, "cases": [{"text", "ids", "ids_special",
"decoded", "decoded_skip"}]} where ids_special is encode(add_special_tokens=True)
and decoded/decoded_skip are decode(ids_special, skip_special_tokens=False/True).
"""
import json
import os
import platform
import sys

import tokenizers
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PROSE = [
    "The quick brown fox jumps over the lazy dog. It's a sentence we've all seen, isn't it?",
    "In the beginning, the model was small; then it grew, and experts were added to every layer.",
    "Mixture-of-Experts layers route each token to a few experts, chosen by a learned router.",
    "She said: \"I'll be there at 10:30 AM,\" but she didn't arrive until noon.",
    "WE'RE SHOUTING NOW. They'D better listen! You'Ll see, I'M sure.",
    "Numbers: 0, 7, 42, 1234, 98765, 3.14159, 2.71828, 1e-9, 1,000,000 and 123456789012345.",
    "Prices rose 12.5% in 2023; the index closed at 4,783.45 on Dec. 29.",
    "E-mail me at someone@example.com or visit https://example.org/path?q=1&r=two#frag.",
]
CODE = [
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.attn(h)\n",
    "for (int i = 0; i < n_tokens; ++i) {\n\tsum += logits[i * n_vocab + j];\n}\n",
    "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v.size() == 3 ? 0 : 1; }\n",
    "if x == None:\n        raise ValueError('x must be set')  # comment\n\n\n",
    "const y = async (a, b) => { await fetch(`/api/${a}`); return a ?? b; };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "    \t  mixed\t\tindentation   \n\t\n",
]
UNICODE = [
    "Café, naïve, résumé, façade, Ångström, Straße, Øresund.",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир! Українська: ї є ґ.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "我们的模型使用专家混合架构，每个词元只激活少数专家。",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️ ✨🚀",
    "Math: ∑ᵢ xᵢ² ≤ ∞, α + β = γ, √2 ≈ 1.414, ∀x ∃y.",
    "Arabic: مرحبا بالعالم. Hebrew: שלום עולם. Hindi: नमस्ते दुनिया।",
    "Combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ (composed); Hangul jamo \u1100\u1161.",
]


def corpus():
    lines = []
    for rep in range(30):
        for s in PROSE + CODE + UNICODE:
            lines.append(s)
        lines.append(" " * (rep % 9 + 1) + "indented" + "\t" * (rep % 3) + "\n" * (rep % 4))
        lines.append(str(7 ** (rep + 5)) + " " + str(rep * 1234567))
    return lines


CASES = [
    "", " ", "  ", "\t", "\n", "\r\n", "a", "A", "hello", " hello", "hello ", "hello  ", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "it's we've they're I'm you'll he'd IT'S WE'VE They'Re",
    "don't 's 't 're 've 'm 'll 'd ''",
    "multiple   spaces   between   words", "trailing spaces   ", "   leading spaces",
    "tabs\tand\t\ttabs\t", "new\nlines\n\nand\n\n\nmore\n", "mixed \t\n \t\n whitespace \n\t ",
    " \n \n ", "\n\n\n\n", "          ", "\t\t\t\t\t\t\t\t",
    "0", "12", "123", "1234", "12345", "1234567890", "3.14159265358979323846", "1,000,000.00",
    "99999999999999999999999999999999", "-42 +17 0x1F 0b1010 1e10 1E-5", "v1.2.3-rc4",
    "def f(x):\n    return x * 2\n", "int main(void) { return 0; }\n", "x=1;y=2;z=x+y",
    "if (a && b || !c) { d[i] = e->f; }", "    indented code\n        more indented\n",
    "<html><body class=\"x\">Hi</body></html>", "https://example.com/a/b?c=d&e=f#g",
    "a@b.c", "#!/usr/bin/env python3", "// comment /* block */", "$HOME ~/.bashrc && echo $?",
    "Café", "naïve résumé", "Straße", "Ångström", "e\u0301", "cafe\u0301 cafe\u0301s", "\u212b", "\u1100\u1161\u11a8",
    "Ελληνικά", "привет мир", "مرحبا", "שלום", "नमस्ते",
    "日本語", "中文文本", "한국어", "我们的模型使用专家混合架构", "混合 English 和中文",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪🇫🇷", "❤️", "emoji 🚀 in 🎉 text ✨",
    "∑ᵢ xᵢ² ≤ ∞", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "\u3000ideographic space",
    "\u2028line sep\u2029para sep", "soft\u00adhyphen", "\x00nul\x01ctrl\x7f", "\ufeffBOM", "\U0010FFFF max",
    "ſ long s 's", "ǅ titlecase", "ﬁ ligature",
    "<|endoftext|>", "a<|endoftext|>b", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|>Hello<|eot_id|>", "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.",
    "<|im_start|><|im_start|>", "<|im_start", "im_end|>", "text <mask> text", "text<mask>", "  <mask>  x",
    "[NEW] [NEW][NEW] x[NEW]y", "hello_world hello_worlds ahello_world hello_world.",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS !@#$%^&*()",
    "punctuation!!! ??? ... --- ___ ***", "quotes \"double\" 'single' `back`",
    "a" * 200, "ab" * 100, " " * 100 + "x", "1" * 50, "\n" * 30 + "end",
    "The end.\n",
]


def gpt2_style(lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.add_tokens([AddedToken("[NEW]", rstrip=True, normalized=True),
                    AddedToken("hello_world", single_word=True, normalized=False)])
    return tok


def gpt2_prefix_style(gpt2):
    doc = json.loads(gpt2.to_str())
    doc["pre_tokenizer"]["add_prefix_space"] = True
    return Tokenizer.from_str(json.dumps(doc))


def llama3_style(lines):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    doc = json.loads(tok.to_str())
    doc["model"]["ignore_merges"] = True
    return Tokenizer.from_str(json.dumps(doc))


def model_sized_style(lines, n_vocab):
    """Llama-3 style with exactly n_vocab ids, shipped beside a golden model of that vocabulary so that
    `moesh run --prompt` has a real tokenizer.json to read (the model is random: text is gibberish)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab - len(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    assert tok.get_vocab_size() == n_vocab, tok.get_vocab_size()
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def splits_style(llama3):
    """Llama-3's model behind every Split behaviour, invert, a literal pattern and NFKC."""
    doc = json.loads(llama3.to_str())
    split = lambda pattern, behavior, invert=False: {"type": "Split", "pattern": pattern, "behavior": behavior,
                                                     "invert": invert}
    doc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}]}
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        split({"Regex": r"\s+"}, "MergedWithPrevious"),
        split({"Regex": r"\p{N}"}, "Contiguous", invert=True),
        split({"Regex": "o"}, "MergedWithNext"),
        split({"String": ","}, "Removed"),
        split({"Regex": r"[.!?]"}, "Isolated", invert=True),
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    ]}
    return Tokenizer.from_str(json.dumps(doc))


def qwen2_style(lines):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    return tok


def write(out_dir, name, tok):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    # The file is what a model folder would ship; the references come from reloading it.
    text = tok.to_str()
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    tok = Tokenizer.from_str(text)
    cases = []
    for s in CASES:
        ids = tok.encode(s, add_special_tokens=False).ids
        ids_special = tok.encode(s, add_special_tokens=True).ids
        cases.append({
            "text": s,
            "ids": ids,
            "ids_special": ids_special,
            "decoded": tok.decode(ids_special, skip_special_tokens=False),
            "decoded_skip": tok.decode(ids_special, skip_special_tokens=True),
            "roundtrip": tok.decode(ids, skip_special_tokens=False),
        })
    meta = {"versions": {"tokenizers": tokenizers.__version__, "python": platform.python_version()},
            "flavour": name, "cases": cases}
    with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=0)
        f.write("\n")


def tiny(**edits):
    """A hand-written byte-level BPE tokenizer.json of a few hundred bytes; edits replace top-level keys."""
    g = lambda s: "".join(chr(0x120) if c == " " else c for c in s)
    tokens = ["a", "b", "c", "h", "e", "l", "o", g(" "), "1", "2", "\u00c3", "\u00a9", "\u0120h", "he", "ll",
              "hell", "hello", "ab", "\u00c3\u00a9"]
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": ["\u0120 h", "h e", "l l", "he ll", "hell o", "a b", "\u00c3 \u00a9"]},
    }
    for k, v in edits.items():
        if k.startswith("model_"):
            doc["model"][k[len("model_"):]] = v
        else:
            doc[k] = v
    return doc


def fuzz_corpus(out_dir):
    split = lambda regex, behavior="Isolated", invert=False: {
        "type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": invert}
    bl_last = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    seq = lambda *steps: {"type": "Sequence", "pretokenizers": list(steps)}
    added = lambda i, c, **kw: dict({"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                                     "normalized": False, "special": True}, **kw)
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [19], "tokens": ["<s>"]}}}
    seeds = {
        "valid_gpt2.json": tiny(),
        "valid_llama3.json": tiny(pre_tokenizer=seq(split(LLAMA3_REGEX), bl_last), model_ignore_merges=True,
                                  added_tokens=[added(19, "<s>")],
                                  post_processor={"type": "Sequence", "processors": [
                                      {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                       "use_regex": True}, template]}),
        "valid_qwen2.json": tiny(normalizer={"type": "NFC"}, pre_tokenizer=seq(split(QWEN2_REGEX), bl_last),
                                 added_tokens=[added(19, "<|im_start|>"), added(20, "<|im_end|>")]),
        "valid_added_flags.json": tiny(added_tokens=[added(19, "<m>", lstrip=True), added(20, "[N]", rstrip=True,
                                       normalized=True, special=False), added(21, "ab", single_word=True,
                                       special=False)], normalizer={"type": "Sequence", "normalizers": [
                                           {"type": "NFKC"}, {"type": "NFD"}]}),
        "valid_split_behaviours.json": tiny(pre_tokenizer=seq(split(r"\s+", "MergedWithPrevious"),
                                            split(r"\d", "Contiguous", True), split(r"o", "MergedWithNext"),
                                            {"type": "Split", "pattern": {"String": "l"}, "behavior": "Removed",
                                             "invert": False},
                                            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                             "use_regex": True})),
        "valid_unk_fused.json": tiny(model_unk_token="a", model_fuse_unk=True, model_merges=[["h", "e"]]),
        "valid_no_merges.json": tiny(model_merges=[]),
        "invalid_not_json.json": "{\"model\": ",
        "invalid_top_array.json": [],
        "invalid_model_wordpiece.json": tiny(model_type="WordPiece"),
        "invalid_vocab_id_string.json": tiny(model_vocab={"a": "0"}),
        "invalid_vocab_duplicate_id.json": tiny(model_vocab={"a": 0, "b": 0}),
        "invalid_vocab_negative_id.json": tiny(model_vocab={"a": -1}),
        "invalid_merge_unknown.json": tiny(model_merges=["x y"]),
        "invalid_merge_result_unknown.json": tiny(model_merges=["a c"]),
        "invalid_byte_fallback.json": tiny(model_byte_fallback=True),
        "invalid_normalizer.json": tiny(normalizer={"type": "Lowercase"}),
        "invalid_pre_tokenizer.json": tiny(pre_tokenizer={"type": "Whitespace"}),
        "invalid_regex.json": tiny(pre_tokenizer=seq(split("(unclosed"), bl_last)),
        "invalid_byte_level_not_last.json": tiny(pre_tokenizer=seq(bl_last, split("a"))),
        "invalid_decoder.json": tiny(decoder={"type": "BPEDecoder"}),
        "invalid_added_id_twice.json": tiny(added_tokens=[added(19, "<a>"), added(19, "<b>")]),
        "invalid_template_unknown.json": tiny(post_processor=dict(template, special_tokens={})),
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, doc in seeds.items():
        text = doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        assert len(text.encode()) < 4096, name
        if name.startswith("valid_"):
            Tokenizer.from_str(text).encode("hello ab 12")   # the reference accepts it too
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1:] == ["--fuzz-corpus"]:
        fuzz_corpus(os.path.join(root, "tests", "fuzz", "corpus", "tokenizer_json"))
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "tokenizers")
    lines = corpus()
    gpt2 = gpt2_style(lines)
    write(out_dir, "gpt2", gpt2)
    write(out_dir, "gpt2_prefix", gpt2_prefix_style(gpt2))
    llama3 = llama3_style(lines)
    write(out_dir, "llama3", llama3)
    write(out_dir, "splits", splits_style(llama3))
    write(out_dir, "qwen2", qwen2_style(lines))
    # beside the llama_gqa_tied golden model (vocab 320): tokenizer.json only, no cases
    model_dir = os.path.join(root, "tests", "fixtures", "llama_gqa_tied")
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(model_sized_style(lines, 320).to_str())


if __name__ == "__main__":
    main()
