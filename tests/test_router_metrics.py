"""The router's per-request metrics (`Tally`) read exactly as prometheus_client's own
counters and histograms would, given the same updates."""

import asyncio
import os
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fleetwise.router.metrics import BUCKETS, RouterMetrics, Tally


def _exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_a_tally_is_exposed_as_prometheus_clients_counter_and_histogram():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counts = Tally("x_requests", "Requests.", ["model_name", "status"], ours)
    seconds = Tally("x_seconds", "Latency.", ["model_name"], ours, buckets=BUCKETS)
    ref_counts = Counter("x_requests", "Requests.", ["model_name", "status"], registry=theirs)
    ref_seconds = Histogram("x_seconds", "Latency.", ["model_name"], buckets=BUCKETS, registry=theirs)
    assert _exposition(ours) == _exposition(theirs)  # no series yet: the families alone
    rng = random.Random(0)
    # bounds themselves (a bucket counts values <= its bound), zero, beyond the last bound
    values = [*BUCKETS, 0.0, 0.0004999, 61.0, 1e9] + [rng.expovariate(50) for _ in range(500)]
    for v in values:
        model, status = rng.choice(["a", "b"]), rng.choice(["200", "429", "503"])
        counts.labels(model, status).inc()
        ref_counts.labels(model, status).inc()
        seconds.labels(model).observe(v)
        ref_seconds.labels(model).observe(v)
    counts.labels("a", "200").inc(2.5)
    ref_counts.labels("a", "200").inc(2.5)
    ours_text = _exposition(ours)
    assert ours_text == _exposition(theirs)
    assert 'x_seconds_bucket{le="0.0005",model_name="a"}' in ours_text and "_created" not in ours_text


def test_the_routers_registry_exposes_its_tallies_and_refuses_a_wrong_number_of_labels():
    m = RouterMetrics()
    m.child(m.requests, "tiny", "colocated", "200").inc()
    m.child(m.latency, "tiny").observe(0.003)
    assert m.child(m.latency, "tiny") is m.child(m.latency, "tiny")
    text = generate_latest(m.registry).decode()
    assert 'fleetwise_router_requests_total{mode="colocated",model_name="tiny",status="200"} 1.0' in text
    assert 'fleetwise_router_request_seconds_bucket{le="0.005",model_name="tiny"} 1.0' in text
    assert 'fleetwise_router_request_seconds_bucket{le="0.002",model_name="tiny"} 0.0' in text
    with pytest.raises(ValueError, match="3 label values, not 1"):
        m.requests.labels("tiny")


def test_a_replica_found_by_a_probe_round_is_gauged_before_any_request(tmp_path):
    """The outstanding gauge reads each replica's count when scraped: a replica that
    discovery brings in is gauged by the probe round that finds it (none is reachable here,
    and a request sent to one counts while it is out)."""
    asyncio.run(_gauged_by_probes(tmp_path))


async def _gauged_by_probes(tmp_path) -> None:
    from fleetwise.router.endpoints import StaticEndpoints
    from fleetwise.router.proxy import Router

    config = tmp_path / "router.yaml"
    config.write_text("models:\n  - name: m\n    mixed:\n      - http://127.0.0.1:9\n")
    router = Router(StaticEndpoints(config), probe_interval=3600)
    await router.start()
    try:
        await router.probe_all()
        assert 'url="http://127.0.0.1:9"} 0.0' in _exposition(router.metrics.registry)
        seen = config.stat().st_mtime_ns
        config.write_text("models:\n  - name: m\n    mixed:\n      - http://127.0.0.1:9\n      - http://127.0.0.1:11\n")
        os.utime(config, ns=(seen + 10**9, seen + 10**9))  # a reload goes by the time: never the same tick
        await router.probe_all()
        [_, added] = router.source.models()["m"].replicas["mixed"]
        release = router._acquire(added)
        page = _exposition(router.metrics.registry)
        assert 'fleetwise_router_replica_outstanding{model_name="m",role="mixed",url="http://127.0.0.1:11"} 1.0' in page
        release()
        assert 'url="http://127.0.0.1:11"} 0.0' in _exposition(router.metrics.registry).split("outstanding")[-1]
    finally:
        await router.stop()
