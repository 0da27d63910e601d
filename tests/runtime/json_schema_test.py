#!/usr/bin/env python3
"""`moesh grammar --json-schema` (runtime/json_schema.h) against an independent validator
(python3-jsonschema, Draft 2020-12, with format checking for date, time, date-time and uuid):

1. soundness: for each schema below, 40 texts from `--sample` parse as strict JSON (no NaN,
   no infinity, no duplicate key) and validate; the samples are not all the same, and an
   optional property is both present and absent among them;
2. completeness: valid instances (checked valid here first) written compactly, with indent=2
   and with ensure_ascii=True pass `--check`; invalid ones (checked invalid here first) fail it;
3. refusals: unsupported keywords are refused, and stderr names the JSON pointer and keyword;
4. `--json-object`: samples are objects; objects pass --check; other top-level values fail.

Every valid instance stays within what the converter promises: properties in the schema's
order, no other properties unless the schema names none and additionalProperties allows them,
numbers within 16 integer and 16 fraction digits and 2 exponent digits, at most 32 whitespace
characters between tokens, enum/const values and property names without \\u escapes of
characters that need none (cases with such names or values skip the ensure_ascii form).

    python3 tests/runtime/json_schema_test.py --moesh build/bin/moesh

Exit status: 0 passed, 1 failed, 77 skipped (jsonschema cannot be imported).
"""

import argparse
import importlib.metadata
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

try:
    import jsonschema
    from jsonschema import Draft202012Validator, FormatChecker
except ImportError as e:
    print(f"SKIP: jsonschema cannot be imported ({e}); install python3-jsonschema")
    sys.exit(77)

N_SAMPLES = 40
failures = []


def check(ok, what, detail=""):
    print(("ok    " if ok else "FAIL  ") + what + ("" if ok or not detail else "\n        " + detail), flush=True)
    if not ok:
        failures.append(what)
    return ok


# ---------------------------------------------------------------- format checking

DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
TIME_RE = re.compile(r"^(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))$")


def is_date(s):
    m = DATE_RE.match(s)
    if not m:
        return False
    datetime.date(int(m[1]), int(m[2]), int(m[3]))   # ValueError for 2023-02-30
    return True


def is_time(s):   # RFC 3339 full-time
    m = TIME_RE.match(s)
    if not m:
        return False
    h, mi, sec = int(m[1]), int(m[2]), int(m[3])
    if h > 23 or mi > 59 or sec > 60:
        return False
    if m[6] is not None and (int(m[6]) > 23 or int(m[7]) > 59):
        return False
    return True


def is_date_time(s):
    parts = re.split("[Tt]", s, maxsplit=1)
    return len(parts) == 2 and is_date(parts[0]) and is_time(parts[1])


def format_checker():
    """jsonschema's own uuid and date checks where it has them (4.10.3 needs the optional
    rfc3339-validator for time and date-time), and RFC 3339 checks of ours for the rest; the
    date check of ours runs too, since Python 3.11's date.fromisoformat accepts 20230101."""
    fc = FormatChecker(formats=())
    draft = getattr(Draft202012Validator, "FORMAT_CHECKER", None) or FormatChecker()
    ours = {"date": is_date, "time": is_time, "date-time": is_date_time}
    for name in ("date", "time", "date-time", "uuid"):
        theirs = draft.checkers.get(name)
        own = ours.get(name)
        if theirs and own:
            def both(x, f=theirs[0], g=own):
                return not isinstance(x, str) or (f(x) and g(x))
            fc.checks(name, raises=(ValueError, TypeError))(both)
        elif theirs:
            fc.checkers[name] = theirs
        else:
            fc.checks(name, raises=(ValueError, TypeError))(lambda x, g=own: not isinstance(x, str) or g(x))
    return fc


FORMATS = format_checker()


def validator(schema):
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


def first_error(v, doc):
    for e in v.iter_errors(doc):
        return f"{e.message} at {list(e.absolute_path)}"
    return ""


# ---------------------------------------------------------------- strict JSON

def _no_constant(name):
    raise ValueError(f"non-JSON constant {name}")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key among {keys!r}")
    return dict(pairs)


def strict_loads(text, overflows=None):
    """json.loads that refuses NaN/Infinity and duplicate keys; numbers too large for a double
    (which Python reads as inf) are appended to overflows."""
    def parse_float(t):
        f = float(t)
        if math.isinf(f) and overflows is not None:
            overflows.append(t)
        return f
    return json.loads(text, parse_constant=_no_constant, parse_float=parse_float, object_pairs_hook=_no_duplicates)


