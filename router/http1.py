"""One client connection of the router's front door: HTTP/1.1 parsed with httptools, its
limits and timeouts, answers written in request order.

What a request may bring (`ConnectionLimits`, router/limits.py, and the constants here):
the head (URL and headers) at most `MAX_HEAD_BYTES` in at most `MAX_HEADERS` headers (431),
the completion body at most the router's `max_body_bytes` and other bodies at most
`MAX_OTHER_BODY_BYTES` (413 as soon as it is known), at most `MAX_PIPELINED` requests
queued (reading pauses). Time: the head must arrive whole within `head_timeout_s` of its
first byte, and the first request's within that of the connect (a client that connects and
sends nothing is closed, one that sent part of a head gets 408); the body within
`body_timeout_s` of the head's end (408); a keep-alive connection idle for `keep_alive_s`
closes. After a refusal that ends the connection, the rest of what the client sends is
read and dropped for `LINGER_S`. Deadlines are checked every `CHECK_S` or less.
"""

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import httptools
from starlette.responses import Response, StreamingResponse

from .limits import ConnectionLimits, _too_large
from .retries import RouterError

MAX_HEAD_BYTES = 64 << 10
MAX_HEADERS = 128
MAX_OTHER_BODY_BYTES = 1 << 20
MAX_PIPELINED = 32
LINGER_S = 2.0
CHECK_S = 0.25  # deadlines are checked this often (one sweep over the connections)

_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
IDLE, HEAD, BODY, BUSY = 0, 1, 2, 3  # what a connection waits for: its deadline's meaning


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

    @property
    def whole_body(self) -> bytes:  # what limits.read_body reads
        return self.body


class Site(Protocol):
    """What every connection shares (front.Door)."""
    conns: set["Connection"]
    refusing: set["Connection"]
    stopping: bool
    limits: ConnectionLimits
    max_body: int
    hot: dict[bytes, str]

    def serve(self, conn: "Connection", req: Incoming, keep: bool) -> Awaitable[None]: ...


