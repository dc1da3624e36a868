"""The KV transfer format between a prefill and a decode worker.

A stream carries the keys and values of a prompt's tokens, one frame per layer, so that
the sender never builds the whole payload in memory and the receiver checks every layer
before it uses it (kv/pull.py). Layout (integers little-endian):

    b"FWKV" | version: u16 | header length: u32 | header: UTF-8 JSON
    per layer:  b"LAYR" | layer: u32 | payload length: u64 | checksum(payload): u32 | payload
    trailer:    b"DONE" | number of layers: u32

The checksum is what the version says: version 1 zlib's CRC-32, version 2 CRC-32C
(Castagnoli), which the CPU computes in hardware at several times zlib's speed, version 3
CRC-32 again, as version 1, from a sender that computes it with zlib-ng (carry-less
multiply folding: 2-3x CRC-32C's rate on this project's CPUs, 7x zlib's); nothing else
differs. A version is read and sent only where its checksum's fast implementation is
installed (`VERSIONS`; version 1 always, with zlib-ng when it is there). A receiver asks
for the version it wants (`kv_version` in the pull's query); a sender that does not know
the parameter ignores it and sends version 1, which every receiver still reads, and one
asked for a version newer than it sends answers in its newest, so either side may be the
older one during a rolling upgrade.

Version 4 is a segmented stream, which a prefill worker sends while it is still computing
the prompt (kv/early.py) and only to a receiver that asks for it by number with a segment
size (`segment_tokens`): the prompt's tokens in segments of that many (the last shorter),
each segment every layer, then the first token; CRC-32 as version 3.

    b"FWKV" | 4: u16 | header length: u32 | header
    per segment:  b"SEGM" | first token: u32 | tokens: u32 | per layer: a frame as above
    first token:  b"FRST" | JSON length: u32 | JSON, padded with spaces to FIRST_BYTES
    trailer:      b"DONE" | number of layers: u32

The header names the model (`model_id`, a digest of its config and weight files: see
model/files.py), the dtype, the shape (`num_layers`, `num_kv_heads`, `head_dim`) and the
token range (`start`, `num_tokens`). A payload is the layer's keys then values for those tokens, each
`[num_tokens, num_kv_heads, head_dim]` in the header's dtype, C order. A receiver refuses
a stream whose header does not match its own model and layout, a layer whose length or
checksum is wrong, a stream that ends early or carries more than it announced. Nothing is
read into memory on a length the sender claims before that length is checked: the header's
against `MAX_KV_HEADER_BYTES`, each layer's against what this worker's shape makes of the
token range it asked for.
"""

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

import torch

from fleetwise.protocol import KV_STREAM_SEGMENTED, KV_STREAM_VERSION, KV_STREAM_VERSIONS, KVHeader

from ..model.llama import DTYPES

try:
    import crc32c
except ImportError:  # no wheel for this platform: no version 2
    crc32c = None  # type: ignore[assignment]  # the module or nothing
try:
    from zlib_ng import zlib_ng
except ImportError:  # no wheel for this platform: no version 3, CRC-32 by zlib
    zlib_ng = None  # type: ignore[assignment]  # the module or nothing

MAGIC, LAYER, DONE = b"FWKV", b"LAYR", b"DONE"
VERSION = KV_STREAM_VERSION
VERSIONS = tuple(v for v in KV_STREAM_VERSIONS  # what this worker reads and sends
                 if (v != 2 or crc32c is not None) and (v != 3 or zlib_ng is not None))
_crc32 = zlib_ng.crc32 if zlib_ng is not None else zlib.crc32  # the same values
# CRC-32 of a + b from those of a and b and b's length (zlib-ng; the standard library has none)
crc32_combine: Callable[[int, int, int], int] | None = zlib_ng.crc32_combine if zlib_ng is not None else None
_PREAMBLE = struct.Struct("<4sHI")
_LAYER = struct.Struct("<4sIQI")
_DONE = struct.Struct("<4sI")
_SEGMENT = struct.Struct("<4sII")  # version 4: tag, first token, tokens
_FIRST = struct.Struct("<4sI")     # version 4: tag, length of the JSON that follows (padded)
SEGMENT, FIRST = b"SEGM", b"FRST"
SEGMENTED = KV_STREAM_SEGMENTED  # the version of a segmented stream, sent only when asked for by number
NEWEST = max(v for v in VERSIONS if v != SEGMENTED)  # what a receiver asks for (4 only by name)
FIRST_BYTES = 4096  # the first-token frame's JSON, padded: the stream's length is known up front
MAX_SEGMENTS = 4096  # a segmented stream in more segments than this is refused
FLUSH = b""  # yielded by encode_segments after each segment and before a layer not computed yet: not sent
SEGMENT_WAIT_S = 300.0  # the longest a segmented stream pauses between two segments (a prefill in progress)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class KVTransferError(Exception):
    """A stream that must not be used; the decode worker recomputes the prompt instead."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason  # corrupt | mismatch | refused | unreachable



def stream_size(header: KVHeader, segment_tokens: int = 0) -> int:
    """Bytes of the whole stream (segmented in `segment_tokens`, version 4, when not 0):
    sent as Content-Length, so nothing is chunk-framed."""
    layers = header.num_layers * (_LAYER.size + header.payload_bytes)
    size = _PREAMBLE.size + len(header_json(header)) + layers + _DONE.size
    if not segment_tokens:
        return size
    segments = -(-header.num_tokens // segment_tokens)
    return size + segments * _SEGMENT.size + (segments - 1) * header.num_layers * _LAYER.size + _FIRST.size + \
        FIRST_BYTES


def checksum(version: int, data: bytes | memoryview, crc: int = 0) -> int:
    """The frame checksum of `version` over `data`, continuing from `crc`."""
    if version != 2:  # 1, 3 and 4
        return _crc32(data, crc)
    assert crc32c is not None  # VERSIONS holds 2 only when it is there
    return crc32c.crc32c(data, crc)


def answer_version(asked: int) -> int | None:
    """The version a sender answers a request for `asked` in: that one, or its newest when
    `asked` is newer (every receiver reads the versions before its own; a segmented stream
    goes only to who asks for one); None: below all."""
    if asked == SEGMENTED:
        return SEGMENTED
    sent = [v for v in VERSIONS if v <= asked and v != SEGMENTED]
    return max(sent) if sent else None


def payload_view(buf: torch.Tensor, header: KVHeader) -> torch.Tensor:
    """A byte buffer of one layer's payload seen as `[2, tokens, num_kv_heads, head_dim]`."""
    return buf.view(DTYPES[header.dtype]).view(2, header.num_tokens, header.num_kv_heads, header.head_dim)


