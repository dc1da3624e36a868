"""kopf handlers: thin; every decision is in fleetwise.controllers, every call in kube.py.

One daemon per ModelDeployment reconciles it whenever something it depends on changes
(its spec, its pods, the nodes, the power budgets) and at least every `RESYNC_SECONDS`.
The daemon sleeps in the event loop between reconciles; a reconcile, which blocks on API
calls, runs in a worker thread. The state the handlers share is in kopf's memo (see
`operator_memo`), which kopf hands to every handler.
"""

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from fleetwise.controllers.status import settled
from fleetwise.spec import GROUP, VERSION

from . import manifests as m
from .faults import FaultControl
from .kube import error_message
from .power import PowerControl
from .reconcile import Operator
from .wakeups import Wakeups

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
RETRY_SECONDS = 1.0
COALESCE_SECONDS = 0.3  # after a wake-up, let the burst of pod events that follows settle
MAX_RECONCILES = 512    # reconciles running at once, each in its own thread


def operator_memo(operator: Operator) -> kopf.Memo:
    """The memo for `kopf.operator`: kopf gives each object a shallow copy, so these are shared."""
    return kopf.Memo(operator=operator, wakeups=Wakeups(),
                     reconcilers=ThreadPoolExecutor(MAX_RECONCILES, thread_name_prefix="reconcile"))


def _plain(x: Any) -> Any:
    """kopf's live views as plain JSON-like values."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class OwnDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds each object's essence (a deep copy of it) on each of its events, to see what
    changed; only fleetwise's own resources have handlers on changes, so the pods, nodes and
    Services it watches get an empty one: for a pod that copy was a third of the operator's
    CPU while it created a thousand pods."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if not str(body.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "fleetwise.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fleetwise.dev")
    settings.persistence.diffbase_storage = OwnDiffBase(prefix="fleetwise.dev", key="last-handled-configuration")
    settings.watching.server_timeout = 120
    settings.posting.level = logging.WARNING
    operator: Operator = memo.operator
    operator.cluster.load(operator.kube)
    if memo.get("pods") is not None:
        memo.pods.load(operator.kube)


def reconcile_once(operator: Operator, body: dict) -> float:
    """Reconciles; returns how long to wait before the next reconcile if nothing wakes it."""
    meta = body["metadata"]
    try:
        return RESYNC_SECONDS if settled(operator.reconcile(body)) else RETRY_SECONDS
    except ApiException as e:
        # 409 (a write raced another): re-read and go again; anything else: retry shortly
        operator.metrics.errors.labels(f"api_{e.status}").inc()
        log.warning("reconcile %s/%s: API %s: %s", meta["namespace"], meta["name"], e.status, error_message(e))
        return RETRY_SECONDS
    except Exception:
        operator.metrics.errors.labels("exception").inc()
        log.exception("reconcile %s/%s failed", meta["namespace"], meta["name"])
        return RETRY_SECONDS * 5


async def _woken(woken: asyncio.Event, stopped: kopf.DaemonStopped, delay: float) -> bool:
    """Sleeps until woken (True), or until the delay passes or the daemon is stopped (False)."""
    waits = [asyncio.ensure_future(woken.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return woken.is_set() and not stopped


@kopf.daemon(GROUP, VERSION, "modeldeployments", cancellation_timeout=10.0)
async def reconciler(stopped: kopf.DaemonStopped, body: kopf.Body, namespace: str | None, name: str,
                     memo: kopf.Memo, **_: Any) -> None:
    wakeups: Wakeups = memo.wakeups
    woken = wakeups.register(namespace, name)
    loop = asyncio.get_running_loop()
    try:
        while not stopped:
            woken.clear()
            delay = await loop.run_in_executor(memo.reconcilers, reconcile_once, memo.operator, _plain(body))
            if await _woken(woken, stopped, delay):
                await stopped.wait(COALESCE_SECONDS)
    finally:
        wakeups.forget(namespace, name, woken)


@kopf.on.update(GROUP, VERSION, "modeldeployments", field="spec")
async def spec_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.wakeups.wake(namespace, name)


@kopf.on.delete(GROUP, VERSION, "modeldeployments")
def deleted(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Owner references let the garbage collector remove the pods too; deleting them here
    frees their GPUs without waiting for it."""
    assert namespace is not None, "ModelDeployments are namespaced"
    operator: Operator = memo.operator
    operator.forget(namespace, name)
    operator.metrics.set_workers(namespace, name, None)
    for pod in operator.kube.pods(namespace, f"{m.LABEL_DEPLOYMENT}={name}"):
        operator.kube.delete_pod(namespace, pod["metadata"]["name"])


