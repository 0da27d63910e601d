#!/usr/bin/env python3
"""Concurrent-client load on `moesh serve`, or the same load on llama.cpp's llama-server.

    python3 scripts/bench/serve_load.py [--model models/moesh-tiny-py] [--config configs/serve.toml] \\
        [--clients 1,4,16,64] [--prompt-len 32] [--max-tokens 64] [--duration 30] [--requests 1000]
    python3 scripts/bench/serve_load.py --endpoint tcp://127.0.0.1:5555 ...      # a server already running
    python3 scripts/bench/serve_load.py --llama-server /work/llama-ref/build/bin/llama-server \\
        --model /work/llama-ref/models/moe/moe-small-q4_0.gguf --clients 1,4 --duration 10

For each C in --clients, C clients each send requests back to back (the next as soon as
the last is done) until --duration seconds have passed or each has sent --requests, and
finish the request in flight. Prompts are --prompt-len random token ids (from --seed and
the client's index, so every run and both engines see the same prompts), after
--shared-prefix ids common to every prompt (a system prompt: what a prefix cache saves), --max-tokens,
greedy, streamed so that time to first token is measured here, from send to the first
token's frame or event. One JSON line per C on stdout (progress on stderr):
  requests              completed requests (a done frame / a finished stream)
  errors                failed requests by code; "busy" is counted like any other, and
                        timeouts, HTTP statuses ("http_500") and broken connections too
  finish_reasons        of the completed requests (eos ends a request early; client_stop: the
                        client stopped it, --ask-max-tokens)
  decode_tokens_per_second   completion tokens of all completed requests / wall seconds
  ttft_ms, latency_ms   p50 and p99 over completed requests (latency: send to done)
  ttft_ms_after_first   the same over each client's later requests: all C clients send their
                        first request at once, so the first C requests queue behind each
                        other's prompts (a burst no steady state has); at C = 16 and
                        --duration 10 they are about a sixth of the requests, enough to set p99
  client_cpu_s          CPU seconds this script used during the run (user + system): what the
                        load took from the cores the server runs on
  server_ttft_ms        moesh only (null for llama.cpp): the done frame's timings.ttft_ms,
                        arrival to first token on the server's clock. moesh sends a token's
                        frame as soon as it is sampled, unless stop strings or the last token
                        make it wait for the next (server.cpp)
  server                how the server was run (config, or its command line) and what it says
All C clients run in one thread, one event loop (a zmq.Poller over their sockets): a frame is
timed when it arrives rather than when its thread next gets the interpreter, and the load
costs the server's cores little (threads, one per client, took 0.4 of a core at C = 16 on the
shipped model; see client_cpu_s). One warm-up request, not counted, goes first.
moesh: one server (--config, --threads) serves every C; each client has its own DEALER socket
and speaks docs/PROTOCOL.md (the ping goes through scripts/clients/python).
llama.cpp: one llama-server per C, with -np C slots and a context of C * (prompt + max
tokens + 64) so that every slot fits a request; driven through /v1/completions with
"prompt" as token ids and stream=true (a new connection per request: llama-server closes
kept-alive connections on its own terms). Non-200 answers are counted as errors ("http_500"),
with the first one's body under error_examples. Loopback only.
"""

import argparse
import collections
import heapq
import http.client
import json
import math
import os
import pathlib
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import zmq
except ImportError as e:   # main() says what to do
    zmq = None
    ZMQ_MISSING = str(e)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Stats:
    """One client thread's results; merged after the threads are joined."""

    def __init__(self):
        self.ttft, self.latency = [], []
        self.records = []            # --dump-requests: one dict per completed request
        self.ttft_after_first = []   # TTFTs of the client's requests after its first
        self.n_sent = 0              # requests this client has sent (done or not)
        self.server_ttft = []        # moesh: the done frame's timings.ttft_ms (the server's own clock)
        self.completion_tokens = 0
        self.errors = collections.Counter()
        self.error_examples = {}   # code -> the first such error's text (truncated)
        self.finish = collections.Counter()

    def done(self, ttft, latency, n_tokens, finish_reason, server_ttft=None, record=None):
        if server_ttft is not None:
            self.server_ttft.append(server_ttft)
        if record is not None:
            self.records.append({**record, "ttft_ms": ttft * 1000 if ttft is not None else None,
                                 "server_ttft_ms": server_ttft, "tokens": n_tokens})
        if ttft is not None:
            self.ttft.append(ttft * 1000)
            if self.n_sent > 1:
                self.ttft_after_first.append(ttft * 1000)
        self.latency.append(latency * 1000)
        self.completion_tokens += n_tokens
        self.finish[finish_reason] += 1

    def merge(self, other):
        self.ttft += other.ttft
        self.records += other.records
        self.ttft_after_first += other.ttft_after_first
        self.server_ttft += other.server_ttft
        self.latency += other.latency
        self.completion_tokens += other.completion_tokens
        self.errors.update(other.errors)
        for code, text in other.error_examples.items():
            self.error_examples.setdefault(code, text)
        self.finish.update(other.finish)


