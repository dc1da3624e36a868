"""A small pooled HTTP/1.1 client for the router's hot path (asyncio + httptools).

The router sends every request through here: keep-alive connections per replica, the
response head awaited, the body read whole or streamed chunk by chunk as it arrives.
General-purpose clients spend more CPU per request than the proxying itself.

Its errors say how far a request got, because that decides whether the router may send it
to another replica: `NotSent` (it never reached the replica), `NoAnswer` (the connection
closed before the response head), `UpstreamTimeout` (the replica may still be working on
it), any other `UpstreamError` (the answer broke off after its head). It speaks plain
HTTP only: an https:// replica is refused with a message that says so, never spoken to in
plain text.
"""

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import httptools

from .connect import connected_socket
from .replica import Replica

# A pooled connection that closes this soon after a request was written on it had been
# closed by the replica while idle (its close was on the way): the request never reached it.
# A later close is the replica failing with the request in hand, which is not retried.
STALE_CLOSE = 0.25
MAX_ADDRESSES = 4096  # replica URLs whose parsed address is kept


class UpstreamError(Exception):
    """The replica could not be reached or broke the response off."""


class NotSent(UpstreamError):
    """The request did not reach the replica: no connection, or a URL this client cannot speak."""


class NoAnswer(UpstreamError):
    """The connection closed before the response head."""


class UpstreamTimeout(UpstreamError):
    """The replica sent nothing for the read timeout; it may still be working on the request."""