class LayerSource(Protocol):
    """A stream's layers, each gathered on demand into a buffer the encoder gives. A source
    may also see a layer in place (`views(layer)`: byte views of its payload, or None),
    which the encoder then sends without gathering it (kv/slots.py's KVLayers), and know a
    layer's CRC-32 already (`crc32(layer)`, or None), which the encoder then does not compute."""

    def __len__(self) -> int: ...

    def gather(self, layer: int, out: torch.Tensor) -> torch.Tensor: ...


def encode(header: KVHeader, layers: LayerSource, version: int = 1,
           pinned: bool = False) -> Iterator[bytes | memoryview]:
    """Frames of a stream in `version`: the preamble and header, then each layer, then the
    trailer. A layer the source sees in place goes as its frame head and the views of its
    payload, read only for the checksum (no copy on this side); any other is gathered into
    one new buffer with its frame head (`pinned` host memory when the cache is on a GPU).
    Nothing yielded is written afterwards, so it may be sent without a copy."""
    if version not in VERSIONS or version == SEGMENTED:
        raise ValueError(f"KV stream version {version}: this worker speaks {list(VERSIONS)}")
    yield _preamble(header, version)
    yield from _layer_frames(header, layers, version, pinned)
    yield _DONE.pack(DONE, len(layers))


def encode_segments(header: KVHeader, segments: Iterator[tuple[int, int, LayerSource]],
                    first: Callable[[], dict], pinned: bool = False) -> Iterator[bytes | memoryview]:
    """Frames of a segmented stream (version 4): after the preamble and header, each segment
    of `segments` ((first token, tokens, its layers), in order, covering the header's range)
    as its segment head and one frame per layer, then `FLUSH` (nothing to send: what came
    before may go out now, the next segment may be a while; also before a layer the source
    says is `pending`, still being computed); then the first-token frame
    with `first()` as JSON, padded to `FIRST_BYTES`, and the trailer."""
    yield _preamble(header, SEGMENTED)
    for start, n, layers in segments:
        yield _SEGMENT.pack(SEGMENT, start, n)
        yield from _layer_frames(replace(header, start=start, num_tokens=n), layers, SEGMENTED, pinned)
        yield FLUSH
    body = json.dumps(first()).encode()
    if len(body) > FIRST_BYTES:
        raise ValueError(f"the first token's frame takes {len(body)} bytes, more than {FIRST_BYTES}")
    yield _FIRST.pack(FIRST, len(body)) + body.ljust(FIRST_BYTES)
    yield _DONE.pack(DONE, header.num_layers)


def header_json(header: KVHeader) -> bytes:
    """The header as the stream carries it (its fields are plain values: no deep copy as asdict's)."""
    return json.dumps(vars(header)).encode()


def _preamble(header: KVHeader, version: int) -> bytes:
    head = header_json(header)
    return _PREAMBLE.pack(MAGIC, version, len(head)) + head


def _layer_frames(header: KVHeader, layers: LayerSource, version: int,
                  pinned: bool) -> Iterator[bytes | memoryview]:
    in_place = getattr(layers, "views", None)
    known = getattr(layers, "crc32", None) if version != 2 else None  # every other version's is CRC-32
    pending = getattr(layers, "pending", None)  # a layer still being computed (kv/early.py)
    for i in range(len(layers)):
        if pending is not None and pending(i):
            yield FLUSH  # what is ready goes before the wait
        views = in_place(i) if in_place is not None else None
        if views is not None:
            crc = known(i) if known is not None else None
            if crc is None:
                crc = 0
                for view in views:
                    crc = checksum(version, view, crc)
            yield _LAYER.pack(LAYER, i, header.payload_bytes, crc)
            yield from views
            continue
        buf = torch.empty(_LAYER.size + header.payload_bytes, dtype=torch.uint8, pin_memory=pinned)
        layers.gather(i, payload_view(buf[_LAYER.size:], header))
        frame = buf.numpy().data.cast("B")
        _LAYER.pack_into(frame, 0, LAYER, i, header.payload_bytes, checksum(version, frame[_LAYER.size:]))
        yield frame


def client_session(headers: dict[str, str]):
    """The pooled aiohttp client a worker releases KV leases with (one per worker, made in
    its event loop); pulls go through kv/pull.py's own client."""
    import aiohttp
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=30.0),
        connector=aiohttp.TCPConnector(limit=256), read_bufsize=1 << 20, headers=headers)


