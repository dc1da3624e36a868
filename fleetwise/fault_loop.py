"""The fault loop, one window at a time: signals from Prometheus (`fault_signals.py`),
`controllers/faults.py`'s decision, its actions done through `FleetActions` (the operator
wraps its fleet in `ReportingFleet` so each one reaches the admin API). Used by the operator
and by `fleetwise up --detect-faults` alike.

Quarantine and RestartPod go to the worker; CordonNode to its node, then a drain of each of its
workers still serving (their deployments replace them away from the node); RouteAround to the
link's two workers (`avoid_link`: the router pairs them with others until the action's `until`;
both stay serving). An action the fleet refuses is recorded as refused; a Prometheus that does not answer skips the
window (no data is not a healthy window, and not a sick one either).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetwise.controllers.faults import Action, FaultDecision, FaultState, Incident, detect
from fleetwise.fault_signals import Signals, Worker, read_signals
from fleetwise.fleet import ActionRefused, FleetActions, Routability, WorkerRef
from fleetwise.spec import FaultPolicySpec
from fleetwise.telemetry.prometheus import PrometheusClient, PrometheusError

log = logging.getLogger(__name__)
MAX_DONE = 200   # actions kept in `done`, the newest


@dataclass
class Done:
    """One action and how it ended, at `at` (seconds since the epoch)."""
    action: Action
    outcome: str   # done | refused: why
    at: float


@dataclass
class FaultLoop:
    prometheus: PrometheusClient
    fleet: FleetActions
    policy: FaultPolicySpec
    workers: Callable[[], list[Worker]]
    on_incident: Callable[[Incident], None] | None = None
    state: FaultState = field(default_factory=FaultState)
    done: list[Done] = field(default_factory=list)
    last: FaultDecision | None = None
    last_signals: Signals | None = None
    error: str | None = None   # why the last window was skipped

    def tick(self, now: float | None = None) -> FaultDecision | None:
        now = time.time() if now is None else now
        del self.done[:-MAX_DONE]
        workers = self.workers()
        refs = {w.name: WorkerRef(w.name, w.namespace, node=w.node, url=w.url) for w in workers}
        out = {n for n, ref in refs.items() if self.fleet.state(ref).state is not Routability.SERVING}
        try:
            signals = read_signals(self.prometheus, workers, self.policy.detection.window_seconds, out)
        except PrometheusError as e:
            self.error = str(e)
            log.warning("fault detection skips a window: %s", e)
            return None
        self.error, self.last_signals = None, signals
        decision = detect(signals.members, signals.transfers, self.policy, self.state, now)
        for inc in decision.incidents:
            if inc.kind == "worker" and inc.target in signals.evidence:
                inc.evidence = {**inc.evidence, "readings": signals.evidence[inc.target]}
            log.warning("fault incident: %s %s: %s", inc.kind, inc.target, inc.evidence)
            if self.on_incident is not None:
                self.on_incident(inc)
        for action in decision.actions:
            self.done.append(Done(action, self._apply(action, refs, out), now))
        self.last = decision
        return decision

    def _apply(self, action: Action, refs: dict[str, WorkerRef], out: set[str]) -> str:
        try:
            if action.verb == "CordonNode":
                self.fleet.cordon(action.target, action.reason)
                return self._drain_node(action, refs, out)
            elif action.verb == "Quarantine":
                self.fleet.quarantine(refs[action.target], action.reason)
            elif action.verb == "RestartPod":
                self.fleet.restart(refs[action.target], action.reason)
            elif action.verb == "RouteAround":
                sender, receiver = action.target.split("->", 1)
                self.fleet.avoid_link(refs[sender], refs[receiver], action.reason, action.until)
            else:
                return f"refused: no verb for {action.verb}"
        except (ActionRefused, KeyError) as e:
            log.warning("%s %s refused: %s", action.verb, action.target, e)
            return f"refused: {e}"
        return "done"

    def _drain_node(self, action: Action, refs: dict[str, WorkerRef], out: set[str]) -> str:
        drained, refused = [], []
        for name, ref in sorted(refs.items()):
            if ref.node != action.target or name in out:
                continue
            try:
                self.fleet.drain(ref, f"its node {action.target} is cordoned: {action.reason}")
                drained.append(name)
            except ActionRefused as e:
                refused.append(f"{name}: {e}")
        return "; ".join(["done", *(["drained " + ", ".join(drained)] if drained else []),
                          *(["not drained " + "; ".join(refused)] if refused else [])])

    def run(self, stop: threading.Event, after: Callable[["FaultLoop"], None] | None = None) -> None:
        """A window every `windowSeconds`, until `stop` is set; `after` sees each window's result."""
        period = float(self.policy.detection.window_seconds)
        while not stop.wait(period):
            try:
                self.tick()
                if after is not None:
                    after(self)
            except Exception:  # one bad window never ends the loop
                log.exception("fault detection window failed")
