"""Where a worker pod answers: its pod IP and one of its two ports, or, where pod IPs cannot
be reached (the test control plane's kwok pods), the URLs an address map gives it.

A worker listens twice (ARCHITECTURE.md, "Worker HTTP API"): the public port (the OpenAI
API, /health for the kubelet and the operator's drains) and the internal port (/internal/*
and the completion routes, with the shared token: the router's and the other workers' way
in). The map is a JSON file of {"namespace/pod": {"url": "http://host:port", "internal":
"http://host:port"}} (a bare string is the public URL alone), named by
`FLEETWISE_ADDRESS_MAP` and read at each use. A map that names any pod names every pod with a
worker: the others have no address, since where pod IPs cannot be reached they lead nowhere, or
to whatever else answers there. The router's Kubernetes discovery (internal URLs) and the
operator's drains (public URLs) both find workers this way."""

import json
import logging
import os

WORKER_PORT = 8000           # public
WORKER_INTERNAL_PORT = 9000  # internal: only the router's pods and other workers reach it (the chart's NetworkPolicy)
ADDRESS_MAP_ENV = "FLEETWISE_ADDRESS_MAP"
AddressMap = dict[str, str | dict]

log = logging.getLogger(__name__)


def load_address_map(path: str | None = None) -> AddressMap:
    """The map at `path` (default: the environment's); empty when there is none or it cannot be read."""
    path = path or os.environ.get(ADDRESS_MAP_ENV)
    if not path:
        return {}
    try:
        with open(path) as f:
            mapping = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.error("address map %s unreadable: %s", path, e)
        return {}
    return mapping if isinstance(mapping, dict) else {}


def worker_url(pod: dict, address_map: AddressMap, internal: bool = False) -> str | None:
    """The base URL of the worker in `pod` on its public port (`internal`: its internal
    port), or None while it has no IP (or the map, when there is one, names no such URL for it)."""
    meta, status = pod["metadata"], pod.get("status") or {}
    if address_map:
        mapped = address_map.get(f"{meta['namespace']}/{meta['name']}")
        if isinstance(mapped, dict):
            mapped = mapped.get("internal" if internal else "url")
        elif internal:  # a bare string is the public URL alone
            mapped = None
        return mapped.rstrip("/") if isinstance(mapped, str) and mapped else None
    ip = status.get("podIP")
    return f"http://{ip}:{WORKER_INTERNAL_PORT if internal else WORKER_PORT}" if ip else None
