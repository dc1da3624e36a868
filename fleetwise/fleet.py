"""Acting on workers and nodes, one interface for every place fleetwise runs.

Power capping, fault remediation, the admin API and request migration all quarantine,
drain and restart workers and cordon nodes; they do it through `FleetActions`, which the
operator implements on Kubernetes (`operator/actions.py`) and `fleetwise up` on local
processes (`fleetwise/local_fleet.py`). Each worker is in exactly one `Routability` state,
recorded with why and since when, wherever the implementation keeps it.
A person's power-cap override (the admin API's) is a verb too: the power controller applies
it instead of its own decision for that worker until it lapses. The controller's own caps go
through `cap_power`: a cap until a time, renewed each control period, falling back to a
conservative value if it is not (the worker's `/internal/power` enforces that).
A slow KV link between two workers is routed around with `avoid_link`: the router pairs the
decode worker with any prefill worker but that one until the avoidance lapses, and both stay
routable for everything else. Avoidances are kept on the decode side, as a mapping from the
prefill peer (its URL in the router's file, its pod name on the decode pod's
`fleetwise.dev/avoid-prefill` annotation) to `{until, reason}`; a lapsed one is read as none.
"""

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import httpx

from fleetwise.protocol import AUTH_HEADER, POWER_PATH, PROTOCOL_VERSION, VERSION_HEADER, PowerCapRequest, bearer


class Routability(StrEnum):
    SERVING = "serving"          # the router sends it requests
    DRAINING = "draining"        # no new requests; removed once idle or after the drain timeout
    QUARANTINED = "quarantined"  # no new requests; kept running for inspection until restored or restarted


@dataclass(frozen=True)
class WorkerState:
    state: Routability
    reason: str = ""
    since: float = 0.0  # seconds since the epoch; 0 when never recorded


@dataclass(frozen=True)
class WorkerRef:
    """How a caller names a worker: a pod (name, namespace) or a local process (name, group
    "local"); node and url as the caller knows them."""
    name: str
    namespace: str = "local"
    node: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class PowerOverride:
    """A cap pinned by a person: `watts` per GPU until `until` (seconds since the epoch)."""
    watts: float
    until: float
    reason: str = ""

    def active(self, now: float) -> bool:
        return now < self.until


ANNOTATION_AVOID_PREFILL = "fleetwise.dev/avoid-prefill"
MAX_AVOIDED = 64  # prefill peers one decode worker avoids at most


@dataclass(frozen=True)
class Avoidance:
    """A prefill peer the decode worker is not paired with until `until` (seconds since the epoch)."""
    until: float
    reason: str = ""


def read_avoidances(data: object, now: float) -> dict[str, Avoidance]:
    """`{peer: {until, reason}}` as the router's file or the annotation holds it, lapsed ones
    left out. Raises ValueError naming what is wrong."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("avoid: a mapping from each avoided prefill peer to {until, reason}")
    if len(data) > MAX_AVOIDED:
        raise ValueError(f"avoid: at most {MAX_AVOIDED} peers; got {len(data)}")
    out = {}
    for peer, entry in data.items():
        if not isinstance(peer, str) or not peer or not isinstance(entry, dict):
            raise ValueError(f"avoid.{peer}: a peer name mapped to {{until, reason}}")
        until, reason = entry.get("until"), entry.get("reason", "")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not isinstance(reason, str):
            raise ValueError(f"avoid.{peer}: until is seconds since the epoch, reason a string")
        if until > now:
            out[peer] = Avoidance(float(until), reason)
    return out


def read_avoidance_annotation(value: str | None, now: float) -> dict[str, Avoidance]:
    """The decode pod's `fleetwise.dev/avoid-prefill` annotation (JSON); ValueError when malformed."""
    return read_avoidances(json.loads(value), now) if value else {}


def with_avoidance(current: dict[str, Avoidance], peer: str, until: float | None, reason: str,
                   now: float) -> dict[str, Avoidance]:
    """The avoidances after avoiding `peer` until `until` (None: lifted), lapsed ones dropped."""
    kept = {p: a for p, a in current.items() if a.until > now and p != peer}
    if until is not None and until > now:
        kept[peer] = Avoidance(until, reason[:256])
    return kept


def dump_avoidances(current: dict[str, Avoidance], now: float) -> dict[str, object]:
    """What `read_avoidances` reads: the avoidances in force, the `MAX_AVOIDED` lasting longest."""
    newest = sorted(((p, a) for p, a in current.items() if a.until > now), key=lambda kv: kv[1].until)
    return {p: {"until": a.until, "reason": a.reason} for p, a in newest[-MAX_AVOIDED:]}


class ActionRefused(Exception):
    """The action cannot be done here; the message says why."""


class FleetActions(Protocol):
    def state(self, worker: WorkerRef) -> WorkerState: ...

    def quarantine(self, worker: WorkerRef, reason: str) -> None:
        """Out of routing; the process keeps running for inspection."""
        ...

    def restore(self, worker: WorkerRef, reason: str) -> None:
        """Back to serving."""
        ...

    def drain(self, worker: WorkerRef, reason: str) -> None:
        """Out of routing; removed once it holds no request, or after the drain timeout."""
        ...

    def restart(self, worker: WorkerRef, reason: str) -> None: ...

    def avoid_link(self, prefill: WorkerRef, decode: WorkerRef, reason: str, until: float | None) -> None:
        """The router pairs `decode` with any prefill worker but `prefill` until `until`
        (seconds since the epoch; None lifts it); both stay routable for everything else."""
        ...

    def cordon(self, node: str, reason: str) -> None:
        """Nothing new is placed on the node; what runs there stays."""
        ...

    def uncordon(self, node: str, reason: str) -> None: ...

    def override_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str) -> None:
        """Pin the worker's power cap to `watts` until `until`; `watts=None` clears the override."""
        ...

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        """The override in force for the worker, if any (a lapsed one reads as None)."""
        ...

    def cap_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str,
                  fallback_watts: float | None = None) -> None:
        """Hold the worker's GPU power limit at `watts` per GPU (None: lift it) until `until`
        (seconds since the epoch), then `fallback_watts` (None: lifted) unless renewed."""
        ...


def send_power_cap(internal_url: str, token: str, watts: float | None, until: float, reason: str,
                   fallback_watts: float | None = None, timeout: float = 5.0) -> dict:
    """`POST /internal/power` on a worker; the time to live from `until` on this clock (the
    worker counts it on its own). Raises ActionRefused with the worker's answer."""
    ttl = min(3600.0, max(1.0, until - time.time()))
    body = PowerCapRequest(watts=watts, ttl_seconds=ttl, fallback_watts=fallback_watts, reason=reason[:1024])
    try:
        r = httpx.post(internal_url.rstrip("/") + POWER_PATH, json=body.model_dump(), timeout=timeout,
                       headers={AUTH_HEADER: bearer(token), VERSION_HEADER: str(PROTOCOL_VERSION)})
    except httpx.HTTPError as e:
        raise ActionRefused(f"cap_power: {internal_url} unreachable: {type(e).__name__}: {e}") from e
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise ActionRefused(f"cap_power: {internal_url} answered {r.status_code}: {message}")
    return r.json()
