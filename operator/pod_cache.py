"""The fleetwise worker pods as the operator last saw them, so that the control loops read
pods without a LIST or a GET per pod: a deployment's reconcile reads its pods here, and the
power loop per PowerBudget its domain's pods, cap and override annotations and addresses.

Two feeds write it: the pod watch (`operator/handlers.py`, from the event loop) and the
answers to the operator's own writes (a create, a patch, a delete: from reconciles' worker
threads), so a reconcile reads what it wrote without waiting for the watch to bring it back;
without that, the next reconcile would create a pod again before its watch event arrived.
Whichever feed is later by resourceVersion wins (an older watch event never overwrites a
newer write), and a deleted pod is remembered for a while, so that a late answer does not
bring it back. A deployment's pods are listed again now and then (`relisted`): a pod deleted
while the watch was down, which no event reports, leaves the cache then. One lock guards it.
"""

import copy
import threading
import time
from collections import OrderedDict

from . import manifests as m
from .kube import Kube

GONE_KEPT = 10_000  # deleted pods remembered, the oldest forgotten first
GONE_SECONDS = 300.0


def is_worker(body: dict) -> bool:
    labels = body["metadata"].get("labels") or {}
    return labels.get(m.MANAGED_BY) == "fleetwise" and bool(labels.get(m.LABEL_ROLE))


def _version(body: dict) -> int | None:
    """The resourceVersion as a number; None when the API server's is not one (it is opaque
    in principle; kine's and etcd's are counters)."""
    rv = body["metadata"].get("resourceVersion")
    return int(rv) if isinstance(rv, str) and rv.isdigit() else None


def _as_planned(body: dict) -> tuple:
    """What of a pod a deployment's reconcile acts on: a change elsewhere (an address, a
    container's state, a condition other than Ready) wakes nothing."""
    meta, status = body["metadata"], body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return (status.get("phase"), ready, meta.get("deletionTimestamp"), (body.get("spec") or {}).get("nodeName"),
            meta.get("labels"), meta.get("annotations"))


def _older(body: dict, than: dict) -> bool:
    a, b = _version(body), _version(than)
    return a is not None and b is not None and a < b


Key = tuple[str, str]


class PodCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[Key, dict] = {}
        self._by_deployment: dict[Key, set[str]] = {}  # (namespace, deployment) -> pod names
        self._gone: OrderedDict[Key, tuple[float, int | None]] = OrderedDict()  # when, and at which version
        self.loaded = False

    def on_pod(self, event: str, body: dict) -> bool:
        """A watch event; whether it changed what a reconcile of the pod's deployment acts on
        (not when it only brings back what the operator wrote)."""
        with self._lock:
            if event == "DELETED":
                return self._forget(body, _version(body))
            return self._put(body)

    def written(self, body: dict | None, namespace: str = "", name: str = "") -> None:
        """The API server's answer to the operator's write of a pod: the pod as it is now, or
        None when the write left none (`namespace`/`name` say which)."""
        with self._lock:
            if body is None:
                current = self._pods.get((namespace, name))
                if current is not None:  # what the watch may still bring of it is no newer
                    self._forget(current, _version(current))
            else:
                self._put(body)

    def _put(self, body: dict) -> bool:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        gone = self._gone.pop(key, None)
        if gone is not None:
            v = _version(body)
            if gone[1] is not None and v is not None and v <= gone[1]:
                self._gone[key] = gone
                return False  # an answer or event from before it went
        current = self._pods.get(key)
        if current is not None and _older(body, current):
            return False
        self._unindex(key, current)
        if not is_worker(body):
            return self._pods.pop(key, None) is not None
        self._pods[key] = body
        deployment = (meta.get("labels") or {}).get(m.LABEL_DEPLOYMENT)
        if deployment:
            self._by_deployment.setdefault((key[0], deployment), set()).add(key[1])
        return current is None or _as_planned(current) != _as_planned(body)

    def _forget(self, body: dict, version: int | None) -> bool:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        known = self._pods.pop(key, None)
        self._unindex(key, known)
        self._gone[key] = (time.monotonic(), version)
        self._gone.move_to_end(key)
        cutoff = time.monotonic() - GONE_SECONDS
        while self._gone and (len(self._gone) > GONE_KEPT or next(iter(self._gone.values()))[0] < cutoff):
            self._gone.popitem(last=False)
        return known is not None

    def _unindex(self, key: Key, pod: dict | None) -> None:
        deployment = pod and (pod["metadata"].get("labels") or {}).get(m.LABEL_DEPLOYMENT)
        if deployment:
            names = self._by_deployment.get((key[0], deployment))
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._by_deployment[(key[0], deployment)]

    def relisted(self, namespace: str, deployment: str, items: list[dict], version: str) -> None:
        """A LIST of the deployment's pods at resourceVersion `version`: what it holds is taken
        (where newer than what is here), and a pod it lacks, which is no newer than the list,
        is gone (a watch that was down missed its deletion)."""
        listed = int(version) if version.isdigit() else None
        names = {p["metadata"]["name"] for p in items}
        with self._lock:
            for name in list(self._by_deployment.get((namespace, deployment), ())):
                pod = self._pods[(namespace, name)]
                v = _version(pod)
                if name not in names and listed is not None and v is not None and v <= listed:
                    self._forget(pod, listed)
            for pod in items:
                self._put({**pod, "metadata": {**pod["metadata"], "namespace": namespace}})

    def deployment_pods(self, namespace: str, deployment: str) -> list[dict]:
        """The deployment's pods (read-only: shared with the cache)."""
        with self._lock:
            return [self._pods[(namespace, n)] for n in self._by_deployment.get((namespace, deployment), ())]

    def load(self, kube: Kube) -> None:
        for pod in kube.all_pods(f"{m.MANAGED_BY}=fleetwise"):
            self.on_pod("ADDED", pod)
        self.loaded = True

    def get(self, namespace: str, name: str) -> dict | None:
        """A copy of the pod (callers may annotate it), None when the watch knows of none."""
        with self._lock:
            pod = self._pods.get((namespace, name))
        return None if pod is None else copy.deepcopy(pod)

    def workers(self) -> list[dict]:
        """Every worker pod (read-only: shared with the cache)."""
        with self._lock:
            return list(self._pods.values())