# ---------------------------------------------------------------- moesh

class Moesh:
    def __init__(self, exe, tmp):
        self.exe, self.tmp, self.n = exe, tmp, 0

    def _file(self, text, suffix):
        self.n += 1
        path = os.path.join(self.tmp, f"f{self.n}{suffix}")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        return path

    def _run(self, args):
        for _ in range(20):   # the binary may be missing for a moment while it is relinked
            if os.path.exists(self.exe):
                break
            time.sleep(0.5)
        return subprocess.run([self.exe, "grammar", *args], capture_output=True, timeout=60)

    def _mode(self, schema):
        return ["--json-object"] if schema is None else ["--json-schema", self._file(json.dumps(schema), ".json")]

    def grammar(self, schema):
        return self._run(self._mode(schema))

    def sample(self, schema, n, seed, max_bytes=None):
        args = self._mode(schema) + ["--sample", str(n), "--seed", str(seed)]
        if max_bytes:
            args += ["--max-bytes", str(max_bytes)]
        r = self._run(args)
        if r.returncode != 0:
            return None, r.stderr.decode(errors="replace")
        # split on "\n" only: a JSON string line may hold a raw U+2028 or U+0085, which
        # str.splitlines() would also split on
        return [json.loads(line) for line in r.stdout.decode("utf-8").split("\n") if line], ""

    def check(self, schema, text):
        r = self._run(self._mode(schema) + ["--check", self._file(text, ".txt")])
        return r.returncode, r.stderr.decode(errors="replace").strip()


# ---------------------------------------------------------------- the schemas
# Each: schema, optional (top-level properties that may be left out: at least one of them must
# be both present and absent among the samples), valid and invalid instances.

INVALID_DATE_EXAMPLES = ["2023-02-30", "2023-04-31", "2023-02-29"]

