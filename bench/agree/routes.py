"""How an agreement run's requests were routed, and how the simulated router is told to route
them: the real router's policy fed what the real one read (each prompt's text, the workers' URLs),
or, as a diagnostic, the real routes replayed."""

from dataclasses import dataclass
from typing import Any

from fleetwise.router.policies import PREFIX_KEYS, make_policy
from fleetwise.router.prefix import PrefixLoad
from fleetwise.router.replica import Replica
from fleetwise.sim import trace

ROUTER_POLICY = PrefixLoad.name   # the router's default: what `fleetwise up` routes with


def request_index(rid: str) -> int | None:
    """agree-I[-suffix] (the client's x-request-id, as the worker saw it) -> I."""
    parts = rid.split("-")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "agree" and parts[1].isdigit() else None


def real_routes(worker_steps: dict[str, list[dict[str, Any]]]) -> dict[int, str]:
    """Which worker served each request (by index), from the steps that made first tokens."""
    return {i: name for name, steps in worker_steps.items() for s in steps for rid, _ in s.get("first", [])
            if (i := request_index(rid)) is not None}


class RecordedRoutes:
    """A routing policy that sends each request where the real router did, known by its
    prefix keys (the engine passes them; random prompts make them unique)."""
    name = "recorded"

    def __init__(self, requests: list[trace.Request], routes: dict[int, str], urls: dict[str, str]) -> None:
        keyer = PREFIX_KEYS[ROUTER_POLICY]
        self.url = {tuple(keyer(r.text)): urls[routes[i]] for i, r in enumerate(requests) if i in routes}

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        url = self.url.get(tuple(keys or ()))
        live = [r for r in replicas if r.available]
        if url is None:   # the trace did not say: the least loaded
            return min(live, key=lambda r: r.outstanding, default=None)
        return next(r for r in replicas if r.url == url)

    def forget(self, url: str) -> None:
        pass


@dataclass(frozen=True)
class Routing:
    """What the simulated router is given: the workers' URLs by name, and optionally the real
    routes to replay (request index -> worker name)."""
    urls: dict[str, str]
    real: dict[int, str]
    replay: bool = False


def policy_at_real_loads(requests: list[trace.Request], measured: list[Any], routes: dict[int, str],
                         urls: dict[str, str]) -> int:
    """For how many requests the router's policy, given each prompt's text, the workers' URLs and
    the loads the client saw when it sent the request (the requests each worker served that were
    sent before and not yet done), chooses the worker the real router chose: the check that the
    simulated router is given everything the real one decides by."""
    policy = make_policy(ROUTER_POLICY)
    replicas = {name: Replica(url, "agree", "mixed") for name, url in sorted(urls.items())}
    url_name = {url: name for name, url in urls.items()}
    alike = 0
    for i, r in enumerate(requests):
        if i not in routes:
            continue
        for name, replica in replicas.items():
            replica.outstanding = sum(1 for j, w in routes.items() if w == name and requests[j].arrival < r.arrival
                                      and measured[j].token_times and measured[j].token_times[-1] > r.arrival)
        chosen = policy.choose(list(replicas.values()), PREFIX_KEYS[ROUTER_POLICY](r.text) if r.text else [])
        alike += chosen is not None and url_name[chosen.url] == routes[i]
    return alike
