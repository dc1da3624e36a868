"""`fleetwise up --detect-faults`: the fault loop (`fault_loop.py`) over the local fleet, in a
thread, against a real Prometheus that scrapes the workers and the router (started and stopped
here). Workers of one role are one group; there are no nodes on one machine. Quarantine goes
through the router's endpoints file, a restart restarts the process (`LocalFleet`), in the
background: windows go on being decided while it runs. Each window's scores, missing workers,
incidents, actions done and actions still running go to `faults.json` in the workdir.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fleetwise.fault_loop import FaultLoop
from fleetwise.fault_signals import Worker
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.spec import FaultPolicySpec
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer


def local_policy(window_seconds: int) -> FaultPolicySpec:
    """Quarantine and restart, at most half of a role's workers out at once (rounded down: one of
    two or three), and route around a slow KV link; two windows out in a row."""
    return FaultPolicySpec.model_validate({
        "detection": {"windowSeconds": window_seconds, "minPeers": 3, "deviationThreshold": 4,
                      "consecutiveWindows": 2},
        "remediation": {"actions": ["Quarantine", "RestartPod", "RouteAround"], "maxUnavailableFraction": 0.5,
                        "maxActionsPerHour": 10, "cooldownSeconds": 300}})


def fleet_workers(fleet: LocalFleet) -> list[Worker]:
    return [Worker(name, f"{fleet.model}/{m.role}", m.url, m.internal_url) for name, m in fleet.workers.items()]


@dataclass
class LocalFaults:
    prometheus: PrometheusServer
    loop: FaultLoop
    thread: threading.Thread
    stopping: threading.Event

    owns_prometheus: bool = True

    def stop(self) -> None:
        """The loop's thread, then its running actions (a restart half done would start a
        process after the fleet stopped), then Prometheus if it is the loop's own."""
        self.stopping.set()
        self.thread.join(timeout=30)
        self.loop.wait()
        self.loop.prometheus.close()
        if self.owns_prometheus:
            self.prometheus.stop()


def local_prometheus(procs: list[Member], workdir: Path, scrape_interval: float = 1.0) -> PrometheusServer:
    """The one Prometheus of a local fleet, scraping its workers and its router (not started)."""
    hosts = {"workers": [urlsplit(m.url).netloc for m in procs if m.role != "router"],
             "router": [urlsplit(m.url).netloc for m in procs if m.role == "router"]}
    return PrometheusServer(workdir / "prometheus", hosts, scrape_interval=scrape_interval)


def start_local_faults(fleet: LocalFleet, procs: list[Member], workdir: Path, policy: FaultPolicySpec,
                       scrape_interval: float = 1.0, prometheus: PrometheusServer | None = None,
                       observe: Callable[[FaultLoop], None] | None = None) -> LocalFaults:
    """Starts the loop's thread over `prometheus` (started, kept by the caller) or over a
    Prometheus of its own (PrometheusUnavailable without its binary). `observe` sees each
    window's loop after `faults.json` is written (the benchmark's record)."""
    prom = prometheus or local_prometheus(procs, workdir, scrape_interval).start()
    loop = FaultLoop(PrometheusClient(prom.url), fleet, policy, lambda: fleet_workers(fleet))
    stopping = threading.Event()
    out = workdir / "faults.json"
    def after(done: FaultLoop) -> None:
        _write(out, done)
        if observe is not None:
            observe(done)
    thread = threading.Thread(target=loop.run, args=(stopping, after), name="fault-loop", daemon=True)
    thread.start()
    return LocalFaults(prom, loop, thread, stopping, owns_prometheus=prometheus is None)


def _write(path: Path, loop: FaultLoop) -> None:
    d = loop.last
    state = {"at": time.time(), "error": loop.error,
             "scores": d.scores if d else {}, "missing": loop.last_signals.missing if loop.last_signals else [],
             "incidents": [asdict(i) for i in d.incidents] if d else [],
             "held": d.held if d else [],
             "actions": [{"verb": x.action.verb, "target": x.action.target, "outcome": x.outcome, "at": x.at,
                          "seconds": round(x.seconds, 3)} for x in loop.done],
             "running": [{"verb": r.action.verb, "target": r.action.target, "at": r.at, "since": r.since}
                         for r in loop.running]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, default=str, indent=1))
    tmp.replace(path)
