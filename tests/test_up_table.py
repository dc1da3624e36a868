"""`fleetwise up`'s live table shows the fault loop's scores per worker and its last window's
incidents, running and finished actions."""

import io
from types import SimpleNamespace

from rich.console import Console

from fleetwise.controllers.faults import Action, FaultDecision, Incident
from fleetwise.fault_loop import Done, Running
from fleetwise.local_fleet import LocalFleet
from fleetwise.up import _table, plan


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=250).print(table)
    return out.getvalue()


def _fleet(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    members = plan(tmp_path / "model", "tiny", "colocated", 18000, 0, 0, 3, tmp_path, [], token)
    return members, LocalFleet("tiny", members, tmp_path / "router.yaml", None, token="t")


def test_the_table_shows_each_workers_score_and_the_windows_incidents_and_actions(tmp_path):
    members, fleet = _fleet(tmp_path)
    workers = [m.name for m in members if m.role != "router"]
    slow, other = workers[0], workers[1]
    quarantine = Action("Quarantine", slow, "step time 9.3 MADs out")
    restart = Action("RestartPod", slow, "step time 9.3 MADs out")
    decision = FaultDecision([Incident("worker", slow, "tiny/mixed", {})], [quarantine, restart], [], [],
                             {slow: 9.31, other: -0.42})
    loop = SimpleNamespace(last=decision, error=None, running=[Running(restart, 100.0, 100.0)],
                           done=[Done(quarantine, "done", 100.0, 0.05, 1)])
    text = _render(_table(members, fleet, faults=SimpleNamespace(loop=loop)))
    assert "fault score" in text
    row = next(line for line in text.splitlines() if slow in line and "mixed" in line)
    assert "9.3" in row and "-0.4" not in row
    assert "-0.4" in next(line for line in text.splitlines() if other in line and "mixed" in line)
    assert f"faults: worker {slow}; running RestartPod {slow}; last action Quarantine {slow}: done" in text


def test_without_detection_there_is_no_score_column_and_a_skipped_window_says_why(tmp_path):
    members, fleet = _fleet(tmp_path)
    assert "fault score" not in _render(_table(members, fleet))
    loop = SimpleNamespace(last=None, error="Prometheus unreachable", running=[], done=[])
    assert "faults: Prometheus unreachable" in _render(_table(members, fleet, faults=SimpleNamespace(loop=loop)))
    loop.error = None
    assert "faults: waiting for the first window" in _render(_table(members, fleet, faults=SimpleNamespace(loop=loop)))
