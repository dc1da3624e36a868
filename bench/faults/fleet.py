"""The fault benchmark's fleet: `fleetwise up`'s own machinery (`plan`, `LocalFleet`, the real
Prometheus and the fault loop of `local_faults.py`) over the tiny model, every worker with its
fault switches and a modelled GPU (for XID), one torch thread each; and a record of every
window the detector decided: its scores, signals, incidents and the actions it took."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleetwise.controllers.faults import FaultState, Incident
from fleetwise.fault_loop import FaultLoop
from fleetwise.local_faults import LocalFaults, local_policy, start_local_faults
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.net import free_port
from fleetwise.procs import wait_healthy
from fleetwise.protocol import AUTH_HEADER, bearer
from fleetwise.spec import RemediationAction
from fleetwise.up import _ready, plan, stop_fleet, write_token

WORKER_ARGS = ["--fault", "switches", "--kv-cache-mib", "32", "--device", "cpu", "--dtype", "float32",
               "--modelled-gpu", "H100"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
READY_TIMEOUT_S = 240.0


@dataclass
class Window:
    """One window as the detector decided it; `at`: time.time() once its actions were done."""
    at: float
    decided: float                                   # the window's tick (its actions' time), else `at`
    scores: dict[str, float]
    values: dict[str, float]                         # step seconds per token computed
    tokens: dict[str, float]
    readings: dict[str, dict[str, float]]            # each worker's evidence (steps, step seconds, ITL, ...)
    missing: list[str]
    incidents: list[tuple[str, str]]                 # (kind, target)
    actions: list[tuple[str, str, str]]              # (verb, target, outcome), new this window
    held: list[tuple[str, str]]
    links: dict[str, float] = field(default_factory=dict)   # "sender->receiver" -> KV seconds per byte

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Record:
    """Every window of the run, appended by the fault loop's thread."""
    windows: list[Window] = field(default_factory=list)
    incidents: list[tuple[float, str, str]] = field(default_factory=list)   # (time, kind, target) as decided
    _seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, loop: FaultLoop) -> None:
        d, sig = loop.last, loop.last_signals
        if d is None or sig is None:
            return
        new = loop.done[self._seen:] if len(loop.done) >= self._seen else loop.done
        self._seen = len(loop.done)
        ev = sig.evidence
        w = Window(time.time(), min((x.at for x in new), default=time.time()), dict(d.scores),
                   {k: v["step_seconds_per_token"] for k, v in ev.items() if "step_seconds_per_token" in v},
                   {k: v["tokens"] for k, v in ev.items() if "tokens" in v}, {k: dict(v) for k, v in ev.items()},
                   list(sig.missing),
                   [(i.kind, i.target) for i in d.incidents],
                   [(x.action.verb, x.action.target, x.outcome) for x in new], list(d.held),
                   {f"{t.sender}->{t.receiver}": t.seconds_per_byte for t in sig.transfers})
        with self._lock:
            self.windows.append(w)

    def on_incident(self, inc: Incident) -> None:
        """Called by the loop as it decides, before its actions (which run on in their own thread)."""
        with self._lock:
            self.incidents.append((time.time(), inc.kind, inc.target))

    def since(self, t: float) -> list[Window]:
        with self._lock:
            return [w for w in self.windows if w.at >= t]


@dataclass
class BenchFleet:
    fleet: LocalFleet
    procs: list[Member]
    faults: LocalFaults
    record: Record
    router: str
    token: str
    window: int
    actions: list[RemediationAction] = field(default_factory=list)   # what the policy lets the loop do when it acts

    def acting(self) -> bool:
        return bool(self.faults.loop.policy.remediation.actions)

    def fresh_detector(self) -> None:
        """The loop's detector from scratch: no windows out, episodes, cooldowns or actions counted."""
        self.faults.loop.state = FaultState()

    def set_acting(self, on: bool) -> None:
        """The loop acts within its policy (`on`) or only detects (the policy allows no actions:
        incidents are still decided and recorded, each held as "detection only")."""
        self.faults.loop.policy.remediation.actions = list(self.actions) if on else []

    def set_faults(self, worker: str, settings: dict) -> None:
        """The worker's fault switches, all at once (`{}`: all off)."""
        w = self.fleet.workers[worker]
        r = httpx.post(w.internal_url + "/internal/faults", json=settings,
                       headers={AUTH_HEADER: bearer(self.token)}, timeout=10)
        r.raise_for_status()

    def serving(self, worker: str) -> bool:
        w = self.fleet.workers[worker]
        return w.running and self.fleet.states[worker].state.value == "serving" and _ready(w)


@contextmanager
def bench_fleet(workdir: Path, model: Path, mode: str, per_pool: int, window: int,
                consecutive_windows: int = 2, restart: bool = True) -> Iterator[BenchFleet]:
    """`per_pool` workers of each role (mixed, or prefill and decode), the router, Prometheus
    and the fault loop every `window` seconds (`local_policy`; without RestartPod unless
    `restart`); all stopped on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = write_token(workdir)
    counts = (per_pool, per_pool, 0) if mode == "disaggregated" else (0, 0, per_pool)
    procs = plan(model, "tiny", mode, free_port(), *counts, workdir, WORKER_ARGS, token_file)
    for p in procs:
        p.env, p.die_with_parent = {**p.env, **ONE_THREAD}, True
    token = token_file.read_text().strip()
    fleet = LocalFleet("tiny", procs, workdir / "router.yaml", workdir / "logs" / "actions.log",
                       ready_timeout=READY_TIMEOUT_S, token=token)
    policy = local_policy(window)
    policy.detection.consecutive_windows = consecutive_windows
    if not restart:
        policy.remediation.actions = [a for a in policy.remediation.actions if a != "RestartPod"]
    try:
        for p in procs:
            p.start()
        wait_healthy(procs, READY_TIMEOUT_S, ready=_ready)
        record = Record()
        faults = start_local_faults(fleet, procs, workdir, policy, scrape_interval=1.0, observe=record.observe)
        faults.loop.on_incident = record.on_incident
        try:
            yield BenchFleet(fleet, procs, faults, record, procs[-1].url, token, window,
                             list(policy.remediation.actions))
        finally:
            faults.stop()
    finally:
        stop_fleet(procs)
