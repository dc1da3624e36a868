"""Faults in the simulated fleet and the operator's detector acting on them: a slow GPU (every
step `factor` times as long), a bad link (a prefill worker's KV link at 1 / `factor` of its
bandwidth), a dead worker or node (its requests go back to the router and start again; the
router marks it down at once), an XID error (a hard signal only). Every window the workers'
signals go to `fleetwise.controllers.faults.detect`, the operator's own function, as the
operator would feed it: seconds of busy GPU per token computed (prompt tokens for prefill,
generated tokens for decode), KV transfer seconds per byte per (sender, receiver) (the link's
throughput: waiting behind other transfers is not taken for a slow link), hard
signals. Its actions are applied with the fleet's timings: Quarantine takes the worker out of
routing at once (its requests in flight finish), RestartPod replaces it after `restart_s`
(whatever it still holds then starts again elsewhere), CordonNode does both to every worker on
the node; RouteAround is recorded (links are per sender here, so there is no pair to avoid).
"""

import math
from dataclasses import dataclass, field

from fleetwise.controllers import faults
from fleetwise.spec import FaultPolicySpec

from .engine import Simulation
from .workers import Flight, Worker

KINDS = ("slow", "link", "dead", "xid")


@dataclass
class Fault:
    kind: str                 # slow | link | dead | xid
    target: str               # a worker ("POOL/INDEX") or, for dead, a node's name too
    at_s: float
    factor: float = 1.3       # slow, link: how many times slower

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"faults[].kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.factor < 1 or self.at_s < 0:
            raise ValueError("faults[].factor must be at least 1 and faults[].at_s not negative")


@dataclass
class FaultConfig:
    faults: list[Fault] = field(default_factory=list)
    detector: bool = True
    window_s: int = 60                    # FaultPolicy detection.windowSeconds
    min_peers: int = 3
    deviation_threshold: float = 4.0
    consecutive_windows: int = 2
    restart_s: float = 90.0               # a replacement worker's start: placement, image, weights
    cooldown_s: int = 600
    max_actions_per_hour: int = 10
    max_unavailable_fraction: float = 0.25

    def policy(self) -> FaultPolicySpec:
        return FaultPolicySpec.model_validate({
            "selector": {"matchLabels": {}},
            "detection": {"windowSeconds": self.window_s, "minPeers": self.min_peers,
                          "deviationThreshold": self.deviation_threshold,
                          "consecutiveWindows": self.consecutive_windows},
            "remediation": {"actions": ["Quarantine", "RestartPod", "CordonNode", "RouteAround"],
                            "cooldownSeconds": self.cooldown_s, "maxActionsPerHour": self.max_actions_per_hour,
                            "maxUnavailableFraction": self.max_unavailable_fraction}})


@dataclass
class FaultReport:
    kind: str
    target: str
    injected_s: float
    detected_s: float | None      # the first window whose incidents name it (its worker, node or link)
    detection_s: float | None
    acted_s: float | None
    action: str | None


@dataclass
class Detection:
    faults: list[FaultReport]
    windows: int
    incidents: int
    false_positives: list[str]    # "t=...: kind target", incidents on what no fault touched (the first 100)
    false_positives_by_kind: dict[str, int]   # worker | node | link: all of them
    actions: list[str]            # the first 200
    retried_requests: int         # sent back to the router by a dead or restarted worker


