#!/usr/bin/env python3
"""`moesh serve` as a real process on a loopback port, driven by the Python client
(scripts/clients/python): greedy answers equal `moesh run`'s, streamed text adds up to
the done frame's, two requests share one socket, cancel ends a request "cancelled", a
bad field is a bad_request MoeshError (and an oversized frame, answered with a null id,
a too_large one), a timeout leaves the client usable, and SIGTERM drains and exits 0.
Every wait is bounded; the server is killed in any case.

    python3 tests/clients/python_client_test.py --moesh build/bin/moesh --model models/moesh-tiny-py

Exit status: 0 passed, 1 failed, 77 skipped (pyzmq cannot be imported).
"""

import argparse
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import time

try:
    import zmq  # noqa: F401  (the client needs it)
except ImportError as e:
    print(f"SKIP: pyzmq cannot be imported ({e}); install python3-zmq (scripts/setup)")
    sys.exit(77)

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "clients" / "python"))
from moesh_client import Client, HandshakeError, MoeshError  # noqa: E402

CONFIG = """[server]
max_sequences = 4
kv_cache = "16MiB"
prefill_chunk = 16
max_queue = 64
max_tokens = 512
max_message_bytes = 65536
drain_timeout_s = 10
log_interval_s = 0.05
[runtime]
max_batch = 32
"""
THREADS = "2"
BUDGET_S = 240   # the whole test, under ctest's TIMEOUT so that the finally clause still runs
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def start_server(moesh, model, config, log):
    return subprocess.Popen([moesh, "serve", "--model", model, "--config", config, "--endpoint", "tcp://127.0.0.1:*", "--http", "off",
                             "--threads", THREADS], stdout=subprocess.PIPE, stderr=log)


