"""What the admin API reads about the fleet, through one small interface (`FleetView`),
so its routes are the same under `fleetwise up` and in a cluster (where the power domains
are; one machine has none). Acting goes through
`FleetActions` (`fleetwise/fleet.py`), never through a view: there is one way to
quarantine. `LocalView` reads `fleetwise up`'s `LocalFleet`; `admin/kube_view.py` reads
worker pods and nodes from Kubernetes."""

import time
from dataclasses import dataclass
from typing import Protocol

from fleetwise.fleet import PowerOverride, WorkerRef, WorkerState
from fleetwise.local_fleet import LocalFleet


@dataclass(frozen=True)
class WorkerInfo:
    ref: WorkerRef
    role: str
    model: str
    deployment: str
    health: str
    state: WorkerState
    power_override: PowerOverride | None


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ready: bool
    cordoned: bool
    reason: str = ""


@dataclass(frozen=True)
class PowerDomainInfo:
    """A PowerBudget's domain: its budget, its nodes and what its GPUs draw now. `measured_watts`
    is None when there is no reading (no Prometheus, no series): never 0."""
    name: str
    limit_watts: float
    oversubscription: float
    nodes: list[str]
    measured_watts: float | None
    gpus_measured: int
    measured_age_seconds: float | None


class FleetView(Protocol):
    def workers(self) -> list[WorkerInfo]: ...

    def worker(self, namespace: str, name: str) -> WorkerInfo | None: ...

    def nodes(self) -> list[NodeInfo]: ...

    def power_domains(self) -> list[PowerDomainInfo]: ...


class LocalView:
    """`fleetwise up`'s processes; its health is the last /health answer `fleetwise up`
    polled (`unknown` until the first), and there are no nodes."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet

    def workers(self) -> list[WorkerInfo]:
        return [self._info(name) for name in self.fleet.workers]

    def worker(self, namespace: str, name: str) -> WorkerInfo | None:
        return self._info(name) if namespace == "local" and name in self.fleet.workers else None

    def nodes(self) -> list[NodeInfo]:
        return []

    def power_domains(self) -> list[PowerDomainInfo]:
        return []  # one machine: no PowerBudget

    def _info(self, name: str) -> WorkerInfo:
        w = self.fleet.workers[name]
        ref = WorkerRef(name, "local", url=w.url)
        if w.exited is not None:
            health = f"exited ({w.exited})"
        else:
            health = str(w.health.get("status") or ("unknown" if w.running else "stopped"))
        override = self.fleet.overrides.get(name)
        return WorkerInfo(ref, w.role, self.fleet.model, "local", health, self.fleet.states[name],
                          override if override is not None and override.active(time.time()) else None)
