"""kopf handlers: thin; every decision is in fleetwise.controllers, every call in kube.py.

One daemon per ModelDeployment reconciles it whenever something it depends on changes
(its spec, its pods, the nodes, the power budgets) and at least every `RESYNC_SECONDS`.
"""

import logging
import threading
from collections.abc import Mapping

import kopf
from kubernetes.client.rest import ApiException

from fleetwise.spec import GROUP, VERSION

from . import manifests as m
from .kube import error_message
from .reconcile import Operator

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
RETRY_SECONDS = 1.0
COALESCE_SECONDS = 0.3  # after a wake-up, let the burst of pod events that follows settle

_op: Operator | None = None
_wake: dict[tuple[str, str], threading.Event] = {}
_wake_lock = threading.Lock()


def install(operator: Operator) -> None:
    global _op
    _op = operator


def _event(namespace: str, name: str) -> threading.Event:
    with _wake_lock:
        return _wake.setdefault((namespace, name), threading.Event())


def wake(namespace: str, name: str) -> None:
    _event(namespace, name).set()


def wake_all() -> None:
    with _wake_lock:
        events = list(_wake.values())
    for e in events:
        e.set()


def _plain(x):
    """kopf's live views as plain JSON-like values."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.finalizer = "fleetwise.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fleetwise.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="fleetwise.dev", key="last-handled-configuration")
    settings.execution.max_workers = 512  # one thread per reconciling ModelDeployment
    settings.watching.server_timeout = 120
    settings.posting.level = logging.WARNING
    _op.state.load(_op.kube)


@kopf.daemon(GROUP, VERSION, "modeldeployments", cancellation_timeout=10.0)
def reconciler(stopped: kopf.DaemonStopped, body, namespace: str, name: str, **_):
    event = _event(namespace, name)
    while not stopped:
        event.clear()
        delay = RESYNC_SECONDS
        try:
            status = _op.reconcile(_plain(body))
            conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
            if conds.get("Ready") != "True" or conds.get("Progressing") == "True":
                delay = RETRY_SECONDS
        except ApiException as e:
            # 409 (a write raced another): re-read and go again; anything else: retry shortly
            _op.metrics.errors.labels(f"api_{e.status}").inc()
            log.warning("reconcile %s/%s: API %s: %s", namespace, name, e.status, error_message(e))
            delay = RETRY_SECONDS
        except Exception:
            _op.metrics.errors.labels("exception").inc()
            log.exception("reconcile %s/%s failed", namespace, name)
            delay = RETRY_SECONDS * 5
        waited = 0.0
        while waited < delay and not stopped and not event.is_set():
            event.wait(0.1)
            waited += 0.1
        if event.is_set() and not stopped:
            stopped.wait(COALESCE_SECONDS)
    with _wake_lock:
        _wake.pop((namespace, name), None)


@kopf.on.update(GROUP, VERSION, "modeldeployments", field="spec")
def spec_changed(namespace: str, name: str, **_):
    wake(namespace, name)


@kopf.on.delete(GROUP, VERSION, "modeldeployments")
def deleted(namespace: str, name: str, **_):
    """Owner references let the garbage collector remove the pods too; deleting them here
    frees their GPUs without waiting for it."""
    for pod in _op.kube.pods(namespace, f"{m.LABEL_DEPLOYMENT}={name}"):
        _op.kube.delete_pod(namespace, pod["metadata"]["name"])


@kopf.on.event("", "v1", "pods")
def pod_event(event, body, **_):
    _op.state.on_pod(event["type"], _plain(body))
    labels = body.get("metadata", {}).get("labels") or {}
    deployment = labels.get(m.LABEL_DEPLOYMENT)
    if deployment:
        wake(body["metadata"]["namespace"], deployment)


@kopf.on.event("", "v1", "nodes")
def node_event(event, body, **_):
    if _op.state.on_node(event["type"], _plain(body)):
        wake_all()


@kopf.on.event(GROUP, VERSION, "powerbudgets")
def budget_event(event, body, **_):
    _op.state.on_budget(event["type"], _plain(body))
    wake_all()
