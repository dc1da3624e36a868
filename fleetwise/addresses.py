"""Where a worker pod answers: its pod IP and the worker port, or, where pod IPs cannot be
reached (the test control plane's kwok pods), the URL an address map gives it. The map is a
JSON file of {"namespace/pod": "http://host:port"}, named by `FLEETWISE_ADDRESS_MAP` and read
at each use. The router's Kubernetes discovery and the operator's drains both find workers
this way."""

import json
import logging
import os

WORKER_PORT = 8000
ADDRESS_MAP_ENV = "FLEETWISE_ADDRESS_MAP"

log = logging.getLogger(__name__)


def load_address_map(path: str | None = None) -> dict[str, str]:
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


def worker_url(pod: dict, address_map: dict[str, str]) -> str | None:
    """The base URL of the worker in `pod`, or None while it has no IP."""
    meta, status = pod["metadata"], pod.get("status") or {}
    mapped = address_map.get(f"{meta['namespace']}/{meta['name']}")
    if mapped:
        return mapped.rstrip("/")
    ip = status.get("podIP")
    return f"http://{ip}:{WORKER_PORT}" if ip else None
