"""Acting on workers and nodes, one interface for every place fleetwise runs.

Power capping, fault remediation, the admin API and request migration all quarantine,
drain and restart workers and cordon nodes; they do it through `FleetActions`, which the
operator implements on Kubernetes (`operator/actions.py`) and `fleetwise up` on local
processes (`fleetwise/local_fleet.py`). Each worker is in exactly one `Routability` state,
recorded with why and since when, wherever the implementation keeps it.
A person's power-cap override (the admin API's) is a verb too: the power controller applies
it instead of its own decision for that worker until it lapses.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


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
