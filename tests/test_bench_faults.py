"""`fleetwise bench faults --quick` end to end: four mixed workers of the tiny model, a real
Prometheus and the fault loop under bursty load; an XID error on one worker is an incident
within a window and a half, that worker is quarantined (the quick run leaves restarts out: they
take longer than the rest of it), the same XID under the same load with the loop detecting
only is an incident with no action, and the result (JSON with its targets and the goodput of
each arm, PNGs) is written. The goodput comparison's counting is checked on its own below."""

import json

from typer.testing import CliRunner

from fleetwise.bench.targets import SLO_TTFT_S
from fleetwise.cli import app


def test_bench_faults_quick_finds_an_xid_and_writes_its_result(tmp_path):
    r = CliRunner().invoke(app, ["bench", "faults", "--quick", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "faults-quick.json").read_text())
    assert (tmp_path / "faults-quick.png").stat().st_size > 0
    (without, xid) = [c for c in result["cases"] if c["kind"] == "xid"]
    assert (without["arm"], xid["arm"]) == ("without", "with") and without["target"] == xid["target"]
    assert xid["target"].startswith("mixed-") and xid["detected_s"] is not None and xid["detected_s"] <= 15
    assert [(verb, outcome) for verb, _, outcome in xid["actions"]] == [("Quarantine", "done")]
    # detection only: the same fault is decided an incident, and nothing is done about it
    assert without["detected_s"] is not None and without["actions"] == []
    g = result["goodput"]
    assert g["slo"]["ttft_s"]["value"] == SLO_TTFT_S and g["healthy_goodput_rps"] > 0
    (compared,) = g["faults"]
    assert compared["with"]["requests"] == compared["without"]["requests"] == g["baselines"][0]["requests"] > 0
    assert compared["lost_with"] is not None and compared["lost_without"] is not None
    assert (tmp_path / "faults-quick-goodput.png").stat().st_size > 0
    assert result["targets"]["hard_detection_s"]["met"] is True
    assert result["run"]["windows"] >= 2 and result["run"]["load"]["ok"] > 0
    assert result["false_positives_per_hour"] is not None


def test_each_fault_goes_to_the_busiest_unused_worker_of_its_role_and_a_link_to_the_busiest_pair():
    from types import SimpleNamespace

    from fleetwise.bench.faults import cases as C
    from fleetwise.bench.faults.fleet import Record, Window

    names = [f"{r}-{i}" for r in ("prefill", "decode") for i in range(4)]
    workers = {n: SimpleNamespace(internal_url=f"http://{n}") for n in names}
    record = Record()
    for k in range(3):
        record.windows.append(Window(0.0, 0.0, {}, {}, {"decode-0": 10.0, "decode-2": 500.0, "decode-3": 300.0},
                                     {}, [], [], [], [], {"prefill-1->decode-3": 1e-9, "prefill-2->decode-2": 1e-9}
                                     if k else {"prefill-2->decode-2": 1e-9}))
    f = SimpleNamespace(fleet=SimpleNamespace(workers=workers), record=record)
    used: set[str] = set()
    first, second = C.resolve(f, C.slow("decode", 2.0), used), C.resolve(f, C.slow("decode", 6.0), used)
    assert (first.worker, second.worker) == ("decode-2", "decode-3")
    link = C.resolve(f, C.slow_link(), used)   # a link evicts nobody: the busiest pair, used or not
    assert (link.link, link.worker, link.settings["kv_slow_peer"]) == ("prefill-2->decode-2", "decode-2",
                                                                       "http://prefill-2")
    assert C.resolve(f, C.healthy(5), used).kind == "healthy"


def _arm(name, started, outcomes, pre=10.0, span=20.0):
    """An arm whose requests went out at the given seconds after `started`, each (ok, ttft, tpot)."""
    from fleetwise.bench.faults import cases as C
    from fleetwise.bench.faults.goodput import Arm
    from fleetwise.bench.faults.load import Sent
    from fleetwise.bench.goodput.load import Outcome
    sent = [Sent(started + at, Outcome(0, ok, "" if ok else "http 502", ttft, tpot)) for at, ok, ttft, tpot in outcomes]
    case = C.healthy(span) if name == "healthy" else C.stall("prefill-1")
    return Arm(name, case, started, pre, span, sent)


def test_goodput_counts_the_span_after_injection_and_the_loss_against_the_healthy_baselines():
    from fleetwise.bench.faults.goodput import compare
    good, slow_first, late_tokens = (True, 0.2, 0.05), (True, SLO_TTFT_S + 0.1, 0.05), (True, 0.2, 1.0)
    failed = (False, None, None)
    # before the span (5 s) and after it (31 s) never count; 20 s spans
    healthy = _arm("healthy", 100.0, [(5.0, *good)] + [(10.0 + i, *good) for i in range(20)] + [(31.0, *failed)])
    healthy2 = _arm("healthy", 500.0, [(10.0 + i, *good) for i in range(16)])
    without = _arm("without", 200.0, [(10.0 + i, *(good if i % 2 else failed)) for i in range(18)]
                   + [(28.0, *slow_first), (29.0, *late_tokens)])
    with_ = _arm("with", 300.0, [(10.0 + i, *good) for i in range(16)] + [(26.0 + i, *failed) for i in range(4)])
    m = without.measures()
    assert (m["requests"], m["met_slo"], m["failed"]) == (20, 9, 9)
    assert m["goodput_rps"] == 9 / 20 and m["error_rate"] == 9 / 20
    assert sum(m["timeline"]["goodput_rps"]) * m["timeline"]["width_s"] == 9
    c = compare([healthy, healthy2], [without, with_])
    assert c["healthy_goodput_rps"] == (20 / 20 + 16 / 20) / 2   # the mean of the two baselines: 0.9
    (f,) = c["faults"]
    assert abs(f["lost_without"] - (0.9 - 0.45) / 0.9) < 1e-9 and abs(f["lost_with"] - (0.9 - 0.8) / 0.9) < 1e-9
    assert abs(f["lost_ratio"] - 0.1 / 0.45) < 1e-9


def test_no_ratio_of_losses_where_the_fault_cost_nothing_without_the_detector():
    from fleetwise.bench.faults.goodput import compare
    from fleetwise.bench.faults.goodput_report import goodput_checks
    good = (True, 0.2, 0.05)
    healthy = _arm("healthy", 0.0, [(10.0 + i, *good) for i in range(20)])
    without = _arm("without", 100.0, [(10.0 + i, *good) for i in range(20)])
    with_ = _arm("with", 200.0, [(10.0 + i, *good) for i in range(18)])
    c = compare([healthy], [without, with_])
    (f,) = c["faults"]
    assert f["lost_without"] == 0.0 and abs(f["lost_with"] - 0.1) < 1e-9 and f["lost_ratio"] is None
    (check,) = goodput_checks(c).values()
    assert check.measured is None and check.met is None
