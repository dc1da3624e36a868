"""The router's Prometheus metrics (names in fleetwise.telemetry.catalog), in a registry of
its own so that several routers can live in one process (tests).

The four that change on every request (requests, decisions, latency, time to first chunk)
are `Tally` families: each series plain numbers that a scrape reads, exposed exactly as
prometheus_client's own counters and histograms are. Those take a lock and several calls
per update, a share of the router's CPU per request; the router updates its metrics on its
event loop alone, which also serves the scrape, so no update races a read. As the workers'
pages, the router's have no `*_created` series (they double the page and no dashboard
reads them).
"""

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from fleetwise.telemetry import catalog as c

disable_created_metrics()

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Tally(c.ROUTER_REQUESTS, "Requests by model, mode and HTTP status.",
                              ["model_name", "mode", "status"], r)
        self.decisions = Tally(c.ROUTER_DECISIONS, "Replica choices by model, role and policy.",
                               ["model_name", "role", "policy"], r)
        self.retries = Counter(c.ROUTER_RETRIES, "Attempts that failed before the client saw a byte.",
                               ["model_name", "role"], registry=r)
        self.inflight = Gauge(c.ROUTER_INFLIGHT, "Requests inside the router.", registry=r)
        self.healthy = Gauge(c.ROUTER_REPLICA_HEALTHY, "1 while a replica takes requests.",
                             ["model_name", "role", "url"], registry=r)
        self.outstanding = Gauge(c.ROUTER_REPLICA_OUTSTANDING, "Requests sent to a replica and not finished.",
                                 ["model_name", "role", "url"], registry=r)
        self.server_errors = Counter(c.ROUTER_REPLICA_SERVER_ERRORS, "5xx answers from a replica.",
                                     ["model_name", "role", "url"], registry=r)
        self.timeouts = Counter(c.ROUTER_REPLICA_TIMEOUTS, "Replicas that sent nothing for the read timeout.",
                                ["model_name", "role", "url"], registry=r)
        self.latency = Tally(c.ROUTER_REQUEST_SECONDS, "Time from request to last byte.", ["model_name"], r,
                             buckets=BUCKETS)
        self.ttft = Tally(c.ROUTER_TTFT_SECONDS, "Time from request to the first streamed chunk.", ["model_name"],
                          r, buckets=BUCKETS)
        self.migrations = Counter(c.ROUTER_MIGRATIONS, "Streams moved to another replica, by reason.",
                                  ["model_name", "reason"], registry=r)
        self.migration_gap = Histogram(c.ROUTER_MIGRATION_GAP_SECONDS,
                                       "The client's wait between the last event before a move and the first after.",
                                       ["model_name"], buckets=BUCKETS, registry=r)
        self.unmigratable = Counter(c.ROUTER_UNMIGRATABLE, "Streams that could not be moved when their replica "
                                    "failed, by reason.", ["model_name", "reason"], registry=r)
        self.handoff_retries = Counter(c.ROUTER_HANDOFF_RETRIES, "Prefills sent again after every prefill "
                                       "replica's KV leases were full.", ["model_name"], registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: "MetricWrapperBase | Tally", *labels: str) -> Any:
        """A metric's labelled series, looked up once (labels() costs more than inc())."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Observed:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket counts values <= its bound
        self.sum += value


class Tally:
    """A counter, or with `buckets` a histogram, whose series are plain numbers (see the
    module's docstring). `labels(*values)` gives a series with `inc()` or `observe(v)`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 buckets: Sequence[float] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values, not {len(values)}")
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Observed(self.bounds) if self.bounds else _Count()
        return series

    def describe(self) -> list[Metric]:
        kind = HistogramMetricFamily if self.bounds else CounterMetricFamily
        return [kind(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        if not self.bounds:
            counts = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, s in self.series.items():
                counts.add_metric(values, s.value)
            yield counts
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, s in self.series.items():
            total, buckets = 0, []
            for le, n in zip(self._les, s.counts):
                total += n
                buckets.append((le, float(total)))
            family.add_metric(values, buckets, s.sum)
        yield family
