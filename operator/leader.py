"""Leader election on a coordination.k8s.io Lease: of several operator replicas, one acts.

A replica acts only while it holds the lease; if it cannot renew before the lease runs out
it exits at once rather than risk acting beside a new leader (its pod restarts and waits).
While it waits, it answers its liveness probe (`StandbyLiveness`): a standby is alive, and a
probe that killed it would restart it in a loop and slow the failover it is there for.

Why not kopf's peering or the client's `kubernetes.leaderelection`: kopf's peering needs its own
cluster-wide resource and pauses a second operator rather than fencing it, and the client's
elector keeps running the leader's work for a while after a failed renew; here a replica that
cannot renew in time exits before the lease could pass to another.
"""

import datetime as dt
import http.server
import logging
import os
import socket
import threading
import time
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StandbyLiveness:
    """Answers GET /healthz with 200 on `port` while this replica waits for the lease; the
    leader's liveness endpoint (kopf's) takes the port over once it leads."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b'{"status": "standby"}' if self.path == "/healthz" else b'{"status": "not found"}'
                self.send_response(200 if self.path == "/healthz" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # a probe every few seconds: no log line
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="standby-liveness", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str = "fleetwise-operator",
                 identity: str | None = None, lease_seconds: int = 15, renew_every: float = 5.0) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.lease_seconds, self.renew_every = lease_seconds, renew_every
        self._stop = threading.Event()

    def _spec(self, acquire: bool, transitions: int) -> dict[str, Any]:
        now = _now()
        spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                                "renewTime": now.isoformat(), "leaseTransitions": transitions}
        if acquire:
            spec["acquireTime"] = now.isoformat()
        return spec

    def try_acquire(self) -> bool:
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(True, 0)}
            try:
                # the client takes a plain dict for its model
                self.coord.create_namespaced_lease(self.namespace, body)  # type: ignore[arg-type]
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()  # a lease without a spec is held by no one
        assert lease.metadata is not None  # the API server always returns it
        held_by_other = spec.holder_identity and spec.holder_identity != self.identity
        renew = spec.renew_time
        duration = spec.lease_duration_seconds or self.lease_seconds
        expired = renew is None or (_now() - renew).total_seconds() > duration
        if held_by_other and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (1 if held_by_other else 0)
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(held_by_other or not spec.acquire_time, transitions)}
        try:
            # the client takes a plain dict for its model
            self.coord.replace_namespaced_lease(self.name, self.namespace, body)  # type: ignore[arg-type]
            return True
        except ApiException as e:
            if e.status == 409:  # someone else renewed or took it first
                return False
            raise

    def acquire(self) -> None:
        """Blocks until this replica leads, then keeps renewing in the background."""
        while not self._try_or_wait():
            log.info("waiting for the lease %s/%s", self.namespace, self.name)
            time.sleep(self.renew_every)
        log.info("leading as %s", self.identity)
        threading.Thread(target=self._renew_forever, name="lease-renewer", daemon=True).start()

    def _try_or_wait(self) -> bool:
        """One try while not leading; an API server that is overloaded or away (5xx, no answer)
        is a reason to wait, not to exit: nothing is held yet."""
        try:
            return self.try_acquire()
        except ApiException as e:
            if e.status is not None and e.status < 500:
                raise
            log.warning("the lease could not be read (%s); retrying", e.status)
        except (OSError, urllib3.exceptions.HTTPError) as e:
            log.warning("the lease could not be read (%s); retrying", e)
        return False

    def _renew_forever(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.renew_every):
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
                log.error("lost the lease to another replica; exiting")
            except Exception:  # network trouble: retry until the lease would have run out
                log.exception("lease renewal failed")
                if time.monotonic() - last < self.lease_seconds - self.renew_every:
                    continue
            os._exit(1)

    def release(self) -> None:
        self._stop.set()
