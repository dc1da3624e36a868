"""The operator's calls to the Kubernetes API, in one place (and counted)."""

import base64
import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from fleetwise.spec import GROUP, VERSION

log = logging.getLogger(__name__)
CONNECTIONS = 32  # kept open to the API server by one client; a request beyond them waits for one


def load_client(kubeconfig: str | None) -> client.ApiClient:
    """A client from `kubeconfig`, else in-cluster, else ~/.kube/config (see `own_client`)."""
    if kubeconfig:
        config.load_kube_config(kubeconfig)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    if not client.Configuration.get_default_copy().verify_ssl:  # the user chose it: no warning per request
        import urllib3
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return own_client(client.Configuration.get_default_copy())


def own_client(cfg: client.Configuration) -> client.ApiClient:
    """A client with its own `CONNECTIONS` connections, where a request waits for a free one:
    by default a request beyond the pool (5 connections per CPU) opens a TLS connection of its
    own and closes it after, and with a hundred reconciles at once the handshakes, and a fresh
    TLS context loading the system's certificates for each, cost more CPU than the requests."""
    cfg.connection_pool_maxsize = CONNECTIONS
    api = client.ApiClient(cfg)
    api.rest_client.pool_manager.connection_pool_kw["block"] = True
    return api


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(ts: str) -> float:
    """An API server timestamp ('2024-05-01T12:00:00Z') in seconds since the epoch."""
    return dt.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()


