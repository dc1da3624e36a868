"""Replica discovery from Kubernetes: the ready worker pods the operator labelled.

A pod is a replica while it is owned by a ModelDeployment (its controller ownerReference: a
pod that merely carries the labels gets no traffic), sits in a namespace the router serves, is
Ready, has an IP, is not being deleted and is not marked `fleetwise.dev/routable=false`
(draining or quarantined). Its model and role come from its
labels. Its address is its internal listener's, from fleetwise/addresses.py (tests whose pod
IPs cannot be reached give an address map, read at every refresh): the router sends every
request and probe there, with the shared token. A decode pod's `fleetwise.dev/avoid-prefill`
annotation (JSON `{prefill pod name: {until, reason}}`, written by the fault loop's
`avoid_link`) names prefill pods of its namespace whose KV links to it are routed around
until then; an annotation that does not parse is ignored with a warning.
"""

import logging
import threading
import time
from collections.abc import Collection

from kubernetes import client, watch

from fleetwise.addresses import AddressMap, load_address_map, worker_url
from fleetwise.fleet import ANNOTATION_AVOID_PREFILL, read_avoidance_annotation
from fleetwise.spec import GROUP

from .endpoints import ROLES, ModelRoute, swap_routes
from .replica import Replica

log = logging.getLogger(__name__)

SELECTOR = "app.kubernetes.io/managed-by=fleetwise"
MODEL_LABEL, ROLE_LABEL, ROUTABLE_LABEL = "fleetwise.dev/model", "fleetwise.dev/role", "fleetwise.dev/routable"
def owned_by_a_deployment(pod: dict) -> bool:
    return any(ref.get("controller") and ref.get("kind") == "ModelDeployment"
               and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
               for ref in pod["metadata"].get("ownerReferences") or [])


def routable(pod: dict) -> bool:
    meta, status = pod["metadata"], pod.get("status") or {}
    labels = meta.get("labels") or {}
    if not owned_by_a_deployment(pod):
        return False
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return (ready and not meta.get("deletionTimestamp") and labels.get(ROUTABLE_LABEL) != "false"
            and labels.get(ROLE_LABEL) in ROLES and bool(labels.get(MODEL_LABEL)))


def routes_from_pods(pods: list[dict], address_map: AddressMap,
                     namespaces: Collection[str] = ()) -> dict[str, ModelRoute]:
    """The routes the pods make; only pods in `namespaces` count, when it names any."""
    routes: dict[str, ModelRoute] = {}
    urls: dict[tuple[str, str], str] = {}
    avoiding: list[tuple[Replica, dict]] = []
    for pod in sorted(pods, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        if namespaces and pod["metadata"]["namespace"] not in namespaces:
            continue
        if not routable(pod):
            continue
        url = worker_url(pod, address_map, internal=True)
        if not url:
            continue
        labels = pod["metadata"]["labels"]
        model, role = labels[MODEL_LABEL], labels[ROLE_LABEL]
        route = routes.setdefault(model, ModelRoute(model))
        replica = Replica(url, model, role)
        route.replicas[role].append(replica)
        urls[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = url
        if role == "decode" and ANNOTATION_AVOID_PREFILL in (pod["metadata"].get("annotations") or {}):
            avoiding.append((replica, pod))
    now = time.time()
    for replica, pod in avoiding:
        ns = pod["metadata"]["namespace"]
        replica.avoid = {urls[(ns, peer)]: a.until for peer, a in _avoided(pod, now).items() if (ns, peer) in urls}
    return routes


def _avoided(pod: dict, now: float) -> dict:
    value = pod["metadata"]["annotations"][ANNOTATION_AVOID_PREFILL]
    try:
        return read_avoidance_annotation(value, now)
    except ValueError as e:  # json's errors are ValueErrors too
        log.warning("%s/%s: ignoring %s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"],
                    ANNOTATION_AVOID_PREFILL, e)
        return {}


class KubernetesEndpoints:
    def __init__(self, api: client.ApiClient, namespaces: Collection[str] = (), address_map: str | None = None):
        self.core = client.CoreV1Api(api)
        self.api = api
        self.namespaces = frozenset(namespaces)
        # one namespace: watch just it; several: watch all and keep theirs
        self.namespace = next(iter(self.namespaces)) if len(self.namespaces) == 1 else None
        self.address_map_path = address_map
        self._pods: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()
        self._routes: dict[str, ModelRoute] = {}
        self._synced = threading.Event()
        self._closed = threading.Event()
        threading.Thread(target=self._watch_forever, name="pod-watch", daemon=True).start()
        self._synced.wait(30)
        self.refresh()

    def _list(self, **kw):
        if self.namespace:
            return self.core.list_namespaced_pod(self.namespace, label_selector=SELECTOR, **kw)
        return self.core.list_pod_for_all_namespaces(label_selector=SELECTOR, **kw)

    def close(self) -> None:
        self._closed.set()

    def _watch_forever(self) -> None:
        while not self._closed.is_set():
            try:
                listing = self._list()
                with self._lock:
                    self._pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                                  for p in self.api.sanitize_for_serialization(listing.items)}
                self._synced.set()
                fn = self.core.list_namespaced_pod if self.namespace else self.core.list_pod_for_all_namespaces
                args = (self.namespace,) if self.namespace else ()
                for ev in watch.Watch().stream(fn, *args, label_selector=SELECTOR,
                                               resource_version=listing.metadata.resource_version,
                                               timeout_seconds=30):
                    if self._closed.is_set():
                        return
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                    with self._lock:
                        if ev["type"] == "DELETED":
                            self._pods.pop(key, None)
                        else:
                            self._pods[key] = pod
            except Exception as e:  # expired resource version, API restart: list again
                if self._closed.is_set():
                    return
                log.warning("pod watch restarting: %s", e)
                time.sleep(1)

    def _address_map(self) -> AddressMap:
        return load_address_map(self.address_map_path)

    def models(self) -> dict[str, ModelRoute]:
        return self._routes

    def refresh(self) -> list[str]:
        with self._lock:
            pods = list(self._pods.values())
        new = routes_from_pods(pods, self._address_map(), self.namespaces)
        gone = swap_routes(self._routes, new)
        self._routes = new
        return gone