SCHEMAS = [
    {
        "name": "person (pydantic model, Optional via anyOf null)",
        "schema": {
            "title": "Person", "type": "object",
            "properties": {
                "name": {"title": "Name", "type": "string", "minLength": 1, "maxLength": 50},
                "age": {"title": "Age", "type": "integer", "minimum": 0},
                "email": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Email"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5, "title": "Tags"},
                "active": {"type": "boolean", "default": True},
            },
            "required": ["name", "age"], "additionalProperties": False,
        },
        "optional": ["email", "tags", "active"],
        "valid": [
            {"name": "Ada", "age": 36},
            {"name": "Ada", "age": 0, "email": None, "tags": [], "active": False},
            {"name": "Zoë \"Z\" \\ O'Neil\n\t/", "age": 1234567890123456, "email": "z@example.com",
             "tags": ["a", "b", "c", "d", "e"]},
            {"name": "x" * 50, "age": 7, "active": True},
            {"name": "名前😀", "age": 1, "tags": ["é", ""]},
            {"name": "DEL \x7f is a JSON string character (RFC 8259)", "age": 2},
        ],
        "invalid": [
            {"age": 36},
            {"name": "", "age": 1},
            {"name": "x" * 51, "age": 1},
            {"name": "Ada", "age": -1},
            {"name": "Ada", "age": 1.5},
            {"name": "Ada", "age": "36"},
            {"name": "Ada", "age": 3, "nickname": "A"},
            {"name": "Ada", "age": 3, "tags": ["1", "2", "3", "4", "5", "6"]},
            {"name": "Ada", "age": 3, "email": 5},
            {"name": "Ada", "age": 3, "active": "yes"},
            [],
        ],
    },
    {
        "name": "order (nested objects, array of objects, uuid, date-time)",
        "schema": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "format": "uuid"},
                "created_at": {"type": "string", "format": "date-time"},
                "customer": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "name": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {
                                "street": {"type": "string"},
                                "city": {"type": "string"},
                                "zip": {"type": "string", "minLength": 5, "maxLength": 10},
                            },
                            "required": ["street", "city"], "additionalProperties": False,
                        },
                    },
                    "required": ["id", "name"], "additionalProperties": False,
                },
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "minLength": 3, "maxLength": 12},
                            "quantity": {"type": "integer", "minimum": 1},
                            "unit_price": {"type": "number"},
                        },
                        "required": ["sku", "quantity", "unit_price"], "additionalProperties": False,
                    },
                    "minItems": 1, "maxItems": 4,
                },
                "notes": {"type": ["string", "null"]},
            },
            "required": ["order_id", "created_at", "customer", "items"], "additionalProperties": False,
        },
        "optional": ["notes"],
        "valid": [
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-02-29T23:59:59Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 0}]},
            {"order_id": "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", "created_at": "1999-12-31T00:00:00.123456789+05:30",
             "customer": {"id": 42, "name": "Ann", "address": {"street": "1 Main St", "city": "Oslo", "zip": "01501"}},
             "items": [{"sku": "SKU-1", "quantity": 3, "unit_price": 9.99},
                       {"sku": "SKU-2", "quantity": 1, "unit_price": -0.5},
                       {"sku": "SKU-3", "quantity": 10, "unit_price": 1e-05},
                       {"sku": "123456789012", "quantity": 2, "unit_price": 1234567890.125}],
             "notes": None},
            {"order_id": "00000000-0000-0000-0000-000000000000", "created_at": "2020-06-01T12:00:00-07:00",
             "customer": {"id": 9999999999999999, "name": "", "address": {"street": "", "city": "x"}},
             "items": [{"sku": "ééé", "quantity": 5, "unit_price": 3.0}], "notes": "leave at door"},
        ],
        "invalid": [
            {"order_id": "not-a-uuid", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01 00:00:00",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": []},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 0, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo", "address": {"street": "s", "city": "c", "zip": "123"}},
             "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "ab", "quantity": 1, "unit_price": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}] * 5},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T00:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1}]},
            {"order_id": "123e4567-e89b-12d3-a456-426614174000", "created_at": "2024-01-01T24:00:00Z",
             "customer": {"id": 1, "name": "Bo"}, "items": [{"sku": "abc", "quantity": 1, "unit_price": 1}]},
        ],
    },
    {
        "name": "enums of mixed values, const, small integer range, escaped enum strings",
        "schema": {
            "type": "object",
            "properties": {
                "status": {"enum": ["active", "inactive", "pending"]},
                "kind": {"const": "event"},
                "level": {"type": "integer", "minimum": -3, "maximum": 3},
                "mixed": {"enum": ["a", 1, 2.5, True, None]},
                "odd": {"type": "string", "enum": ["say \"hi\"", "back\\slash", "new\nline", "tab\there", "slash/"]},
            },
            "required": ["status", "kind"], "additionalProperties": False,
        },
        "optional": ["level", "mixed", "odd"],
        "valid": [
            {"status": "active", "kind": "event"},
            {"status": "pending", "kind": "event", "level": -3, "mixed": None, "odd": "say \"hi\""},
            {"status": "inactive", "kind": "event", "level": 3, "mixed": 2.5, "odd": "new\nline"},
            {"status": "active", "kind": "event", "level": 0, "mixed": True, "odd": "back\\slash"},
            {"status": "active", "kind": "event", "mixed": 1, "odd": "tab\there"},
            {"status": "active", "kind": "event", "mixed": "a", "odd": "slash/"},
        ],
        "invalid": [
            {"status": "Active", "kind": "event"},
            {"status": "active", "kind": "Event"},
            {"status": "active"},
            {"status": "active", "kind": "event", "level": 4},
            {"status": "active", "kind": "event", "level": -4},
            {"status": "active", "kind": "event", "mixed": "b"},
            {"status": "active", "kind": "event", "mixed": False},
            {"status": "active", "kind": "event", "odd": "say hi"},
        ],
    },
    {
        "name": "enum/const of non-ASCII strings, objects and arrays",
        "ascii_escapes": False,   # non-ASCII enum values or property names
        "schema": {
            "type": "object",
            "properties": {
                "lang": {"enum": ["français", "日本語", "emoji 😀", "Ωmega"]},
                "pos": {"const": {"x": 1, "y": [2, 3]}},
                "pair": {"enum": [[1, 2], {"k": "v"}, "plain"]},
            },
            "required": ["lang"], "additionalProperties": False,
        },
        "optional": ["pos", "pair"],
        "valid": [
            {"lang": "français"},
            {"lang": "日本語", "pair": "plain"},
            {"lang": "emoji 😀", "pos": {"x": 1, "y": [2, 3]}},
            {"lang": "Ωmega", "pair": [1, 2]},
            {"lang": "français", "pair": {"k": "v"}},
        ],
        "invalid": [
            {"lang": "francais"},
            {"lang": "français", "pos": {"x": 1, "y": [2]}},
            {"lang": "français", "pair": [2, 1]},
        ],
    },
    {
        "name": "tree ($defs recursion)",
        "schema": {
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "label": {"type": "string", "maxLength": 8},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 3},
                    },
                    "required": ["value"], "additionalProperties": False,
                },
            },
            "$ref": "#/$defs/Node",
        },
        "optional": ["label", "children"],
        "valid": [
            {"value": 1},
            {"value": -5, "children": []},
            {"value": 0, "label": "root", "children": [
                {"value": 1, "children": [{"value": 11}, {"value": 12, "label": "leaf"}]},
                {"value": 2},
                {"value": 3, "children": [{"value": 31, "children": [{"value": 311, "children": [{"value": 3111}]}]}]}]},
        ],
        "invalid": [
            {"label": "x"},
            {"value": 1, "children": [{"label": "no value"}]},
            {"value": 1, "children": [{"value": 1}, {"value": 2}, {"value": 3}, {"value": 4}]},
            {"value": 1, "children": [{"value": 2, "children": [{"value": "3"}]}]},
            {"value": 1, "label": "123456789"},
        ],
    },
    {
        "name": "linked list ($ref \"#\" recursion, anyOf with null)",
        "schema": {
            "type": "object",
            "properties": {
                "head": {"type": "string", "maxLength": 8},
                "tail": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
            },
            "required": ["head", "tail"], "additionalProperties": False,
        },
        "optional": [],
        "valid": [
            {"head": "a", "tail": None},
            {"head": "a", "tail": {"head": "b", "tail": {"head": "c", "tail": None}}},
        ],
        "invalid": [
            {"head": "a"},
            {"head": "a", "tail": {"head": "b"}},
            {"head": "a", "tail": {"head": 1, "tail": None}},
        ],
    },
    {
        "name": "formats (uuid, date, time, date-time)",
        "schema": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "day": {"type": "string", "format": "date"},
                "at": {"type": "string", "format": "time"},
                "when": {"type": "string", "format": "date-time"},
                "birthday": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            },
            "required": ["id", "day", "at", "when"], "additionalProperties": False,
        },
        "optional": ["birthday"],
        "valid": [
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-02-29", "at": "08:30:00Z",
             "when": "2024-03-01T08:30:00.5+01:00"},
            {"id": "F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6", "day": "1970-01-01", "at": "23:59:59.999-12:00",
             "when": "1970-01-01T00:00:00Z", "birthday": None},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2023-12-31", "at": "00:00:00+00:00",
             "when": "2023-12-31T23:59:59-00:00", "birthday": "2000-02-29"},
        ],
        "invalid": [
            {"id": "f81d4fae7dec11d0a76500a0c91e6bf6", "day": "2024-02-29", "at": "08:30:00Z", "when": "2024-03-01T08:30:00Z"},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-2-29", "at": "08:30:00Z", "when": "2024-03-01T08:30:00Z"},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-13-01", "at": "08:30:00Z", "when": "2024-03-01T08:30:00Z"},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-02-29", "at": "25:30:00Z", "when": "2024-03-01T08:30:00Z"},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-02-29", "at": "08:30Z", "when": "2024-03-01T08:30:00Z"},
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-02-29", "at": "08:30:00Z", "when": "2024-03-01"},
        ] + [  # calendar dates that do not exist
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": d, "at": "08:30:00Z", "when": "2024-03-01T08:30:00Z"}
            for d in INVALID_DATE_EXAMPLES
        ] + [
            {"id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "day": "2024-01-01", "at": "08:30:00Z", "when": "2023-02-29T08:30:00Z"},
        ],
    },
    {
        "name": "additionalProperties true",
        "schema": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
            "required": ["id"], "additionalProperties": True,
        },
        # Not checked: where any key may follow, --sample's character-by-character walk almost
        # never spells the declared optional key (a sampling bias, not a grammar error).
        "optional": [],
        "valid": [
            {"id": 1},
            {"id": 1, "name": "x"},
            # valid but outside the promise (other keys next to named ones): {"id": -7, "z": True}
        ],
        "invalid": [
            {"name": "x"},
            {"id": "1"},
            {"id": 1, "name": 5},       # a declared property, written where other properties go
            {"id": 1, "name": None},
        ],
    },
    {
        "name": "additionalProperties a schema (labels to numbers)",
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}},
            "additionalProperties": {"type": "number"},
        },
        # Not checked: where any key may follow, --sample's character-by-character walk almost
        # never spells the declared optional key (a sampling bias, not a grammar error).
        "optional": [],
        "valid": [
            {},
            {"label": "x"},
            # valid but outside the promise (other keys next to named ones): {"a": 1e-05, "b": 2.5}
        ],
        "invalid": [
            {"a": "x"},
            {"label": "x", "a": None},
            {"label": 1},              # a declared property, written where other properties go
            {"a": 1, "label": 2},
        ],
    },
    {
        "name": "dictionary of bounded integer lists (additionalProperties only)",
        "schema": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "minItems": 1, "maxItems": 3},
        },
        "optional": [],
        "valid": [{}, {"a": [0]}, {"a": [1, 2, 3], "b c": [9], "": [5, 5]}],
        "invalid": [{"a": []}, {"a": [1, 2, 3, 4]}, {"a": [10]}, {"a": [-1]}, {"a": 1}],
    },
    {
        "name": "prefixItems tuple (pydantic Tuple[float, float, Literal])",
        "schema": {
            "type": "object",
            "properties": {
                "point": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"},
                                                           {"enum": ["m", "km"], "type": "string"}],
                          "items": False, "minItems": 3, "maxItems": 3},
                "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False,
                         "minItems": 2, "maxItems": 2},
            },
            "required": ["point"], "additionalProperties": False,
        },
        "optional": ["pair"],
        "valid": [
            {"point": [1.5, -2, "km"]},
            {"point": [0, 0, "m"], "pair": ["a", 1]},
            {"point": [1e-07, 123456789.123, "m"], "pair": ["", -3]},
        ],
        "invalid": [
            {"point": [1, 2]},
            {"point": [1, 2, "mi"]},
            {"point": [1, 2, "m", 4]},
            {"point": ["1", 2, "m"]},
            {"point": [1, 2, "m"], "pair": [1, "a"]},
        ],
    },
    {
        "name": "unicode and escaped property names",
        "ascii_escapes": False,   # non-ASCII enum values or property names
        "schema": {
            "type": "object",
            "properties": {
                "名前": {"type": "string"},
                "straße": {"type": "integer"},
                "emoji😀": {"type": "boolean"},
                "quote\"key": {"type": "null"},
                "back\\slash": {"type": "string", "maxLength": 3},
                "new\nline key": {"type": "integer", "minimum": 1},
                "a/b~c": {"type": "number"},
            },
            "required": ["名前", "quote\"key"], "additionalProperties": False,
        },
        "optional": ["straße", "emoji😀", "back\\slash", "new\nline key", "a/b~c"],
        "valid": [
            {"名前": "", "quote\"key": None},
            {"名前": "太郎", "straße": 5, "emoji😀": True, "quote\"key": None, "back\\slash": "ab\"",
             "new\nline key": 1, "a/b~c": 0.25},
            {"名前": "x", "emoji😀": False, "quote\"key": None, "a/b~c": -1},
        ],
        "invalid": [
            {"名前": "x"},
            {"名前": "x", "quote\"key": 1},
            {"名前": "x", "quote\"key": None, "back\\slash": "abcd"},
            {"名前": "x", "quote\"key": None, "new\nline key": 0},
            {"名前": "x", "quote\"key": None, "nom": "y"},
        ],
    },
    {
        "name": "type lists",
        "schema": {
            "type": "object",
            "properties": {
                "v": {"type": ["integer", "string", "null"]},
                "w": {"type": ["number", "boolean"]},
                "arr": {"type": ["array", "null"], "items": {"type": "integer"}, "maxItems": 4},
                "obj": {"type": ["object", "null"], "properties": {"x": {"type": "integer"}},
                        "required": ["x"], "additionalProperties": False},
            },
            "required": ["v", "w"], "additionalProperties": False,
        },
        "optional": ["arr", "obj"],
        "valid": [
            {"v": 1, "w": 1.5},
            {"v": "s", "w": True, "arr": None, "obj": None},
            {"v": None, "w": -3, "arr": [1, 2, 3, 4], "obj": {"x": 0}},
            {"v": 0, "w": False, "arr": []},
        ],
        "invalid": [
            {"v": 1.5, "w": 1},
            {"v": 1, "w": "1"},
            {"v": 1, "w": None},
            {"v": 1, "w": 1, "arr": [1.5]},
            {"v": 1, "w": 1, "arr": [1, 2, 3, 4, 5]},
            {"v": 1, "w": 1, "obj": {}},
            {"v": 1, "w": 1, "obj": {"x": 1, "y": 2}},
        ],
    },
    {
        "name": "discriminated union (oneOf of $defs with const tags)",
        "schema": {
            "$defs": {
                "Cat": {"type": "object", "title": "Cat",
                        "properties": {"pet_type": {"const": "cat"}, "meows": {"type": "integer", "minimum": 0}},
                        "required": ["pet_type", "meows"], "additionalProperties": False},
                "Dog": {"type": "object", "title": "Dog",
                        "properties": {"pet_type": {"const": "dog"}, "barks": {"type": "number"},
                                       "good": {"type": "boolean"}},
                        "required": ["pet_type", "barks"], "additionalProperties": False},
            },
            "type": "object",
            "properties": {
                "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                        "discriminator": {"propertyName": "pet_type",
                                          "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}}},
                "owners": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2},
            },
            "required": ["pet"], "additionalProperties": False,
        },
        "optional": ["owners"],
        "valid": [
            {"pet": {"pet_type": "cat", "meows": 3}},
            {"pet": {"pet_type": "dog", "barks": 2.5, "good": True}, "owners": ["Al", "Bea"]},
            {"pet": {"pet_type": "dog", "barks": 0}, "owners": ["x"]},
        ],
        "invalid": [
            {"pet": {"pet_type": "cat", "barks": 3}},
            {"pet": {"pet_type": "bird", "meows": 3}},
            {"pet": {"pet_type": "cat", "meows": 3}, "owners": []},
            {"pet": {"pet_type": "cat", "meows": 3}, "owners": [""]},
            {"pet": {"pet_type": "dog", "barks": 1, "good": "yes"}},
        ],
    },
    {
        "name": "OpenAI strict structured output (definitions, all required, allOf of one $ref)",
        "ascii_escapes": False,   # non-ASCII enum values or property names
        "schema": {
            "type": "object",
            "properties": {
                "steps": {"type": "array", "items": {"$ref": "#/definitions/step"}},
                "final_answer": {"type": "string"},
                "confidence": {"allOf": [{"$ref": "#/definitions/level"}], "description": "how sure"},
                "code": {"type": "string", "minLength": 2, "maxLength": 2},
            },
            "required": ["steps", "final_answer", "confidence", "code"], "additionalProperties": False,
            "definitions": {
                "step": {"type": "object",
                         "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                         "required": ["explanation", "output"], "additionalProperties": False},
                "level": {"type": "string", "enum": ["low", "medium", "high"], "title": "Level"},
            },
        },
        "optional": [],
        "valid": [
            {"steps": [], "final_answer": "42", "confidence": "high", "code": "ab"},
            {"steps": [{"explanation": "add", "output": "2"}, {"explanation": "", "output": "x = 4\n"}],
             "final_answer": "x = 4", "confidence": "low", "code": "éü"},
            {"steps": [{"explanation": "e", "output": "o"}], "final_answer": "", "confidence": "medium", "code": "\n\""},
            {"steps": [], "final_answer": "", "confidence": "medium", "code": "😀😀"},
        ],
        "invalid": [
            {"steps": [], "final_answer": "42", "confidence": "high"},
            {"steps": [{"explanation": "add"}], "final_answer": "42", "confidence": "high", "code": "ab"},
            {"steps": [], "final_answer": "42", "confidence": "sure", "code": "ab"},
            {"steps": [], "final_answer": "42", "confidence": "high", "code": "a"},
            {"steps": [], "final_answer": "42", "confidence": "high", "code": "abc"},
        ],
    },
    {
        "name": "top-level array of anyOf",
        "schema": {
            "type": "array",
            "items": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 1}, {"type": "null"}]},
            "minItems": 2, "maxItems": 5,
        },
        "optional": [],
        "valid": [[True, None], [1, 2, 3, 4, 5], [False, 9999999999999999, None]],
        "invalid": [[True], [1, 2, 3, 4, 5, 6], [0, 1], [1, "x"], {"a": 1}],
    },
]

