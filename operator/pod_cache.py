"""The fleetwise worker pods as the operator's pod watch last saw them, so that a control
loop that runs every few seconds (the power loop per PowerBudget) reads pods, their cap and
override annotations and their addresses without a LIST or a GET per pod per period.

The watch handler (`operator/handlers.py`) writes it from the event loop; the loops read it
from worker threads, under one lock. A read may trail a write the operator just made by one
watch event: the power loop's decisions tolerate that (a cap annotation rewritten twice is
the same patch).
"""

import copy
import threading

from . import manifests as m
from .kube import Kube


def is_worker(body: dict) -> bool:
    labels = body["metadata"].get("labels") or {}
    return labels.get(m.MANAGED_BY) == "fleetwise" and bool(labels.get(m.LABEL_ROLE))


class PodCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], dict] = {}
        self.loaded = False

    def on_pod(self, event: str, body: dict) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            if event == "DELETED" or not is_worker(body):
                self._pods.pop(key, None)
            else:
                self._pods[key] = body

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
