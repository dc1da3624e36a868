"""Routing policies (pure): who gets a request, never a replica that is down or gone."""

import random

import pytest

from fleetwise.router.policies import LeastOutstanding, PrefixAffinity, RoundRobin, make_policy, prefix_keys
from fleetwise.router.replica import Replica


def replicas(n=4):
    return [Replica(f"http://w{i}", "m", "mixed") for i in range(n)]


def test_round_robin_cycles_over_available_replicas():
    rs = replicas(3)
    rs[1].healthy = False
    p = RoundRobin()
    picks = [p.choose(rs).url for _ in range(6)]
    assert set(picks) == {"http://w0", "http://w2"}
    assert picks[0] != picks[1]
    rs[0].routable = rs[2].healthy = False
    assert p.choose(rs) is None


def test_least_outstanding_prefers_the_idle_replica():
    rs = replicas(3)
    rs[0].outstanding, rs[1].outstanding, rs[2].outstanding = 5, 1, 3
    assert LeastOutstanding().choose(rs) is rs[1]
    rs[1].healthy = False
    assert LeastOutstanding().choose(rs) is rs[2]


def test_prefix_keys_share_exactly_the_common_prefix():
    a = prefix_keys("x" * 200 + "tail one", step=64)
    b = prefix_keys("x" * 200 + "other tail", step=64)
    assert a[:3] == b[:3] and a[3] != b[3]
    assert prefix_keys("", step=64) == []
    assert len(prefix_keys("y" * 10_000, step=64, max_chunks=8)) == 8


def test_prefix_affinity_keeps_a_prefix_on_one_replica_and_spreads_others():
    rs = replicas(4)
    p = PrefixAffinity()
    system = "you are a helpful assistant. " * 10
    first = p.choose(rs, prefix_keys(system + "question 1"))
    for i in range(2, 20):
        assert p.choose(rs, prefix_keys(system + f"question {i}")) is first
    rng = random.Random(0)
    spread = {p.choose(rs, prefix_keys(f"{rng.random()} unrelated prompt")).url for _ in range(200)}
    assert spread == {r.url for r in rs}


def test_prefix_affinity_does_not_overload_one_replica():
    rs = replicas(4)
    p = PrefixAffinity(load_factor=1.25, slack=2)
    keys = prefix_keys("shared prefix " * 20)
    home = p.choose(rs, keys)
    home.outstanding = 10  # mean 2.5 -> bound 5.1: the home replica is over it
    other = p.choose(rs, keys)
    assert other is not home and other.outstanding == 0
    home.outstanding = 0
    assert p.choose(rs, keys) is other  # the prefix now lives where it went last


def test_prefix_affinity_never_routes_to_a_replica_that_is_gone():
    rs = replicas(3)
    p = PrefixAffinity()
    keys = prefix_keys("sticky " * 30)
    home = p.choose(rs, keys)
    home.healthy = False
    assert p.choose(rs, keys) is not home
    p.forget(home.url)
    assert home.url not in p.table.values()
    remaining = [r for r in rs if r is not home]
    assert p.choose(remaining, keys) in remaining


def test_unknown_policy_is_refused():
    import pytest
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random_walk")


def test_kubernetes_discovery_takes_only_pods_a_model_deployment_owns_in_its_namespaces():
    from fleetwise.router.kube_source import routes_from_pods

    def pod(name: str, namespace: str = "models", owner: str | None = "ModelDeployment") -> dict:
        refs = [{"apiVersion": "fleetwise.dev/v1alpha1", "kind": owner, "name": "m", "uid": "u",
                 "controller": True}] if owner else []
        return {"metadata": {"name": name, "namespace": namespace, "ownerReferences": refs,
                             "labels": {"fleetwise.dev/model": "m", "fleetwise.dev/role": "mixed",
                                        "fleetwise.dev/routable": "true"}},
                "status": {"podIP": f"10.0.0.{len(name)}", "conditions": [{"type": "Ready", "status": "True"}]}}

    pods = [pod("owned"), pod("labels-only", owner=None), pod("replicaset-owned", owner="ReplicaSet"),
            pod("elsewhere", namespace="other")]
    urls = {r.url for r in routes_from_pods(pods, {})["m"].replicas["mixed"]}
    assert urls == {"http://10.0.0.5:9000", "http://10.0.0.9:9000"}  # owned, elsewhere (all namespaces)
    urls = {r.url for r in routes_from_pods(pods, {}, namespaces={"models"})["m"].replicas["mixed"]}
    assert urls == {"http://10.0.0.5:9000"}