# ---------------------------------------------------------------- parts 1 and 2

def serializations(doc, ascii_escapes=True):
    forms = [
        ("compact", json.dumps(doc, separators=(",", ":"), ensure_ascii=False)),
        ("indent=2", json.dumps(doc, indent=2, ensure_ascii=False)),
    ]
    if ascii_escapes:
        forms.append(("ensure_ascii", json.dumps(doc, separators=(",", ":"), ensure_ascii=True)))
    return forms


def short(text, n=160):
    r = ascii(text)
    return r if len(r) <= n else r[:n] + "..."


def test_schema(moesh, i, case):
    name, schema = case["name"], case["schema"]
    v = validator(schema)
    r = moesh.grammar(schema)
    if not check(r.returncode == 0 and r.stdout.startswith(b"root ::= "), f"[{name}] converts",
                 r.stderr.decode(errors="replace")):
        return

    # 1. soundness of samples
    samples, err = moesh.sample(schema, N_SAMPLES, seed=i + 1)
    if not check(samples is not None and len(samples) == N_SAMPLES, f"[{name}] --sample {N_SAMPLES} writes {N_SAMPLES} texts", err):
        return
    bad, big, docs = [], [], []
    for t in samples:
        overflows = []
        try:
            doc = strict_loads(t, overflows)
        except ValueError as e:
            bad.append(f"not strict JSON ({e}): {short(t)}")
            continue
        if overflows:
            big.append(f"{overflows[0]} is beyond a double: {short(t)}")
        docs.append(doc)
        e = first_error(v, doc)
        if e:
            bad.append(f"{e}: {short(t)}")
    check(not bad, f"[{name}] all {N_SAMPLES} samples parse and validate",
          f"{len(bad)} bad, e.g.\n        " + "\n        ".join(bad[:3]))
    check(not big, f"[{name}] every number in the samples fits a double",
          f"{len(big)} samples with one, e.g.\n        " + "\n        ".join(big[:2]))
    check(len(set(samples)) > 1, f"[{name}] samples are not all the same")
    if case["optional"]:
        counts = {k: sum(1 for d in docs if isinstance(d, dict) and k in d) for k in case["optional"]}
        check(any(0 < c < len(docs) for c in counts.values()),
              f"[{name}] some optional property is both present and absent in the samples",
              f"present in {counts} of {len(docs)}")

    # 2. completeness and rejection
    for j, doc in enumerate(case["valid"]):
        e = first_error(v, doc)
        if not check(not e, f"[{name}] test data: valid #{j} is valid", e):
            continue
        for how, text in serializations(doc, case.get("ascii_escapes", True)):
            rc, err = moesh.check(schema, text)
            check(rc == 0, f"[{name}] valid #{j} ({how}) passes --check", f"{err}\n        text: {short(text)}")
    for j, doc in enumerate(case["invalid"]):
        if not check(not v.is_valid(doc), f"[{name}] test data: invalid #{j} is invalid", json.dumps(doc)):
            continue
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        rc, err = moesh.check(schema, text)
        check(rc == 1 and err != "", f"[{name}] invalid #{j} fails --check", f"rc {rc}; text: {short(text)}")


