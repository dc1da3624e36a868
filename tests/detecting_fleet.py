"""A local fleet as `fleetwise up --detect-faults` runs it, for the fault loop's end-to-end
tests: worker processes with their fault switches on, the router, a real Prometheus and the
loop's thread; stopped in order when the test ends."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fleetwise.fleet import Routability
from fleetwise.local_faults import LocalFaults, local_policy, start_local_faults
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.net import free_port
from fleetwise.procs import wait_healthy
from fleetwise.up import _ready, plan, stop_fleet, write_token

from .workers import AUTH, token_file


@contextmanager
def detecting_fleet(workdir: Path, model: Path, mode: str, counts: tuple[int, int, int], window: int,
                    worker_args: tuple[str, ...] = ()) -> Iterator[tuple[LocalFleet, list[Member], LocalFaults]]:
    """`counts`: prefill, decode and mixed workers; `worker_args`: more arguments for each worker."""
    token = write_token(workdir)
    token.write_text(token_file().read_text())  # the tests' token, so AUTH reaches the workers
    args = ["--fault", "switches", "--kv-cache-mib", "16", "--device", "cpu", *worker_args]
    procs = plan(model, "tiny", mode, free_port(), *counts, workdir, args, token)
    fleet = LocalFleet("tiny", procs, workdir / "router.yaml", workdir / "actions.log", ready_timeout=120)
    try:
        for p in procs:
            p.start()
        wait_healthy(procs, 180, ready=_ready)
        faults = start_local_faults(fleet, procs, workdir, local_policy(window), scrape_interval=1.0)
        try:
            yield fleet, procs, faults
        finally:
            faults.stop()
    finally:
        stop_fleet(procs)


def assert_restarted(faults: LocalFaults, fleet: LocalFleet, name: str, timeout: float = 120) -> None:
    """The quarantined worker `name` is restarted within `timeout`: its replacement is serving,
    its fault switches off."""
    loop, t0 = faults.loop, time.monotonic()
    while len(loop.done) < 2 and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
    assert [(d.action.verb, d.outcome) for d in loop.done] == [("Quarantine", "done"), ("RestartPod", "done")]
    assert fleet.states[name].state is Routability.SERVING
    view = httpx.get(fleet.workers[name].internal_url + "/internal/faults", headers=AUTH, timeout=10).json()
    assert view["slow_factor"] == 1.0
