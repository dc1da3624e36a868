"""What the operator tells the admin API (incidents, remediation and power actions), sent
from a thread of its own so a control loop only ever appends to a queue.

The queue is bounded (`max_queued`): when it is full the oldest record goes, counted, so
an outage of the admin service or its database costs memory no one chose and never stops
the operator. Records are sent in order, one at a time; a connection error, a timeout, a
5xx, a 429 or a 401/403 (a token being rotated) keeps the record and retries it with
backoff (0.5 s doubling to 30 s), while the outage shows as `fleetwise_operator_admin_api_up`
0 and `fleetwise_operator_admin_outage_seconds` growing. Any other 4xx is a record the API
will never take: dropped, counted, logged. Each record carries an idempotency key, so one
sent again (its answer was lost after the API stored it) is stored once. The token is read from its file
before each send, so a rotated one is picked up."""

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from fleetwise.fleet import ActionRefused, FleetActions, PowerOverride, WorkerRef, WorkerState

from .metrics import OperatorMetrics

log = logging.getLogger(__name__)
RETRY_STATUSES = {401, 403, 408, 429}


@dataclass(frozen=True)
class Record:
    path: str  # under /api/v1
    body: dict[str, Any]


class AdminSink:
    def __init__(self, url: str, token_file: Path, metrics: OperatorMetrics, max_queued: int = 1000,
                 timeout: float = 5.0, min_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self.url, self.token_file, self.metrics = url.rstrip("/"), token_file, metrics
        self.max_queued, self.min_backoff, self.max_backoff = max_queued, min_backoff, max_backoff
        self.client = httpx.Client(timeout=timeout)
        self.queue: deque[Record] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.reachable = True   # False while records cannot be delivered (a condition's, as the metric's 0)
        self.thread = threading.Thread(target=self._run, name="admin-sink", daemon=True)
        metrics.admin_up.set(1)

    def start(self) -> "AdminSink":
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)
        self.client.close()

    @property
    def queued(self) -> int:
        return len(self.queue)

    def send(self, path: str, body: dict[str, Any]) -> None:
        """Queues a record and returns at once."""
        with self.wake:
            if len(self.queue) >= self.max_queued:
                self.queue.popleft()
                self.metrics.admin_dropped.labels("full").inc()
            self.queue.append(Record(path, {**body, "idempotency_key": uuid.uuid4().hex}))
            self.metrics.admin_queued.set(len(self.queue))
            self.wake.notify()

    def incident(self, kind: str, subject_kind: Literal["worker", "node", "link"], subject: str,
                 namespace: str = "", severity: str = "warning", summary: str = "",
                 evidence: list[dict[str, Any]] | None = None) -> None:
        self.send("/incidents", {"kind": kind, "subject_kind": subject_kind, "subject": subject,
                                 "namespace": namespace, "severity": severity, "summary": summary,
                                 "evidence": evidence or []})

    def remediation(self, verb: str, target_kind: Literal["worker", "node", "link"], target: str, namespace: str = "",
                    reason: str = "", outcome: Literal["done", "refused"] = "done") -> None:
        self.send("/actions/remediation", {"verb": verb, "target_kind": target_kind, "target": target,
                                           "namespace": namespace, "reason": reason[:1024], "outcome": outcome})

    def power(self, worker: str, namespace: str, watts: float | None, until: float | None, reason: str) -> None:
        self.send("/actions/power", {"worker": worker, "namespace": namespace, "watts": watts, "until": until,
                                     "reason": reason[:1024]})

    def _post(self, record: Record) -> Literal["sent", "retry", "rejected"]:
        try:
            token = self.token_file.read_text().strip()
            r = self.client.post(f"{self.url}/api/v1{record.path}", json=record.body,
                                 headers={"authorization": f"Bearer {token}"})
        except (OSError, httpx.HTTPError) as e:
            log.debug("admin API unreachable: %s", e)
            return "retry"
        if r.status_code < 300:
            return "sent"
        if r.status_code >= 500 or r.status_code in RETRY_STATUSES:
            log.debug("admin API answered %s: %s", r.status_code, r.text[:200])
            return "retry"
        log.warning("the admin API refused a record (%s %s): %s", r.status_code, record.path, r.text[:500])
        return "rejected"

    def _run(self) -> None:
        backoff, down_since = self.min_backoff, None
        while True:
            with self.wake:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                record = self.queue[0]
            result = self._post(record)
            now = time.monotonic()
            if down_since is not None:
                self.metrics.admin_outage.inc(now - down_since)
                down_since = now if result == "retry" else None
            if result == "retry":
                if down_since is None:
                    down_since = now
                    log.warning("the admin API is unreachable; %d records queued, retrying", len(self.queue))
                self.metrics.admin_up.set(0)
                self.reachable = False
                with self.wake:
                    self.wake.wait_for(lambda: self.stopping, backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            self.metrics.admin_up.set(1)
            self.reachable = True
            if result == "sent":
                self.metrics.admin_sent.inc()
            else:
                self.metrics.admin_dropped.labels("rejected").inc()
            with self.wake:
                if self.queue and self.queue[0] is record:  # unless a full queue already let it go
                    self.queue.popleft()
                self.metrics.admin_queued.set(len(self.queue))


class ReportingFleet:
    """`FleetActions` that also tell the admin API what the operator did: the verbs of the
    fleet it wraps, each sent as a remediation or power record (refused ones too)."""

    def __init__(self, fleet: FleetActions, sink: AdminSink) -> None:
        self.fleet, self.sink = fleet, sink
        self.caps: dict[tuple[str, str], float | None] = {}  # the last cap reported per worker

    def _do(self, verb: str, kind: Literal["worker", "node", "link"], target: str, namespace: str, reason: str,
            *args: Any) -> None:
        try:
            getattr(self.fleet, verb)(*args)
        except ActionRefused:
            self.sink.remediation(verb, kind, target, namespace, reason, "refused")
            raise
        self.sink.remediation(verb, kind, target, namespace, reason)

    def state(self, worker: WorkerRef) -> WorkerState:
        return self.fleet.state(worker)

    def quarantine(self, worker: WorkerRef, reason: str) -> None:
        self._do("quarantine", "worker", worker.name, worker.namespace, reason, worker, reason)

    def restore(self, worker: WorkerRef, reason: str) -> None:
        self._do("restore", "worker", worker.name, worker.namespace, reason, worker, reason)

    def drain(self, worker: WorkerRef, reason: str) -> None:
        self._do("drain", "worker", worker.name, worker.namespace, reason, worker, reason)

    def restart(self, worker: WorkerRef, reason: str) -> None:
        self._do("restart", "worker", worker.name, worker.namespace, reason, worker, reason)

    def cordon(self, node: str, reason: str) -> None:
        self._do("cordon", "node", node, "", reason, node, reason)

    def uncordon(self, node: str, reason: str) -> None:
        self._do("uncordon", "node", node, "", reason, node, reason)

    def avoid_link(self, prefill: WorkerRef, decode: WorkerRef, reason: str, until: float | None) -> None:
        self._do("avoid_link", "link", f"{prefill.name}->{decode.name}", decode.namespace, reason,
                 prefill, decode, reason, until)

    def cap_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str,
                  fallback_watts: float | None = None) -> None:
        """Reported when the cap changes, not at each renewal of the same cap (every period)."""
        self.fleet.cap_power(worker, watts, until, reason, fallback_watts)
        key = (worker.namespace, worker.name)
        if key not in self.caps and watts is None:
            return  # lifting a cap this operator never reported: nothing changed for the record
        if self.caps.get(key, -1.0) != watts:
            self.caps[key] = watts
            self.sink.power(worker.name, worker.namespace, watts, until if watts is not None else None, reason)

    def override_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str) -> None:
        """Not reported: overrides are a person's, set through the admin API, which records them."""
        self.fleet.override_power(worker, watts, until, reason)

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        return self.fleet.power_override(worker)