# ---------------------------------------------------------------- part 3

REFUSALS = [
    # schema, pointer, words the message must name
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}, "/properties/code", ["pattern"]),
    ({"type": "object", "properties": {"a/b~c": {"type": "string", "pattern": "x"}}}, "/properties/a~1b~0c", ["pattern"]),
    ({"type": "object", "properties": {"x": {"not": {"type": "null"}}}}, "/properties/x", ["not"]),
    ({"type": "number", "multipleOf": 0.5}, "/", ["multipleOf"]),
    ({"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}}, "/properties/price", ["minimum"]),
    ({"type": "object", "properties": {"t": {"type": "number", "maximum": 1.5}}}, "/properties/t", ["maximum"]),
    ({"type": "integer", "exclusiveMinimum": 0}, "/", ["exclusiveMinimum"]),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "exclusiveMaximum": 10}}}, "/properties/n", ["exclusiveMaximum"]),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "/properties/a/$ref", ["$ref", "#/$defs/Missing"]),
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/Missing"}}, "definitions": {"Other": {}}},
     "/properties/a/$ref", ["$ref", "#/definitions/Missing"]),
    ({"$ref": "other.json#/x"}, "/$ref", ["$ref", "other.json#/x"]),
    ({"type": "object", "properties": {"a": False}}, "/properties/a", ["false"]),
    ({"type": "array", "items": False, "minItems": 1}, "/items", ["false"]),
    ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 2}, "/", ["minItems", "maxItems"]),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 5, "maxLength": 2}}}, "/properties/s",
     ["minLength", "maxLength"]),
    ({"type": "array", "items": {"type": "string", "pattern": "a"}}, "/items", ["pattern"]),
    ({"anyOf": [{"type": "string"}, {"type": "number", "maximum": 5}]}, "/anyOf/1", ["maximum"]),
    ({"$defs": {"A": {"type": "string", "pattern": "x"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
     "/$defs/A", ["pattern"]),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "/", ["uniqueItems"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "patternProperties": {"^x": {}}}, "/", ["patternProperties"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}, "/", ["minProperties"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}, "/required", ["b"]),
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 10}}}, "/properties/n", ["minimum"]),
    ({"type": "integer", "minimum": 0, "maximum": 5000}, "/", ["range"]),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}, "/items", ["items"]),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "/properties/a/type", ["strin"]),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}}, "/properties/a/allOf", ["allOf"]),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "/", ["if"]),
]