class FaultLoop:
    def __init__(self, sim: Simulation, config: FaultConfig) -> None:
        self.sim, self.config, self.policy = sim, config, config.policy()
        self.by_name = {w.replica.url.removeprefix("sim://"): w for w in sim.workers}
        for f in config.faults:
            if f.target not in self.by_name and not any(w.node == f.target for w in sim.workers):
                raise ValueError(f"faults[].target {f.target!r} is neither a worker (POOL/INDEX) nor a node")
        self.pending = sorted(config.faults, key=lambda f: f.at_s)
        self.reports = {id(f): FaultReport(f.kind, f.target, f.at_s, None, None, None, None) for f in config.faults}
        self.hard: dict[Worker, str] = {}
        self.restarts: list[tuple[float, Worker]] = []
        self.quarantined: set[Worker] = set()
        self.marks = {w: (0.0, 0.0, 0.0, 0.0) for w in sim.workers}
        self.transfers: dict[tuple[str, str], list[float]] = {}   # (sender, receiver) -> [seconds, bytes]
        self.state = faults.FaultState()
        self.next_window = float(config.window_s)
        self.windows = self.incidents = self.retried = 0
        self.false_positives: list[str] = []
        self.false_by_kind: dict[str, int] = {}
        self.actions: list[str] = []
        sim.on_transfer = self.transfer

    def transfer(self, f: Flight, seconds: float) -> None:
        """A transfer's seconds per byte as the link's own throughput: its share of the link's
        time (a stream among n counts 1/n of each second), without the fixed latency (which
        would make every small prompt look slow) and without the wait for other streams. The
        model has no jitter on a link, so a healthy link is exactly its bandwidth."""
        assert f.prefill is not None and f.decode is not None
        size = f.req.prompt_tokens * f.prefill.pool.perf.kv_bytes_per_token
        pair = self.transfers.setdefault((f.prefill.replica.url, f.decode.replica.url), [0.0, 0.0])
        pair[0] += f.kv_link_s
        pair[1] += size

    def tick(self, now: float) -> float:
        while self.pending and self.pending[0].at_s <= now + 1e-9:
            self.inject(self.pending.pop(0), now)
        for t, w in [r for r in self.restarts if r[0] <= now + 1e-9]:
            self.restarts.remove((t, w))
            self.replace(w)
        if now + 1e-9 >= self.next_window:
            self.next_window += self.config.window_s
            if self.config.detector:
                self.detect(now)
        due = [self.next_window] + [f.at_s for f in self.pending[:1]] + [t for t, _ in self.restarts]
        return min(due)

    def targets(self, fault: Fault) -> list[Worker]:
        return [self.by_name[fault.target]] if fault.target in self.by_name else \
            [w for w in self.sim.workers if w.node == fault.target]

    def inject(self, fault: Fault, now: float) -> None:
        for w in self.targets(fault):
            if fault.kind == "slow":
                w.slow = fault.factor
                self.sim.set_cap(w, w.cap_watts)   # the steps from now on take `factor` times as long
            elif fault.kind == "link" and w in self.sim.links:
                link = self.sim.links[w]
                link.advance(now)
                link.slow = fault.factor
                self.sim.schedule_link(link)
            elif fault.kind == "dead":
                self.kill(w)
                self.hard[w] = "engine stalled: /health fails"
            elif fault.kind == "xid":
                self.hard[w] = "XID 79: GPU has fallen off the bus"

    def kill(self, w: Worker) -> None:
        """The worker's process is gone: what it held goes back to the router."""
        sim = self.sim
        w.advance(sim.now)
        victims = list(w.queue) + w.prefilling + list(w.waiting) + [f for _, _, f in w.batch]
        if w in sim.links:
            victims += list(sim.links[w].active)
            sim.links[w].active.clear()
            sim.schedule_link(sim.links[w])
        w.queue.clear()
        w.prefilling.clear()
        w.waiting.clear()
        w.batch.clear()
        w.ctx_sum, w.reserved, w.in_pass, w.pass_due, w.dead = 0.0, 0, False, False, True
        w.version += 1
        w.passes += 1   # its prompt pass never ends
        w.replica.healthy = False
        for f in victims:
            owner = f.decode or f.prefill
            assert owner is not None
            owner.replica.outstanding -= 1
            f.prefilled, f.first_token, f.prefill, f.decode, f.max_gap, f.kv_link_s = 0, math.nan, None, None, 0.0, 0.0
            f.retries += 1
            self.retried += 1
            sim.dispatch(f)
        sim.settle(w)

    def replace(self, w: Worker) -> None:
        """A new worker in the old one's place: healthy, routable, nothing held."""
        if not w.dead:
            self.kill(w)
        w.dead, w.slow = False, 1.0
        self.sim.set_cap(w, w.cap_watts)
        if w in self.sim.links:
            self.sim.links[w].slow = 1.0
        self.hard.pop(w, None)
        self.quarantined.discard(w)
        w.replica.healthy, w.replica.routable, w.replica.failures = True, True, 0
        self.sim.settle(w)

    def signal(self, w: Worker) -> float | None:
        """Busy seconds per token computed in the window, or None with nothing computed."""
        prompt_s, token_s, prompt_tokens, made = self.marks[w]
        self.marks[w] = (w.prompt_s, w.token_s, float(w.prompt_tokens), w.tokens_made)
        busy = w.prompt_s - prompt_s + w.token_s - token_s
        work = w.prompt_tokens - prompt_tokens + w.tokens_made - made
        return busy / work if work > 0 and not w.dead else None

    def detect(self, now: float) -> None:
        self.sim.advance_all()
        members = [faults.Member(w.replica.url.removeprefix("sim://"), w.pool.name, w.node, self.signal(w),
                                 self.hard.get(w), w in self.quarantined) for w in self.sim.workers]
        transfers = [faults.Transfer(s.removeprefix("sim://"), r.removeprefix("sim://"), seconds / size)
                     for (s, r), (seconds, size) in self.transfers.items()]
        self.transfers = {}
        decision = faults.detect(members, transfers, self.policy, self.state, now)
        self.windows += 1
        self.incidents += len(decision.incidents)
        for inc in decision.incidents:
            hit = [r for f, r in zip(self.config.faults, self.reports.values()) if f.at_s <= now and self.names(f, inc)]
            for r in hit:
                if r.detected_s is None:
                    r.detected_s, r.detection_s = now, now - r.injected_s
            if not hit:
                self.false_positives.append(f"t={now:.0f}: {inc.kind} {inc.target}")
                self.false_by_kind[inc.kind] = self.false_by_kind.get(inc.kind, 0) + 1
        for a in decision.actions:
            self.act(a, now)

    def names(self, fault: Fault, inc: faults.Incident) -> bool:
        """Whether an incident points at what the fault broke: its worker, its node, or (a bad
        link) a pair it sends on."""
        workers = self.targets(fault)
        if inc.kind == "link":
            return fault.kind == "link" and inc.target.split("->")[0] in {self.name(w) for w in workers}
        if inc.kind == "node":
            return any(w.node == inc.target for w in workers)
        return inc.target in {self.name(w) for w in workers}

    @staticmethod
    def name(w: Worker) -> str:
        return w.replica.url.removeprefix("sim://")

    def act(self, action: faults.Action, now: float) -> None:
        self.actions.append(f"t={now:.0f}: {action.verb} {action.target}")
        if action.verb == "RouteAround":
            return
        workers = [w for w in self.sim.workers if w.node == action.target] if action.verb == "CordonNode" \
            else [self.by_name[action.target]]
        for w in workers:
            if action.verb in ("Quarantine", "CordonNode"):
                w.replica.routable = False
                self.quarantined.add(w)
            if action.verb in ("RestartPod", "CordonNode") and all(x is not w for _, x in self.restarts):
                self.restarts.append((now + self.config.restart_s, w))
        for f, r in zip(self.config.faults, self.reports.values()):
            if r.acted_s is None and r.detected_s is not None and any(w in self.targets(f) for w in workers):
                r.acted_s, r.action = now, action.verb

    def report(self) -> Detection:
        return Detection(list(self.reports.values()), self.windows, self.incidents, self.false_positives[:100],
                         self.false_by_kind, self.actions[:200], self.retried)
