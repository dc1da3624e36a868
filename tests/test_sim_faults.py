"""Faults in the simulated fleet and the operator's own detector on them: a 1.3x slow GPU, a
bad link and a dead node are found and acted on with the fleet's timings, a dead node's requests
start again elsewhere and all complete once, a healthy fleet has no worker taken out, and with
the detector off nothing is."""

import math

import pytest

from fleetwise.controllers import faults as controllers_faults
from fleetwise.sim import faults as sim_faults
from fleetwise.sim.faults import Fault, FaultConfig
from fleetwise.sim.run import DATA, PoolConfig, SimConfig, build, requests_for, run_simulation

CONV = DATA / "azure-llm-trace-2023" / "AzureLLMInferenceTrace_conv.csv"


def fleet(faults: list[Fault], detector: bool = True, duration: float = 360) -> SimConfig:
    """80 H100s: 8 prefill and 12 decode workers of 4 GPUs, 0.18 requests/s per GPU; 30 s
    windows, two in a row to call a worker slow."""
    pools = [PoolConfig("prefill", 8, name="prefill"), PoolConfig("decode", 12, name="decode")]
    return SimConfig(pools, trace=str(CONV), poisson_rate=14.4, duration_s=duration,
                     faults=FaultConfig(faults, detector=detector, window_s=30, restart_s=60))


def test_a_slow_gpu_and_a_bad_link_are_found_and_their_workers_replaced():
    config = fleet([Fault("slow", "decode/5", 45, 1.3), Fault("link", "prefill/2", 45, 10.0)])
    sim = build(config)
    done = sim.run(requests_for(config))
    assert sim.faults is not None
    slow, link = sim.faults.report().faults
    assert slow.detected_s is not None and slow.detection_s is not None
    assert slow.detection_s <= 2 * 30 + 30    # two windows out, from a window that began before it
    assert slow.action == "Quarantine" and slow.acted_s == slow.detected_s
    # a single slow pair must stay out two windows with transfers before it is an incident
    assert link.detection_s is not None and link.detection_s <= 2 * 30 and link.action == "Quarantine"
    report = sim.faults.report()
    assert any(a.endswith("RestartPod decode/5") for a in report.actions)
    assert report.false_positives_by_kind.get("worker", 0) == 0 and report.false_positives_by_kind.get("node", 0) == 0
    replaced = sim.faults.by_name["decode/5"]
    assert replaced.slow == 1.0 and replaced.replica.routable and not replaced.dead   # restarted fresh
    assert len(done) == len(requests_for(config))


def test_a_dead_node_sends_its_requests_elsewhere_and_each_completes_once():
    config = fleet([Fault("dead", "h100-0001", 100)])
    requests = requests_for(config)
    sim = build(config)
    on_node = [w for w in sim.workers if w.node == "h100-0001"]
    assert len(on_node) == 2
    done = sim.run(requests)
    assert sorted(f.req.id for f in done) == [r.id for r in requests]
    assert all(f.first_token >= f.req.arrival and not math.isnan(f.done) for f in done)
    assert sum(f.retries for f in done) > 0
    assert all(r.outstanding == 0 for rs in sim.replicas.values() for r in rs)
    assert sim.faults is not None
    report = sim.faults.report()
    (dead,) = report.faults
    assert dead.action == "CordonNode" and dead.detection_s is not None and dead.detection_s <= 30
    assert report.false_positives_by_kind == {}
    for f in done:   # a retried request's link time is its last transfer's alone
        if f.req.output_tokens > 1:
            link = sim.links[f.prefill]
            assert f.kv_link_s == pytest.approx(f.req.prompt_tokens * f.prefill.pool.perf.kv_bytes_per_token
                                                / link.bytes_per_s, rel=1e-6)


def test_a_healthy_fleet_loses_no_worker_and_the_detector_off_acts_on_nothing():
    healthy = run_simulation(fleet([], duration=600)).faults
    assert healthy is not None and healthy.windows >= 20
    assert healthy.false_positives_by_kind == {} and healthy.actions == []
    off = build(fleet([Fault("slow", "decode/5", 45, 1.3)], detector=False))
    assert off.faults is not None
    off.run(requests_for(fleet([], detector=False)))
    assert off.faults.report().windows == 0 and off.faults.by_name["decode/5"].slow == 1.3


def test_the_simulator_feeds_the_controllers_own_detector(monkeypatch):
    assert sim_faults.faults is controllers_faults
    calls = []
    detect = controllers_faults.detect
    monkeypatch.setattr(controllers_faults, "detect", lambda *a, **k: calls.append(len(a[0])) or detect(*a, **k))
    run_simulation(fleet([], duration=100))
    assert calls and set(calls) == {20}   # every worker, every window


def test_bad_faults_are_refused_by_name():
    with pytest.raises(ValueError, match="kind"):
        Fault("melted", "decode/0", 0)
    with pytest.raises(ValueError, match="target"):
        build(fleet([Fault("slow", "decode/99", 10)]))


def test_the_fault_study_loses_less_goodput_with_the_detector_and_none_healthy(tmp_path):
    from fleetwise.sim.fault_study import fault_comparison
    from fleetwise.sim.plots import faults_plot

    c = fault_comparison(fleet([Fault("slow", "decode/5", 30, 4.0), Fault("slow", "prefill/2", 30, 4.0)],
                               duration=240))
    assert c.goodput_healthy > 0 and c.lost_without > 0
    assert c.lost_with < c.lost_without
    assert c.healthy_windows >= 7 and c.healthy_incidents == 0 and c.healthy_actions == []
    assert faults_plot(c, tmp_path / "f.png") == f"wrote {tmp_path / 'f.png'}"
