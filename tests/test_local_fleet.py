"""Acting on `fleetwise up`'s workers (`fleetwise/local_fleet.py`): real worker processes
behind a real router that reads the endpoints file the fleet rewrites."""

import threading
import time

import httpx
import pytest
import yaml

from fleetwise.fleet import ActionRefused, Routability, WorkerRef
from fleetwise.local_fleet import LocalFleet
from fleetwise.procs import stop_all, wait_healthy
from fleetwise.up import plan

from .workers import free_port, start_router, token_file

W0, W1 = WorkerRef("mixed-0"), WorkerRef("mixed-1")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("up")
    members = plan(tiny_model_dir, "tiny", "colocated", free_port(), 0, 0, 2, workdir, [], token_file())
    workers = [m for m in members if m.role != "router"]
    for w in workers:
        w.die_with_parent = True
        w.start()
    try:
        wait_healthy(workers, 120)
        local = LocalFleet("tiny", members, workdir / "router.yaml", workdir / "logs" / "actions.log",
                           drain_timeout=30, settle=0.5)
        router = start_router(workdir / "router.yaml", "round_robin", probe_interval=0.1)
        yield local, router
        router.stop()
    finally:
        stop_all([workers], grace=5)


def served(local: LocalFleet, ref: WorkerRef) -> float:
    """Requests the worker finished, from its /metrics."""
    text = httpx.get(local.workers[ref.name].url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def send(router, n: int, max_tokens: int = 2) -> None:
    for i in range(n):
        r = httpx.post(router.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": f"hello {i}", "max_tokens": max_tokens})
        assert r.status_code == 200, r.text


def routed(router, local: LocalFleet, ref: WorkerRef, routable: bool) -> None:
    """Until the router's view of the worker says `routable`."""
    url = local.workers[ref.name].internal_url
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(r.url == url and r.routable == routable for r in router.router.source.models()["tiny"].all()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the router never saw {ref.name} routable={routable}")


def test_quarantine_takes_a_worker_out_of_routing_and_restore_brings_it_back(fleet):
    local, router = fleet
    pid = local.workers[W0.name].pid
    local.quarantine(W0, "p99 3x its peers")
    entries = yaml.safe_load(local.config.read_text())["models"][0]["mixed"]
    # the router's file lists the internal URLs
    assert entries[0] == {"url": local.workers[W0.name].internal_url, "routable": False, "state": "quarantined",
                          "reason": "p99 3x its peers"}
    assert entries[1] == local.workers[W1.name].internal_url != local.workers[W1.name].url
    assert local.state(W0).state is Routability.QUARANTINED and local.state(W0).reason == "p99 3x its peers"
    routed(router, local, W0, False)
    before = served(local, W0), served(local, W1)
    send(router, 6)
    assert served(local, W0) == before[0] and served(local, W1) == before[1] + 6
    assert local.workers[W0.name].running and local.workers[W0.name].pid == pid  # kept for inspection
    assert local.workers[W0.name].healthy()

    local.restore(W0, "false alarm")
    assert local.state(W0).state is Routability.SERVING
    routed(router, local, W0, True)
    before = served(local, W0), served(local, W1)
    send(router, 6)
    assert served(local, W0) > before[0] and served(local, W1) > before[1]
    log = (local.config.parent / "logs" / "actions.log").read_text()
    assert "quarantine mixed-0" in log and "p99 3x its peers" in log and "restore mixed-0" in log


def test_restart_brings_a_new_process_back_on_its_port(fleet):
    local, router = fleet
    old, url = local.workers[W0.name].pid, local.workers[W0.name].url
    local.restart(W0, "engine wedged")
    w = local.workers[W0.name]
    assert w.pid != old and w.running and w.url == url and w.healthy()
    assert local.state(W0).state is Routability.SERVING and local.state(W0).reason == "engine wedged"
    routed(router, local, W0, True)
    send(router, 6)
    assert served(local, W0) > 0  # the new process's own count


def test_cordon_is_refused_on_one_machine(fleet):
    local, _ = fleet
    with pytest.raises(ActionRefused, match="there is no node to cordon"):
        local.cordon("localhost", "ECC errors")
    with pytest.raises(ActionRefused, match="no worker 'mixed-9'"):
        local.quarantine(WorkerRef("mixed-9"), "x")


def test_a_power_override_lapses_and_is_refused_for_an_unknown_worker(fleet):
    local, _ = fleet
    local.override_power(W0, 250.0, time.time() + 60, "drill")
    o = local.power_override(W0)
    assert o is not None and o.watts == 250.0
    local.override_power(W0, 250.0, time.time() - 1, "already over")
    assert local.power_override(W0) is None
    local.override_power(W0, None, 0.0, "cleared")
    assert W0.name not in local.overrides
    with pytest.raises(ActionRefused, match="no worker 'mixed-9'"):
        local.override_power(WorkerRef("mixed-9"), 100.0, time.time() + 60, "x")


def test_drain_lets_requests_finish_sends_no_new_ones_and_ends_the_process(fleet):
    local, router = fleet
    w = local.workers[W1.name]
    answers: list[httpx.Response] = []
    inflight = threading.Thread(target=lambda: answers.append(httpx.post(
        w.url + "/v1/completions", timeout=60,
        json={"model": "tiny", "prompt": "a long one", "max_tokens": 1000, "n": 8, "ignore_eos": True})))
    inflight.start()
    time.sleep(0.2)  # it reached the worker: about 2 s of work, longer than the drain's settle
    local.drain(W1, "scale down")
    assert local.state(W1).state is Routability.DRAINING
    routed(router, local, W1, False)
    before = served(local, W0)
    send(router, 4)
    assert served(local, W0) == before + 4  # every new request went to the other worker
    deadline = time.monotonic() + 30
    while w.running and time.monotonic() < deadline:
        time.sleep(0.1)
    inflight.join(60)
    assert not w.running and w.exited is not None
    assert answers and answers[0].status_code == 200, "the request in flight finished before the process ended"
    with pytest.raises(ActionRefused, match="restart it instead"):
        local.restore(W1, "too soon")
    send(router, 2)  # the router still serves, from the other worker
