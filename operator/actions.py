"""`FleetActions` on Kubernetes: a worker is a pod, its routability lives on the pod.

The routable label takes a pod out of the router's discovery and of its pool's Service;
annotations say which state, why and since when (`manifests.routability_patch`). A drain
is the deployment controller's own drain: the same label and `draining-since` annotation,
so the next reconcile replaces the pod and deletes it once idle or out of time. A
quarantined pod is replaced too but left running (`controllers/deployment.py`). Restart
deletes the pod, which the ModelDeployment's plan then replaces; cordon sets the node
unschedulable, which placement already respects. Every action records an Event with its
reason on the pod or node, and every call goes through `kube.py`.
"""

import json
import logging
import time
from typing import Any

from fleetwise.fleet import ActionRefused, PowerOverride, Routability, WorkerRef, WorkerState

from . import manifests as m
from .kube import Kube

log = logging.getLogger(__name__)


class KubeFleet:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def _pod(self, verb: str, worker: WorkerRef) -> dict[str, Any]:
        pod = self.kube.pod(worker.namespace, worker.name)
        if pod is None:
            raise ActionRefused(f"{verb}: no pod {worker.namespace}/{worker.name}")
        labels = pod["metadata"].get("labels") or {}
        if labels.get(m.MANAGED_BY) != "fleetwise" or not labels.get(m.LABEL_ROLE):
            raise ActionRefused(f"{verb}: {worker.namespace}/{worker.name} is not a fleetwise worker pod")
        pod["apiVersion"], pod["kind"] = "v1", "Pod"  # a read does not always carry them; the Event needs them
        return pod

    def _node(self, verb: str, name: str) -> dict[str, Any]:
        node = self.kube.node(name)
        if node is None:
            raise ActionRefused(f"{verb}: no node {name}")
        node["apiVersion"], node["kind"] = "v1", "Node"
        return node

    def state(self, worker: WorkerRef) -> WorkerState:
        return m.pod_state(self._pod("state", worker))

    def _route(self, verb: str, worker: WorkerRef, state: Routability, reason: str, event: str) -> None:
        pod = self._pod(verb, worker)
        if pod["metadata"].get("deletionTimestamp"):
            raise ActionRefused(f"{verb}: {worker.namespace}/{worker.name} is being deleted")
        labels, annotations = m.routability_patch(state, reason, time.time())
        self.kube.patch_pod_metadata(worker.namespace, worker.name, labels=labels, annotations=annotations)
        self.kube.event(pod, "Warning" if state is Routability.QUARANTINED else "Normal", event, reason)
        log.info("%s %s/%s: %s", verb, worker.namespace, worker.name, reason)

    def quarantine(self, worker: WorkerRef, reason: str) -> None:
        self._route("quarantine", worker, Routability.QUARANTINED, reason, "Quarantined")

    def restore(self, worker: WorkerRef, reason: str) -> None:
        self._route("restore", worker, Routability.SERVING, reason, "Restored")

    def drain(self, worker: WorkerRef, reason: str) -> None:
        self._route("drain", worker, Routability.DRAINING, reason, "Draining")

    def restart(self, worker: WorkerRef, reason: str) -> None:
        pod = self._pod("restart", worker)
        self.kube.event(pod, "Normal", "Restarting", f"{reason}; deleted, its ModelDeployment replaces it")
        self.kube.delete_pod(worker.namespace, worker.name)
        log.info("restart %s/%s: %s", worker.namespace, worker.name, reason)

    def override_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str) -> None:
        pod = self._pod("override_power", worker)
        value = None if watts is None else json.dumps({"watts": watts, "until": until, "reason": reason[:1024]})
        self.kube.patch_pod_metadata(worker.namespace, worker.name, labels={},
                                     annotations={m.ANNOTATION_POWER_OVERRIDE: value})
        self.kube.event(pod, "Normal", "PowerOverride",
                        f"cap cleared: {reason}" if watts is None else f"cap {watts:.0f} W until {until:.0f}: {reason}")

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        return m.pod_power_override(self._pod("power_override", worker), time.time())

    def cordon(self, node: str, reason: str) -> None:
        body = self._node("cordon", node)
        self.kube.patch_node(node, {"spec": {"unschedulable": True},
                                    "metadata": {"annotations": {m.ANNOTATION_CORDON_REASON: reason[:1024]}}})
        self.kube.event(body, "Warning", "Cordoned", reason)
        log.info("cordon %s: %s", node, reason)

    def uncordon(self, node: str, reason: str) -> None:
        body = self._node("uncordon", node)
        self.kube.patch_node(node, {"spec": {"unschedulable": None},
                                    "metadata": {"annotations": {m.ANNOTATION_CORDON_REASON: None}}})
        self.kube.event(body, "Normal", "Uncordoned", reason)
        log.info("uncordon %s: %s", node, reason)
