"""`fleetwise bench faults`: fault detection on a real local fleet (`fleet.py`: `fleetwise up`'s
machinery, a real Prometheus, the tiny model), under the bursty, prefix-skewed load of
`workload.py` from start to end. First a healthy stretch, then each fault of `plan()` on a
worker of its own (`cases.py`), then a healthy stretch again; for each fault the seconds from
injection to incident, to action and to the target serving again; false positives per hour
over the whole run; the simulator's figures for the same faults (`sim_figures.py`). The
default run takes about ten minutes; `--quick` (one XID on four mixed workers, quarantined, no
restart) under one.
"""

import tempfile
import time
from pathlib import Path

from fleetwise.bench import harness
from fleetwise.bench.faults import cases as C
from fleetwise.bench.faults.fleet import bench_fleet
from fleetwise.bench.faults.load import LoadThread
from fleetwise.bench.faults.report import report
from fleetwise.bench.faults.sim_figures import sim_detection
from fleetwise.bench.faults.workload import Shape, burstiness, bursty_requests

WINDOW = 10                 # the FaultPolicy's least windowSeconds
CONSECUTIVE = 2             # windows out in a row (local_policy's)
MAX_WINDOWS = 5             # a fault not found within this many windows is reported as missed


def plan(quick: bool, healthy_s: float) -> list[C.Case]:
    """The cases in order, each aimed at a role (`cases.resolve` picks the worker when it starts)."""
    if quick:
        return [C.healthy(healthy_s), C.xid("mixed")]
    return [C.healthy(healthy_s), C.slow("decode", 1.3), C.slow("decode", 2.0), C.slow("decode", 6.0),
            C.slow("prefill", 6.0), C.stall("prefill"), C.xid("prefill"), C.slow_link(), C.healthy(healthy_s / 2)]


def _touched(results: list[C.CaseResult], window: int):
    """Whether a fault explains an incident at `at`: its case was running, or it ended (its
    target serving again) less than one window before."""
    def touched(at: float, kind: str, target: str) -> bool:
        for r in results:
            end = r.injected + (r.serving_s or r.windows * window) + window
            if r.case.kind != "healthy" and r.injected <= at <= end and C.names(r.case, kind, target):
                return True
        return False
    return touched


def run_faults_bench(out: Path = Path("bench/results"), quick: bool = False, per_pool: int = 4,
                     healthy_s: float | None = None, rate: float | None = None, seed: int = 0) -> dict:
    console = harness.make_console(110)
    out.mkdir(parents=True, exist_ok=True)
    mode = "colocated" if quick else "disaggregated"
    healthy_s = healthy_s if healthy_s is not None else (10.0 if quick else 120.0)
    shape = Shape(rate=rate if rate is not None else (1.5 if quick else Shape().rate))
    from fleetwise.worker.model.files import write_model
    with tempfile.TemporaryDirectory(prefix="fleetwise-bench-faults-") as tmp:
        workdir = Path(tmp)
        model = write_model(workdir / "models" / "tiny", "tiny", seed=0)
        t_start = time.time()
        with console.status(f"starting {per_pool} {'mixed' if quick else 'prefill + decode'} workers, the router, "
                            "Prometheus and the fault loop"):
            fleet_cm = bench_fleet(workdir / "fleet", model, "mixed" if quick else mode, per_pool, WINDOW,
                                   CONSECUTIVE, restart=not quick)
            f = fleet_cm.__enter__()
        try:
            started_s = time.time() - t_start
            cases, used = plan(quick, healthy_s), set[str]()
            requests = bursty_requests(shape, 3600.0, seed=seed)
            load = LoadThread(f.router, "tiny", requests).start()
            results = []
            with harness.progress_bar(console, "fault cases", len(cases), "cases") as advance:
                t_cases = time.time()
                for case in cases:
                    results.append(C.run_case(f, C.resolve(f, case, used), MAX_WINDOWS, wait_serving=not quick))
                    advance(1)
            span = time.time() - t_cases
            load.stop()
            windows = list(f.record.windows)
        finally:
            fleet_cm.__exit__(None, None, None)
    fp = C.false_positive_episodes(windows, _touched(results, WINDOW))
    sim = {} if quick else sim_detection([r.case for r in results], mode, per_pool, WINDOW, CONSECUTIVE,
                                         restart_s=15.0)
    run = {"mode": mode, "workers_per_pool": per_pool, "window_s": WINDOW, "consecutive_windows": CONSECUTIVE,
           "max_windows": MAX_WINDOWS, "started_s": started_s, "detector_seconds": span, "windows": len(windows),
           "shape": shape.to_json(), "burstiness": burstiness([r for r in requests if r.at <= span]),
           "load": load.counts()}
    return report(out, "faults-quick" if quick else "faults", run, results, fp, windows, sim, console)
