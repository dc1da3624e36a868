"""Binding a deployment's unbound worker pods where controllers.placement puts them.

The operator is the scheduler of its worker pods (`schedulerName: fleetwise`): it places
them with the cluster cache and binds them through the pods/binding subresource. Bindings
are made one batch at a time, so two deployments reconciling at once never book the same
GPUs.
"""

import threading
import time
from dataclasses import dataclass, field

from fleetwise.controllers import status as st
from fleetwise.controllers.placement import Pod
from fleetwise.spec import ModelDeploymentSpec

from . import manifests as m
from .cluster import ClusterState, pod_gpus
from .kube import Kube, epoch
from .metrics import OperatorMetrics

BOUND_LISTED = 10  # pods named in a Placed Event


@dataclass
class Binder:
    kube: Kube
    cluster: ClusterState
    metrics: OperatorMetrics
    tolerations: list[dict]
    lock: threading.Lock = field(default_factory=threading.Lock)
    # unplaceable pods per deployment, by reason: the pending-pods gauge is their sum
    pending: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def bind(self, body: dict, spec: ModelDeploymentSpec, unbound: list[dict]) -> list[st.Unplaced]:
        """Places and binds; returns what does not fit, and why."""
        ns = body["metadata"]["namespace"]
        pending: list[st.Unplaced] = []
        bound: list[str] = []
        with self.lock:
            placement = self.cluster.placement()
            pods = [self._pod(ns, spec, x) for x in unbound]
            for d, x in zip(placement.place_many(pods), unbound):
                if d.node is None:
                    pending.append({"pod": d.pod.name, "reason": d.reason})
                elif self.kube.bind(ns, d.pod.name, d.node):
                    bound.append(f"{d.pod.name} -> {d.node}")
                    self.cluster.on_bound(ns, Pod(d.pod.name, d.pod.pool, d.pod.gpus, node=d.node))
                    created = x["metadata"].get("creationTimestamp")
                    if created:
                        self.metrics.bind_seconds.observe(max(0.0, time.time() - epoch(created)))
        if bound:
            self.kube.event(body, "Normal", "Placed", f"bound {len(bound)} pod(s): {', '.join(bound[:BOUND_LISTED])}"
                            + (" ..." if len(bound) > BOUND_LISTED else ""))
        news = st.unplaceable_news(pending, body.get("status"))
        if news:
            self.kube.event(body, "Warning", "Unschedulable", news)
        return pending

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
