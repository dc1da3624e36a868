"""The relay's per-chunk machinery on its own: the upstream read timeout (one timer per answer,
moved on lazily) and the tracker that keeps token-id lines unparsed until a stream must move."""

import asyncio
import json

import pytest

from fleetwise.router.tracker import RAW_BYTES, Tracker
from fleetwise.router.upstream import Pool, UpstreamTimeout


async def _serve(gaps: list[float]) -> tuple[asyncio.Server, int]:
    """A replica that answers every POST with a chunked body: one chunk after each gap."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for k, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            data = b"data: %d\n\n" % k
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read(gaps: list[float], timeout: float) -> list[bytes]:
    server, port = await _serve(gaps)
    pool = Pool(read_timeout=timeout)
    try:
        resp = await pool.post(f"http://127.0.0.1:{port}", "/x", b"{}")
        try:
            return [chunk async for chunk in resp.iter_chunks()]
        finally:
            resp.release()
    finally:
        pool.close()
        server.close()


def test_the_read_timeout_counts_from_the_last_chunk_not_from_the_first_wait():
    """Chunks 0.1 s apart for 1.2 s with a 0.5 s read timeout: never 0.5 s without a byte, so
    no timeout, though the answer takes longer than the timeout; a 1.5 s stall is one."""
    chunks = asyncio.run(_read([0.0] + [0.1] * 12, timeout=0.5))
    assert b"".join(chunks) == b"".join(b"data: %d\n\n" % k for k in range(13))
    with pytest.raises(UpstreamTimeout):
        asyncio.run(_read([0.0, 0.1, 1.5], timeout=0.5))


def _event(fw: dict, text: str) -> bytes:
    data = json.dumps({"choices": [{"text": text}]}).encode()
    return b"fw: " + json.dumps(fw).encode() + b"\ndata: " + data + b"\n\n"


def test_the_tracker_parses_ids_only_when_asked_and_bounds_what_it_keeps_unparsed():
    first = {"index": 0, "token_ids": [1], "prompt_token_ids": [9, 9], "id": "c", "created": 1}
    t = Tracker(max_kept=1 << 20)
    out = t.feed(_event(first, "a") + _event({"index": 0, "token_ids": [2]}, "b"))
    assert out.count(b"data: ") == 2 and b"fw:" not in out
    assert t.raw and not t.ids.choices  # relayed, not parsed
    assert t.choices[0].token_ids == [1, 2] and t.prompt == [9, 9] and not t.raw  # parsed when asked
    # a long stream: the lines kept unparsed stay under the bound, and every id is still kept in order
    n = 0
    while n < 3 * RAW_BYTES // 40:
        t.feed(_event({"index": 0, "token_ids": [n + 3]}, "x"))
        assert t.raw_bytes <= RAW_BYTES
        n += 1
    assert t.choices[0].token_ids == [1, 2, *range(3, n + 3)]
    # past max_kept the stream cannot move, and nothing more is kept for it
    small = Tracker(max_kept=3)
    for k in range(RAW_BYTES // 40):
        small.feed(_event({**first, "token_ids": [k]} if k == 0 else {"index": 0, "token_ids": [k]}, "x"))
    assert small.why_not == "too_long" and not small.raw and small.choices[0].token_ids == []
