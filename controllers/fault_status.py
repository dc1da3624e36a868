"""What a FaultPolicy's status says after a window (pure: the time passed in): its incidents,
bounded, and its conditions.

`controllers/faults.py` names an incident every window its target is out; a person wants one
incident per episode. An incident seen again within 1.5 windows of its last sighting is the
same one (the detector's own rule for a new episode), so its windows count up and its actions
add up; otherwise it opens anew. Each one is `Open` while it is seen and nothing was done,
`Remediated` once an action on it was done (it stays so: the target is out), `Cleared` when a
window passes without it and nothing was done (it went away by itself). An action may end
windows after the one that decided it (a restart): it is listed as `Verb: running` until then,
the incident meanwhile stays `Open`, and its outcome lands on the incident when it ends. The status keeps the
`MAX_INCIDENTS` newest, open ones first; the admin store keeps them all.

Conditions: `Ready` (the last window read its signals), `Degraded` (the detector stopped acting
on a flapping target, or the cluster refused an action, or a limit held an incident back; the
message says which), and, when the operator reports to an admin API, `AdminReachable` (False
while its records cannot be delivered: they wait in the queue).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetwise.controllers.faults import FaultDecision, Incident
from fleetwise.controllers.status import MAX_MESSAGE, Condition

MAX_INCIDENTS = 20    # incidents in the status
MAX_ACTIONS = 10      # actions listed on one incident
MAX_EVIDENCE = 2000   # characters of one incident's evidence as the status shows it
SAME_EPISODE = 1.5    # windows: seen again within this, an incident is the same one
RUNNING = "running"   # an action's outcome while it runs (a restart may outlast its window)
RUNNING_SUFFIX = f": {RUNNING}"


@dataclass
class Record:
    """One incident as the status shows it; times in seconds since the epoch."""
    kind: str
    target: str
    group: str
    opened: float
    last_seen: float
    evidence: dict[str, Any]
    state: str = "Open"          # Open | Remediated | Cleared
    windows: int = 1
    actions: list[str] = field(default_factory=list)   # "Quarantine: done"
    held: str = ""               # why no action, while it is held back


@dataclass
class IncidentBook:
    records: list[Record] = field(default_factory=list)   # newest first

    def window(self, incidents: list[Incident], outcomes: list[tuple[str, str, str]], held: list[tuple[str, str]],
               now: float, window_seconds: float) -> list[Record]:
        """Takes one window's incidents, the (verb, target, outcome) of the actions done on them,
        and why others were held; returns the incidents that opened in it."""
        current = {r.target: r for r in self.records
                   if now - r.last_seen <= SAME_EPISODE * window_seconds and r.last_seen < now}
        opened: list[Record] = []
        seen: dict[str, Record] = {}
        for inc in incidents:
            rec = seen.get(inc.target)
            if rec is not None:  # one worker out on two counts (its steps and its KV sends)
                rec.evidence = {**rec.evidence, **inc.evidence}
                continue
            rec = current.get(inc.target)
            if rec is None:
                rec = Record(inc.kind, inc.target, inc.group, now, now, inc.evidence)
                self.records.insert(0, rec)
                opened.append(rec)
            else:
                rec.last_seen, rec.windows, rec.evidence = now, rec.windows + 1, inc.evidence
                rec.state = "Open" if rec.state == "Cleared" else rec.state
            rec.held = ""
            seen[inc.target] = rec
        self.outcomes(outcomes, seen)
        for target, why in held:
            if target in seen:
                seen[target].held = why[:MAX_MESSAGE]
        live = {id(r) for r in seen.values()}
        for rec in self.records:  # one whose action still runs is not gone by itself
            if id(rec) not in live and rec.state == "Open" and not any(a.endswith(RUNNING_SUFFIX) for a in rec.actions):
                rec.state, rec.held = "Cleared", ""
        self.records.sort(key=lambda r: (r.state != "Open", -r.opened))
        del self.records[MAX_INCIDENTS:]
        return opened

    def outcomes(self, outcomes: list[tuple[str, str, str]], seen: dict[str, "Record"] | None = None) -> None:
        """Each (verb, target, outcome) on its incident: the one that lists the action as running
        (it ended windows after it was decided), else the one seen this window, else the newest
        on that target. `RUNNING` is listed
        once and replaced by how the action ended; a done one remediates the incident."""
        for verb, target, outcome in outcomes:
            pending = f"{verb}{RUNNING_SUFFIX}"
            rec = next((r for r in self.records if r.target == target and pending in r.actions), None) \
                or (seen or {}).get(target) or next((r for r in self.records if r.target == target), None)
            if rec is None:
                continue
            if outcome == RUNNING:
                if pending not in rec.actions:
                    rec.actions = [*rec.actions, pending][-MAX_ACTIONS:]
                continue
            entry = f"{verb}: {outcome}"
            if pending in rec.actions:
                rec.actions = [entry if a == pending else a for a in rec.actions]
            else:
                rec.actions = [*rec.actions, entry][-MAX_ACTIONS:]
            if outcome.startswith("done"):
                rec.state = "Remediated"

    def open_count(self) -> int:
        return sum(r.state == "Open" for r in self.records)


def _plain(x: Any) -> Any:
    """Evidence as JSON takes it: floats rounded, non-finite ones as None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return round(x, 6) if math.isfinite(x) else None
    return x


