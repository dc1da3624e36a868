"""The receiving end of a KV stream (kv/transfer.py): a response's body read off a socket
and checked frame by frame, each layer's payload landing with `recv_into` (scatter reads,
`recvmsg_into`, over many pieces) in the memory a `KVSink` names, then read once more for
its checksum; kv/pull.py makes the request and runs this in a thread.

Nothing is read on a length the sender claims before it is checked: the response head
against `MAX_RESPONSE_HEAD_BYTES`, the header against `MAX_KV_HEADER_BYTES`, each frame
against this worker's shape; bytes past the stream's end are refused.
"""

import json
import socket
import ssl
from typing import Protocol

from fleetwise.protocol import MAX_KV_HEADER_BYTES, KVHeader

from . import transfer as kt
from .transfer import _DONE, _LAYER, _PREAMBLE, DONE, LAYER, MAGIC, VERSIONS, KVTransferError, checksum

MAX_RESPONSE_HEAD_BYTES = 16 << 10
SCATTER_PIECES = 64            # buffers per recvmsg_into call (IOV_MAX is 1024)

class KVSink(Protocol):
    """Where a pulled stream's layers go."""

    def views(self, layer: int) -> list[memoryview]:
        """Writable byte views that the layer's payload (keys then values) fills, in order."""
        ...

    def done(self, layer: int) -> None:
        """The layer's payload is in those views and its checksum is right."""
        ...


class Response:
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
    conn = Response(sock)
    conn.left = length
    return read_stream(conn, expect, sink)


def read_stream(conn: Response, expect: KVHeader, sink: KVSink) -> dict | None:
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
    if header != expect:
        name = next(name for name in vars(expect) if getattr(header, name) != getattr(expect, name))
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


def _receive_segments(conn: Response, header: KVHeader, sink: KVSink) -> dict:
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
