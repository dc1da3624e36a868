"""The workers' internal API on its own listener: not on the public port, refused without
the shared token before any work, decode requests checked field by field (no pulls from
addresses that are not a worker's base address), bounded KV streams, capped leases."""

import asyncio
import http.server
import json
import socket
import struct
import threading

import httpx
import pytest
from typer.testing import CliRunner

from fleetwise.cli import app as cli
from fleetwise.protocol import KVHeader
from fleetwise.worker.api import kv_stream
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams
from fleetwise.worker.kv import transfer
from fleetwise.worker.kv.connector import KVConnector
from fleetwise.worker.kv.pull import KVClient, StagingSink, pull
from fleetwise.worker.kv.receive import receive
from fleetwise.worker.kv.slots import CacheSink, KVLayers
from fleetwise.worker.kv.transfer import KVTransferError

from .workers import internal, start_worker

REQUEST = {"model": "tiny", "prompt": "the internal port", "max_tokens": 4, "temperature": 0}


def config(model_dir, **kw):
    return EngineConfig(model=str(model_dir), served_model_name="tiny", block_size=8, num_blocks=256, **kw)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    workers = {role: start_worker(config(tiny_model_dir), role) for role in ("prefill", "decode", "mixed")}
    yield workers
    for w in workers.values():
        w.stop()


def served(worker) -> float:
    return worker.core.metrics.prompt_tokens.labels(model_name="tiny")._value.get()


def kv_bytes(worker, direction: str) -> float:
    return worker.core.metrics.kv_bytes.labels(model_name="tiny", role=worker.core.metrics.role,
                                               direction=direction)._value.get()


