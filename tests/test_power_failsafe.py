"""What happens when the power loop loses its eyes or stops, with real parts: two worker
processes as modelled A100s, a real Prometheus scraping them, the local fleet's verbs.
Prometheus killed: no cap is lifted, and past the deadline low-priority work gets a
conservative cap. The loop stopped: each worker's lease runs out by itself, the
low-priority one falls back to the conservative cap, the high-priority one to none."""

import shutil
import time

import httpx
import pytest

from fleetwise.controllers.power import Settings
from fleetwise.fleet import WorkerRef
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.power_loop import DomainWorker, PowerLoop
from fleetwise.protocol import POWER_PATH
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer

from .workers import AUTH, TOKEN, start_worker_process

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
# two idle A100s draw 110 W: inside the hysteresis band of a 130 W budget (104 to 117 W)
BUDGET = PowerBudgetSpec(node_selector={"row": "r1"}, limit_watts=130, min_gpu_cap_watts=100)
CONSERVATIVE = 0.6 * 400


def cap_of(member: Member) -> float | None:
    return httpx.get(member.internal_url + POWER_PATH, headers=AUTH, timeout=10).json()["watts"]


def test_stale_telemetry_lifts_nothing_and_a_stopped_loop_leaves_caps_to_their_fallbacks(tmp_path, tiny_model_dir):
    procs = [start_worker_process(tiny_model_dir, "mixed", "--modelled-gpu", "A100") for _ in range(2)]
    prometheus = None
    try:
        members = [Member(name, [], None, p.url, role="mixed", internal_url=p.internal_url)
                   for name, p in zip(("batch", "chat"), procs)]
        fleet = LocalFleet("tiny", members, tmp_path / "router.yaml", token=TOKEN)
        prometheus = PrometheusServer(tmp_path / "prometheus", {"workers": [p.url.removeprefix("http://")
                                                                            for p in procs]},
                                      scrape_interval=0.5).start()
        workers = [DomainWorker(WorkerRef(m.name, url=m.internal_url), priority, "mixed", "A100",
                                series=(("instance", m.url.removeprefix("http://")),))
                   for m, priority in zip(members, ("Low", "High"))]
        batch, chat = members
        client = PrometheusClient(prometheus.url, timeout=2)
        deadline = time.monotonic() + 30
        while len(client.latest("DCGM_FI_DEV_POWER_USAGE").samples) < 2:  # both scraped before the loop starts
            assert time.monotonic() < deadline, "Prometheus has not scraped both workers"
            time.sleep(0.25)
        loop = PowerLoop(client, fleet,
                         Settings(stale_after_seconds=2, stale_deadline_seconds=4), period_seconds=0.5,
                         ttl_periods=4, min_ttl=2.0)
        loop.caps = {"local/chat": 300.0}  # held from before: high priority, capped
        deadline = time.monotonic() + 30
        while (p := loop.run_period(BUDGET, workers)).decision.situation != "band":
            assert time.monotonic() < deadline, p.decision.summary
            time.sleep(0.5)
        assert (cap_of(batch), cap_of(chat)) == (None, 300.0)

        prometheus.kill()
        situations = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            situations.append(loop.run_period(BUDGET, workers).decision.situation)
            assert cap_of(chat) == 300.0  # never lifted while blind
            time.sleep(0.5)
        assert "stale" in situations and situations[-1] == "stale_capping"
        assert cap_of(batch) == CONSERVATIVE  # low priority, past the deadline

        # the loop stops renewing: the leases (2 s) run out on the workers' own clocks
        time.sleep(3.0)
        assert cap_of(batch) == CONSERVATIVE and cap_of(chat) is None
        state = httpx.get(batch.internal_url + POWER_PATH, headers=AUTH, timeout=10).json()
        assert state["seconds_left"] is None and "lapsed" in state["reason"]
    finally:
        if prometheus is not None:
            prometheus.stop()
        for p in procs:
            p.stop()
