"""A FaultPolicy's status from the detector's windows (`controllers/fault_status.py`, pure):
one incident per episode, its state as actions are done or it goes away, the bound on the
list, the conditions, and evidence as the status and the admin API take it."""

import math

from fleetwise.controllers import fault_status as fs
from fleetwise.controllers.faults import FaultDecision, Incident
from fleetwise.controllers.status import with_times

W = 10.0  # windowSeconds


def worker(name: str, score: float = 9.0) -> Incident:
    return Incident("worker", name, "ns/chat/mixed/A100", {"score": score, "hard": None})


def test_an_incident_seen_window_after_window_is_one_incident_and_a_done_action_remediates_it():
    book = fs.IncidentBook()
    opened = book.window([worker("w1")], [], [("w1", "2 of 4 already unavailable")], now=0.0, window_seconds=W)
    assert [r.target for r in opened] == ["w1"] and book.open_count() == 1
    assert book.records[0].held == "2 of 4 already unavailable"
    opened = book.window([worker("w1", 12.0)], [("Quarantine", "w1", "done"), ("RestartPod", "w1", "done")], [],
                         now=10.0, window_seconds=W)
    rec = book.records[0]
    assert opened == [] and len(book.records) == 1
    assert (rec.state, rec.windows, rec.evidence["score"], rec.held) == ("Remediated", 2, 12.0, "")
    assert rec.actions == ["Quarantine: done", "RestartPod: done"] and book.open_count() == 0
    book.window([], [], [], now=20.0, window_seconds=W)
    assert book.records[0].state == "Remediated"  # the worker is out; the incident stays remediated


def test_one_that_goes_away_by_itself_is_cleared_and_one_back_after_a_gap_is_a_new_incident():
    book = fs.IncidentBook()
    book.window([worker("w1")], [("Quarantine", "w1", "refused: no pod")], [], now=0.0, window_seconds=W)
    assert book.records[0].state == "Open" and book.records[0].actions == ["Quarantine: refused: no pod"]
    book.window([], [], [], now=10.0, window_seconds=W)
    assert book.records[0].state == "Cleared" and book.open_count() == 0
    opened = book.window([worker("w1")], [], [], now=30.0, window_seconds=W)
    assert len(opened) == 1 and [r.state for r in book.records] == ["Open", "Cleared"]


def test_a_worker_out_on_two_counts_in_one_window_is_one_incident():
    book = fs.IncidentBook()
    kv = Incident("worker", "w1", "", {"kv_sender": {"w1->w2": 9.0, "w1->w3": 8.0}})
    assert len(book.window([worker("w1"), kv], [], [], now=0.0, window_seconds=W)) == 1
    assert set(book.records[0].evidence) == {"score", "hard", "kv_sender"}


def test_the_list_is_bounded_open_ones_first_then_the_newest():
    book = fs.IncidentBook()
    for i in range(fs.MAX_INCIDENTS + 5):
        book.window([worker(f"old{i}")], [("Quarantine", f"old{i}", "done")], [], now=i * W, window_seconds=W)
    book.window([worker("now")], [], [], now=100 * W, window_seconds=W)
    assert len(book.records) == fs.MAX_INCIDENTS
    assert book.records[0].target == "now" and book.records[1].target == f"old{fs.MAX_INCIDENTS + 4}"
    assert "old0" not in {r.target for r in book.records}


def decision(**kw) -> FaultDecision:
    return FaultDecision(incidents=[], actions=[], held=kw.get("held", []), flapping=kw.get("flapping", []), scores={})


def test_degraded_says_why_flapping_first_then_refusals_then_limits():
    assert fs.degraded(decision(), []).status == "False"
    held = fs.degraded(decision(held=[("w1", "cooldown 300 s")]), [])
    assert (held.status, held.reason) == ("True", "Held") and "w1: cooldown 300 s" in held.message
    refused = fs.degraded(decision(held=[("w1", "x")]), ["Quarantine w2: refused: gone"])
    assert refused.reason == "ActionsRefused" and "w2" in refused.message
    flapping = fs.degraded(decision(flapping=["node-3"]), ["Quarantine w2: refused"])
    assert flapping.reason == "Flapping" and "node-3" in flapping.message


def test_ready_and_admin_reachable():
    assert fs.ready("no answer within 5 s", 4, 0).status == "False"
    assert fs.ready(None, 4, 1).message == "4 workers watched, 1 without a signal this window"
    down = fs.admin_reachable(False, 12)
    assert (down.type, down.status, down.reason) == ("AdminReachable", "False", "Unreachable") and "12" in down.message
    assert fs.admin_reachable(True, 0).status == "True"


def test_a_condition_keeps_its_transition_time_while_its_status_stays():
    first = with_times(None, [fs.admin_reachable(True, 0)], "t0", 1)
    same = with_times({"conditions": first}, [fs.admin_reachable(True, 3)], "t1", 1)
    changed = with_times({"conditions": same}, [fs.admin_reachable(False, 3)], "t2", 2)
    assert [c[0]["lastTransitionTime"] for c in (first, same, changed)] == ["t0", "t0", "t2"]
    assert changed[0]["observedGeneration"] == 2


def test_evidence_for_the_admin_api_is_a_flat_list_and_for_the_status_plain_json():
    evidence = {"w1": {"score": 9.5, "hard": "XID error 79", "readings": {"itl_seconds": 0.02}},
                "w2": {"score": math.inf, "windows_out": 2}}
    flat = fs.flat_evidence(evidence)
    assert {"signal": "w1.score", "value": 9.5} in flat and {"signal": "w1.hard", "detail": "XID error 79"} in flat
    assert {"signal": "w1.readings.itl_seconds", "value": 0.02} in flat and {"signal": "w2.windows_out",
                                                                             "value": 2.0} in flat
    assert not any(e["signal"] == "w2.score" for e in flat)  # not finite: left out, never a 422
    assert len(fs.flat_evidence({f"k{i}": float(i) for i in range(100)})) == 64
    view = fs.evidence_view(evidence)
    assert isinstance(view, dict) and view["w2"]["score"] is None
    assert isinstance(fs.evidence_view({"x": "y" * 5000}), str)
