"""`FleetView` in a cluster: fleetwise's worker pods (their role, node, readiness, the
routability and power override recorded on them) and the nodes, read through the
operator's Kubernetes calls (`operator/kube.py`) and its readers of the pod's state
(`operator/manifests.py`), so the API reports exactly what `KubeFleet` writes."""

import logging
import re
import time

from fleetwise.fleet import WorkerRef
from fleetwise.operator import manifests as m
from fleetwise.operator.kube import Kube
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry import catalog
from fleetwise.telemetry.prometheus import PrometheusClient, PrometheusError

from .view import NodeInfo, PowerDomainInfo, WorkerInfo

log = logging.getLogger(__name__)
DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

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
    """`prometheus`: where the GPUs' power is read (the DCGM exporter's series, by node as
    its `Hostname`); without it, domains have no measured power."""

    def __init__(self, kube: Kube, prometheus: PrometheusClient | None = None) -> None:
        self.kube, self.prometheus = kube, prometheus

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

    def power_domains(self) -> list[PowerDomainInfo]:
        nodes = self.kube.nodes()
        found = []
        for body in self.kube.power_budgets():
            spec = PowerBudgetSpec.model_validate(body.get("spec") or {})
            members = sorted(n["metadata"]["name"] for n in nodes
                             if spec.node_selector.items() <= (n["metadata"].get("labels") or {}).items())
            watts, gpus, age = self._measure(members)
            found.append(PowerDomainInfo(body["metadata"]["name"], spec.limit_watts, spec.oversubscription, members,
                                         watts, gpus, age))
        return found

    def _measure(self, nodes: list[str]) -> tuple[float | None, int, float | None]:
        if self.prometheus is None or not nodes:
            return None, 0, None
        # node names are DNS names: only the dot is special in the regex; PromQL's string doubles the backslash
        hosts = "|".join(n.replace(".", "\\\\.") for n in nodes if DNS_NAME.fullmatch(n))
        try:
            latest = self.prometheus.latest(f'{catalog.DCGM_POWER_USAGE}{{Hostname=~"{hosts}"}}')
        except PrometheusError as e:
            log.warning("no power reading: %s", e)
            return None, 0, None
        return latest.total(), len(latest.samples), None if latest.missing else latest.age_seconds
