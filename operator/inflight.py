"""How many requests a draining worker still holds, so that a drained pod is deleted once it
is idle and not before (Kubernetes' own drains wait the same way, for a pod's preStop and
grace period). The router has stopped sending it new requests; its /health says how many it
is running and how many wait. Unknown (None) when the worker cannot be asked: the drain then
runs to its timeout, since an operator cut off from a worker cannot tell an idle one from a
busy one."""

import httpx

from fleetwise.addresses import load_address_map, worker_url


def in_flight(pod: dict, address_map: dict | None = None, timeout: float = 1.0) -> int | None:
    """`address_map`: the one in force (default: read it now)."""
    url = worker_url(pod, load_address_map() if address_map is None else address_map)
    if url is None:
        return None
    try:
        r = httpx.get(url + "/health", timeout=timeout)
        health = r.json()
        return int(health["running"]) + int(health["waiting"]) + int(health.get("kv_leases", 0))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
