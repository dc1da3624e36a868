"""The admin API's actions, under /api/v1: quarantine, restore and drain a worker, cordon
and uncordon a node, resolve an incident (operator); override a worker's power cap
(admin); and the records the operator sends (incidents, power and remediation actions).
Every verb goes through `FleetActions`, the path the controllers use, and is recorded in
the store with who asked; the audit log (`admin/guard.py`) records the request itself."""

import time
from typing import Literal

from fastapi import APIRouter, HTTPException, Path, Request

from fleetwise.fleet import ActionRefused

from .auth import Principal, Role
from .deps import CTX, Ctx, errors, note, require
from .models import Evidence, Incident
from .read_routes import worker_out
from .schemas import (
    ActionIn,
    ActionOut,
    IncidentIn,
    IncidentOut,
    PowerActionIn,
    PowerActionOut,
    PowerOverrideIn,
    PowerOverrideOut,
    RemediationIn,
    RemediationOut,
    ResolveIn,
)
from .view import WorkerInfo

router = APIRouter(prefix="/api/v1", tags=["act"])
NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
Namespace = Path(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                 description="The worker's namespace; `local` under fleetwise up.")
Name = Path(min_length=1, max_length=253, pattern=NAME, description="The worker's name.")
NodeName = Path(min_length=1, max_length=253, pattern=NAME, description="The node's name.")


def _worker(ctx: Ctx, namespace: str, name: str) -> WorkerInfo:
    found = ctx.view.worker(namespace, name)
    if found is None:
        raise HTTPException(404, f"name: no worker {namespace}/{name}")
    return found


def _verb(request: Request, ctx: Ctx, who: Principal, verb: Literal["quarantine", "restore", "drain"],
          namespace: str, name: str, body: ActionIn) -> ActionOut:
    w = _worker(ctx, namespace, name)
    record = {"verb": verb, "target_kind": "worker", "target": name, "namespace": namespace, "reason": body.reason,
              "source": "api", "actor": who.name}
    try:
        getattr(ctx.actions, verb)(w.ref, f"{body.reason} (by {who.name} through the admin API)")
    except ActionRefused as e:
        ctx.store.record_remediation(**record, outcome="refused")
        raise HTTPException(409, str(e))
    ctx.store.record_remediation(**record, outcome="done")
    note(request, f"{verb} {namespace}/{name}: {body.reason}")
    return ActionOut(verb=verb, target=f"{namespace}/{name}", state=ctx.actions.state(w.ref).state.value,
                     power_override=None)


@router.post("/workers/{namespace}/{name}/quarantine", response_model=ActionOut, responses=errors(404, 409),
             summary="Take a worker out of routing, keep it running for inspection")
def quarantine(request: Request, body: ActionIn, namespace: str = Namespace, name: str = Name, ctx: Ctx = CTX,
               who: Principal = require(Role.OPERATOR)) -> ActionOut:
    return _verb(request, ctx, who, "quarantine", namespace, name, body)


@router.post("/workers/{namespace}/{name}/restore", response_model=ActionOut, responses=errors(404, 409),
             summary="Put a worker back into routing")
def restore(request: Request, body: ActionIn, namespace: str = Namespace, name: str = Name, ctx: Ctx = CTX,
            who: Principal = require(Role.OPERATOR)) -> ActionOut:
    return _verb(request, ctx, who, "restore", namespace, name, body)


@router.post("/workers/{namespace}/{name}/drain", response_model=ActionOut, responses=errors(404, 409),
             summary="Take a worker out of routing; it goes once idle or after the drain timeout")
def drain(request: Request, body: ActionIn, namespace: str = Namespace, name: str = Name, ctx: Ctx = CTX,
          who: Principal = require(Role.OPERATOR)) -> ActionOut:
    return _verb(request, ctx, who, "drain", namespace, name, body)


@router.post("/workers/{namespace}/{name}/power-override", response_model=ActionOut, responses=errors(404, 409),
             summary="Pin a worker's power cap until it lapses (watts null clears it)")
