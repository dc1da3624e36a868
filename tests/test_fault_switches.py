"""The drills' fault switches on a real worker process: behind the token, bounded, off by
default; a slow factor shows in step and device time against the work, a stall in /health, an XID in the
modelled GPU's DCGM series, a slow KV link in the per-peer transfer metrics."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetwise.worker.api.server import SWITCHES
from fleetwise.worker.engine.config import EngineConfig

from .workers import AUTH, internal, start_worker, start_worker_process

BODY = {"model": "tiny", "prompt": "the odd worker out " * 4, "max_tokens": 32, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    proc = start_worker_process(tiny_model_dir, "mixed", "--fault", SWITCHES, "--modelled-gpu", "H100",
                                "--health-stall-seconds", "1")
    yield proc
    proc.stop()


def post_faults(worker, **body) -> httpx.Response:
    return httpx.post(worker.internal_url + "/internal/faults", json=body, headers=AUTH, timeout=10)


def metric(worker, name: str) -> float:
    text = httpx.get(worker.url + "/metrics", timeout=10).text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not on the page"
    return sum(values)


def seconds_per_token(worker, series: str = "fleetwise_step_seconds_sum") -> tuple[float, float]:
    return metric(worker, series), metric(worker, "fleetwise_batch_tokens_sum")


def test_switches_need_the_token_are_bounded_and_start_off(worker):
    assert httpx.post(worker.internal_url + "/internal/faults", json={}, timeout=10).status_code == 401
    assert httpx.post(worker.url + "/internal/faults", json={}, headers=AUTH, timeout=10).status_code == 404
    view = httpx.get(worker.internal_url + "/internal/faults", headers=AUTH, timeout=10).json()
    assert view["slow_factor"] == 1.0 and view["xid"] == 0 and view["stall_left_seconds"] == 0
    for field, value in (("slow_factor", 0.5), ("slow_factor", 1e9), ("stall_seconds", -1), ("xid", 10**6),
                         ("kv_delay_seconds", 999), ("nonsense", 1)):
        r = post_faults(worker, **{field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    r = post_faults(worker, kv_delay_seconds=1.0)
    assert r.status_code == 400 and "kv_slow_peer" in r.json()["error"]["message"]


@pytest.mark.parametrize("series", ["fleetwise_step_seconds_sum", "fleetwise_step_device_seconds_sum"])
def test_a_slow_factor_shows_in_step_and_device_time_per_token_and_goes_away(worker, series):
    def per_token(requests: int = 3) -> float:
        s0, t0 = seconds_per_token(worker, series)
        for _ in range(requests):
            assert httpx.post(worker.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
        s1, t1 = seconds_per_token(worker, series)
        return (s1 - s0) / (t1 - t0)
    before = per_token()
    assert post_faults(worker, slow_factor=4.0).json()["slow_factor"] == 4.0
    slow = per_token()
    assert post_faults(worker).status_code == 200  # everything off
    after = per_token()
    assert slow > 2.0 * before and slow > 2.0 * after, (before, slow, after)


def test_an_xid_error_is_in_the_dcgm_series(worker):
    assert metric(worker, "DCGM_FI_DEV_XID_ERRORS") == 0
    assert post_faults(worker, xid=79).status_code == 200
    assert metric(worker, "DCGM_FI_DEV_XID_ERRORS") == 79
    assert post_faults(worker).status_code == 200
    assert metric(worker, "DCGM_FI_DEV_XID_ERRORS") == 0


def test_a_stall_turns_health_503_until_it_ends(worker):
    assert post_faults(worker, stall_seconds=3).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, worker.url + "/v1/completions", json=BODY, timeout=60)
        time.sleep(1.8)
        r = httpx.get(worker.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "stalled", r.text
        assert pending.result().status_code == 200  # in flight: held, then finished
    assert httpx.get(worker.url + "/health", timeout=5).status_code == 200


def test_the_switches_are_not_there_unless_asked_for(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", num_blocks=64))
    try:
        assert internal("POST", w, "/internal/faults", json={"slow_factor": 2}).status_code == 404
        assert w.core.switches is None
    finally:
        w.stop()


def test_a_slow_link_shows_in_the_per_peer_metrics(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=128)
    prefills = [start_worker(config, "prefill") for _ in range(2)]
    decode = start_worker(config, "decode", faults=frozenset({SWITCHES}))
    try:
        slow, fast = prefills
        r = internal("POST", decode, "/internal/faults", json={"kv_slow_peer": slow.internal_url,
                                                              "kv_delay_seconds": 0.3})
        assert r.status_code == 200, r.text
        for i, p in enumerate(prefills * 2):  # a new prompt each time: a prefix cache hit pulls nothing
            request = {"model": "tiny", "prompt": f"a slow link {i} " * 6, "max_tokens": 2, "temperature": 0}
            first = internal("POST", p, "/internal/prefill", json={"kind": "completion", "request": request}).json()
            body = {"kind": "completion", "request": request, "prompt_token_ids": first["prompt_token_ids"],
                    "first_token": first["first_token"], "first_logprob": first["first_logprob"],
                    "prefill_url": p.internal_url, "handle": first["handle"]}
            assert internal("POST", decode, "/internal/decode", json=body).status_code == 200
        m = decode.core.metrics
        assert m.kv_peer_failures.labels(model_name="tiny", role="decode", peer=fast.internal_url)._value.get() == 0
        secs = {p.internal_url: m.kv_peer_seconds.labels(model_name="tiny", role="decode",
                                                         peer=p.internal_url)._value.get() for p in prefills}
        assert secs[slow.internal_url] >= 0.6 and secs[fast.internal_url] < 0.3, secs
    finally:
        for w in (*prefills, decode):
            w.stop()
