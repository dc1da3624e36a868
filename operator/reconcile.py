"""One reconcile of one ModelDeployment: observe, ask the controllers, apply."""

import logging
import threading
import time
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from fleetwise.controllers.deployment import PodView, plan
from fleetwise.controllers.placement import GPU_PRODUCT_LABEL, GPU_RESOURCE, Node, Placement, Pod, PowerDomain
from fleetwise.spec import ModelDeploymentSpec, PowerBudgetSpec
from fleetwise.telemetry import catalog as c

from . import manifests as m
from .kube import Kube, error_message, now_iso

log = logging.getLogger(__name__)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(c.OPERATOR_RECONCILES, "ModelDeployment reconciles.", registry=r)
        self.errors = Counter(c.OPERATOR_RECONCILE_ERRORS, "Reconciles that failed.", ["reason"], registry=r)
        self.bind_seconds = Histogram(c.OPERATOR_BIND_SECONDS, "Pod creation to binding.", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.pending = Gauge(c.OPERATOR_PENDING_PODS, "Worker pods that cannot be placed, by reason.",
                             ["reason"], registry=r)
        self.api_requests = Counter(c.OPERATOR_API_REQUESTS, "Kubernetes API requests.", ["verb", "resource"],
                                    registry=r)


def _gpus(pod: dict) -> int:
    total = 0
    for ctr in (pod.get("spec") or {}).get("containers") or []:
        req = ((ctr.get("resources") or {}).get("requests") or {}).get(GPU_RESOURCE)
        total += int(req or 0)
    return total


class ClusterState:
    """Nodes, power domains and GPU pods placed on nodes, as placement needs them; fed by
    watch events and by the operator's own bindings (so a batch never double-books)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.nodes: dict[str, Node] = {}
        self.placed: dict[tuple[str, str], Pod] = {}
        self.domains: dict[str, PowerDomain] = {}

    def on_node(self, event: str, body: dict) -> bool:
        """True when what placement sees of the node changed (heartbeats change nothing)."""
        meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
        with self.lock:
            if event == "DELETED":
                return self.nodes.pop(meta["name"], None) is not None
            labels = meta.get("labels") or {}
            ready = any(cond.get("type") == "Ready" and cond.get("status") == "True"
                        for cond in status.get("conditions") or [])
            watts = labels.get("fleetwise.dev/gpu-watts")
            node = Node(meta["name"], labels.get(GPU_PRODUCT_LABEL, ""),
                        int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0)), labels,
                        [(t["key"], t.get("effect", "")) for t in spec.get("taints") or []],
                        bool(spec.get("unschedulable")), ready, float(watts) if watts else None)
            changed = self.nodes.get(meta["name"]) != node
            self.nodes[meta["name"]] = node
            return changed

    def on_pod(self, event: str, body: dict) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        key = (meta["namespace"], meta["name"])
        phase = (body.get("status") or {}).get("phase")
        with self.lock:
            if event == "DELETED" or phase in ("Succeeded", "Failed") or not spec.get("nodeName"):
                if event == "DELETED" or spec.get("nodeName"):
                    self.placed.pop(key, None)
                return
            gpus = _gpus(body)
            if gpus:
                pool = (meta.get("labels") or {}).get(m.LABEL_POOL, "")
                self.placed[key] = Pod(meta["name"], f"{meta['namespace']}/{pool}", gpus, node=spec["nodeName"])

    def on_budget(self, event: str, body: dict) -> None:
        name = body["metadata"]["name"]
        with self.lock:
            if event == "DELETED":
                self.domains.pop(name, None)
                return
            try:
                s = PowerBudgetSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                return
            self.domains[name] = PowerDomain(name, s.node_selector, s.limit_watts, s.oversubscription)

    def load(self, kube: Kube) -> None:
        for n in kube.nodes():
            self.on_node("ADDED", n)
        for p in kube.all_pods():
            self.on_pod("ADDED", p)
        for b in kube.power_budgets():
            self.on_budget("ADDED", b)


@dataclass
class Operator:
    kube: Kube
    state: ClusterState = field(default_factory=ClusterState)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    tolerations: list[dict] = field(default_factory=list)  # extra ones for worker pods (e.g. kwok's)
    placement_lock: threading.Lock = field(default_factory=threading.Lock)
    _services: set = field(default_factory=set)

    def reconcile(self, body: dict) -> dict:
        """Returns the status it wrote."""
        self.metrics.reconciles.inc()
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            status = _status(body, {}, [("Degraded", "True", "InvalidSpec", str(e)[:500])], [])
            self.kube.patch_status(ns, name, status)
            return status
        pods = self.kube.pods(ns, f"{m.LABEL_DEPLOYMENT}={name}")
        views = [_view(p) for p in pods]
        p = plan(spec, views, time.time())
        for reason_type, reason, message in p.events:
            self.kube.event(body, reason_type, reason, message)
        for pod_name in p.delete:
            self.kube.delete_pod(ns, pod_name)
        for pod_name in p.drain:
            self.kube.patch_pod_metadata(ns, pod_name, labels={m.LABEL_ROUTABLE: "false"},
                                         annotations={m.ANNOTATION_DRAINING: str(time.time())})
        created = []
        for role, template in p.create:
            if (ns, name, role) not in self._services:
                self.kube.ensure_service(ns, m.pool_service(body, spec, role))
                self._services.add((ns, name, role))
            pod = m.worker_pod(body, spec, role, template, self.tolerations)
            try:
                self.kube.create_pod(ns, pod)
            except ApiException as e:
                self.metrics.errors.labels("create_pod").inc()
                self.kube.event(body, "Warning", "CreateFailed", f"{role} pod: {error_message(e)}")
                continue
            pod["metadata"]["namespace"] = ns
            pod["metadata"]["creationTimestamp"] = now_iso()
            created.append(pod)
        deleted = set(p.delete)
        unbound = [x for x in pods + created if not (x.get("spec") or {}).get("nodeName")
                   and x["metadata"]["name"] not in deleted and not x["metadata"].get("deletionTimestamp")
                   and (x.get("spec") or {}).get("schedulerName") == m.SCHEDULER_NAME]
        pending = self._bind(body, spec, unbound) if unbound else []
        conditions = _conditions(p, pending)
        status = _status(body, {role: s for role, s in p.pools.items()}, conditions, pending)
        if status != body.get("status"):  # most reconciles change nothing: no write
            self.kube.patch_status(ns, name, status)
        return status

    def _bind(self, body: dict, spec: ModelDeploymentSpec, unbound: list[dict]) -> list[dict]:
        """Places and binds; returns [{pod, reason}] for what does not fit."""
        ns = body["metadata"]["namespace"]
        pending, bound = [], []
        with self.placement_lock:
            with self.state.lock:
                placement = Placement(list(self.state.nodes.values()), list(self.state.placed.values()),
                                      list(self.state.domains.values()))
            tolerated = tuple(t["key"] for t in self.tolerations)
            pods = []
            for x in unbound:
                labels = x["metadata"].get("labels") or {}
                role = labels.get(m.LABEL_ROLE, "")
                pool = spec.pools().get(role)
                pods.append(Pod(x["metadata"]["name"], f"{ns}/{labels.get(m.LABEL_POOL, '')}", _gpus(x),
                                pool.gpu_type if pool else "", tolerations=tolerated))
            for d, x in zip(placement.place_many(pods), unbound):
                if d.node is None:
                    pending.append({"pod": d.pod.name, "reason": d.reason})
                    continue
                if self.kube.bind(ns, d.pod.name, d.node):
                    bound.append(f"{d.pod.name} -> {d.node}")
                    with self.state.lock:
                        self.state.placed[(ns, d.pod.name)] = Pod(d.pod.name, d.pod.pool, d.pod.gpus, node=d.node)
                    created = x["metadata"].get("creationTimestamp")
                    if created:
                        self.metrics.bind_seconds.observe(max(0.0, time.time() - _epoch(created)))
        if bound:
            self.kube.event(body, "Normal", "Placed", f"bound {len(bound)} pod(s): {', '.join(bound[:10])}"
                            + (" ..." if len(bound) > 10 else ""))
        by_reason: dict[str, int] = {}
        for item in pending:
            by_reason[_short_reason(item["reason"])] = by_reason.get(_short_reason(item["reason"]), 0) + 1
        for reason, count in by_reason.items():
            self.metrics.pending.labels(reason).set(count)
        if pending:
            message = f"{len(pending)} pod(s) cannot be placed: {pending[0]['reason']}"
            previous = next((c.get("message") for c in (body.get("status") or {}).get("conditions") or []
                             if c.get("type") == "Degraded"), None)
            if message != previous:  # one Event per new situation, not one per reconcile
                self.kube.event(body, "Warning", "Unschedulable", message)
        return pending


def _short_reason(reason: str) -> str:
    for key in ("power budget", "GPU type", "free GPUs", "cordoned", "taint", "not ready", "no GPU nodes"):
        if key in reason:
            return key.replace(" ", "_")
    return "other"


def _epoch(ts: str) -> float:
    import datetime as dt
    return dt.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()


def _view(pod: dict) -> PodView:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in status.get("conditions") or [])
    draining = annotations.get(m.ANNOTATION_DRAINING)
    created = meta.get("creationTimestamp")
    return PodView(meta["name"], labels.get(m.LABEL_ROLE, ""), labels.get(m.LABEL_TEMPLATE, ""),
                   node=spec.get("nodeName"), phase=status.get("phase") or "Pending", ready=ready,
                   deleting=bool(meta.get("deletionTimestamp")),
                   draining_since=float(draining) if draining else None,
                   outstanding=0 if draining else None,  # the router stopped sending it requests
                   created=_epoch(created) if isinstance(created, str) else 0.0)


def _conditions(p, pending: list[dict]) -> list[tuple[str, str, str, str]]:
    ready = all(s.ready >= s.desired and s.updated >= s.desired for s in p.pools.values())
    progressing = bool(p.create or p.delete or p.drain) or any(s.updated < s.desired for s in p.pools.values())
    summary = ", ".join(f"{role} {s.summary}" for role, s in p.pools.items())
    conds = [("Ready", "True" if ready else "False", "AllReplicasReady" if ready else "ReplicasNotReady",
              f"ready replicas: {summary}"),
             ("Progressing", "True" if progressing else "False", "Reconciling" if progressing else "Converged",
              "; ".join(e[2] for e in p.events) or summary)]
    if pending:
        conds.append(("Degraded", "True", "Unschedulable", f"{len(pending)} pod(s) cannot be placed: {pending[0]['reason']}"))
    else:
        conds.append(("Degraded", "False", "Placed", "every pod is placed"))
    return conds


def _status(body: dict, pools: dict, conditions, pending: list[dict]) -> dict:
    old = {cond["type"]: cond for cond in (body.get("status") or {}).get("conditions") or []}
    gen = body["metadata"].get("generation")
    conds = []
    for type_, status, reason, message in conditions:
        prev = old.get(type_)
        changed = not prev or prev.get("status") != status
        conds.append({"type": type_, "status": status, "reason": reason, "message": message[:1000],
                      "observedGeneration": gen,
                      "lastTransitionTime": now_iso() if changed else prev.get("lastTransitionTime", now_iso())})
    out = {"observedGeneration": gen, "conditions": conds, "pending": pending[:20]}
    for role, s in pools.items():
        out[role] = {"desired": s.desired, "ready": s.ready, "updated": s.updated, "summary": s.summary}
    return out
