"""`FleetView` in a cluster: fleetwise's worker pods (their role, node, readiness, the
routability and power override recorded on them) and the nodes, read through the
operator's Kubernetes calls (`operator/kube.py`) and its readers of the pod's state
(`operator/manifests.py`), so the API reports exactly what `KubeFleet` writes."""

import time

from fleetwise.fleet import WorkerRef
from fleetwise.operator import manifests as m
from fleetwise.operator.kube import Kube

from .view import NodeInfo, WorkerInfo

SELECTOR = f"{m.MANAGED_BY}=fleetwise,{m.LABEL_ROLE}"


def _ready(conditions: list[dict] | None) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions or [])


def worker_info(pod: dict, now: float) -> WorkerInfo:
    meta, status = pod["metadata"], pod.get("status") or {}
    labels = meta.get("labels") or {}
    phase = status.get("phase", "Unknown")
    health = "ready" if phase == "Running" and _ready(status.get("conditions")) else phase.lower()
    if meta.get("deletionTimestamp"):
        health = "terminating"
    node = (pod.get("spec") or {}).get("nodeName")
    ip = status.get("podIP")
    return WorkerInfo(WorkerRef(meta["name"], meta["namespace"], node=node, url=f"http://{ip}" if ip else None),
                      labels.get(m.LABEL_ROLE, ""), labels.get(m.LABEL_MODEL, ""), labels.get(m.LABEL_DEPLOYMENT, ""),
                      health, m.pod_state(pod), m.pod_power_override(pod, now))


class KubeView:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [worker_info(p, now) for p in self.kube.all_pods(SELECTOR)]

    def worker(self, namespace: str, name: str) -> WorkerInfo | None:
        pod = self.kube.pod(namespace, name)
        labels = (pod or {}).get("metadata", {}).get("labels") or {}
        if pod is None or labels.get(m.MANAGED_BY) != "fleetwise" or not labels.get(m.LABEL_ROLE):
            return None
        return worker_info(pod, time.time())

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(n["metadata"]["name"], _ready((n.get("status") or {}).get("conditions")),
                         bool((n.get("spec") or {}).get("unschedulable")),
                         ((n["metadata"].get("annotations") or {}).get(m.ANNOTATION_CORDON_REASON, "")))
                for n in self.kube.nodes()]
