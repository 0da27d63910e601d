#!/usr/bin/env python3
"""Concurrent-client load on `moesh serve`, or the same load on llama.cpp's llama-server.

    python3 scripts/bench/serve_load.py [--model models/moesh-tiny-py] [--config configs/serve.toml] \\
        [--clients 1,4,16,64] [--prompt-len 32] [--max-tokens 64] [--duration 30] [--requests 1000]
    python3 scripts/bench/serve_load.py --endpoint tcp://127.0.0.1:5555 ...      # a server already running
    python3 scripts/bench/serve_load.py --llama-server /work/llama-ref/build/bin/llama-server \\
        --model /work/llama-ref/models/moe/moe-small-q4_0.gguf --clients 1,4 --duration 10

For each C in --clients, C threads each send requests back to back (the next as soon as
the last is done) until --duration seconds have passed or each has sent --requests, and
finish the request in flight. Prompts are --prompt-len random token ids (from --seed and
the client's index, so every run and both engines see the same prompts), --max-tokens,
greedy, streamed so that time to first token is measured here, from send to the first
token's frame or event. One JSON line per C on stdout (progress on stderr):
  requests              completed requests (a done frame / a finished stream)
  errors                failed requests by code; "busy" is counted like any other, and
                        timeouts, HTTP statuses ("http_500") and broken connections too
  finish_reasons        of the completed requests (eos ends a request early)
  decode_tokens_per_second   completion tokens of all completed requests / wall seconds
  ttft_ms, latency_ms   p50 and p99 over completed requests (latency: send to done)
  ttft_ms_after_first   the same over each client's later requests: all C clients send their
                        first request at once, so the first C requests queue behind each
                        other's prompts (a burst no steady state has); at C = 16 and
                        --duration 10 they are about a sixth of the requests, enough to set p99
  server_ttft_ms        moesh only (null for llama.cpp): the done frame's timings.ttft_ms,
                        arrival to first token on the server's clock. moesh sends a token's
                        frame as soon as it is sampled, unless stop strings or the last token
                        make it wait for the next (server.cpp)
  server                how the server was run (config, or its command line) and what it says
moesh: one server (--config, --threads) serves every C; clients use their own DEALER
socket (scripts/clients/python). One warm-up request, not counted, goes first.
llama.cpp: one llama-server per C, with -np C slots and a context of C * (prompt + max
tokens + 64) so that every slot fits a request; driven through /v1/completions with
"prompt" as token ids and stream=true (plain http.client, a new connection per request:
llama-server closes kept-alive connections on its own terms). Non-200 answers are
counted as errors ("http_500"), with the first one's body under error_examples. Loopback only.
Python threads measure the client side too: at high C, token frames are parsed under the
GIL, which inflates TTFT a little for both engines alike.
"""

import argparse
import collections
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
import threading
import time

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

    def done(self, ttft, latency, n_tokens, finish_reason):
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


def prompts(seed, client, vocab, n):
    """Endless prompts of n random token ids; ids below 16 (special tokens) left out."""
    rng = random.Random(seed * 1_000_003 + client)
    lo = min(16, vocab - 1)
    while True:
        yield [rng.randrange(lo, vocab) for _ in range(n)]


def lengths(seed, client, args):
    """Endless max_tokens for one client's requests: --max-tokens, or with --max-tokens-spread S
    drawn uniformly from [M (1 - S), M (1 + S)] (the same mean), so that clients that started
    together do not finish together."""
    rng = random.Random(seed * 1_000_033 + client + 7)
    lo = max(1, round(args.max_tokens * (1 - args.max_tokens_spread)))
    hi = max(lo, round(args.max_tokens * (1 + args.max_tokens_spread)))
    while True:
        yield rng.randint(lo, hi) if hi > lo else lo


