"""The workers' internal API on its own listener: not on the public port, refused without
the shared token before any work, decode requests checked field by field (no pulls from
addresses that are not a worker's base address), bounded KV streams, capped leases."""

import asyncio
import http.server
import json
import struct
import threading

import httpx
import pytest
from typer.testing import CliRunner

from fleetwise.cli import app as cli
from fleetwise.protocol import KVHeader
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.kv import transfer
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


class _Chunks:
    """An async iterator over byte chunks that fails the test if read past them."""

    def __init__(self, *chunks: bytes):
        self.chunks = list(chunks)

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise AssertionError("read past what the check needed")
        return self.chunks.pop(0)


def _decode(source, expect: KVHeader) -> None:
    async def run():
        async for _ in transfer.decode(source, expect):
            pass
    asyncio.run(run())


EXPECT = KVHeader("m", "float32", 2, 2, 4, 0, 3)


def test_a_kv_stream_with_an_oversized_header_is_refused_unread():
    preamble = struct.pack("<4sHI", b"FWKV", transfer.VERSION, 1 << 30)
    with pytest.raises(KVTransferError, match="header of"):
        _decode(_Chunks(preamble), EXPECT)


def test_a_kv_frame_larger_than_the_models_shape_allows_is_refused_unread():
    head = json.dumps(EXPECT.__dict__).encode()
    preamble = struct.pack("<4sHI", b"FWKV", transfer.VERSION, len(head)) + head
    frame = struct.pack("<4sIQI", b"LAYR", 0, 1 << 40, 0)
    with pytest.raises(KVTransferError, match=f"expected {EXPECT.payload_bytes}"):
        _decode(_Chunks(preamble, frame), EXPECT)


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


def test_kv_streams_of_both_versions_carry_the_same_tensors_and_a_flipped_byte_is_caught():
    import torch
    layers = [(torch.randn(3, 2, 4), torch.randn(3, 2, 4)) for _ in range(2)]
    for version in (1, 2):
        stream = b"".join(bytes(f) for f in transfer.encode(EXPECT, iter(layers), version))
        assert struct.unpack("<H", stream[4:6])[0] == version

        async def read(data: bytes) -> list:
            async def chunks():
                yield data
            return [(k.clone(), v.clone()) async for _, k, v in transfer.decode(chunks(), EXPECT)]
        got = asyncio.run(read(stream))
        assert all(torch.equal(a, b) for pair, want in zip(got, layers) for a, b in zip(pair, want))
        bad = bytearray(stream)
        bad[-20] ^= 1  # inside the last layer's values
        with pytest.raises(KVTransferError, match="checksum"):
            asyncio.run(read(bytes(bad)))


@pytest.mark.parametrize("version", [1, 2])
def test_a_pull_in_either_stream_version_fills_the_same_kv(fleet, version):
    """A decode worker asks for the newest version; a sender of the previous release ignores
    the parameter and answers version 1, which still reads."""
    import aiohttp
    import torch
    p = fleet["prefill"]
    first = internal("POST", p, "/internal/prefill", json={"kind": "completion", "request": REQUEST}).json()
    connector = p.core.kv_connector
    expect = connector.header(0, len(first["prompt_token_ids"]))
    want = [(k.clone(), v.clone()) for k, v in connector.open_kv(first["handle"])[1]]
    connector.close_kv(first["handle"])
    got: list = []

    async def run() -> int:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {p.token}"}) as session:
            return await transfer.pull(session, p.internal_url, first["handle"], expect,
                                       lambda layer, k, v: got.append((k.clone(), v.clone())), version=version)
    assert asyncio.run(run()) == transfer.stream_size(expect)
    assert len(got) == len(want) and all(torch.equal(a, b) for pair, w in zip(got, want) for a, b in zip(pair, w))
    r = internal("GET", p, f"/internal/kv/{first['handle']}", params={"kv_version": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_version"
    assert internal("DELETE", p, f"/internal/kv/{first['handle']}").status_code == 204
