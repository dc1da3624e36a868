"""A prefill's KV streamed while its prompt is still being computed (kv/early.py): a
segmented stream (version 4) read while the engine computes carries exactly the keys and
values, and the first token, that the finished prefill holds; each layer of a segment goes
once the step computing it has written that layer, never before, and not only once the step
is over; a prefill that is aborted half-way breaks the stream, and the blocks it was reading
stay out of anyone else's hands until the stream is over."""

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
from fleetwise.worker.kv.early import Progress
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


class Noted:
    """A segment's layer source that notes, for each layer it hands the encoder, the
    prefill's progress at that moment."""

    def __init__(self, reader: "Reader", start: int, end: int, layers):
        self.reader, self.start, self.end, self.layers = reader, start, end, layers

    def __len__(self) -> int:
        return len(self.layers)

    def views(self, layer: int):
        views = self.layers.views(layer)
        self.reader.note(self.start, self.end, layer)
        return views


class Reader(threading.Thread):
    """A segmented stream encoded in its own thread, as the prefill worker's response does;
    notes the prefill's progress as each layer of each segment goes."""

    def __init__(self, connector: KVConnector, handle: str, segment_tokens: int = SEGMENT):
        super().__init__(daemon=True)
        self.connector, self.handle = connector, handle
        self.early = connector.early[handle]
        self.header, segs, first = connector.open_segments(handle, 0, segment_tokens)
        self.frames = encode_segments(self.header, self._noted(segs), first)
        self.sent: dict[tuple[int, int], tuple[int, Progress]] = {}  # (segment start, layer): (end, progress)
        self.changed = threading.Condition()
        self.stream = b""
        self.error: Exception | None = None

    def _noted(self, segs):
        for start, n, layers in segs:
            yield start, n, Noted(self, start, start + n, layers)

    def note(self, start: int, end: int, layer: int) -> None:
        p = self.early.progress
        with self.changed:
            self.sent[start, layer] = (end, Progress(p.computed, [], p.scheduled, p.layers))
            self.changed.notify_all()

    def wait_sent(self, start: int, layer: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: (start, layer) in self.sent, timeout)

    def run(self):
        try:
            self.stream = b"".join(map(bytes, self.frames))
        except Exception as e:
            self.error = e
        finally:
            self.connector.close_early(self.handle)


def step_until_done(core: LLMEngine, connector: KVConnector, reader: Reader, stop_after: int | None = None) -> None:
    """The engine loop's rounds (expire, then a step) until the prefill is done (or
    aborted once `stop_after` tokens are computed)."""
    while core.has_work():
        connector.expire()
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


def early_prefill(model_dir, segment_tokens: int = SEGMENT) -> tuple[LLMEngine, KVConnector, Reader]:
    """An early prefill of PROMPT, its segmented stream being read in a thread."""
    core, connector = engine(model_dir)
    connector.expect_early("p", len(PROMPT))
    core.add_request("p", PROMPT, SamplingParams(max_tokens=1, temperature=0), hold_kv=True)
    reader = Reader(connector, "p", segment_tokens)
    reader.start()
    return core, connector, reader


def holding_a_layer(connector: KVConnector, reader: Reader, start: int, layer: int) -> list[bool]:
    """Each step that computes token `start` waits, once it has written layer `layer`, for
    the reader to send that layer of the segment from `start` (at most 10 s) before it goes
    on; the list gets whether the reader did."""
    got: list[bool] = []
    step_started = connector.step_started

    def started(batch):
        layer_done = step_started(batch)
        p = reader.early.progress
        if layer_done is None or not p.computed <= start < p.scheduled:
            return layer_done

        def held(i: int) -> None:
            layer_done(i)
            if i == layer:
                got.append(reader.wait_sent(start, layer))
        return held
    connector.step_started = started  # type: ignore[method-assign]
    return got


def test_a_stream_read_while_chunks_compute_carries_the_kv_and_first_token_of_the_finished_prefill(tiny_model_dir):
    core, connector, reader = early_prefill(tiny_model_dir)
    layers = core.model_config.num_hidden_layers
    # the last segment's first layer goes while the last chunk's later layers still compute
    overlapped = holding_a_layer(connector, reader, 48, 0)
    step_until_done(core, connector, reader)
    assert reader.error is None
    assert len(reader.stream) == stream_size(reader.header, SEGMENT)
    assert overlapped == [True]
    # no layer went before the step that computes its tokens had written it
    assert len(reader.sent) == 5 * layers
    assert all(p.has(end, layer) for (_, layer), (end, p) in reader.sent.items())
    assert reader.sent[48, 0][1].computed == 48  # before the prompt's last chunk was done
    # what the finished prefill holds under its lease, read the usual way afterwards
    header, held = connector.open_kv("p")
    after = b"".join(map(bytes, encode(header, held, 3)))
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