def unsupported(url: str) -> str | None:
    """Why this client cannot speak to `url`, or None. TLS is not implemented here: an
    https:// replica is refused rather than spoken to in plain HTTP on port 80."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return (f"{url}: the router speaks plain http:// to replicas; {parts.scheme or 'no'}:// "
                f"is not supported (terminate TLS in front of the worker or use its http:// address)")
    if not parts.hostname:
        return f"{url}: no host"
    return None


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "Pool", key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.loop = asyncio.get_running_loop()  # kept: asking for it on every request costs a system call
        self.transport: asyncio.Transport  # set by connection_made, before create_connection returns
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] | None = None
        self.parts: list[bytes] = []  # the body that arrived and was not read yet
        self.end: Exception | bool | None = False  # after the parts: None (the end), the error, False (more)
        self.waiter: asyncio.Future[None] | None = None  # a reader waiting for the next chunk
        self.timer: asyncio.TimerHandle | None = None  # the read timeout, one per answer (`next_chunk`)
        self.deadline = 0.0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self.keep_alive = False  # read when the message completes: the parser resets after it
        self.closed = False
        self.sent_at = self.lost_at = 0.0  # loop time of the last request written, of the close
        self._header_name = b""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"bad response: {e}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_at = self.loop.time()
        if not self.complete:
            reason = f"connection closed: {exc or 'by the replica'}"
            self._fail(NoAnswer(reason) if self.status == 0 else UpstreamError(reason))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)
        if self.waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.end is False:
            self.end = None
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        if self.head is not None and self.end is False:
            self.end = exc
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_chunk(self, timeout: float) -> bytes | Exception | None:
        """The body that arrived since the last call (all of it, as one), else None at the
        end or the exception that broke the answer off. A future and one timer per answer,
        moved on lazily (not a Queue, asyncio.timeout or a timer per chunk): this runs for
        every chunk."""
        if not self.parts and self.end is False:
            loop = self.loop
            self.waiter = waiter = loop.create_future()
            self.deadline = loop.time() + timeout
            if self.timer is None:
                self.timer = loop.call_at(self.deadline, self._expire)
            try:
                await waiter
            finally:
                self.waiter = None
        parts = self.parts
        if parts:
            self.parts = []
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return self.end  # type: ignore[return-value]  # None or the error: False only while parts wait

    def _expire(self) -> None:
        """The read timeout: a reader still waiting past its deadline gets TimeoutError; one
        whose deadline moved on (it read since) is looked at again then."""
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        loop = self.loop
        if loop.time() >= self.deadline:
            waiter.set_exception(TimeoutError())
        else:
            self.timer = loop.call_at(self.deadline, self._expire)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- one exchange -------------------------------------------------------------------------

    def send(self, request: bytes) -> "asyncio.Future[None]":
        """Writes the request; the future is done when the response head has arrived."""
        loop = self.loop
        self.head, self.parts, self.end = loop.create_future(), [], False
        self.status, self.headers, self.complete, self.keep_alive = 0, {}, False, False
        self.sent_at = loop.time()
        self.transport.write(request)
        return self.head


def _expire(waiter: "asyncio.Future[None]") -> None:  # Pool._head's timer
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _done(waiter: "asyncio.Future[None]", head: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)
    elif not head.cancelled():
        head.exception()  # the wait was given up (cancelled): its error is nobody's, as with asyncio.shield


class Response:
    def __init__(self, conn: _Connection, pool: "Pool"):
        self._conn: _Connection | None = conn
        self._pool = pool
        self.status = conn.status
        self.content_type = conn.headers.get(b"content-type", b"application/json").decode("latin-1")
        self._done = False

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; raises UpstreamError if the replica breaks off. What
        arrived together goes on as one chunk: a reader that fell behind (a busy CPU)
        catches up in one step rather than one per event."""
        return _Chunks(self)

    async def read(self) -> bytes:
        conn = self._conn
        if conn is not None and conn.complete and conn.end is None:
            body = b"".join(conn.parts)  # all of it arrived (an answer, a refusal): no iterator needed
            conn.parts = []
            self._done = True
            return body
        return b"".join([chunk async for chunk in _Chunks(self)])

    def abort(self) -> None:
        """Breaks the exchange off: its reader gets an UpstreamError, the connection closes."""
        if self._conn is not None:
            self._conn.transport.close()

    def release(self) -> None:
        """Back to the pool when the body was read to the end on a keep-alive connection;
        otherwise the connection is closed."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.stop_timer()
        idle = self._pool._idle[conn.key]
        if (self._done and conn.complete and not conn.closed and conn.keep_alive
                and len(idle) < self._pool.max_idle):
            idle.append(conn)
        else:
            conn.transport.close()


class _Chunks:
    """`Response.iter_chunks`: an iterator object rather than an async generator, which the
    event loop would register (and finalize with a task of its own when left unfinished)."""
    __slots__ = ("resp",)

    def __init__(self, resp: Response):
        self.resp = resp

    def __aiter__(self) -> "_Chunks":
        return self

    async def __anext__(self) -> bytes:
        resp = self.resp
        if resp._done:
            raise StopAsyncIteration
        conn = resp._conn
        assert conn is not None, "read after release()"
        try:
            item = await conn.next_chunk(resp._pool.read_timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"the replica sent nothing for {resp._pool.read_timeout:g} s")
        if item is None:
            resp._done = True
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item


Late = Callable[[str, Response], Awaitable[None]]  # (the replica's URL, its late answer)


class Pool:
    def __init__(self, connect_timeout: float = 2.0, read_timeout: float = 600.0, max_idle_per_host: int = 64):
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = defaultdict(list)
        self._late: set[asyncio.Task] = set()  # answers waited for after a timeout
        self._addresses: dict[str, tuple[str, int]] = {}

    def _address(self, url: str) -> tuple[str, int]:
        """(host, port) of a replica's URL, parsed once; NotSent for one this client cannot speak."""
        address = self._addresses.get(url)
        if address is None:
            problem = unsupported(url)
            if problem:
                raise NotSent(problem)
            parts = urlsplit(url)
            if len(self._addresses) >= MAX_ADDRESSES:  # replicas come and go (pod IPs): stay bounded
                self._addresses.clear()
            address = self._addresses[url] = (parts.hostname or "", parts.port or 80)
        return address

    async def _connection(self, host: str, port: int) -> _Connection:
        idle = self._idle[(host, port)]
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            sock = await connected_socket(loop, host, port, self.connect_timeout)
        except (TimeoutError, OSError) as e:
            raise NotSent(f"cannot connect to {host}:{port}: {e or type(e).__name__}")
        _, conn = await loop.create_connection(lambda: _Connection(self, (host, port)), sock=sock)
        return conn

    async def post(self, url: str, path: str, body: bytes, headers: bytes = b"",
                   late: Late | None = None) -> Response:
        """Sends the request and waits for the response head. `headers`: more header lines,
        each ending in CRLF. `late`: after a timeout the connection is kept and the answer,
        when it comes (within another read timeout), goes to `late` (say, to undo its effect)."""
        host, port = self._address(url)
        for attempt in (0, 1):
            conn = await self._connection(host, port)
            reused = conn.head is not None
            head = conn.send(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n%s"
                      b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), port, headers, len(body), body))
            try:
                await self._head(head, late is not None)
            except TimeoutError:
                if late is None:
                    conn.transport.close()
                else:
                    self._wait_late(url, conn, head, late)
                raise UpstreamTimeout(f"no response from {host}:{port} in {self.read_timeout:g} s")
            except UpstreamError as e:
                conn.transport.close()
                if reused and attempt == 0 and isinstance(e, NoAnswer) and conn.lost_at - conn.sent_at < STALE_CLOSE:
                    continue  # an idle connection the replica had closed: the request never reached it
                raise
            return Response(conn, self)
        raise UpstreamError("unreachable")

    async def _head(self, head: "asyncio.Future[None]", keep: bool) -> None:
        """The response head, or TimeoutError after the read timeout: a timer, lighter than
        asyncio.timeout. `keep`: the head's own future is left alone by the timeout (a late
        answer is still awaited), as with asyncio.shield."""
        loop = head.get_loop()
        waiter = head
        if keep:
            waiter = loop.create_future()
            head.add_done_callback(partial(_done, waiter))
        timer = loop.call_later(self.read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
        head.result()

    def _wait_late(self, url: str, conn: _Connection, head: "asyncio.Future[None]", late: Late) -> None:
        async def wait() -> None:
            resp = None
            try:
                async with asyncio.timeout(self.read_timeout):
                    await head
                resp = Response(conn, self)
                await late(url, resp)
            except (TimeoutError, UpstreamError):
                pass
            finally:
                if resp is None:
                    conn.transport.close()
                else:
                    resp.release()
        task = asyncio.create_task(wait())
        self._late.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._late.discard)

    def close(self) -> None:
        for task in self._late:
            task.cancel()
        for conns in self._idle.values():
            for conn in conns:
                conn.transport.close()
        self._idle.clear()


@dataclass
class Upstream:
    """A replica's answer: the whole body, or the first chunk of a stream and the rest."""
    status: int
    content_type: str
    body: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    release: Callable[[], None] = lambda: None
    replica: Replica | None = None
    finished: list = field(default_factory=list)
    abort: Callable[[], None] = lambda: None  # a stream: breaks it off (its reader gets an UpstreamError)