def percentile(values, p):
    """Nearest rank; None when there is nothing to rank."""
    if not values:
        return None
    v = sorted(values)
    return round(v[max(0, math.ceil(p / 100 * len(v)) - 1)], 3)


def prompts(seed, client, vocab, n, shared=0):
    """Endless prompts: the same `shared` random token ids for every client and request (a
    system prompt), then n of the client's own; ids below 16 (special tokens) left out."""
    lo = min(16, vocab - 1)
    common = random.Random(seed * 1_000_003 - 1)
    head = [common.randrange(lo, vocab) for _ in range(shared)]
    rng = random.Random(seed * 1_000_003 + client)
    while True:
        yield head + [rng.randrange(lo, vocab) for _ in range(n)]


def lengths(seed, client, args):
    """Endless max_tokens for one client's requests: --max-tokens, or with --max-tokens-spread S
    drawn uniformly from [M (1 - S), M (1 + S)] (the same mean), so that clients that started
    together do not finish together."""
    rng = random.Random(seed * 1_000_033 + client + 7)
    lo = max(1, round(args.max_tokens * (1 - args.max_tokens_spread)))
    hi = max(lo, round(args.max_tokens * (1 + args.max_tokens_spread)))
    while True:
        yield rng.randint(lo, hi) if hi > lo else lo


class Loop:
    """Every client of a phase in this one thread: a zmq.Poller over their sockets (ZeroMQ
    DEALERs and plain TCP sockets alike) and timers (request deadlines, busy retries). With one
    thread a frame is timed when it arrives, not when its thread next gets the interpreter, and
    the load takes little of the CPU the server needs (measured: client_cpu_s)."""

    def __init__(self):
        self.poller = zmq.Poller()
        self.handlers = {}   # socket -> callback when readable
        self.timers = []     # heap of (monotonic time, sequence, callback)
        self.seq = 0

    @staticmethod
    def key(sock):   # poll() names a plain socket by its descriptor
        return sock if isinstance(sock, zmq.Socket) else sock.fileno()

    def watch(self, sock, callback):
        self.poller.register(self.key(sock), zmq.POLLIN)
        self.handlers[self.key(sock)] = callback

    def unwatch(self, sock):
        if self.handlers.pop(self.key(sock), None) is not None:
            self.poller.unregister(self.key(sock))

    def later(self, when, callback):
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, callback))

    def run(self, busy, hard_stop):
        """Dispatches events while busy() and before hard_stop (monotonic seconds)."""
        while busy():
            now = time.monotonic()
            if now >= hard_stop:
                return
            while self.timers and self.timers[0][0] <= now:
                heapq.heappop(self.timers)[2]()
                now = time.monotonic()
            wait = min(hard_stop, self.timers[0][0] if self.timers else hard_stop) - now
            if not busy():
                return
            for sock, _ in self.poller.poll(max(0, math.ceil(wait * 1000))):
                handler = self.handlers.get(sock)
                if handler is not None:   # an earlier handler of this round may have closed it
                    handler()