def test_discovery_sends_to_the_internal_port_and_drains_ask_the_public_one():
    from fleetwise.addresses import WORKER_INTERNAL_PORT, WORKER_PORT, worker_url
    pod = {"metadata": {"name": "w", "namespace": "models"}, "status": {"podIP": "10.0.0.7"}}
    assert worker_url(pod, {}) == f"http://10.0.0.7:{WORKER_PORT}"
    assert worker_url(pod, {}, internal=True) == f"http://10.0.0.7:{WORKER_INTERNAL_PORT}"
    both = {"models/w": {"url": "http://127.0.0.1:1/", "internal": "http://127.0.0.1:2"}}
    assert worker_url(pod, both) == "http://127.0.0.1:1"
    assert worker_url(pod, both, internal=True) == "http://127.0.0.1:2"
    public_only = {"models/w": "http://127.0.0.1:1"}  # no internal address known: not routed to
    assert worker_url(pod, public_only) == "http://127.0.0.1:1"
    assert worker_url(pod, public_only, internal=True) is None
    # a map names every pod with a worker: a pod it leaves out is not sent to its IP, where
    # (kwok's pods) something else may answer
    others = {"models/other": "http://127.0.0.1:1"}
    assert worker_url(pod, others) is None and worker_url(pod, others, internal=True) is None


class ScanLeastOutstanding:
    """The least-outstanding rule as a plain scan: the reference for the indexed policy."""

    def __init__(self):
        self.turn = 0

    def choose(self, rs):
        live = [r for r in rs if r.available]
        if not live:
            return None
        least = min(r.outstanding for r in live)
        tied = [r for r in live if r.outstanding == least]
        self.turn += 1
        return tied[self.turn % len(tied)]


@pytest.mark.parametrize("seed", range(4))
def test_least_outstanding_on_a_large_fleet_decides_as_the_scan_does(seed):
    """Random starts, finishes, health and routability flips and membership changes on one
    list the policy indexes (the simulator's way) and on fresh lists (the router's way): the
    same replica every time as a scan's."""
    rng = random.Random(seed)
    rs = replicas(200)
    indexed, scan, fresh, scan_fresh = LeastOutstanding(), ScanLeastOutstanding(), LeastOutstanding(), \
        ScanLeastOutstanding()
    busy = []
    for step in range(6000):
        op = rng.random()
        if op < 0.5:
            a, b = indexed.choose(rs), scan.choose(rs)
            assert a is b, step
            c, d = fresh.choose(list(rs)), scan_fresh.choose(list(rs))
            assert c is d, step
            if a is not None:
                a.outstanding += 1
                busy.append(a)
        elif op < 0.9 and busy:
            busy.pop(rng.randrange(len(busy))).outstanding -= 1
        elif op < 0.99:
            r = rng.choice(rs)
            if rng.random() < 0.5:
                r.healthy = not r.healthy
            else:
                r.routable = not r.routable
        else:   # membership changes: a new list, a replica gone, one added
            rs = [r for r in rs if r is not rng.choice(rs)] + replicas(1)
    assert indexed._index is not None and indexed._index.replicas is rs   # the index was in use
    assert fresh._index is None


def test_the_least_outstanding_index_lets_go_of_replicas_it_no_longer_routes_to():
    rs = replicas(64)
    p = LeastOutstanding()
    p.choose(rs)
    p.choose(rs)
    assert all(r.__dict__["_watchers"] for r in rs)
    p.choose(rs[:10])
    assert not any(r.__dict__["_watchers"] for r in rs)