def run_phase(n_clients, worker, args):
    """Runs n_clients worker threads; -> (merged Stats, wall seconds)."""
    stats = [Stats() for _ in range(n_clients)]
    start = time.monotonic()
    stop_at = start + args.duration
    threads = [threading.Thread(target=worker, args=(i, stats[i], stop_at), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    # A worker ends at most one request timeout after stop_at; a stuck one is reported, not waited for.
    hard_stop = stop_at + args.timeout + 10
    for t in threads:
        t.join(max(0.0, hard_stop - time.monotonic()))
    wall = time.monotonic() - start
    total = Stats()
    for s in stats:
        total.merge(s)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        total.errors["client_stuck"] += stuck
    return total, wall


def report(engine, n_clients, total, wall, args, server):
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
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "max_tokens_spread": args.max_tokens_spread,
        "duration_s": args.duration,
        "requests_per_client_max": args.requests,
        "server": server,
    }
    print(json.dumps(line), flush=True)


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
        http_warm_up(port, vocab, args)
        for n in clients:
            log(f"serve_load: moesh (HTTP), {n} clients, {args.duration:g} s")
            total, wall = run_phase(n, http_worker(port, vocab, args), args)
            server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("moesh-http", n, total, wall, args, server)
    finally:
        end_server(proc, log_file, "moesh serve")


def run_moesh(args, clients):
    try:
        sys.path.insert(0, str(ROOT / "scripts" / "clients" / "python"))
        from moesh_client import Client, MoeshError
    except ImportError as e:
        sys.exit(f"serve_load: the moesh client needs pyzmq ({e}): apt install python3-zmq and use /usr/bin/python3, "
                 "or pip install pyzmq")
    vocab = moesh_vocab(args)
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
        with Client(endpoint) as c:
            server["info"] = c.ping(timeout=30).get("info")
            c.generate(prompt_ids=next(prompts(args.seed, -1, vocab, args.prompt_len)), max_tokens=args.max_tokens,
                       timeout=args.timeout)   # warm-up: page the weights in

        def worker(index, st, stop_at):
            with Client(endpoint) as c:
                gen = prompts(args.seed, index, vocab, args.prompt_len)
                lens = lengths(args.seed, index, args)
                for _ in range(args.requests):
                    if time.monotonic() >= stop_at:
                        return
                    t0 = time.monotonic()
                    st.n_sent += 1
                    ttft = None
                    try:
                        for f in c.stream(prompt_ids=next(gen), max_tokens=next(lens), timeout=args.timeout):
                            if ttft is None and f["type"] == "token":
                                ttft = time.monotonic() - t0
                            if f["type"] == "done":
                                server_ttft = (f.get("timings") or {}).get("ttft_ms")
                                if server_ttft is not None:
                                    st.server_ttft.append(server_ttft)
                                if args.dump_requests:
                                    st.records.append({"client": index, "sent_s": t0,
                                                       "ttft_ms": ttft * 1000 if ttft is not None else None,
                                                       "server_ttft_ms": server_ttft,
                                                       "tokens": f["usage"]["completion_tokens"]})
                                st.done(ttft, time.monotonic() - t0, f["usage"]["completion_tokens"], f["finish_reason"])
                    except MoeshError as e:
                        st.errors[e.code] += 1
                        if e.code == "busy":   # as the server asks, but never past the end
                            time.sleep(max(0.0, min((e.retry_after_ms or 0) / 1000, stop_at - time.monotonic())))
                    except TimeoutError:
                        st.errors["timeout"] += 1

        for n in clients:
            log(f"serve_load: moesh, {n} clients, {args.duration:g} s")
            total, wall = run_phase(n, worker, args)
            if proc is not None:
                server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("moesh", n, total, wall, args, server)
            if args.dump_requests:
                with open(args.dump_requests, "a") as f:
                    for r in sorted(total.records, key=lambda r: r["sent_s"]):
                        f.write(json.dumps({"clients": n, **r}) + "\n")
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
    ctx = n_clients * (args.prompt_len + math.ceil(args.max_tokens * (1 + args.max_tokens_spread)) + 64)
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


def llama_request(conn, ids, args, st, t0, max_tokens=None):
    """One streamed /v1/completions request on a new connection, closed after it; records it
    in st. Raises OSError and http.client.HTTPException when the connection breaks.
    Connections are not reused: llama-server (cpp-httplib) closes a kept-alive connection
    on its own terms (after a streamed response, or when idle), and http.client only notices
    when the next request's response fails (RemoteDisconnected), which would count a healthy
    request as a broken one."""
    # bytes, so that http.client sends headers and body in one write: two small writes meet
    # Nagle's algorithm and delayed ACKs (a 40 ms stall)
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens or args.max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json", "Connection": "close"})
    r = conn.getresponse()
    if r.status != 200:   # counted, never retried: llama-server answers some requests with 500
        code = f"http_{r.status}"
        st.errors[code] += 1
        st.error_examples.setdefault(code, r.read()[:300].decode(errors="replace"))
        return
    ttft = None
    n_chunks = 0
    usage = None
    finish = None
    for raw in r:   # server-sent events: "data: {json}" lines, then "data: [DONE]"
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if "error" in ev:
            err = ev["error"]
            st.errors["stream_" + str(err.get("type", "error") if isinstance(err, dict) else "error")] += 1
            r.read()
            return
        if isinstance(ev.get("usage"), dict):
            usage = ev["usage"]
        choices = ev.get("choices") or []
        if not choices:
            continue
        if ttft is None:
            ttft = time.monotonic() - t0
        if choices[0].get("finish_reason") is None:
            n_chunks += 1
        else:
            finish = choices[0]["finish_reason"]
    if finish is None:
        st.errors["stream_incomplete"] += 1
        return
    n = usage["completion_tokens"] if isinstance(usage, dict) and "completion_tokens" in usage else n_chunks
    st.done(ttft, time.monotonic() - t0, n, finish)


def http_warm_up(port, vocab, args):
    """One request, not counted: pages the weights in."""
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
    try:
        llama_request(warm, next(prompts(args.seed, -1, vocab, args.prompt_len)), args, Stats(), time.monotonic())
    finally:
        warm.close()


def http_worker(port, vocab, args):
    def worker(index, st, stop_at):
        gen = prompts(args.seed, index, vocab, args.prompt_len)
        lens = lengths(args.seed, index, args)
        for _ in range(args.requests):
            if time.monotonic() >= stop_at:
                return
            # A fresh connection per request (see llama_request); connecting on loopback
            # costs ~0.1 ms and is inside the measured time, as for a client that does not
            # pool connections.
            t0 = time.monotonic()
            st.n_sent += 1
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
            try:
                llama_request(conn, next(gen), args, st, t0, next(lens))
            except (socket.timeout, TimeoutError):
                st.errors["timeout"] += 1
            except (OSError, http.client.HTTPException, ValueError) as e:
                st.errors["connection_" + type(e).__name__] += 1
            finally:
                conn.close()
    return worker


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

            worker = http_worker(port, vocab, args)

            http_warm_up(port, vocab, args)
            log(f"serve_load: llama.cpp, {n} clients, {args.duration:g} s")
            total, wall = run_phase(n, worker, args)
            server["rss_peak_mb"] = peak_rss_mb(proc.pid)
            report("llama.cpp", n, total, wall, args, server)
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
    ap.add_argument("--threads", type=int, help="server threads (default: the server's own default)")
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts, one run each")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request")
    ap.add_argument("--max-tokens-spread", type=float, default=0.0, metavar="S",
                    help="draw each request's max_tokens from [M (1 - S), M (1 + S)] (0 <= S < 1; default 0: every "
                         "request M, so clients that finish in the same step send again together)")
    ap.add_argument("--duration", type=float, default=30, help="seconds each client keeps sending, per C")
    ap.add_argument("--requests", type=int, default=1000, help="requests per client at most, per C")
    ap.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    ap.add_argument("--dump-requests", metavar="FILE",
                    help="moesh over ZeroMQ: append one JSON line per completed request to FILE (client, "
                         "monotonic send time, client and server TTFT, tokens), to see what sets the TTFT tail")
    ap.add_argument("--vocab", type=int, help="vocabulary size for the prompt ids (default: from the model/server)")
    args = ap.parse_args()

    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        sys.exit(f"serve_load: --clients: expected comma-separated integers, got {args.clients!r}")
    if any(c < 1 for c in clients) or args.prompt_len < 1 or args.max_tokens < 1 or args.requests < 1 or args.duration <= 0:
        sys.exit("serve_load: --clients, --prompt-len, --max-tokens, --requests and --duration must be positive")
    if not 0 <= args.max_tokens_spread < 1:
        sys.exit(f"serve_load: --max-tokens-spread {args.max_tokens_spread}: must be in [0, 1)")
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
