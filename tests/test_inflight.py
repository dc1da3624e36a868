"""What the operator asks a draining worker before deleting its pod: the requests it still
holds, from a real worker; unknown when it cannot be asked (the drain then runs to its
timeout), and the plan keeps a busy draining pod until then."""

import threading
import time

import httpx

from fleetwise.addresses import ADDRESS_MAP_ENV
from fleetwise.controllers.deployment import plan
from fleetwise.net import free_port
from fleetwise.operator.inflight import in_flight
from fleetwise.operator.reconcile import pod_view
from fleetwise.spec import ModelDeploymentSpec
from fleetwise.worker.engine.config import EngineConfig

from .workers import start_worker


def pod(name: str, ip: str | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "models", "labels": {"fleetwise.dev/role": "mixed",
                                                                        "fleetwise.dev/template-hash": "t"},
                         "annotations": {"fleetwise.dev/draining-since": "100"}},
            "status": {"podIP": ip, "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]} if ip else {"phase": "Running"}}


def test_a_busy_worker_holds_requests_an_idle_one_none_an_unreachable_one_is_unknown(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    worker = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny"), "mixed")
    addresses = tmp_path / "addresses.json"
    addresses.write_text(f'{{"models/busy": "{worker.url}", "models/gone": "http://127.0.0.1:{free_port()}"}}')
    monkeypatch.setenv(ADDRESS_MAP_ENV, str(addresses))
    worker.core.fault_hook = lambda batch: time.sleep(0.05)  # a slow GPU: the request takes seconds
    request = threading.Thread(target=httpx.post, args=(worker.url + "/v1/completions",),
                               kwargs={"json": {"model": "tiny", "prompt": "hi", "max_tokens": 60, "ignore_eos": True},
                                       "timeout": 60})
    try:
        assert in_flight(pod("busy")) == 0
        request.start()
        deadline = time.monotonic() + 10
        while in_flight(pod("busy")) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(pod("busy")) == 1
        request.join(60)
        assert in_flight(pod("busy")) == 0
        assert in_flight(pod("gone")) is None            # nothing listening there
        assert in_flight(pod("nowhere")) is None         # no IP and not in the map
    finally:
        worker.stop()


def test_the_plan_keeps_a_busy_draining_pod_until_it_is_idle_or_out_of_time():
    spec = ModelDeploymentSpec.model_validate({"model": {"name": "m", "uri": "/m"}, "image": "i", "mode": "Colocated",
                                               "mixed": {"replicas": 0, "gpuType": "A100"}})
    draining = pod("busy", "10.0.0.1")
    assert "busy" not in plan(spec, [pod_view(draining, outstanding=2)], now=110, drain_timeout=120).delete
    assert "busy" in plan(spec, [pod_view(draining, outstanding=0)], now=110, drain_timeout=120).delete
    assert "busy" not in plan(spec, [pod_view(draining, outstanding=None)], now=110, drain_timeout=120).delete
    assert "busy" in plan(spec, [pod_view(draining, outstanding=None)], now=221, drain_timeout=120).delete
