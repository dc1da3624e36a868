"""The fault loop goes on deciding windows while a slow action runs (a local restart takes
20-40 s): the action runs in its own thread, its target counts as unavailable and is not
scored meanwhile, and its outcome is recorded when it ends, in the loop's `done` and, through
the operator, on the incident, in an Event and in the FaultPolicy's status."""

import threading
import time

from fleetwise.controllers import fault_status as fs
from fleetwise.controllers.faults import Action, Incident
from fleetwise.fault_loop import FaultLoop
from fleetwise.fleet import Routability, WorkerRef, WorkerState
from fleetwise.operator.faults import FaultControl, PolicyState
from fleetwise.spec import FaultPolicySpec

from .test_fault_signals import WORKERS, FakeProm, answers
from .test_operator_faults import NS, FakeKube, body, node, pod, steps

RESTART_ONLY = FaultPolicySpec.model_validate({
    "detection": {"windowSeconds": 10, "minPeers": 3, "deviationThreshold": 4, "consecutiveWindows": 2},
    "remediation": {"actions": ["RestartPod"], "maxUnavailableFraction": 0.25, "cooldownSeconds": 60}})


class SlowFleet:
    """A restart that takes until the test releases it; the worker stays `serving` meanwhile,
    as far as the fleet says (so that only the loop's own bookkeeping keeps it out)."""

    def __init__(self, restart_seconds: float = 30.0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.restart_seconds = restart_seconds

    def state(self, worker) -> WorkerState:
        return WorkerState(Routability.SERVING)

    def restart(self, worker, reason: str) -> None:
        self.calls.append(("restart", worker.name))
        assert self.release.wait(self.restart_seconds), "the test never released the restart"


def test_windows_are_decided_while_a_restart_runs_and_its_worker_counts_as_unavailable():
    fleet = SlowFleet()
    prom = FakeProm(answers({0: 2.0, 1: 2.05, 2: 1.97, 3: 9.0}, {i: 1000 for i in range(4)}))
    loop = FaultLoop(prom, fleet, RESTART_ONLY, lambda: WORKERS, action_wait=0.2)  # type: ignore[arg-type]
    loop.tick(now=0.0)
    t0 = time.monotonic()
    decided = loop.tick(now=10.0)  # w3 out two windows: restarted, in the background
    assert time.monotonic() - t0 < 2.0, "the window waited for the restart"
    assert decided is not None and [(a.verb, a.target) for a in decided.actions] == [("RestartPod", "w3")]
    assert [(r.action.verb, r.action.target) for r in loop.running] == [("RestartPod", "w3")]
    assert loop.done == [] and loop.busy() == {"w3"}
    # while it restarts, w2 goes bad: its windows are decided, w3 is not scored and takes the
    # group's one place out of four (maxUnavailableFraction 0.25), so w2 is held, not acted on
    loop.prometheus = FakeProm(answers({0: 2.0, 1: 2.05, 2: 9.0, 3: 9.0}, {i: 1000 for i in range(4)}))
    windows = []
    for now in (20.0, 30.0, 40.0):
        t0 = time.monotonic()
        d = loop.tick(now=now)
        assert d is not None and time.monotonic() - t0 < 2.0
        windows.append(d)
        assert "w3" not in d.scores and {"w0", "w1", "w2"} <= set(d.scores)
    assert [i.target for i in windows[-1].incidents] == ["w2"] and windows[-1].actions == []
    assert windows[-1].held == [("w2", "1 of 4 in tiny/mixed already unavailable; maxUnavailableFraction 0.25 "
                                       "allows 1")]
    assert fleet.calls == [("restart", "w3")] and loop.done == []
    fleet.release.set()  # the restart ends: its outcome is recorded then, with how long it took
    assert loop.wait(timeout=5)
    assert [(d.action.verb, d.action.target, d.outcome, d.at, d.seq) for d in loop.done] == [
        ("RestartPod", "w3", "done", 10.0, 1)]
    assert loop.done[0].seconds > 0.2 and loop.running == [] and loop.busy() == set()
    loop.prometheus = FakeProm(answers({0: 2.0, 1: 2.05, 2: 9.0, 3: 2.0}, {i: 1000 for i in range(4)}))
    d = loop.tick(now=50.0)  # w3 is back in the group, healthy; w2, out for a while now, gets its restart
    assert d is not None and "w3" in d.scores
    assert [(a.verb, a.target) for a in d.actions] == [("RestartPod", "w2")]
    fleet.release.set()
    assert loop.wait(timeout=5) and [x.action.target for x in loop.finished_after(1)] == ["w2"]


def test_a_target_still_busy_gets_no_second_job():
    fleet = SlowFleet()
    loop = FaultLoop(FakeProm({}), fleet, RESTART_ONLY, lambda: WORKERS, action_wait=0.1)  # type: ignore[arg-type]
    refs = {"w3": WorkerRef("w3")}
    loop._start([Action("RestartPod", "w3", "slow")], refs, set(), 10.0)
    loop._start([Action("RestartPod", "w3", "slow again")], refs, set(), 20.0)
    assert [(d.action.reason, d.outcome) for d in loop.done] == [
        ("slow again", "refused: an earlier action on it is still running")]
    fleet.release.set()
    assert loop.wait(timeout=5) and [d.outcome for d in loop.done] == [
        "refused: an earlier action on it is still running", "done"]


class SlowKubeFleet:
    """The operator's fleet, its restart held until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def state(self, worker) -> WorkerState:
        return WorkerState(Routability.SERVING)

    def restart(self, worker, reason: str) -> None:
        assert self.release.wait(30)


def test_the_operator_shows_a_running_restart_and_records_its_outcome_when_it_ends():
    kube = FakeKube([pod(i, "ab"[i % 2]) for i in range(4)], [node("a"), node("b")])
    fleet = SlowKubeFleet()
    control = FaultControl(kube, fleet, steps({0: 2.0, 1: 2.0, 2: 2.1, 3: 6.0}))  # type: ignore[arg-type]
    spec = {"detection": {"windowSeconds": 10, "minPeers": 3, "consecutiveWindows": 1},
            "remediation": {"actions": ["RestartPod"], "maxUnavailableFraction": 0.5}}
    control.policies[(NS, "peers")] = PolicyState(FaultLoop(control.prometheus, fleet,  # type: ignore[arg-type]
                                                            FaultPolicySpec.model_validate(spec), list,
                                                            action_wait=0.1))
    control.window(body(spec), now=1000.0)
    inc = kube.statuses[-1]["incidents"][0]
    assert (inc["target"], inc["state"], inc["actions"]) == ("w3", "Open", ["RestartPod: running"])
    assert not [e for e in kube.events if e[2].startswith("FaultAction")]
    control.window(body(spec), now=1010.0)  # still restarting: not scored, and not "gone by itself"
    st = kube.statuses[-1]
    assert [s["worker"] for s in st["scores"]] == ["w0", "w1", "w2"]
    assert (st["incidents"][0]["state"], st["incidents"][0]["actions"]) == ("Open", ["RestartPod: running"])
    fleet.release.set()
    control.policies[(NS, "peers")].loop.wait(5)
    control.prometheus = control.policies[(NS, "peers")].loop.prometheus = steps({0: 2.0, 1: 2.0, 2: 2.1, 3: 2.0})
    control.window(body(spec), now=1020.0)  # back, and healthy
    inc = kube.statuses[-1]["incidents"][0]
    assert (inc["target"], inc["state"], inc["actions"]) == ("w3", "Remediated", ["RestartPod: done"])
    actions = [e for e in kube.events if e[2] == "FaultAction"]
    assert len(actions) == 1 and actions[0][3].startswith("RestartPod w3: done")
    control.window(body(spec), now=1030.0)  # reported once
    assert len([e for e in kube.events if e[2] == "FaultAction"]) == 1


def test_an_outcome_that_ends_windows_later_lands_on_the_incident_that_decided_it():
    def inc(score: float) -> Incident:
        return Incident("worker", "w3", "g", {"score": score})
    book = fs.IncidentBook()
    book.window([inc(9.0)], [("Quarantine", "w3", "done"), ("RestartPod", "w3", fs.RUNNING)], [], 0.0, 10.0)
    book.window([], [("RestartPod", "w3", fs.RUNNING)], [], 10.0, 10.0)  # listed once
    book.window([], [], [], 20.0, 10.0)
    book.window([inc(8.0)], [], [("w3", "cooldown")], 60.0, 10.0)  # back after a gap: a new incident
    book.window([inc(8.0)], [("RestartPod", "w3", "refused: did not come back")], [], 70.0, 10.0)
    old, new = sorted(book.records, key=lambda r: r.opened)
    assert old.actions == ["Quarantine: done", "RestartPod: refused: did not come back"] and old.state == "Remediated"
    assert new.actions == [] and new.state == "Open"
    only = fs.IncidentBook()
    only.window([inc(9.0)], [("RestartPod", "w3", fs.RUNNING)], [], 0.0, 10.0)
    only.window([], [], [], 10.0, 10.0)  # out of routing while it restarts: not gone by itself
    assert only.records[0].state == "Open"
    only.outcomes([("RestartPod", "w3", "done")])
    assert (only.records[0].state, only.records[0].actions) == ("Remediated", ["RestartPod: done"])
