#!/usr/bin/env python3
"""Token masks of GBNF grammars from llama.cpp's grammar sampler (llama_sampler_init_grammar, through
llama-cpp-python's C API), for the grammar engine's tests (runtime/grammar.*):

  walks    per grammar and vocabulary, token sequences and the set of tokens llama.cpp allows before
           each token and after the last one (len(masks) == len(tokens) + 1). "text" walks spell a
           valid string of the grammar with llama_tokenize (no BOS, parse_special off); "random"
           walks pick uniformly (seeded) among the allowed tokens that are neither end-of-generation
           nor control tokens and keep the bytes strict UTF-8, up to 40 tokens (picking again, a few
           times, a token that leaves only end-of-generation within the first 6; from the 21st on
           preferring the piece that closes the open string or bracket, then pieces that open none,
           to reach an end); "random_partial_utf8" walks prefer tokens whose piece is not valid
           UTF-8 by itself (a split character).
  greedy   the shipped model's greedy tokens under three of the grammars: transformers' logits over
           the whole sequence at each step (float32, 1 thread, as scripts/make_penalty_references.py),
           tokens llama.cpp disallows set to -inf, argmax.

The grammars are this project's own (GRAMMARS below). Vocabularies: the shipped model's byte-level BPE
(its GGUF has no tokenizer keys, so a temporary copy gets them from tokenizer.json with
scripts/bench/gguf_add_tokenizer.py's functions, plus bos/eos ids from config.json: without them
llama.cpp's GPT-2 default makes id 11 "+" end-of-generation) and SmolLM2-135M-Instruct's
(.cache/models, see scripts/fetch_test_models).

    pip install -r scripts/requirements-train.txt gguf==0.19.0
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36   # builds llama.cpp from the sdist
    python3 scripts/make_grammar_references.py [--out tests/fixtures/grammar]

Masks are sorted allowed ids as [start, end_exclusive] ranges, stored once per vocabulary in
"mask_table" and referred to by index from the walks. Per step, "lax" lists (as ranges) the allowed ids
that a strict UTF-8 reading rejects after the walk's bytes so far (llama.cpp accepts lead bytes
F5-FF, surrogates, overlong four-byte forms and code points above U+10FFFF while a character is
split); it is omitted from walks where it is always empty. Versions are recorded in the JSON
(written with python 3.11.7, llama-cpp-python 0.3.36, torch 2.15.0, transformers 5.24.0, numpy 2.4.6).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import pathlib
import platform
import sys
import tempfile
import zlib

SHIPPED = "models/moesh-tiny-py"
SHIPPED_GGUF = "models/moesh-tiny-py/model.q8_0.gguf"
SMOLLM2_GGUF = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_IDS_FROM = "tests/fixtures/shipped/moesh-tiny-py/reference.json"
N_RANDOM_STEPS = 40
MIN_RANDOM_STEPS = 6   # random walks avoid ending before this many tokens where they can
FINISH_FROM = 20       # from this step on, random walks prefer closing pieces (to reach the end of a JSON and the like)
N_GENERATE = 24
GREEDY_GRAMMARS = ["json", "keywords", "identifiers"]

# name, GBNF text (root rule "root"), valid strings for the text walks
GRAMMARS = [
    dict(name="escapes", text=r'''# every escape form inside string literals: \x \u \U \t \n \r \\ \"
root     ::= "say " greeting sep "end"
greeting ::= ( "\x41\x42C"                 # ABC
             | "caf\u00e9"                 # café
             | "smile \U0001F600"          # a grinning face
             | "tab\tquote\"back\\slash" )
sep      ::= "\n" | "\t" | "\r\n" | " "
''', texts=["say café\nend", "say smile \U0001F600\r\nend", 'say tab\tquote"back\\slash end']),

    dict(name="literal-utf8", text='''# non-ASCII characters written as themselves
root ::= word (" " word){0,4} "!"?
word ::= "é" | "日本語" | "🙂" | "Ünïcödé" | "naïve" | "ß"
''', texts=["日本語 🙂 é!", "naïve Ünïcödé ß"]),

    dict(name="identifiers", text=r'''# identifiers separated by commas: a class loop
root  ::= ident ( "," " "? ident )*
ident ::= [a-z_] [a-z0-9_]*
''', texts=["foo_bar, x1,baz", "n"]),

    dict(name="quoted", text=r'''# one double-quoted string: a negated class, two-character escapes; nothing after it
root ::= "\"" ( [^"\\\n] | "\\" [nt"\\] )* "\""
''', texts=['"hello, wörld"', '"a\\"b\\n 日本 \\\\"']),

    dict(name="scripts", text=r'''# words of Cyrillic letters or CJK ideographs: ranges of non-ASCII code points
root ::= word ( " " word ){0,5}
word ::= [\u0400-\u04FF]+ | [一-龥]{1,4}
''', texts=["привет мир", "日本 語学 Ёж"]),

    dict(name="anychar", text=r'''# "." is any one character
root ::= "<" . . ">" | "[" .{0,6} "]" | "#" .+
''', texts=["<ab>", "[x y\tz]", "#anything goes: 日本 🙂\n"]),

    dict(name="balanced", text=r'''# balanced brackets of two kinds, nested to any depth: recursion through a second rule
root  ::= group+
group ::= "(" inner ")" | "[" inner "]"
inner ::= group*
''', texts=["(()[()])", "[[]]()"]),

    dict(name="nested-lists", text=r'''# nested lists of numbers and words; a rule continued over lines inside parentheses
root   ::= list
list   ::= "[" (
               item                    # the first item
               ( "," " "? item )*      # then more, comma separated
             )? "]"
item   ::= list | number | word
number ::= "-"? ( "0" | [1-9] [0-9]{0,3} )
word   ::= [a-z]{2,} bang
bang   ::= "!" | ''', texts=["[1, [ab!, -20], []]", "[[0],[xyz]]"]),

    dict(name="repetitions", text=r'''# bounded repetitions {3} {2,} {1,4} {0,2}, "?", and a rule continued after a trailing "|"
root ::= "id-" [0-9]{3} "-" [A-F]{2,} ( "/" [a-z]{1,4} ){0,2} ext?
ext  ::= "." kind
kind ::= "txt" | "md" |
         "json"
''', texts=["id-123-ABCDEF/ab/xyz.json", "id-007-FF"]),

    dict(name="json", text=r'''# a small JSON: objects, arrays, strings, numbers, literals; bounded whitespace
root   ::= object
value  ::= ( object | array | string | number | "true" | "false" | "null" ) ws
object ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ws ":" ws value
array  ::= "[" ws ( value ( "," ws value )* )? "]"
string ::= "\"" ( plain | "\\" escape )* "\""
plain  ::= [^"\\\x00-\x1F]
escape ::= ["\\/bfnrt] | "u" [0-9a-fA-F]{4}
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [\-+]? [0-9]+ )?
ws     ::= [ \t\n]{0,8}
''', texts=['{"a": [1, -2.5e3, true], "b\\u00e9": {"c": null}}', '{ "x" :\n false ,"y":[ ] }']),

    dict(name="fixed", text=r'''root ::= "The answer is " ( "42" | "forty-two" ) "."    # then only end-of-generation
''', texts=["The answer is 42.", "The answer is forty-two."]),

    dict(name="ab-repeat", text=r'''root ::= "ab"+
''', texts=["ababab", "ab"]),

    dict(name="keywords", text=r'''# keywords sharing prefixes
root ::= "yes" | "yesterday" | "no" | "nope" | "none"
''', texts=["yesterday", "nope"]),

    # token references: by id (<|im_start|>) and by text, control tokens between characters; no class
    # admits "<", so llama.cpp matches the control tokens only through the references
    dict(name="token-refs", vocabs=["SmolLM2-135M-Instruct"], special=True, text=r'''root ::= "Q" [a-z]{1,8} <[1]> ( [a-z ]{1,6} <file_sep> )? [0-9]{1,4} <filename> "."
''', texts=["Qabc<|im_start|>def <file_sep>12<filename>.", "Qz<|im_start|>7<filename>."]),

    dict(name="split-utf8", text=r'''# characters a byte-level vocabulary spells in pieces, then up to three non-ASCII ones
root  ::= glyph{1,6} ( " " [^\x00-\x7F]{1,3} )?
glyph ::= [\U0001D400-\U0001D7FF] | "ꙮ" | [ᚠ-ᛪ] | "𓂀"
''', texts=["𝐀𝔘ꙮᚠ", "𓂀 é日"]),
]


README = """# Grammar references

