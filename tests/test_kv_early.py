"""A prefill's KV streamed while its prompt is still being computed (kv/early.py): a
segmented stream (version 4) read while the engine computes later chunks carries exactly
the keys and values, and the first token, that the finished prefill holds; a prefill that is
aborted half-way breaks the stream, and the blocks it was reading stay out of anyone else's
hands until the stream is over."""

import json
import socket
import threading
import time

import pytest
import torch

from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams
from fleetwise.worker.kv.connector import KVConnector
from fleetwise.worker.kv.receive import receive
from fleetwise.worker.kv.slots import KVLayers
from fleetwise.worker.kv.transfer import KVTransferError, encode, encode_segments, stream_size

BS, CHUNK, SEGMENT = 8, 16, 12  # segments that do not line up with blocks or chunks
PROMPT = list(range(3, 63))     # 60 tokens: four chunks


def engine(model_dir) -> tuple[LLMEngine, KVConnector]:
    core = LLMEngine(EngineConfig(model=str(model_dir), block_size=BS, num_blocks=64, max_num_batched_tokens=CHUNK,
                                  kv_lease_seconds=60))
    core.kv_connector = connector = KVConnector(core)
    return core, connector


class Reader(threading.Thread):
    """A segmented stream encoded in its own thread, as the prefill worker's response does;
    notes how much of the prompt was computed when each segment went."""

    def __init__(self, connector: KVConnector, handle: str):
        super().__init__(daemon=True)
        self.connector, self.handle = connector, handle
        self.early = connector.early[handle]
        self.header, segs, first = connector.open_segments(handle, 0, SEGMENT)
        self.frames = encode_segments(self.header, self._noted(segs), first)
        self.computed_at: list[int] = []
        self.sent = 0
        self.stream = b""
        self.error: Exception | None = None

    def _noted(self, segs):
        for start, n, layers in segs:
            self.computed_at.append(self.early.progress.computed)
            yield start, n, layers
            self.sent = start + n

    def run(self):
        try:
            self.stream = b"".join(map(bytes, self.frames))
        except Exception as e:
            self.error = e
        finally:
            self.connector.close_early(self.handle)