def power_override(request: Request, body: PowerOverrideIn, namespace: str = Namespace, name: str = Name,
                   ctx: Ctx = CTX, who: Principal = require(Role.ADMIN)) -> ActionOut:
    w = _worker(ctx, namespace, name)
    until = time.time() + body.expires_in_seconds
    try:
        ctx.actions.override_power(w.ref, body.watts, until, f"{body.reason} (by {who.name} through the admin API)")
    except ActionRefused as e:
        raise HTTPException(409, str(e))
    ctx.store.record_power(worker=name, namespace=namespace, watts=body.watts, until=until, reason=body.reason,
                           source="override", actor=who.name)
    note(request, f"power override {namespace}/{name}: {body.watts} W for {body.expires_in_seconds:g} s: {body.reason}")
    now = ctx.actions.power_override(w.ref)
    return ActionOut(verb="power-override", target=f"{namespace}/{name}", state=worker_out(w).state,
                     power_override=None if now is None else PowerOverrideOut.model_validate(now))


def _node(request: Request, ctx: Ctx, who: Principal, verb: Literal["cordon", "uncordon"], node: str,
          body: ActionIn) -> ActionOut:
    record = {"verb": verb, "target_kind": "node", "target": node, "reason": body.reason, "source": "api",
              "actor": who.name}
    try:
        getattr(ctx.actions, verb)(node, f"{body.reason} (by {who.name} through the admin API)")
    except ActionRefused as e:
        ctx.store.record_remediation(**record, outcome="refused")
        raise HTTPException(409, str(e))
    ctx.store.record_remediation(**record, outcome="done")
    note(request, f"{verb} {node}: {body.reason}")
    return ActionOut(verb=verb, target=node, state=None, power_override=None)


@router.post("/nodes/{node}/cordon", response_model=ActionOut, responses=errors(409),
             summary="Place nothing new on a node; what runs there stays")
def cordon(request: Request, body: ActionIn, node: str = NodeName, ctx: Ctx = CTX,
           who: Principal = require(Role.OPERATOR)) -> ActionOut:
    return _node(request, ctx, who, "cordon", node, body)


@router.post("/nodes/{node}/uncordon", response_model=ActionOut, responses=errors(409),
             summary="Let placement use a node again")
def uncordon(request: Request, body: ActionIn, node: str = NodeName, ctx: Ctx = CTX,
             who: Principal = require(Role.OPERATOR)) -> ActionOut:
    return _node(request, ctx, who, "uncordon", node, body)


@router.post("/incidents/{incident_id}/resolve", response_model=IncidentOut, responses=errors(404),
             summary="Resolve an incident (resolving a resolved one changes nothing)")
def resolve(request: Request, body: ResolveIn, incident_id: int = Path(ge=1, le=2**62, description="The incident."),
            ctx: Ctx = CTX, who: Principal = require(Role.OPERATOR)) -> IncidentOut:
    found = ctx.store.resolve(incident_id, who.name, body.resolution)
    if found is None:
        raise HTTPException(404, f"incident_id: no incident {incident_id}")
    note(request, f"resolved incident {incident_id}: {body.resolution}")
    return IncidentOut.model_validate(found)


@router.post("/incidents", response_model=IncidentOut, status_code=201, responses=errors(),
             summary="Record an incident with its evidence (the operator's fault detection sends these)")
def open_incident(request: Request, body: IncidentIn, ctx: Ctx = CTX,
                  who: Principal = require(Role.OPERATOR)) -> IncidentOut:
    fields = body.model_dump(exclude={"evidence"})
    found = ctx.store.open_incident(Incident(**fields, status="open", source=who.name, opened_at=time.time()),
                                    [Evidence(**e.model_dump()) for e in body.evidence])
    note(request, f"opened incident {found.id}: {body.kind} on {body.subject_kind} {body.subject}")
    return IncidentOut.model_validate(found)


@router.post("/actions/power", response_model=PowerActionOut, status_code=201, responses=errors(),
             summary="Record a cap the power controller set or lifted")
def record_power(request: Request, body: PowerActionIn, ctx: Ctx = CTX,
                 who: Principal = require(Role.OPERATOR)) -> PowerActionOut:
    row = ctx.store.record_power(**body.model_dump(), source="controller", actor=who.name)
    note(request, f"recorded power action {row.id}")
    return PowerActionOut.model_validate(row)


@router.post("/actions/remediation", response_model=RemediationOut, status_code=201, responses=errors(404),
             summary="Record a remediation a controller did")
def record_remediation(request: Request, body: RemediationIn, ctx: Ctx = CTX,
                       who: Principal = require(Role.OPERATOR)) -> RemediationOut:
    if body.incident_id is not None and ctx.store.incident(body.incident_id) is None:
        raise HTTPException(404, f"incident_id: no incident {body.incident_id}")
    row = ctx.store.record_remediation(**body.model_dump(), source="operator", actor=who.name)
    note(request, f"recorded remediation {row.id}")
    return RemediationOut.model_validate(row)
