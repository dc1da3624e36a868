"""The fault signals' PromQL against a real Prometheus scraping a real worker process (modelled
H100, fault switches on): its step time per token, an XID error and a stalled engine loop come
through as the detector's inputs, and a worker Prometheus does not scrape is missing, not healthy."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetwise.fault_signals import Worker, read_signals
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer
from fleetwise.worker.api.server import SWITCHES

from .workers import AUTH, start_worker_process

BODY = {"model": "tiny", "prompt": "signals from prometheus " * 4, "max_tokens": 48, "ignore_eos": True}


@pytest.fixture(scope="module")
def scraped(tiny_model_dir, tmp_path_factory):
    worker = start_worker_process(tiny_model_dir, "mixed", "--fault", SWITCHES, "--modelled-gpu", "H100")
    host = worker.url.removeprefix("http://")
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), {"workers": [host]}, scrape_interval=0.5).start()
    client = PrometheusClient(prom.url)
    yield worker, client
    client.close()
    prom.stop()
    worker.stop()


def until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_step_time_xid_and_stall_come_through_and_an_unscraped_worker_is_missing(scraped):
    worker, prom = scraped
    me = Worker("w", "tiny/mixed", worker.url, worker.internal_url)
    ghost = Worker("ghost", "tiny/mixed", "http://127.0.0.1:9", "http://127.0.0.1:10")

    def served_and_read():
        assert httpx.post(worker.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
        s = read_signals(prom, [me, ghost], 10)
        return s if s.members[0].value is not None else None
    s = until(served_and_read, timeout=30)
    assert 0 < s.members[0].value < 1 and s.members[0].hard is None
    assert s.members[1].value is None and s.missing == ["ghost"]

    assert httpx.post(worker.internal_url + "/internal/faults", json={"xid": 79}, headers=AUTH).status_code == 200
    assert until(lambda: read_signals(prom, [me], 10).members[0].hard) == "XID error 79"
    assert httpx.post(worker.internal_url + "/internal/faults", json={}, headers=AUTH).status_code == 200
    until(lambda: read_signals(prom, [me], 10).members[0].hard is None)

    # the stall holds the engine at its next step: a request in flight gives it one
    assert httpx.post(worker.internal_url + "/internal/faults", json={"stall_seconds": 8},
                      headers=AUTH).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, worker.url + "/v1/completions", json=BODY, timeout=60)
        stalled = until(lambda: read_signals(prom, [me], 10, stall_seconds=2).members[0].hard, timeout=15)
        assert stalled.startswith("engine loop stalled for"), stalled
        assert held.result().status_code == 200
