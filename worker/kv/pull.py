"""The decode side of a KV stream: `GET /internal/kv/{handle}` on a small HTTP/1.1 client of
its own, read in a thread straight into where the keys and values go.

A pull is one request on a kept-alive connection to the prefill worker (`KVClient`, one
pool per worker, the shared token in every request). The response's body is the stream of
kv/transfer.py; its small parts (preamble, header, frame heads, trailer) are read exactly,
and each layer's payload lands with `recv_into` (scatter reads, `recvmsg_into`, over many
pieces) in the memory a `KVSink` names: on a CPU worker the reserved blocks of the paged
cache themselves (KVConnector.kv_sink), elsewhere a staging buffer copied in once checked.
So a byte is copied once, from the socket into the cache, as in a plain socket copy, and
then read once more for its checksum. A layer whose checksum is wrong ends the pull before
the next layer is read: its blocks hold bytes that are not the prompt's, but they belong to
the reserved request alone, which is not activated on them (it recomputes its prompt, which
overwrites them); they are not in the prefix cache until then.

Every limit of the stream format holds: nothing is read on a length the sender claims before
it is checked (the response head against `MAX_RESPONSE_HEAD_BYTES`, its Content-Length
against what the token range takes, the header against `MAX_KV_HEADER_BYTES`, each frame
against this worker's shape); a response without a Content-Length, with any status but 200
(redirects are not followed), or with bytes past the stream is refused. Connect and read
time out (`CONNECT_TIMEOUT_S`, `READ_TIMEOUT_S`; a segmented stream's read waits `SEGMENT_WAIT_S` more).
"""

import asyncio
import concurrent.futures
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from typing import Protocol

import torch

from fleetwise.protocol import MAX_KV_HEADER_BYTES, KVHeader

from . import transfer as kt
from .slots import StagingSink
from .transfer import _DONE, _LAYER, _PREAMBLE, DONE, LAYER, MAGIC, VERSIONS, KVTransferError, checksum, stream_size

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 30.0          # the longest wait for the next bytes of a response
MAX_RESPONSE_HEAD_BYTES = 16 << 10
MAX_ERROR_BODY_BYTES = 16 << 10  # a refusal's body read to see whether it names the stream version
MAX_IDLE_CONNECTIONS = 16      # kept alive per prefill worker
SCATTER_PIECES = 64            # buffers per recvmsg_into call (IOV_MAX is 1024)


class KVSink(Protocol):
    """Where a pulled stream's layers go."""

    def views(self, layer: int) -> list[memoryview]:
        """Writable byte views that the layer's payload (keys then values) fills, in order."""
        ...

    def done(self, layer: int) -> None:
        """The layer's payload is in those views and its checksum is right."""
        ...


