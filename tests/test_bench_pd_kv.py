"""bench pd's KV measurement against a real worker process (`fleetwise worker`, served on
uvloop): the pull into a decode side's paged cache, the stream only read, the socket copy,
and the CPU each pull takes on both sides."""

import asyncio

import httpx
from rich.progress import Progress

from fleetwise.bench.pd.kv import DecodeSide, SocketCopy, _framing, kv_trials, measure_length

from .workers import AUTH, start_worker_process


def test_the_kv_rows_time_a_real_pull_a_plain_read_and_a_socket_copy(tiny_model_dir):
    prefill = start_worker_process(tiny_model_dir, "prefill", "--kv-lease-seconds", "60")
    side = DecodeSide(str(tiny_model_dir), 64, 1024, AUTH)
    sock = SocketCopy(4 << 20)
    notes: list[str] = []

    async def run() -> dict:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as http:
            with Progress(disable=True) as bar:
                task = bar.add_task("kv", total=None)
                return await measure_length(http, side, prefill.internal_url, "tiny", "m", list(range(5, 205)), 3,
                                            sock, bar, task, notes, prefill.pid)
    try:
        row = asyncio.run(run())
    finally:
        asyncio.run(side.close())
        sock.close()
        prefill.stop()
    expect = side.connector.header(0, 200)
    assert row["bytes"] == expect.payload_bytes * expect.num_layers + _framing(expect)
    assert len(row["kv_trials_s"]) == len(row["http_read_trials_s"]) == len(row["socket_trials_s"]) == row["trials"]
    assert row["trials"] == kv_trials(row["payload_bytes"], 3) > 3  # a short stream: more trials
    assert row["ratio"] > 0 and row["http_read_ratio"] > 0
    assert row["cpu_ms_per_pull"]["receiver"] > 0 and row["cpu_ms_per_pull"]["sender"] >= 0
    assert not [n for n in notes if "bytes on the wire" in n]
    assert not side.engine.requests  # every trial's blocks freed
