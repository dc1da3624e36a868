"""`fleetwise bench faults`: fault detection on a real local fleet (`fleet.py`: `fleetwise up`'s
machinery, a real Prometheus, the tiny model), under the bursty, prefix-skewed load of
`workload.py`. First, under a continuous load, a healthy stretch and the slowdowns of `plan()`,
each on a worker of its own (`cases.py`); then each fault of `compared()` twice on the same
load, without the detector and with it, between healthy arms (`goodput.py`). For each fault the
seconds from injection to incident, to action and to the target serving again; for each
compared fault the SLO goodput lost with and without the detector; false positives per hour
over the whole run; the simulator's figures for the same faults (`sim_figures.py`). The
default run takes about twenty minutes (18-25 on a busy two-core machine); `--quick` (one XID
on three mixed workers, with and without quarantine, no restart) about one.
"""

import os
import tempfile
import time
from pathlib import Path

from fleetwise.bench import harness
from fleetwise.bench.faults import cases as C
from fleetwise.bench.faults.fleet import bench_fleet
from fleetwise.bench.faults.goodput import compare, run_arm, segment_requests
from fleetwise.bench.faults.load import LoadThread, counts
from fleetwise.bench.faults.report import report
from fleetwise.bench.faults.sim_figures import sim_detection
from fleetwise.bench.faults.workload import Shape, burstiness, bursty_requests

WINDOW = 10                 # the FaultPolicy's least windowSeconds
CONSECUTIVE = 2             # windows out in a row (local_policy's)
MAX_WINDOWS = 5             # a fault not found within this many windows is reported as missed
PRE_S, SPAN_S = 10.0, 45.0  # a goodput arm: load before the injection (a window), seconds counted after it
QUICK_PRE_S, QUICK_SPAN_S = 3.0, 8.0
QUICK_WORKERS = 3           # minPeers: the quick run's XID needs no more, and three start sooner


def plan(quick: bool, healthy_s: float) -> list[C.Case]:
    """The cases under the continuous load, in order, each aimed at a role (`cases.resolve` picks
    the worker when it starts): the healthy stretch and the slowdowns only found over windows."""
    if quick:
        return []
    return [C.healthy(healthy_s), C.slow("decode", 1.3), C.slow("decode", 2.0)]


def compared(quick: bool, span_s: float) -> list[C.Case]:
    """The faults run twice on the same load, without the detector and with it (`goodput.py`):
    one of each kind the detector acts on, at a size a real fault has (an XID, an engine stalled
    past the span in each role, a GPU six times slower in each role, a slow KV link); the quick
    run's XID only checks that the comparison runs."""
    if quick:
        return [C.xid("mixed")]
    stall_s = max(60.0, span_s + 15)
    return [C.xid("prefill"), C.stall("prefill", stall_s), C.stall("decode", stall_s), C.slow("decode", 6.0),
            C.slow("prefill", 6.0), C.slow_link()]


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


def run_faults_bench(out: Path = Path("bench/results"), quick: bool = False, per_pool: int | None = None,
                     healthy_s: float | None = None, rate: float | None = None, seed: int = 0,
                     span_s: float | None = None) -> dict:
    console = harness.make_console(110)
    out.mkdir(parents=True, exist_ok=True)
    mode = "colocated" if quick else "disaggregated"
    per_pool = per_pool if per_pool is not None else (QUICK_WORKERS if quick else 4)
    healthy_s = healthy_s if healthy_s is not None else 120.0
    span_s = span_s if span_s is not None else (QUICK_SPAN_S if quick else SPAN_S)
    pre_s = QUICK_PRE_S if quick else PRE_S
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
            cases, faults, used = plan(quick, healthy_s), compared(quick, span_s), set[str]()
            requests = bursty_requests(shape, 3600.0, seed=seed)
            arm_requests = segment_requests(shape, pre_s + span_s, seed)
            results, baselines, arms, loads = [], [], [], []
            with harness.progress_bar(console, "fault cases", len(cases) + 2 * len(faults) + 1 + (not quick),
                                      "cases and arms") as advance:
                t_cases = time.time()
                if cases:
                    load = LoadThread(f.router, "tiny", requests).start()
                    for case in cases:
                        results.append(C.run_case(f, C.resolve(f, case, used), MAX_WINDOWS))
                        advance(1)
                    load.stop()
                    loads.append(load)
                baselines.append(run_arm(f, "healthy", C.healthy(span_s), arm_requests, pre_s, span_s, MAX_WINDOWS))
                advance(1)
                for case in faults:
                    case = C.resolve(f, case, set())   # the busiest of its role now, used or not
                    for name in ("without", "with"):
                        arms.append(run_arm(f, name, case, arm_requests, pre_s, span_s, MAX_WINDOWS))
                        advance(1)
                if not quick:
                    baselines.append(run_arm(f, "healthy", C.healthy(span_s), arm_requests, pre_s, span_s,
                                             MAX_WINDOWS))
                    advance(1)
            span = time.time() - t_cases
            windows = list(f.record.windows)
        finally:
            fleet_cm.__exit__(None, None, None)
    results += [a.result for a in baselines + arms if a.result is not None]
    fp = C.false_positive_episodes(windows, _touched(results, WINDOW))
    sim = {} if quick else sim_detection([r.case for r in results if r.arm != "without"], mode, per_pool, WINDOW,
                                         CONSECUTIVE, restart_s=15.0)
    sent = [s for x in loads for s in x.sent] + [s for a in baselines + arms for s in a.sent]
    run = {"mode": mode, "workers_per_pool": per_pool, "window_s": WINDOW, "consecutive_windows": CONSECUTIVE,
           "max_windows": MAX_WINDOWS, "started_s": started_s, "detector_seconds": span, "windows": len(windows),
           "shape": shape.to_json(), "burstiness": burstiness([r for r in requests if r.at <= span]),
           "load": counts(sent), "arm_pre_s": pre_s, "arm_span_s": span_s, "load_average": os.getloadavg()}
    return report(out, "faults-quick" if quick else "faults", run, results, fp, windows, sim,
                  compare(baselines, arms), console)
