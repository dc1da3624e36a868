"""The operator's fault loop, one per `FaultPolicy`: each window it finds the policy's worker
pods (its namespace, its selector), runs `fleetwise/fault_loop.py` over them (the signals from
Prometheus, `controllers/faults.py`'s decision, the actions through `KubeFleet`, wrapped in
`ReportingFleet` when there is an admin API), and writes the policy's status: its incidents
(`controllers/fault_status.py`), the pods quarantined, the nodes cordoned and the KV links
routed around (from the decode pods' avoid-prefill annotations), the last window's time, and the
conditions Ready, Degraded and AdminReachable.

The pods come from the operator's watch cache (`PodCache`) when it has one, and each worker's
routability from the same pods (`KubeFleet.state` reads the cache): a window makes no GET per
pod, and a LIST of the policy's pods only after a window that acted, so that its status shows
what the actions changed. Peers are the pods of one deployment, role and GPU product (the
node's label). A pod is scraped at its public address (Prometheus' `instance`), its peers and
the router call its internal one. Events: on the pod or node, each action's (`KubeFleet`); on
the policy, each new incident, each action and its outcome (when it ends: an action that
outlasts its window is listed on its incident as running meanwhile), and each change of the
Degraded or AdminReachable condition. Each new incident also goes to the admin API with its evidence,
through the sink's queue.
"""

import datetime as dt
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pydantic import ValidationError

from fleetwise.addresses import load_address_map, worker_url
from fleetwise.controllers import fault_status as fs
from fleetwise.controllers.placement import GPU_PRODUCT_LABEL
from fleetwise.controllers.status import Condition, with_times
from fleetwise.fault_loop import Done, FaultLoop
from fleetwise.fault_signals import Worker
from fleetwise.fleet import ANNOTATION_AVOID_PREFILL, FleetActions, Routability, read_avoidance_annotation
from fleetwise.spec import API_VERSION, FaultPolicySpec
from fleetwise.telemetry.prometheus import PrometheusClient

from . import manifests as m
from .admin_sink import AdminSink
from .kube import Kube
from .metrics import OperatorMetrics
from .pod_cache import PodCache

log = logging.getLogger(__name__)
MAX_LISTED = 50         # pods and nodes listed in the status
SubjectKind = Literal["worker", "node", "link"]
INVALID_RETRY = 30.0    # seconds before an invalid policy is read again (an edit is seen then)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector(spec: FaultPolicySpec) -> str:
    """The policy's worker pods: fleetwise's, with the policy's labels."""
    return ",".join([f"{m.MANAGED_BY}=fleetwise", m.LABEL_ROLE, *(f"{k}={v}" for k, v in
                                                                   sorted(spec.selector.match_labels.items()))])


def selected(pods: list[dict], namespace: str, spec: FaultPolicySpec) -> list[dict]:
    """The worker pods `selector(spec)` picks in `namespace`, from the watch cache's pods."""
    want = spec.selector.match_labels.items()
    return [p for p in pods if p["metadata"]["namespace"] == namespace
            and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in want)]


def policy_workers(pods: list[dict], nodes: list[dict], address_map: dict) -> list[Worker]:
    """The running, addressable worker pods, each in its group of peers."""
    products = {n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get(GPU_PRODUCT_LABEL, "")
                for n in nodes}
    workers = []
    for pod in pods:
        meta, labels = pod["metadata"], pod["metadata"].get("labels") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        url = worker_url(pod, address_map)
        if not node or url is None or meta.get("deletionTimestamp") or \
                (pod.get("status") or {}).get("phase") != "Running":
            continue
        group = "/".join([meta["namespace"], labels.get(m.LABEL_DEPLOYMENT, ""), labels.get(m.LABEL_ROLE, ""),
                          products.get(node, "")])
        workers.append(Worker(meta["name"], group, url, worker_url(pod, address_map, internal=True) or "", node,
                              meta["namespace"]))
    return workers


def out_of_routing(pods: list[dict]) -> list[dict[str, Any]]:
    """The pods quarantined, with why and since when."""
    out = []
    for pod in pods:
        state = m.pod_state(pod)
        if state.state is Routability.QUARANTINED:
            out.append({"pod": pod["metadata"]["name"], "node": (pod.get("spec") or {}).get("nodeName") or "",
                        "reason": state.reason[:1024], "since": _iso(state.since) if state.since else None})
    return sorted(out, key=lambda p: p["pod"])[:MAX_LISTED]


