#!/usr/bin/env python3
"""Trains small tokenizers and records the ids their reference libraries
produce, as references for tests/runtime/tokenizer_test.cpp and
tests/runtime/tokenizer_gguf_test.cpp.

    pip install tokenizers==0.23.3 transformers==5.24.0 gguf==0.19.0 sentencepiece==0.2.3
    python3 scripts/make_tokenizer_fixtures.py [out_dir]
    python3 scripts/make_tokenizer_fixtures.py --fuzz-corpus   # rewrites tests/fuzz/corpus/tokenizer_json/ and tokenizer_gguf/

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
  smollm       SmolLM2's layout: Digits(individual_digits) + ByteLevel, ids 0-2
               <|endoftext|>, <|im_start|>, <|im_end|>
  spm          SentencePiece-style BPE, the Llama-2 way: a SentencePiece BPE model
               (`sentencepiece` trainer, byte_fallback) converted to tokenizer.json
               as transformers' LlamaConverter does (legacy: normalizer
               Prepend("▁") + Replace(" ", "▁"), decoder Replace/ByteFallback/Fuse/Strip)
  spm_metaspace the same model as transformers writes it with legacy=False:
               no normalizer, pre-tokenizer Metaspace(prepend_scheme="first")
gpt2, llama3, qwen2, smollm and spm also get tokenizer.gguf: tokenizer metadata
only, written as llama.cpp's convert_hf_to_gguf.py writes it (see gguf_bpe and
gguf_spm below).
cases.json: {"versions": {...}, "cases": [{"text", "ids", "ids_special",
"decoded", "decoded_skip"}]} where ids_special is encode(add_special_tokens=True)
and decoded/decoded_skip are decode(ids_special, skip_special_tokens=False/True).
For spm each case also has "sp_ids": what SentencePiece itself encodes the text
to (the reference of llama.cpp's SPM tokenizer, which the GGUF path follows).
Deterministic: the same package versions write the same files.
"""
import io
import json
import os
import platform
import struct
import sys
import tempfile

import gguf
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)
from transformers.tokenization_utils_base import generate_merges

VERSIONS = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
            "gguf": "0.19.0", "sentencepiece": spm.__version__, "python": platform.python_version()}

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
    "<s>Hello</s> <unk> world", " <s> spaced </s> ", "▁already▁escaped ▁ x",
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


