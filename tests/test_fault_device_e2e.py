"""Issue 12's hardest check on a real local fleet (four mixed worker processes of the small model,
one torch thread each, behind the router, a real Prometheus, the fault loop's 10 s windows): a
worker whose device is 1.3x slower is quarantined and restarted within three windows, while a
healthy worker that receives about twice the load of its peers (extra clients of its own) is
never flagged. The detector scores device seconds against a step cost fitted over the pool
(`fleetwise/fault_signals.py`); the slow switch burns device time (`worker/engine/faults.py`)."""

import os
import statistics
import threading
import time

import httpx
import pytest

from fleetwise.testenv.cluster import wait_for

from .detecting_fleet import assert_restarted, detecting_fleet
from .test_fault_loop_e2e import load
from .workers import AUTH

# a load run through a whole fleet, and at the edge of what the detector tells apart on a shared
# 2-core machine: on slow days the slowed worker scored 1.3-1.6 against a threshold of 4.0
pytestmark = [pytest.mark.slow, pytest.mark.soak]

WINDOW = 10          # seconds: the FaultPolicy's least
HEALTHY_WINDOWS = int(os.environ.get("FLEETWISE_FAULT_DEVICE_HEALTHY_WINDOWS", "3"))  # more to measure the spread
WORKERS = 4
SLOW_FACTOR = float(os.environ.get("FLEETWISE_FAULT_DEVICE_SLOW_FACTOR", "1.3"))
ROUTED_CLIENTS = 8   # through the router: about two for each worker
# straight to mixed-0, which batches them with the routed ones. Four gave it 1.3-2.5x its peers'
# tokens window by window (median 1.75: under the 1.7 bar in one run of six); the router sends a
# slower replica less, so six are needed for twice the load with room to spare
EXTRA_CLIENTS = 6


@pytest.fixture
def fleet(tmp_path, small_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread: the engine thread's CPU time is the forward's
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    with detecting_fleet(tmp_path, small_model_dir, "colocated", (0, 0, WORKERS), WINDOW) as running:
        yield running


def _watch(loop, seconds: float, until=lambda: False) -> list:
    """The loop's windows over `seconds` (or until `until()`), each (decision, signals), printed."""
    seen, windows = loop.last, []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not until():
        if loop.last is not seen and loop.last_signals is not None:
            seen = loop.last
            windows.append((seen, loop.last_signals))
            ev = loop.last_signals.evidence
            print({k: round(v, 1) for k, v in seen.scores.items()},
                  {k: (round(v.get("value", 0) * 1e6), round(v.get("step_seconds_per_token", 0) * 1e6),
                       round(v.get("tokens", 0))) for k, v in ev.items()})
        time.sleep(0.5)
    return windows


def test_a_1_3x_slow_device_is_quarantined_within_three_windows_and_twice_the_load_is_not_flagged(fleet):
    fleet, procs, faults = fleet
    loop, router = faults.loop, procs[-1].url
    busy = fleet.workers["mixed-0"]
    stop = threading.Event()
    drivers = [threading.Thread(target=load, args=(router, stop, ROUTED_CLIENTS), daemon=True),
               threading.Thread(target=load, args=(busy.url, stop, EXTRA_CLIENTS), daemon=True)]
    for d in drivers:
        d.start()
    try:
        healthy = _watch(loop, HEALTHY_WINDOWS * WINDOW + 2)
        incidents = [i.target for d, _ in healthy for i in d.incidents]
        assert loop.done == [] and incidents == [], (loop.done, incidents)
        scored = [d for d, _ in healthy if len(d.scores) == WORKERS]
        assert scored, f"no window scored every worker: missing {loop.last_signals}"
        tokens = [s.evidence["mixed-0"]["tokens"] / statistics.median(
            s.evidence[f"mixed-{i}"]["tokens"] for i in range(1, WORKERS)) for _, s in healthy[1:]]
        print(f"mixed-0's tokens against its peers' median, each healthy window: {[round(t, 2) for t in tokens]}")
        assert statistics.median(tokens) >= 1.7, tokens  # about twice the load (or more), as the check asks

        slow = fleet.workers["mixed-1"]
        # slowed as a window begins: the three windows it is given are whole ones (slowed part of
        # the way into one, that window scores little and only two are left to score high twice)
        seen = loop.last
        wait_for(lambda: loop.last is not seen, WINDOW + 5, 0.05, what="the next window")
        r = httpx.post(slow.internal_url + "/internal/faults", json={"slow_factor": SLOW_FACTOR}, headers=AUTH)
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        sick = _watch(loop, 3 * WINDOW + 5, until=lambda: bool(loop.done))
        detected = time.monotonic() - t0
        print(f"slowed x{SLOW_FACTOR}: quarantined after {detected:.1f} s ({len(sick)} windows)")
        assert [(d.action.verb, d.action.target) for d in loop.done][:1] == [("Quarantine", "mixed-1")], loop.done
        assert detected <= 3 * WINDOW + 5
        flagged = {i.target for d, _ in healthy + sick for i in d.incidents}
        assert "mixed-0" not in flagged, flagged
        assert_restarted(faults, fleet, "mixed-1")  # the restart replaces the process: serving, its switches off
    finally:
        stop.set()
        for d in drivers:
            d.join(timeout=60)
