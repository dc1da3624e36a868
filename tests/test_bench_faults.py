"""`fleetwise bench faults --quick` end to end: four mixed workers of the tiny model, a real
Prometheus and the fault loop under bursty load; an XID error on one worker is an incident
within a window and a half, that worker is quarantined (the quick run leaves restarts out: they
take longer than the rest of it), and the result (JSON
with its targets, PNG) is written."""

import json

from typer.testing import CliRunner

from fleetwise.cli import app


def test_bench_faults_quick_finds_an_xid_and_writes_its_result(tmp_path):
    r = CliRunner().invoke(app, ["bench", "faults", "--quick", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "faults-quick.json").read_text())
    assert (tmp_path / "faults-quick.png").stat().st_size > 0
    (xid,) = [c for c in result["cases"] if c["kind"] == "xid"]
    assert xid["target"].startswith("mixed-") and xid["detected_s"] is not None and xid["detected_s"] <= 15
    assert [(verb, outcome) for verb, _, outcome in xid["actions"]] == [("Quarantine", "done")]
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
