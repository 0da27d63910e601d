"""A Python client of `moesh serve` (docs/PROTOCOL.md): a ZeroMQ DEALER that sends
one JSON request per frame and reads the server's frames back.

    from moesh_client import Client, MoeshError

    with Client("tcp://127.0.0.1:5555") as c:
        done = c.generate(prompt="def add(a, b):", max_tokens=16)
        print(done["text"], done["finish_reason"])
        for frame in c.stream(prompt="def add(a, b):", max_tokens=16):
            print(frame["text"], end="")      # token frames, then the done frame

Several requests may be in flight on one Client (e.g. two stream() generators
advanced in turns): frames are matched by id, and frames that arrive for another
request wait in that request's queue. Leaving a stream() early, or a timeout,
cancels the request on the server.

A server with CURVE (its [server] curve_secret_key) needs its public key: server_key is
the 40-character Z85 key or the path of its NAME.key certificate. client_key is this
client's NAME.key_secret certificate (`moesh keygen`, or pyzmq's zmq.auth), needed when
the server lets in only listed keys; without it a fresh key pair is used. A refused
handshake raises HandshakeError saying why, instead of a timeout.

    with Client("tcp://10.0.0.5:5555", server_key="server.key", client_key="alice.key_secret") as c:
        ...

Thread safety: none; use one Client per thread (each has its own socket).
"""

import collections
import itertools
import json
import os
import time
import uuid

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

_MAX_ID_BYTES = 128   # the protocol's max_id_bytes


