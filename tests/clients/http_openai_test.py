#!/usr/bin/env python3
"""`moesh serve`'s HTTP API as a real process on loopback, driven by OpenAI's own Python
package (`openai`, pinned in scripts/setup) and by raw sockets:

- greedy /v1/completions (JSON and SSE) equal `moesh run`'s text; /v1/chat/completions on a
  model with a chat template (SmolLM2, when fetched) equals `moesh run --chat`;
- /v1/models, /health, /metrics (counters that match what was sent);
- refusals: bad fields (400 naming the field), unknown fields, prompts longer than the
  context, oversize bodies (413), malformed HTTP, wrong methods and routes;
- a client that disconnects mid-request has it cancelled and its KV blocks freed;
- overload: a full queue answers 503 with Retry-After, /health says "busy", and every
  accepted request completes;
- hundreds of connects and disconnects, then the server still answers correctly;
- SIGTERM: running requests finish, new ones are refused, exit 0.
Every wait is bounded; servers are killed in any case.

    .cache/venv/bin/python tests/clients/http_openai_test.py --moesh build/bin/moesh \\
        --model models/moesh-tiny-py [--chat-model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf]

Exit status: 0 passed, 1 failed.
"""

import argparse
import json
import os
import pathlib
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import openai

CONFIG = """[server]
max_sequences = {seqs}
kv_cache = "16MiB"
prefill_chunk = 16
max_queue = {queue}
max_tokens = 512
max_message_bytes = 65536
drain_timeout_s = 20
http_request_timeout_s = 3
[runtime]
max_batch = 32
"""
THREADS = "2"
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


class Server:
    """`moesh serve` with a config, its ZeroMQ endpoint and HTTP URL read from stdout."""

    def __init__(self, moesh, model, tmp, name, seqs=4, queue=64, extra=(), server_lines=""):
        self.config = pathlib.Path(tmp) / f"{name}.toml"
        self.config.write_text(CONFIG.format(seqs=seqs, queue=queue).replace("[runtime]", server_lines + "[runtime]"))
        self.log_path = pathlib.Path(tmp) / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([moesh, "serve", "--model", model, "--config", str(self.config),
                                          "--endpoint", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0", "--threads", THREADS,
                                          *extra],
                                         stdout=subprocess.PIPE, stderr=log)
        lines = self._read_lines(2, 90)
        self.endpoint = lines[0] if len(lines) == 2 else ""
        self.url = lines[1] if len(lines) == 2 else ""
        m = re.match(r"http://127\.0\.0\.1:(\d+)$", self.url)
        self.port = int(m.group(1)) if m else 0

    def _read_lines(self, n, timeout):
        buf = b""
        deadline = time.monotonic() + timeout
        while buf.count(b"\n") < n and time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    break
                buf += chunk
        return buf.decode(errors="replace").split("\n")[:n]

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()

    def log(self):
        return self.log_path.read_text(errors="replace")[-3000:]


