"""The injected faults, one at a time, and how each was met: the fault switch set on one worker
(`worker/engine/faults.py`), the detector's windows watched until an incident names the target
and an action on it is done (or `max_windows` pass), the switch cleared, and the target given
time to serve again before the next case. A healthy stretch is a case without a fault.

Times are from the injection (`time.time()` after the switch answered): `detected_s` to the
decision that first names the target (the loop's `on_incident`, before its actions),
`acted_s` to the first action on it (the window's tick; a restart is done within it, and the
loop sees no window while it runs), `serving_s` to the target routable and healthy again.
Every incident that names something no fault touched at that time is a false positive.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fleetwise.bench.faults.fleet import BenchFleet, Window

ACTION_WAIT_S = 150.0   # after an incident, for its window's actions (a restart) to be done


@dataclass(frozen=True)
class Case:
    name: str                   # "slow 2x", "stall", "link", "xid", "healthy"
    kind: str                   # slow | stall | link | xid | healthy
    worker: str = ""            # whose switches are set (a link's receiver)
    settings: dict = field(default_factory=dict)
    link: str = ""              # "sender->receiver" for a link
    seconds: float = 0.0        # healthy: how long
    factor: float = 1.0         # slow, link: how many times slower (the simulator's figure)

    @property
    def target(self) -> str:
        return self.link or self.worker


@dataclass
class CaseResult:
    case: Case
    injected: float
    detected_s: float | None = None
    acted_s: float | None = None
    serving_s: float | None = None
    actions: list[tuple[str, str, str]] = field(default_factory=list)
    windows: int = 0
    scores: list[float | None] = field(default_factory=list)   # the target's score, window by window
    false_positives: list[tuple[float, str, str]] = field(default_factory=list)   # (at, kind, target)
    arm: str = ""                # a goodput arm's ("with": the loop acting, "without": detection only)

    def to_json(self) -> dict:
        c = self.case
        return {"name": c.name, "kind": c.kind, "target": c.target, "settings": c.settings, "factor": c.factor,
                "injected": self.injected, "detected_s": self.detected_s, "acted_s": self.acted_s,
                "serving_s": self.serving_s, "actions": self.actions, "windows": self.windows,
                "target_scores": self.scores, "false_positives": self.false_positives,
                **({"arm": self.arm} if self.arm else {})}


def slow(worker: str, factor: float) -> Case:
    return Case(f"slow {factor:g}x", "slow", worker, {"slow_factor": factor}, factor=factor)


def stall(worker: str, seconds: float = 60.0) -> Case:
    return Case("stall", "stall", worker, {"stall_seconds": seconds})


def xid(worker: str, code: int = 79) -> Case:
    return Case("xid", "xid", worker, {"xid": code})


def slow_link(delay_s: float = 0.3) -> Case:
    """A slow link between the busiest (prefill, decode) pair of the last windows."""
    return Case("slow KV link", "link", "decode", {"kv_delay_seconds": delay_s}, link="prefill->decode")


def resolve(f: BenchFleet, case: Case, used: set[str], recent: int = 3) -> Case:
    """A case aimed at a role ("decode", "prefill", "mixed") aimed at one worker of it: the one
    that computed the most tokens in the last `recent` windows among those no case used yet (a
    worker the router sends nothing has no signal to find), or for a link, the pair that moved
    the most KV; the worker is then used."""
    if case.kind == "healthy" or case.worker in f.fleet.workers:
        return case
    windows = f.record.windows[-recent:]
    if case.kind == "link":
        moved: dict[str, int] = {}
        for w in windows:
            for key in w.links:
                moved[key] = moved.get(key, 0) + 1
        link = max(sorted(moved), key=lambda k: moved[k]) if moved else "prefill-0->decode-0"
        sender, receiver = link.split("->")
        return replace(case, worker=receiver, link=link,
                       settings={**case.settings, "kv_slow_peer": f.fleet.workers[sender].internal_url})
    done = {n: sum(w.tokens.get(n, 0.0) for w in windows) for n in f.fleet.workers
            if n.startswith(case.worker + "-") and n not in used}
    chosen = max(sorted(done), key=lambda n: done[n])
    used.add(chosen)
    return replace(case, worker=chosen)


def healthy(seconds: float) -> Case:
    return Case("healthy", "healthy", seconds=seconds)


def names(case: Case, kind: str, target: str) -> bool:
    """Whether an incident is about what the case injected."""
    if case.kind == "link":
        return target == case.link or (kind == "worker" and target in case.link.split("->"))
    return case.kind != "healthy" and target == case.worker


def run_case(f: BenchFleet, case: Case, max_windows: int, tick: Callable[[], None] = lambda: None,
             wait_serving: bool = True, hold_s: float = 0.0, arm: str = "") -> CaseResult:
    """One case from injection to the target serving again (`wait_serving`); `tick` after each
    window seen. The fault stays on at least `hold_s` (a goodput arm's span), and while the
    fault loop acts on nothing (detection only) the case waits for no action."""
    if case.kind != "healthy":
        f.set_faults(case.worker, case.settings)
    r = CaseResult(case, time.time(), arm=arm)
    acting = f.acting()
    hold = r.injected + hold_s
    limit = max(hold, r.injected + (case.seconds if case.kind == "healthy" else max_windows * f.window + 5))
    seen = 0
    while time.time() < limit:
        time.sleep(0.5)
        new = f.record.since(r.injected)[seen:]
        seen += len(new)
        for w in new:
            r.windows += 1
            _look(r, w)
            tick()
        if case.kind == "healthy":
            continue
        named = [t for t, kind, target in list(f.record.incidents) if t >= r.injected and names(case, kind, target)]
        if named and (r.detected_s is None or named[0] - r.injected < r.detected_s):
            r.detected_s = named[0] - r.injected
            limit = max(limit, named[0] + ACTION_WAIT_S)   # its actions (a restart) end the window
        if time.time() >= hold and r.detected_s is not None and (
                r.acted_s is not None or case.kind == "link" or not acting):
            break
    if case.kind != "healthy":
        _clear(f, case)
        if wait_serving:
            r.serving_s = _serving(f, case, r.injected)
    return r


def _look(r: CaseResult, w: Window) -> None:
    case = r.case
    r.scores.append(w.scores.get(case.worker) if case.kind != "link" else None)
    for kind, target in w.incidents:
        if names(case, kind, target):
            if r.detected_s is None:
                r.detected_s = w.decided - r.injected
        else:
            r.false_positives.append((w.at, kind, target))
    for verb, target, outcome in w.actions:
        if names(case, "worker", target) or target == case.link:
            r.actions.append((verb, target, outcome))
            if r.acted_s is None:
                r.acted_s = w.decided - r.injected


def _clear(f: BenchFleet, case: Case) -> None:
    w = f.fleet.workers[case.worker]
    if w.running:
        try:
            f.set_faults(case.worker, {})
        except Exception:   # a worker restarting just now comes back with its switches off
            pass


def _serving(f: BenchFleet, case: Case, injected: float, timeout: float = 120.0) -> float | None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if f.serving(case.worker):
            return time.time() - injected
        time.sleep(0.5)
    return None


def false_positive_episodes(windows: list[Window], touched: Callable[[float, str, str], bool]) -> list[dict]:
    """Incidents on targets no fault touched, one per episode (consecutive windows on one
    target count once); `touched(at, kind, target)` says whether a fault explains it."""
    out: list[dict] = []
    open_: dict[str, dict] = {}
    for w in windows:
        now = {t for k, t in w.incidents if not touched(w.at, k, t)}
        for k, t in w.incidents:
            if t in now and t not in open_:
                open_[t] = {"at": w.at, "kind": k, "target": t, "windows": 0, "scores": []}
                out.append(open_[t])
            if t in now:
                open_[t]["windows"] += 1
                open_[t]["scores"].append(w.scores.get(t))
        for t in list(open_):
            if t not in now:
                del open_[t]
    return out