class KVClient:
    """Kept-alive connections to prefill workers, with the headers every pull carries."""

    def __init__(self, headers: dict[str, str]):
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self.lock = threading.Lock()
        self.tls: ssl.SSLContext | None = None

    def connect(self, scheme: str, host: str, port: int, fresh: bool = False) -> tuple[socket.socket, bool]:
        """A connection to the worker (a new one when `fresh`): (socket, whether it was kept
        from an earlier pull)."""
        with self.lock:
            idle = self.idle.get((scheme, host, port))
            if idle and not fresh:
                return idle.pop(), True
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            if self.tls is None:
                self.tls = ssl.create_default_context()
            sock = self.tls.wrap_socket(sock, server_hostname=host)
        sock.settimeout(READ_TIMEOUT_S)
        return sock, False

    def keep(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        with self.lock:
            idle = self.idle.setdefault(key, [])
            if len(idle) < MAX_IDLE_CONNECTIONS:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self.lock:
            socks = [s for idle in self.idle.values() for s in idle]
            self.idle.clear()
        for s in socks:
            s.close()


class _Conn:
    """One response read off one socket: exact reads, the head's leftover bytes first."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = b""
        self.left = 0  # bytes of the body not read yet
        self.scatter = not isinstance(sock, ssl.SSLSocket)

    def head(self) -> tuple[int, dict[str, str]]:
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_RESPONSE_HEAD_BYTES:
                raise KVTransferError(f"a response head of more than {MAX_RESPONSE_HEAD_BYTES} bytes", "refused")
            part = self.sock.recv(65536)
            if not part:
                raise ConnectionResetError("the connection closed before a response")
            data += part
        self.pending = data[end + 4:]
        status_line, *lines = data[:end].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise KVTransferError(f"not an HTTP/1.1 response: {status_line[:80]!r}", "refused")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def readinto(self, views: list[memoryview]) -> None:
        """Fills the views, in order, from the body."""
        n = sum(len(v) for v in views)
        if n > self.left:
            raise KVTransferError(f"the stream ends early ({self.left} bytes left, {n} expected)")
        self.left -= n
        i, off = 0, 0
        while i < len(views) and self.pending:  # what the head's read took of the body
            k = min(len(views[i]) - off, len(self.pending))
            views[i][off:off + k] = self.pending[:k]
            self.pending = self.pending[k:]
            off += k
            if off == len(views[i]):
                i, off = i + 1, 0
        while i < len(views):
            if self.scatter and len(views) - i > 1:
                got = self.sock.recvmsg_into([views[i][off:], *views[i + 1:i + SCATTER_PIECES]])[0]
            else:
                got = self.sock.recv_into(views[i][off:])
            if got == 0:
                raise KVTransferError("the connection closed inside the stream")
            while got:
                k = min(got, len(views[i]) - off)
                got, off = got - k, off + k
                if off == len(views[i]):
                    i, off = i + 1, 0

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto([memoryview(buf)])
        return bytes(buf)


def receive(sock: socket.socket, length: int, expect: KVHeader, sink: KVSink) -> dict | None:
    """A stream of `length` bytes read off `sock` (a response's body), checked against what
    this worker expects, each good layer into the sink; raises KVTransferError at the first
    thing wrong. Returns a segmented stream's first token."""
    conn = _Conn(sock)
    conn.left = length
    return _receive(conn, expect, sink)


def _receive(conn: _Conn, expect: KVHeader, sink: KVSink) -> dict | None:
    """The stream's checks; returns the first token of a segmented stream."""
    magic, version, n = _PREAMBLE.unpack(conn.read(_PREAMBLE.size))
    if magic != MAGIC or version not in VERSIONS:
        raise KVTransferError(f"not a KV stream of version {' or '.join(map(str, VERSIONS))} "
                              f"(magic {magic!r}, version {version})")
    if n > MAX_KV_HEADER_BYTES:
        raise KVTransferError(f"a header of {n} bytes; at most {MAX_KV_HEADER_BYTES} are read")
    try:
        header = KVHeader(**json.loads(conn.read(n)))
    except (ValueError, TypeError) as e:
        raise KVTransferError(f"unreadable header: {e}")
    for name in asdict(expect):
        if getattr(header, name) != getattr(expect, name):
            raise KVTransferError(f"{name} mismatch: the stream has {getattr(header, name)!r}, "
                                  f"this worker expects {getattr(expect, name)!r}", "mismatch")
    if version == kt.SEGMENTED:
        return _receive_segments(conn, header, sink)
    head = bytearray(max(_LAYER.size, _DONE.size))
    after = memoryview(head)[:_LAYER.size if header.num_layers else _DONE.size]
    conn.readinto([after])
    for i in range(header.num_layers):
        tag, layer, size, crc = _LAYER.unpack(head[:_LAYER.size])
        if tag != LAYER or layer != i:
            raise KVTransferError(f"expected layer {i}, found tag {tag!r} layer {layer}")
        if size != header.payload_bytes:
            raise KVTransferError(f"layer {i}: {size} bytes, expected {header.payload_bytes}")
        views = sink.views(i)
        # the payload and what follows it (the next frame head, or the trailer) in one read
        after = memoryview(head)[:_LAYER.size if i + 1 < header.num_layers else _DONE.size]
        conn.readinto([*views, after])
        got = 0
        for view in views:
            got = checksum(version, view, got)
        if got != crc:
            raise KVTransferError(f"layer {i}: checksum mismatch")
        sink.done(i)
    tag, n_layers = _DONE.unpack(head[:_DONE.size])
    if tag != DONE or n_layers != header.num_layers:
        raise KVTransferError("the stream does not end where its header says")
    if conn.left or conn.pending:
        raise KVTransferError("bytes after the end of the stream")
    return None


def _receive_segments(conn: _Conn, header: KVHeader, sink: KVSink) -> dict:
    """A segmented stream's segments (each token range, in order, every layer of it) into
    the sink's views of those tokens, then its first token."""
    range_views = getattr(sink, "range_views", None)
    if range_views is None:
        raise KVTransferError("a segmented stream needs a sink that takes token ranges", "refused")
    per_token = header.payload_bytes // max(1, header.num_tokens)
    at, segments = header.start, 0
    while at < header.start + header.num_tokens:
        segments += 1
        tag, start, n = kt._SEGMENT.unpack(conn.read(kt._SEGMENT.size))
        if tag != kt.SEGMENT or start != at or not 0 < n <= header.start + header.num_tokens - at \
                or segments > kt.MAX_SEGMENTS:
            raise KVTransferError(f"expected a segment from token {at}, found tag {tag!r} tokens {start}+{n}")
        for i in range(header.num_layers):
            tag, layer, size, crc = _LAYER.unpack(conn.read(_LAYER.size))
            if tag != LAYER or layer != i or size != n * per_token:
                raise KVTransferError(f"segment at {at}: expected layer {i} of {n * per_token} bytes, "
                                      f"found tag {tag!r} layer {layer} of {size}")
            views = range_views(i, at - header.start, at - header.start + n)
            conn.readinto(views)
            got = 0
            for view in views:
                got = checksum(kt.SEGMENTED, view, got)
            if got != crc:
                raise KVTransferError(f"segment at {at}, layer {i}: checksum mismatch")
        at += n
    tag, size = kt._FIRST.unpack(conn.read(kt._FIRST.size))
    body = conn.read(kt.FIRST_BYTES)
    if tag != kt.FIRST or size > kt.FIRST_BYTES:
        raise KVTransferError("the stream has no first token where it should")
    try:
        first = json.loads(body[:size])
        int(first["first_token"])
    except (ValueError, TypeError, KeyError) as e:
        raise KVTransferError(f"unreadable first token: {e}")
    tag, n_layers = _DONE.unpack(conn.read(_DONE.size))
    if tag != DONE or n_layers != header.num_layers or conn.left or conn.pending:
        raise KVTransferError("the stream does not end where its header says")
    return first


class _OlderSender(KVTransferError):
    """A sender of the release before refused the stream version asked for (it answers
    400 where a newer one answers in its own newest)."""


class _Pull:
    """One pull in a thread; `cancel` makes its socket fail so that it ends soon."""

    def __init__(self, client: KVClient, url: str, handle: str, expect: KVHeader, sink: KVSink, version: int,
                 segment_tokens: int = 0):
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None  # a base address (protocol.py)
        self.key = (parts.scheme, parts.hostname, parts.port)
        self.client, self.expect, self.sink = client, expect, sink
        query = {"start": expect.start, "kv_version": version, **({"segment_tokens": segment_tokens}
                                                                  if segment_tokens else {})}
        target = f"/internal/kv/{urllib.parse.quote(handle, safe='')}?{urllib.parse.urlencode(query)}"
        self.size = stream_size(expect, segment_tokens)
        self.first: dict | None = None
        self.segmented = bool(segment_tokens)
        self.version = version
        self.request = (f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{client.headers}\r\n").encode("latin-1")
        self.sock: socket.socket | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        if self.cancelled:
            raise KVTransferError("the pull was cancelled", "unreachable")
        for attempt in range(2):  # a kept connection the worker has closed meanwhile: once more on a new one
            sock, reused = self.client.connect(*self.key, fresh=attempt > 0)
            self.sock = sock
            if self.cancelled:
                sock.close()
                raise KVTransferError("the pull was cancelled", "unreachable")
            conn = _Conn(sock)
            if self.segmented:  # the prefill worker sends each segment once it has computed it
                sock.settimeout(kt.SEGMENT_WAIT_S + READ_TIMEOUT_S)
            try:
                sock.sendall(self.request)
                status, headers = conn.head()
            except (ConnectionError, TimeoutError, OSError) as e:
                sock.close()
                if reused and not self.cancelled and not isinstance(e, TimeoutError):
                    continue
                raise
            try:
                self._body(conn, status, headers)
            except BaseException:
                sock.close()
                raise
            if headers.get("connection", "").lower() == "close":
                sock.close()
            else:
                sock.settimeout(READ_TIMEOUT_S)
                self.client.keep(self.key, sock)
            return

    def _body(self, conn: _Conn, status: int, headers: dict[str, str]) -> None:
        length = headers.get("content-length", "")
        if status != 200:
            if status == 400 and self.version > 2 and length.isdigit() and int(length) <= MAX_ERROR_BODY_BYTES:
                conn.left = int(length)
                body = conn.read(conn.left)
                if b"unsupported_protocol_version" in body and b"kv_version" in body:
                    raise _OlderSender(f"the prefill worker does not send version {self.version}", "refused")
            raise KVTransferError(f"the prefill worker answered {status}", "refused")
        if not length.isdigit() or "transfer-encoding" in headers:
            raise KVTransferError("the stream comes without a Content-Length", "refused")
        if int(length) > self.size:
            raise KVTransferError(f"the stream announces {length} bytes; this token range takes "
                                  f"{self.size}", "refused")
        conn.left = int(length)
        if len(conn.pending) > conn.left:
            raise KVTransferError("bytes after the end of the stream")
        self.first = _receive(conn, self.expect, self.sink)


async def pull(client: KVClient, prefill_url: str, handle: str, expect: KVHeader,
               sink: KVSink | Callable[[int, torch.Tensor, torch.Tensor], None], version: int | None = None) -> int:
    """Pulls a held prompt's KV from a prefill worker, checks it and puts each good layer
    into `sink` (a KVSink, or `write(layer, keys, values)`). Returns the bytes received;
    raises KVTransferError (or OSError) when the stream must not be used. `version`: the
    stream version to ask for (default: the newest this worker reads); the sender may
    answer in version 1. When cancelled, it returns only once nothing writes into the
    sink any more, so that the caller may free the blocks at once."""
    version = kt.NEWEST if version is None else version
    into = StagingSink(expect, sink) if callable(sink) else sink
    try:
        await _run(_Pull(client, prefill_url, handle, expect, into, version))
    except _OlderSender:  # during a rolling upgrade: once more, in the version before
        await _run(_Pull(client, prefill_url, handle, expect, into, 2))
    return stream_size(expect)


async def pull_segments(client: KVClient, prefill_url: str, handle: str, expect: KVHeader, sink: KVSink,
                        segment_tokens: int) -> dict:
    """Pulls an early prefill's KV as a segmented stream (version 4) while the prefill
    worker computes it, each segment into the sink's views of its tokens (a CacheSink);
    returns the first token (`first_token`, `first_logprob`, `finish_reason`). Raises as
    `pull` does."""
    job = _Pull(client, prefill_url, handle, expect, sink, kt.SEGMENTED, segment_tokens)
    await _run(job)
    assert job.first is not None  # a segmented stream that reads ends with one
    return job.first


async def _run(job: _Pull) -> None:
    running = _pulls.submit(job.run)
    try:
        await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        job.cancel()
        if not running.cancel():  # it has started: the socket's failure ends it soon
            concurrent.futures.wait([running])  # blocks the loop until then
        raise


_pulls = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-pull")
