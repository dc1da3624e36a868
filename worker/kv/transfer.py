"""The KV transfer format between a prefill and a decode worker.

A stream carries the keys and values of a prompt's tokens, one frame per layer, so that
the sender never builds the whole payload in memory and the receiver checks every layer
before it writes a byte of it into its cache. Layout (integers little-endian):

    b"FWKV" | version: u16 | header length: u32 | header: UTF-8 JSON
    per layer:  b"LAYR" | layer: u32 | payload length: u64 | checksum(payload): u32 | payload
    trailer:    b"DONE" | number of layers: u32

The checksum is what the version says: version 1 zlib's CRC-32, version 2 CRC-32C
(Castagnoli), which the CPU computes in hardware at several times the speed; nothing else
differs. A receiver asks for the version it wants (`kv_version` in the pull's query); a
sender that does not know the parameter ignores it and sends version 1, which every
receiver still reads, so either side may be the older one during a rolling upgrade.

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

import asyncio
import concurrent.futures
import json
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict

import torch

from fleetwise.protocol import KV_STREAM_VERSION, KV_STREAM_VERSIONS, MAX_KV_HEADER_BYTES, KVHeader

from ..model.llama import DTYPES

try:
    import crc32c
except ImportError:  # no wheel for this platform: version 1 only
    crc32c = None  # type: ignore[assignment]  # the module or nothing

MAGIC, LAYER, DONE = b"FWKV", b"LAYR", b"DONE"
VERSION = KV_STREAM_VERSION
VERSIONS = KV_STREAM_VERSIONS if crc32c is not None else (1,)  # what this worker reads and sends
_PREAMBLE = struct.Struct("<4sHI")
_LAYER = struct.Struct("<4sIQI")
_DONE = struct.Struct("<4sI")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SEND_BATCH_BYTES = 4 << 20  # a sender makes frames in batches of about this many bytes


class KVTransferError(Exception):
    """A stream that must not be used; the decode worker recomputes the prompt instead."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason  # corrupt | mismatch | refused



def stream_size(header: KVHeader) -> int:
    """Bytes of the whole stream: sent as Content-Length, so nothing is chunk-framed."""
    head = len(json.dumps(asdict(header)).encode())
    return _PREAMBLE.size + head + header.num_layers * (_LAYER.size + header.payload_bytes) + _DONE.size


def checksum(version: int, data: bytes | memoryview, crc: int = 0) -> int:
    """The frame checksum of `version` over `data`, continuing from `crc`."""
    if version == 1:
        return zlib.crc32(data, crc)
    assert crc32c is not None  # VERSIONS holds 2 only when it is there
    return crc32c.crc32c(data, crc)


def encode(header: KVHeader, layers: Iterator[tuple[torch.Tensor, torch.Tensor]],
           version: int = 1) -> Iterator[bytes | memoryview]:
    """Frames of a stream in `version`; `layers` yields each layer's (keys, values) for the
    token range. Payloads go out as views of the tensors' memory, not copies."""
    if version not in VERSIONS:
        raise ValueError(f"KV stream version {version}: this worker speaks {list(VERSIONS)}")
    head = json.dumps(asdict(header)).encode()
    yield _PREAMBLE.pack(MAGIC, version, len(head)) + head
    count = 0
    for i, (k, v) in enumerate(layers):
        kb, vb = _tensor_bytes(k), _tensor_bytes(v)
        yield _LAYER.pack(LAYER, i, len(kb) + len(vb), checksum(version, vb, checksum(version, kb)))
        yield kb
        yield vb
        count += 1
    yield _DONE.pack(DONE, count)


def take_frames(frames: Iterator[bytes | memoryview], at_least: int) -> list[bytes | memoryview]:
    """The next frames of a stream, until they hold `at_least` bytes or the stream ends
    (an empty list: it has ended)."""
    out: list[bytes | memoryview] = []
    size = 0
    for frame in frames:
        out.append(frame)
        size += len(frame)
        if size >= at_least:
            break
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().data.cast("B")


