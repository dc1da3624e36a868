"""What a ModelDeployment's status says after a reconcile (pure: no I/O, the time passed in).

Three conditions tell a reader where a deployment stands: Ready (every pool has its desired
ready pods, all on the current template), Progressing (the last plan changed something, or a
rollout is still under way) and Degraded (a pod cannot be placed, or the spec is invalid).
A condition keeps its lastTransitionTime while its status stays the same, so `kubectl` shows
how long a deployment has been in its state, not when it was last reconciled. The status is
compared with the one written before and written only when it differs, so it holds nothing
that changes on every reconcile.
"""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from fleetwise.controllers.deployment import Plan, PoolStatus

MAX_PENDING = 20            # pods listed in status.pending; the message gives the count
MAX_MESSAGE = 1000          # characters of a condition's message
MAX_SPEC_ERROR = 500        # characters of a validation error in the InvalidSpec message
# what an unplaceable pod's reason is counted under in the pending-pods metric
REASON_BUCKETS = ("power budget", "GPU type", "free GPUs", "cordoned", "taint", "not ready", "no GPU nodes")


class Unplaced(TypedDict):
    pod: str
    reason: str


@dataclass(frozen=True)
class Condition:
    type: str
    status: str      # "True" | "False"
    reason: str
    message: str


def spec_invalid(error: str) -> list[Condition]:
    return [Condition("Degraded", "True", "InvalidSpec", error[:MAX_SPEC_ERROR])]


def pods_unplaceable(pending: list[Unplaced]) -> str:
    return f"{len(pending)} pod(s) cannot be placed: {pending[0]['reason']}"


def plan_applied(plan: Plan, pending: list[Unplaced]) -> list[Condition]:
    """The conditions once the plan is applied and its new pods bound, `pending` the ones that did not fit."""
    pools = plan.pools.values()
    ready = all(s.ready >= s.desired and s.updated >= s.desired for s in pools)
    progressing = bool(plan.create or plan.delete or plan.drain) or any(s.updated < s.desired for s in pools)
    summary = ", ".join(f"{role} {s.summary}" for role, s in plan.pools.items())
    return [
        Condition("Ready", "True" if ready else "False", "AllReplicasReady" if ready else "ReplicasNotReady",
                  f"ready replicas: {summary}"),
        Condition("Progressing", "True" if progressing else "False", "Reconciling" if progressing else "Converged",
                  "; ".join(message for _, _, message in plan.events) or summary),
        Condition("Degraded", "True", "Unschedulable", pods_unplaceable(pending)) if pending
        else Condition("Degraded", "False", "Placed", "every pod is placed"),
    ]


def deployment_status(previous: Mapping[str, Any] | None, generation: int | None, pools: Mapping[str, PoolStatus],
                      conditions: list[Condition], pending: list[Unplaced], now: str) -> dict[str, Any]:
    """The status object to write; `previous` is the one written before, `now` an RFC 3339 time."""
    old = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    conds = []
    for cond in conditions:
        prev = old.get(cond.type)
        since = now if prev is None or prev.get("status") != cond.status else prev.get("lastTransitionTime", now)
        conds.append({"type": cond.type, "status": cond.status, "reason": cond.reason,
                      "message": cond.message[:MAX_MESSAGE], "observedGeneration": generation,
                      "lastTransitionTime": since})
    out: dict[str, Any] = {"observedGeneration": generation, "conditions": conds, "pending": pending[:MAX_PENDING]}
    for role, s in pools.items():
        out[role] = {"desired": s.desired, "ready": s.ready, "updated": s.updated, "summary": s.summary}
    return out


def settled(status: Mapping[str, Any]) -> bool:
    """Ready and not progressing: nothing to look at again before the next change or resync."""
    conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return conds.get("Ready") == "True" and conds.get("Progressing") != "True"


def unplaceable_news(pending: list[Unplaced], previous: Mapping[str, Any] | None) -> str | None:
    """The message of an Unschedulable Event, when the situation differs from the Degraded
    condition written before: one Event per new situation, not one per reconcile."""
    if not pending:
        return None
    message = pods_unplaceable(pending)
    before = next((c.get("message") for c in (previous or {}).get("conditions") or [] if c.get("type") == "Degraded"),
                  None)
    return message if message != before else None


def short_reason(reason: str) -> str:
    """A placement reason in a few words ('power_budget', 'GPU_type', ...), for a metric label."""
    for key in REASON_BUCKETS:
        if key in reason:
            return key.replace(" ", "_")
    return "other"


def pending_by_reason(pending: list[Unplaced]) -> dict[str, int]:
    return dict(Counter(short_reason(item["reason"]) for item in pending))
