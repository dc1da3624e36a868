"""The router benchmark's stand-in backend: an OpenAI-completions-shaped HTTP server that
answers at once (`python -m fleetwise.bench.router backend`).

A request that does not ask for a stream gets a small fixed completion. One that does
(`"stream": true`, as fleetwise's router asks every worker) gets `max_tokens` server-sent
events the way a fleetwise worker sends them: with each event's `fw:` token-id line when the
request carries `x-fleetwise-token-ids: 1` (with `x-fleetwise-coalesce: 1` too, the lines
alone with their text, held and merged as a worker holds them, and the text as one event at
the end), the usage event when asked, `[DONE]`. Each event carries `"t"`, the backend's
CLOCK_MONOTONIC at its write, so that the load generator can tell how long the event took to
reach it. Options: events paced `itl_s` apart (0: all at once), and then a whole answer of
`max_tokens` tokens sent when a stream of as many would end; a coalesced stream's ids in a
line per token, as workers of the release before sent them; every `fail_every`-th completion
answered 429 (a busy replica, which routers send elsewhere); the prefill role answers
fleetwise's `/internal/prefill` (and a completion whole, as vllm-router's prefill step asks),
the decode role `/internal/decode` as a stream. No KV moves: the two-hop benchmark measures
the router's hops, not a transfer.
"""

import asyncio
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from fleetwise.protocol import COALESCED_IDS_EVERY_S

MODEL = "bench-model"

COMPLETION = (b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
              + b'","choices":[{"index":0,"text":" the quick brown fox jumps over the lazy dog again and again",'
              b'"logprobs":null,"finish_reason":"length","stop_reason":null}],'
              b'"usage":{"prompt_tokens":96,"completion_tokens":16,"total_tokens":112}}')
MODELS = (b'{"object":"list","data":[{"id":"' + MODEL.encode()
          + b'","object":"model","created":0,"owned_by":"fleetwise-bench"}]}')
BUSY = b'{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"busy"}}'
PROMPT_IDS = list(range(1000, 1096))  # 96 prompt tokens, as COMPLETION's usage says
PREFILL = orjson.dumps({"handle": "bench-lease", "prompt_token_ids": PROMPT_IDS, "first_token": 7,
                        "model_id": MODEL, "kv_lease_seconds": 30.0})
DEFAULT_TOKENS = 16

_EVENT = (b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
          + b'","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":%s}],"t":%.6f}\n\n')
_USAGE = (b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
          + b'","choices":[],"usage":{"prompt_tokens":96,"completion_tokens":%d,"total_tokens":%d}}\n\n')
_FIRST_FW = (b'fw: {"index":0,"token_ids":[%d],"finish_reason":%s,"prompt_token_ids":'
             + orjson.dumps(PROMPT_IDS) + b',"id":"cmpl-bench","created":1700000000}\n')
_FW = b'fw: {"index":0,"token_ids":[%d],"finish_reason":%s}\n'
_TEXT = b' tok'  # each event's text
_MERGED = (b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
           + b'","choices":[{"index":0,"text":"%s","logprobs":null,"finish_reason":"length"}]}\n\n')
_DONE = b"data: [DONE]\n\n"
_STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def whole_completion(tokens: int) -> bytes:
    """A whole answer of `tokens` tokens, the text a coalesced stream of as many assembles to."""
    return (b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
            + b'","choices":[{"index":0,"text":"' + _TEXT * tokens + b'","logprobs":null,"finish_reason":"length"}],'
            b'"usage":{"prompt_tokens":96,"completion_tokens":%d,"total_tokens":%d}}' % (tokens, 96 + tokens))


@dataclass(frozen=True)
class Behaviour:
    itl_s: float = 0.0   # seconds between a stream's events (and per token of a whole answer); 0: at once
    fail_every: int = 0  # every k-th completion gets 429; 0: none
    role: str = "mixed"  # mixed | prefill | decode
    ids_per_token: bool = False  # a coalesced stream's `fw:` line per token, as workers of the release before


