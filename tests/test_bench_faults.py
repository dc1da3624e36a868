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