def step_until_done(core: LLMEngine, connector: KVConnector, reader: Reader, stop_after: int | None = None) -> None:
    """The engine loop's rounds (expire, then a step), each time letting the reader take
    every segment that is computed before the next chunk is."""
    while core.has_work():
        connector.expire()
        ready = (connector.early[reader.handle].progress.computed // SEGMENT) * SEGMENT
        deadline = time.monotonic() + 10
        while reader.sent < ready and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        if stop_after is not None and connector.early[reader.handle].progress.computed >= stop_after:
            core.abort_request(reader.handle)
            break
        core.step()
    for _ in range(3):
        connector.expire()  # publishes what the last step finished
    reader.join(10)


def received(model_dir, header, stream: bytes) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """The stream read into a decode worker's reserved blocks, as a pull reads it."""
    core, connector = engine(model_dir)
    res = connector.reserve_kv("d", PROMPT, 0, SamplingParams(max_tokens=2))
    assert res is not None and res.start == 0
    a, b = socket.socketpair()
    try:
        b.sendall(stream)
        b.shutdown(socket.SHUT_WR)
        first = receive(a, len(stream), header, connector.kv_sink(res))
    finally:
        a.close()
        b.close()
    return list(KVLayers(core.runner.kv_caches, BS, res.blocks.tolist(), 0, res.num_tokens)), first


def early_prefill(model_dir) -> tuple[LLMEngine, KVConnector, Reader]:
    """An early prefill of PROMPT, its segmented stream being read in a thread."""
    core, connector = engine(model_dir)
    connector.expect_early("p", len(PROMPT))
    core.add_request("p", PROMPT, SamplingParams(max_tokens=1, temperature=0), hold_kv=True)
    reader = Reader(connector, "p")
    reader.start()
    return core, connector, reader


def test_a_stream_read_while_chunks_compute_carries_the_kv_and_first_token_of_the_finished_prefill(tiny_model_dir):
    core, connector, reader = early_prefill(tiny_model_dir)
    step_until_done(core, connector, reader)
    assert reader.error is None
    assert len(reader.stream) == stream_size(reader.header, SEGMENT)
    # it started while the prompt was still being computed: each segment once its chunk was
    assert reader.computed_at == [16, 32, 48, 48, 60]  # four of five segments before the last chunk
    # what the finished prefill holds under its lease, read the usual way afterwards
    header, layers = connector.open_kv("p")
    after = b"".join(map(bytes, encode(header, layers, 3)))
    connector.close_kv("p")
    want = list(KVLayers(core.runner.kv_caches, BS, connector.leases["p"].seq.block_table, 0, len(PROMPT)))
    got, first = received(tiny_model_dir, reader.header, reader.stream)
    assert all(torch.equal(x, y) for pair, w in zip(got, want) for x, y in zip(pair, w))
    got_after, _ = received(tiny_model_dir, header, after)
    assert all(torch.equal(x, y) for pair, w in zip(got_after, got) for x, y in zip(pair, w))
    seq = connector.leases["p"].seq
    assert first == {"first_token": seq.output_token_ids[0], "finish_reason": "length", "first_logprob": None}
    # released: the lease and the pins go, every block is free again
    free_before = core.block_manager.num_blocks
    assert connector.release_kv("p")
    connector.expire()
    assert not connector.early and not connector.leases and core.block_manager.num_free_blocks == free_before


def test_an_aborted_prefill_breaks_its_stream_and_its_read_blocks_stay_pinned_until_released(tiny_model_dir):
    core, connector, reader = early_prefill(tiny_model_dir)
    step_until_done(core, connector, reader, stop_after=2 * CHUNK)
    assert isinstance(reader.error, KVTransferError) and "ended (abort)" in str(reader.error)
    pinned = connector.early["p"].pin.block_table
    assert len(pinned) == 2 * CHUNK // BS and all(core.block_manager.blocks[b].ref_count == 1 for b in pinned)
    assert not set(pinned) & set(core.block_manager.free_block_ids)  # nobody else gets them meanwhile
    assert connector.release_kv("p")
    connector.expire()
    assert not connector.early and core.block_manager.num_free_blocks == core.block_manager.num_blocks


@pytest.mark.parametrize("segment_tokens", [0, 61 * 4096])
def test_a_segmented_stream_is_refused_where_it_cannot_be_sent(tiny_model_dir, segment_tokens):
    from fleetwise.worker.api.kv_stream import kv_response
    from fleetwise.worker.api.openai import APIError
    core, connector = engine(tiny_model_dir)
    with pytest.raises(APIError) as e:
        kv_response(connector, core.metrics, frozenset(), "nobody", 0, 4, segment_tokens)
    assert e.value.status == (400 if segment_tokens == 0 else 404)


def _texts(sse: str) -> list[str]:
    """The texts of a streamed completion's events, in order."""
    events = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return [e["choices"][0]["text"] for e in events if e["choices"]]


def test_a_router_with_early_handoffs_gives_the_mixed_workers_tokens_and_pulls_while_computing(
        tiny_model_dir, tmp_path, monkeypatch):
    """Through a router with FLEETWISE_KV_EARLY=1 over chunked-prefill workers: the same
    streamed tokens as a mixed worker, the KV pulled (never recomputed) as an early prefill's
    segmented stream, and the prefill answered before its prompt was computed."""
    import httpx

    from fleetwise.router.handoff import KV_EARLY_ENV

    from .workers import start_router, start_worker, write_router_config
    cfg = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=BS, num_blocks=512,
                       max_num_batched_tokens=32)
    workers = {role: start_worker(cfg, role) for role in ("mixed", "prefill", "decode")}
    write_router_config(tmp_path / "d.yaml", "tiny", prefill=[workers["prefill"].internal_url],
                        decode=[workers["decode"].internal_url])
    monkeypatch.setenv(KV_EARLY_ENV, "1")
    router = start_router(tmp_path / "d.yaml")
    prefill = workers["prefill"].core
    answered_at: list[int] = []
    connector = prefill.kv_connector
    expect_early = connector.expect_early

    def noted(handle, n):  # how far the engine had got when the answer was made: nothing yet
        expect_early(handle, n)
        answered_at.append(connector.early[handle].progress.computed)
    connector.expect_early = noted
    try:
        for prompt in [list(range(5, 205)), list(range(7, 40))]:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
            want = httpx.post(workers["mixed"].url + "/v1/completions", json=body, timeout=60).text
            got = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
            assert got.status_code == 200

            assert _texts(got.text) == _texts(want) and "".join(_texts(want))
        metrics = workers["decode"].core.metrics
        assert sum(metrics.kv_recomputes.labels(model_name="tiny", role="decode", reason=r)._value.get()
                   for r in ("corrupt", "mismatch", "refused", "unreachable", "no_blocks")) == 0
        assert answered_at == [0, 0]
        workers["prefill"].wait_idle()
    finally:
        router.stop()
        for w in workers.values():
            w.stop()


def test_early_handoffs_wait_until_every_decode_replica_reads_segmented_streams(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """A decode worker whose /health names no stream version 4 (one of an older release,
    during a rolling upgrade) would refuse an early prefill's decode request: while it is up
    the router's handoffs are late, and once it names 4 they are early."""
    import httpx

    from fleetwise.router.handoff import KV_EARLY_ENV
    from fleetwise.worker.api import server

    from .workers import start_router, start_worker, write_router_config
    cfg = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=BS, num_blocks=512,
                       max_num_batched_tokens=32)
    workers = {role: start_worker(cfg, role) for role in ("prefill", "decode")}
    write_router_config(tmp_path / "d.yaml", "tiny", prefill=[workers["prefill"].internal_url],
                        decode=[workers["decode"].internal_url])
    monkeypatch.setenv(KV_EARLY_ENV, "1")
    monkeypatch.setattr(server, "KV_VERSIONS", (1, 2, 3))  # what the in-process workers' /health names
    router = start_router(tmp_path / "d.yaml")
    connector = workers["prefill"].core.kv_connector
    early: list[str] = []
    expect_early = connector.expect_early
    connector.expect_early = lambda handle, n: (early.append(handle), expect_early(handle, n))[1]
    decode = router.router.source.models()["tiny"].replicas["decode"][0]
    body = {"model": "tiny", "prompt": list(range(5, 105)), "max_tokens": 6, "temperature": 0, "stream": True}
    try:
        assert decode.kv_versions == (1, 2, 3)
        late = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert late.status_code == 200 and early == []
        monkeypatch.setattr(server, "KV_VERSIONS", (1, 2, 3, 4))
        deadline = time.monotonic() + 10
        while 4 not in decode.kv_versions and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200 and len(early) == 1

        assert _texts(answer.text) == _texts(late.text) and "".join(_texts(late.text))
        workers["prefill"].wait_idle()
    finally:
        router.stop()
        for w in workers.values():
            w.stop()