def http(server, method, path, body=None, timeout=30, headers=None):
    """(status, headers, body text) of one request on its own connection."""
    req = urllib.request.Request(server.url + path, method=method,
                                 data=None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode()),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def raw(server, data, timeout=10, read=True):
    """Sends bytes on a fresh connection; what came back until the server closed or timeout."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and not out.startswith(b"HTTP/1.1 200"):
                head, _, rest = out.partition(b"\r\n\r\n")
                m = re.search(rb"Content-Length: (\d+)", head, re.I)
                if m and len(rest) >= int(m.group(1)):
                    break
        return out
    finally:
        s.close()


def metric(server, name):
    status, _, text = http(server, "GET", "/metrics")
    if status != 200:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def wait_for(pred, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def moesh_run(moesh, model, prompt, n, chat=False, extra=()):
    cmd = [moesh, "run", "--model", model, "--prompt", prompt, "-n", str(n), "--output", "json", "--threads", THREADS, *extra]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"moesh run failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def completions(moesh, model, srv):
    c = srv.client()
    n = 24
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:"]
    for p in prompts:
        ref = moesh_run(moesh, model, p, n)
        r = c.completions.create(model="any", prompt=p, max_tokens=n, temperature=0)
        ch = r.choices[0]
        # `moesh run` goes on past the end of sequence; the server stops there
        check(ref["text"].startswith(ch.text) and (ch.finish_reason == "stop" or ch.text == ref["text"]),
              f"greedy completion of {p!r} equals moesh run's: {ch.text!r} vs {ref['text']!r}")
        check(r.object == "text_completion" and r.id.startswith("cmpl-") and r.usage.completion_tokens <= n
              and r.usage.prompt_tokens == len(ref["prompt_ids"]), f"completion shape and usage: {r.usage}")
        chunks = list(c.completions.create(model="any", prompt=p, max_tokens=n, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        text = "".join(x.choices[0].text for x in chunks if x.choices)
        check(text == ch.text, f"streamed completion adds up to the whole one: {text!r}")
        finals = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
        check(finals == [ch.finish_reason], f"one closing chunk with the finish reason: {finals}")
        check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens,
              "include_usage: the last chunk carries the usage")
    ids = moesh_run(moesh, model, prompts[0], 8)["prompt_ids"]
    r = c.completions.create(model="any", prompt=ids, max_tokens=8, temperature=0)
    check(r.usage.prompt_tokens == len(ids), "a prompt of token ids is taken as ids")
    a = c.completions.create(model="any", prompt=prompts[0], max_tokens=12, temperature=0.9, seed=5)
    b = c.completions.create(model="any", prompt=prompts[0], max_tokens=12, temperature=0.9, seed=5)
    check(a.choices[0].text == b.choices[0].text, "sampling with a seed repeats")
    full = c.completions.create(model="any", prompt=prompts[0], max_tokens=n, temperature=0).choices[0].text
    cut = full.split()[2]   # a word that comes after some text
    stop = c.completions.create(model="any", prompt=prompts[0], max_tokens=n, temperature=0, stop=[cut])
    check(stop.choices[0].text == full[:full.index(cut)] and stop.choices[0].finish_reason == "stop",
          f"stop string {cut!r}: the text ends before it ({stop.choices[0].text!r})")

    models = c.models.list()
    check([m.id for m in models.data] == ["moesh-tiny-py"], f"/v1/models lists the model: {[m.id for m in models.data]}")
    # the shipped model has no chat template: a clear refusal
    try:
        c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        check(False, "chat on a model without a template is refused")
    except openai.BadRequestError as e:
        check("chat template" in str(e), f"chat without a template: 400 that says why ({e})")


def logprobs_and_penalties(moesh, model, srv):
    """Logprobs through the openai package, streamed and whole; penalised greedy text equals moesh run's.
    (Their values against transformers: ShippedModel tests in C++.)"""
    c = srv.client()
    p = "def fibonacci(n):"
    r = c.completions.create(model="any", prompt=p, max_tokens=16, temperature=0, logprobs=5)
    ch = r.choices[0]
    lp = ch.logprobs
    n = r.usage.completion_tokens
    check(lp is not None and len(lp.tokens) == n and len(lp.token_logprobs) == n and len(lp.top_logprobs) == n
          and len(lp.text_offset) == n, f"completions logprobs: an entry per token ({n})")
    check("".join(lp.tokens) == ch.text, f"the tokens' texts add up to the text: {lp.tokens}")
    check(all(a < b for a, b in zip(lp.text_offset, lp.text_offset[1:])) and lp.text_offset[0] == 0,
          f"text offsets rise from 0: {lp.text_offset}")
    # greedy: the sampled token is the most likely, and among its 5 (+1) alternatives
    check(all(len(t) in (5, 6) and t[tok] == max(t.values()) and abs(t[tok] - v) < 1e-6 and v <= 0
              for t, tok, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs)),
          f"greedy tokens are the top of their logprobs: {lp.top_logprobs[:2]}")
    chunks = list(c.completions.create(model="any", prompt=p, max_tokens=16, temperature=0, logprobs=5, stream=True))
    streamed = [x.choices[0].logprobs for x in chunks if x.choices and x.choices[0].logprobs]
    check([t for x in streamed for t in x.tokens] == lp.tokens
          and [v for x in streamed for v in x.token_logprobs] == lp.token_logprobs
          and [o for x in streamed for o in x.text_offset] == lp.text_offset,
          "streamed logprobs equal the whole answer's")
    # the same request over ZeroMQ (the C++ client) gives the same numbers
    out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--prompt", p, "-n", "16", "--logprobs", "5",
                          "--output", "json"], capture_output=True, text=True, timeout=60)
    d = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"logprobs": []}
    check([e["logprob"] for e in d["logprobs"]] == lp.token_logprobs,
          f"`moesh client --logprobs 5`: the done frame carries the same logprobs {out.stderr[-300:]}")
    check(all(e["bytes"] == list(e["text"].encode()) for e in d["logprobs"]), "each entry's bytes are its text's")
    # lm-eval's loglikelihood request: prompt and continuation echoed with their logprobs, one token generated
    # (its entry last); the continuation scores as it was generated (one prefill against decode steps: f16 KV,
    # other kernel paths, ~1e-4 apart; against transformers: the ShippedModel tests)
    ids = moesh_run(moesh, model, p, 1)["prompt_ids"]
    e = c.completions.create(model="any", prompt=[ids + d["tokens"]], max_tokens=1, echo=True, logprobs=1, temperature=0)
    el = e.choices[0].logprobs
    n_ctx = len(ids) + len(d["tokens"])
    check(e.usage.completion_tokens == 1 and e.usage.prompt_tokens == n_ctx and len(el.token_logprobs) == n_ctx + 1
          and el.token_logprobs[0] is None and el.top_logprobs[0] is None,
          f"echo: a logprob per prompt token (none for the first) and the generated one ({e.usage})")
    tail = el.token_logprobs[len(ids):-1]
    check(len(tail) == len(lp.token_logprobs) and max(abs(a - b) for a, b in zip(tail, lp.token_logprobs)) < 1e-3,
          f"the greedy continuation, scored, has the logprobs it was generated with: max difference "
          f"{max(abs(a - b) for a, b in zip(tail, lp.token_logprobs)):.3g}")
    check(all(t == max(top.values()) for t, top in zip(tail, el.top_logprobs[len(ids):-1])),
          "lm-eval's is_greedy holds for the greedy continuation")
    check(e.choices[0].text.startswith(p + ch.text), f"echo's text is the prompt's, then the completion's: {e.choices[0].text!r}")
    bad = [k for k in range(1, n_ctx) if not e.choices[0].text[el.text_offset[k]:].startswith(el.tokens[k])]
    check(not bad, f"each echoed token's text_offset points at its text in the echoed text (not at: {bad[:5]})")
    z = c.completions.create(model="any", prompt=ids, max_tokens=0, echo=True, logprobs=0, temperature=0)
    check(z.usage.completion_tokens == 0 and len(z.choices[0].logprobs.token_logprobs) == len(ids) and z.choices[0].text == p,
          "echo with max_tokens 0 scores the prompt alone")
    t = c.completions.create(model="any", prompt=p, max_tokens=0, echo=True)
    check(t.choices[0].text == p and t.choices[0].logprobs is None, f"echo without logprobs: the prompt's text ({t.choices[0].text!r})")
    # a logit bias that forces the end of sequence at once: no text, and its entry is the one logprob
    eos = c.completions.create(model="any", prompt=p, max_tokens=8, temperature=0, logprobs=2, logit_bias={"0": 100})
    check(eos.choices[0].finish_reason == "stop" and eos.choices[0].text == "" and eos.usage.completion_tokens == 0
          and len(eos.choices[0].logprobs.token_logprobs) == 1,
          f"logit_bias on the end-of-sequence token ends at once, its logprob kept: {eos.choices[0].logprobs}")
    pen = dict(frequency_penalty=0.5, presence_penalty=0.3)
    ref = moesh_run(moesh, model, p, 24, extra=["--frequency-penalty", "0.5", "--presence-penalty", "0.3",
                                                "--repetition-penalty", "1.2"])
    got = c.completions.create(model="any", prompt=p, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1.2},
                               **pen).choices[0].text
    plain = c.completions.create(model="any", prompt=p, max_tokens=24, temperature=0).choices[0].text
    check(ref["text"].startswith(got) and got != plain,
          f"penalised greedy completion equals moesh run's and differs from the plain one: {got!r} vs {plain!r}")
    try:
        c.completions.create(model="any", prompt=p, max_tokens=4, presence_penalty=2.5)
        check(False, "presence_penalty 2.5 is refused")
    except openai.BadRequestError as e:
        check("presence_penalty" in str(e) and "[-2, 2]" in str(e), f"presence_penalty out of range: 400 that says why ({e})")


def refusals(srv):
    c = srv.client()
    cases = [(dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=100000), "max_tokens"), (dict(temperature=-1), "temperature"),
             (dict(n=17), "n"), (dict(n=0), "n"), (dict(extra_body={"temprature": 0.5}), "temprature"), (dict(suffix="x"), "suffix"),
             (dict(extra_body={"top_k": -3}), "top_k")]
    for kw, param in cases:
        try:
            c.completions.create(model="any", prompt="def f():", **kw)
            check(False, f"{kw} is refused")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.body.get("param") == param and param in e.body.get("message", ""),
                  f"{kw}: 400 naming {param!r}: {e.body.get('message')!r}")
    try:
        c.completions.create(model="any", prompt="x " * 3000, max_tokens=4)
        check(False, "a prompt longer than the context is refused")
    except openai.BadRequestError as e:
        check(e.body.get("code") == "context_length_exceeded", f"long prompt: context_length_exceeded ({e.body.get('message')!r})")
    try:
        c.completions.create(model="any", prompt=[1, 2, 999999], max_tokens=4)
        check(False, "a token id outside the vocabulary is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "prompt[2]", f"bad token id: names prompt[2] ({e.body.get('message')!r})")

    status, _, body = http(srv, "POST", "/v1/completions", b"{not json")
    check(status == 400 and "invalid JSON" in body, f"malformed JSON: 400 invalid JSON ({status} {body[:120]})")
    status, _, body = http(srv, "POST", "/v1/completions", b'{"prompt": "' + b"x" * 70000 + b'"}')
    check(status == 413, f"oversize body: 413 ({status} {body[:120]})")
    status, headers, _ = http(srv, "GET", "/v1/completions")
    check(status == 405 and headers.get("Allow") == "POST", f"GET on a POST route: 405 with Allow ({status} {headers.get('Allow')})")
    status, _, body = http(srv, "GET", "/v2/nothing")
    check(status == 404 and "/v1/completions" in body, f"unknown route: 404 listing the routes ({status})")
    rng = random.Random(7)   # 300 connections of random bytes, some shaped like a request line, closed at once
    for i in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        if i % 3 == 0:
            junk = b"POST /v1/completions HTTP/1.1\r\nContent-Length: " + str(rng.randrange(10**9)).encode() + b"\r\n\r\n" + junk
        raw(srv, junk, read=False)
    check(http(srv, "GET", "/health")[0] == 200, "after 300 connections of random bytes the server is healthy")
    out = raw(srv, b"\x00\x01garbage\xff\r\n\r\n")
    check(out.startswith(b"HTTP/1.1 400"), f"binary garbage: 400 and close ({out[:40]!r})")
    out = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    check(out.startswith(b"HTTP/1.1 431"), f"oversize header: 431 ({out[:40]!r})")
    t0 = time.monotonic()
    out = raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", timeout=15)
    took = time.monotonic() - t0
    check(out == b"" and took < 10, f"a body that never arrives: closed after the request timeout ({took:.1f} s)")


def health_and_metrics(srv):
    status, _, body = http(srv, "GET", "/health")
    check(status == 200 and json.loads(body)["status"] == "ok", f"/health: 200 ok ({status} {body})")
    status, headers, text = http(srv, "GET", "/metrics")
    check(status == 200 and headers.get("Content-Type", "").startswith("text/plain; version=0.0.4"), "/metrics: Prometheus text")
    done = metric(srv, 'moesh_requests_total{outcome="completed"}')
    c = srv.client()
    r = c.completions.create(model="any", prompt="def f(x):", max_tokens=5, temperature=0)
    after = metric(srv, 'moesh_requests_total{outcome="completed"}')
    check(done is not None and after == done + 1, f"a completion counts once in moesh_requests_total ({done} -> {after})")
    _, _, text = http(srv, "GET", "/metrics")
    names = ["moesh_time_to_first_token_seconds_bucket", "moesh_inter_token_latency_seconds_count", "moesh_kv_blocks_total",
             "moesh_requests_queued", "moesh_expert_tokens_total{layer=\"0\"", 'moesh_http_responses_total{route="/v1/completions",status="200"}']
    for n in names:
        check(n in text, f"/metrics has {n}")
    steps = metric(srv, "moesh_forward_steps_total")
    check(steps > 0 and metric(srv, "moesh_step_duration_seconds_count") == steps and metric(srv, "moesh_step_tokens_count") == steps,
          f"one step duration and one step size observed per forward step ({steps})")
    step_tokens = metric(srv, "moesh_step_tokens_sum")
    fed = metric(srv, "moesh_prompt_tokens_total") + metric(srv, "moesh_generated_tokens_total")
    # a step runs prompt tokens and each decoding request's last token; a request's last token is never run
    check(steps <= step_tokens <= fed, f"steps ran {step_tokens:.0f} tokens: at least one a step, at most prompt + generated ({fed:.0f})")
    # The same long prompt twice: the second attaches the first's cached KV blocks, same answer.
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number, counting from zero."""\n    if n < 2:\n'
    hits = metric(srv, "moesh_prefix_cache_hit_tokens_total")
    a = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
    b = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
    hits2 = metric(srv, "moesh_prefix_cache_hit_tokens_total")
    check(hits is not None and hits2 >= hits + 16 and a.choices[0].text == b.choices[0].text,
          f"a prompt sent again reuses its cached start ({hits} -> {hits2} tokens) and gets the same text")
    routed = sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith('moesh_expert_tokens_total{layer="0"'))
    tokens = metric(srv, "moesh_prompt_tokens_total") + metric(srv, "moesh_generated_tokens_total")
    # every token goes through layer 0 with top-2 routing, except each request's last sampled token
    check(routed > 0 and routed <= 2 * tokens, f"expert load of layer 0 ({routed:.0f}) within 2 x tokens ({tokens:.0f})")
    del r