class _Reader:
    """Exact reads over a body's chunks as they come (aiohttp's `readany`, or an async
    iterator of chunks): each byte is copied once, from the chunk into the caller's buffer,
    with no joins or slices in between."""

    def __init__(self, source):
        self.source = source
        self.chunk: bytes = b""
        self.offset = 0

    async def _more(self) -> bool:
        if hasattr(self.source, "readany"):
            chunk = await self.source.readany()
        else:
            try:
                chunk = await self.source.__anext__()
            except StopAsyncIteration:
                chunk = b""
        self.chunk, self.offset = chunk, 0
        return bool(chunk)

    async def readinto(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            if self.offset >= len(self.chunk) and not await self._more():
                raise KVTransferError(f"the stream ended early ({got} of {n} bytes of a frame)")
            k = min(n - got, len(self.chunk) - self.offset)
            view[got:got + k] = memoryview(self.chunk)[self.offset:self.offset + k]
            got += k
            self.offset += k

    async def readexactly(self, n: int) -> bytes:
        if len(self.chunk) - self.offset >= n:  # the usual case for the small frames
            out = self.chunk[self.offset:self.offset + n]
            self.offset += n
            return out
        buf = bytearray(n)
        await self.readinto(memoryview(buf))
        return bytes(buf)

    async def at_eof(self) -> bool:
        return self.offset >= len(self.chunk) and not await self._more()


async def decode(source, expect: KVHeader, staging: list[torch.Tensor] | None = None) -> AsyncIterator[
        tuple[int, torch.Tensor, torch.Tensor]]:
    """Checks a stream against what the receiver expects and yields (layer, keys, values)
    only for layers whose length and checksum are right. Raises KVTransferError otherwise.
    `source`: an async iterator of byte chunks, or an aiohttp body (`readany`).
    `staging`: byte buffers of one layer's payload each, used in turn, so that layer i's
    tensors are overwritten by layer i + len(staging): for a caller done with each layer by
    then (pull); without it every layer gets its own memory."""
    r = _Reader(source)
    magic, version, n = _PREAMBLE.unpack(await r.readexactly(_PREAMBLE.size))
    if magic != MAGIC or version not in VERSIONS:
        raise KVTransferError(f"not a KV stream of version {' or '.join(map(str, VERSIONS))} "
                              f"(magic {magic!r}, version {version})")
    if n > MAX_KV_HEADER_BYTES:
        raise KVTransferError(f"a header of {n} bytes; at most {MAX_KV_HEADER_BYTES} are read")
    try:
        header = KVHeader(**json.loads(await r.readexactly(n)))
    except (ValueError, TypeError) as e:
        raise KVTransferError(f"unreadable header: {e}")
    for name in ("model_id", "dtype", "num_layers", "num_kv_heads", "head_dim", "start", "num_tokens"):
        if getattr(header, name) != getattr(expect, name):
            raise KVTransferError(f"{name} mismatch: the stream has {getattr(header, name)!r}, "
                                  f"this worker expects {getattr(expect, name)!r}", "mismatch")
    dtype = DTYPES[header.dtype]
    shape = (header.num_tokens, header.num_kv_heads, header.head_dim)
    for i in range(header.num_layers):
        tag, layer, size, crc = _LAYER.unpack(await r.readexactly(_LAYER.size))
        if tag != LAYER or layer != i:
            raise KVTransferError(f"expected layer {i}, found tag {tag!r} layer {layer}")
        if size != header.payload_bytes:
            raise KVTransferError(f"layer {i}: {size} bytes, expected {header.payload_bytes}")
        buf = staging[i % len(staging)] if staging else torch.empty(size, dtype=torch.uint8)
        view = buf.numpy().data.cast("B")
        await r.readinto(view)
        if checksum(version, view) != crc:
            raise KVTransferError(f"layer {i}: checksum mismatch")
        kv = buf.view(dtype).view(2, *shape)
        yield i, kv[0], kv[1]
    tag, n_layers = _DONE.unpack(await r.readexactly(_DONE.size))
    if tag != DONE or n_layers != header.num_layers:
        raise KVTransferError("the stream does not end where its header says")
    if not await r.at_eof():
        raise KVTransferError("bytes after the end of the stream")


def client_session(headers: dict[str, str]):
    """The pooled aiohttp client a decode worker pulls with (one per worker, made in its
    event loop): connections are kept alive and reused from pull to pull."""
    import aiohttp
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=30.0),
        connector=aiohttp.TCPConnector(limit=256), read_bufsize=1 << 20, headers=headers)


async def pull(session, prefill_url: str, handle: str, expect: KVHeader, write, version: int | None = None) -> int:
    """Pulls a held prompt's KV from a prefill worker with an aiohttp session (which carries
    the shared token), checks it and hands each good layer to `write(layer, keys, values)`.
    Returns the bytes received; raises KVTransferError (or the client's error) when the
    stream must not be used. Redirects are not followed: the stream comes from the address
    the caller named or not at all. `version`: the stream version to ask for (default:
    the newest this worker reads); the sender may answer in version 1."""
    version = max(VERSIONS) if version is None else version
    async with session.get(f"{prefill_url}/internal/kv/{handle}", allow_redirects=False,
                           params={"start": str(expect.start), "kv_version": str(version)}) as r:
        if r.status != 200:
            raise KVTransferError(f"the prefill worker answered {r.status}", "refused")
        length = r.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > stream_size(expect):
            raise KVTransferError(f"the stream announces {length} bytes; this token range takes "
                                  f"{stream_size(expect)}", "refused")
        writing = None  # a layer is written in a thread while the next one arrives
        staging = [torch.empty(expect.payload_bytes, dtype=torch.uint8) for _ in range(2)]
        try:
            async for layer, k, v in decode(r.content, expect, staging):
                if writing is not None:
                    await asyncio.wrap_future(writing)
                writing = _writer.submit(write, layer, k, v)
            if writing is not None:
                await asyncio.wrap_future(writing)
        finally:
            if writing is not None:
                # blocks the loop for at most one layer's copy: the caller may free or reuse
                # the blocks as soon as this returns, even when cancelled
                concurrent.futures.wait([writing])
    return stream_size(expect)


_writer = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-write")