@kopf.on.event("", "v1", "pods")
async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    pod = event["object"]  # the watch's own decoded JSON, which nothing changes: no copy of a view
    memo.operator.cluster.on_pod(event["type"], pod)
    changed = memo.pods.on_pod(event["type"], pod) if memo.get("pods") is not None else True
    deployment = (body.get("metadata", {}).get("labels") or {}).get(m.LABEL_DEPLOYMENT)
    if deployment and changed:  # not for what the operator wrote itself, nor an address or a container state
        memo.wakeups.wake(body["metadata"]["namespace"], deployment)


@kopf.on.event("", "v1", "services", labels={m.MANAGED_BY: "fleetwise"})
async def service_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A pool's Service deleted (by hand, say) is made again by its deployment's next reconcile."""
    if event["type"] != "DELETED":
        return
    meta = body["metadata"]
    labels = meta.get("labels") or {}
    deployment, role = labels.get(m.LABEL_DEPLOYMENT), labels.get(m.LABEL_ROLE)
    if deployment and role:
        memo.operator.service_deleted(meta["namespace"], deployment, role)
        memo.wakeups.wake(meta["namespace"], deployment)


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if memo.operator.cluster.on_node(event["type"], event["object"]):
        memo.wakeups.wake_all()


# a deleted budget's daemon gets `cancellation_backoff` to lift its caps before kopf cancels it
@kopf.daemon(GROUP, VERSION, "powerbudgets", cancellation_backoff=20.0, cancellation_timeout=10.0)
async def power_loop(stopped: kopf.DaemonStopped, body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    """One control period every `period_seconds`, in a worker thread; an edited budget takes
    effect at the next one (kopf keeps `body` current). A deleted budget's caps are lifted; an
    operator that stops leaves them to lapse to their fallbacks."""
    control: PowerControl | None = memo.get("power")
    if control is None:
        return
    loop = asyncio.get_running_loop()
    while not stopped:
        try:
            await loop.run_in_executor(memo.reconcilers, control.period, _plain(body))
        except Exception:
            log.exception("power loop of PowerBudget %s: the period failed", name)
        if control.prometheus is None:  # the status says so once; there is nothing to watch
            return
        await stopped.wait(control.period_seconds)
    if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
        await loop.run_in_executor(memo.reconcilers, control.deleted, name)


@kopf.on.event(GROUP, VERSION, "powerbudgets")
async def budget_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.cluster.on_budget(event["type"], _plain(body))
    memo.wakeups.wake_all()


@kopf.daemon(GROUP, VERSION, "faultpolicies", cancellation_timeout=10.0)
async def fault_loop(stopped: kopf.DaemonStopped, body: kopf.Body, namespace: str | None, name: str,
                     memo: kopf.Memo, **_: Any) -> None:
    """One window every `windowSeconds`, in a worker thread, the first at once (Prometheus holds
    the window before it); an edited policy takes effect at the next one."""
    control: FaultControl | None = memo.get("faults")
    if control is None:
        return
    assert namespace is not None, "FaultPolicies are namespaced"
    loop = asyncio.get_running_loop()
    try:
        while not stopped:
            try:
                wait = await loop.run_in_executor(memo.reconcilers, control.window, _plain(body))
            except Exception:
                log.exception("fault loop of FaultPolicy %s/%s: the window failed", namespace, name)
                wait = RESYNC_SECONDS
            if wait is None:  # the status says why once; there is nothing to watch
                return
            await stopped.wait(wait)
    finally:  # the detector's memory goes with the daemon (the policy deleted, or the operator stopping)
        control.deleted(namespace, name)
