"""The Prometheus client against a real Prometheus (Debian's package) scraping a real
exporter: values with their true age, range queries, errors that say what went wrong, and a
series whose target went away reads as missing, never as zero."""

import socket
import time

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fleetwise.net import free_port
from fleetwise.telemetry.prometheus import PrometheusClient, PrometheusError
from fleetwise.telemetry.prometheus_server import PrometheusServer

POWER = "DCGM_FI_DEV_POWER_USAGE"


@pytest.fixture(scope="module")
def exporter():
    registry = CollectorRegistry()
    gauge = Gauge(POWER, "Power draw (W).", ["gpu", "UUID", "modelName", "Hostname"], registry=registry)
    for gpu, watts in (("0", 350.0), ("1", 420.5)):
        gauge.labels(gpu, f"GPU-{gpu}", "NVIDIA H100 80GB HBM3", "node-a").set(watts)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield server, port
    server.shutdown()


@pytest.fixture(scope="module")
def prometheus(exporter, tmp_path_factory):
    _, port = exporter
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), {"gpus": [f"127.0.0.1:{port}"]},
                            scrape_interval=0.5).start()
    client = PrometheusClient(prom.url, timeout=5)
    yield prom, client
    client.close()
    prom.stop()


def wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_latest_has_every_series_with_the_time_it_was_scraped(prometheus):
    _, client = prometheus
    latest = wait_for(lambda: answered if len((answered := client.latest(POWER)).samples) == 2 else None)
    assert latest.total() == pytest.approx(770.5)
    assert {s.labels["gpu"]: s.value for s in latest.samples} == {"0": 350.0, "1": 420.5}
    assert 0 <= latest.age_seconds < 5
    assert all(s.labels["modelName"] == "NVIDIA H100 80GB HBM3" for s in latest.samples)


def test_range_queries_give_points_per_series(prometheus):
    _, client = prometheus
    wait_for(lambda: client.instant(f"count_over_time({POWER}[10s])"))
    now = client.server_time()
    series = client.range(f"sum({POWER})", now - 10, now, 0.5)
    [(labels, points)] = series.items()
    assert labels == () and points and all(v == pytest.approx(770.5) for _, v in points)


def test_a_bad_query_says_why(prometheus):
    _, client = prometheus
    with pytest.raises(PrometheusError, match="bad_data"):
        client.instant("sum(")


def test_nothing_listening_or_nothing_answering_is_an_error_not_an_empty_answer():
    with pytest.raises(PrometheusError, match="ConnectError"):
        PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout=1).instant("up")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections, never answers
    try:
        with pytest.raises(PrometheusError, match=r"no answer within 0\.5 s"):
            PrometheusClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5).instant("up")
    finally:
        silent.close()


def test_a_series_whose_target_went_away_is_missing_not_zero(prometheus, exporter):
    _, client = prometheus
    server, _ = exporter
    wait_for(lambda: client.latest(POWER).samples)
    server.shutdown()  # the exporter is gone: Prometheus marks its series stale at the next scrape
    gone = wait_for(lambda: answered if (answered := client.latest(POWER)).missing else None)
    assert gone.total() is None and gone.age_seconds == float("inf")
    assert client.latest("no_such_metric").missing