class LoadClient:
    """One client: sends its next request as soon as the last one is over, until stop_at or
    --requests. Subclasses send a request (send) and read its answer (on_readable); each
    request has an id, so a late answer to one that timed out is told apart."""

    def __init__(self, index, st, stop_at, loop, vocab, args):
        self.index, self.st, self.stop_at, self.loop, self.args = index, st, stop_at, loop, args
        self.gen = prompts(args.seed, index, vocab, args.prompt_len, args.shared_prefix)
        self.lens = lengths(args.seed, index, args)
        self.active = True
        self.max_requests = args.requests   # run_phase sets its own (the warm-up's 1)
        self.rid = None   # the request in flight
        self.t0 = 0.0
        self.ttft = None

    def next_request(self):
        self.rid = None
        if time.monotonic() >= self.stop_at or self.st.n_sent >= self.max_requests:
            self.active = False
            self.close()
            return
        self.st.n_sent += 1
        self.rid = f"c{self.index}-{self.st.n_sent}"
        self.ttft = None
        self.t0 = time.monotonic()
        rid = self.rid
        self.loop.later(self.t0 + self.args.timeout, lambda: self.expire(rid))
        self.send(next(self.gen), next(self.lens))

    def first_token(self):
        if self.ttft is None:
            self.ttft = time.monotonic() - self.t0

    def completed(self, n_tokens, finish_reason, server_ttft=None):
        self.st.done(self.ttft, time.monotonic() - self.t0, n_tokens, finish_reason, server_ttft,
                     {"client": self.index, "sent_s": self.t0})
        self.next_request()

    def failed(self, code, example=None, retry_after_s=None):
        """Counts the request as failed; the next one goes out now, or after retry_after_s."""
        self.st.errors[code] += 1
        if example is not None:
            self.st.error_examples.setdefault(code, example[:300])
        self.rid = None
        self.abandon()
        if retry_after_s is None:
            self.next_request()
        else:   # as the server asks, but never past the end
            self.loop.later(min(time.monotonic() + retry_after_s, self.stop_at), self.next_request)

    def expire(self, rid):
        if self.rid == rid:
            self.failed("timeout")

    def abandon(self):
        """The request in flight is over for us (failed or timed out)."""

    def close(self):
        """The client is done."""


class ZmqLoadClient(LoadClient):
    """moesh's ZeroMQ protocol (docs/PROTOCOL.md) on the client's own DEALER socket."""

    def __init__(self, ctx, endpoint, *a):
        super().__init__(*a)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.args.curve_keys:
            server_pub, pub, sec = self.args.curve_keys
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = server_pub, pub, sec
        self.sock.connect(endpoint)
        self.loop.watch(self.sock, self.on_readable)

    def send(self, ids, max_tokens):
        # With --ask-max-tokens the request asks for more than the client reads: it stops the
        # request (cancel) after max_tokens tokens, as a chat user or an agent's stop rule does.
        self.want, self.got = max_tokens, 0
        asked = self.args.ask_max_tokens or max_tokens
        req = {"id": self.rid, "prompt_ids": ids, "max_tokens": asked, "temperature": 0, "stream": True}
        if self.args.priority is not None:
            req["priority"] = self.args.priority
        if self.args.logprobs is not None:
            req["logprobs"] = self.args.logprobs
        if self.args.grammar_text is not None:
            req["grammar"] = self.args.grammar_text
        self.sock.send(json.dumps(req).encode())

    def on_readable(self):
        # Asking for EVENTS costs less than the exception of a recv on an empty socket.
        while self.active and self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            body = self.sock.recv_multipart()[-1]   # [body] or [empty, body]
            try:
                f = json.loads(body)
                kind = f["type"]
            except (ValueError, TypeError, KeyError):
                self.failed("invalid_response", body.decode(errors="replace"))
                continue
            if f.get("id") != self.rid or self.rid is None:
                continue   # a late frame of a request that timed out
            if kind == "token":
                self.first_token()
                self.got += 1
                if self.args.ask_max_tokens and self.got >= self.want:
                    self.sock.send(json.dumps({"type": "cancel", "id": self.rid}).encode())
                    self.completed(self.got, "client_stop")
            elif kind == "done":
                self.completed(f["usage"]["completion_tokens"], f["finish_reason"], (f.get("timings") or {}).get("ttft_ms"))
            elif kind == "error":
                code = f.get("code") or "error"
                busy = code == "busy"
                self.failed(code, f.get("message"), (f.get("retry_after_ms") or 0) / 1000 if busy else None)

    def expire(self, rid):
        if self.rid == rid:   # free its KV blocks on the server; the not_found or done answer is ignored
            self.sock.send(json.dumps({"type": "cancel", "id": rid}).encode())
        super().expire(rid)

    def close(self):
        self.loop.unwatch(self.sock)
        self.sock.close(0)


