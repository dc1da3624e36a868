"""`fleetwise up --power-limit-watts W`: the power controller over the local fleet, against a
real Prometheus that scrapes the workers' /metrics (each a modelled GPU).

The loop is the operator's own (`fleetwise/power_loop.py`) over one power domain, the whole
machine, with the budget's default thresholds; it runs in a thread of `fleetwise up`, one
control period every `period` seconds, and writes what it saw and did to `power.json` in
the workdir (the live table and the tests read it). Prometheus comes from PATH (Debian's
package `prometheus`); without it, `fleetwise up` says how to get it and does not start.
"""

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetwise import gpus
from fleetwise.fleet import WorkerRef
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.power_loop import DomainWorker, Period, PowerLoop
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer

log = logging.getLogger(__name__)

STATUS_FILE = "power.json"


@dataclass
class PowerOptions:
    limit_watts: float
    products: dict[str, str]            # role -> GPU product of its modelled GPUs
    priority: str = "High"
    period: float = 2.0
    scrape_interval: float = 1.0

    def budget(self) -> PowerBudgetSpec:
        """The machine as one power domain; caps may go as low as the products allow."""
        floor = min(gpus.product(p).min_limit_watts for p in self.products.values())
        return PowerBudgetSpec(node_selector={"kubernetes.io/hostname": "local"}, limit_watts=self.limit_watts,
                               min_gpu_cap_watts=max(50.0, floor))


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


@dataclass
class LocalPower:
    options: PowerOptions
    fleet: LocalFleet
    workdir: Path
    prometheus: PrometheusServer          # started and stopped by the caller (fleetwise up's one)
    last: Period | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def workers(self) -> list[DomainWorker]:
        return [self._worker(m) for m in self.fleet.workers.values()]

    def _worker(self, m: Member) -> DomainWorker:
        return DomainWorker(WorkerRef(m.name, url=m.internal_url), self.options.priority, m.role,
                            self.options.products[m.role], series=(("instance", _hostport(m.url)),))

    def start(self) -> "LocalPower":
        self._thread = threading.Thread(target=self._run, name="power-loop", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        loop = PowerLoop(PrometheusClient(self.prometheus.url, timeout=2.0), self.fleet,
                         period_seconds=self.options.period)
        budget, workers = self.options.budget(), self.workers()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.last = loop.run_period(budget, workers)
                self._write(self.last)
            except Exception:  # the loop goes on; the next period tries again
                log.exception("power loop period failed")
            self._stop.wait(max(0.0, self.options.period - (time.monotonic() - t0)))

    def _write(self, p: Period) -> None:
        status = {"at": p.at, "prometheus": self.prometheus.url, "limit_watts": self.options.limit_watts,
                  "measured_watts": p.reading.watts, "peak_watts": p.reading.peak_watts,
                  "telemetry_age_seconds": p.reading.age_seconds,
                  "situation": p.decision.situation, "summary": p.decision.summary,
                  "caps": {k.split("/", 1)[-1]: v for k, v in p.caps.items()},
                  "changed": [{"worker": ch.worker.split("/", 1)[-1], "watts": ch.cap_watts, "reason": ch.reason}
                              for ch in p.changed], "failed": p.failed, "telemetry_error": p.telemetry_error}
        path = self.workdir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)

    def stop(self) -> None:
        """The loop; no cap goes out after this. The workers' caps go with the workers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