def disconnects(srv):
    before = metric(srv, 'moesh_requests_total{outcome="cancelled"}')
    body = json.dumps({"prompt": "def main():", "max_tokens": 500, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got = s.recv(4096)
    s.close()
    check(got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got, "a stream starts")
    ok = wait_for(lambda: metric(srv, 'moesh_requests_total{outcome="cancelled"}') == before + 1
                  and metric(srv, "moesh_kv_blocks_used") == 0)
    check(ok, "a client that leaves mid-stream has its request cancelled and its KV blocks freed")
    body = json.dumps({"prompt": "def main():", "max_tokens": 500, "temperature": 0}).encode()
    raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body, read=False)
    ok = wait_for(lambda: metric(srv, 'moesh_requests_total{outcome="cancelled"}') == before + 2
                  and metric(srv, "moesh_kv_blocks_used") == 0)
    check(ok, "a client that leaves while waiting for a whole answer has it cancelled too")

    for i in range(2000):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        if i % 3 == 0:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        s.close()
    r = srv.client().completions.create(model="any", prompt="def fibonacci(n):", max_tokens=8, temperature=0)
    check(r.usage.completion_tokens >= 1, "after 2000 connects and disconnects the server still answers")
    check(wait_for(lambda: metric(srv, "moesh_http_connections") <= 1, 10), "and holds no connection of theirs")


def overload(moesh, model, tmp):
    srv = Server(moesh, model, tmp, "busy", seqs=1, queue=1)
    try:
        if not check(srv.port > 0, f"second server up: {srv.url!r}"):
            return
        # One sequence and one queue place: of 6 requests sent at once, one runs, one waits, and the others
        # are answered 503 busy at once (a request takes ~0.4 s here; they all arrive within milliseconds).
        results, health = {}, []
        go = threading.Barrier(7)

        def long_request(i):
            go.wait(timeout=10)
            results[i] = http(srv, "POST", "/v1/completions", {"prompt": "def main():", "max_tokens": 500, "temperature": 0})

        def watch_health():
            go.wait(timeout=10)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(results) < 6:
                health.append(http(srv, "GET", "/health"))

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(6)] + [threading.Thread(target=watch_health)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(r[0] for r in results.values())
        busy = [r for r in results.values() if r[0] == 503]
        check(len(results) == 6 and statuses.count(200) >= 2 and statuses.count(200) + statuses.count(503) == 6 and busy,
              f"6 requests at once on 1 sequence + 1 queue place: 200s and 503s only, both kinds ({statuses})")
        check(all(r[1].get("Retry-After", "").isdigit() and 1 <= int(r[1]["Retry-After"]) <= 60
                  and json.loads(r[2])["error"]["code"] == "busy" for r in busy),
              f"each 503 says busy, with Retry-After in whole seconds ({sorted(set(r[1].get('Retry-After') for r in busy))})")
        check(all(len(json.loads(r[2])["choices"][0]["text"]) > 0 for r in results.values() if r[0] == 200),
              "every accepted request completes with its text: nothing lost")
        check(any(h[0] == 503 and json.loads(h[2])["status"] == "busy" for h in health),
              f"/health says busy (503) while the queue is full ({sorted(set(h[0] for h in health))})")
        try:
            r = srv.client().completions.create(model="any", prompt="x", max_tokens=4)
            check(r.usage.completion_tokens >= 1, "after the burst the server answers again")
        except openai.APIError as e:
            check(False, f"after the burst the server answers again ({e})")
    finally:
        srv.stop()


def expert_budget(moesh, model, tmp):
    """Serving with experts streamed from disk: the same tokens, and the host tier's counters in /metrics."""
    srv = Server(moesh, model, tmp, "budget", extra=("--expert-budget", "1MiB"))
    try:
        if not check(srv.port > 0, f"server with --expert-budget up: {srv.url!r}"):
            return
        p = "def fibonacci(n):"
        ref = moesh_run(moesh, model, p, 16)
        r = srv.client().completions.create(model="any", prompt=p, max_tokens=16, temperature=0)
        check(ref["text"].startswith(r.choices[0].text) and len(r.choices[0].text) > 0,
              f"with an expert budget the completion is unchanged: {r.choices[0].text!r}")
        misses = metric(srv, "moesh_expert_host_misses_total")
        requests = metric(srv, "moesh_expert_host_requests_total")
        check(misses is not None and misses > 0 and requests >= misses and metric(srv, "moesh_expert_disk_read_bytes_total") > 0,
              f"/metrics reports the host tier: {misses} misses of {requests}, bytes read from disk")
    finally:
        srv.stop()


def api_keys(moesh, model, tmp):
    """api_key_file: /v1/ routes need one of its keys (the openai SDK sends it as a Bearer token);
    /health and /metrics stay open."""
    keys = pathlib.Path(tmp) / "api_keys"
    keys.write_text("# the team's keys\nsk-moesh-test-0123456789\nsk-moesh-other-0123456789\n")
    srv = Server(moesh, model, tmp, "keys", server_lines=f'api_key_file = "{keys}"\n')
    try:
        if not check(srv.port > 0, f"server with api_key_file up: {srv.url!r}"):
            return
        base = dict(base_url=srv.url + "/v1", max_retries=0, timeout=60)
        try:
            openai.OpenAI(api_key="sk-moesh-test-012345678", **base).completions.create(model="m", prompt="x", max_tokens=2)
            check(False, "a wrong key is served")
        except openai.AuthenticationError as e:
            check(e.status_code == 401 and e.code == "invalid_api_key", f"a wrong key: the SDK raises AuthenticationError (401, {e.code})")
        r = openai.OpenAI(api_key="sk-moesh-other-0123456789", **base).completions.create(model="m", prompt="def f(", max_tokens=4)
        check(r.usage.completion_tokens == 4, "the second key of the file is served")
        models = openai.OpenAI(api_key="sk-moesh-test-0123456789", **base).models.list()
        check(len(models.data) == 1, "/v1/models with a key")
        status, headers, body = http(srv, "POST", "/v1/chat/completions", {"messages": []})
        check(status == 401 and headers.get("WWW-Authenticate") == "Bearer" and "Authorization: Bearer" in body,
              f"no key: 401 with WWW-Authenticate and what to send ({status}, {body[:120]})")
        status, _, body = http(srv, "GET", "/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        check(status == 401 and "not 'Bearer KEY'" in body, f"another scheme: 401 ({status})")
        check(http(srv, "GET", "/health")[0] == 200, "/health needs no key")
        status, _, text = http(srv, "GET", "/metrics")
        check(status == 200 and 'moesh_http_responses_total{route="/v1/completions",status="401"} 1' in text,
              "/metrics needs no key and counts the 401s by route")
        # SIGHUP reads the file again: a rotated key works at once, the old one no more
        keys.write_text("sk-moesh-rotated-0123456789\n")
        srv.proc.send_signal(signal.SIGHUP)
        check(wait_for(lambda: "moesh: reloaded: no CURVE, 1 API key(s)" in srv.log()), "SIGHUP: the server reloads its keys")
        try:
            openai.OpenAI(api_key="sk-moesh-test-0123456789", **base).models.list()
            check(False, "after the reload the old key is still served")
        except openai.AuthenticationError:
            check(True, "after the reload the old key gets 401")
        check(len(openai.OpenAI(api_key="sk-moesh-rotated-0123456789", **base).models.list().data) == 1, "and the new key is served")
    finally:
        srv.stop()


def chat(moesh, chat_model, tmp):
    srv = Server(moesh, chat_model, tmp, "chat")
    try:
        if not check(srv.port > 0, f"chat server up: {srv.url!r}"):
            return
        c = srv.client()
        for q in ["What is 2+2?", "Name a colour."]:
            ref = moesh_run(moesh, chat_model, q, 24, chat=True)
            r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
            m = r.choices[0].message
            check(m.role == "assistant" and ref["text"].startswith(m.content) and len(m.content) > 0,
                  f"greedy chat answer to {q!r} equals moesh run --chat's: {m.content!r} vs {ref['text']!r}")
            chunks = list(c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=24,
                                                    temperature=0, stream=True))
            text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
            check(text == m.content and chunks[0].choices[0].delta.role == "assistant",
                  f"streamed chat adds up, first delta has the role: {text!r}")
            check(r.choices[0].finish_reason in ("stop", "length"), f"finish reason {r.choices[0].finish_reason}")
            lr = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=24,
                                           temperature=0, logprobs=True, top_logprobs=3)
            content = lr.choices[0].logprobs.content
            check(len(content) == lr.usage.completion_tokens and lr.choices[0].message.content == m.content
                  and all(len(x.top_logprobs) == 3 and x.logprob == x.top_logprobs[0].logprob for x in content)
                  and b"".join(bytes(x.bytes) for x in content).decode() == m.content,
                  f"chat logprobs: an entry per message token (not the end of turn), greedy tokens on top, "
                  f"their bytes add up to the message ({len(content)} entries, {lr.usage.completion_tokens} tokens)")
        chat_choices(c)
        structured(moesh, chat_model, c, tmp)
        try:   # SmolLM2's own template shows no tools
            c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], tools=WEATHER, max_tokens=4)
            check(False, "tools for a template without them are refused")
        except openai.BadRequestError as e:
            check("does not take tools" in str(e), f"tools for a template without them: 400 that says so ({e})")
    finally:
        srv.stop()
    tools(moesh, chat_model, tmp)
    tool_formats(moesh, chat_model, tmp)
    reasoning(moesh, chat_model, tmp)


