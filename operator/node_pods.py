"""The fleetwise worker pods on one node and their cap annotations, for the node agent: a
list, then a watch from its resourceVersion (a field selector on `spec.nodeName`, so the API
server sends only this node's pods), listed again after any break.

What it last saw stays in force while the API server is away: the agent enforces each cap's
lease on its own clock, so an unreachable API server lapses caps to their fallbacks on time
rather than freezing them.
"""

import logging
import threading
from collections.abc import Callable

from kubernetes import client, watch

from . import manifests as m
from .node_agent import CapIntent, PodKey, cap_intent

log = logging.getLogger(__name__)

WATCH_SECONDS = 60
RETRY_SECONDS = 2.0


class NodePods:
    def __init__(self, api: client.ApiClient, node: str, on_error: Callable[[], None] = lambda: None) -> None:
        self.api, self.core, self.node, self.on_error = api, client.CoreV1Api(api), node, on_error
        self._intents: dict[PodKey, CapIntent | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.synced = threading.Event()  # set after the first list
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="node-pods", daemon=True)

    def start(self) -> "NodePods":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def intents(self) -> dict[PodKey, CapIntent | None]:
        with self._lock:
            return dict(self._intents)

    def _query(self) -> dict:
        return {"field_selector": f"spec.nodeName={self.node}", "label_selector": f"{m.MANAGED_BY}=fleetwise"}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._list_and_watch()
            except Exception as e:  # the API server away, a 410 Gone: list again shortly
                if self._stop.is_set():
                    return
                self.on_error()
                log.warning("watching the pods on %s: %s: %s", self.node, type(e).__name__, e)
                self._stop.wait(RETRY_SECONDS)

    def _list_and_watch(self) -> None:
        # resource_version "0": from the API server's watch cache, as kubelets list, not a quorum read
        listed = self.core.list_pod_for_all_namespaces(**self._query(), resource_version="0", _request_timeout=30)
        pods = self.api.sanitize_for_serialization(listed.items)
        with self._lock:
            self._intents = {(p["metadata"]["namespace"], p["metadata"]["name"]): cap_intent(p) for p in pods}
        self.synced.set()
        self._watch = watch.Watch()
        for event in self._watch.stream(self.core.list_pod_for_all_namespaces, **self._query(),
                                        resource_version=listed.metadata.resource_version if listed.metadata else None,
                                        timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + 10):
            if event["type"] == "ERROR":
                raise RuntimeError(f"watch error: {event['raw_object']}")
            pod = self.api.sanitize_for_serialization(event["object"])
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            with self._lock:
                if event["type"] == "DELETED":
                    self._intents.pop(key, None)
                else:
                    self._intents[key] = cap_intent(pod)
            if self._stop.is_set():
                return