class MoeshError(Exception):
    """An error frame: code is the protocol's code ("busy", "bad_request", ...)."""

    def __init__(self, code, message, retry_after_ms=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class HandshakeError(ConnectionError):
    """The server refused this client's connection (CURVE key not let in, or CURVE on one
    side only); the message says which and what to do."""


def _z85_key(key, what):
    """A Z85 key (str or bytes), or a certificate file's public key."""
    if isinstance(key, (str, bytes)) and len(key) == 40 and not os.path.exists(key):
        return key.encode() if isinstance(key, str) else key
    public, _ = zmq.auth.load_certificate(key)
    if public is None:
        raise ValueError(f"{what}: no public key in {key!r}")
    return public


class _InFlight:
    def __init__(self):
        self.frames = collections.deque()
        self.answered = False    # has any frame arrived (see _owner_of_anonymous_error)
        self.cancels = 0         # cancel frames sent for it
        self.abandoned = False   # nobody waits for it any more: its frames are dropped


class Client:
    def __init__(self, endpoint, context=None, server_key=None, client_key=None):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._endpoint = endpoint
        self.public_key = None   # this client's CURVE public key (Z85 bytes), to give the server's operator
        if server_key is not None:
            if client_key is None:
                public, secret = zmq.curve_keypair()
            else:
                public, secret = zmq.auth.load_certificate(client_key)
                if secret is None:
                    raise ValueError(f"client_key: {client_key!r} holds no secret key (give the NAME.key_secret file)")
            self.public_key = public
            self._sock.curve_serverkey = _z85_key(server_key, "server_key")
            self._sock.curve_publickey = public
            self._sock.curve_secretkey = secret
        elif client_key is not None:
            raise ValueError("client_key goes with server_key")
        # Its own address: pyzmq's default names it by a file descriptor, which a closed
        # client's socket may still hold while libzmq tears it down.
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            addr=f"inproc://moesh-client-monitor-{uuid.uuid4().hex}")
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._sock.connect(endpoint)
        self._prefix = f"py-{uuid.uuid4().hex[:12]}-"
        self._counter = itertools.count()
        self._inflight = {}   # id -> _InFlight, in the order the requests were sent
        # Cancels whose answer will be a not_found error for a request already over;
        # counted so that such an answer never lands on a later request reusing the id.
        self._stale_not_found = collections.Counter()

    def close(self):
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def new_id(self):
        return self._prefix + str(next(self._counter))

    def generate(self, prompt=None, prompt_ids=None, messages=None, max_tokens=16, temperature=0, top_p=1, top_k=0,
                 seed=0, stop=None, id=None, timeout=60, logprobs=None, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, prompt_logprobs=None, logit_bias=None, echo=False,
                 grammar=None, json_schema=None, tools=None, tool_choice=None, chat_template_kwargs=None, priority=0):
        """The done frame as a dict; MoeshError on an error frame, TimeoutError when no
        answer came within timeout seconds (the request is then cancelled). logprobs=k
        (0..20) adds each token's log-probability and the k most likely tokens
        (docs/PROTOCOL.md), prompt_logprobs=k the same for the prompt's tokens (then
        max_tokens may be 0: score the prompt only), echo=True the prompt's text
        (prompt_text); the penalties are Hugging Face's repetition penalty and OpenAI's
        frequency and presence penalties, logit_bias {token id: bias} OpenAI's. grammar (GBNF
        text) or json_schema (a dict; properties are generated in its order) constrain the
        output; the request ends with finish_reason "stop" once the text is complete. With
        messages: tools (OpenAI's list of {"type": "function", "function": {...}}), tool_choice
        ("auto", "none", "required" or {"type": "function", "function": {"name": ...}}) and
        chat_template_kwargs (a dict for the chat template); the model's calls come back in the
        done frame's "tool_calls" with finish_reason "tool_calls". priority (-1000..1000, lower
        first) orders the server's queue; a better one may preempt worse running requests."""
        req = self._request(prompt, prompt_ids, messages, max_tokens, temperature, top_p, top_k, seed, stop, id, False,
                            logprobs, repetition_penalty, frequency_penalty, presence_penalty, prompt_logprobs, logit_bias, echo,
                            grammar, json_schema, tools, tool_choice, chat_template_kwargs, priority)
        deadline = time.monotonic() + timeout
        self._submit(req)
        try:
            while True:
                frame = self._next(req["id"], deadline)
                if frame["type"] == "done":
                    return frame
        except BaseException:
            self._abandon(req["id"])
            raise

    def stream(self, prompt=None, prompt_ids=None, messages=None, max_tokens=16, temperature=0, top_p=1, top_k=0,
               seed=0, stop=None, id=None, timeout=60, logprobs=None, repetition_penalty=1.0,
               frequency_penalty=0.0, presence_penalty=0.0, prompt_logprobs=None, logit_bias=None, echo=False,
               grammar=None, json_schema=None, tools=None, tool_choice=None, chat_template_kwargs=None, priority=0):
        """A generator of the token frames, then the done frame (dicts). Arguments are
        checked now; the request is sent on the first next(), and timeout bounds it
        from there to its done frame. Options as for generate()."""
        req = self._request(prompt, prompt_ids, messages, max_tokens, temperature, top_p, top_k, seed, stop, id, True,
                            logprobs, repetition_penalty, frequency_penalty, presence_penalty, prompt_logprobs, logit_bias, echo,
                            grammar, json_schema, tools, tool_choice, chat_template_kwargs, priority)
        return self._stream(req, timeout)

    def cancel(self, id):
        """Asks the server to end request id; returns at once. The request's own call then
        gets its done frame with finish_reason "cancelled". A cancel that finds nothing to
        cancel (the request was over) is answered with not_found, which is dropped."""
        self._send({"type": "cancel", "id": id})
        r = self._inflight.get(id)
        if r is not None:
            r.cancels += 1
        else:
            self._stale_not_found[id] += 1

    def ping(self, timeout=10):
        """The pong frame as a dict (its "info" describes the server)."""
        rid = self.new_id()
        self._submit({"type": "ping", "id": rid})
        try:
            return self._next(rid, time.monotonic() + timeout)
        except BaseException:
            self._abandon(rid, cancel=False)   # a ping has nothing to cancel
            raise

    # -- internals --

    def _request(self, prompt, prompt_ids, messages, max_tokens, temperature, top_p, top_k, seed, stop, rid, stream,
                 logprobs, repetition_penalty, frequency_penalty, presence_penalty, prompt_logprobs, logit_bias, echo,
                 grammar, json_schema, tools=None, tool_choice=None, chat_template_kwargs=None, priority=0):
        given = [(k, v) for k, v in (("prompt", prompt), ("prompt_ids", prompt_ids), ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_ids and messages")
        rid = self.new_id() if rid is None else rid
        # An id the server cannot read would come back as an error with a null id,
        # which no request could claim; refuse it here instead.
        if not (isinstance(rid, str) and 1 <= len(rid) <= _MAX_ID_BYTES and all(" " <= ch <= "~" for ch in rid)):
            raise ValueError(f"id must be 1 to {_MAX_ID_BYTES} printable ASCII characters, got {rid!r}")
        key, value = given[0]
        req = {"id": rid, key: [int(t) for t in value] if key == "prompt_ids" else value,
               "max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
               "top_k": int(top_k), "seed": int(seed), "stream": stream}
        if stop is not None:
            req["stop"] = stop
        if logprobs is not None:
            req["logprobs"] = int(logprobs)
        if prompt_logprobs is not None:
            req["prompt_logprobs"] = int(prompt_logprobs)
        if logit_bias:
            req["logit_bias"] = {str(int(t)): float(b) for t, b in logit_bias.items()}
        if echo:
            req["echo"] = True
        if int(priority) != 0:
            req["priority"] = int(priority)
        if grammar is not None and json_schema is not None:
            raise ValueError("give grammar or json_schema, not both")
        if grammar is not None:
            req["grammar"] = str(grammar)
        if json_schema is not None:
            req["json_schema"] = json_schema
        for k, v in (("tools", tools), ("tool_choice", tool_choice), ("chat_template_kwargs", chat_template_kwargs)):
            if v is not None:
                if messages is None:
                    raise ValueError(f"{k} needs messages (it is for the chat template)")
                req[k] = v
        for k, v, off in (("repetition_penalty", repetition_penalty, 1.0), ("frequency_penalty", frequency_penalty, 0.0),
                          ("presence_penalty", presence_penalty, 0.0)):
            if float(v) != off:
                req[k] = float(v)
        return req

    def _submit(self, req):
        if req["id"] in self._inflight:
            raise ValueError(f"request {req['id']!r} is still in flight on this client")
        self._inflight[req["id"]] = _InFlight()
        try:
            self._send(req)
        except BaseException:
            del self._inflight[req["id"]]
            raise

    def _stream(self, req, timeout):
        deadline = time.monotonic() + timeout
        self._submit(req)
        try:
            while True:
                frame = self._next(req["id"], deadline)
                yield frame
                if frame["type"] == "done":
                    return
        except BaseException:   # GeneratorExit too: the caller stopped reading
            self._abandon(req["id"])
            raise

    def _send(self, obj):
        # allow_nan=False: NaN is not JSON, and the server would refuse the frame with a null id
        self._sock.send(json.dumps(obj, allow_nan=False).encode())

    def _abandon(self, rid, cancel=True):
        r = self._inflight.get(rid)
        if r is None:
            return
        r.abandoned = True
        r.frames.clear()
        if cancel and r.cancels == 0:
            try:
                # Never blocks: with no connection to queue it on (a refused handshake), the
                # server has nothing of this request to cancel.
                self._sock.send(json.dumps({"type": "cancel", "id": rid}).encode(), zmq.NOBLOCK)
                r.cancels += 1
            except zmq.ZMQError:
                pass   # the socket is closed (the client is going away), or there is no connection

    def _next(self, rid, deadline):
        """The next frame of request rid (raising MoeshError for an error frame), reading
        the socket until deadline and queueing frames of other requests."""
        r = self._inflight[rid]
        while not r.frames:
            left = deadline - time.monotonic()
            ready = dict(self._poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if self._monitor in ready:
                self._handshake_failed(recv_monitor_message(self._monitor))
            if self._sock not in ready:
                if not ready:
                    raise TimeoutError(f"no answer to request {rid!r} in time")
                continue
            self._dispatch(self._sock.recv_multipart()[-1])   # [body] or [empty, body]
        frame = r.frames.popleft()
        if frame["type"] in ("done", "error", "pong"):
            self._finish(rid, frame)
        if frame["type"] == "error":
            raise MoeshError(frame.get("code"), frame.get("message", ""), frame.get("retry_after_ms"))
        return frame

    def _dispatch(self, body):
        try:
            frame = json.loads(body)
            ok = isinstance(frame, dict) and isinstance(frame.get("type"), str)
        except ValueError:
            ok = False
        if not ok:   # no id to go by: the call that read it fails
            raise MoeshError("invalid_response", f"the server sent a frame that is not a JSON object: {body[:200]!r}")
        fid = frame.get("id")
        if fid is None and frame["type"] == "error":
            fid = self._owner_of_anonymous_error()
        if frame["type"] == "error" and frame.get("code") == "not_found" and self._stale_not_found[fid] > 0:
            self._stale_not_found[fid] -= 1
            if self._stale_not_found[fid] == 0:
                del self._stale_not_found[fid]
            return
        r = self._inflight.get(fid)
        if r is None:
            return   # a late frame of a request already over
        r.answered = True
        if r.abandoned:
            if frame["type"] in ("done", "error", "pong"):
                self._finish(fid, frame)
            return
        r.frames.append(frame)

    def _handshake_failed(self, event):
        where = f"the server at {self._endpoint}"
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise HandshakeError(f"{where} refused this client's CURVE key (ZAP status {event['value']}): its operator "
                                 f"must add the public key {self.public_key.decode()} to its curve_authorized_keys")
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            raise HandshakeError(f"{where} does not use CURVE: connect without server_key" if self.public_key else
                                 f"{where} requires CURVE: give its public key (server_key)")
        raise HandshakeError(f"the handshake with {self._endpoint} failed: " +
                             ("is server_key its public key, and does it use CURVE?" if self.public_key
                              else "the server may require CURVE (give its public key as server_key)"))

    def _owner_of_anonymous_error(self):
        # The server answers with a null id when it cannot read the request (too_large):
        # the oldest request that has had no answer yet is the best guess the protocol allows.
        for rid, r in self._inflight.items():
            if not r.answered:
                return rid
        return None

    def _finish(self, rid, frame):
        r = self._inflight.pop(rid)
        took = 1 if frame["type"] == "done" and frame.get("finish_reason") == "cancelled" else 0
        if r.cancels > took:
            self._stale_not_found[rid] += r.cancels - took
        if self._stale_not_found[rid] <= 0:
            self._stale_not_found.pop(rid, None)