def _json(answer: Any) -> Any:
    """A raw answer (`_preload_content=False`) decoded: the client's models cost far more CPU
    to build and turn back into dicts than the JSON they come from."""
    return json.loads(answer.data)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None,
                 on_request: Callable[[str, str], None] | None = None) -> None:
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        # pod creates on connections of their own: converging a fleet, they never wait for a
        # connection behind the reconciles' other requests (Events, status patches, Services)
        self.pod_creates = client.CoreV1Api(own_client(self.api.configuration))
        self.custom = client.CustomObjectsApi(self.api)
        self.on_request = on_request or (lambda verb, resource: None)

    def _count(self, verb: str, resource: str) -> None:
        self.on_request(verb, resource)

    # -- reads ---------------------------------------------------------------------------------

    def pods(self, namespace: str, selector: str) -> list[dict]:
        return self.pod_list(namespace, selector)[0]

    def pod_list(self, namespace: str, selector: str, cached: bool = False) -> tuple[list[dict], str]:
        """The pods and the list's resourceVersion; `cached`: from the API server's watch cache
        (resourceVersion 0: no read of its store, possibly a moment behind it)."""
        self._count("list", "pods")
        found = _json(self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False,
                                                    resource_version="0" if cached else None))
        return found["items"], found["metadata"].get("resourceVersion", "")

    def all_pods(self, selector: str = "") -> list[dict]:
        self._count("list", "pods")
        return _json(self.core.list_pod_for_all_namespaces(label_selector=selector, _preload_content=False))["items"]

    def pod(self, namespace: str, name: str) -> dict | None:
        """One pod, None when there is none."""
        self._count("get", "pods")
        try:
            return self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def node(self, name: str) -> dict | None:
        """One node, None when there is none."""
        self._count("get", "nodes")
        try:
            return self.api.sanitize_for_serialization(self.core.read_node(name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def nodes(self) -> list[dict]:
        self._count("list", "nodes")
        return self.api.sanitize_for_serialization(self.core.list_node().items)

    def power_budgets(self) -> list[dict]:
        self._count("list", "powerbudgets")
        # the client declares `object`; a list answer is the decoded JSON
        found = cast(dict[str, Any], self.custom.list_cluster_custom_object(GROUP, VERSION, "powerbudgets"))
        return found["items"]

    def model_deployments(self, namespace: str) -> list[dict]:
        self._count("list", "modeldeployments")
        found = cast(dict[str, Any], self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                                "modeldeployments"))
        return found["items"]

    # -- writes --------------------------------------------------------------------------------

    def create_pod(self, namespace: str, pod: dict[str, Any]) -> dict:
        """Returns the pod as the API server stored it."""
        self._count("create", "pods")
        # the client takes a plain dict for its model
        return _json(self.pod_creates.create_namespaced_pod(namespace, pod,  # type: ignore[arg-type]
                                                           _preload_content=False))

    def delete_pod(self, namespace: str, name: str) -> dict | None:
        """Returns the pod as the API server left it (marked for deletion), or None when it is
        gone at once or was gone already."""
        self._count("delete", "pods")
        try:
            found = _json(self.core.delete_namespaced_pod(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status != 404:
                raise
            return None
        return found if found.get("kind") == "Pod" else None

    def patch_pod_metadata(self, namespace: str, name: str, labels: dict | None = None,
                           annotations: dict | None = None) -> dict | None:
        """Merges labels and annotations into the pod's (a None value removes the key);
        returns the pod as patched, None when it is gone."""
        self._count("patch", "pods")
        meta = {}
        if labels:
            meta["labels"] = labels
        if annotations:
            meta["annotations"] = annotations
        try:
            return _json(self.core.patch_namespaced_pod(name, namespace, {"metadata": meta}, _preload_content=False))
        except ApiException as e:
            if e.status != 404:
                raise
            return None

    def patch_node(self, name: str, patch: dict[str, Any]) -> None:
        """A merge patch of the node (a None value removes the key)."""
        self._count("patch", "nodes")
        self.core.patch_node(name, patch)

    def bind(self, namespace: str, pod: str, node: str) -> bool:
        """Binds through the pods/binding subresource. False when the pod is gone or bound
        already (a 409 from a concurrent binder: the next reconcile re-reads)."""
        self._count("create", "pods/binding")
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            # the generated client cannot deserialise a Binding answer: take it raw (and it takes a
            # plain dict for its model)
            self.core.create_namespaced_pod_binding(pod, namespace, body, _preload_content=False)  # type: ignore[arg-type]
            return True
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise

    def ensure_service(self, namespace: str, service: dict[str, Any]) -> None:
        self._count("create", "services")
        try:
            # the client takes a plain dict for its model
            self.core.create_namespaced_service(namespace, service)  # type: ignore[arg-type]
        except ApiException as e:
            if e.status != 409:
                raise

    def ensure_secret(self, namespace: str, secret: dict[str, Any]) -> bool:
        """Creates the Secret, or patches it when its data differ from `secret`'s
        stringData; returns whether it wrote."""
        name = secret["metadata"]["name"]
        self._count("get", "secrets")
        try:
            current = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            self._count("create", "secrets")
            self.core.create_namespaced_secret(namespace, secret)  # type: ignore[arg-type]
            return True
        want = {k: base64.b64encode(v.encode()).decode() for k, v in secret["stringData"].items()}
        if all((current.data or {}).get(k) == v for k, v in want.items()):
            return False
        self._count("patch", "secrets")
        self.core.patch_namespaced_secret(name, namespace, {"stringData": secret["stringData"]})
        return True

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        self._count("patch", "modeldeployments/status")
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "modeldeployments", name,
                                                              {"status": status})
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_budget_status(self, name: str, status: dict) -> None:
        self._count("patch", "powerbudgets/status")
        try:
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, "powerbudgets", name, {"status": status})
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    def patch_fault_policy_status(self, namespace: str, name: str, status: dict) -> None:
        self._count("patch", "faultpolicies/status")
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "faultpolicies", name,
                                                              {"status": status})
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    def review_token(self, token: str) -> str | None:
        """The user a bearer token authenticates as (a TokenReview), or None."""
        self._count("create", "tokenreviews")
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        status = client.AuthenticationV1Api(self.api).create_token_review(review).status
        return status.user.username if status is not None and status.authenticated and status.user else None

    def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event on `involved` (it needs apiVersion, kind and metadata); one on a
        cluster-scoped object, a node, goes to the default namespace, as kubectl looks for it."""
        meta = involved["metadata"]
        ns = meta.get("namespace") or "default"
        self._count("create", "events")
        body = {"metadata": {"generateName": f"{meta['name']}.", "namespace": ns},
                "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                                   "name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid")},
                "type": type_, "reason": reason, "message": message[:1024],
                "source": {"component": "fleetwise-operator"},
                "firstTimestamp": now_iso(), "lastTimestamp": now_iso(), "count": 1,
                "reportingComponent": "fleetwise-operator"}
        try:
            # the client takes a plain dict for its model
            self.core.create_namespaced_event(ns, body)  # type: ignore[arg-type]
        except ApiException as e:  # events are best effort
            log.warning("event %s/%s not recorded: %s", reason, meta["name"], e.reason)


def error_message(e: ApiException) -> str:
    if e.body is None:
        return str(e.reason)
    try:
        return json.loads(e.body).get("message", e.reason)
    except (TypeError, ValueError):
        return str(e.reason)
