"""What a ModelDeployment's status says after a reconcile (pure: no I/O, the time passed in).

Three conditions tell a reader where a deployment stands: Ready (every pool has its desired
ready pods, all on the current template), Progressing (the last plan changed something, or a
rollout is still under way) and Degraded (a pod cannot be created or placed, or the spec is
invalid; the message carries the API server's or the placement's reason).
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


def pods_not_created(failures: list[str]) -> str:
    return f"{len(failures)} pod(s) could not be created: {failures[0]}"


def plan_applied(plan: Plan, pending: list[Unplaced], not_created: list[str] | None = None) -> list[Condition]:
    """The conditions once the plan is applied and its new pods bound: `pending` the ones that
    did not fit, `not_created` why the API server refused the ones it would not create."""
    pools = plan.pools.values()
    ready = all(s.ready >= s.desired and s.updated >= s.desired for s in pools)
    # a drained pod still busy keeps it progressing: it is looked at again soon, not at the next
    # resync, since nothing wakes the deployment when its worker goes idle
    progressing = bool(plan.create or plan.delete or plan.drain or plan.draining) or any(
        s.updated < s.desired for s in pools)
    summary = ", ".join(f"{role} {s.summary}" for role, s in plan.pools.items())
    waiting = [f"{len(plan.draining)} drained pod(s) finishing their requests"] if plan.draining else []
    return [
        Condition("Ready", "True" if ready else "False", "AllReplicasReady" if ready else "ReplicasNotReady",
                  f"ready replicas: {summary}"),
        Condition("Progressing", "True" if progressing else "False", "Reconciling" if progressing else "Converged",
                  "; ".join([*(message for _, _, message in plan.events), *waiting]) or summary),
        _degraded(pending, not_created or []),
    ]


def _degraded(pending: list[Unplaced], not_created: list[str]) -> Condition:
    if not_created:  # the first thing to fix: nothing can be placed that was never created
        message = pods_not_created(not_created) + (f"; {pods_unplaceable(pending)}" if pending else "")
        return Condition("Degraded", "True", "CreateFailed", message)
    if pending:
        return Condition("Degraded", "True", "Unschedulable", pods_unplaceable(pending))
    return Condition("Degraded", "False", "Placed", "every pod is placed")


def with_times(previous: Mapping[str, Any] | None, conditions: list[Condition], now: str,
               generation: int | None) -> list[dict[str, Any]]:
    """Conditions as the status holds them; each keeps its lastTransitionTime while its status stays."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    out = []
    for cond in conditions:
        prev = old.get(cond.type)
        since = now if prev is None or prev.get("status") != cond.status else prev.get("lastTransitionTime", now)
        out.append({"type": cond.type, "status": cond.status, "reason": cond.reason,
                    "message": cond.message[:MAX_MESSAGE], "observedGeneration": generation,
                    "lastTransitionTime": since})
    return out


def deployment_status(previous: Mapping[str, Any] | None, generation: int | None, pools: Mapping[str, PoolStatus],
                      conditions: list[Condition], pending: list[Unplaced], now: str) -> dict[str, Any]:
    """The status object to write; `previous` is the one written before, `now` an RFC 3339 time."""
    conds = with_times(previous, conditions, now, generation)
    out: dict[str, Any] = {"observedGeneration": generation, "conditions": conds, "pending": pending[:MAX_PENDING]}
    for role, s in pools.items():
        out[role] = {"desired": s.desired, "ready": s.ready, "updated": s.updated, "summary": s.summary}
    return out


def settled(status: Mapping[str, Any]) -> bool:
    """Nothing to look at again before the next change or resync: ready and not progressing,
    or an invalid spec (only a new spec, which wakes the deployment, can change that)."""
    conds = {c["type"]: (c["status"], c.get("reason")) for c in status.get("conditions", [])}
    if conds.get("Degraded") == ("True", "InvalidSpec"):
        return True
    return conds.get("Ready", ("",))[0] == "True" and conds.get("Progressing", ("",))[0] != "True"


def unplaceable_news(pending: list[Unplaced], previous: Mapping[str, Any] | None) -> str | None:
    """The message of an Unschedulable Event, when the situation differs from the Degraded
    condition written before: one Event per new situation, not one per reconcile."""
    return _news(pods_unplaceable(pending), previous) if pending else None


def not_created_news(failures: list[str], previous: Mapping[str, Any] | None) -> str | None:
    """The message of a CreateFailed Event, on the same rule."""
    return _news(pods_not_created(failures), previous) if failures else None


def _news(message: str, previous: Mapping[str, Any] | None) -> str | None:
    before = next((c.get("message") for c in (previous or {}).get("conditions") or [] if c.get("type") == "Degraded"),
                  None)
    # the condition holds at most MAX_MESSAGE characters of it, and may hold more than it
    return message if not (before or "").startswith(message[:MAX_MESSAGE]) else None


def short_reason(reason: str) -> str:
    """A placement reason in a few words ('power_budget', 'GPU_type', ...), for a metric label."""
    for key in REASON_BUCKETS:
        if key in reason:
            return key.replace(" ", "_")
    return "other"


def pending_by_reason(pending: list[Unplaced]) -> dict[str, int]:
    """Every bucket, zeros included, so that a gauge set from it drops a reason that went away."""
    counts = Counter(short_reason(item["reason"]) for item in pending)
    return {bucket: counts.get(bucket, 0) for bucket in [*(b.replace(" ", "_") for b in REASON_BUCKETS), "other"]}
