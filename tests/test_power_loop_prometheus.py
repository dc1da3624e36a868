"""The power loop's reading against a real Prometheus (Debian's package) scraping two real
exporters, one per worker: a burst on one worker that is over by the time the loop reads is in
the reading's peak (the highest 1 s point of the domain's sum over the period) and not in its
watts; once the period has passed it is gone from the peak too; a worker without a series
makes the whole reading missing, peak included."""

import time

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fleetwise.fleet import WorkerRef
from fleetwise.net import free_port
from fleetwise.power_loop import DomainWorker, PowerLoop
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer

from .test_prometheus import wait_for as until

POWER = "DCGM_FI_DEV_POWER_USAGE"
PERIOD_S = 5.0


@pytest.fixture(scope="module")
def exporters():
    gauges, servers, hosts = [], [], []
    for _ in range(2):
        registry = CollectorRegistry()
        gauge = Gauge(POWER, "Power draw (W).", ["gpu"], registry=registry)
        gauge.labels("0").set(300.0)
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        gauges.append(gauge.labels("0"))
        servers.append(server)
        hosts.append(f"127.0.0.1:{port}")
    yield gauges, hosts
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def loop(exporters, tmp_path_factory):
    _, hosts = exporters
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), {"gpus": hosts}, scrape_interval=0.5).start()
    client = PrometheusClient(prom.url, timeout=10)
    yield PowerLoop(client, None, period_seconds=PERIOD_S), client  # type: ignore[arg-type]  # measure needs no fleet
    client.close()
    prom.stop()


def domain(hosts: list[str]) -> list[DomainWorker]:
    return [DomainWorker(WorkerRef(f"w{i}"), "High", "mixed", "H100", series=(("instance", h),))
            for i, h in enumerate(hosts)]


def scraped(client: PrometheusClient, host: str, watts: float) -> float | None:
    """When Prometheus last saw `host` at `watts`: the sample's time, or None."""
    for s in client.latest(POWER).samples:
        if s.labels.get("instance") == host and s.value == watts:
            return s.timestamp
    return None


def test_a_burst_over_before_the_read_is_in_the_peak_not_the_watts_and_leaves_with_the_period(loop, exporters):
    power_loop, client = loop
    gauges, hosts = exporters
    workers = domain(hosts)
    until(lambda: all(scraped(client, h, 300.0) for h in hosts))
    gauges[0].set(1500.0)
    first = until(lambda: scraped(client, hosts[0], 1500.0))
    # held for over a 1 s step of the peak's subquery: some step falls inside it
    until(lambda: (t := scraped(client, hosts[0], 1500.0)) and t - first >= 1.5)
    gauges[0].set(300.0)
    until(lambda: scraped(client, hosts[0], 300.0))
    reading, drawn, error = power_loop.measure(workers)
    assert error is None and reading.watts == 600.0 and drawn == {"local/w0": 300.0, "local/w1": 300.0}
    assert reading.peak_watts == 1800.0

    time.sleep(PERIOD_S + 1.5)   # the burst is older than the period now
    reading, _, _ = power_loop.measure(workers)
    assert reading.watts == 600.0 and reading.peak_watts == 600.0


def test_a_worker_without_a_series_makes_the_reading_and_its_peak_missing(loop, exporters):
    power_loop, client = loop
    _, hosts = exporters
    until(lambda: all(scraped(client, h, 300.0) for h in hosts))
    reading, _, error = power_loop.measure(domain([*hosts, "127.0.0.1:9"]))
    assert reading.watts is None and reading.peak_watts is None and "local/w2" in error
    # the peak alone for a domain none of whose workers has a series: none, not 0
    assert power_loop.peak(domain(["127.0.0.1:9"]), time.time()) is None