def choices(srv):
    """n choices on /v1/completions (the shipped model, whose kernels give a token the same result
    alone or batched): each choice its own sequence, batched together; the later ones start from
    the first's cached prompt. Greedy choices are the greedy answer n times; sampled ones follow
    seed, seed+1, ..."""
    c = srv.client()
    p = "Once upon a time there was a little fox who lived in the forest. " * 4   # a few KV blocks
    one = c.completions.create(model="any", prompt=p, max_tokens=16, temperature=0)
    hits = metric(srv, "moesh_prefix_cache_hit_tokens_total")
    three = c.completions.create(model="any", prompt=p, max_tokens=16, temperature=0, n=3)
    hits = metric(srv, "moesh_prefix_cache_hit_tokens_total") - hits
    check([x.index for x in three.choices] == [0, 1, 2] and all(x.text == one.choices[0].text for x in three.choices)
          and three.usage.prompt_tokens == one.usage.prompt_tokens and three.usage.completion_tokens == 3 * one.usage.completion_tokens,
          f"n=3 greedy: three choices, each the greedy answer; usage counts the prompt once and every completion: "
          f"{[x.text for x in three.choices]} vs {one.choices[0].text!r}, {three.usage}")
    check(hits >= 2 * 16 * (one.usage.prompt_tokens // 16 - 1),
          f"the later choices start from the first's cached prompt ({hits} prompt tokens from the prefix cache, "
          f"prompt {one.usage.prompt_tokens})")
    sampled = c.completions.create(model="any", prompt=p, max_tokens=12, temperature=1.0, seed=7, n=2)
    alone = [c.completions.create(model="any", prompt=p, max_tokens=12, temperature=1.0, seed=s).choices[0].text for s in (7, 8)]
    check([x.text for x in sampled.choices] == alone and alone[0] != alone[1],
          f"sampled choices follow seed, seed+1: {[x.text for x in sampled.choices]} vs {alone}")
    chunks = list(c.completions.create(model="any", prompt=p, max_tokens=12, temperature=1.0, seed=7, n=2, stream=True,
                                       stream_options={"include_usage": True}))
    texts = ["".join(x.choices[0].text for x in chunks if x.choices and x.choices[0].index == i) for i in (0, 1)]
    ends = sorted(x.choices[0].index for x in chunks if x.choices and x.choices[0].finish_reason)
    check(texts == alone and ends == [0, 1] and chunks[-1].usage.completion_tokens == 24,
          f"streamed n=2: each choice's chunks carry its index and its finish, adding up to the same texts; "
          f"usage covers both: {texts} {ends} {chunks[-1].usage}")


def several_prompts(srv):
    """A list of prompts on /v1/completions (the openai SDK's prompt=[...], lm-evaluation-harness
    with batch_size > 1): a choice per prompt (and per n), prompt-major, each what the prompt gets
    alone; usage counts each prompt once; streamed chunks carry their choice's index."""
    c = srv.client()
    ps = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:"]
    alone = [c.completions.create(model="any", prompt=p, max_tokens=10, temperature=0) for p in ps]
    r = c.completions.create(model="any", prompt=ps, max_tokens=10, temperature=0)
    check([x.index for x in r.choices] == [0, 1, 2] and [x.text for x in r.choices] == [a.choices[0].text for a in alone]
          and r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
          and r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone),
          f"three prompts: three choices, each the prompt's answer alone; usage adds up: {[x.text for x in r.choices]} {r.usage}")
    sampled = c.completions.create(model="any", prompt=ps[:2], max_tokens=8, temperature=1.0, seed=11, n=2)
    want = [c.completions.create(model="any", prompt=p, max_tokens=8, temperature=1.0, seed=s).choices[0].text
            for p in ps[:2] for s in (11, 12)]
    check([x.text for x in sampled.choices] == want,
          f"two prompts, n=2: choice i is prompt i // 2 with seed + i % 2: {[x.text for x in sampled.choices]} vs {want}")
    ids = [[5, 6, 7, 8], [9, 10]]
    chunks = list(c.completions.create(model="any", prompt=ids, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    texts = ["".join(x.choices[0].text for x in chunks if x.choices and x.choices[0].index == i) for i in (0, 1)]
    each = [c.completions.create(model="any", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in ids]
    check(texts == each and chunks[-1].usage.prompt_tokens == 6,
          f"token-id prompts, streamed: each choice's chunks add up to its answer; usage {chunks[-1].usage}")
    try:
        c.completions.create(model="any", prompt=["ok", [1, 999999]], max_tokens=4)
        check(False, "a bad second prompt is refused")
    except openai.BadRequestError as e:
        check("field 'prompt[1][1]'" in str(e) and e.body.get("param") == "prompt[1][1]", f"a bad second prompt: 400 naming it ({e})")
    try:
        c.completions.create(model="any", prompt=["ok", "x " * 2000], max_tokens=4)
        check(False, "a second prompt longer than the context is refused")
    except openai.BadRequestError as e:
        check(str(e).count("prompt 1: ") == 1 and e.code == "context_length_exceeded", f"too long a second prompt: 400 naming it ({e})")


def priority(moesh, model, srv):
    """vLLM's `priority` (lower runs first) is taken on /v1/completions; out of range it is a 400
    naming it. `moesh client --priority` sends it over ZeroMQ."""
    c = srv.client()
    r = c.completions.create(model="any", prompt="def f():", max_tokens=4, temperature=0, extra_body={"priority": -5})
    check(r.usage.completion_tokens == 4, f"a request with a priority is served: {r.usage}")
    try:
        c.completions.create(model="any", prompt="def f():", max_tokens=4, extra_body={"priority": 5000})
        check(False, "a priority out of range is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "priority", f"a priority out of range: 400 naming it ({e})")
    out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--prompt", "def f():", "-n", "4", "--priority", "-5",
                          "--temperature", "0", "--output", "json"], capture_output=True, text=True, timeout=60)
    d = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    check(d.get("type") == "done" and d.get("text") == r.choices[0].text,
          f"`moesh client --priority -5`: the same answer over ZeroMQ {out.stderr[-300:]}")
    out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--prompt", "x", "--priority", "2000"],
                         capture_output=True, text=True, timeout=60)
    check(out.returncode != 0 and "--priority" in out.stderr, f"`moesh client --priority 2000` is refused: {out.stderr[-200:]}")


def chat_choices(c):
    """n on chat: each choice a message, streamed with its role first and its own finish."""
    ask = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="smol", messages=ask, max_tokens=8, temperature=1.0, seed=3, n=2)
    chunks = list(c.chat.completions.create(model="smol", messages=ask, max_tokens=8, temperature=1.0, seed=3, n=2, stream=True))
    roles = [next((x.choices[0].delta.role for x in chunks if x.choices and x.choices[0].index == i), None) for i in (0, 1)]
    ends = sorted(x.choices[0].index for x in chunks if x.choices and x.choices[0].finish_reason)
    check([x.index for x in r.choices] == [0, 1] and all(x.message.role == "assistant" and x.message.content for x in r.choices)
          and roles == ["assistant", "assistant"] and ends == [0, 1],
          f"chat n=2: two messages; streamed, each choice's role first and its finish: {[x.message.content for x in r.choices]} "
          f"{roles} {ends}")


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def tools(moesh, chat_model, tmp):
    """Tool calling with OpenAI's SDK: SmolLM2 served with Qwen2.5's chat template (--chat-template),
    whose <tool_call> format moesh reads; tool_choice required/named make the call certain."""
    doc = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates" / "jinja.json").read_text())
    qwen = next(t["template"] for t in doc["templates"] if t["name"] == "Qwen-Qwen2.5-7B-Instruct")
    path = pathlib.Path(tmp) / "qwen25.jinja"
    # a line in front lets a request ask the template to fail, through chat_template_kwargs
    path.write_text("{% if fail_now is defined %}{{ raise_exception('failing as asked') }}{% endif %}" + qwen)
    srv = Server(moesh, chat_model, tmp, "tools", extra=("--chat-template", str(path)))
    try:
        if not check(srv.port > 0, f"server with --chat-template up: {srv.url!r}"):
            print(srv.log())
            return
        c = srv.client()
        q = "What is the capital of France?"
        ref = moesh_run(moesh, chat_model, q, 24, chat=True, extra=["--chat-template", str(path)])
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
        check(ref["text"].startswith(r.choices[0].message.content) and len(r.choices[0].message.content) > 0,
              f"--chat-template: the served answer equals moesh run --chat --chat-template's: "
              f"{r.choices[0].message.content!r} vs {ref['text']!r}")
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = c.chat.completions.create(model="smol", messages=ask, tools=WEATHER, tool_choice="required", max_tokens=80, temperature=0)
        ch = r.choices[0]
        calls = ch.message.tool_calls or []
        args = json.loads(calls[0].function.arguments) if calls else {}
        check(ch.finish_reason == "tool_calls" and ch.message.content is None and len(calls) == 1
              and calls[0].function.name in ("get_weather", "get_time") and calls[0].type == "function"
              and re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id or "") is not None,
              f"tool_choice required: one call, finish_reason tool_calls, no content: {ch.finish_reason} {ch.message}")
        if calls and calls[0].function.name == "get_weather":
            check(isinstance(args.get("city"), str) and args.get("unit") in ("celsius", "fahrenheit"),
                  f"the call's arguments are an instance of its parameters: {args}")
        named = c.chat.completions.create(model="smol", messages=ask, tools=WEATHER, max_tokens=80, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
        ncalls = named.choices[0].message.tool_calls or []
        nargs = json.loads(ncalls[0].function.arguments) if ncalls else {}
        check(len(ncalls) == 1 and ncalls[0].function.name == "get_weather" and set(nargs) == {"city", "unit"},
              f"tool_choice naming get_weather: that call, with its required arguments: {named.choices[0].message}")
        chunks = list(c.chat.completions.create(model="smol", messages=ask, tools=WEATHER, max_tokens=80, temperature=0,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
        deltas = [tc for x in chunks if x.choices for tc in (x.choices[0].delta.tool_calls or [])]
        finish = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
        text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
        streamed = streamed_calls(chunks, WEATHER)
        check(len(deltas) > 3 and deltas[0].index == 0 and deltas[0].function.name == "get_weather" and deltas[0].id
              and all(d.index == 0 and not d.id and not d.function.name for d in deltas[1:])
              and len(streamed) == 1 and streamed[0].function.name == "get_weather" and streamed[0].id == deltas[0].id
              and streamed[0].function.arguments == ncalls[0].function.arguments and finish == ["tool_calls"] and text == "",
              f"streamed: the call's id and name first, then its arguments in pieces as they are written, adding up (by the SDK's "
              f"own accumulator) to the call made without streaming; no text, finish tool_calls: {len(deltas)} deltas, {streamed} "
              f"{finish} {text!r}")
        # the C++ client: moesh client --chat --tools --tool-choice, over ZeroMQ
        tools_file = pathlib.Path(tmp) / "weather_tools.json"
        tools_file.write_text(json.dumps(WEATHER))
        out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--chat", "-p", ask[0]["content"], "--tools", str(tools_file),
                              "--tool-choice", "get_weather", "-n", "80", "--temperature", "0", "--output", "json"],
                             capture_output=True, text=True, timeout=60)
        done = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else {}
        ccalls = done.get("tool_calls", [])
        check(done.get("finish_reason") == "tool_calls" and len(ccalls) == 1 and ccalls[0]["function"]["name"] == "get_weather"
              and json.loads(ccalls[0]["function"]["arguments"]) == nargs,
              f"moesh client --chat --tools --tool-choice get_weather: the same call as the SDK's: {ccalls} {out.stderr[-300:]}")
        text_out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--chat", "-p", ask[0]["content"], "--tools",
                                   str(tools_file), "--tool-choice", "get_weather", "-n", "80", "--temperature", "0"],
                                  capture_output=True, text=True, timeout=60)
        check(text_out.returncode == 0 and "[call get_weather {" in text_out.stdout and "[tool_calls," in text_out.stdout,
              f"moesh client prints the call: {text_out.stdout!r}")
        streamed_out = subprocess.run([moesh, "client", "--endpoint", srv.endpoint, "--chat", "-p", ask[0]["content"], "--tools",
                                       str(tools_file), "--tool-choice", "get_weather", "-n", "80", "--temperature", "0", "--stream"],
                                      capture_output=True, text=True, timeout=60)
        check(streamed_out.returncode == 0 and f"[call get_weather {ccalls[0]['function']['arguments'] if ccalls else '?'}]"
              in streamed_out.stdout and "[tool_calls," in streamed_out.stdout,
              f"moesh client --stream prints the call as it is written, whole in the end: {streamed_out.stdout!r}")
        # the second turn: the call and its result go back, and the model answers in text
        turn = ask + [{"role": "assistant", "content": None, "tool_calls": [ncalls[0].model_dump()] if ncalls else []},
                      {"role": "tool", "tool_call_id": ncalls[0].id if ncalls else "x", "content": '{"temperature": 21}'}]
        second = c.chat.completions.create(model="smol", messages=turn, tools=WEATHER, tool_choice="none", max_tokens=16, temperature=0)
        check(second.choices[0].message.content is not None and not second.choices[0].message.tool_calls
              and second.choices[0].finish_reason in ("stop", "length"),
              f"tool results go back through the template; tool_choice none answers in text: {second.choices[0].message.content!r}")
        auto = c.chat.completions.create(model="smol", messages=ask, tools=WEATHER, max_tokens=48, temperature=0)
        a = auto.choices[0]
        check((a.finish_reason == "tool_calls") == bool(a.message.tool_calls) and "<tool_call>" not in (a.message.content or ""),
              f"tool_choice auto: calls when the model makes them, never a call left in the text: {a.finish_reason} {a.message}")
        try:
            c.chat.completions.create(model="smol", messages=ask, max_tokens=4, extra_body={"chat_template_kwargs": {"fail_now": True}})
            check(False, "a template's raise_exception refuses the request")
        except openai.BadRequestError as e:
            check("chat template: failing as asked" in str(e), f"raise_exception: 400 with the template's message ({e})")
        r = c.chat.completions.create(model="smol", messages=ask, max_tokens=4, temperature=0)
        check(r.choices[0].message.content is not None, "and the server goes on serving")
        bad = dict(WEATHER[0]["function"], parameters={"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z]"}}})
        try:
            c.chat.completions.create(model="smol", messages=ask, tools=[{"type": "function", "function": bad}],
                                      tool_choice="required", max_tokens=8)
            check(False, "a required call with a schema moesh cannot follow is refused")
        except openai.BadRequestError as e:
            check("tools[0].function.parameters at /properties/city: 'pattern' is not supported" in str(e),
                  f"the refusal names the tool's schema: {e}")
    finally:
        srv.stop()


