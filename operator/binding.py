"""Placing a deployment's worker pods where controllers.placement puts them.

The operator is the scheduler of its worker pods (`schedulerName: fleetwise`). A new pod that
fits is created with its node already set (`spec.nodeName`), so no binding follows: one request
per pod. One that does not fit is created unbound and waits; it, and any pod of the operator's
found unbound, is bound through the pods/binding subresource once it fits. Decisions are made
under one lock and booked in the cluster cache at once, so two deployments reconciling at once
never book the same GPUs; the requests run outside the lock, up to `CONCURRENCY` at a time over
all deployments, and a pod the API server refuses gives its GPUs back.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException

from fleetwise.controllers import status as st
from fleetwise.controllers.placement import Pod
from fleetwise.spec import ModelDeploymentSpec

from . import manifests as m
from .cluster import ClusterState, pod_gpus
from .kube import Kube, epoch, error_message
from .metrics import OperatorMetrics

BOUND_LISTED = 10  # pods named in a Placed Event
CONCURRENCY = 16   # creates and bindings in flight at once, over all deployments


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="place")


@dataclass
class Binder:
    kube: Kube
    cluster: ClusterState
    metrics: OperatorMetrics
    tolerations: list[dict]
    lock: threading.Lock = field(default_factory=threading.Lock)
    # unplaceable pods per deployment, by reason: the pending-pods gauge is their sum
    pending: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    requests: ThreadPoolExecutor = field(default_factory=_pool)

    def _decide(self, namespace: str, spec: ModelDeploymentSpec, pods: list[dict]
                ) -> tuple[list[Pod | None], list[st.Unplaced]]:
        """Each pod's booking (None: it does not fit), and why each that does not fit does not."""
        booked: list[Pod | None] = []
        pending: list[st.Unplaced] = []
        with self.lock:
            placement = self.cluster.placement()
            for d in placement.place_many([self._pod(namespace, spec, x) for x in pods]):
                if d.node is None:
                    booked.append(None)
                    pending.append({"pod": d.pod.name, "reason": d.reason})
                    continue
                pod = Pod(d.pod.name, d.pod.pool, d.pod.gpus, node=d.node)
                self.cluster.on_bound(namespace, pod)
                booked.append(pod)
        return booked, pending

    def create(self, body: dict, spec: ModelDeploymentSpec, new: list[dict]
               ) -> tuple[list[dict], list[str], list[st.Unplaced]]:
        """Creates the new pods, each that fits with its node set; returns the pods as the API
        server stored them, its reason for each it refused, and the pods that do not fit."""
        ns = body["metadata"]["namespace"]
        booked, pending = self._decide(ns, spec, new)
        for pod, b in zip(new, booked):
            if b is not None:
                pod["spec"]["nodeName"] = b.node
        answers = list(self.requests.map(lambda a: self._create(ns, *a), zip(new, booked)))
        created = [a for a in answers if isinstance(a, dict)]
        bound = [f"{p['metadata']['name']} -> {p['spec']['nodeName']}" for p in created if p["spec"].get("nodeName")]
        for _ in bound:
            self.metrics.bind_seconds.observe(0.0)  # bound as it was created
        self._placed(body, bound)
        names = {p["metadata"]["name"] for p in created}
        return created, [a for a in answers if isinstance(a, str)], [u for u in pending if u["pod"] in names]

    def _create(self, namespace: str, pod: dict, booked: Pod | None) -> dict | str:
        """The pod as created, or the API server's reason for refusing it (its GPUs given back)."""
        try:
            return self.kube.create_pod(namespace, pod)
        except ApiException as e:
            self._unbook(namespace, booked)
            self.metrics.errors.labels("create_pod").inc()
            return f"{(pod['metadata'].get('labels') or {}).get(m.LABEL_ROLE)} pod: {error_message(e)}"
        except BaseException:
            self._unbook(namespace, booked)
            raise

    def _unbook(self, namespace: str, booked: Pod | None) -> None:
        if booked is not None:
            self.cluster.unbook(namespace, booked)

    def bind(self, body: dict, spec: ModelDeploymentSpec, unbound: list[dict]) -> list[st.Unplaced]:
        """Places and binds pods that exist unbound; returns what does not fit, and why."""
        ns = body["metadata"]["namespace"]
        booked, pending = self._decide(ns, spec, unbound)
        todo = [(x, b) for x, b in zip(unbound, booked) if b is not None]
        done = list(self.requests.map(lambda a: self._bind(ns, *a), todo))
        bound = []
        for (x, b), ok in zip(todo, done):
            if not ok:
                continue
            bound.append(f"{b.name} -> {b.node}")
            created = x["metadata"].get("creationTimestamp")
            if created:
                self.metrics.bind_seconds.observe(max(0.0, time.time() - epoch(created)))
        self._placed(body, bound)
        return pending

    def _bind(self, namespace: str, pod: dict, booked: Pod) -> bool:
        ok = False
        try:
            ok = self.kube.bind(namespace, booked.name, booked.node or "")
            return ok
        finally:
            if not ok:  # gone, bound by someone else (the watch says where), or an error
                self.cluster.unbook(namespace, booked)

    def _placed(self, body: dict, bound: list[str]) -> None:
        if bound:
            self.kube.event(body, "Normal", "Placed", f"bound {len(bound)} pod(s): {', '.join(bound[:BOUND_LISTED])}"
                            + (" ..." if len(bound) > BOUND_LISTED else ""))

    def unschedulable(self, body: dict, pending: list[st.Unplaced]) -> None:
        """An Event when what does not fit, or why, is news against the status."""
        news = st.unplaceable_news(pending, body.get("status"))
        if news:
            self.kube.event(body, "Warning", "Unschedulable", news)

    def record_pending(self, namespace: str, name: str, pending: list[st.Unplaced] | None) -> None:
        """A deployment's unplaceable pods after its reconcile (None: it is gone); the gauge
        shows the sum over deployments, a reason none has any more at 0."""
        with self.lock:
            if pending is None:
                self.pending.pop((namespace, name), None)
            else:
                self.pending[(namespace, name)] = st.pending_by_reason(pending)
            totals = st.pending_by_reason([])
            for counts in self.pending.values():
                for reason, count in counts.items():
                    totals[reason] += count
        for reason, count in totals.items():
            self.metrics.pending.labels(reason).set(count)

    def _pod(self, namespace: str, spec: ModelDeploymentSpec, pod: dict) -> Pod:
        """A worker pod as placement sees it."""
        labels = pod["metadata"].get("labels") or {}
        pool = spec.pools().get(labels.get(m.LABEL_ROLE, ""))
        return Pod(pod["metadata"]["name"], f"{namespace}/{labels.get(m.LABEL_POOL, '')}", pod_gpus(pod),
                   pool.gpu_type if pool else "", tolerations=tuple(t["key"] for t in self.tolerations))
