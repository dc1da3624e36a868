"""What a ModelDeployment's pods should be, given the pods that are (pure, level-based).

Each pool (prefill, decode or mixed) converges on its replica count with pods of the
current template: failed pods are replaced, missing ones created, extra ones drained (the
router stops sending them requests) and deleted once idle or after the drain timeout; a
template change rolls out one surge pod at a time and removes an old pod only when the pool
keeps at least its desired number of ready pods. A quarantined pod (taken out of routing by
an action, kept for inspection) is not one of the pool's replicas: the pool gets a
replacement, and the plan never drains or deletes the quarantined pod itself; it stays
until it is restored (then it counts again, and an extra pod is drained as in a scale
down) or restarted. The operator, `fleetwise up` and the
simulator apply the plan; running the same inputs twice gives the same plan.
"""

import hashlib
import json
from dataclasses import dataclass, field

from fleetwise.spec import ROLES, ModelDeploymentSpec

DRAIN_TIMEOUT_SECONDS = 120.0


@dataclass
class PodView:
    """What the controller needs to know of one worker pod."""
    name: str
    role: str
    template_hash: str
    node: str | None = None
    phase: str = "Pending"          # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    deleting: bool = False
    draining_since: float | None = None  # marked not routable at this time
    quarantined: bool = False       # out of routing for inspection: not a replica, never removed by the plan
    outstanding: int | None = None  # requests in the worker (None: unknown)
    created: float = 0.0

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase not in ("Succeeded", "Failed")


@dataclass
class PoolStatus:
    desired: int = 0
    ready: int = 0
    updated: int = 0
    quarantined: int = 0  # pods kept out of the pool for inspection, beside its replicas

    @property
    def summary(self) -> str:
        return f"{self.ready}/{self.desired}" + (f" ({self.quarantined} quarantined)" if self.quarantined else "")


@dataclass
class Plan:
    create: list[tuple[str, str]] = field(default_factory=list)   # (role, template hash)
    delete: list[str] = field(default_factory=list)
    drain: list[str] = field(default_factory=list)                # mark not routable, delete later
    draining: list[str] = field(default_factory=list)  # drained before, not idle yet: looked at again soon
    pools: dict[str, PoolStatus] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)

    @property
    def converged(self) -> bool:
        return not (self.create or self.delete or self.drain) and all(
            p.ready == p.desired == p.updated for p in self.pools.values())


def template_hash(spec: ModelDeploymentSpec, role: str) -> str:
    """Changes exactly when a pod of this role must be replaced."""
    pool = spec.pools()[role]
    relevant = {"image": spec.image, "model": spec.model.model_dump(exclude_none=True),
                "engine": spec.engine.model_dump(),
                "role": role, "gpuType": pool.gpu_type, "gpus": pool.gpus_per_replica,
                "resources": pool.resources.model_dump() if pool.resources else None}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def _removal_order(p: PodView) -> tuple:
    # not ready first, then not placed, then the least busy, then the newest
    return (p.ready, p.node is not None, p.outstanding if p.outstanding is not None else 1 << 30, -p.created)


def plan(spec: ModelDeploymentSpec, pods: list[PodView], now: float,
         drain_timeout: float = DRAIN_TIMEOUT_SECONDS) -> Plan:
    out = Plan()
    pools = spec.pools()
    for role in ROLES:
        mine = [p for p in pods if p.role == role and not p.quarantined]
        if role not in pools:
            for p in mine:
                if not p.deleting:
                    out.delete.append(p.name)
            if any(not p.deleting for p in mine):
                out.events.append(("Normal", "PoolRemoved", f"removing the {role} pool (mode {spec.mode})"))
            continue
        _plan_pool(spec, role, mine, now, drain_timeout, out)
        held = sum(1 for p in pods if p.role == role and p.quarantined and p.live)
        if held and role in out.pools:
            out.pools[role].quarantined = held
            if any(r == role for r, _ in out.create):
                out.events.append(("Normal", "ReplacingQuarantined",
                                   f"{held} {role} pod(s) quarantined: kept for inspection, replaced in the pool"))
    return out


def _plan_pool(spec, role, pods: list[PodView], now: float, drain_timeout: float, out: Plan) -> None:
    desired = spec.pools()[role].replicas
    current = template_hash(spec, role)
    for p in pods:
        if not p.deleting and p.phase in ("Succeeded", "Failed"):
            out.delete.append(p.name)
            out.events.append(("Warning", "PodFailed", f"{role} pod {p.name} {p.phase.lower()}; replacing it"))
    live = [p for p in pods if p.live]
    serving = [p for p in live if p.draining_since is None]
    for p in live:  # a draining pod goes when drained: idle, or out of time
        if p.draining_since is None:
            continue
        if p.outstanding == 0 or not p.ready or now - p.draining_since >= drain_timeout:
            out.delete.append(p.name)
        else:
            out.draining.append(p.name)
    new = [p for p in serving if p.template_hash == current]
    old = [p for p in serving if p.template_hash != current]
    status = PoolStatus(desired, sum(p.ready for p in serving), sum(p.ready for p in new))
    out.pools[role] = status

    missing = desired - len(serving)
    if missing > 0:
        out.create += [(role, current)] * missing
        out.events.append(("Normal", "ScalingUp", f"creating {missing} {role} pod(s) ({len(serving)} of {desired})"))
        return
    if old:
        # roll with one surge pod and no unavailability: an old pod goes once the pool has
        # more ready pods than it needs (an old pod that is not ready goes at once)
        ready, retire = status.ready, []
        for p in sorted(old, key=_removal_order):
            if not p.ready:
                retire.append(p.name)
            elif ready - 1 >= desired:
                retire.append(p.name)
                ready -= 1
        out.drain += retire
        remaining = len(serving) - len(retire)
        # one pod above the count while old ones stay; none once the last old one is going
        surge = desired + (len(old) > len(retire)) - remaining
        if surge > 0:
            out.create += [(role, current)] * surge
        if retire or surge > 0:
            out.events.append(("Normal", "RollingUpdate",
                               f"{role}: {len(new)} of {desired} on template {current}; replacing {len(retire)}"))
        return
    extra = len(serving) - desired
    if extra > 0:
        victims = sorted(serving, key=_removal_order)[:extra]
        out.drain += [p.name for p in victims]
        out.events.append(("Normal", "ScalingDown", f"draining {extra} {role} pod(s) ({len(serving)} to {desired})"))
