"""The cluster as placement needs it: nodes, power domains and the GPU pods placed on nodes.

Watch events feed it, and so do the operator's own placements, booked the moment they are
decided (and given back when the API server refuses the pod). That second feed is why this
is a cache kept by hand rather than a `@kopf.index`: an index learns of a binding only when
its pod's watch event comes back, and a reconcile that places in between would see the GPUs
free and book them twice. The event handlers write it from the event loop, reconciles read
it and book into it from worker threads; one lock guards it.
"""

import threading

from pydantic import ValidationError

from fleetwise.controllers.placement import GPU_PRODUCT_LABEL, GPU_RESOURCE, Node, Placement, Pod, PowerDomain
from fleetwise.spec import PowerBudgetSpec

from . import manifests as m
from .kube import Kube

GPU_WATTS_LABEL = "fleetwise.dev/gpu-watts"


def pod_gpus(pod: dict) -> int:
    total = 0
    for ctr in (pod.get("spec") or {}).get("containers") or []:
        req = ((ctr.get("resources") or {}).get("requests") or {}).get(GPU_RESOURCE)
        total += int(req or 0)
    return total


def _node(body: dict) -> Node:
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    labels = meta.get("labels") or {}
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True"
                for cond in status.get("conditions") or [])
    watts = labels.get(GPU_WATTS_LABEL)
    return Node(meta["name"], labels.get(GPU_PRODUCT_LABEL, ""),
                int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0)), labels,
                [(t["key"], t.get("effect", "")) for t in spec.get("taints") or []],
                bool(spec.get("unschedulable")), ready, float(watts) if watts else None)


class ClusterState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, Node] = {}
        self.placed: dict[tuple[str, str], Pod] = {}
        self.domains: dict[str, PowerDomain] = {}

    def on_node(self, event: str, body: dict) -> bool:
        """True when what placement sees of the node changed (heartbeats change nothing)."""
        name = body["metadata"]["name"]
        with self.lock:
            if event == "DELETED":
                return self.nodes.pop(name, None) is not None
            node = _node(body)
            changed = self.nodes.get(name) != node
            self.nodes[name] = node
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
            gpus = pod_gpus(body)
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

    def on_bound(self, namespace: str, pod: Pod) -> None:
        """The operator bound `pod` (its node set): book it before the watch event confirms it."""
        with self.lock:
            self.placed[(namespace, pod.name)] = pod

    def booked(self, namespace: str, name: str) -> bool:
        """The pod is on a node, as far as placement knows (the watch said so, or the operator
        booked it a moment ago)."""
        with self.lock:
            return (namespace, name) in self.placed

    def unbook(self, namespace: str, pod: Pod) -> None:
        """`pod` was booked but its create or binding failed: its GPUs are free again (unless a
        watch event has said where it is meanwhile)."""
        with self.lock:
            if self.placed.get((namespace, pod.name)) is pod:
                del self.placed[(namespace, pod.name)]

    def placement(self) -> Placement:
        """A placement over what the cache holds now; it books its own decisions as it makes them."""
        with self.lock:
            nodes, placed, domains = list(self.nodes.values()), list(self.placed.values()), list(self.domains.values())
        return Placement(nodes, placed, domains)

    def load(self, kube: Kube) -> None:
        for n in kube.nodes():
            self.on_node("ADDED", n)
        for p in kube.all_pods():
            self.on_pod("ADDED", p)
        for b in kube.power_budgets():
            self.on_budget("ADDED", b)