class Listener:
    """A plain HTTP server on loopback that records every request it gets."""

    def __init__(self):
        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                self.send_response(404)
                self.end_headers()
            do_DELETE = do_GET

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_the_public_port_serves_no_internal_route(fleet):
    p = fleet["prefill"]
    for method, path in [("POST", "/internal/prefill"), ("POST", "/internal/decode"),
                         ("GET", "/internal/kv/h-1"), ("DELETE", "/internal/kv/h-1")]:
        r = httpx.request(method, p.url + path, headers=p.auth, json={"kind": "completion", "request": REQUEST})
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    assert not p.core.requests and not p.core.kv_connector.leases
    # the public API stays there, without a token
    assert httpx.post(fleet["mixed"].url + "/v1/completions", json=REQUEST, timeout=30).status_code == 200
    for path in ("/health", "/metrics", "/v1/models"):
        assert httpx.get(fleet["mixed"].url + path, timeout=10).status_code == 200
    assert httpx.get(fleet["mixed"].url + "/docs", timeout=10).status_code == 404


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", "Basic dGVzdA==", "Bearer"])
def test_the_internal_port_refuses_a_caller_without_the_token_before_any_work(fleet, auth):
    p, d = fleet["prefill"], fleet["decode"]
    headers = {"authorization": auth} if auth else {}
    before = served(p), served(d)
    calls = [(p, "POST", "/internal/prefill", {"kind": "completion", "request": REQUEST}),
             (d, "POST", "/internal/decode", {"kind": "completion", "request": REQUEST, "prompt_token_ids": [1, 2],
                                              "first_token": 3}),
             (p, "GET", "/internal/kv/h-1", None), (p, "DELETE", "/internal/kv/h-1", None),
             (d, "POST", "/v1/completions", REQUEST), (d, "GET", "/health", None)]
    for w, method, path, body in calls:
        r = httpx.request(method, w.internal_url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_internal_token" and "Bearer" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert (served(p), served(d)) == before
    assert not p.core.requests and not d.core.requests and not p.core.kv_connector.leases


def test_the_internal_port_serves_completions_and_health_with_the_token_and_nothing_public_only(fleet):
    m = fleet["mixed"]
    assert internal("POST", m, "/v1/completions", json=REQUEST).status_code == 200
    assert internal("POST", m, "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
    assert internal("GET", m, "/health").json()["status"] == "ok"
    assert internal("GET", m, "/metrics").status_code == 404


def test_a_handoff_pulls_with_the_token(fleet):
    p, d = fleet["prefill"], fleet["decode"]
    sent, received = kv_bytes(p, "sent"), kv_bytes(d, "received")
    first = internal("POST", p, "/internal/prefill", json={"kind": "completion", "request": REQUEST}).json()
    r = internal("POST", d, "/internal/decode", json={
        "kind": "completion", "request": REQUEST, "prompt_token_ids": first["prompt_token_ids"],
        "first_token": first["first_token"], "prefill_url": p.internal_url, "handle": first["handle"]})
    assert r.status_code == 200, r.text
    assert kv_bytes(p, "sent") > sent and kv_bytes(d, "received") > received  # pulled, not recomputed
    p.wait_idle()
    d.wait_idle()


def decode_body(**fields) -> dict:
    return {"kind": "completion", "request": REQUEST, "prompt_token_ids": [1, 2, 3], "first_token": 5, **fields}


@pytest.mark.parametrize("url", ["{}/internal/kv", "{}/", "{}?x=1", "{}#f", "ftp://127.0.0.1:21",
                                 "http://user:pw@127.0.0.1:{port}", "http://127.0.0.1", "not a url"])
def test_a_decode_request_naming_anything_but_a_base_address_is_refused_and_nothing_fetched(fleet, url):
    listener = Listener()
    try:
        port = listener.url.rsplit(":", 1)[1]
        body = decode_body(handle="h-1", prefill_url=url.format(listener.url, port=port))
        r = internal("POST", fleet["decode"], "/internal/decode", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prefill_url"
        assert listener.requests == []
        assert not fleet["decode"].core.requests
    finally:
        listener.close()


def test_a_caller_without_the_token_cannot_make_a_worker_fetch_anything(fleet):
    listener = Listener()
    try:
        body = decode_body(handle="h-1", prefill_url=listener.url)
        r = httpx.post(fleet["decode"].internal_url + "/internal/decode", json=body, timeout=30)
        assert r.status_code == 401
        r = httpx.post(fleet["decode"].url + "/internal/decode", json=body, timeout=30)
        assert r.status_code == 404
        assert listener.requests == []
    finally:
        listener.close()


@pytest.mark.parametrize("field, value", [
    ("first_token", "vocab"), ("prompt_token_ids", ["vocab"]), ("prompt_token_ids", [-1]),
    ("first_logprob", [float("nan"), []]), ("first_logprob", [float("-inf"), []]),
    ("first_logprob", [-0.5, [[5, float("inf")]]]), ("first_logprob", [-0.5, [[-1, -0.5]]]),
    ("first_logprob", [-0.5, [["vocab", -0.5]]]),
    ("handle", "../../admin")])
def test_decode_fields_outside_the_model_or_the_protocol_are_400s(fleet, field, value):
    d = fleet["decode"]
    vocab = d.core.model_config.vocab_size
    if value == "vocab":
        value = vocab
    elif value == ["vocab"]:
        value = [1, vocab]
    elif field == "first_logprob" and value[1] and value[1][0][0] == "vocab":
        value = [-0.5, [[vocab, -0.5]]]
    body = json.dumps(decode_body(**{field: value}))  # NaN and Infinity as Python's json writes them
    r = internal("POST", d, "/internal/decode", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert not d.core.requests


def _decode(expect: KVHeader, *chunks: bytes) -> list:
    """The stream of `chunks` read by the decode side's receiver off a socket; the keys and
    values of its layers. The sending end stays open: a receiver that read past what its
    checks needed would wait and time out instead of refusing."""
    got: list = []
    a, b = socket.socketpair()
    a.settimeout(5)
    try:
        for chunk in chunks:
            b.sendall(chunk)
        sink = StagingSink(expect, lambda i, k, v: got.append((k.clone(), v.clone())))
        receive(a, sum(map(len, chunks)), expect, sink)
    finally:
        a.close()
        b.close()
    return got


EXPECT = KVHeader("m", "float32", 2, 2, 4, 0, 3)


def test_a_kv_stream_with_an_oversized_header_is_refused_unread():
    preamble = struct.pack("<4sHI", b"FWKV", transfer.VERSION, 1 << 30)
    with pytest.raises(KVTransferError, match="header of"):
        _decode(EXPECT, preamble)


def test_a_kv_frame_larger_than_the_models_shape_allows_is_refused_unread():
    head = json.dumps(EXPECT.__dict__).encode()
    preamble = struct.pack("<4sHI", b"FWKV", transfer.VERSION, len(head)) + head
    frame = struct.pack("<4sIQI", b"LAYR", 0, 1 << 40, 0)
    with pytest.raises(KVTransferError, match=f"expected {EXPECT.payload_bytes}"):
        _decode(EXPECT, preamble, frame)


def test_leases_beyond_the_cap_get_429_before_any_work(tiny_model_dir):
    prefill = start_worker(config(tiny_model_dir, max_kv_leases=2, max_kv_lease_fraction=0.1), "prefill")
    try:
        handles = []
        for i in range(2):
            r = internal("POST", prefill, "/internal/prefill",
                         json={"kind": "completion", "request": {**REQUEST, "prompt": f"hold {i}"}})
            assert r.status_code == 200, r.text
            handles.append(r.json()["handle"])
        before = served(prefill)
        r = internal("POST", prefill, "/internal/prefill", json={"kind": "completion", "request": REQUEST})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "kv_leases_full" and "2 KV leases" in r.json()["error"]["message"]
        assert served(prefill) == before and len(prefill.core.kv_connector.leases) == 2
        # once a lease is let go, a new one is taken
        assert internal("DELETE", prefill, f"/internal/kv/{handles.pop()}").status_code == 204
        r = internal("POST", prefill, "/internal/prefill", json={"kind": "completion", "request": REQUEST})
        assert r.status_code == 200, r.text
        handles.append(r.json()["handle"])
        for h in handles:
            internal("DELETE", prefill, f"/internal/kv/{h}")
        # a tenth of 256 blocks of 8 tokens: a 300-token prompt alone passes the blocks cap
        long = {**REQUEST, "prompt": list(range(1, 301))}
        r = internal("POST", prefill, "/internal/prefill", json={"kind": "completion", "request": long})
        assert r.status_code == 429 and "blocks" in r.json()["error"]["message"]
        prefill.wait_idle()
    finally:
        prefill.stop()


def test_a_worker_without_a_token_refuses_to_start_and_says_how_to_run_public_only(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("FLEETWISE_INTERNAL_TOKEN_FILE", raising=False)
    runner = CliRunner()
    for role in ("prefill", "decode", "mixed"):
        result = runner.invoke(cli, ["worker", "--model", str(tiny_model_dir), "--role", role])
        assert result.exit_code == 2
        assert "--internal-token-file" in result.output and "--public-only" in result.output
    result = runner.invoke(cli, ["worker", "--model", str(tiny_model_dir), "--role", "prefill", "--public-only"])
    assert result.exit_code == 2 and "only a mixed worker" in result.output


class _Layers:
    """Given tensors as a stream's layers (kv/transfer.py's LayerSource)."""

    def __init__(self, layers):
        self.layers = layers

    def __len__(self):
        return len(self.layers)

    def gather(self, layer, out):
        out[0].copy_(self.layers[layer][0])
        out[1].copy_(self.layers[layer][1])
        return out


def test_kv_streams_of_every_version_carry_the_same_tensors_and_a_flipped_byte_is_caught():
    import torch
    layers = [(torch.randn(3, 2, 4), torch.randn(3, 2, 4)) for _ in range(2)]
    for version in (v for v in transfer.VERSIONS if v != transfer.SEGMENTED):  # 4: test_kv_early.py
        stream = b"".join(bytes(f) for f in transfer.encode(EXPECT, _Layers(layers), version))
        assert struct.unpack("<H", stream[4:6])[0] == version and len(stream) == transfer.stream_size(EXPECT)
        got = _decode(EXPECT, stream)
        assert len(got) == 2 and all(torch.equal(a, b) for pair, want in zip(got, layers) for a, b in zip(pair, want))
        bad = bytearray(stream)
        bad[-20] ^= 1  # inside the last layer's values
        with pytest.raises(KVTransferError, match="checksum"):
            _decode(EXPECT, bytes(bad))
        with pytest.raises(KVTransferError, match="bytes after the end"):
            _decode(EXPECT, stream + b"x")
        with pytest.raises(KVTransferError, match="ends early"):
            _decode(EXPECT, stream[:-30])


@pytest.mark.parametrize("version", [1, 2, 3, "older"])
def test_a_pull_in_every_stream_version_fills_the_same_kv(fleet, tiny_model_dir, version, monkeypatch):
    """A decode worker asks for the newest version; a sender of an older release ignores
    the parameter and answers version 1, which still reads, or ("older") refuses version 3
    and is asked again for version 2. Pulled into a decode worker's
    reserved blocks (straight into its paged cache), the keys and values are the prefill
    worker's, byte for byte, and a second pull reuses the connection."""
    import torch
    p = fleet["prefill"]
    engine = LLMEngine(config(tiny_model_dir))  # a decode side with no engine thread of its own
    decode = KVConnector(engine)
    prompt = {**REQUEST, "prompt": list(range(1, 30))}  # three blocks of 8 and a partial one
    first = internal("POST", p, "/internal/prefill", json={"kind": "completion", "request": prompt}).json()
    connector = p.core.kv_connector
    expect = connector.header(0, len(first["prompt_token_ids"]))
    want = list(connector.open_kv(first["handle"])[1])
    connector.close_kv(first["handle"])
    client = KVClient({"Authorization": f"Bearer {p.token}"})
    asked: list[int] = []
    if version == "older":  # the release before: versions 1 and 2, a 400 for any other
        monkeypatch.setattr(kv_stream, "answer_version", lambda v: asked.append(v) or (v if v in (1, 2) else None))
    try:
        for _ in range(2):
            res = decode.reserve_kv(f"pull-{version}-{_}", first["prompt_token_ids"], first["first_token"],
                                    SamplingParams(max_tokens=2))
            assert res is not None and res.start == 0
            try:
                n = asyncio.run(pull(client, p.internal_url, first["handle"], expect, decode.kv_sink(res),
                                     version=None if version == "older" else version))
                assert n == transfer.stream_size(expect)
                got = list(KVLayers(engine.runner.kv_caches, 8, res.blocks.tolist(), 0, res.num_tokens))
                assert all(torch.equal(a, b) for pair, w in zip(got, want) for a, b in zip(pair, w))
            finally:
                engine.abort_request(res.request_id)
        assert sum(map(len, client.idle.values())) == 1  # kept alive and used again
        assert asked == ([3, 2] * 2 if version == "older" else [])
    finally:
        client.close()
        internal("DELETE", p, f"/internal/kv/{first['handle']}")


@pytest.mark.parametrize("lo", [0, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # numpy has no bfloat16: views go through bytes
def test_layers_are_gathered_and_received_in_the_caches_own_slots(lo, dtype):
    """What KVLayers gathers out of scattered blocks is the cache's slots token by token,
    and CacheSink's views are exactly those slots, keys then values."""
    import torch
    bs, blocks, n = 4, [7, 2, 3, 9], 13  # blocks 2 and 3 are consecutive: one view
    dt = getattr(torch, dtype)
    caches = [torch.randn(2, 12 * bs, 2, 3).to(dt) for _ in range(2)]
    slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n)])
    layers = KVLayers(caches, bs, blocks, lo, n)
    for i, (k, v) in enumerate(layers):
        assert torch.equal(k, caches[i][0, slots[lo:]]) and torch.equal(v, caches[i][1, slots[lo:]])
    # seen in place, the layers make the stream a gather makes, byte for byte
    class Gathered:
        def __len__(self):
            return len(layers)

        def gather(self, layer, out):
            return layers.gather(layer, out)
    header = KVHeader("m", dtype, 2, 2, 3, lo, n - lo)
    in_place = list(transfer.encode(header, layers, transfer.VERSION))
    assert len(in_place) > 2 + 2 + 1 and all(isinstance(f, memoryview) for f in in_place[2:4])
    assert b"".join(map(bytes, in_place)) == b"".join(map(bytes, transfer.encode(header, Gathered(),
                                                                                 transfer.VERSION)))
    sink = CacheSink(caches, bs, blocks, n)
    views = sink.views(1)
    assert len(views) == 2 * 3 and sum(map(len, views)) == 2 * n * 2 * 3 * caches[0].element_size()
    payload = torch.randn(2, n, 2, 3).to(dt)
    raw = payload.view(-1).view(torch.uint8).numpy().tobytes()
    at = 0
    for view in views:
        view[:] = raw[at:at + len(view)]
        at += len(view)
    assert torch.equal(caches[1][0, slots], payload[0]) and torch.equal(caches[1][1, slots], payload[1])
