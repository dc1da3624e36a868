"""One reconcile of one ModelDeployment: observe its pods, ask the controllers, apply.

controllers.deployment decides which pods to create, drain and delete, controllers.placement
where new pods go (through binding.py), controllers.status what the status says; this module
only reads the cluster, carries the decisions out and writes the status when it changed.

The deployment's pods come from the pod cache (`PodCache`: the watch, and the answers to this
module's own writes), with a LIST of them now and then (`RELIST_SECONDS`), so a reconcile that
a pod event woke reads nothing from the API server.
"""

import logging
import time
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from fleetwise.addresses import load_address_map
from fleetwise.controllers import status as st
from fleetwise.controllers.deployment import DRAIN_TIMEOUT_SECONDS, Plan, PodView, plan
from fleetwise.fleet import Routability
from fleetwise.spec import ModelDeploymentSpec

from . import manifests as m
from .binding import Binder
from .cluster import ClusterState
from .inflight import exported, in_flight
from .internal_token import TokenCopies
from .kube import Kube, epoch, error_message, now_iso
from .metrics import OperatorMetrics
from .pod_cache import PodCache

log = logging.getLogger(__name__)
PLAN_DRAIN_REASON = "the ModelDeployment's plan: scale down or rollout"
RELIST_SECONDS = 60.0  # a deployment's pods listed again after this long (a deletion the watch missed)


