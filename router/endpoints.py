"""Where the router finds replicas: behind one interface, a static file (reloaded when it
changes) and, with the operator, Kubernetes discovery.

In the static file each replica is the URL of a worker's internal listener (its
`--internal-port`, where the router's calls go with the shared token; not the public
`--port`), or a mapping that also says whether the router may send it requests (`fleetwise
up` takes a worker out of routing this way):

    models:
      - name: tiny
        mixed:
          - http://127.0.0.1:9001
          - {url: http://127.0.0.1:9002, routable: false, state: quarantined, reason: "p99 3x its peers"}

`state` is one of fleetwise.fleet.Routability; `routable` follows from it when left out.
A decode replica's `avoid` maps prefill replicas' URLs to `{until, reason}`: slow KV links the
router routes around until then (`fleetwise.fleet.avoid_link`; the handoff pairs around them).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from fleetwise.fleet import Routability, read_avoidances

from .replica import Replica

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "mixed")


@dataclass
class ModelRoute:
    name: str
    replicas: dict[str, list[Replica]] = field(default_factory=lambda: {r: [] for r in ROLES})

    @property
    def mode(self) -> str:
        """Disaggregated when it has both prefill and decode replicas, else colocated."""
        return "disaggregated" if self.replicas["prefill"] and self.replicas["decode"] else "colocated"

    def all(self) -> list[Replica]:
        return [r for role in ROLES for r in self.replicas[role]]


class EndpointSource(Protocol):
    def models(self) -> dict[str, ModelRoute]: ...

    def refresh(self) -> list[str]:
        """Re-reads the source; returns the URLs of replicas that are gone."""
        ...


class ConfigError(ValueError):
    pass


REPLICA_KEYS = ("url", "routable", "state", "reason", "avoid")


def _url(u: object) -> bool:
    return isinstance(u, str) and u.startswith(("http://", "https://"))


def parse_replica(entry: object, where: str, model: str, role: str) -> Replica:
    """A URL, or {url, routable, state, reason, avoid} (only url required)."""
    if isinstance(entry, str):
        if not _url(entry):
            raise ConfigError(f"{where}: {entry!r} is not an http(s) URL")
        return Replica(entry.rstrip("/"), model, role)
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a replica is a URL or a mapping with a url")
    unknown = set(entry) - set(REPLICA_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(REPLICA_KEYS)}")
    if not _url(entry.get("url")):
        raise ConfigError(f"{where}.url must be an http(s) URL")
    state, routable = entry.get("state"), entry.get("routable")
    if state is not None and state not in tuple(Routability):
        raise ConfigError(f"{where}.state {state!r} is not one of {', '.join(Routability)}")
    if routable is not None and not isinstance(routable, bool):
        raise ConfigError(f"{where}.routable must be true or false")
    if not isinstance(entry.get("reason", ""), str):
        raise ConfigError(f"{where}.reason must be a string")
    follows = state is None or state == Routability.SERVING
    if routable is not None and state is not None and routable != follows:
        raise ConfigError(f"{where}: routable: {str(routable).lower()} contradicts state: {state}")
    try:
        avoid = read_avoidances(entry.get("avoid"), time.time())
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None
    if avoid and role != "decode":
        raise ConfigError(f"{where}.avoid: only a decode replica avoids prefill peers")
    return Replica(entry["url"].rstrip("/"), model, role, routable=follows if routable is None else routable,
                   avoid={peer.rstrip("/"): a.until for peer, a in avoid.items()})


def parse_config(data) -> dict[str, ModelRoute]:
    """models: [{name, prefill: [replicas], decode: [replicas], mixed: [replicas]}, ...];
    a replica is a URL or a mapping (see the module's docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError("the router config needs a 'models' list")
    routes: dict[str, ModelRoute] = {}
    for i, m in enumerate(data["models"]):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise ConfigError(f"models[{i}] needs a name")
        unknown = set(m) - {"name", *ROLES}
        if unknown:
            raise ConfigError(f"models[{i}] ({m['name']}): unknown keys {sorted(unknown)}; "
                              f"allowed: name, {', '.join(ROLES)}")
        if m["name"] in routes:
            raise ConfigError(f"model {m['name']!r} is listed twice")
        route = ModelRoute(m["name"])
        for role in ROLES:
            entries = m.get(role) or []
            if not isinstance(entries, list):
                raise ConfigError(f"models[{i}].{role} must be a list of replicas (URLs or mappings with a url)")
            route.replicas[role] = [parse_replica(e, f"models[{i}].{role}[{j}]", m["name"], role)
                                    for j, e in enumerate(entries)]
        if bool(route.replicas["prefill"]) != bool(route.replicas["decode"]):
            raise ConfigError(f"model {m['name']!r}: prefill and decode replicas come together")
        if not route.all():
            raise ConfigError(f"model {m['name']!r} has no replicas")
        routes[m["name"]] = route
    return routes


class StaticEndpoints:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mtime: int | None = None
        self._routes: dict[str, ModelRoute] = {}
        self.refresh()
        if not self._routes:
            raise ConfigError(f"{self.path}: no models")

    def models(self) -> dict[str, ModelRoute]:
        return self._routes

    def refresh(self) -> list[str]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._mtime is None:
                raise ConfigError(f"router config {self.path} not found")
            return []
        if mtime == self._mtime:
            return []
        try:
            new = parse_config(yaml.safe_load(self.path.read_text()))
        except (yaml.YAMLError, ConfigError) as e:
            if self._mtime is None:
                raise ConfigError(f"{self.path}: {e}")
            log.error("keeping the previous endpoints: %s: %s", self.path, e)
            return []
        self._mtime = mtime
        gone = swap_routes(self._routes, new)
        self._routes = new
        return gone


def swap_routes(old_routes: dict[str, ModelRoute], new: dict[str, ModelRoute]) -> list[str]:
    """Carries the state (outstanding, health) of replicas that stay into `new`, with the
    routability `new` says; returns the URLs of those that left."""
    old = {(r.model, r.role, r.url): r for route in old_routes.values() for r in route.all()}
    for route in new.values():
        for role in ROLES:
            route.replicas[role] = [_carry(old.get((r.model, r.role, r.url)), r) for r in route.replicas[role]]
    kept = {(r.model, r.role, r.url) for route in new.values() for r in route.all()}
    return sorted({url for (model, role, url) in old if (model, role, url) not in kept})


def _carry(old: Replica | None, new: Replica) -> Replica:
    if old is None:
        return new
    old.routable = new.routable
    old.avoid = new.avoid
    return old