class HttpLoadClient(LoadClient):
    """/v1/completions with stream=true on a new connection per request, read as it comes:
    llama-server (cpp-httplib) closes a kept-alive connection on its own terms, so reusing one
    would count a healthy request as a broken one. The request goes out in one write (two small
    writes meet Nagle's algorithm and delayed ACKs: a 40 ms stall)."""

    def __init__(self, port, *a):
        super().__init__(*a)
        self.port = port
        self.sock = None
        self.resp = None

    def send(self, ids, max_tokens):
        req = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
        if self.args.logprobs is not None:
            req["logprobs"] = self.args.logprobs
        if self.args.grammar_text is not None:
            req["grammar"] = self.args.grammar_text   # llama-server takes the same field
        body = json.dumps(req).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            # Connecting on loopback costs ~0.1 ms and is inside the measured time, as for a
            # client that does not pool connections.
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.args.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(head + body)
            self.sock.setblocking(False)
        except OSError as e:
            self.failed("connection_" + type(e).__name__)
            return
        self.resp = SseResponse()
        self.usage, self.finish, self.n_chunks = None, None, 0
        self.loop.watch(self.sock, self.on_readable)

    def on_readable(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.failed("connection_" + type(e).__name__)
            return
        try:
            events = self.resp.feed(data)
        except ValueError as e:
            self.failed("invalid_response", str(e))
            return
        if self.resp.status is not None and self.resp.status != 200:
            if self.resp.complete or not data:   # counted, never retried: llama-server answers some requests with 500
                self.failed(f"http_{self.resp.status}", self.resp.error_body.decode(errors="replace"))
            return
        for data_line in events:   # server-sent events: "data: {json}", then "data: [DONE]"
            if data_line == b"[DONE]":
                self.end()
                return
            try:
                ev = json.loads(data_line)
            except ValueError:
                self.failed("invalid_response", data_line.decode(errors="replace"))
                return
            if "error" in ev:
                err = ev["error"]
                self.failed("stream_" + str(err.get("type", "error") if isinstance(err, dict) else "error"), json.dumps(err))
                return
            if isinstance(ev.get("usage"), dict):
                self.usage = ev["usage"]
            choices = ev.get("choices") or []
            if not choices:
                continue
            self.first_token()
            if choices[0].get("finish_reason") is None:
                self.n_chunks += 1
            else:
                self.finish = choices[0]["finish_reason"]
        if self.resp.complete or not data:
            self.end()

    def end(self):
        if self.finish is None:
            self.failed("stream_incomplete")
            return
        u = self.usage
        n = u["completion_tokens"] if isinstance(u, dict) and "completion_tokens" in u else self.n_chunks
        self.abandon()
        self.completed(n, self.finish)

    def abandon(self):
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None


class SseResponse:
    """An HTTP/1.1 response read incrementally: status, headers, then a body framed by chunked
    transfer coding, Content-Length or the end of the connection; feed() returns the payloads
    of the body's "data: " lines so far. A non-200 body is kept (its first 300 bytes)."""

    def __init__(self):
        self.buf = b""
        self.status = None
        self.chunked = False
        self.length = None     # Content-Length, when given
        self.chunk_left = 0    # bytes of the current chunk still to come (chunked)
        self.complete = False
        self.text = b""        # body bytes not yet split into lines
        self.error_body = b""

    def feed(self, data):
        if not data:
            if self.status is None:
                raise ValueError("the connection closed before a complete response header")
            if self.chunked:
                return []   # cut short: the caller sees no [DONE] and no finish
            self.complete = True
            return self.lines(final=True)
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise ValueError("a response header over 64 KiB")
                return []
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.buf = self.buf[end + 4:]
            parts = head[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP/1.x status line: {head[0][:100]!r}")
            self.status = int(parts[1])
            for h in head[1:]:
                name, _, value = h.partition(":")
                name, value = name.strip().lower(), value.strip()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "content-length" and value.isdigit():
                    self.length = int(value)
        body = self.unframe()
        if self.status != 200:
            self.error_body = (self.error_body + body)[:300]
            return []
        self.text += body
        return self.lines(final=self.complete)

    def unframe(self):
        out = []
        if not self.chunked:
            out.append(self.buf)
            if self.length is not None:
                self.length -= len(self.buf)
                self.complete = self.length <= 0
            self.buf = b""
            return b"".join(out)
        while not self.complete:
            if self.chunk_left > 0:
                take = self.buf[:self.chunk_left]
                out.append(take)
                self.chunk_left -= len(take)
                self.buf = self.buf[len(take):]
                if self.chunk_left > 0:
                    break
                self.chunk_left = -2   # the CRLF after the chunk's data
            if self.chunk_left == -2:
                if len(self.buf) < 2:
                    break
                if self.buf[:2] != b"\r\n":
                    raise ValueError("a chunk's data is not followed by CRLF")
                self.buf = self.buf[2:]
                self.chunk_left = 0
            end = self.buf.find(b"\r\n")
            if end < 0:
                if len(self.buf) > 1024:
                    raise ValueError("a chunk size line over 1 KiB")
                break
            size = self.buf[:end].split(b";")[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise ValueError(f"a chunk size that is not hexadecimal: {size[:40]!r}") from None
            self.buf = self.buf[end + 2:]
            if n == 0:
                self.complete = True   # trailers, if any, are not read
            else:
                self.chunk_left = n
        return b"".join(out)

    def lines(self, final):
        *whole, self.text = self.text.split(b"\n")
        if final and self.text:
            whole.append(self.text)
            self.text = b""
        return [line.strip()[5:].strip() for line in whole if line.strip().startswith(b"data:")]


def run_phase(n_clients, make_client, args, index=None):
    """Runs n_clients clients (make_client(index, stats, stop_at, loop)) in one event loop;
    -> (merged Stats, wall seconds, CPU seconds this process used). index: every client uses
    that index's prompts (the warm-up's -1)."""
    loop = Loop()
    stats = [Stats() for _ in range(n_clients)]
    start = time.monotonic()
    cpu0 = os.times()
    stop_at = start + args.duration
    clients = [make_client(i if index is None else index, stats[i], stop_at, loop) for i in range(n_clients)]
    for c in clients:
        c.max_requests = args.requests   # make_client's args may be the run's, not this phase's
        c.next_request()
    # A client ends at most one request timeout after stop_at; a stuck one is reported, not waited for.
    loop.run(lambda: any(c.active for c in clients), stop_at + args.timeout + 10)
    wall = time.monotonic() - start
    cpu1 = os.times()
    total = Stats()
    for s in stats:
        total.merge(s)
    stuck = [c for c in clients if c.active]
    for c in stuck:
        c.abandon()
        c.close()
    if stuck:
        total.errors["client_stuck"] += len(stuck)
    return total, wall, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def report(engine, n_clients, total, wall, cpu, args, server):
    line = {
        "engine": engine,
        "clients": n_clients,
        "requests": len(total.latency),
        "errors": dict(sorted(total.errors.items())),
        "error_examples": dict(sorted(total.error_examples.items())),
        "finish_reasons": dict(sorted(total.finish.items())),
        "completion_tokens": total.completion_tokens,
        "wall_s": round(wall, 3),
        "decode_tokens_per_second": round(total.completion_tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": {"p50": percentile(total.ttft, 50), "p99": percentile(total.ttft, 99)},
        "ttft_ms_after_first": {"p50": percentile(total.ttft_after_first, 50),
                                "p99": percentile(total.ttft_after_first, 99)},
        "server_ttft_ms": {"p50": percentile(total.server_ttft, 50), "p99": percentile(total.server_ttft, 99)},
        "latency_ms": {"p50": percentile(total.latency, 50), "p99": percentile(total.latency, 99)},
        "client_cpu_s": round(cpu, 3),
        "prompt_len": args.prompt_len,
        "shared_prefix": args.shared_prefix,
        "max_tokens": args.max_tokens,
        "max_tokens_spread": args.max_tokens_spread,
        "ask_max_tokens": args.ask_max_tokens,
        "priority": args.priority,
        "logprobs": args.logprobs,
        "grammar": args.grammar,
        "duration_s": args.duration,
        "requests_per_client_max": args.requests,
        "server": server,
    }
    print(json.dumps(line), flush=True)
    if args.dump_requests:
        with open(args.dump_requests, "a") as f:
            for r in sorted(total.records, key=lambda r: r["sent_s"]):
                f.write(json.dumps({"engine": engine, "clients": n_clients, **r}) + "\n")


def wait_lines(proc, n, timeout):
    """The first n stdout lines of proc (fewer if they did not come within timeout seconds)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            buf += chunk
    return [line.strip() for line in buf.decode(errors="replace").split("\n")[:n]]


def stop_process(proc, what):
    """SIGTERM, a bounded wait, then SIGKILL; -> exit status (None if it had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log(f"serve_load: {what} ignored SIGTERM for 60 s; killing it")
            proc.kill()
            proc.wait(timeout=10)
            return None
    return proc.returncode


# -- moesh --

def moesh_vocab(args):
    if args.vocab:
        return args.vocab
    cfg = pathlib.Path(args.model) / "config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text())["vocab_size"])
    sys.exit(f"serve_load: {args.model} has no config.json to read the vocabulary size from; give --vocab")


def read_toml(path):
    try:
        import tomllib
    except ImportError:   # Python < 3.11: the text, for the record
        return {"text": pathlib.Path(path).read_text()}
    with open(path, "rb") as f:
        return tomllib.load(f)


def peak_rss_mb(pid):
    """The process's peak resident memory so far (VmHWM), in MB; None when it cannot be read."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def start_moesh(args, http):
    """moesh serve with --config; -> (process, its log file, command, [ZeroMQ endpoint, HTTP URL or ''])."""
    log_file = tempfile.NamedTemporaryFile(prefix="moesh-serve-", suffix=".log", delete=False)
    cmd = [args.moesh, "serve", "--model", args.model, "--config", args.config, "--endpoint", "tcp://127.0.0.1:*",
           "--http", "127.0.0.1:0" if http else "off"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log(f"serve_load: {' '.join(cmd)} (log: {log_file.name})")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file)
    lines = wait_lines(proc, 2 if http else 1, 120) + ["", ""]
    return proc, log_file, cmd, lines[:2]


def end_server(proc, log_file, what):
    """Stops the server; its log is kept (and named) only when it did not exit cleanly."""
    rc = stop_process(proc, what)
    if proc.stdout:
        proc.stdout.close()
    log_file.close()
    if rc == 0:
        os.unlink(log_file.name)
    else:
        log(f"serve_load: {what} exited with {rc}; see {log_file.name}")


def run_moesh_http(args, clients):
    """moesh serve driven through its OpenAI-compatible HTTP API, exactly as llama-server is."""
    vocab = moesh_vocab(args)
    proc, log_file, cmd, (_, url) = start_moesh(args, http=True)
    try:
        if not url.startswith("http://127.0.0.1:"):
            sys.exit(f"serve_load: moesh serve printed no HTTP URL within 120 s; see {log_file.name}")
        port = int(url.rsplit(":", 1)[1])
        server = {"model": args.model, "command": cmd, "config_file": args.config, "config": read_toml(args.config),
                  "url": url}
        make = http_clients(port, vocab, args)
        warm_up(make, args)
        for n in clients:
            log(f"serve_load: moesh (HTTP), {n} clients, {args.duration:g} s")
            total, wall, cpu = run_phase(n, make, args)
            server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("moesh-http", n, total, wall, cpu, args, server)
    finally:
        end_server(proc, log_file, "moesh serve")


def curve_config(args):
    """--curve: certificates for the server and one client key (pyzmq's zmq.auth) in a temporary
    folder, and a copy of --config whose [server] turns CURVE on and lets that key in."""
    import zmq.auth
    folder = pathlib.Path(tempfile.mkdtemp(prefix="serve-load-curve-"))
    (folder / "clients").mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(folder, "server")
    client_pub, client_sec = zmq.auth.create_certificates(folder / "clients", "load")
    text = pathlib.Path(args.config).read_text()
    keys = f'curve_secret_key = "{server_sec}"\ncurve_authorized_keys = "{folder / "clients"}"\n'
    text = text.replace("[server]\n", "[server]\n" + keys, 1) if "[server]\n" in text else text + "\n[server]\n" + keys
    config = folder / "serve.toml"
    config.write_text(text)
    args.config = str(config)
    args.curve_keys = (zmq.auth.load_certificate(server_pub)[0], *zmq.auth.load_certificate(client_sec))
    return server_pub, client_sec


def run_moesh(args, clients):
    sys.path.insert(0, str(ROOT / "scripts" / "clients" / "python"))
    from moesh_client import Client
    vocab = moesh_vocab(args)
    client_keys = {}
    if args.curve:
        if args.endpoint:
            sys.exit("serve_load: --curve starts its own server (it makes the keys); leave out --endpoint")
        server_pub, client_sec = curve_config(args)
        client_keys = {"server_key": server_pub, "client_key": client_sec}
    proc = None
    log_file = None
    server = {"model": args.model}
    if args.endpoint:
        endpoint = args.endpoint
        server["endpoint"] = endpoint
        server["started_here"] = False
    else:
        proc, log_file, cmd, (endpoint, _) = start_moesh(args, http=False)
        if not endpoint.startswith("tcp://"):
            stop_process(proc, "moesh serve")
            sys.exit(f"serve_load: moesh serve printed no endpoint within 120 s; see {log_file.name}")
        server.update(started_here=True, command=cmd, config_file=args.config, config=read_toml(args.config))
    try:
        with Client(endpoint, **client_keys) as c:
            server["info"] = c.ping(timeout=30).get("info")
        server["curve"] = bool(args.curve)
        ctx = zmq.Context.instance()

        def make(index, st, stop_at, loop):
            return ZmqLoadClient(ctx, endpoint, index, st, stop_at, loop, vocab, args)

        warm_up(make, args)

        for n in clients:
            log(f"serve_load: moesh, {n} clients, {args.duration:g} s")
            total, wall, cpu = run_phase(n, make, args)
            if proc is not None:
                server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("moesh", n, total, wall, cpu, args, server)
    finally:
        if proc is not None:
            end_server(proc, log_file, "moesh serve")


# -- llama.cpp --

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port, method, path, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_llama(args, n_clients):
    port = free_port()
    ctx = n_clients * (args.shared_prefix + args.prompt_len + math.ceil(args.max_tokens * (1 + args.max_tokens_spread)) + 64)
    cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_clients),
           "-c", str(ctx), "--no-webui"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    log(f"serve_load: {' '.join(cmd)} (log: {log_file.name})")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:   # /health: 503 while loading, 200 when ready
        if proc.poll() is not None:
            sys.exit(f"serve_load: llama-server exited with {proc.returncode}; see {log_file.name}")
        try:
            if http_json(port, "GET", "/health", 5)[0] == 200:
                return proc, port, cmd, log_file
        except OSError:
            pass
        time.sleep(0.25)
    stop_process(proc, "llama-server")
    sys.exit(f"serve_load: llama-server not ready within 180 s; see {log_file.name}")


def http_clients(port, vocab, args):
    def make(index, st, stop_at, loop):
        return HttpLoadClient(port, index, st, stop_at, loop, vocab, args)
    return make


def warm_up(make, args):
    """One request, not counted: pages the weights in."""
    once = argparse.Namespace(**{**vars(args), "requests": 1, "dump_requests": None})
    total, _, _ = run_phase(1, make, once, index=-1)
    if not total.latency:
        sys.exit(f"serve_load: the warm-up request failed: {dict(total.errors)} {total.error_examples}")


def run_llama(args, clients):
    if not os.path.isfile(args.llama_server) or not os.access(args.llama_server, os.X_OK):
        sys.exit(f"serve_load: no llama-server at {args.llama_server}")
    for n in clients:
        proc, port, cmd, log_file = start_llama(args, n)
        try:
            status, body = http_json(port, "GET", "/v1/models", 10)
            meta = json.loads(body)["data"][0].get("meta", {}) if status == 200 else {}
            vocab = args.vocab or meta.get("n_vocab")
            if not vocab:
                sys.exit(f"serve_load: llama-server did not say n_vocab (/v1/models: {status}); give --vocab")
            server = {"command": cmd, "model": args.model, "meta": meta}

            make = http_clients(port, vocab, args)
            warm_up(make, args)
            log(f"serve_load: llama.cpp, {n} clients, {args.duration:g} s")
            total, wall, cpu = run_phase(n, make, args)
            server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("llama.cpp", n, total, wall, cpu, args, server)
        finally:
            end_server(proc, log_file, "llama-server")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moesh", default=str(ROOT / "build" / "bin" / "moesh"), help="the moesh binary")
    ap.add_argument("--model", help="moesh: model folder (default: the shipped models/moesh-tiny-py); "
                                    "llama.cpp: the GGUF file (required)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "serve.toml"), help="moesh serve's TOML")
    ap.add_argument("--endpoint", help="drive this running moesh server instead of starting one")
    ap.add_argument("--llama-server", help="drive llama.cpp's llama-server (this binary) instead of moesh")
    ap.add_argument("--http", action="store_true",
                    help="drive moesh through its HTTP API (/v1/completions, SSE), as llama-server is driven")
    ap.add_argument("--curve", action="store_true",
                    help="moesh over ZeroMQ with CURVE: the server started here with fresh certificates and a "
                         "curve_authorized_keys list holding the clients' key (what encryption and the ZAP check cost)")
    ap.add_argument("--threads", type=int, help="server threads (default: the server's own default)")
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts, one run each")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request")
    ap.add_argument("--ask-max-tokens", type=int, metavar="D",
                    help="ZeroMQ: each request asks for D tokens, and the client stops it (cancel) once it has "
                         "its --max-tokens: answers that end before max_tokens, as most chat answers do")
    ap.add_argument("--priority", type=int, metavar="P",
                    help="ZeroMQ: every request's priority (lower runs first); run a second serve_load with "
                         "--endpoint and another priority beside it to measure what priorities do")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                    help="put the same N random tokens before every prompt (a system prompt; default 0)")
    ap.add_argument("--max-tokens-spread", type=float, default=0.0, metavar="S",
                    help="draw each request's max_tokens from [M (1 - S), M (1 + S)] (0 <= S < 1; default 0: every "
                         "request M, so clients that finish in the same step send again together)")
    ap.add_argument("--logprobs", type=int, metavar="K",
                    help="ask for each token's log-probability and the K most likely (default: none)")
    ap.add_argument("--grammar", metavar="FILE",
                    help="a GBNF grammar every request's output must match (sent as \"grammar\", which llama-server "
                         "takes too; default: none)")
    ap.add_argument("--duration", type=float, default=30, help="seconds each client keeps sending, per C")
    ap.add_argument("--requests", type=int, default=1000, help="requests per client at most, per C")
    ap.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    ap.add_argument("--dump-requests", metavar="FILE",
                    help="append one JSON line per completed request to FILE (engine, C, client, monotonic "
                         "send time, client and server TTFT, tokens), to see what sets the TTFT tail")
    ap.add_argument("--vocab", type=int, help="vocabulary size for the prompt ids (default: from the model/server)")
    args = ap.parse_args()
    args.grammar_text = None
    args.curve_keys = None   # (server public, client public, client secret) with --curve
    if args.grammar:
        with open(args.grammar, encoding="utf-8") as f:
            args.grammar_text = f.read()
    if zmq is None:
        sys.exit(f"serve_load: needs pyzmq ({ZMQ_MISSING}): apt install python3-zmq and use /usr/bin/python3, "
                 "or pip install pyzmq")

    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        sys.exit(f"serve_load: --clients: expected comma-separated integers, got {args.clients!r}")
    if any(c < 1 for c in clients) or args.shared_prefix < 0 or args.prompt_len < 1 or args.max_tokens < 1 or args.requests < 1 or args.duration <= 0:
        sys.exit("serve_load: --clients, --prompt-len, --max-tokens, --requests and --duration must be positive, "
                 "--shared-prefix not negative")
    if not 0 <= args.max_tokens_spread < 1:
        sys.exit(f"serve_load: --max-tokens-spread {args.max_tokens_spread}: must be in [0, 1)")
    if args.priority is not None and (args.http or args.llama_server):
        sys.exit("serve_load: --priority: with moesh over ZeroMQ")
    if args.ask_max_tokens is not None and (args.http or args.llama_server or args.ask_max_tokens < 1):
        sys.exit("serve_load: --ask-max-tokens: a positive count, with moesh over ZeroMQ (its cancel frame)")
    if args.endpoint and not args.endpoint.startswith(("tcp://127.0.0.1:", "tcp://localhost:", "ipc://")):
        sys.exit(f"serve_load: --endpoint {args.endpoint}: loopback only (tcp://127.0.0.1:PORT)")
    if args.llama_server:
        if not args.model:
            sys.exit("serve_load: --llama-server needs --model GGUF")
        run_llama(args, clients)
    else:
        args.model = args.model or str(ROOT / "models" / "moesh-tiny-py")
        (run_moesh_http if args.http else run_moesh)(args, clients)


if __name__ == "__main__":
    main()
