"""The router's front door: HTTP/1.1 on the event loop with httptools, no ASGI server.

The two completion routes go from the parser straight to `Router.handle`: no ASGI scope,
no Starlette request or streaming response with its task group in between. They are every
request the router serves, and that stack cost about as much CPU per request as the
proxying itself. Every other request (models, health, metrics, the OpenAPI document, a
wrong method or path) goes whole to the same ASGI app the tests serve under uvicorn
(`app.build_app`), so those answers are Starlette's own.

Limits: request head (URL and headers) at most `MAX_HEAD_BYTES` (431), at most
`MAX_HEADERS` headers (431), the completion body at most the router's `max_body_bytes` (413
as soon as it is known, then the connection closes), other bodies at most
`MAX_OTHER_BODY_BYTES` (413), `MAX_PIPELINED` requests queued on one connection (reading
pauses), idle keep-alive connections closed after `KEEP_ALIVE_S`; after a refusal that ends the
connection, the rest of what the client sends read and dropped for `LINGER_S`.
"""

import asyncio
import logging
import signal
import socket
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from .limits import _too_large
from .proxy import Router
from .retries import RouterError

log = logging.getLogger(__name__)

HOT = {b"/v1/completions": "completion", b"/v1/chat/completions": "chat"}
MAX_HEAD_BYTES = 64 << 10
MAX_HEADERS = 128
MAX_OTHER_BODY_BYTES = 1 << 20
MAX_PIPELINED = 32
KEEP_ALIVE_S = 75.0  # longer than clients keep idle connections (aiohttp 15 s, httpx 5 s): a
# server that closes first races the client's reuse of the connection, which then fails
GRACE_S = 5.0
LINGER_S = 2.0

_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
Handle = Callable[[object, str], Awaitable[Response]]


class Headers:
    """The request's headers as Router.handle reads them: `get` by lower-case name."""
    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self.raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.encode()
        for k, v in self.raw:
            if k == key:
                return v.decode("latin-1")
        return default


@dataclass(slots=True)
class Incoming:
    method: bytes
    url: bytes
    version: str
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    kind: str | None

    @property
    def headers(self) -> Headers:
        return Headers(self.raw_headers)

    async def stream(self):  # what limits.read_body reads
        yield self.body


class Door:
    """What every connection shares: the Router, the ASGI app for the other routes, the
    open connections (for shutdown)."""

    def __init__(self, router: Router, app: ASGIApp, handle: Handle):
        self.router, self.app, self.handle = router, app, handle
        self.max_body = router.limits.max_body_bytes
        self.conns: set[Connection] = set()
        self.stopping = False


