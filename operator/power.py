"""The operator's power loop, one per `PowerBudget`: each period it finds the domain's worker
pods (on nodes its `nodeSelector` picks), runs `fleetwise/power_loop.py` over them (which
asks `controllers/power.py` and applies through `KubeFleet`), and writes what it saw and did
to the budget's status, with an Event when the domain's state changes.

A worker's priority is its ModelDeployment's, its GPU product the node's label, its DCGM
series those labelled with its `pod` and `namespace` (as the DCGM exporter labels them on
Kubernetes, and as a modelled GPU does from the downward API). Without a Prometheus URL
the operator runs no power loop and says so in each budget's status.

The pods come from the operator's watch cache (`PodCache`) when it has one, so a period
lists nodes and ModelDeployments but never reads a pod on its own. Each period also sets
the domain's `fleetwise_power_domain_watts` (no sample while the reading is missing: never
a zero) and `fleetwise_power_domain_limit_watts`, labelled `domain` with the budget's name,
which the dashboards and the chart's alert divide.
"""

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from fleetwise.controllers import fault_status as fs
from fleetwise.controllers.placement import GPU_PRODUCT_LABEL
from fleetwise.controllers.power import Settings
from fleetwise.controllers.status import with_times
from fleetwise.fleet import FleetActions, WorkerRef
from fleetwise.power_loop import DomainWorker, Period, PowerLoop
from fleetwise.spec import API_VERSION, PowerBudgetSpec
from fleetwise.telemetry.prometheus import PrometheusClient

from . import manifests as m
from .admin_sink import AdminSink
from .cluster import pod_gpus
from .kube import Kube
from .metrics import OperatorMetrics
from .pod_cache import PodCache

log = logging.getLogger(__name__)

PERIOD_SECONDS = 5.0
STATES = {"normal": "Normal", "band": "Normal", "releasing": "Releasing", "capping": "Capping",
          "emergency": "Emergency", "stale": "Stale", "stale_capping": "Stale"}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def domain_workers(spec: PowerBudgetSpec, nodes: list[dict], pods: list[dict], deployments: list[dict]
                   ) -> list[DomainWorker]:
    """The running worker pods on the nodes the budget's selector picks."""
    picked = {}
    for n in nodes:
        labels = n["metadata"].get("labels") or {}
        if all(labels.get(k) == v for k, v in spec.node_selector.items()):
            picked[n["metadata"]["name"]] = labels.get(GPU_PRODUCT_LABEL, "")
    priority = {(d["metadata"]["namespace"], d["metadata"]["name"]): (d.get("spec") or {}).get("priority", "High")
                for d in deployments}
    workers: list[DomainWorker] = []
    for pod in pods:
        meta, labels = pod["metadata"], pod["metadata"].get("labels") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in picked or meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") != "Running":
            continue
        ns, name = meta["namespace"], meta["name"]
        workers.append(DomainWorker(WorkerRef(name, ns, node=node),
                                    priority.get((ns, labels.get(m.LABEL_DEPLOYMENT, "")), "High"),
                                    labels.get(m.LABEL_ROLE, "mixed"), picked[node], max(1, pod_gpus(pod)),
                                    series=(("namespace", ns), ("pod", name))))
    return workers


def budget_status(spec: PowerBudgetSpec, period: Period, workers: list[DomainWorker], last: dict) -> dict:
    """The PowerBudget's status after a period; `last` is the status before it (its last action)."""
    limit, watts = spec.limit_watts, period.reading.watts
    nodes = {w.key: w.ref.node for w in workers}
    action = "; ".join(ch.reason for ch in period.changed[:3]) or last.get("lastAction", "")
    state = STATES.get(period.decision.situation, "Normal")
    if state == "Normal" and period.caps:  # the hysteresis band, caps held
        state = "Capping"
    status = {
        "state": state, "message": period.decision.summary[:1024],
        "limitWatts": limit, "capThresholdWatts": spec.cap_threshold * limit,
        "emergencyThresholdWatts": spec.emergency_threshold * limit,
        "releaseThresholdWatts": spec.release_threshold * limit,
        "measuredWatts": watts, "headroomWatts": None if watts is None else limit - watts,
        "telemetryAgeSeconds": None if watts is None else round(period.reading.age_seconds, 1),
        "telemetryError": period.telemetry_error, "workers": len(workers),
        "cappedCount": len(period.caps),
        "cappedWorkers": [{"pod": k.split("/", 1)[1], "namespace": k.split("/", 1)[0], "node": nodes.get(k) or "",
                           "capWatts": round(v, 1), "override": k in period.overridden}
                          for k, v in sorted(period.caps.items())],
        "failures": period.failed[:5],
        "lastAction": action[:1024],
        "lastActionTime": _iso(period.at) if period.changed else last.get("lastActionTime"),
    }
    return status