def kill_server(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    proc.stdout.close()


def read_endpoint(proc):
    """The server's first stdout line: the endpoint it bound (loading the model may take a while)."""
    line = b""
    deadline = time.monotonic() + 60
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
    return line.decode(errors="replace").split("\n")[0]


def moesh_run(moesh, model, prompt, n, extra=()):
    """The tokens `moesh run` generates alone, greedily."""
    out = subprocess.run([moesh, "run", "--model", model, "--prompt", prompt, "-n", str(n), "--output", "json",
                          "--threads", THREADS, *extra], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"moesh run failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens"]


def matches_run(done, expected, eos_ids, n):
    """done equals `moesh run`'s tokens, which go on past EOS where the server stops."""
    k = len(done["tokens"])
    if done["tokens"] != expected[:k]:
        return False
    if done["finish_reason"] == "length":
        return k == n
    return done["finish_reason"] == "eos" and k < n and expected[k] in eos_ids


def stream_all(c, **kw):
    frames = list(c.stream(**kw))
    tokens = [f for f in frames[:-1] if f["type"] == "token"]
    return tokens, frames[-1]


def run_tests(c, moesh, model, eos_ids):
    pong = c.ping()
    check(pong["type"] == "pong" and isinstance(pong.get("info"), dict), f"ping answers with a pong: {pong}")

    n = 24
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:"]
    expected = {p: moesh_run(moesh, model, p, n) for p in prompts}
    for p in prompts:
        done = c.generate(prompt=p, max_tokens=n, timeout=60)
        check(done["type"] == "done" and matches_run(done, expected[p], eos_ids, n),
              f"greedy generate({p!r}) equals moesh run's tokens: {done['tokens']} vs {expected[p]}")
        check(done["usage"]["completion_tokens"] == len(done["tokens"]), "usage.completion_tokens counts the tokens")

    p = prompts[0]
    tokens, done = stream_all(c, prompt=p, max_tokens=n, timeout=60)
    check(done["type"] == "done", "a stream ends with its done frame")
    check("".join(f["text"] for f in tokens) == done["text"], f"streamed text adds up to the done text {done['text']!r}")
    check([f["token"] for f in tokens] == done["tokens"] and [f["index"] for f in tokens] == list(range(len(tokens))),
          "token frames carry the done frame's tokens, indexed from 0")
    check(matches_run(done, expected[p], eos_ids, n), "streaming generates the same tokens")

    # Logprobs in the stream's token frames and in the done frame; scoring the prompt alone.
    tokens, done = stream_all(c, prompt=p, max_tokens=8, timeout=60, logprobs=2, presence_penalty=0.2)
    check([f["logprobs"] for f in tokens] == done["logprobs"] and all(len(e["top_logprobs"]) == 2 for e in done["logprobs"]),
          "logprobs=2: each token frame carries its entry, the done frame all of them")
    scored = c.generate(prompt=p, max_tokens=0, prompt_logprobs=0, echo=True, timeout=60)
    pl = scored["prompt_logprobs"]
    check(scored["tokens"] == [] and len(pl) == scored["usage"]["prompt_tokens"] and pl[0]["logprob"] is None
          and all(e["logprob"] < 0 for e in pl[1:]) and scored["prompt_text"] == p,
          f"max_tokens 0 with prompt_logprobs scores the prompt: {len(pl)} entries, text {scored['prompt_text']!r}")
    banned = c.generate(prompt=p, max_tokens=6, logit_bias={done["tokens"][0]: -100}, timeout=60)
    check(banned["tokens"][0] != done["tokens"][0], "logit_bias -100 bans the greedy first token")

    # A JSON Schema: the text is an instance (keys in the schema's order), ended by the grammar
    # itself, with the tokens `moesh run --json-schema` picks; a bad grammar is refused by name.
    schema = {"type": "object", "properties": {"zeta": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "alpha": {"enum": ["yes", "no"]}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(schema, f)
    try:
        want = moesh_run(moesh, model, p, 40, ["--json-schema", f.name])
    finally:
        os.unlink(f.name)
    shaped = c.generate(prompt=p, max_tokens=40, json_schema=schema, timeout=60)
    doc = json.loads(shaped["text"])
    check(shaped["finish_reason"] == "stop" and list(doc) == ["zeta", "alpha"] and doc["alpha"] in ("yes", "no")
          and 0 <= doc["zeta"] <= 99, f"json_schema: an instance, ended by the grammar: {shaped['text']!r}")
    check(shaped["tokens"] == want, f"json_schema: moesh run --json-schema's tokens {want} vs {shaped['tokens']}")
    stuck = c.generate(prompt=p, max_tokens=10, grammar='root ::= "ok" [\\x00]', timeout=60)
    check(stuck["text"] == "ok" and stuck["finish_reason"] == "stop" and "no token" in stuck.get("grammar_error", ""),
          f"a grammar no token can continue ends the request and says why: {stuck.get('grammar_error')!r}")
    kw = c.generate(prompt=p, max_tokens=10, grammar='root ::= "yes" | "no" | "maybe"', timeout=60)
    check(kw["text"] in ("yes", "no", "maybe") and kw["finish_reason"] == "stop", f"grammar: {kw['text']!r}")
    try:
        c.generate(prompt=p, max_tokens=4, grammar="root ::= x", timeout=60)
        check(False, "an undefined rule is refused")
    except MoeshError as e:
        check("rule 'x' is used but never defined" in str(e), f"an undefined rule is refused by name: {e}")

    # Two requests on one socket: the generate() reads the stream's frames and queues them for it.
    s = c.stream(prompt=prompts[0], max_tokens=n, timeout=60)
    first = next(s)
    other = c.generate(prompt=prompts[1], max_tokens=n, timeout=60)
    rest = list(s)
    check(matches_run(other, expected[prompts[1]], eos_ids, n), "a generate() while a stream is open gets its own answer")
    check(first["type"] == "token" and [f["token"] for f in [first] + rest[:-1]] == rest[-1]["tokens"]
          and matches_run(rest[-1], expected[prompts[0]], eos_ids, n), "the stream's frames wait for it meanwhile")

    # Cancel after the first token of a long request.
    s = c.stream(prompt="class Node:", max_tokens=500, timeout=60)
    first = next(s)
    c.cancel(first["id"])
    rest = list(s)
    done = rest[-1]
    check(done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 500,
          f"cancel ends the request with finish_reason 'cancelled' ({done['finish_reason']}, "
          f"{done['usage']['completion_tokens']} tokens)")
    check([f["token"] for f in [first] + rest[:-1]] == done["tokens"],
          "the cancelled request's done frame holds the tokens streamed")

    urgent = c.generate(prompt=prompts[0], max_tokens=n, priority=-3, timeout=60)
    check(matches_run(urgent, expected[prompts[0]], eos_ids, n) and urgent["timings"]["preempted"] == 0,
          "a request with a priority gets the same answer (nothing to preempt it)")
    try:
        c.generate(prompt="x", max_tokens=4, priority=1001, timeout=30)
        check(False, "priority 1001 is refused")
    except MoeshError as e:
        check(e.code == "bad_request" and "priority" in e.message, f"priority 1001 is a bad_request MoeshError: {e}")
    try:
        c.generate(prompt="x", max_tokens=-5, timeout=30)
        check(False, "max_tokens -5 is refused")
    except MoeshError as e:
        check(e.code == "bad_request" and "max_tokens" in e.message, f"max_tokens -5 is a bad_request MoeshError: {e}")
    try:
        c.generate(prompt_ids=[10**9], max_tokens=4, timeout=30)
        check(False, "a token id past the vocabulary is refused")
    except MoeshError as e:
        check(e.code == "bad_request", f"a token id past the vocabulary is a bad_request MoeshError: {e}")

    # too_large comes back with a null id (the server does not read the frame); the client
    # gives it to the request that had no answer yet.
    try:
        c.generate(prompt="x" * 70000, max_tokens=4, timeout=30)
        check(False, "a 70000-byte request is refused")
    except MoeshError as e:
        check(e.code == "too_large", f"a request over max_message_bytes is a too_large MoeshError: {e}")

    # A cancel of nothing is answered not_found, which must not land on a later request with that id.
    c.cancel("reused-id")
    done = c.generate(prompt=prompts[0], max_tokens=4, id="reused-id", timeout=60)
    check(done["id"] == "reused-id" and done["type"] == "done", "a not_found answer to a stray cancel is dropped")

    try:
        c.generate(prompt=prompts[0], max_tokens=500, timeout=0.001)
        check(False, "a 1 ms timeout expires")
    except TimeoutError:
        check(True, "a request not answered in time raises TimeoutError")
    done = c.generate(prompt=prompts[1], max_tokens=n, timeout=60)
    check(matches_run(done, expected[prompts[1]], eos_ids, n), "the client works after a timeout (late frames dropped)")


def out_of_time(signum, frame):
    raise TimeoutError(f"the test took longer than {BUDGET_S} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moesh", required=True, help="the moesh binary")
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--chat-model", default="", help="a chat model for tool calls (skipped when absent)")
    args = ap.parse_args()

    cfg = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(BUDGET_S)

    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp) / "serve.toml"
        config.write_text(CONFIG)
        log_path = pathlib.Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = start_server(args.moesh, args.model, str(config), log)
        try:
            endpoint = read_endpoint(proc)
            if not check(endpoint.startswith("tcp://127.0.0.1:"), f"the server prints its endpoint first: {endpoint!r}"):
                return 1
            with Client(endpoint) as c:
                try:
                    run_tests(c, args.moesh, args.model, eos_ids)
                    c.generate(prompt_ids=[5, 6, 7], max_tokens=400, timeout=60)   # long enough for status lines
                except (MoeshError, TimeoutError, RuntimeError, StopIteration) as e:
                    check(False, f"unexpected {type(e).__name__}: {e}")
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                rc = None
            check(rc == 0, f"SIGTERM drains and exits 0 (exit status {rc})")
            status = [l for l in log_path.read_text(errors="replace").splitlines() if l.startswith("moesh: last ")]
            check(len(status) > 0 and "generation" in status[0] and "tokens/s" in status[0] and "KV" in status[0],
                  f"the server logs status lines while it serves ({len(status)}: {status[:1]})")
        except TimeoutError as e:
            check(False, str(e))
        finally:
            kill_server(proc)
            if failures:
                print("server log (tail):\n" + log_path.read_text(errors="replace")[-4000:])
    curve(args.moesh, args.model)
    if args.chat_model and pathlib.Path(args.chat_model).exists():
        tool_calls(args.moesh, args.chat_model)
    else:
        print(f"note: no chat model at {args.chat_model!r}; tool calls not checked")
    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


def curve(moesh, model):
    """CURVE with certificates written by pyzmq (zmq.auth, the reference for the format): the
    listed client is served; a key not listed, no CURVE and the wrong server key each get a
    HandshakeError that says why, at once rather than as a timeout."""
    import shutil
    import zmq.auth
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        (t / "clients").mkdir()
        server_pub, server_sec = zmq.auth.create_certificates(tmp, "server")
        alice_pub, alice_sec = zmq.auth.create_certificates(tmp, "alice")
        shutil.copy(alice_pub, t / "clients")
        config = t / "serve.toml"
        config.write_text(CONFIG.replace("[runtime]", 'curve_secret_key = "server.key_secret"\ncurve_authorized_keys = "clients"\n[runtime]'))
        log_path = t / "curve.log"
        with open(log_path, "wb") as log:
            proc = start_server(moesh, model, str(config), log)
        try:
            endpoint = read_endpoint(proc)
            if not check(endpoint.startswith("tcp://"), f"CURVE server up: {endpoint!r}"):
                return
            with Client(endpoint, server_key=server_pub, client_key=alice_sec) as c:
                d = c.generate(prompt_ids=[5, 6, 7], max_tokens=4, timeout=60)
                check(d["finish_reason"] == "length" and len(d["tokens"]) == 4,
                      f"CURVE: the listed client (pyzmq's certificate) is served: {d['tokens']}")
            for name, kw, want in (("a key not listed", {"server_key": server_pub}, "refused this client's CURVE key"),
                                   ("no CURVE", {}, "require"),
                                   ("the wrong server key", {"server_key": alice_pub, "client_key": alice_sec}, "handshake")):
                t0 = time.monotonic()
                try:
                    with Client(endpoint, **kw) as c:
                        c.generate(prompt_ids=[5], max_tokens=1, timeout=20)
                    check(False, f"CURVE: {name} is served")
                except HandshakeError as e:
                    check(want in str(e) and time.monotonic() - t0 < 10, f"CURVE: {name} gets HandshakeError: {e}")
                except TimeoutError as e:
                    check(False, f"CURVE: {name} times out instead of saying why: {e}")
        finally:
            kill_server(proc)
            refusals = [l for l in log_path.read_text(errors="replace").splitlines() if "not in curve_authorized_keys" in l]
            check(len(refusals) >= 1, f"CURVE: the server logs refused keys: {refusals[:1]}")


def tool_calls(moesh, chat_model):
    """A call the model must make, through ZeroMQ: SmolLM2 with Qwen2.5's template (--chat-template)."""
    doc = json.loads((ROOT / "tests" / "fixtures" / "chat_templates" / "jinja.json").read_text())
    qwen = next(t["template"] for t in doc["templates"] if t["name"] == "Qwen-Qwen2.5-7B-Instruct")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    with tempfile.TemporaryDirectory() as tmp:
        template = pathlib.Path(tmp) / "qwen.jinja"
        template.write_text(qwen)
        config = pathlib.Path(tmp) / "serve.toml"
        config.write_text(CONFIG)
        with open(pathlib.Path(tmp) / "chat.log", "wb") as log:
            proc = subprocess.Popen([moesh, "serve", "--model", chat_model, "--config", str(config), "--endpoint", "tcp://127.0.0.1:*",
                                     "--http", "off", "--threads", THREADS, "--chat-template", str(template)], stdout=subprocess.PIPE, stderr=log)
        try:
            endpoint = read_endpoint(proc)
            if not check(endpoint.startswith("tcp://"), f"chat server up: {endpoint!r}"):
                return
            with Client(endpoint) as c:
                msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
                d = c.generate(messages=msgs, tools=tools, tool_choice={"type": "function", "function": {"name": "add"}},
                               max_tokens=60, timeout=120)
                calls = d.get("tool_calls", [])
                args = json.loads(calls[0]["function"]["arguments"]) if calls else {}
                check(d["finish_reason"] == "tool_calls" and len(calls) == 1 and calls[0]["function"]["name"] == "add"
                      and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values()) and d["text"] == "",
                      f"Python client: a named tool call comes back in the done frame: {d.get('tool_calls')} {d['finish_reason']}")
                frames = list(c.stream(messages=msgs, tools=tools, tool_choice="required", max_tokens=60, timeout=120))
                text = "".join(f["text"] for f in frames if f["type"] == "token")
                deltas = [d for f in frames if f["type"] == "token" for d in f.get("tool_calls", [])]
                whole = frames[-1].get("tool_calls") or [{}]
                check(frames[-1]["type"] == "done" and frames[-1].get("tool_calls") and text == frames[-1]["text"] == "",
                      f"streamed: no call text in the token frames, the call in the done frame ({text!r})")
                pieces = "".join(d["function"]["arguments"] for d in deltas)
                check(len(deltas) >= 2 and deltas[0].get("id") == whole[0].get("id") and deltas[0]["function"].get("name") == "add"
                      and all(d["index"] == 0 and "id" not in d for d in deltas[1:]) and pieces
                      and whole[0]["function"]["arguments"].startswith(pieces),
                      f"streamed: token frames carry the call as it is written, its pieces a start of the done frame's "
                      f"(which has the rest): {deltas}")
                back = msgs + [{"role": "assistant", "tool_calls": calls},
                               {"role": "tool", "tool_call_id": calls[0]["id"] if calls else "x", "content": "5"}]
                d2 = c.generate(messages=back, tools=tools, tool_choice="none", max_tokens=12, timeout=120,
                                chat_template_kwargs={"unused": 1})
                check(d2["finish_reason"] in ("eos", "length") and not d2.get("tool_calls"),
                      f"the call and its result go back as messages: {d2['text']!r}")
        except (MoeshError, TimeoutError, RuntimeError) as e:
            check(False, f"tool calls: unexpected {type(e).__name__}: {e}")
        finally:
            kill_server(proc)


if __name__ == "__main__":
    sys.exit(main())
