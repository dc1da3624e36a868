"""The admin API's request and response bodies, every field described (they are the
OpenAPI schema at /openapi.json). Requests refuse unknown fields, so a misspelt one is a
422 naming it rather than silently ignored."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reason = Field(min_length=1, max_length=1024, description="Why; recorded with the action and in the audit log.")
LIMIT_MAX = 200


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (application/problem+json)."""
    type: str = Field(description="A URI naming the kind of problem; about:blank when the status says it all.")
    title: str = Field(description="The status's short summary.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, naming the field where one is at fault.")
    instance: str = Field(description="The request's path.")
    errors: list[dict] | None = Field(None, description="For a 422: each invalid field, with its location and why.")


class PowerOverrideOut(Out):
    watts: float = Field(description="The cap pinned per GPU, in watts.")
    until: float = Field(description="When the override lapses, in seconds since the epoch.")
    reason: str = Field(description="Why it was set.")


class WorkerOut(BaseModel):
    name: str = Field(description="The worker: a pod's name, or a process's under fleetwise up.")
    namespace: str = Field(description="The pod's namespace; `local` under fleetwise up.")
    role: str = Field(description="prefill, decode or mixed.")
    model: str = Field(description="The model it serves.")
    deployment: str = Field(description="Its ModelDeployment; `local` under fleetwise up.")
    node: str | None = Field(description="The node it runs on; null when unplaced or on one machine.")
    url: str | None = Field(description="Where it answers, where known.")
    health: str = Field(description="ready / ok, or what keeps it from being ready.")
    state: Literal["serving", "draining", "quarantined"] = Field(description="Its routability state.")
    reason: str = Field(description="Why it is in that state.")
    since: float = Field(description="Since when, in seconds since the epoch; 0 when never recorded.")
    power_override: PowerOverrideOut | None = Field(description="A person's power-cap override in force, if any.")


class NodeOut(BaseModel):
    name: str = Field(description="The node's name.")
    ready: bool = Field(description="Whether its Ready condition is True.")
    cordoned: bool = Field(description="Whether nothing new may be placed on it.")
    reason: str = Field(description="Why fleetwise cordoned it, if it did.")


class FleetOut(BaseModel):
    workers: list[WorkerOut] = Field(description="Every fleetwise worker.")
    nodes: list[NodeOut] = Field(description="The nodes (none under fleetwise up).")
    at: float = Field(description="When this was read, in seconds since the epoch.")


class PowerDomainOut(BaseModel):
    name: str = Field(description="The PowerBudget's name.")
    limit_watts: float = Field(description="The domain's budget, in watts.")
    oversubscription: float = Field(description="How far placement may oversubscribe the budget by nameplate.")
    nodes: list[str] = Field(description="The nodes its selector matches.")
    measured_watts: float | None = Field(description="What its GPUs draw now; null without a reading (never 0).")
    gpus_measured: int = Field(description="How many GPUs the reading covers.")
    measured_age_seconds: float | None = Field(description="The age of the oldest sample in the reading.")
    headroom_watts: float | None = Field(description="limit_watts - measured_watts; null without a reading.")


class PowerDomainsOut(BaseModel):
    domains: list[PowerDomainOut] = Field(description="Every PowerBudget (none under fleetwise up).")
    at: float = Field(description="When this was read, in seconds since the epoch.")


class ActionIn(In):
    reason: str = Reason


class PowerOverrideIn(In):
    watts: float | None = Field(gt=0, le=2000, description="The cap per GPU in watts; null clears the override.")
    expires_in_seconds: float = Field(3600.0, gt=0, le=7 * 86400, description="How long the override holds.")
    reason: str = Reason


class ActionOut(BaseModel):
    verb: str = Field(description="What was done.")
    target: str = Field(description="The worker (namespace/name) or node acted on.")
    state: str | None = Field(description="A worker's routability state afterwards; null for a node.")
    power_override: PowerOverrideOut | None = Field(None, description="The override in force afterwards.")


class EvidenceIn(In):
    signal: str = Field(min_length=1, max_length=128, description="The signal observed, e.g. p99_seconds.")
    value: float | None = Field(None, allow_inf_nan=False, description="Its value.")
    baseline: float | None = Field(None, allow_inf_nan=False, description="What it was compared with.")
    detail: str = Field("", max_length=4096, description="Anything else worth keeping.")
    observed_at: float = Field(0.0, ge=0, allow_inf_nan=False,
                               description="When, in seconds since the epoch; 0 means when the incident opened.")


class EvidenceOut(Out):
    signal: str = Field(description="The signal observed.")
    value: float | None = Field(description="Its value.")
    baseline: float | None = Field(description="What it was compared with.")
    detail: str = Field(description="Anything else worth keeping.")
    observed_at: float = Field(description="When, in seconds since the epoch.")