def cordoned(nodes: list[dict]) -> list[dict[str, str]]:
    """The nodes fleetwise cordoned (its annotation says why), whoever asked."""
    out = []
    for n in nodes:
        reason = (n["metadata"].get("annotations") or {}).get(m.ANNOTATION_CORDON_REASON)
        if (n.get("spec") or {}).get("unschedulable") and reason:
            out.append({"node": n["metadata"]["name"], "reason": reason[:1024]})
    return sorted(out, key=lambda n: n["node"])[:MAX_LISTED]


def avoided_links(pods: list[dict], now: float) -> list[dict[str, str]]:
    """The KV links routed around now: each decode pod's `fleetwise.dev/avoid-prefill` entries
    in force, soonest to lapse first (a malformed annotation is left out: the router ignores it too)."""
    out = []
    for pod in pods:
        meta = pod["metadata"]
        try:
            avoided = read_avoidance_annotation((meta.get("annotations") or {}).get(ANNOTATION_AVOID_PREFILL), now)
        except ValueError:
            continue
        out += [{"prefill": peer, "decode": meta["name"], "until": _iso(a.until), "reason": a.reason[:1024]}
                for peer, a in avoided.items()]
    return sorted(out, key=lambda x: (x["until"], x["decode"], x["prefill"]))[:MAX_LISTED]


def admin_kind(rec: fs.Record) -> str:
    if rec.kind == "worker":
        if rec.evidence.get("hard"):
            return "hard_signal"
        kv = next((k for k in rec.evidence if k.startswith("kv_")), None)
        return f"slow_{kv}" if kv else "slow_worker"
    return "bad_node" if rec.kind == "node" else "slow_link"


@dataclass
class PolicyState:
    loop: FaultLoop
    book: fs.IncidentBook = field(default_factory=fs.IncidentBook)
    status: dict[str, Any] = field(default_factory=dict)
    seen: int = 0   # the last action's `seq` whose outcome was reported


