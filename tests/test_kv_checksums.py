"""A held prompt's checksums taken once, when its lease is made (kv/slots.py's HeldChecksums),
and the pull's request sent from the event loop on a kept connection (kv/pull.py): the
streams stay byte for byte what a sender that checksums as it goes makes, the precomputed
values are the ones sent, and a kept connection the worker has dropped still pulls."""

import asyncio
import socket
import threading

import pytest
import torch

from fleetwise.protocol import KVHeader
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams
from fleetwise.worker.kv import transfer
from fleetwise.worker.kv.connector import KVConnector
from fleetwise.worker.kv.pull import KVClient, pull
from fleetwise.worker.kv.slots import HeldChecksums, KVLayers
from fleetwise.worker.kv.transfer import KVTransferError

from .test_internal_api import REQUEST, _decode, config
from .workers import internal, start_worker

pytestmark = pytest.mark.skipif(transfer.crc32_combine is None, reason="needs zlib-ng's crc32_combine")


def _stream(header: KVHeader, layers, version: int) -> bytes:
    return b"".join(map(bytes, transfer.encode(header, layers, version)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_held_checksums_combine_to_each_streams_own_from_any_block(dtype):
    bs, blocks, n = 4, [7, 2, 3, 9, 0], 18  # scattered, two consecutive, the last one partly filled
    caches = [torch.randn(2, 12 * bs, 2, 3).to(getattr(torch, dtype)) for _ in range(3)]
    held = HeldChecksums(caches, bs, blocks, n)
    for first in range(len(blocks)):
        header = KVHeader("m", dtype, 3, 2, 3, first * bs, n - first * bs)
        plain = KVLayers(caches, bs, blocks[first:], 0, n - first * bs)
        known = KVLayers(caches, bs, blocks[first:], 0, n - first * bs, held.layers(first))
        for version in (1, 3):
            assert _stream(header, known, version) == _stream(header, plain, version)
        # version 2 checksums with CRC-32C: the CRC-32s known are not its own and go unused
        assert _stream(header, known, 2) == _stream(header, plain, 2)


def test_a_sender_sends_the_checksums_it_knows_and_a_wrong_one_is_caught():
    bs, blocks, n = 4, [1, 5], 7
    caches = [torch.randn(2, 8 * bs, 2, 3) for _ in range(2)]
    header = KVHeader("m", "float32", 2, 2, 3, 0, n)
    right = HeldChecksums(caches, bs, blocks, n).layers(0)
    wrong = [right[0], right[1] ^ 1]
    assert len(_decode(header, _stream(header, KVLayers(caches, bs, blocks, 0, n, right), 3))) == 2
    with pytest.raises(KVTransferError, match="layer 1: checksum"):
        _decode(header, _stream(header, KVLayers(caches, bs, blocks, 0, n, wrong), 3))


@pytest.fixture(scope="module")
def prefill(tiny_model_dir):
    worker = start_worker(config(tiny_model_dir), "prefill")
    yield worker
    worker.stop()


def _lease(prefill, n: int) -> dict:
    prompt = {**REQUEST, "prompt": list(range(1, n + 1))}
    return internal("POST", prefill, "/internal/prefill", json={"kind": "completion", "request": prompt}).json()


def test_a_lease_takes_its_checksums_and_streams_from_a_block_use_them(prefill):
    connector = prefill.core.kv_connector
    first = _lease(prefill, 29)  # three blocks of 8 and a partial one
    handle = first["handle"]
    try:
        lease = connector.leases[handle]
        assert lease.checksums is not None
        held = lease.checksums.result(timeout=10)
        for start, known in ((0, True), (8, True), (16, True), (3, False)):
            header, layers = connector.open_kv(handle, start)
            try:
                plain = KVLayers(layers.caches, layers.bs, layers.block_ids, layers.lo, layers.hi)
                assert (layers.crcs is not None) == known
                if known:
                    assert layers.crcs == held.layers(start // 8)
                assert _stream(header, layers, 3) == _stream(header, plain, 3)
            finally:
                connector.close_kv(handle)
    finally:
        internal("DELETE", prefill, f"/internal/kv/{handle}")


def test_a_kept_connection_the_worker_dropped_still_pulls_on_a_new_one(prefill, tiny_model_dir):
    """The request goes out from the event loop on a kept connection; when what answers
    there is a closed connection, the pull's thread sends it again on a new one."""
    engine = LLMEngine(config(tiny_model_dir))
    decode = KVConnector(engine)
    first = _lease(prefill, 20)
    expect = prefill.core.kv_connector.header(0, len(first["prompt_token_ids"]))
    client = KVClient({"Authorization": f"Bearer {prefill.token}"})
    dropper = socket.create_server(("127.0.0.1", 0))  # accepts, reads the request, closes

    def drop():
        conn, _ = dropper.accept()
        conn.recv(65536)
        conn.close()
    threading.Thread(target=drop, daemon=True).start()
    host, port = prefill.internal_url.rsplit("/", 1)[1].split(":")
    stale = socket.create_connection(dropper.getsockname())
    client.idle[("http", host, int(port))] = [stale]
    try:
        res = decode.reserve_kv("kept", first["prompt_token_ids"], first["first_token"], SamplingParams(max_tokens=2))
        assert res is not None and res.start == 0
        n = asyncio.run(pull(client, prefill.internal_url, first["handle"], expect, decode.kv_sink(res)))
        assert n == transfer.stream_size(expect)
        got = list(KVLayers(engine.runner.kv_caches, 8, res.blocks.tolist(), 0, res.num_tokens))
        want = list(prefill.core.kv_connector.open_kv(first["handle"])[1])
        prefill.core.kv_connector.close_kv(first["handle"])
        assert all(torch.equal(a, b) for pair, w in zip(got, want) for a, b in zip(pair, w))
        assert stale.fileno() == -1  # closed, not kept
        assert sum(map(len, client.idle.values())) == 1  # the new one is kept
    finally:
        client.close()
        dropper.close()
        internal("DELETE", prefill, f"/internal/kv/{first['handle']}")