class IncidentIn(In):
    kind: str = Field(min_length=1, max_length=64, description="What kind of fault, e.g. slow_worker.")
    subject_kind: Literal["worker", "node", "link"] = Field(description="What is at fault.")
    subject: str = Field(min_length=1, max_length=255, description="Its name.")
    namespace: str = Field("", max_length=253, description="A worker's namespace.")
    severity: Literal["info", "warning", "critical"] = Field("warning", description="How bad.")
    summary: str = Field("", max_length=4096, description="One line for people.")
    evidence: list[EvidenceIn] = Field(default_factory=list, max_length=64, description="What was observed.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=64, description=(
        "The sender's key for this record: sent again with the same key, it is stored once and the first "
        "one is answered."))


class IncidentOut(Out):
    id: int = Field(description="The incident's id.")
    kind: str = Field(description="What kind of fault.")
    subject_kind: str = Field(description="worker, node or link.")
    subject: str = Field(description="What is at fault.")
    namespace: str = Field(description="A worker's namespace.")
    severity: str = Field(description="info, warning or critical.")
    summary: str = Field(description="One line for people.")
    status: Literal["open", "resolved"] = Field(description="Whether it is still open.")
    source: str = Field(description="Who opened it (a token's name).")
    opened_at: float = Field(description="When it opened, in seconds since the epoch.")
    resolved_at: float | None = Field(description="When it was resolved.")
    resolved_by: str | None = Field(description="Who resolved it.")
    resolution: str | None = Field(description="How it was resolved.")
    evidence: list[EvidenceOut] = Field(description="What was observed.")


class ResolveIn(In):
    resolution: str = Field(min_length=1, max_length=4096, description="What was done about it.")


class IncidentPage(BaseModel):
    items: list[IncidentOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class PowerActionIn(In):
    worker: str = Field(min_length=1, max_length=255, description="The worker capped.")
    namespace: str = Field("", max_length=253, description="Its namespace.")
    watts: float | None = Field(None, gt=0, le=2000, description="The cap per GPU; null when lifted.")
    until: float | None = Field(None, ge=0, allow_inf_nan=False, description="When it lapses, if it does.")
    reason: str = Field("", max_length=1024, description="Why.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=64, description=(
        "The sender's key for this record: sent again with the same key, it is stored once and the first "
        "one is answered."))


class PowerActionOut(Out):
    id: int = Field(description="The record's id.")
    at: float = Field(description="When, in seconds since the epoch.")
    worker: str = Field(description="The worker.")
    namespace: str = Field(description="Its namespace.")
    watts: float | None = Field(description="The cap per GPU; null when cleared.")
    until: float | None = Field(description="When it lapses.")
    reason: str = Field(description="Why.")
    source: str = Field(description="controller (reported by the operator) or override (set through this API).")
    actor: str = Field(description="The token's name.")


class PowerActionPage(BaseModel):
    items: list[PowerActionOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class RemediationIn(In):
    verb: Literal["quarantine", "restore", "drain", "restart", "cordon", "uncordon", "avoid_link"] = Field(
        description="The FleetActions verb done.")
    target_kind: Literal["worker", "node", "link"] = Field(
        description="What it was done to: a link is `prefill->decode`, the two workers' names.")
    target: str = Field(min_length=1, max_length=255, description="Its name.")
    namespace: str = Field("", max_length=253, description="A worker's namespace.")
    reason: str = Field("", max_length=1024, description="Why.")
    outcome: Literal["done", "refused"] = Field("done", description="Whether it was done.")
    incident_id: int | None = Field(None, ge=1, le=2**62, description="The incident it answered, if any.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=64, description=(
        "The sender's key for this record: sent again with the same key, it is stored once and the first "
        "one is answered."))


class RemediationOut(Out):
    id: int = Field(description="The record's id.")
    at: float = Field(description="When, in seconds since the epoch.")
    verb: str = Field(description="The verb.")
    target_kind: str = Field(description="worker, node or link.")
    target: str = Field(description="Its name.")
    namespace: str = Field(description="A worker's namespace.")
    reason: str = Field(description="Why.")
    source: str = Field(description="operator (reported) or api (done through this API).")
    actor: str = Field(description="The token's name.")
    outcome: str = Field(description="done or refused.")
    incident_id: int | None = Field(description="The incident it answered, if any.")


class RemediationPage(BaseModel):
    items: list[RemediationOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class AuditOut(Out):
    id: int = Field(description="The entry's id.")
    at: float = Field(description="When, in seconds since the epoch.")
    actor: str = Field(description="The token's name; anonymous without a valid token.")
    role: str = Field(description="The token's role, if it had one.")
    method: str = Field(description="The HTTP method.")
    path: str = Field(description="The request's path and query.")
    body: str = Field(description="The request's body (its first 4 KiB).")
    status: int = Field(description="The answer's HTTP status.")
    outcome: Literal["ok", "denied", "invalid", "refused", "limited", "error"] = Field(
        description="ok; denied (401/403); invalid (400/413/422); refused (404/409: the fleet said no); "
                    "limited (429); error (5xx).")
    detail: str = Field(description="What happened, or why not.")
    request_id: str = Field(description="The request's x-request-id.")


class AuditPage(BaseModel):
    items: list[AuditOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")
