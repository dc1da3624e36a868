"""Where the router finds replicas: behind one interface, a static file (reloaded when it
changes) and, with the operator, Kubernetes discovery."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

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


def parse_config(data) -> dict[str, ModelRoute]:
    """models: [{name, prefill: [urls], decode: [urls], mixed: [urls]}, ...]"""
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
            urls = m.get(role) or []
            if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                     for u in urls):
                raise ConfigError(f"models[{i}].{role} must be a list of http(s) URLs")
            route.replicas[role] = [Replica(u.rstrip("/"), m["name"], role) for u in urls]
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
    """Carries the state (outstanding, health) of replicas that stay into `new`; returns
    the URLs of those that left."""
    old = {(r.model, r.role, r.url): r for route in old_routes.values() for r in route.all()}
    for route in new.values():
        for role in ROLES:
            route.replicas[role] = [old.get((r.model, r.role, r.url), r) for r in route.replicas[role]]
    kept = {(r.model, r.role, r.url) for route in new.values() for r in route.all()}
    return sorted({url for (model, role, url) in old if (model, role, url) not in kept})
