"""Acting on workers and nodes, one interface for every place fleetwise runs.

Power capping, fault remediation, the admin API and request migration all quarantine,
drain and restart workers and cordon nodes; they do it through `FleetActions`, which the
operator implements on Kubernetes (`operator/actions.py`) and `fleetwise up` on local
processes (`fleetwise/local_fleet.py`). Each worker is in exactly one `Routability` state,
recorded with why and since when, wherever the implementation keeps it.
Power caps are not a verb yet: the workers have no power interface, the power work adds it.
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