Generated by `{command}` (llama-cpp-python 0.3.36's llama.cpp through its C API, plus
transformers for the greedy runs; CI only reads the committed files). Do not edit by hand.
Versions: {versions}.

`masks.json` ({size} KiB) holds, for the GBNF grammars {grammars}
(their text is in the file) and two vocabularies, `moesh-tiny-py` (models/moesh-tiny-py, 4096
tokens) and `SmolLM2-135M-Instruct` (.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf, 49152):

* `vocabs[]`: `n_vocab`, `eog` (llama_vocab_is_eog), `control` (token attribute CONTROL),
  `user_defined`, `unused`, `nul_pieces` (pieces holding a 0 byte, which llama.cpp never allows),
  and `mask_table` ({n_masks} distinct masks): each mask is the sorted allowed ids as
  `[start, end_exclusive]` ranges.
* `grammars[].walks[vocab][]`: `kind` (`text`: a valid string, `text`, spelled by llama_tokenize;
  `random`; `random_partial_utf8`: prefers pieces that are not UTF-8 by themselves), `tokens`,
  `pieces` (hex, token_to_piece with special=true), `masks` (indices into the vocabulary's
  `mask_table`; one more than tokens: before each token and after the last), `ended`
  (`eog_only` or `length`, random walks), `cut` (where llama.cpp refused a text walk's token; none do now),
  and, where not all empty, `lax`: per step, the allowed ids (ranges) that a strict UTF-8 reading
  rejects after the walk's bytes. Random walks never pick end-of-generation, control or lax tokens,
  except the control tokens a grammar references (`token-refs`, SmolLM2 only: `grammars[].token_refs`
  lists their ids per vocabulary; its text walks are tokenized with special tokens parsed).
* `greedy.runs[]`: the shipped model's greedy tokens under {greedy} for the 3 prompts of
  shipped/moesh-tiny-py/reference.json (`prompt_ids`), up to 24 tokens; `ended`: `eog_only` (llama.cpp
  allowed only end-of-generation: not appended), `eog_sampled` (appended) or `length`;
  `min_top2_gap` among allowed logits (all > 1e-3).

What llama.cpp does that a strict engine may not (the tests should skip or special-case these):
control tokens' text (`<|im_start|>`) is matched like any text, so they appear in masks under `.`
and negated classes (moesh never samples a control token unless it ends generation); SmolLM2's
end-of-generation ids are 0, 2 and 4 (`<reponame>`, a FIM token); `lax` ids: single-byte tokens
F5-FF, F0 80-8F (overlong), F4 90-BF (above U+10FFFF) and ED A0-BF (surrogates) are allowed
where `.`, a negated class or a range that the partial code point could reach follows.
"""


# ---------------------------------------------------------------- strict UTF-8 (RFC 3629)

def _utf8_step(state, b):
    """state: None (between characters) or (need, lo, hi) for the next byte. Returns the next state or False."""
    if state is None:
        if b < 0x80:
            return None
        if 0xC2 <= b <= 0xDF:
            return (1, 0x80, 0xBF)
        if b == 0xE0:
            return (2, 0xA0, 0xBF)
        if b == 0xED:
            return (2, 0x80, 0x9F)
        if 0xE1 <= b <= 0xEF:
            return (2, 0x80, 0xBF)
        if b == 0xF0:
            return (3, 0x90, 0xBF)
        if 0xF1 <= b <= 0xF3:
            return (3, 0x80, 0xBF)
        if b == 0xF4:
            return (3, 0x80, 0x8F)
        return False
    need, lo, hi = state
    if not lo <= b <= hi:
        return False
    return None if need == 1 else (need - 1, 0x80, 0xBF)


def utf8_state(data: bytes, state=None):
    """The decoder state after data (None: complete), or False if data is not strict UTF-8 from state."""
    for b in data:
        state = _utf8_step(state, b)
        if state is False:
            return False
    return state


def awaited_closer(data: bytes):
    """The character that closes the innermost open string or bracket of data, if any (a rough reading)."""
    stack, in_string, escaped = [], False, False
    for c in data.decode("utf-8", errors="replace"):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "([{":
            stack.append(")]}"["([{".index(c)])
        elif c in ")]}" and stack and stack[-1] == c:
            stack.pop()
    return '"' if in_string else (stack[-1] if stack else None)


# ---------------------------------------------------------------- llama.cpp

def ranges(ids) -> list[list[int]]:
    out = []
    for i in ids:
        i = int(i)
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


class Vocab:
    def __init__(self, ll, np, name: str, gguf_path: str, load_path: str):
        self.ll, self.np, self.name, self.gguf = ll, np, name, gguf_path
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self.model = ll.llama_model_load_from_file(load_path.encode(), params)
        assert self.model, f"cannot load {load_path}"
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n = ll.llama_vocab_n_tokens(self.vocab)
        buf = ctypes.create_string_buffer(1024)

        def piece(i):
            k = ll.llama_token_to_piece(self.vocab, i, buf, len(buf), 0, True)
            assert 0 <= k <= len(buf)
            return buf.raw[:k]

        self.pieces = [piece(i) for i in range(self.n)]
        self.attr = [int(ll.llama_vocab_get_attr(self.vocab, i)) for i in range(self.n)]
        self.eog = [i for i in range(self.n) if ll.llama_vocab_is_eog(self.vocab, i)]
        self.control = [i for i in range(self.n) if self.attr[i] & ll.LLAMA_TOKEN_ATTR_CONTROL]
        self.user_defined = [i for i in range(self.n) if self.attr[i] & ll.LLAMA_TOKEN_ATTR_USER_DEFINED]
        self.unused = [i for i in range(self.n) if self.attr[i] & ll.LLAMA_TOKEN_ATTR_UNUSED]
        self.excluded = np.zeros(self.n, dtype=bool)   # never picked by a random walk
        self.excluded[self.eog] = True
        self.excluded[self.control] = True
        self.is_eog = np.zeros(self.n, dtype=bool)
        self.is_eog[self.eog] = True
        # a piece's strict-UTF-8 reading from a complete state: False (invalid), None (complete), or partial
        self.alone = [utf8_state(p) for p in self.pieces]
        self.alone_ok = np.array([s is not False for s in self.alone])
        self.whole = np.array([s is None for s in self.alone])   # valid UTF-8 by itself
        text = [p.decode("utf-8", errors="replace").strip(" ") for p in self.pieces]
        self.text = np.array(text, dtype=object)
        self.first_char = np.array([t[:1] for t in text], dtype=object)
        self.opens_nothing = np.array([not any(c in "\"'([{<" for c in t) for t in text])
        self.data = np.zeros(self.n, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        assert self.data.itemsize == ctypes.sizeof(ll.llama_token_data)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        raw = text.encode()
        toks = (self.ll.llama_token * (len(raw) + 8))()
        k = self.ll.llama_tokenize(self.vocab, raw, len(raw), toks, len(toks), False, special)
        assert k >= 0
        return list(toks[:k])

    def strict_ok(self, state, ids):
        """Mask over ids: the piece keeps the bytes strict UTF-8 after a stream in decoder state `state`."""
        if state is None:
            return self.alone_ok[ids]
        return self.np.array([utf8_state(self.pieces[i], state) is not False for i in ids], dtype=bool)


class Grammar:
    """A fresh llama.cpp grammar sampler."""

    def __init__(self, vocab: Vocab, text: str):
        self.v = vocab
        self.smpl = vocab.ll.llama_sampler_init_grammar(vocab.vocab, text.encode(), b"root")
        assert self.smpl, "llama.cpp did not parse the grammar"

    def allowed(self):
        v, ll = self.v, self.v.ll
        v.data["id"] = v.np.arange(v.n, dtype=v.np.int32)
        v.data["logit"] = 0.0
        v.data["p"] = 0.0
        arr = ll.llama_token_data_array(data=ctypes.cast(v.data.ctypes.data, ctypes.POINTER(ll.llama_token_data)),
                                        size=v.n, selected=-1, sorted=False)
        ll.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        assert arr.size == v.n and (v.data["id"] == v.np.arange(v.n)).all()
        logit = v.data["logit"]
        assert ((logit == 0.0) | v.np.isneginf(logit)).all()
        return v.np.flatnonzero(logit == 0.0)

    def accept(self, token: int):
        self.v.ll.llama_sampler_accept(self.smpl, token)

    def ends_after(self, token: int) -> bool:
        """Whether only end-of-generation would be allowed after token (on a clone)."""
        other = Grammar.__new__(Grammar)
        other.v, other.smpl = self.v, self.v.ll.llama_sampler_clone(self.smpl)
        other.accept(token)
        ends = bool(self.v.is_eog[other.allowed()].all())
        other.close()
        return ends

    def close(self):
        self.v.ll.llama_sampler_free(self.smpl)


class MaskTable:
    def __init__(self):
        self.index, self.masks = {}, []

    def add(self, ids) -> int:
        key = tuple(tuple(r) for r in ranges(ids))
        if key not in self.index:
            self.index[key] = len(self.masks)
            self.masks.append([list(r) for r in key])
        return self.index[key]


def walk(vocab: Vocab, table: MaskTable, text: str, kind: str, tokens=None, rng=None, prefer_partial=False, refs=()):
    """Runs one walk; `tokens` given: a text walk, else a random one. `refs`: control tokens the
    grammar references, which a random walk may pick."""
    np = vocab.np
    g = Grammar(vocab, text)
    out_tokens, masks, lax, sizes, eog_allowed = [], [], [], [], []
    state = None   # strict UTF-8 decoder state of the walk's bytes
    ended, cut = None, None
    step = 0
    while True:
        allowed = g.allowed()
        masks.append(table.add(allowed))
        sizes.append(len(allowed))
        eog_allowed.append(bool(vocab.is_eog[allowed].any()))
        normal = allowed[~vocab.excluded[allowed] | np.isin(allowed, list(refs))]
        ok = vocab.strict_ok(state, normal)
        lax.append(ranges(normal[~ok]))
        if tokens is not None:
            if step == len(tokens):
                break
            t = tokens[step]
            if t not in set(allowed.tolist()):
                cut = dict(at=step, token=t)
                break
        else:
            if step == N_RANDOM_STEPS:
                ended = "length"
                break
            cands = normal[ok]
            if len(cands) == 0:
                ended = "eog_only" if eog_allowed[-1] else "stuck"
                assert ended == "eog_only", f"{kind}: no token to pick and no end-of-generation"
                break
            if step >= FINISH_FROM:   # steer towards an end: the awaited closing character, else nothing opened
                want = awaited_closer(b"".join(vocab.pieces[t] for t in out_tokens))
                for sub in ([] if want is None else
                            [cands[vocab.text[cands] == want], cands[vocab.first_char[cands] == want]]) + [
                        cands[vocab.opens_nothing[cands]]]:
                    if len(sub):
                        cands = sub
                        break
            if prefer_partial:
                part = cands[~vocab.whole[cands]]
                if len(part):
                    cands = part
            t = int(cands[rng.integers(len(cands))])
            tries = 0   # early on, pick again (a few times) a token after which only end-of-generation is left
            while step < MIN_RANDOM_STEPS and tries < 8 and len(cands) > 1 and g.ends_after(t):
                cands = cands[cands != t]
                t = int(cands[rng.integers(len(cands))])
                tries += 1
        g.accept(t)
        state = utf8_state(vocab.pieces[t], state)
        assert state is not False or tokens is not None
        if state is False:   # a text walk is valid UTF-8 by construction, so never
            state = None
        out_tokens.append(int(t))
        step += 1
    g.close()
    w = dict(kind=kind)
    w["tokens"] = out_tokens
    w["pieces"] = [vocab.pieces[t].hex() for t in out_tokens]
    w["masks"] = masks
    if any(lax):
        w["lax"] = lax
    if cut is not None:
        w["cut"] = cut
    if ended is not None:
        w["ended"] = ended
    return w, sizes, eog_allowed


# ---------------------------------------------------------------- files

def make_shipped_gguf(tmp: pathlib.Path) -> pathlib.Path:
    """The shipped GGUF with tokenizer keys and config.json's BOS/EOS (id 0) for llama.cpp."""
    spec = importlib.util.spec_from_file_location("gguf_add_tokenizer", "scripts/bench/gguf_add_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dst = tmp / "moesh-tiny-py.gguf"
    mod.write_with_tokenizer(SHIPPED_GGUF, f"{SHIPPED}/tokenizer.json", str(dst))
    return dst


def _nesting(obj) -> int:
    if isinstance(obj, dict):
        return 99
    if isinstance(obj, list):
        return 1 + max((_nesting(x) for x in obj), default=0)
    return 0


def dump(obj, depth=0) -> str:
    """JSON with one line per value that is at most a list of lists of scalars."""
    if _nesting(obj) <= 2 or not obj:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dump(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + dump(v, depth + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures/grammar")
    ap.add_argument("--random-walks", type=int, default=3, help="uniform random walks per grammar and vocabulary")
    ap.add_argument("--random-walks-large", type=int, default=2, help="the same for SmolLM2's 49k vocabulary")
    args = ap.parse_args()

    import importlib.metadata
    import llama_cpp as ll
    import numpy as np

    ll.llama_backend_init()

    @ll.llama_log_callback
    def log(level, text, user_data):   # keep warnings and errors (grammar parse errors among them)
        if level in (3, 4):
            sys.stderr.write(text.decode(errors="replace"))

    ll.llama_log_set(log, None)

    tmp = tempfile.TemporaryDirectory()
    vocabs = [
        Vocab(ll, np, "moesh-tiny-py", SHIPPED_GGUF, str(make_shipped_gguf(pathlib.Path(tmp.name)))),
        Vocab(ll, np, "SmolLM2-135M-Instruct", SMOLLM2_GGUF, SMOLLM2_GGUF),
    ]
    assert vocabs[0].eog == [0], vocabs[0].eog

    tables = {v.name: MaskTable() for v in vocabs}
    grammars_out = []
    for gi, gr in enumerate(GRAMMARS):
        walks, refs = {}, {}
        for vi, v in enumerate(vocabs):
            if v.name not in gr.get("vocabs", [v.name]):
                continue
            rng = np.random.default_rng([zlib.crc32(gr["name"].encode()), vi])
            ws = []
            # the control tokens the grammar references: <[id]> and <text>
            import re
            refs[v.name] = sorted({int(i) for i in re.findall(r"<\[(\d+)\]>", gr["text"])} |
                                  {v.tokenize(t, special=True)[0] for t in re.findall(r"<[a-z_|]+>", gr["text"])})
            for s in gr["texts"]:
                w, sizes, eogs = walk(v, tables[v.name], gr["text"], "text", tokens=v.tokenize(s, gr.get("special", False)),
                                      refs=refs[v.name])
                ws.append(dict(text=s, **w))
                if "cut" in w:
                    print(f"  {gr['name']} / {v.name}: text walk {s!r} cut at {w['cut']}")
            n_random = args.random_walks if v.n < 10000 else args.random_walks_large
            for _ in range(n_random):
                w, sizes, eogs = walk(v, tables[v.name], gr["text"], "random", rng=rng, refs=refs[v.name])
                ws.append(w)
            w, sizes, eogs = walk(v, tables[v.name], gr["text"], "random_partial_utf8", rng=rng, prefer_partial=True,
                                  refs=refs[v.name])
            ws.append(w)
            walks[v.name] = ws
            for w in ws:
                sz = [len(tables[v.name].masks[m]) for m in w["masks"]]
                print(f"{gr['name']:13s} {v.name:22s} {w['kind']:20s} {len(w['tokens']):3d} tokens, "
                      f"{sum(1 for m in w['masks'] if m is not None)} masks, ranges/step max {max(sz)}"
                      f"{', lax' if 'lax' in w else ''}{', ended ' + w['ended'] if 'ended' in w else ''}")
        g_out = dict(name=gr["name"], text=gr["text"], texts=gr["texts"], walks=walks)
        if any(refs.values()):
            g_out["token_refs"] = refs
        grammars_out.append(g_out)

    # ------------------------------------------------------------ greedy under a grammar (shipped model)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    model.eval()
    prompts = [p["ids"] for p in json.loads(pathlib.Path(PROMPT_IDS_FROM).read_text())["prompts"]]
    tiny = vocabs[0]
    greedy = []
    with torch.no_grad():
        for name in GREEDY_GRAMMARS:
            text = next(g["text"] for g in GRAMMARS if g["name"] == name)
            for ids in prompts:
                g = Grammar(tiny, text)
                seq, out, min_gap, ended = list(ids), [], math.inf, "length"
                for _ in range(N_GENERATE):
                    allowed = g.allowed()
                    if tiny.is_eog[allowed].all():
                        ended = "eog_only"
                        break
                    row = model(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy().astype(np.float32)
                    assert row.shape[0] == tiny.n
                    masked = np.full_like(row, -np.inf)
                    masked[allowed] = row[allowed]
                    if len(allowed) >= 2:
                        top2 = np.sort(masked[allowed])[-2:]
                        min_gap = min(min_gap, float(top2[1] - top2[0]))
                    t = int(masked.argmax())
                    assert not tiny.excluded[t] or tiny.is_eog[t]
                    out.append(t)
                    seq.append(t)
                    if tiny.is_eog[t]:
                        ended = "eog_sampled"
                        break
                    g.accept(t)
                g.close()
                said = b"".join(tiny.pieces[t] for t in out if not tiny.is_eog[t]).decode(errors="replace")
                greedy.append(dict(grammar=name, prompt_ids=ids, tokens=out, ended=ended, min_top2_gap=min_gap,
                                   text=said))
                print(f"greedy {name}: {out} {ended} {greedy[-1]['text']!r} (smallest top-2 gap {min_gap:.3g})")
                assert min_gap > 1e-3, "a near tie: choose other prompts or grammars"

    out = dict(
        generator="scripts/make_grammar_references.py",
        versions=dict(python=platform.python_version(), llama_cpp_python=ll.__version__, torch=torch.__version__,
                      transformers=transformers.__version__, numpy=np.__version__,
                      gguf=importlib.metadata.version("gguf")),
        vocabs=[dict(name=v.name, gguf=v.gguf, n_vocab=v.n, eog=v.eog, control=v.control,
                     user_defined=v.user_defined, unused=v.unused,
                     nul_pieces=[i for i in range(v.n) if b"\0" in v.pieces[i]],
                     mask_table=tables[v.name].masks) for v in vocabs],
        n_random_steps=N_RANDOM_STEPS,
        grammars=grammars_out,
        greedy=dict(model=SHIPPED, vocab="moesh-tiny-py", prompts_from=PROMPT_IDS_FROM, n_generate=N_GENERATE,
                    runs=greedy),
    )
    outdir = pathlib.Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    text = dump(out) + "\n"
    (outdir / "masks.json").write_text(text, encoding="utf-8")
    (outdir / "README.md").write_text(README.format(
        command="python3 scripts/make_grammar_references.py",
        versions=", ".join(f"{k} {v}" for k, v in out["versions"].items()),
        grammars=", ".join(f"`{g['name']}`" for g in GRAMMARS), greedy=", ".join(f"`{g}`" for g in GREEDY_GRAMMARS),
        size=len(text.encode()) // 1024, n_masks=" and ".join(str(len(t.masks)) for t in tables.values())))
    print(f"wrote {outdir / 'masks.json'}: {len(text.encode()) / 1e6:.2f} MB, mask tables "
          + ", ".join(f"{k} {len(t.masks)}" for k, t in tables.items()))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
