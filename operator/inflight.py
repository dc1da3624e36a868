"""How many requests a draining worker still holds, so that a drained pod is deleted once it
is idle and not before (Kubernetes' own drains wait the same way, for a pod's preStop and
grace period). The router has stopped sending it new requests; its /health says how many it
is running and how many wait, and how much KV it holds for other workers to pull (a
drained stream's, moved with its KV). Unknown (None) when the worker cannot be asked: the
drain then runs to its timeout, since an operator cut off from a worker cannot tell an
idle one from a busy one. The same answer says how many running sequences it handed over
with their KV (`kv_exported`), which the drain's Event on the pod reports."""

import httpx

from fleetwise.addresses import load_address_map, worker_url


def _health(pod: dict, address_map: dict | None, timeout: float) -> dict | None:
    url = worker_url(pod, load_address_map() if address_map is None else address_map)
    if url is None:
        return None
    try:
        health = httpx.get(url + "/health", timeout=timeout).json()
    except (httpx.HTTPError, ValueError):
        return None
    return health if isinstance(health, dict) else None


def in_flight(pod: dict, address_map: dict | None = None, timeout: float = 1.0) -> int | None:
    """`address_map`: the one in force (default: read it now)."""
    health = _health(pod, address_map, timeout)
    if health is None:
        return None
    try:
        return int(health["running"]) + int(health["waiting"]) + int(health.get("kv_leases", 0))
    except (KeyError, TypeError, ValueError):
        return None


def exported(pod: dict, address_map: dict | None = None, timeout: float = 1.0) -> int | None:
    """The running sequences the worker handed to other workers with their KV, or None."""
    health = _health(pod, address_map, timeout)
    value = health.get("kv_exported") if health is not None else None
    return value if isinstance(value, int) else None
