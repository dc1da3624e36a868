"""`FleetActions` on Kubernetes: a worker is a pod, its routability lives on the pod.

The routable label takes a pod out of the router's discovery and of its pool's Service;
annotations say which state, why and since when (`manifests.routability_patch`). A drain
is the deployment controller's own drain: the same label and `draining-since` annotation,
so the next reconcile replaces the pod and deletes it once idle or out of time. A
quarantined pod is replaced too but left running (`controllers/deployment.py`). Restart
deletes the pod, which the ModelDeployment's plan then replaces. Both first mark the pod's
node suspect with a `PreferNoSchedule` taint (`fleetwise.dev/suspect`): placement, like
kube-scheduler, puts the replacement on another node when one fits, and on that one only when
none does; uncordon lifts the mark with the cordon. Cordon sets the node unschedulable, which
placement already respects. A slow KV link is routed around on the
decode pod: its `fleetwise.dev/avoid-prefill` annotation (JSON `{prefill pod: {until,
reason}}`, lapsed entries dropped at each write) is what the router's discovery reads, so it
needs no permission beyond the pod patch the other verbs use. Every action records an Event
with its reason on the pod or node, and every call goes through `kube.py`.

A power cap is recorded on the pod (`fleetwise.dev/power-cap`: watts, until, fallback,
reason), with an Event when its value changes, and sent to the worker's `/internal/power`
with the shared token. The annotation is the intent anyone can read with kubectl; the call
is what a modelled GPU takes. On real GPUs (`power_actuator="node-agent"`) the annotation is
the only path: `fleetwise node-agent` on the pod's node applies it through NVML (a worker
container has no privilege to) and enforces its `until` as the lease, so no call is sent. A
renewal rewrites the annotation only once half its time has gone, so holding caps costs the
API server little. The power verbs and `state` read the pod from the operator's watch cache
when given one (`PodCache`): a power period or a fault window then makes no GET per pod; the
verbs that change a pod's routability read it fresh.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

from fleetwise.addresses import load_address_map, worker_url
from fleetwise.fleet import (
    ANNOTATION_AVOID_PREFILL,
    ActionRefused,
    PowerOverride,
    Routability,
    WorkerRef,
    WorkerState,
    dump_avoidances,
    read_avoidance_annotation,
    send_power_cap,
    with_avoidance,
)
from fleetwise.protocol import load_token

from . import manifests as m
from .kube import Kube
from .pod_cache import PodCache

log = logging.getLogger(__name__)


POWER_ACTUATORS = ("worker", "node-agent")
TAINT_SUSPECT = "fleetwise.dev/suspect"  # PreferNoSchedule: a restarted worker's node, until uncordoned


class KubeFleet:
    def __init__(self, kube: Kube, token_file: Path | None = None, pods: PodCache | None = None,
                 power_actuator: str = "worker") -> None:
        """`token_file`: the shared internal token, for the workers' /internal/power. `pods`:
        the watch cache the power verbs read. `power_actuator`: who applies a cap, the worker
        (a modelled GPU) or the node agent (real GPUs, from the annotation alone)."""
        if power_actuator not in POWER_ACTUATORS:
            raise ValueError(f"power_actuator: one of {', '.join(POWER_ACTUATORS)}; got {power_actuator!r}")
        self.kube, self.token_file, self.pods, self.power_actuator = kube, token_file, pods, power_actuator

    def _pod(self, verb: str, worker: WorkerRef, cached: bool = False) -> dict[str, Any]:
        if cached and self.pods is not None and self.pods.loaded:
            pod = self.pods.get(worker.namespace, worker.name)
        else:
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
        return m.pod_state(self._pod("state", worker, cached=True))

    def _route(self, verb: str, worker: WorkerRef, state: Routability, reason: str, event: str) -> None:
        pod = self._pod(verb, worker)
        if pod["metadata"].get("deletionTimestamp"):
            raise ActionRefused(f"{verb}: {worker.namespace}/{worker.name} is being deleted")
        node = (pod.get("spec") or {}).get("nodeName")
        if state is Routability.QUARANTINED and node:  # before the replacement the quarantine brings is placed
            self._suspect(node, True, f"{worker.namespace}/{worker.name} quarantined: {reason}")
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
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            self._suspect(node, True, f"{worker.namespace}/{worker.name} restarted: {reason}")
        self.kube.event(pod, "Normal", "Restarting", f"{reason}; deleted, its ModelDeployment replaces it"
                        + (f" away from {node} when another node fits" if node else ""))
        self.kube.delete_pod(worker.namespace, worker.name)
        log.info("restart %s/%s: %s", worker.namespace, worker.name, reason)

    def avoid_link(self, prefill: WorkerRef, decode: WorkerRef, reason: str, until: float | None) -> None:
        """Read fresh (not from the watch cache): a second link to the same decode pod in one
        window must not overwrite the first."""
        if prefill.namespace != decode.namespace:
            raise ActionRefused(f"avoid_link: {prefill.namespace}/{prefill.name} and {decode.namespace}/{decode.name} "
                                "are in different namespaces; only peers of one namespace are paired")
        source, pod = self._pod("avoid_link", prefill, cached=True), self._pod("avoid_link", decode)
        roles = [(p["metadata"].get("labels") or {}).get(m.LABEL_ROLE) for p in (source, pod)]
        if roles != ["prefill", "decode"]:
            raise ActionRefused(f"avoid_link: {prefill.name} ({roles[0]}) -> {decode.name} ({roles[1]}) "
                                "is no prefill -> decode pair")
        now = time.time()
        try:
            current = read_avoidance_annotation((pod["metadata"].get("annotations") or {}).get(
                ANNOTATION_AVOID_PREFILL), now)
        except ValueError:
            current = {}  # edited by hand into something unreadable: replaced
        kept = dump_avoidances(with_avoidance(current, prefill.name, until, reason, now), now)
        self.kube.patch_pod_metadata(decode.namespace, decode.name, labels={},
                                     annotations={ANNOTATION_AVOID_PREFILL: json.dumps(kept) if kept else None})
        lifted = prefill.name not in kept
        self.kube.event(pod, "Normal" if lifted else "Warning", "LinkRestored" if lifted else "LinkAvoided",
                        f"KV link from {prefill.name}: " + ("paired again" if lifted else
                                                             f"routed around until {until:.0f}") + f": {reason}")
        log.info("avoid_link %s -> %s/%s: %s", prefill.name, decode.namespace, decode.name,
                 "lifted" if lifted else f"until {until}")

    def override_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str) -> None:
        pod = self._pod("override_power", worker)
        value = None if watts is None else json.dumps({"watts": watts, "until": until, "reason": reason[:1024]})
        self.kube.patch_pod_metadata(worker.namespace, worker.name, labels={},
                                     annotations={m.ANNOTATION_POWER_OVERRIDE: value})
        self.kube.event(pod, "Normal", "PowerOverride",
                        f"cap cleared: {reason}" if watts is None else f"cap {watts:.0f} W until {until:.0f}: {reason}")

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        return m.pod_power_override(self._pod("power_override", worker, cached=True), time.time())

    def cap_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str,
                  fallback_watts: float | None = None) -> None:
        pod = self._pod("cap_power", worker, cached=True)
        before, now = m.pod_power_cap(pod), time.time()
        was, left = (None, 0.0) if before is None else (before["watts"], before["until"] - now)
        if was != watts or (watts is not None and left < (until - now) / 2):
            value = None if watts is None else json.dumps(
                {"watts": watts, "until": until, "fallbackWatts": fallback_watts, "reason": reason[:1024]})
            self.kube.patch_pod_metadata(worker.namespace, worker.name, labels={},
                                         annotations={m.ANNOTATION_POWER_CAP: value})
        if was != watts:
            self.kube.event(pod, "Normal", "PowerCapLifted" if watts is None else "PowerCapped",
                            reason if watts is None else f"cap {watts:.0f} W per GPU: {reason}")
        if self.power_actuator == "node-agent":
            return
        url = worker.url or worker_url(pod, load_address_map(), internal=True)
        if self.token_file is None or url is None:
            raise ActionRefused(f"cap_power: recorded on {worker.namespace}/{worker.name}, not sent: "
                                + ("no internal token" if self.token_file is None else "the pod has no address yet"))
        send_power_cap(url, load_token(self.token_file), watts, until, reason, fallback_watts)

    def cordon(self, node: str, reason: str) -> None:
        body = self._node("cordon", node)
        self.kube.patch_node(node, {"spec": {"unschedulable": True},
                                    "metadata": {"annotations": {m.ANNOTATION_CORDON_REASON: reason[:1024]}}})
        self.kube.event(body, "Warning", "Cordoned", reason)
        log.info("cordon %s: %s", node, reason)

    def _suspect(self, node: str, suspect: bool, reason: str) -> None:
        """Marks the node suspect (a PreferNoSchedule taint) or lifts the mark; a node that is
        gone needs neither. The taints are one list: the whole of it is written."""
        body = self.kube.node(node)
        if body is None:
            return
        taints = [t for t in (body.get("spec") or {}).get("taints") or [] if t.get("key") != TAINT_SUSPECT]
        had = len(taints) != len((body.get("spec") or {}).get("taints") or [])
        if had == suspect:
            return
        if suspect:
            taints.append({"key": TAINT_SUSPECT, "effect": "PreferNoSchedule"})
        self.kube.patch_node(node, {"spec": {"taints": taints or None}})
        body["apiVersion"], body["kind"] = "v1", "Node"
        self.kube.event(body, "Warning" if suspect else "Normal", "MarkedSuspect" if suspect else "SuspectLifted",
                        reason)

    def uncordon(self, node: str, reason: str) -> None:
        self._suspect(node, False, reason)
        body = self._node("uncordon", node)
        self.kube.patch_node(node, {"spec": {"unschedulable": None},
                                    "metadata": {"annotations": {m.ANNOTATION_CORDON_REASON: None}}})
        self.kube.event(body, "Normal", "Uncordoned", reason)
        log.info("uncordon %s: %s", node, reason)