def streamed_calls(chunks, tools):
    """A chat stream's tool calls as the openai SDK's own stream accumulator puts them together."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    state = ChatCompletionStreamState(input_tools=tools)
    for chunk in chunks:
        for _ in state.handle_chunk(chunk):
            pass
    return state.get_final_completion().choices[0].message.tool_calls or []


def tool_formats(moesh, chat_model, tmp):
    """The other call formats moesh reads, each with its real template on SmolLM2 (--chat-template):
    a forced call (named, or required with two tools) is a grammar of the format, and comes back
    as the call, whole and streamed. SmolLM2's tokenizer holds none of the formats' markers as
    special tokens, so they are text here, written a byte or two per token (hence max_tokens 200;
    tests/runtime/tool_calls_test.cpp has them as special tokens)."""
    doc = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates" / "tool_calls.json").read_text())
    # a system message keeps Mistral Small's long default one out of the test's small context
    ask = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    tools = [WEATHER[0], {"type": "function", "function": dict(WEATHER[1]["function"], description="The time now.")}]   # gpt-oss needs it
    seen = {"hermes"}   # tools() above
    for t in doc["templates"]:
        if t["format"] in seen:
            continue   # one template per format
        seen.add(t["format"])
        path = pathlib.Path(tmp) / (t["name"] + ".jinja")
        path.write_text(t["template"])
        srv = Server(moesh, chat_model, tmp, "fmt-" + t["format"], extra=("--chat-template", str(path)))
        try:
            if not check(srv.port > 0, f"{t['name']}: server up: {srv.url!r}"):
                print(srv.log())
                continue
            c = srv.client()
            r = c.chat.completions.create(model="smol", messages=ask, tools=tools, tool_choice=named, max_tokens=200, temperature=0)
            calls = r.choices[0].message.tool_calls or []
            args = json.loads(calls[0].function.arguments) if calls else {}
            check(r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None and len(calls) == 1
                  and calls[0].function.name == "get_weather" and set(args) == {"city", "unit"} and isinstance(args["city"], str),
                  f"{t['format']} ({t['name']}): a named call comes back as that call: {r.choices[0].message}")
            chunks = list(c.chat.completions.create(model="smol", messages=ask, tools=tools, tool_choice=named, max_tokens=200,
                                                    temperature=0, stream=True))
            deltas = [tc for x in chunks if x.choices for tc in (x.choices[0].delta.tool_calls or [])]
            text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
            streamed = streamed_calls(chunks, tools)
            check(len(deltas) > 3 and deltas[0].function.name == "get_weather" and len(streamed) == 1
                  and streamed[0].function.name == "get_weather" and streamed[0].function.arguments == calls[0].function.arguments
                  and text == "", f"{t['format']} streamed: the call in pieces as it is written, adding up to the same call, "
                                  f"no text: {len(deltas)} deltas, {streamed} {text!r}")
            r = c.chat.completions.create(model="smol", messages=ask, tools=tools, tool_choice="required", max_tokens=200, temperature=0)
            calls = r.choices[0].message.tool_calls or []
            check(r.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
                  and isinstance(json.loads(calls[0].function.arguments), dict),
                  f"{t['format']} required with two tools: one call to one of them: {r.choices[0].message}")
        except Exception as e:  # noqa: BLE001 - any escape is a failure, with what it was
            check(False, f"{t['name']}: unexpected {type(e).__name__}: {e}")
        finally:
            srv.stop()


def split_reply(c, ask, body, max_tokens, label, marker):
    """One whole and one streamed answer under a grammar (body): reasoning_content and content
    are both there, without the format's markers, and the streamed deltas add up to them."""
    r = c.chat.completions.create(model="smol", messages=ask, max_tokens=max_tokens, temperature=0, extra_body=body)
    m = r.choices[0].message
    thought = getattr(m, "reasoning_content", None)
    check(isinstance(thought, str) and len(thought) >= 3 and marker not in thought and thought == thought.strip()
          and m.content and marker not in m.content and m.content == m.content.lstrip(),
          f"{label}: the reasoning is reasoning_content, the rest the answer: {thought!r} / {m.content!r}")
    chunks = list(c.chat.completions.create(model="smol", messages=ask, max_tokens=max_tokens, temperature=0, extra_body=body,
                                            stream=True))
    streamed_thought = "".join(getattr(x.choices[0].delta, "reasoning_content", None) or "" for x in chunks if x.choices)
    streamed = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    check(streamed_thought == thought and streamed == m.content,
          f"{label} streamed: reasoning and answer add up: {streamed_thought!r} / {streamed!r}")


