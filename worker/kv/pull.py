"""The decode side of a KV stream: `GET /internal/kv/{handle}` on a small HTTP/1.1 client of
its own, read in a thread straight into where the keys and values go (kv/receive.py).

A pull is one request on a kept-alive connection to the prefill worker (`KVClient`, one
pool per worker, the shared token in every request). On a kept connection the request goes
out from the event loop, so that the prefill worker works on it while the reading thread
wakes up (a thread hop costs a few hundred microseconds on an idle machine); on a new
connection, and again on a fresh one when a kept connection turns out closed, the thread
sends it. The response's body is the stream of kv/transfer.py, read by kv/receive.py into
the memory a `KVSink` names: on a CPU worker the reserved blocks of the paged cache
themselves (KVConnector.kv_sink), elsewhere a staging buffer copied in once checked. So a
byte is copied once, from the socket into the cache, as in a plain socket copy, and then
read once more for its checksum. A layer whose checksum is wrong ends the pull before the
next layer is read: its blocks hold bytes that are not the prompt's, but they belong to the
reserved request alone, which is not activated on them (it recomputes its prompt, which
overwrites them); they are not in the prefix cache until then.

Every limit of the stream format holds (kv/receive.py), and the response's Content-Length
is checked against what the token range takes; a response without one, with any status
but 200 (redirects are not followed), or with bytes past the stream is refused. Connect and
read time out (`CONNECT_TIMEOUT_S`, `READ_TIMEOUT_S`; a segmented stream's read waits
`SEGMENT_WAIT_S` more).
"""

import asyncio
import concurrent.futures
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable

import torch

from fleetwise.protocol import KVHeader

from . import transfer as kt
from .receive import KVSink, Response, read_stream
from .slots import StagingSink
from .transfer import KVTransferError, stream_size

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 30.0          # the longest wait for the next bytes of a response
MAX_ERROR_BODY_BYTES = 16 << 10  # a refusal's body read to see whether it names the stream version
MAX_IDLE_CONNECTIONS = 16      # kept alive per prefill worker


class KVClient:
    """Kept-alive connections to prefill workers, with the headers every pull carries."""

    def __init__(self, headers: dict[str, str]):
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self.lock = threading.Lock()
        self.tls: ssl.SSLContext | None = None

    def kept(self, scheme: str, host: str, port: int) -> socket.socket | None:
        """A connection to the worker kept from an earlier pull, or None."""
        with self.lock:
            idle = self.idle.get((scheme, host, port))
            return idle.pop() if idle else None

    def connect(self, scheme: str, host: str, port: int, fresh: bool = False) -> tuple[socket.socket, bool]:
        """A connection to the worker (a new one when `fresh`): (socket, whether it was kept
        from an earlier pull)."""
        sock = None if fresh else self.kept(scheme, host, port)
        if sock is not None:
            return sock, True
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
        self.sent = False  # the request went out on a kept connection before the thread ran (send_kept)
        self.cancelled = False

    def send_kept(self) -> None:
        """Sends the request on a kept connection, if there is one, from the caller's thread
        (the event loop: a few hundred bytes into an idle connection's empty buffer do not
        block), so that the prefill worker answers while the thread that reads it starts up.
        Anything wrong is left to `run`, which sends on a new connection then."""
        sock = self.client.kept(*self.key)
        if sock is None:
            return
        self.sock = sock
        try:
            sock.sendall(self.request)
            self.sent = True
        except OSError:
            sock.close()
            self.sock = None

    def discard(self) -> None:
        """The pull will not run: a request sent on a kept connection leaves it unusable."""
        if self.sent and self.sock is not None:
            self.sock.close()

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
            sent = self.sent and attempt == 0
            if sent:
                assert self.sock is not None  # send_kept's
                sock, reused = self.sock, True
            else:
                sock, reused = self.client.connect(*self.key, fresh=attempt > 0)
            self.sock = sock
            if self.cancelled:
                sock.close()
                raise KVTransferError("the pull was cancelled", "unreachable")
            conn = Response(sock)
            if self.segmented:  # the prefill worker sends each segment once it has computed it
                sock.settimeout(kt.SEGMENT_WAIT_S + READ_TIMEOUT_S)
            try:
                if not sent:
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

    def _body(self, conn: Response, status: int, headers: dict[str, str]) -> None:
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
        self.first = read_stream(conn, self.expect, self.sink)


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
    job = _Pull(client, prefill_url, handle, expect, into, version)
    try:
        await _run(job)
    except _OlderSender:  # during a rolling upgrade: once more, in the version before
        await _run(_Pull(client, prefill_url, handle, expect, into, 2))
    return job.size


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
    job.send_kept()  # the thread's start-up then overlaps the prefill worker's work on the request
    running = _pulls.submit(job.run)
    try:
        await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        job.cancel()
        if running.cancel():
            job.discard()
        else:  # it has started: the socket's failure ends it soon
            concurrent.futures.wait([running])  # blocks the loop until then
        raise


_pulls = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-pull")
