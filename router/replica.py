"""The router's view of one worker: where it is, what it serves, whether it takes requests
and how many it holds. The router keeps it current (requests, probes, discovery); routing
policies only read it. A policy that keeps an index over replicas (least outstanding, on a
large fleet) may watch a replica: it is told each time the routing state changes."""

from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

ROUTING_STATE = frozenset({"healthy", "routable", "outstanding"})
MAX_HEALTH_BYTES = 64 << 10  # of a worker's /health answer read by a probe


@dataclass(eq=False)
class Replica:
    url: str
    model: str
    role: str                 # prefill | decode | mixed
    healthy: bool = True      # last probe or request succeeded
    routable: bool = True     # the control plane may take a replica out (draining, quarantined)
    outstanding: int = 0      # requests sent and not yet finished
    failures: int = 0         # consecutive failed requests or probes
    avoid: dict[str, float] = field(default_factory=dict)  # a decode replica's prefill peers (URL) -> until when
    kv_versions: tuple[int, ...] = ()  # the KV stream versions its last good probe named (none: an older worker)

    def avoids(self, prefill_url: str, now: float) -> bool:
        """A slow KV link from that prefill replica is being routed around."""
        return self.avoid.get(prefill_url, 0.0) > now

    def watch(self, hook: Callable[["Replica"], None]) -> None:
        """Calls `hook(replica)` after every change of `healthy`, `routable` or `outstanding`.
        Only a watched replica pays for the check on each assignment: it becomes a
        `_Watched` one (the router changes `outstanding` twice per request)."""
        self.__dict__.setdefault("_watchers", []).append(hook)
        if type(self) is Replica:
            self.__class__ = _Watched

    def unwatch(self, hook: Callable[["Replica"], None]) -> None:
        watchers = self.__dict__.get("_watchers", [])
        if hook in watchers:
            watchers.remove(hook)

    @property
    def available(self) -> bool:
        return self.healthy and self.routable

    def reads_kv(self, version: int) -> bool:
        return version in self.kv_versions

    def record(self, ok: bool) -> bool:
        """Counts a request or probe that succeeded or failed; True when the health it
        reports may have changed (a flip, or the first failure in a row)."""
        was = self.healthy
        if ok:
            self.failures = 0
            self.healthy = True
        else:
            self.failures += 1
            self.healthy = False
        return was != self.healthy or self.failures <= 1


class _Watched(Replica):
    """A replica with watchers (`Replica.watch`): each change of its routing state is told."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in ROUTING_STATE:
            for hook in self.__dict__.get("_watchers", ()):
                hook(self)


def last_resort(replicas: list[Replica]) -> Replica | None:
    """When no replica is available: the routable one marked down with the fewest failures in a
    row (then the fewest requests), or None. A burst of failures (a killed peer, a stall) may mark
    every replica down until the next probe; trying one costs a connection, refusing costs the
    request (Envoy's panic threshold: below it, every host is balanced over, healthy or not)."""
    down = [r for r in replicas if r.routable and not r.healthy]
    return min(down, key=lambda r: (r.failures, r.outstanding), default=None)


def kv_versions(health: bytes) -> tuple[int, ...]:
    """The KV stream versions a worker's /health answer names (`kv_stream_versions`); none
    from a worker of a release before them, or from an answer that does not read."""
    try:
        named = orjson.loads(health).get("kv_stream_versions")
    except (orjson.JSONDecodeError, AttributeError):
        return ()
    if not isinstance(named, list) or len(named) > 64:
        return ()
    return tuple(v for v in named if isinstance(v, int) and not isinstance(v, bool))
