"""`GET /internal/kv/{handle}`: a held prompt's KV stream (kv/transfer.py), sent while it is
gathered.

On a CPU worker each layer goes out of the paged cache's own slots: its frame head, then
views of the blocks (kv/slots.py), read here only for the checksum, and not at all where
the lease's checksums were taken beforehand (kv/connector.py); elsewhere each layer is
gathered into one new buffer that holds its frame head and payload. Either way the next
layer is made ready (checksummed, or gathered) in a thread (`_gathers`) while the layers
before it are written to the socket, and the buffers go to the transport as they are,
without a copy (the worker serves on uvloop, whose transports keep a reference instead of
copying); the lease keeps the blocks unchanged until the response is done. The header
goes out at once and the first layer alone, so that the stream starts early; later layers
are gathered at least `HOP_BYTES` per thread hop. Layers of at most `INLINE_LAYER_BYTES`
(up to a few thousand tokens') are gathered in the event loop between sends, about a
millisecond each: on a busy machine every thread hop waits for a core. The response is a plain ASGI one with a
Content-Length (`KVStreamResponse`): no chunked framing, no task per response.
"""

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..kv.connector import KVConnector
from ..kv.transfer import MAX_SEGMENTS, SEGMENTED, answer_version, encode, encode_segments, stream_size
from ..kv.transfer import VERSIONS as KV_VERSIONS
from ..metrics import WorkerMetrics
from .openai import APIError

CORRUPT_KV = "corrupt-kv"  # test-only fault switch: flips a byte of every KV stream sent

HOP_BYTES = 2 << 20  # after the first layer, at least this many bytes are gathered per thread hop
# layers of at most this many bytes are gathered (or only checksummed, from the cache's slots) in the
# event loop, no hop: a hop per layer cost a 2-4 MiB layer more than the loop's millisecond of CRC
INLINE_LAYER_BYTES = 4 << 20
_gathers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-gather")
MAX_SEGMENTED_STREAMS = 16  # early prefills' streams at once, each a thread that waits for the engine
_segmented = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_SEGMENTED_STREAMS, thread_name_prefix="kv-early")


def _done(result: list) -> "asyncio.Future[list]":
    future: asyncio.Future[list] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _take(frames: Iterator[bytes | memoryview], at_least: int) -> list[bytes | memoryview]:
    """The next frames, until they hold `at_least` bytes, a segment ends (FLUSH: what is
    ready goes now) or the stream ends (an empty list: it has ended)."""
    out: list[bytes | memoryview] = []
    size = 0
    for frame in frames:
        if not len(frame):  # FLUSH
            if out:
                break
            continue
        out.append(frame)
        size += len(frame)
        if size >= at_least:
            break
    return out


def _corrupted(frames: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    for i, frame in enumerate(f for f in frames if len(f)):  # FLUSH is not sent
        if i == 1:  # the first layer's frame, its head when sent in place, or a segment's head: it no longer reads
            frame = memoryview(bytearray(frame))
            frame[-1] ^= 0xFF
        yield frame


class KVStreamResponse(Response):
    """The frames of a stream, the next one made in a thread while this one is sent;
    `done(sent)` runs once no thread reads the lease's blocks any more."""

    def __init__(self, frames: Iterator[bytes | memoryview], length: int, layer_bytes: int,
                 done: Callable[[int], None], threads: concurrent.futures.Executor = _gathers):
        super().__init__(status_code=200, media_type="application/octet-stream",
                         headers={"content-length": str(length)})
        self.frames, self.done, self.threads = frames, done, threads
        self.inline = layer_bytes <= INLINE_LAYER_BYTES and threads is _gathers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        frames = self.frames
        preamble = next(frames)  # the header alone: nothing to gather
        # small layers are gathered here, between sends: a thread hop would cost more
        upcoming = _done([]) if self.inline else loop.run_in_executor(self.threads, _take, frames, 1)
        sent = 0
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": preamble, "more_body": True})
            sent += len(preamble)
            for frame in frames if self.inline else ():
                sent += len(frame)
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            while batch := await upcoming:
                upcoming = loop.run_in_executor(self.threads, _take, frames, HOP_BYTES)
                for frame in batch:
                    sent += len(frame)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # no await here: a cancelled response would be cancelled again at every await
            def finished(_: object, sent: int = sent) -> None:
                self.done(sent)
            upcoming.add_done_callback(finished)


def kv_response(connector: KVConnector, metrics: WorkerMetrics, faults: frozenset[str], handle: str,
                start: int, kv_version: int, segment_tokens: int = 0) -> KVStreamResponse:
    """The held prompt's keys and values from token `start`, in stream version `kv_version`
    (or this worker's newest, when `kv_version` is newer); version 4: an early prefill's,
    in segments of `segment_tokens` as they are computed."""
    version = answer_version(kv_version)
    if version is None:
        raise APIError(400, f"kv_version {kv_version}: this worker sends {list(KV_VERSIONS)}", param="kv_version",
                       code="unsupported_protocol_version")
    if version == SEGMENTED:
        return _segmented_response(connector, metrics, faults, handle, start, segment_tokens)
    try:
        header, layers = connector.open_kv(handle, start)
    except KeyError:
        raise APIError(404, f"no KV lease {handle!r}: unknown, released or expired", code="kv_not_found")
    except ValueError as e:
        raise APIError(400, str(e), param="start")
    pinned = layers.caches[0].device.type == "cuda"
    frames = encode(header, layers, version, pinned=pinned)
    if CORRUPT_KV in faults:
        frames = _corrupted(frames)

    def done(sent: int) -> None:
        connector.close_kv(handle)
        metrics.on_kv_transfer("sent", sent)
    return KVStreamResponse(frames, stream_size(header), header.payload_bytes, done)


def _segmented_response(connector: KVConnector, metrics: WorkerMetrics, faults: frozenset[str], handle: str,
                        start: int, segment_tokens: int) -> KVStreamResponse:
    if segment_tokens < 1:
        raise APIError(400, "segment_tokens: a segmented stream (kv_version 4) takes segments of at least 1 token",
                       param="segment_tokens")
    try:
        header, segments, first = connector.open_segments(handle, start, segment_tokens)
    except KeyError:
        raise APIError(404, f"no early prefill {handle!r}: unknown, released or expired", code="kv_not_found")
    except ValueError as e:
        raise APIError(400, str(e), param="start")
    if -(-header.num_tokens // segment_tokens) > MAX_SEGMENTS:
        connector.close_early(handle)
        raise APIError(400, f"segment_tokens: {header.num_tokens} tokens in segments of {segment_tokens} make more "
                       f"than {MAX_SEGMENTS} segments", param="segment_tokens")
    cuda = connector.engine.runner.device.type == "cuda"

    def done(sent: int) -> None:
        connector.close_early(handle)
        metrics.on_kv_transfer("sent", sent)
    frames = encode_segments(header, segments, first, pinned=cuda)
    if CORRUPT_KV in faults:
        frames = _corrupted(frames)
    return KVStreamResponse(frames, stream_size(header, segment_tokens), header.payload_bytes, done, _segmented)
