"""The operator's Prometheus metrics, in one registry that `fleetwise operator` serves."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetwise.fleet import Routability
from fleetwise.telemetry import catalog as c


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(c.OPERATOR_RECONCILES, "ModelDeployment reconciles.", registry=r)
        self.errors = Counter(c.OPERATOR_RECONCILE_ERRORS, "Reconciles that failed.", ["reason"], registry=r)
        self.bind_seconds = Histogram(c.OPERATOR_BIND_SECONDS, "Pod creation to binding.", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.pending = Gauge(c.OPERATOR_PENDING_PODS, "Worker pods that cannot be placed, by reason.",
                             ["reason"], registry=r)
        self.api_requests = Counter(c.OPERATOR_API_REQUESTS, "Kubernetes API requests.", ["verb", "resource"],
                                    registry=r)
        self.admin_up = Gauge(c.OPERATOR_ADMIN_UP, "1 while records reach the admin API; 0 during an outage.",
                              registry=r)
        self.admin_outage = Counter(c.OPERATOR_ADMIN_OUTAGE_SECONDS,
                                    "Seconds with records queued that could not reach the admin API.", registry=r)
        self.admin_queued = Gauge(c.OPERATOR_ADMIN_QUEUED, "Records waiting for the admin API.", registry=r)
        self.admin_sent = Counter(c.OPERATOR_ADMIN_SENT, "Records the admin API accepted.", registry=r)
        self.admin_dropped = Counter(c.OPERATOR_ADMIN_DROPPED, "Records given up on: the queue was full "
                                     "(the oldest goes) or the admin API refused them.", ["reason"], registry=r)
        self.incidents_open = Gauge(c.INCIDENTS_OPEN, "A FaultPolicy's incidents seen in its last window that "
                                    "nothing was done about, by kind (worker, node, link).",
                                    ["namespace", "policy", "kind"], registry=r)
        self.workers = Gauge(c.OPERATOR_WORKERS, "A ModelDeployment's worker pods by routability state.",
                             ["namespace", "deployment", "state"], registry=r)
        self.domain_watts = Gauge(c.POWER_DOMAIN_WATTS, "A power domain's measured draw (its workers' GPUs), W.",
                                  ["domain"], registry=r)
        self.domain_limit = Gauge(c.POWER_DOMAIN_LIMIT_WATTS, "A power domain's PowerBudget limitWatts.",
                                  ["domain"], registry=r)

    def set_power_domain(self, domain: str, watts: float | None, limit: float | None) -> None:
        """The domain's draw and limit; None removes the series (a missing reading is no sample, never 0)."""
        for gauge, value in ((self.domain_watts, watts), (self.domain_limit, limit)):
            if value is None:
                try:
                    gauge.remove(domain)
                except KeyError:
                    pass
            else:
                gauge.labels(domain).set(value)

    def set_workers(self, namespace: str, deployment: str, states: list[Routability] | None) -> None:
        """Each state's count of one deployment's pods; None: the deployment is gone."""
        for state in Routability:
            if states is None:
                try:
                    self.workers.remove(namespace, deployment, str(state))
                except KeyError:
                    pass
            else:
                self.workers.labels(namespace, deployment, str(state)).set(states.count(state))