def test_a_segment_of_one_chunk_leaves_layer_by_layer_while_its_step_computes(tiny_model_dir):
    """Segments of the step budget (what a prefill worker announces): every layer of every
    segment goes before the step that computes it is over."""
    core, connector, reader = early_prefill(tiny_model_dir, CHUNK)
    last = core.model_config.num_hidden_layers - 1
    overlapped = [holding_a_layer(connector, reader, start, last - 1) for start in range(0, len(PROMPT), CHUNK)]
    step_until_done(core, connector, reader)
    assert reader.error is None and overlapped == [[True]] * 4
    for start in range(0, len(PROMPT), CHUNK):
        for layer in range(last):  # all but the last before the step was over
            end, p = reader.sent[start, layer]
            assert p.computed == start and p.scheduled == end and p.has(end, layer)
    got, _ = received(tiny_model_dir, reader.header, reader.stream)
    want = list(KVLayers(core.runner.kv_caches, BS, connector.leases["p"].seq.block_table, 0, len(PROMPT)))
    assert all(torch.equal(x, y) for pair, w in zip(got, want) for x, y in zip(pair, w))
    assert connector.release_kv("p")
    connector.expire()
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


class Event:
    """Stands for a CUDA event: which one a stream waits for is what matters."""


def test_on_a_gpu_a_layer_is_read_after_the_event_of_its_write(tiny_model_dir):
    """Where the host only queued the work, the stream's gather waits (on the device) for
    the event recorded after the layer of the step in flight, or, once the tokens are
    computed, for the one recorded when that was published (a middle chunk samples nothing,
    so nothing else orders the gather after its writes); a layer not yet written is not
    read at all."""
    from fleetwise.worker.kv.early import EarlyPrefill, LayerWise
    early = EarlyPrefill("p", 32, float("inf"))
    caches = [torch.zeros(2, 64, 1, 4) for _ in range(3)]
    layers = LayerWise(early, 16, KVLayers(caches, BS, [0, 1], 0, 16), 0.2, None)
    early.begin_step(16, [0, 1])
    events = [Event(), Event()]
    for i, event in enumerate(events):
        early.layer_done(i, event)
    assert layers.ready(1) is events[1] and layers.ready(0) is events[0]
    assert layers.pending(2) and not layers.pending(1)
    with pytest.raises(KVTransferError, match="scheduled with layer 2 done"):
        layers.ready(2)  # the third layer is not written yet: the stream waits, then gives up
    written = Event()
    early.publish(16, [0, 1], written=written)
    assert layers.ready(0) is written and layers.ready(2) is written and not layers.pending(2)


def test_a_stream_sends_the_layers_written_before_it_waits_for_the_next(tiny_model_dir):
    """The response takes frames in batches of megabytes, or up to a flush: a layer still
    being computed flushes what is ready, so that a small layer does not wait for the next."""
    from fleetwise.protocol import KVHeader
    from fleetwise.worker.api.kv_stream import HOP_BYTES, _take
    from fleetwise.worker.kv.early import EarlyPrefill, segments
    early = EarlyPrefill("p", 16, float("inf"))
    caches = [torch.zeros(2, 64, 1, 4, dtype=torch.float16) for _ in range(3)]
    header = KVHeader("m", "float16", 3, 1, 4, 0, 16)
    frames = encode_segments(header, segments(early, caches, BS, 0, 16, 5.0), lambda: {"first_token": 1})
    next(frames)  # the preamble, which the response sends alone
    early.begin_step(16, [0, 1])
    early.layer_done(0, None)
    took: list = []
    thread = threading.Thread(target=lambda: took.append(_take(frames, HOP_BYTES)), daemon=True)
    thread.start()
    thread.join(3)
    assert took, "the layer that was ready waited for the next one"
    assert sum(map(len, took[0])) == 12 + 20 + header.payload_bytes  # the segment's head and layer 0
    for layer in (1, 2):
        early.layer_done(layer, None)
    early.publish(16, [0, 1], first={"first_token": 1})
    rest = b"".join(map(bytes, frames))
    assert len(rest) + sum(map(len, took[0])) + len(header_bytes(header)) == stream_size(header, 16)


def header_bytes(header) -> bytes:
    from fleetwise.worker.kv.transfer import _preamble
    return _preamble(header, 4)


def test_a_step_that_fails_while_its_kv_streams_breaks_the_stream_and_the_prompt_still_completes(tiny_model_dir):
    """The failed step's sequences run again one by one, rewriting layers a stream may be
    reading: the stream breaks (the decode side recomputes), the prefill itself finishes."""
    core, connector, reader = early_prefill(tiny_model_dir)
    step_started = connector.step_started

    def failing(batch):
        layer_done = step_started(batch)
        if layer_done is None or reader.early.progress.scheduled != 2 * CHUNK:
            return layer_done

        def fail(i: int) -> None:
            layer_done(i)
            raise RuntimeError("a device error in the second chunk")
        return fail
    connector.step_started = failing  # type: ignore[method-assign]
    step_until_done(core, connector, reader)
    assert isinstance(reader.error, KVTransferError) and "step that failed" in str(reader.error)
    assert connector.leases["p"].seq.num_computed_tokens >= len(PROMPT)  # computed all the same, and held
    assert connector.release_kv("p")
    connector.expire()
    assert not connector.early and core.block_manager.num_free_blocks == core.block_manager.num_blocks


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
    segment_sizes: list[int] = []
    open_segments = connector.open_segments

    def opened(handle, start, segment_tokens):  # the decode worker pulls in the prefill's step budget
        segment_sizes.append(segment_tokens)
        return open_segments(handle, start, segment_tokens)
    connector.open_segments = opened
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
        assert answered_at == [0, 0] and segment_sizes == [32, 32]
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