@dataclass
class FaultControl:
    """Every FaultPolicy's loop, kept between windows (the detector's streaks, cooldowns and
    history, and the incidents)."""
    kube: Kube
    fleet: FleetActions
    prometheus: PrometheusClient | None
    admin: AdminSink | None = None
    metrics: OperatorMetrics | None = None
    pods: PodCache | None = None
    policies: dict[tuple[str, str], PolicyState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def window(self, body: dict, now: float | None = None) -> float | None:
        """One window of the policy in `body`; returns the seconds to the next, None for none."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            spec = FaultPolicySpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            self._write(body, {}, [fs.not_ready("InvalidSpec", str(e))])
            return INVALID_RETRY
        if self.prometheus is None:
            self._write(body, {}, [fs.not_ready("NoPrometheus", "the operator has no Prometheus to read the "
                                                                "workers' signals from (--prometheus-url)")])
            return None
        now = time.time() if now is None else now
        with self._lock:
            state = self.policies.get(key)
            if state is None:
                state = self.policies[key] = PolicyState(FaultLoop(self.prometheus, self.fleet, spec, list))
        state.loop.policy = spec
        if self.pods is not None and self.pods.loaded:
            pods = selected(self.pods.workers(), key[0], spec)
        else:
            pods = self.kube.pods(key[0], selector(spec))
        nodes = self.kube.nodes()
        workers = policy_workers(pods, nodes, load_address_map())
        state.loop.workers = lambda: workers
        decision = state.loop.tick(now)
        done = state.loop.finished_after(state.seen)  # this window's, and those that ended since the last
        state.seen = max((d.seq for d in done), default=state.seen)
        outcomes = [(d.action.verb, d.action.target, d.outcome) for d in done]
        outcomes += [(r.action.verb, r.action.target, fs.RUNNING) for r in list(state.loop.running)]
        opened: list[fs.Record] = []
        if decision is not None:
            opened = state.book.window(decision.incidents, outcomes, decision.held, now, spec.detection.window_seconds)
            self._count(key, state.book)
        else:  # a skipped window still tells how the actions running since the last one ended
            state.book.outcomes(outcomes)
        self._report(body, opened, done)
        if done:  # what the actions changed shows in this window's status
            pods, nodes = self.kube.pods(key[0], selector(spec)), self.kube.nodes()
        refused = [f"{d.action.verb} {d.action.target}: {d.outcome}" for d in done if d.outcome.startswith("refused")]
        missing = len(state.loop.last_signals.missing) if state.loop.last_signals else 0
        conditions = [fs.ready(state.loop.error, len(workers), missing), fs.degraded(decision, refused)
                      if decision is not None else self._kept(state, "Degraded")]
        scores = sorted((decision.scores if decision else {}).items())[:MAX_LISTED * 2]
        status = {"lastWindowTime": _iso(now), "workers": len(workers), "openCount": state.book.open_count(),
                  "incidents": [fs.record_view(r, _iso) for r in state.book.records],
                  "quarantined": out_of_routing(pods), "cordoned": cordoned(nodes),
                  "avoided": avoided_links(pods, time.time()),
                  # a list: a merge patch replaces it, where it would merge an object's keys with the last window's
                  "scores": [{"worker": k, "score": round(v, 2)} for k, v in scores if math.isfinite(v)]}
        self._write(body, status, conditions)
        return float(spec.detection.window_seconds)

    def _report(self, body: dict, opened: list[fs.Record], done: list[Done]) -> None:
        involved = {"apiVersion": API_VERSION, "kind": "FaultPolicy", "metadata": body["metadata"]}
        namespace = body["metadata"]["namespace"]
        for rec in opened:
            summary = f"{rec.kind} {rec.target} out of its peers" + (f" in {rec.group}" if rec.group else "")
            self.kube.event(involved, "Warning", "FaultIncident", f"{summary}: {fs.evidence_view(rec.evidence)}")
            if self.admin is not None:
                self.admin.incident(admin_kind(rec), cast(SubjectKind, rec.kind), rec.target,
                                    namespace if rec.kind == "worker" else "",
                                    "critical" if rec.evidence.get("hard") else "warning", summary,
                                    fs.flat_evidence(rec.evidence))
        for d in done:
            refused = d.outcome.startswith("refused")
            took = f" (after {d.seconds:.0f} s)" if d.seconds >= 1.0 else ""
            self.kube.event(involved, "Warning" if refused else "Normal",
                            "FaultActionRefused" if refused else "FaultAction",
                            f"{d.action.verb} {d.action.target}: {d.outcome}{took}")

    @staticmethod
    def _kept(state: PolicyState, kind: str) -> Condition:
        """The condition as the last window left it (a skipped window tells nothing new)."""
        old = next((c for c in state.status.get("conditions") or [] if c.get("type") == kind), None)
        if old is None:
            return fs.degraded(None, [])
        return Condition(kind, old["status"], old["reason"], old["message"])

    def _write(self, body: dict, status: dict[str, Any], conditions: list[Condition]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if self.admin is not None:
            conditions = [*conditions, fs.admin_reachable(self.admin.reachable, self.admin.queued)]
        state = self.policies.get(key)
        before = state.status if state is not None else (body.get("status") or {})
        status["conditions"] = with_times(before, conditions, _iso(time.time()), meta.get("generation"))
        status["observedGeneration"] = meta.get("generation")
        self.kube.patch_fault_policy_status(key[0], key[1], status)
        if state is not None:
            state.status = status
        was = {c.get("type"): c for c in before.get("conditions") or []}
        involved = {"apiVersion": API_VERSION, "kind": "FaultPolicy", "metadata": meta}
        for cond in status["conditions"]:
            old = was.get(cond["type"], {})
            if cond["type"] == "Ready" or (old.get("status"), old.get("reason")) == (cond["status"], cond["reason"]):
                continue
            bad = cond["status"] == ("False" if cond["type"] == "AdminReachable" else "True")
            if bad or old:  # a first healthy condition is no news
                self.kube.event(involved, "Warning" if bad else "Normal", f"{cond['type']}{cond['reason']}",
                                cond["message"])

    def _count(self, key: tuple[str, str], book: fs.IncidentBook | None) -> None:
        """The open-incidents gauge by kind; None: the policy is gone."""
        if self.metrics is None:
            return
        for kind in ("worker", "node", "link"):
            if book is None:
                try:
                    self.metrics.incidents_open.remove(*key, kind)
                except KeyError:
                    pass
            else:
                self.metrics.incidents_open.labels(*key, kind).set(
                    sum(r.state == "Open" and r.kind == kind for r in book.records))

    def deleted(self, namespace: str, name: str) -> None:
        with self._lock:
            self.policies.pop((namespace, name), None)
        self._count((namespace, name), None)
