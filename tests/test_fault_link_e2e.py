"""A slow KV link between one prefill and one decode worker of a real local fleet (two of each
behind the router, as `fleetwise up --detect-faults` runs it), found by the fault loop against
a real Prometheus and routed around: the pair carries no more KV while both workers keep
serving, each with its other peers."""

import re
import threading
import time

import httpx
import pytest

from fleetwise.fleet import Routability
from fleetwise.local_fleet import LocalFleet

from .detecting_fleet import detecting_fleet
from .test_fault_loop_e2e import load
from .workers import AUTH

WINDOW = 10        # seconds: the FaultPolicy's least
KV_DELAY = 0.3     # seconds added to each pull over the slow link; a tiny model's pull takes milliseconds


@pytest.fixture
def fleet(tmp_path, tiny_model_dir):
    with detecting_fleet(tmp_path, tiny_model_dir, "disaggregated", (2, 2, 0), WINDOW) as running:
        yield running


def pulled(fleet: LocalFleet) -> dict[tuple[str, str], float]:
    """KV bytes each decode worker pulled from each prefill worker, from the decode workers' /metrics."""
    names = {w.internal_url: name for name, w in fleet.workers.items()}
    out = {}
    for name, w in fleet.workers.items():
        if w.role == "decode":
            page = httpx.get(w.url + "/metrics", timeout=10).text
            for peer, value in re.findall(r'^fleetwise_kv_peer_transfer_bytes_total{[^}]*peer="([^"]+)"[^}]*} (\S+)$',
                                          page, re.M):
                out[(names.get(peer, peer), name)] = float(value)
    return out


def test_a_slow_link_is_routed_around_and_both_its_workers_keep_serving(fleet):
    fleet, procs, faults = fleet
    loop, router = faults.loop, procs[-1].url
    slow_p, slow_d = fleet.workers["prefill-0"], fleet.workers["decode-0"]
    r = httpx.post(slow_d.internal_url + "/internal/faults", headers=AUTH, timeout=10,
                   json={"kv_slow_peer": slow_p.internal_url, "kv_delay_seconds": KV_DELAY})
    assert r.status_code == 200, r.text
    stop = threading.Event()
    driver = threading.Thread(target=load, args=(router, stop), daemon=True)
    driver.start()
    try:
        t0 = time.monotonic()
        while not any(d.action.verb == "RouteAround" for d in loop.done) and time.monotonic() - t0 < 4 * WINDOW + 5:
            time.sleep(0.5)
        detected = time.monotonic() - t0
        done = [(d.action.verb, d.action.target, d.outcome) for d in loop.done]
        print(f"routed around after {detected:.1f} s: {done}")
        assert ("RouteAround", "prefill-0->decode-0", "done") in done
        assert {verb for verb, _, _ in done} == {"RouteAround"}  # nobody evicted
        assert all(s.state is Routability.SERVING for s in fleet.states.values()), fleet.states
        time.sleep(3)  # the router re-reads its file each probe round (1 s); pulls in flight finish
        before = pulled(fleet)
        time.sleep(8)
        after = pulled(fleet)
        # on a loaded machine a healthy pair may be routed around too: it is then not counted on
        avoided = {tuple(d.action.target.split("->")) for d in loop.done}
        grew = {pair: after.get(pair, 0.0) - before.get(pair, 0.0) for pair in after}
        print(f"KV bytes pulled per pair in 8 s after the avoidance: {grew}")
        assert grew.get(("prefill-0", "decode-0"), 0.0) == 0.0  # the pair is avoided
        for pair in {("prefill-0", "decode-1"), ("prefill-1", "decode-0")} - avoided:  # both keep serving
            assert grew[pair] > 0, grew
        assert "avoid_link prefill-0 -> decode-0" in (procs[0].log.parent.parent / "actions.log").read_text()
    finally:
        stop.set()
        driver.join(timeout=60)
