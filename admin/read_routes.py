"""The admin API's reads, under /api/v1: the fleet's overview, power domains, incidents, power and
remediation actions (any role), the audit log (admin). Lists are newest first, paged by
`cursor`."""

import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from .auth import Role
from .deps import CTX, Ctx, errors, require
from .models import AuditEntry, Incident, PowerAction, RemediationAction
from .schemas import (
    LIMIT_MAX,
    AuditPage,
    FleetOut,
    IncidentOut,
    IncidentPage,
    NodeOut,
    PowerActionPage,
    PowerDomainOut,
    PowerDomainsOut,
    PowerOverrideOut,
    RemediationPage,
    WorkerOut,
)
from .store import BadCursor, Page
from .view import WorkerInfo

router = APIRouter(prefix="/api/v1", tags=["read"])


# each parameter needs its own Query: FastAPI merges parameters that share one
def limit_q() -> Any:
    return Query(50, ge=1, le=LIMIT_MAX, description="The most items in one page.")


def cursor_q() -> Any:
    return Query(None, max_length=64, description="From the previous page's next_cursor.")


def text_q(description: str) -> Any:
    return Query(None, min_length=1, max_length=255, description=description)


def worker_out(w: WorkerInfo) -> WorkerOut:
    o = w.power_override
    return WorkerOut(name=w.ref.name, namespace=w.ref.namespace, role=w.role, model=w.model, deployment=w.deployment,
                     node=w.ref.node, url=w.ref.url, health=w.health, state=w.state.state.value,
                     reason=w.state.reason, since=w.state.since,
                     power_override=None if o is None else PowerOverrideOut(watts=o.watts, until=o.until,
                                                                            reason=o.reason))


def _page(ctx: Ctx, model: type, limit: int, cursor: str | None, **filters: object) -> Page:
    try:
        return ctx.store.page(model, limit, cursor, **filters)
    except BadCursor as e:
        raise HTTPException(400, f"cursor: {e}")


@router.get("/fleet", response_model=FleetOut, responses=errors(), summary="Workers and nodes, with their state")
def fleet(ctx: Ctx = CTX, _=require(Role.VIEWER)) -> FleetOut:
    return FleetOut(workers=[worker_out(w) for w in ctx.view.workers()], at=time.time(),
                    nodes=[NodeOut(name=n.name, ready=n.ready, cordoned=n.cordoned, reason=n.reason)
                           for n in ctx.view.nodes()])


@router.get("/power-domains", response_model=PowerDomainsOut, responses=errors(),
            summary="Power domains: budget, measured draw, headroom")
def power_domains(ctx: Ctx = CTX, _=require(Role.VIEWER)) -> PowerDomainsOut:
    return PowerDomainsOut(at=time.time(), domains=[PowerDomainOut(
        name=d.name, limit_watts=d.limit_watts, oversubscription=d.oversubscription, nodes=d.nodes,
        measured_watts=d.measured_watts, gpus_measured=d.gpus_measured, measured_age_seconds=d.measured_age_seconds,
        headroom_watts=None if d.measured_watts is None else d.limit_watts - d.measured_watts)
        for d in ctx.view.power_domains()])


@router.get("/incidents", response_model=IncidentPage, responses=errors(), summary="Incidents, newest first")
def incidents(ctx: Ctx = CTX, _=require(Role.VIEWER),
              status: Literal["open", "resolved"] | None = Query(None, description="Only open or resolved ones."),
              kind: str | None = text_q("Only incidents of this kind."),
              subject: str | None = text_q("Only incidents about this worker, node or link."),
              limit: int = limit_q(), cursor: str | None = cursor_q()) -> IncidentPage:
    page = _page(ctx, Incident, limit, cursor, status=status, kind=kind, subject=subject)
    return IncidentPage(items=[IncidentOut.model_validate(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/incidents/{incident_id}", response_model=IncidentOut, responses=errors(404), summary="One incident")
def incident(incident_id: int = Path(ge=1, le=2**62, description="The incident's id."),
             ctx: Ctx = CTX, _=require(Role.VIEWER)) -> IncidentOut:
    found = ctx.store.incident(incident_id)
    if found is None:
        raise HTTPException(404, f"incident_id: no incident {incident_id}")
    return IncidentOut.model_validate(found)


@router.get("/actions/power", response_model=PowerActionPage, responses=errors(),
            summary="Power caps set and cleared, by the controller or by an override")
def power_actions(ctx: Ctx = CTX, _=require(Role.VIEWER), worker: str | None = text_q("Only this worker's."),
                  limit: int = limit_q(), cursor: str | None = cursor_q()) -> PowerActionPage:
    page = _page(ctx, PowerAction, limit, cursor, worker=worker)
    return PowerActionPage.model_validate({"items": page.items, "next_cursor": page.next_cursor},
                                          from_attributes=True)


@router.get("/actions/remediation", response_model=RemediationPage, responses=errors(),
            summary="Quarantines, restores, drains, restarts, cordons")
def remediations(ctx: Ctx = CTX, _=require(Role.VIEWER),
                 target: str | None = text_q("Only those done to this worker or node."),
                 limit: int = limit_q(), cursor: str | None = cursor_q()) -> RemediationPage:
    page = _page(ctx, RemediationAction, limit, cursor, target=target)
    return RemediationPage.model_validate({"items": page.items, "next_cursor": page.next_cursor},
                                          from_attributes=True)


@router.get("/audit", response_model=AuditPage, responses=errors(), summary="The audit log (admin)")
def audit(ctx: Ctx = CTX, _=require(Role.ADMIN), actor: str | None = text_q("Only this token's requests."),
          outcome: Literal["ok", "denied", "invalid", "refused", "limited", "error"] | None = Query(
              None, description="Only entries with this outcome."),
          limit: int = limit_q(), cursor: str | None = cursor_q()) -> AuditPage:
    page = _page(ctx, AuditEntry, limit, cursor, actor=actor, outcome=outcome)
    return AuditPage.model_validate({"items": page.items, "next_cursor": page.next_cursor}, from_attributes=True)