class Connection(asyncio.Protocol):
    def __init__(self, site: Site):
        self.site = site
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Incoming] = deque()
        self.task: asyncio.Task | None = None
        self.streaming = self.paused = self.eof = self.began = False
        self.refused = False  # an answer that ends the connection is due: ignore the rest
        self.pending: Response | None = None  # that answer, while an earlier one is still written
        self.drained: asyncio.Future | None = None
        self.disconnected = self.loop.create_future()
        self.waiting, self.deadline = HEAD, 0.0
        self._begin()

    def _begin(self) -> None:
        self.url, self.size, self.head, self.declared = b"", 0, 0, b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.kind: str | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        site, limits = self.site, self.site.limits
        if len(site.conns) >= limits.max_connections:
            if len(site.refusing) >= limits.max_connections:
                transport.abort()  # a flood: no answer, no lingering socket
                return
            site.refusing.add(self)
            self.waiting = BUSY
            self._refuse(RouterError(503, f"the router is at its limit of {limits.max_connections} open "
                                     "connections; retry shortly", code="too_many_connections",
                                     headers={"Retry-After": "1"}, type_="server_error"))
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        site.conns.add(self)
        self.deadline = self.loop.time() + limits.head_timeout_s  # the first request's head, from the connect

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.conns.discard(self)
        self.site.refusing.discard(self)
        self.transport = None
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        if self.drained and not self.drained.done():
            self.drained.set_result(None)
        if self.task and self.streaming:
            self.task.cancel()  # the client left mid-stream: the relay ends, the upstream is released

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(RouterError(400, "upgrades are not supported"))
        except httptools.HttpParserError as e:
            self._refuse(RouterError(400, f"invalid HTTP request: {e}"))

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

    # -- deadlines ----------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Called every CHECK_S: the connection closed, or refused with 408, past its deadline."""
        if self.waiting == BUSY or now < self.deadline or self.transport is None:
            return
        if self.paused:  # not reading (requests queued): the client is not the slow one
            self.deadline = now + self.site.limits.head_timeout_s
        elif self.waiting == IDLE:
            if self.task is None:
                self.transport.close()
        elif self.waiting == HEAD and not self.began:
            self.waiting = BUSY
            self.transport.close()  # connected and sent nothing: nothing to answer
        else:
            limits = self.site.limits
            what, limit = ("head", limits.head_timeout_s) if self.waiting == HEAD else ("body", limits.body_timeout_s)
            self.waiting = BUSY
            self._refuse(RouterError(408, f"the request's {what} did not arrive whole within {limit:g} s",
                                     code="request_timeout"))

    def _wait(self, what: int, seconds: float) -> None:
        self.waiting, self.deadline = what, self.loop.time() + seconds

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begin()
        if not self.began:  # the first request's head counts from the connect, later ones from now
            self.began = True
        elif self.waiting != HEAD:
            self._wait(HEAD, self.site.limits.head_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.declared = value
        self.raw_headers.append((name, value))
        self.head += len(name) + len(value)
        if self.head > MAX_HEAD_BYTES:
            self._count(0)
        if len(self.raw_headers) > MAX_HEADERS:
            self._refuse(RouterError(431, f"at most {MAX_HEADERS} request headers"))

    def _count(self, n: int) -> None:
        self.head += n
        if self.head > MAX_HEAD_BYTES:
            self._refuse(RouterError(431, f"the request's URL and headers are larger than {MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        self._wait(BODY, self.site.limits.body_timeout_s)
        if self.parser.get_method() == b"POST":
            self.kind = self.site.hot.get(self.url.split(b"?", 1)[0])
        declared = self.declared
        if declared.isdigit() and int(declared) > self._limit():
            self._refuse(_too_large(self._limit()))

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.size += len(body)
        if self.size > self._limit():
            self._refuse(_too_large(self._limit()))
            return
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self.waiting = BUSY
        p = self.parser
        self.queue.append(Incoming(p.get_method(), self.url, p.get_http_version(), self.raw_headers,
                                   b"".join(self.parts), p.should_keep_alive(), self.kind))
        if len(self.queue) >= MAX_PIPELINED and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def _limit(self) -> int:
        return self.site.max_body if self.kind else MAX_OTHER_BODY_BYTES

    # -- refusals -----------------------------------------------------------------------------

    def _refuse(self, error: RouterError) -> None:
        """`error` answered once the answers before it are written, then the connection ends."""
        if self.refused:
            return
        self.refused = True
        self.queue.clear()
        self.pending = error.response()
        if self.task is None:
            self._end_refused()

    def _end_refused(self) -> None:
        if self.pending is not None:
            self.write_whole(self.pending, False, b"GET")
            self.pending = None
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

    # -- answering ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        """The queued requests in order (HTTP/1.1 answers in the order of the requests)."""
        try:
            while self.queue and self.transport is not None:
                req = self.queue.popleft()
                if self.paused and self.transport and len(self.queue) < MAX_PIPELINED:
                    self.paused = False
                    self.transport.resume_reading()
                keep = req.keep_alive and not self.site.stopping
                await self.site.serve(self, req, keep)
                if not keep and self.transport:
                    self.transport.close()
        finally:
            self.task = None
            if self.refused:
                self._end_refused()
            elif self.eof and self.transport:
                self.transport.close()
            elif not self.queue and self.waiting == BUSY and not self.site.stopping:
                self._wait(IDLE, self.site.limits.keep_alive_s)

    def _head(self, status: int, raw: list[tuple[bytes, bytes]], extra: bytes) -> bytearray:
        out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"")))
        for k, v in raw:
            out += k + b": " + v + b"\r\n"
        out += extra + b"\r\n"
        return out

    def write_whole(self, response: Response, keep: bool, method: bytes) -> None:
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

    async def write_stream(self, response: StreamingResponse, chunked: bool) -> None:
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