def test_refusals(moesh):
    for schema, pointer, words in REFUSALS:
        path = moesh._file(json.dumps(schema), ".json")
        r = moesh._run(["--json-schema", path])
        err = r.stderr.decode(errors="replace").strip()
        what = f"refused: {json.dumps(schema, ensure_ascii=False)[:90]}"
        prefix = f"{path}: json_schema at {pointer}: "
        ok = r.returncode != 0 and r.stdout == b"" and prefix in err and all(w in err[err.find(prefix) + len(prefix):] for w in words)
        check(ok, what, f"rc {r.returncode}; want '{prefix}...' naming {words}; stderr: {err[:300]}")


# ---------------------------------------------------------------- part 4

def test_json_object(moesh):
    samples, err = moesh.sample(None, N_SAMPLES, seed=99, max_bytes=2048)
    if check(samples is not None and len(samples) == N_SAMPLES, "[json-object] --sample writes 40 texts", err):
        bad, big = [], []
        for t in samples:
            if len(t.encode("utf-8")) > 2048:
                bad.append(f"longer than --max-bytes: {short(t)}")
            overflows = []
            try:
                if not isinstance(strict_loads(t, overflows), dict):
                    bad.append(f"not an object: {short(t)}")
            except ValueError as e:
                bad.append(f"not strict JSON ({e}): {short(t)}")
            if overflows:
                big.append(f"{overflows[0]} is beyond a double: {short(t)}")
        check(not big, "[json-object] every number in the samples fits a double",
              f"{len(big)} samples with one, e.g.\n        " + "\n        ".join(big[:2]))
        check(not bad, "[json-object] every sample is a JSON object within --max-bytes", "\n        ".join(bad[:3]))
        check(len(set(samples)) > 1, "[json-object] samples are not all the same")
    objects = [{}, {"a": 1}, {"a": [1, {"b": None}, "x"], "c": "é😀", "d": -1.5e10, "e": True, "": {}},
               {"nested": {"deep": {"deeper": [[[]]]}}}]
    for j, doc in enumerate(objects):
        for how, text in serializations(doc):
            rc, err = moesh.check(None, text)
            check(rc == 0, f"[json-object] object #{j} ({how}) passes --check", f"{err}\n        text: {short(text)}")
    for text in ["[]", "[{}]", "\"x\"", "1", "null", "true", "{\"a\":}", "{\"a\":1,}", "{'a':1}", "{\"a\":1}{}",
                 "{" + " " * 33 + "}", "{\"a\":NaN}"]:
        rc, err = moesh.check(None, text)
        check(rc == 1 and err != "", f"[json-object] {short(text, 40)} fails --check", f"rc {rc}")
    rc, err = moesh.check(None, "{\"a\":\n  [1,,2]}")
    check(rc == 1 and "line 2" in err and "column 6" in err and "offset" in err,
          "[json-object] a failed --check names offset, line and column", err)
    check("allow ',' here" in err, "[json-object] a failed --check quotes the character once", err)


