"""The router's Prometheus metrics (names in fleetwise.telemetry.catalog), in a registry of
its own so that several routers can live in one process (tests)."""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from fleetwise.telemetry import catalog as c

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(c.ROUTER_REQUESTS, "Requests by model, mode and HTTP status.",
                                ["model_name", "mode", "status"], registry=r)
        self.decisions = Counter(c.ROUTER_DECISIONS, "Replica choices by model, role and policy.",
                                 ["model_name", "role", "policy"], registry=r)
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
        self.latency = Histogram(c.ROUTER_REQUEST_SECONDS, "Time from request to last byte.", ["model_name"],
                                 buckets=BUCKETS, registry=r)
        self.ttft = Histogram(c.ROUTER_TTFT_SECONDS, "Time from request to the first streamed chunk.",
                              ["model_name"], buckets=BUCKETS, registry=r)
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

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """A metric's labelled series, looked up once (labels() costs more than inc())."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series