def reasoning(moesh, chat_model, tmp):
    """Reasoning as reasoning_content: SmolLM2 with Qwen3's template (<think> blocks) and with
    gpt-oss' (harmony channels; SmolLM2 writes the markers as plain text, gpt-oss has them as
    special tokens), a grammar (llama-server's field) making it write reasoning and an answer."""
    doc = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates" / "jinja.json").read_text())
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    for name, label, grammar, marker in [
            ("Qwen-Qwen3-0.6B", "<think>", 'root ::= "<think>\\n" [a-z ]{3,40} "\\n</think>\\n\\n" [A-Za-z ,.]{3,40}', "think>"),
            ("openai-gpt-oss-120b", "harmony", 'root ::= "<|channel|>analysis<|message|>" [a-z ]{3,30} '
                                               '"<|end|><|start|>assistant<|channel|>final<|message|>" [A-Za-z ,.]{3,30}', "<|")]:
        path = pathlib.Path(tmp) / f"{name}.jinja"
        path.write_text(next(t["template"] for t in doc["templates"] if t["name"] == name))
        srv = Server(moesh, chat_model, tmp, name, extra=("--chat-template", str(path)))
        try:
            if not check(srv.port > 0, f"server with {name}'s template up: {srv.url!r}"):
                continue
            c = srv.client()
            split_reply(c, ask, {"grammar": grammar}, 120, label, marker)
            if name.startswith("Qwen"):
                plain = c.chat.completions.create(model="smol", messages=ask, max_tokens=30, temperature=0,
                                                  extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                              "grammar": "root ::= [A-Za-z ,.]{3,30}"})
                check(getattr(plain.choices[0].message, "reasoning_content", None) is None and plain.choices[0].message.content,
                      f"enable_thinking false: the template closes the block, no reasoning: {plain.choices[0].message}")
        finally:
            srv.stop()