class Connection(asyncio.Protocol):
    def __init__(self, door: Door):
        self.door = door
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Incoming] = deque()
        self.task: asyncio.Task | None = None
        self.streaming = self.paused = self.eof = False
        self.refused = False  # an answer that ends the connection was written: ignore the rest
        self.drained: asyncio.Future | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.disconnected = self.loop.create_future()
        self._begin()

    def _begin(self) -> None:
        self.url, self.size, self.head = b"", 0, 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.kind: str | None = None


    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.door.conns.add(self)  # no idle timer before the first request, as uvicorn: a client
        # whose loop is behind writes its request well after its connect was accepted

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.conns.discard(self)
        self.transport = None
        if self.idle:
            self.idle.cancel()
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        if self.drained and not self.drained.done():
            self.drained.set_result(None)
        if self.task and self.streaming:
            self.task.cancel()  # the client left mid-stream: the relay ends, the upstream is released

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.idle.cancel()
            self.idle = None
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not supported")
        except httptools.HttpParserError as e:
            self._refuse(400, f"invalid HTTP request: {e}")

    def eof_received(self) -> bool:
        """The client sent all it will: what it asked is still answered, then the connection closes."""
        self.eof = True
        return self.task is not None

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None


    def on_message_begin(self) -> None:
        self._begin()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name.lower(), value))
        self._count(len(name) + len(value))
        if len(self.raw_headers) > MAX_HEADERS and not self.refused:
            self._refuse(431, f"at most {MAX_HEADERS} request headers")

    def _count(self, n: int) -> None:
        self.head += n
        if self.head > MAX_HEAD_BYTES and not self.refused:
            self._refuse(431, f"the request's URL and headers are larger than {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        if self.parser.get_method() == b"POST":
            self.kind = HOT.get(self.url.split(b"?", 1)[0])
        declared = Headers(self.raw_headers).get("content-length", "") or ""
        if declared.isdigit() and int(declared) > self._limit():
            self._too_large()

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.size += len(body)
        if self.size > self._limit():
            self._too_large()
            return
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        p = self.parser
        self.queue.append(Incoming(p.get_method(), self.url, p.get_http_version(), self.raw_headers,
                                   b"".join(self.parts), p.should_keep_alive(), self.kind))
        if len(self.queue) >= MAX_PIPELINED and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if self.task is None:
            self.task = self.loop.create_task(self._serve())


    def _limit(self) -> int:
        return self.door.max_body if self.kind else MAX_OTHER_BODY_BYTES

    def _too_large(self) -> None:
        response = _too_large(self._limit()).response()
        self._write_whole(response, False, b"POST")
        self._close_after_refusal()

    def _refuse(self, status: int, message: str) -> None:
        self._write_whole(RouterError(status, message).response(), False, b"GET")
        self._close_after_refusal()

    def _close_after_refusal(self) -> None:
        self.refused = True
        self.queue.clear()
        if self.task is None:
            self._linger()

    def _linger(self) -> None:
        """The answer, then our end closed for writing while what the client still sends is
        read and dropped for LINGER_S: a close with unread data would reset the connection,
        and the client might lose the answer before reading it."""
        t = self.transport
        if t is None:
            return
        if t.can_write_eof():
            t.write_eof()
        self.loop.call_later(LINGER_S, t.close)

    def _idle(self) -> None:
        if self.transport is not None and not self.door.stopping:
            self.idle = self.loop.call_later(KEEP_ALIVE_S, self._idle_close)

    def _idle_close(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()

    async def _serve(self) -> None:
        """The queued requests in order (HTTP/1.1 answers in the order of the requests)."""
        try:
            while self.queue and self.transport is not None:
                req = self.queue.popleft()
                if self.paused and self.transport and len(self.queue) < MAX_PIPELINED:
                    self.paused = False
                    self.transport.resume_reading()
                keep = req.keep_alive and not self.door.stopping
                if req.kind is not None:
                    await self._hot(req, keep)
                else:
                    await self._other(req, keep)
                if not keep and self.transport:
                    self.transport.close()
        finally:
            self.task = None
            if self.refused:
                self._linger()
            elif self.eof and self.transport:
                self.transport.close()
            elif not self.queue:
                self._idle()

    async def _hot(self, req: Incoming, keep: bool) -> None:
        assert req.kind is not None
        response = await self.door.handle(req, req.kind)
        if isinstance(response, StreamingResponse):
            await self._write_stream(response, keep and req.version == "1.1")
        else:
            self._write_whole(response, keep, req.method)

    def _head(self, status: int, raw: list[tuple[bytes, bytes]], extra: bytes) -> bytearray:
        out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"")))
        for k, v in raw:
            out += k + b": " + v + b"\r\n"
        out += extra + b"\r\n"
        return out

    def _write_whole(self, response: Response, keep: bool, method: bytes) -> None:
        if self.transport is None:
            return
        raw = response.raw_headers
        extra = b"" if keep else b"connection: close\r\n"
        if not any(k == b"content-length" for k, _ in raw):
            extra += b"content-length: %d\r\n" % len(response.body)
        out = self._head(response.status_code, raw, extra)
        if method != b"HEAD":
            out += response.body
        self.transport.write(out)

    async def _write_stream(self, response: StreamingResponse, chunked: bool) -> None:
        """The relay: each chunk written as it comes; writing waits while the client's
        buffer is full. A client that leaves cancels this (connection_lost)."""
        extra = b"transfer-encoding: chunked\r\n" if chunked else b"connection: close\r\n"
        t = self.transport
        if t is None:
            return
        t.write(self._head(response.status_code, response.raw_headers, extra))
        body = response.body_iterator
        self.streaming = True
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if isinstance(chunk, str):
                    chunk = chunk.encode()
                t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self.drained is not None:
                    await self.drained
                if self.transport is None:
                    return
            if chunked:
                t.write(b"0\r\n\r\n")
        finally:
            self.streaming = False
            await body.aclose()  # type: ignore[attr-defined]  # an async generator's: runs its finally
        if not chunked:
            t.close()

    async def _other(self, req: Incoming, keep: bool) -> None:
        """Through the ASGI app, answered whole."""
        path, _, query = req.url.partition(b"?")
        peer = self.transport.get_extra_info("peername") if self.transport else None
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": req.version,
                 "method": req.method.decode(), "scheme": "http", "root_path": "",
                 "path": unquote(path.decode("latin-1")), "raw_path": path, "query_string": query,
                 "headers": req.raw_headers, "server": None, "state": {},
                 "client": tuple(peer[:2]) if isinstance(peer, tuple) and len(peer) >= 2 else None}
        sent = [False]
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await self.disconnected
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.door.app(scope, receive, send)
        response = Response(b"".join(parts), status_code=start.get("status", 500))
        response.raw_headers = [(k.lower(), v) for k, v in start.get("headers", [])
                                if k.lower() not in (b"content-length", b"transfer-encoding")]
        self._write_whole(response, keep, req.method)


async def run_door(router: Router, app: ASGIApp, handle: Handle, host: str, port: int,
                   ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM or SIGINT (or `stop`), then lets requests in flight finish for up
    to GRACE_S seconds."""
    loop = asyncio.get_running_loop()
    door = Door(router, app, handle)
    await router.start()
    await router.probe_all()
    server = await loop.create_server(lambda: Connection(door), host, port, backlog=2048, reuse_address=True)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread: `stop` ends it
            pass
    if ready:
        ready()
    try:
        await stop.wait()
    finally:
        door.stopping = True
        server.close()
        for conn in list(door.conns):
            if conn.task is None and conn.transport:
                conn.transport.close()
        busy = [c.task for c in door.conns if c.task is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=GRACE_S)
            for task in late:
                task.cancel()
        for conn in list(door.conns):
            if conn.transport:
                conn.transport.close()
        await router.stop()
