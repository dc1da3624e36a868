"""A worker's power cap through its internal API, on a real worker process running as a
modelled A100: authenticated, validated against the product's range, applied to the modelled
GPU (its enforced-limit series and its steps), exported, and lapsing to its fallback when not
renewed."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetwise.protocol import POWER_PATH

from .workers import AUTH, start_worker_process


@pytest.fixture(scope="module")
def a100(tiny_model_dir):
    proc = start_worker_process(tiny_model_dir, "mixed", "--modelled-gpu", "A100")
    yield proc
    proc.stop()


def series(url: str, name: str) -> list[float]:
    page = httpx.get(url + "/metrics", timeout=10).text
    return [s.value for f in text_string_to_metric_families(page) for s in f.samples if s.name == name]


def cap(proc, **body) -> httpx.Response:
    return httpx.post(proc.internal_url + POWER_PATH, json=body, headers=AUTH, timeout=10)


def test_the_cap_endpoint_is_internal_and_needs_the_token(a100):
    assert httpx.post(a100.url + POWER_PATH, json={"watts": 300}, timeout=10).status_code == 404
    r = httpx.post(a100.internal_url + POWER_PATH, json={"watts": 300}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(a100.internal_url + POWER_PATH, json={"watts": 300},
                   headers={"authorization": "Bearer not-the-token-at-all"}, timeout=10)
    assert r.status_code == 401
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [400.0]  # nothing changed


@pytest.mark.parametrize("body, field", [
    ({"watts": 50}, "watts"),                        # below an A100's lowest limit (100 W)
    ({"watts": 401}, "watts"),                       # above its rating
    ({"watts": -5}, "watts"),
    ({"watts": 300, "ttl_seconds": 0}, "ttl_seconds"),
    ({"watts": 300, "ttl_seconds": 7200}, "ttl_seconds"),
    ({"watts": 300, "fallback_watts": 20}, "fallback_watts"),
    ({"watts": 300, "reason": "x" * 2000}, "reason"),
    ({"watts": 300, "until": 5}, "until"),
])
def test_a_bad_cap_is_a_400_naming_the_field(a100, body, field):
    r = cap(a100, **body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [400.0]


def test_a_cap_holds_the_modelled_gpu_is_exported_and_lapses_to_its_fallback(a100):
    ttl = 3.0  # long enough that a loaded machine's scrape fits inside the renewed lease
    t0 = time.monotonic()
    r = cap(a100, watts=250, ttl_seconds=ttl, fallback_watts=240, reason="test: above the cap threshold")
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["watts"] == 250 and state["source"] == "modelled"
    assert (state["min_watts"], state["max_watts"]) == (100, 400)
    assert 0 < state["seconds_left"] <= ttl
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [250.0]
    assert series(a100.url, "fleetwise_power_cap_watts") == [250.0]
    [expiry] = series(a100.url, "fleetwise_power_cap_expiry_timestamp_seconds")
    assert time.time() < expiry <= time.time() + ttl + 0.1
    # renewed: the lease starts again, and holds past the first lease's end
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
    assert cap(a100, watts=250, ttl_seconds=ttl, fallback_watts=240).status_code == 200
    renewed = time.monotonic()
    time.sleep(max(0.0, t0 + ttl + 0.3 - time.monotonic()))
    assert series(a100.url, "fleetwise_power_cap_watts") == [250.0]
    # not renewed: the fallback, with no expiry
    time.sleep(max(0.0, renewed + ttl + 0.3 - time.monotonic()))
    state = httpx.get(a100.internal_url + POWER_PATH, headers=AUTH, timeout=10).json()
    assert state["watts"] == 240 and state["seconds_left"] is None and "lapsed" in state["reason"]
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [240.0]
    assert series(a100.url, "fleetwise_power_cap_expiry_timestamp_seconds") == []
    # lifted
    assert cap(a100, watts=None, reason="test: released").json()["watts"] is None
    assert series(a100.url, "fleetwise_power_cap_watts") == []
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [400.0]


def test_a_cap_without_a_fallback_lapses_to_none(a100):
    assert cap(a100, watts=200, ttl_seconds=0.5).status_code == 200
    time.sleep(1.0)
    assert series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == [400.0]
    assert series(a100.url, "fleetwise_power_cap_watts") == []


def test_a_capped_prompt_step_takes_longer_and_draws_no_more_than_the_cap(a100):
    """The step's time over its forward pass's (the engine waits out the cap's stretch), so
    that the CPU's own noise cancels out."""
    prompts = iter([[(7 * i + k) % 500 + 1 for i in range(900)] for k in range(6)])  # new each time: no prefix hit

    def stretch() -> float:
        before = [series(a100.url, n)[0] for n in ("fleetwise_step_seconds_sum", "fleetwise_step_forward_seconds_sum")]
        for _ in range(3):
            r = httpx.post(a100.url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": next(prompts), "max_tokens": 1})
            assert r.status_code == 200, r.text
        after = [series(a100.url, n)[0] for n in ("fleetwise_step_seconds_sum", "fleetwise_step_forward_seconds_sum")]
        return (after[0] - before[0]) / (after[1] - before[1])

    free = stretch()
    assert cap(a100, watts=100, ttl_seconds=60).status_code == 200
    try:
        capped = stretch()
        [limit] = series(a100.url, "DCGM_FI_DEV_POWER_MGMT_LIMIT")
        [power] = series(a100.url, "DCGM_FI_DEV_POWER_USAGE")
    finally:
        cap(a100, watts=None)
    assert limit == 100 and power <= 100.0 + 1e-6
    # a 900-token prompt step demands 0.99 of 400 W; at 100 W it takes (3.97) ** 0.38 = 1.69 times as long
    assert free < 1.2 and capped > 1.5, (free, capped)


def test_a_worker_without_a_gpu_refuses_a_cap_plainly(tiny_model_dir):
    proc = start_worker_process(tiny_model_dir, "mixed")
    try:
        r = cap(proc, watts=300)
        assert r.status_code == 409 and "no GPU" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "no_gpu"
    finally:
        proc.stop()


def test_a_worker_on_a_real_gpu_leaves_its_cap_to_the_node_agent():
    """One path for a real GPU's cap (the pod's annotation, the node agent): the worker says so."""
    from types import SimpleNamespace

    from fleetwise.worker.api.openai import APIError
    from fleetwise.worker.api.power import PowerCap
    api = SimpleNamespace(core=SimpleNamespace(gpu=None, runner=SimpleNamespace(device=SimpleNamespace(type="cuda"))))
    with pytest.raises(APIError) as refused:
        PowerCap(api).limiter()  # type: ignore[arg-type]  # only what limiter() reads
    assert refused.value.status == 409 and refused.value.code == "node_agent_caps"
    assert "node-agent" in refused.value.message