def pod_view(pod: dict, outstanding: int | None = None) -> PodView:
    """A worker pod as controllers.deployment sees it; `outstanding`: the requests it holds,
    when known."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in status.get("conditions") or [])
    draining = annotations.get(m.ANNOTATION_DRAINING)
    quarantined = m.pod_state(pod).state is Routability.QUARANTINED
    created = meta.get("creationTimestamp")
    return PodView(meta["name"], labels.get(m.LABEL_ROLE, ""), labels.get(m.LABEL_TEMPLATE, ""),
                   node=spec.get("nodeName"), phase=status.get("phase") or "Pending", ready=ready,
                   deleting=bool(meta.get("deletionTimestamp")),
                   draining_since=float(draining) if draining else None, quarantined=quarantined,
                   outstanding=outstanding,
                   created=epoch(created) if isinstance(created, str) else 0.0)


def _views(pods: list[dict]) -> list[PodView]:
    """The pods as the plan sees them; a draining one with what its worker still holds (the
    address map read once, and only when some pod is draining)."""
    draining = {p["metadata"]["name"] for p in pods
                if (p["metadata"].get("annotations") or {}).get(m.ANNOTATION_DRAINING)}
    address_map = load_address_map() if draining else {}
    return [pod_view(p, in_flight(p, address_map) if p["metadata"]["name"] in draining else None) for p in pods]


def _ours_to_bind(pod: dict, deleted: set[str]) -> bool:
    meta, spec = pod["metadata"], pod.get("spec") or {}
    return (not spec.get("nodeName") and meta["name"] not in deleted and not meta.get("deletionTimestamp")
            and spec.get("schedulerName") == m.SCHEDULER_NAME)


@dataclass
class Operator:
    kube: Kube
    cluster: ClusterState = field(default_factory=ClusterState)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    tolerations: list[dict] = field(default_factory=list)  # extra ones for worker pods (e.g. kwok's)
    drain_timeout: float = DRAIN_TIMEOUT_SECONDS
    tokens: TokenCopies | None = None  # the internal token's copies in the workers' namespaces
    pods: PodCache | None = None  # None: each reconcile lists its deployment's pods
    binder: Binder = field(init=False)
    _services: set[tuple[str, str, str, str]] = field(default_factory=set)
    _listed: dict[tuple[str, str], float] = field(default_factory=dict)  # deployment -> when its pods were listed

    def __post_init__(self) -> None:
        self.binder = Binder(self.kube, self.cluster, self.metrics, self.tolerations)

    def reconcile(self, body: dict) -> dict:
        """Returns the status it wrote."""
        self.metrics.reconciles.inc()
        meta = body["metadata"]
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        try:
            spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            status = st.deployment_status(body.get("status"), generation, {}, st.spec_invalid(str(e)), [], now_iso())
            if status != body.get("status"):
                self.kube.patch_status(ns, name, status)
            return status
        pods = self._pods(ns, name)
        self.metrics.set_workers(ns, name, [m.pod_state(x).state for x in pods
                                            if not x["metadata"].get("deletionTimestamp")])
        p = plan(spec, _views(pods), time.time(), self.drain_timeout)
        for pod in pods:  # a drained pod's Event says how many streams moved with their KV
            if pod["metadata"]["name"] in p.delete and (pod["metadata"].get("annotations") or {}).get(
                    m.ANNOTATION_DRAINING):
                self._drained_event(pod)
        not_created, pending = self._apply(body, spec, p)
        not_created += self._ensure_services(body, spec)
        deleted = set(p.delete)
        # a pod bound a moment ago is booked, though its watch event has not come back yet
        unbound = [x for x in pods if _ours_to_bind(x, deleted) and not self.cluster.booked(ns, x["metadata"]["name"])]
        if unbound:
            pending += self.binder.bind(body, spec, unbound)
        self.binder.unschedulable(body, pending)
        self.binder.record_pending(ns, name, pending)
        news = st.not_created_news(not_created, body.get("status"))
        if news:
            self.kube.event(body, "Warning", "CreateFailed", news)
        status = st.deployment_status(body.get("status"), generation, p.pools, st.plan_applied(p, pending, not_created),
                                      pending, now_iso())
        if status != body.get("status"):  # most reconciles change nothing: no write
            self.kube.patch_status(ns, name, status)
        return status

    def _drained_event(self, pod: dict) -> None:
        moved = exported(pod)
        if moved is not None:
            self.kube.event({**pod, "apiVersion": "v1", "kind": "Pod"}, "Normal", "Drained",
                            f"drained: {moved} running sequence(s) handed to other workers with their KV cache")

    def _pods(self, namespace: str, name: str) -> list[dict]:
        """The deployment's pods: from the cache, listed first when they have not been for a while."""
        selector = f"{m.LABEL_DEPLOYMENT}={name}"
        if self.pods is None:
            return self.kube.pods(namespace, selector)
        key = (namespace, name)
        if time.monotonic() - self._listed.get(key, -RELIST_SECONDS) >= RELIST_SECONDS:
            items, version = self.kube.pod_list(namespace, selector, cached=True)
            self.pods.relisted(namespace, name, items, version)
            self._listed[key] = time.monotonic()
        return self.pods.deployment_pods(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """The deployment is gone."""
        self._listed.pop((namespace, name), None)
        self.binder.record_pending(namespace, name, None)

    def _written(self, answer: dict | None, namespace: str, name: str) -> None:
        if self.pods is not None:
            self.pods.written(answer, namespace, name)

    def _apply(self, body: dict, spec: ModelDeploymentSpec, p: Plan) -> tuple[list[str], list[st.Unplaced]]:
        """Records the plan's events, deletes, drains and creates; returns, for each pod it could
        not create, the API server's reason, and the new pods that do not fit."""
        ns = body["metadata"]["namespace"]
        for reason_type, reason, message in p.events:
            self.kube.event(body, reason_type, reason, message)
        for pod_name in p.delete:
            self._written(self.kube.delete_pod(ns, pod_name), ns, pod_name)
        for pod_name in p.drain:
            labels, annotations = m.routability_patch(Routability.DRAINING, PLAN_DRAIN_REASON, time.time())
            self._written(self.kube.patch_pod_metadata(ns, pod_name, labels=labels, annotations=annotations),
                          ns, pod_name)
        problem = self._ensure_token(ns)  # every reconcile: a rotated token reaches the copy
        if problem and p.create:  # the pods would wait for the Secret they mount
            return [f"{role} pod: the internal token Secret: {problem}" for role, _ in p.create], []
        if not p.create:
            return [], []
        new = [m.worker_pod(body, spec, role, template, self.tolerations) for role, template in p.create]
        created, not_created, pending = self.binder.create(body, spec, new)
        for pod in created:
            self._written(pod, ns, pod["metadata"]["name"])
        return not_created, pending

    def _ensure_token(self, namespace: str) -> str | None:
        """The internal token's copy in the namespace; why it could not be written, or None."""
        if self.tokens is None:
            return None
        try:
            self.tokens.ensure(namespace)
        except (ApiException, ValueError) as e:
            self.metrics.errors.labels("ensure_secret").inc()
            log.error("the internal token's copy in %s: %s", namespace, e)
            return error_message(e) if isinstance(e, ApiException) else str(e)
        return None

    def _ensure_services(self, body: dict, spec: ModelDeploymentSpec) -> list[str]:
        """Each pool's Service, created when this deployment (by uid: a re-created one is
        another) has not had it since it was last seen deleted; creating one that exists is a
        409, and a request, so the ones made are remembered. Returns why any could not be made."""
        meta = body["metadata"]
        failures = []
        for role in spec.pools():
            key = (meta["namespace"], meta["name"], role, meta.get("uid", ""))
            if key in self._services:
                continue
            try:
                self.kube.ensure_service(key[0], m.pool_service(body, spec, role))
            except ApiException as e:
                failures.append(f"{role} Service: {error_message(e)}")
                continue
            self._services.add(key)
        return failures

    def service_deleted(self, namespace: str, deployment: str, role: str) -> None:
        """A pool's Service went away (by hand, or with its deployment): the next reconcile makes it again."""
        self._services = {k for k in self._services if k[:3] != (namespace, deployment, role)}