@dataclass
class PowerControl:
    """Every budget's loop, kept between periods (its hysteresis and the caps it holds)."""
    kube: Kube
    fleet: FleetActions
    prometheus: PrometheusClient | None
    period_seconds: float = PERIOD_SECONDS
    settings: Settings = field(default_factory=Settings)
    pods: PodCache | None = None
    metrics: OperatorMetrics | None = None
    admin: AdminSink | None = None  # its reachability is a condition on each budget's status
    loops: dict[str, PowerLoop] = field(default_factory=dict)
    _last: dict[str, dict] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def period(self, body: dict) -> dict:
        """One control period of the budget in `body`; returns the status written."""
        name = body["metadata"]["name"]
        try:
            spec = PowerBudgetSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            return self._write(body, {"state": "Invalid", "message": str(e)[:1024]})
        if self.prometheus is None:
            return self._write(body, {"state": "Unmanaged", "message": "the operator has no Prometheus to read power "
                                                                      "from (--prometheus-url): nothing is capped"})
        with self._lock:
            loop = self.loops.setdefault(name, PowerLoop(self.prometheus, self.fleet, self.settings,
                                                         self.period_seconds))
        workers = self.workers(spec)
        period = loop.run_period(spec, workers)
        if self.metrics is not None:
            self.metrics.set_power_domain(name, period.reading.watts, spec.limit_watts)
        return self._write(body, budget_status(spec, period, workers, self._last.get(name, {})))

    def workers(self, spec: PowerBudgetSpec) -> list[DomainWorker]:
        if self.pods is not None and self.pods.loaded:
            pods = self.pods.workers()
        else:
            pods = self.kube.all_pods(f"{m.MANAGED_BY}=fleetwise")
        deployments = [d for ns in sorted({p["metadata"]["namespace"] for p in pods})
                       for d in self.kube.model_deployments(ns)]
        return domain_workers(spec, self.kube.nodes(), pods, deployments)

    def _write(self, body: dict, status: dict) -> dict:
        name = body["metadata"]["name"]
        before = self._last.get(name, {})
        if self.admin is not None:
            cond = fs.admin_reachable(self.admin.reachable, self.admin.queued)
            status["conditions"] = with_times(before, [cond], _iso(time.time()), body["metadata"].get("generation"))
        self.kube.patch_budget_status(name, status)
        self._last[name] = status
        involved = {"apiVersion": API_VERSION, "kind": "PowerBudget", "metadata": body["metadata"]}
        if status["state"] != before.get("state"):
            warn = status["state"] in ("Emergency", "Stale", "Invalid", "Unmanaged")
            self.kube.event(involved, "Warning" if warn else "Normal", f"Power{status['state']}", status["message"])
        was = {c["type"]: c["status"] for c in before.get("conditions") or []}
        for c in status.get("conditions") or []:
            if c["status"] != was.get(c["type"], "True"):  # a first healthy condition is no news
                self.kube.event(involved, "Warning" if c["status"] == "False" else "Normal",
                                f"{c['type']}{c['reason']}", c["message"])
        return status

    def deleted(self, name: str) -> None:
        """The budget is gone: lift the caps its loop holds (they would lapse to their fallbacks)."""
        with self._lock:
            loop = self.loops.pop(name, None)
        self._last.pop(name, None)
        if self.metrics is not None:
            self.metrics.set_power_domain(name, None, None)
        if loop is None or not loop.caps:
            return
        workers = [DomainWorker(WorkerRef(k.split("/", 1)[1], k.split("/", 1)[0]), "High", "mixed", "")
                   for k in loop.caps]
        for failure in loop.release_all(workers, f"the PowerBudget {name} was deleted"):
            log.warning("%s", failure)