def test_surrogates(moesh):
    """\\u escapes: a surrogate pair (an emoji) matches, a lone surrogate does not: JSON parsers
    such as nlohmann's (what reads a tool call's arguments) refuse it, so a forced text with one
    would be lost."""
    schema = {"type": "string"}
    for text, ok in [('"\\ud83d\\ude00"', True), ('"\\u00e9\\uFFFD"', True), ('"\\udca0"', False), ('"\\ud83d"', False),
                     ('"\\ud83d\\u0041"', False)]:
        rc, err = moesh.check(schema, text)
        check((rc == 0) == ok, f"[surrogates] {text} {'matches' if ok else 'does not match'}", err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moesh", required=True)
    args = ap.parse_args()
    exe = os.path.abspath(args.moesh)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moesh-json-schema-") as tmp:
        moesh = Moesh(exe, tmp)
        for i, case in enumerate(SCHEMAS):
            test_schema(moesh, i, case)
        test_refusals(moesh)
        test_json_object(moesh)
        test_surrogates(moesh)
    print(f"{len(failures)} failed, {time.monotonic() - t0:.1f} s (jsonschema {importlib.metadata.version('jsonschema')})"
          if failures else f"all passed, {time.monotonic() - t0:.1f} s")
    for f in failures:
        print("FAILED: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