def smollm_style(lines):
    """SmolLM2's tokenizer.json layout: Digits(individual_digits) + ByteLevel(use_regex), specials at ids 0-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=1300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


def train_sentencepiece(lines):
    """A SentencePiece BPE model trained as Llama-2's was (byte_fallback, split_digits, identity
    normalization, dummy prefix, whitespace kept); characters below the coverage become byte tokens."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=900,
        character_coverage=0.99, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def llama_converter(sp, legacy):
    """tokenizer.json from a SentencePiece BPE model as transformers' LlamaConverter builds it:
    vocab in piece order, merges from transformers' generate_merges (as SentencePieceExtractor.extract
    calls it), BPE(byte_fallback, fuse_unk, unk <unk>), LlamaConverter's normalizer/pre_tokenizer/decoder,
    and LlamaTokenizerFast's post-processor "<s> $A"."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ["<unk>", "<s>", "</s>"]])
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def gguf_write(path, arch_kvs):
    """A GGUF file with metadata only (no tensors), written by gguf-py's GGUFWriter."""
    w = gguf.GGUFWriter(path, "llama")
    for fn, value in arch_kvs:
        fn(w, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def special_vocab(tokenizer_json, config, n_vocab, load_merges):
    """gguf-py's SpecialVocab, read from a folder holding this tokenizer.json and tokenizer_config.json,
    as convert_hf_to_gguf.py reads the model folder."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        return gguf.SpecialVocab(d, load_merges=load_merges, n_vocab=n_vocab)


def does_token_look_special(token):
    """convert_hf_to_gguf.py TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def gguf_bpe(path, tok, pre, config):
    """Byte-level BPE metadata as convert_hf_to_gguf.py's TextModel._set_vocab_gpt2 writes it: tokens and
    types from get_vocab_base (added special or special-looking -> CONTROL, other added -> USER_DEFINED
    after decode(encode()) when not normalized, the rest NORMAL), merges and special ids from SpecialVocab
    (load_merges=True); the pre name is the one get_vocab_base_pre gives that family."""
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(len(vocab)):
        text = {v: k for k, v in vocab.items()}[i]
        if i in added:
            if added[i].special or does_token_look_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                if not added[i].normalized:
                    text = tok.decode(tok.encode(text, add_special_tokens=False).ids)
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    sv = special_vocab(tok.to_str(), config, len(tokens), True)
    kvs = [(gguf.GGUFWriter.add_tokenizer_model, "gpt2"), (gguf.GGUFWriter.add_tokenizer_pre, pre),
           (gguf.GGUFWriter.add_token_list, tokens), (gguf.GGUFWriter.add_token_types, types)]
    gguf_write(path, kvs + [(lambda w, v: v.add_to_gguf(w, quiet=True), sv)])


def gguf_spm(path, sp, tok, config):
    """SentencePiece metadata as convert_hf_to_gguf.py's TextModel._set_vocab_sentencepiece writes it
    (_create_vocab_sentencepiece: piece, GetScore and IsUnknown/IsControl/IsUnused/IsByte per id;
    model "llama", pre "default"), special ids and add_bos/add_eos from SpecialVocab. Not LlamaHfVocab
    (_set_vocab_llama_hf): that one writes -1000 for every score, which llama.cpp's SPM tokenizer would
    merge left to right; real Llama-2/Mistral/Mixtral GGUFs come from tokenizer.model this way."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(t)
    sv = special_vocab(tok.to_str(), config, len(tokens), False)
    kvs = [(gguf.GGUFWriter.add_tokenizer_model, "llama"), (gguf.GGUFWriter.add_tokenizer_pre, "default"),
           (gguf.GGUFWriter.add_token_list, tokens), (gguf.GGUFWriter.add_token_scores, scores),
           (gguf.GGUFWriter.add_token_types, types)]
    gguf_write(path, kvs + [(lambda w, v: v.add_to_gguf(w, quiet=True), sv)])


def write(out_dir, name, tok, sp=None):
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
        if sp is not None:
            cases[-1]["sp_ids"] = sp.encode(s)
    meta = {"versions": VERSIONS, "flavour": name, "cases": cases}
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


def spm_tiny(**edits):
    """A hand-written SentencePiece-style tokenizer.json (Llama-2 layout); edits replace top-level keys."""
    tokens = ["<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "<0xA9>", "\u2581", "a", "b", "h", "e", "\u2581a", "ab",
              "\u2581h", "he", "\u2581he"]
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(tokens[:3])],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": ["\u2581 a", "a b", "\u2581 h", "h e", "\u2581h e"]},
    }
    doc.update(edits)
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
        "valid_byte_fallback_byte_level.json": tiny(model_byte_fallback=True),
        "valid_spm_legacy.json": spm_tiny(),
        "valid_spm_metaspace.json": spm_tiny(normalizer=None, pre_tokenizer={
            "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}),
        "invalid_strip_before_fuse.json": spm_tiny(decoder={"type": "Sequence", "decoders": [
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}, {"type": "Fuse"}]}),
        "invalid_byte_level_with_spm_decoder.json": spm_tiny(pre_tokenizer={"type": "ByteLevel"}),
        "invalid_replace_regex.json": spm_tiny(normalizer={"type": "Replace", "pattern": {"Regex": " "},
                                                           "content": "\u2581"}),
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


def fuzz_corpus_gguf(out_dir):
    """Seeds for tokenizer_gguf_fuzz: small tokenizer-only GGUF images; valid_* must load, invalid_* be refused."""
    T = gguf.GGUFValueType
    g = lambda s: "".join(chr(0x120) if c == " " else c for c in s)
    bpe_tokens = ["a", "b", "c", "h", "e", "l", "o", g(" "), "1", "2", g(" h"), "he", "ll", "hell", "hello", "ab",
                  "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe_types = [1] * 16 + [3, 3, 3]
    bpe_merges = [g(" ") + " h", "h e", "l l", "he ll", "hell o", "a b"]
    spm_tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + \
                 ["\u2581", "a", "b", "h", "e", "l", "o", "\u2581h", "he", "ll", "\u2581he", "hell", "\u2581hello"]
    spm_scores = [0.0] * 259 + [-float(i) for i in range(1, len(spm_tokens) - 258)]
    spm_types = [2, 3, 3] + [6] * 256 + [1] * (len(spm_tokens) - 259)

    def bpe(**edits):
        kv = {"tokenizer.ggml.model": (T.STRING, "gpt2"), "tokenizer.ggml.pre": (T.STRING, "gpt-2"),
              "tokenizer.ggml.tokens": (T.ARRAY, bpe_tokens, T.STRING),
              "tokenizer.ggml.token_type": (T.ARRAY, bpe_types, T.INT32),
              "tokenizer.ggml.merges": (T.ARRAY, bpe_merges, T.STRING),
              "tokenizer.ggml.eos_token_id": (T.UINT32, 16)}
        kv.update(edits)
        return kv

    def spm_kv(**edits):
        kv = {"tokenizer.ggml.model": (T.STRING, "llama"), "tokenizer.ggml.pre": (T.STRING, "default"),
              "tokenizer.ggml.tokens": (T.ARRAY, spm_tokens, T.STRING),
              "tokenizer.ggml.scores": (T.ARRAY, spm_scores, T.FLOAT32),
              "tokenizer.ggml.token_type": (T.ARRAY, spm_types, T.INT32),
              "tokenizer.ggml.bos_token_id": (T.UINT32, 1), "tokenizer.ggml.eos_token_id": (T.UINT32, 2),
              "tokenizer.ggml.add_bos_token": (T.BOOL, True)}
        kv.update(edits)
        return kv

    seeds = {
        "valid_gpt2.gguf": bpe(),
        "valid_llama3_pre.gguf": bpe(**{"tokenizer.ggml.pre": (T.STRING, "llama-bpe"),
                                        "tokenizer.ggml.bos_token_id": (T.UINT32, 17)}),
        "valid_qwen2_pre.gguf": bpe(**{"tokenizer.ggml.pre": (T.STRING, "qwen2")}),
        "valid_smollm_pre.gguf": bpe(**{"tokenizer.ggml.pre": (T.STRING, "smollm"),
                                        "tokenizer.ggml.add_bos_token": (T.BOOL, False)}),
        "valid_default_pre.gguf": bpe(**{"tokenizer.ggml.pre": None}),
        "valid_spm.gguf": spm_kv(),
        "valid_spm_no_prefix_eos.gguf": spm_kv(**{"tokenizer.ggml.add_space_prefix": (T.BOOL, False),
                                                  "tokenizer.ggml.add_eos_token": (T.BOOL, True)}),
        "invalid_unknown_pre.gguf": bpe(**{"tokenizer.ggml.pre": (T.STRING, "no-such-pre")}),
        "invalid_unknown_model.gguf": bpe(**{"tokenizer.ggml.model": (T.STRING, "bert")}),
        "invalid_no_model.gguf": bpe(**{"tokenizer.ggml.model": None}),
        "invalid_merge_unknown_token.gguf": bpe(**{"tokenizer.ggml.merges": (T.ARRAY, ["a zz"], T.STRING)}),
        "invalid_merge_no_space.gguf": bpe(**{"tokenizer.ggml.merges": (T.ARRAY, ["ab"], T.STRING)}),
        "invalid_no_merges.gguf": bpe(**{"tokenizer.ggml.merges": None}),
        "invalid_token_type_length.gguf": bpe(**{"tokenizer.ggml.token_type": (T.ARRAY, [1, 1], T.INT32)}),
        "invalid_token_type_value.gguf": bpe(**{"tokenizer.ggml.token_type": (T.ARRAY, [9] * 19, T.INT32)}),
        "invalid_token_type_float.gguf": bpe(**{"tokenizer.ggml.token_type": (T.ARRAY, [1.0] * 19, T.FLOAT32)}),
        "invalid_bos_out_of_range.gguf": bpe(**{"tokenizer.ggml.bos_token_id": (T.UINT32, 19)}),
        "invalid_eos_negative.gguf": bpe(**{"tokenizer.ggml.eos_token_id": (T.INT32, -1)}),
        "invalid_add_bos_without_bos.gguf": bpe(**{"tokenizer.ggml.add_bos_token": (T.BOOL, True)}),
        "invalid_tokens_not_strings.gguf": bpe(**{"tokenizer.ggml.tokens": (T.ARRAY, list(range(19)), T.INT32)}),
        "invalid_duplicate_token.gguf": bpe(**{"tokenizer.ggml.tokens": (T.ARRAY, ["a"] * 19, T.STRING)}),
        "invalid_pre_not_string.gguf": bpe(**{"tokenizer.ggml.pre": (T.UINT32, 2)}),
        "invalid_spm_scores_length.gguf": spm_kv(**{"tokenizer.ggml.scores": (T.ARRAY, [0.0] * 3, T.FLOAT32)}),
        "invalid_spm_score_nan.gguf": spm_kv(**{"tokenizer.ggml.scores": (T.ARRAY, [float("nan")] * len(spm_tokens),
                                                                           T.FLOAT32)}),
        "invalid_spm_byte_token_text.gguf": spm_kv(**{"tokenizer.ggml.token_type": (T.ARRAY, [6] * len(spm_tokens),
                                                                                     T.INT32)}),
        "invalid_spm_add_bos_bool_type.gguf": spm_kv(**{"tokenizer.ggml.add_bos_token": (T.UINT8, 1)}),
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, kv in seeds.items():
        path = os.path.join(out_dir, name)
        w = gguf.GGUFWriter(path, "llama")
        for key, value in kv.items():
            if value is not None:
                w.add_key_value(key, value[1], value[0], value[2] if len(value) > 2 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    with open(os.path.join(out_dir, "invalid_not_gguf.gguf"), "wb") as f:
        f.write(b"GGUF\x03\x00\x00\x00not really")
    # gguf-py refuses to write an empty array: this one is laid out by hand (v3, 0 tensors, 2 key-values)
    gstr = lambda t: struct.pack("<Q", len(t)) + t
    image = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    image += gstr(b"tokenizer.ggml.model") + struct.pack("<I", 8) + gstr(b"gpt2")
    image += gstr(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 0)
    with open(os.path.join(out_dir, "invalid_empty_vocab.gguf"), "wb") as f:
        f.write(image)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1:] == ["--fuzz-corpus"]:
        fuzz_corpus(os.path.join(root, "tests", "fuzz", "corpus", "tokenizer_json"))
        fuzz_corpus_gguf(os.path.join(root, "tests", "fuzz", "corpus", "tokenizer_gguf"))
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "tokenizers")
    lines = corpus()
    gpt2 = gpt2_style(lines)
    write(out_dir, "gpt2", gpt2)
    write(out_dir, "gpt2_prefix", gpt2_prefix_style(gpt2))
    llama3 = llama3_style(lines)
    write(out_dir, "llama3", llama3)
    write(out_dir, "splits", splits_style(llama3))
    qwen2 = qwen2_style(lines)
    write(out_dir, "qwen2", qwen2)
    smollm = smollm_style(lines)
    write(out_dir, "smollm", smollm)
    sp = train_sentencepiece(lines)
    llama2 = llama_converter(sp, legacy=True)
    write(out_dir, "spm", llama2, sp)
    write(out_dir, "spm_metaspace", llama_converter(sp, legacy=False))

    gguf_bpe(os.path.join(out_dir, "gpt2", "tokenizer.gguf"), gpt2, "gpt-2",
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False})
    gguf_bpe(os.path.join(out_dir, "llama3", "tokenizer.gguf"), llama3, "llama-bpe",
             {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True})
    gguf_bpe(os.path.join(out_dir, "qwen2", "tokenizer.gguf"), qwen2, "qwen2",
             {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False})
    gguf_bpe(os.path.join(out_dir, "smollm", "tokenizer.gguf"), smollm, "smollm",
             {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "add_bos_token": False})
    gguf_spm(os.path.join(out_dir, "spm", "tokenizer.gguf"), sp, llama2,
             {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False})
    # beside the llama_gqa_tied golden model (vocab 320): tokenizer.json only, no cases
    model_dir = os.path.join(root, "tests", "fixtures", "llama_gqa_tied")
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(model_sized_style(lines, 320).to_str())


if __name__ == "__main__":
    main()