def structured(moesh, chat_model, c, tmp):
    """Structured output: the SDK's own parse() with a pydantic model (it writes the strict JSON
    Schema and reads the answer back), a raw json_schema equal to `moesh run --json-schema`'s
    greedy text, JSON mode, and llama-server's grammar field."""
    from typing import Literal

    import pydantic

    class Pet(pydantic.BaseModel):
        name: str
        species: Literal["cat", "dog", "bird"]
        age: int

    q = "Describe a cat named Tom who is 3 years old as JSON."
    r = c.chat.completions.parse(model="smol", messages=[{"role": "user", "content": q}], response_format=Pet,
                                 max_tokens=80, temperature=0)
    pet = r.choices[0].message.parsed
    check(isinstance(pet, Pet) and r.choices[0].finish_reason == "stop",
          f"openai's parse() with a pydantic model gets a Pet back: {pet!r} ({r.choices[0].finish_reason})")
    schema = Pet.model_json_schema()
    schema["additionalProperties"] = False
    path = pathlib.Path(tmp) / "pet.schema.json"
    path.write_text(json.dumps(schema))
    ref = moesh_run(moesh, chat_model, q, 80, chat=True, extra=["--json-schema", str(path)])
    raw = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=80, temperature=0,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "pet", "strict": True, "schema": schema}})
    text = raw.choices[0].message.content
    check(text == ref["text"] and list(json.loads(text)) == ["name", "species", "age"],
          f"response_format json_schema equals moesh run --chat --json-schema's text, keys in order: {text!r} vs {ref['text']!r}")
    chunks = list(c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=80,
                                            temperature=0, stream=True,
                                            response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}))
    check("".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == text, "streamed structured output adds up")
    jm = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "List three colours as JSON."}],
                                   max_tokens=120, temperature=0, response_format={"type": "json_object"})
    m = jm.choices[0].message.content
    ok = jm.choices[0].finish_reason == "length" and m.startswith("{")   # a long answer may be cut
    if jm.choices[0].finish_reason == "stop":
        ok = isinstance(json.loads(m), dict)
    check(ok, f"JSON mode: an object ({jm.choices[0].finish_reason}): {m[:80]!r}")
    g = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8,
                                  temperature=0, extra_body={"grammar": 'root ::= "yes" | "no"'})
    check(g.choices[0].message.content in ("yes", "no") and g.choices[0].finish_reason == "stop",
          f"llama-server's grammar field: {g.choices[0].message.content!r}")
    try:
        c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                  response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "a+"}}})
        check(False, "a schema with pattern is refused")
    except openai.BadRequestError as e:
        check("'pattern' is not supported" in str(e), f"a schema with pattern is refused by name: {e}")


