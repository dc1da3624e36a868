"""The fault loop, one window at a time: signals from Prometheus (`fault_signals.py`),
`controllers/faults.py`'s decision, its actions done through `FleetActions` (the operator
wraps its fleet in `ReportingFleet` so each one reaches the admin API). Used by the operator
and by `fleetwise up --detect-faults` alike.

Quarantine and RestartPod go to the worker; CordonNode to its node, then a drain of each of its
workers still serving (their deployments replace them away from the node); RouteAround to the
link's two workers (`avoid_link`: the router pairs them with others until the action's `until`;
both stay serving). An action the fleet refuses is recorded as refused; a Prometheus that does not answer skips the
window (no data is not a healthy window, and not a sick one either).

Actions run in threads of their own, one per target (a worker, a node or a link), its verbs in
order (Quarantine, then RestartPod): a window waits `action_wait` seconds for those it started
(a quarantine, a cordon, a route-around or a pod deletion ends within it) and then returns, so that
a slow one (restarting a local worker process takes 20-40 s) does not hold up the windows after
it. While a target's actions run, `running` lists them and the worker counts as unavailable to the
detector (not scored, and one of its group's `maxUnavailableFraction`); a target still busy gets no
second job (its new actions are recorded as refused). Each action goes to `done` when it ends,
with a sequence number (`seq`), so that a caller (the operator's status and Events) takes the
outcomes that arrived since it last looked (`finished_after`).
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
MAX_DONE = 200      # actions kept in `done`, the newest
ACTION_WAIT = 2.0   # seconds a window waits for the actions it started before it returns
STOP_WAIT = 60.0    # seconds `wait` gives running actions when the loop stops


@dataclass
class Done:
    """One action and how it ended; `at`: the window that decided it (seconds since the epoch)."""
    action: Action
    outcome: str         # done | refused: why
    at: float
    seconds: float = 0.0  # how long it ran
    seq: int = 0          # 1, 2, ... in the order actions ended


@dataclass(frozen=True)
class Running:
    """An action started and not ended yet; `at`: the window that decided it."""
    action: Action
    at: float
    since: float          # time.time() when it started


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
    action_wait: float = ACTION_WAIT
    running: list[Running] = field(default_factory=list)
    _jobs: dict[str, threading.Thread] = field(default_factory=dict)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def busy(self) -> set[str]:
        """Targets (workers, nodes, links) whose actions still run."""
        with self._lock:
            return {t for t, job in self._jobs.items() if job.is_alive()}

    def finished_after(self, seq: int) -> list[Done]:
        """The actions that ended after the one numbered `seq`, in the order they ended."""
        with self._lock:
            return [d for d in self.done if d.seq > seq]

    def tick(self, now: float | None = None) -> FaultDecision | None:
        now = time.time() if now is None else now
        with self._lock:
            del self.done[:-MAX_DONE]
        workers = self.workers()
        refs = {w.name: WorkerRef(w.name, w.namespace, node=w.node, url=w.url) for w in workers}
        busy = self.busy()
        out = {n for n, ref in refs.items() if n in busy or self.fleet.state(ref).state is not Routability.SERVING}
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
        self._start(decision.actions, refs, out, now)
        self.last = decision
        return decision

    def _start(self, actions: list[Action], refs: dict[str, WorkerRef], out: set[str], now: float) -> None:
        """Each target's actions in a thread of its own; waits `action_wait` for them all."""
        by_target: dict[str, list[Action]] = {}
        for action in actions:
            by_target.setdefault(action.target, []).append(action)
        started = []
        for target, todo in by_target.items():
            with self._lock:
                job = self._jobs.get(target)
                if job is not None and job.is_alive():
                    for action in todo:
                        self._end(action, now, "refused: an earlier action on it is still running", 0.0)
                    continue
                job = threading.Thread(target=self._job, args=(todo, refs, out, now), daemon=True,
                                       name=f"fault-action-{target}"[:64])
                self._jobs = {t: j for t, j in self._jobs.items() if j.is_alive()} | {target: job}
                self.running += [Running(a, now, time.time()) for a in todo]
            job.start()
            started.append(job)
        deadline = time.monotonic() + self.action_wait
        for job in started:
            job.join(max(0.0, deadline - time.monotonic()))

    def _job(self, actions: list[Action], refs: dict[str, WorkerRef], out: set[str], at: float) -> None:
        for action in actions:
            t0 = time.monotonic()
            try:
                outcome = self._apply(action, refs, out)
            except Exception as e:  # a bug in a verb is an action that failed, not a lost thread
                log.exception("%s %s failed", action.verb, action.target)
                outcome = f"refused: {type(e).__name__}: {e}"
            with self._lock:
                self._end(action, at, outcome, time.monotonic() - t0)

    def _end(self, action: Action, at: float, outcome: str, seconds: float) -> None:
        """Under the lock: the action leaves `running` for `done`."""
        self._seq += 1
        self.running = [r for r in self.running if not (r.action is action and r.at == at)]
        self.done.append(Done(action, outcome, at, seconds, self._seq))

    def wait(self, timeout: float = STOP_WAIT) -> bool:
        """Until every running action has ended (True), or `timeout` seconds (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))
        return not self.busy()

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