def _response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + (b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n") + body)


_FIXED = {
    (b"GET", b"/v1/models"): (b"200 OK", MODELS),
    (b"GET", b"/health"): (b"200 OK", b"{}"),
}
_GENERATE = {b"/v1/completions", b"/v1/chat/completions", b"/internal/decode", b"/internal/resume"}
_NOT_FOUND = (b"404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')


def stream_events(tokens: int, trace: bool, usage: bool, coalesce: bool = False, itl_s: float = 0.0,
                  ids_per_token: bool = False) -> list[bytes]:
    """The stream's pieces, one per token (each stamped when it is written: `%f` left to
    fill), then the usage event and [DONE] with the last. `coalesce` (with `trace`): the `fw:`
    lines alone, with their text and stamp, held and merged as a worker does
    (fleetwise/protocol.py): the first token's line at once, the others every
    COALESCED_IDS_EVERY_S at `itl_s` apart (b"": nothing written for that token) and at the
    end (`ids_per_token`: a line per token, as a worker of the release before); then the
    text as one event."""
    if trace and coalesce:
        every = 1 if ids_per_token else round(COALESCED_IDS_EVERY_S / itl_s) if itl_s > 0 else tokens
        return _coalesced(tokens, usage, every)
    out = []
    for k in range(tokens):
        finish = b'"length"' if k == tokens - 1 else b"null"
        fw = ((_FIRST_FW if k == 0 else _FW) % (7 + k, finish)) if trace else b""
        out.append(fw + _EVENT.replace(b"%s", finish, 1))
    out[-1] += (_USAGE % (tokens, 96 + tokens) if usage else b"") + _DONE
    return out


def _coalesced(tokens: int, usage: bool, every: int) -> list[bytes]:
    first = _FIRST_FW % (7, b'"length"' if tokens == 1 else b"null")
    out = [first[:-2] + b',"text":"' + _TEXT + b'","t":%.6f}\n\n']
    held: list[int] = []
    for k in range(1, tokens):
        held.append(7 + k)
        if len(held) < max(1, every) and k < tokens - 1:
            out.append(b"")
            continue
        finish = b'"length"' if k == tokens - 1 else b"null"
        out.append(b'fw: {"index":0,"token_ids":[%s],"finish_reason":%s,"text":"%s","t":%%.6f}\n\n'
                   % (b",".join(b"%d" % t for t in held), finish, _TEXT * len(held)))
        held = []
    out[-1] += (_MERGED % (_TEXT * tokens)).replace(b"%", b"%%")
    out[-1] += (_USAGE % (tokens, 96 + tokens) if usage else b"") + _DONE
    return out


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Backend(asyncio.Protocol):
    """HTTP/1.1 over asyncio with httptools: keep-alive, one request at a time per connection."""

    def __init__(self, behaviour: Behaviour, state: "_State") -> None:
        import httptools
        self.parser = httptools.HttpRequestParser(self)
        self.behaviour, self.state = behaviour, state
        self.transport: asyncio.Transport | None = None
        self.url, self.body, self.trace, self.coalesce = b"", b"", False, False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        import httptools
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(_response(b"400 Bad Request", b"{}", False))
                self.transport.close()

    def eof_received(self) -> bool:
        return False

    def on_message_begin(self) -> None:
        self.url, self.body, self.trace, self.coalesce = b"", b"", False, False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-fleetwise-token-ids" and value == b"1":
            self.trace = True
        elif name == b"x-fleetwise-coalesce" and value == b"1":
            self.coalesce = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        method, path = self.parser.get_method(), self.url.split(b"?", 1)[0]
        keep_alive = self.parser.should_keep_alive()
        if method == b"POST" and (path in _GENERATE or path == b"/internal/prefill"):
            self._generate(path, keep_alive)
        elif method == b"DELETE" and path.startswith(b"/internal/kv/"):
            self.transport.write(_response(b"200 OK", b"{}", keep_alive))
        else:
            status, body = _FIXED.get((method, path), _NOT_FOUND)
            self.transport.write(_response(status, body, keep_alive))
        if not keep_alive and self.transport is not None and not self.state.streaming(self):
            self.transport.close()

    def _generate(self, path: bytes, keep_alive: bool) -> None:
        assert self.transport is not None
        b = self.behaviour
        self.state.count += 1
        if b.fail_every and self.state.count % b.fail_every == 0:
            self.transport.write(_response(b"429 Too Many Requests", BUSY, keep_alive))
            return
        if path == b"/internal/prefill":
            self.transport.write(_response(b"200 OK", PREFILL, keep_alive))
            return
        body = orjson.loads(self.body) if self.body else {}
        request = body.get("request", body) if path.startswith(b"/internal/") else body
        tokens = max(1, int(request.get("max_tokens") or DEFAULT_TOKENS))
        if not request.get("stream") or b.role == "prefill":
            if b.itl_s > 0 and b.role == "mixed":  # generated as a stream would be, answered at its end
                answer = _response(b"200 OK", whole_completion(tokens), keep_alive)
                self.state.start(self, [b""] * (tokens - 1) + [answer], keep_alive, whole=True)
                return
            self.transport.write(_response(b"200 OK", COMPLETION, keep_alive))
            return
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        pieces = stream_events(tokens, self.trace, usage, self.coalesce, b.itl_s, b.ids_per_token)
        if b.itl_s <= 0:
            now = time.monotonic()
            self.transport.write(_STREAM_HEAD + b"".join(_chunk(p % now) for p in pieces if p)
                                 + b"0\r\n\r\n")
            return
        self.transport.write(_STREAM_HEAD)
        self.state.start(self, pieces, keep_alive)


class _State:
    """The backend's request count and its paced answers: one ticker writes the next event
    of every open stream each `itl_s` (one wake-up per tick, whatever the number of streams),
    and a whole answer when a stream of as many tokens would end."""

    def __init__(self, itl_s: float) -> None:
        self.count = 0
        self.itl_s = itl_s
        self.open: dict[_Backend, tuple[list[bytes], int, bool, bool]] = {}  # pieces, next, keep-alive, whole
        self.wake = asyncio.Event()

    def streaming(self, conn: _Backend) -> bool:
        return conn in self.open

    def start(self, conn: _Backend, pieces: list[bytes], keep_alive: bool, whole: bool = False) -> None:
        """`whole`: the last piece is a whole response, written as it is; the others are b""."""
        self._write(conn, pieces, 0, keep_alive, whole)
        self.wake.set()

    def _write(self, conn: _Backend, pieces: list[bytes], k: int, keep_alive: bool, whole: bool) -> None:
        t = conn.transport
        if t is None:
            self.open.pop(conn, None)
            return
        last = k + 1 == len(pieces)
        if whole:
            data = pieces[k]
        else:  # b"": a token whose line is held
            data = (_chunk(pieces[k] % time.monotonic()) if pieces[k] else b"") + (b"0\r\n\r\n" if last else b"")
        if data:
            t.write(data)
        if last:
            self.open.pop(conn, None)
            if not keep_alive:
                t.close()
        else:
            self.open[conn] = (pieces, k + 1, keep_alive, whole)

    async def tick(self) -> None:
        while True:
            if not self.open:
                self.wake.clear()
                await self.wake.wait()
            await asyncio.sleep(self.itl_s)
            for conn, (pieces, k, keep_alive, whole) in list(self.open.items()):
                self._write(conn, pieces, k, keep_alive, whole)


def serve_backend(host: str, port: int, behaviour: Behaviour = Behaviour()) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = _State(behaviour.itl_s)
        ticker = asyncio.create_task(state.tick()) if behaviour.itl_s > 0 else None
        server = await loop.create_server(lambda: _Backend(behaviour, state), host, port, backlog=2048,
                                          reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
        if ticker:
            ticker.cancel()
    run_loop(main())


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """The coroutine to its end, on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