def drain(srv):
    out = {}

    def streaming():
        try:
            chunks = list(srv.client().completions.create(model="any", prompt="def main():", max_tokens=200, temperature=0,
                                                          stream=True))
            out["text"] = "".join(x.choices[0].text for x in chunks if x.choices)
            out["finish"] = chunks[-1].choices[0].finish_reason
        except Exception as e:  # noqa: BLE001 - reported as a failure below
            out["error"] = repr(e)

    t = threading.Thread(target=streaming)
    t.start()
    wait_for(lambda: metric(srv, "moesh_requests_running") == 1, 10)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        refused = False
    except OSError:
        refused = True
    check(refused, "after SIGTERM new connections are refused")
    t.join(timeout=30)
    check("error" not in out and out.get("finish") in ("length", "stop"), f"the running stream finishes during the drain: {out}")
    try:
        rc = srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, f"exits 0 after the drain (exit status {rc})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chat-model", default="", help="a model with a chat template (skipped when absent)")
    args = ap.parse_args()
    print(f"openai {openai.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(args.moesh, args.model, tmp, "main")
        try:
            if not check(srv.port > 0, f"the server prints its ZeroMQ endpoint, then its HTTP URL: {srv.url!r}"):
                print(srv.log())
                return 1
            for part in (completions, logprobs_and_penalties, refusals, health_and_metrics, choices, several_prompts, priority, disconnects):
                try:
                    part(args.moesh, args.model, srv) if part in (completions, logprobs_and_penalties, priority) else part(srv)
                except Exception as e:  # noqa: BLE001 - any escape is a failure, with what it was
                    check(False, f"{part.__name__}: unexpected {type(e).__name__}: {e}")
            drain(srv)
        finally:
            srv.stop()
            if failures:
                print("--- server log ---\n" + srv.log())
        overload(args.moesh, args.model, tmp)
        expert_budget(args.moesh, args.model, tmp)
        api_keys(args.moesh, args.model, tmp)
        if args.chat_model and pathlib.Path(args.chat_model).exists():
            chat(args.moesh, args.chat_model, tmp)
        else:
            print(f"note: no chat model at {args.chat_model!r}; chat completions checked for refusal only", flush=True)
    print(f"{len(failures)} failed" if failures else "all passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