def evidence_view(evidence: dict[str, Any]) -> dict[str, Any] | str:
    """The evidence for the status: as it is when small, else its text cut to `MAX_EVIDENCE`."""
    plain = _plain(evidence)
    text = str(plain)
    return plain if len(text) <= MAX_EVIDENCE else text[:MAX_EVIDENCE]


def flat_evidence(evidence: dict[str, Any], prefix: str = "", limit: int = 64) -> list[dict[str, Any]]:
    """Evidence as the admin API's list of {signal, value, detail}: each number a value, each
    text a detail, nested names joined with dots (`w1.score`)."""
    out: list[dict[str, Any]] = []
    for key, value in evidence.items():
        name = f"{prefix}{key}"[:128]
        if isinstance(value, dict):
            out += flat_evidence(value, name + ".", limit - len(out))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                out.append({"signal": name, "value": float(value)})
        else:
            out.append({"signal": name, "detail": str(value)[:4096]})
        if len(out) >= limit:
            return out[:limit]
    return out


def ready(error: str | None, workers: int, missing: int) -> Condition:
    if error is not None:
        return Condition("Ready", "False", "NoSignals", f"the last window was skipped: {error}")
    return Condition("Ready", "True", "Watching", f"{workers} workers watched, {missing} without a signal this window")


def not_ready(reason: str, message: str) -> Condition:
    return Condition("Ready", "False", reason, message)


def degraded(decision: FaultDecision | None, refused: list[str]) -> Condition:
    """True when the policy cannot do what it is for: flapping targets, refused actions, or
    incidents held back by its limits (cooldowns and the hourly bound included)."""
    if decision is not None and decision.flapping:
        return Condition("Degraded", "True", "Flapping",
                         f"no more actions on {', '.join(sorted(decision.flapping))}: each came back "
                         f"too often within an hour; a person should look")
    if refused:
        return Condition("Degraded", "True", "ActionsRefused", "; ".join(refused))
    held = [f"{target}: {why}" for target, why in (decision.held if decision else [])]
    if held:
        return Condition("Degraded", "True", "Held", "; ".join(held))
    return Condition("Degraded", "False", "Acting", "every incident of the last window was acted on, or none")


def admin_reachable(reachable: bool, queued: int) -> Condition:
    if reachable:
        return Condition("AdminReachable", "True", "Delivering", f"records reach the admin API ({queued} queued)")
    return Condition("AdminReachable", "False", "Unreachable",
                     f"the admin API does not take records; {queued} wait in the queue and are retried")


def record_view(rec: Record, iso: Callable[[float], str]) -> dict[str, Any]:
    """One incident for the status; `iso` turns seconds since the epoch into RFC 3339."""
    return {"kind": rec.kind, "target": rec.target, "group": rec.group, "state": rec.state,
            "opened": iso(rec.opened), "lastSeen": iso(rec.last_seen), "windows": rec.windows,
            "actions": rec.actions, "held": rec.held, "evidence": evidence_view(rec.evidence)}
