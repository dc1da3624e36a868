"""A healthy fleet under uneven, bursty load raises no fault incident: four prefill and four
decode workers of the tiny model behind the router, the detector on with 10 s windows against
a real Prometheus, the Azure conversation trace's bursts (its gaps scaled to a mean rate),
prompts sharing Zipf-popular prefixes (the router's prefix affinity loads some workers more
than others), long and short outputs. 20 minutes by default (FLEETWISE_FAULT_SOAK_SECONDS);
each minute prints the windows seen, the incidents and the spread of the step times; the
summary goes to FLEETWISE_FAULT_SOAK_OUT as JSON when set."""

import json
import os
import statistics
import time
from pathlib import Path

import pytest

from fleetwise.bench.faults.fleet import bench_fleet
from fleetwise.bench.faults.load import LoadThread
from fleetwise.bench.faults.workload import Shape, burstiness, bursty_requests

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("FLEETWISE_FAULT_SOAK_SECONDS", "1200"))
WINDOW = 10
PER_POOL = 4


def _spread(values: dict[str, float]) -> float | None:
    """The largest over the smallest step seconds per token among peers of one window."""
    v = [x for x in values.values() if x]
    return max(v) / min(v) if len(v) >= 2 else None


@pytest.mark.timeout(int(SECONDS) + 900)   # the run, the fleet's start and stop on a loaded machine
def test_a_healthy_fleet_under_bursty_uneven_load_raises_no_incident(tmp_path, tiny_model_dir):
    shape = Shape()
    requests = bursty_requests(shape, SECONDS, seed=1)
    with bench_fleet(tmp_path / "fleet", tiny_model_dir, "disaggregated", PER_POOL, WINDOW) as f:
        load = LoadThread(f.router, "tiny", requests).start()
        t0 = time.time()
        minute = t0
        try:
            while time.time() - t0 < SECONDS:
                time.sleep(1.0)
                if time.time() - minute >= 60:
                    minute = time.time()
                    ws = f.record.windows
                    spreads = [s for w in ws for s in [_spread({k: v for k, v in w.values.items()
                                                                 if k.startswith(r)}) for r in ("prefill", "decode")]
                               if s]
                    print(f"{time.time() - t0:5.0f} s: {len(ws)} windows, "
                          f"{sum(len(w.incidents) for w in ws)} incidents, {load.counts()}, "
                          f"peer spread max {max(spreads, default=0):.2f}x", flush=True)
        finally:
            load.stop()
        windows = list(f.record.windows)
    incidents = [(w.at - t0, w.incidents, w.scores) for w in windows if w.incidents]
    counts = load.counts()
    scored = [len(w.scores) for w in windows]
    summary = {"seconds": SECONDS, "window_s": WINDOW, "workers_per_pool": PER_POOL, "windows": len(windows),
               "incidents": len(incidents), "incident_windows": incidents[:20],
               "actions": [a for w in windows for a in w.actions], "load": counts, "shape": shape.to_json(),
               "burstiness": burstiness(requests), "median_scored_per_window": statistics.median(scored or [0]),
               "max_score": max((s for w in windows for s in w.scores.values()), default=None)}
    print(json.dumps(summary, default=str))
    if out := os.environ.get("FLEETWISE_FAULT_SOAK_OUT"):
        Path(out).write_text(json.dumps(summary | {"all_windows": [w.to_json() for w in windows]}, default=str) + "\n")
    assert len(windows) >= 0.8 * SECONDS / WINDOW, f"only {len(windows)} windows in {SECONDS:.0f} s"
    assert statistics.median(scored) >= 3, "the detector must score workers in most windows"
    assert counts["ok"] >= 0.9 * counts["sent"], counts
    assert incidents == [], incidents
