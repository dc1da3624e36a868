"""The per-ModelDeployment daemon, without a cluster: it sleeps until woken, its retry or
resync delay, or its stop; a burst of wake-ups gives one reconcile; a stop ends it at once."""

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import kopf
import pytest

from fleetwise.operator import handlers
from fleetwise.operator.wakeups import Wakeups

BODY = {"metadata": {"namespace": "models", "name": "llama"}}


class Stopped:
    """What kopf hands a daemon as `stopped`: false until stopped; `wait(timeout)` is awaitable."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None):
        async def waiting():
            try:
                await asyncio.wait_for(self.event.wait(), timeout)
            except TimeoutError:
                pass
            return self
        return waiting()


@pytest.fixture
def reconciles(monkeypatch):
    """Times of the daemon's reconciles; each asks for the delay in `delay[0]`."""
    times: list[float] = []
    delay = [30.0]

    def reconcile_once(operator, body):
        times.append(time.monotonic())
        return delay[0]
    monkeypatch.setattr(handlers, "reconcile_once", reconcile_once)
    return times, delay


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _run(body, test):
    memo = kopf.Memo(operator=None, wakeups=Wakeups(), reconcilers=ThreadPoolExecutor(2))
    stopped = Stopped()
    daemon = asyncio.create_task(handlers.reconciler(stopped=stopped, body=body, namespace="models",
                                                     name="llama", memo=memo))
    try:
        await test(memo, stopped, daemon)
    finally:
        stopped.event.set()
        await asyncio.wait_for(daemon, 5)
        memo.reconcilers.shutdown()


def test_a_burst_of_wakeups_gives_one_reconcile_after_it_settles(reconciles):
    times, _ = reconciles

    async def test(memo, stopped, daemon):
        await _until(lambda: len(times) == 1)
        woken_at = time.monotonic()
        for _ in range(5):
            memo.wakeups.wake("models", "llama")
            await asyncio.sleep(0.02)
        await _until(lambda: len(times) == 2)
        assert times[1] - woken_at >= handlers.COALESCE_SECONDS
        await asyncio.sleep(0.5)
        assert len(times) == 2  # the resync is 30 s away: nothing else runs
    asyncio.run(_run(BODY, test))


def test_without_events_it_reconciles_again_after_its_delay(reconciles):
    times, delay = reconciles
    delay[0] = 0.2

    async def test(memo, stopped, daemon):
        await _until(lambda: len(times) >= 3)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= 0.2 for g in gaps), gaps
    asyncio.run(_run(BODY, test))


def test_a_stop_ends_a_sleeping_daemon_at_once_and_lets_go_of_its_wakeups(reconciles):
    times, _ = reconciles

    async def test(memo, stopped, daemon):
        await _until(lambda: len(times) == 1)
        t0 = time.monotonic()
        stopped.event.set()
        await asyncio.wait_for(daemon, 5)
        assert time.monotonic() - t0 < 1.0  # not the 30 s resync
        assert memo.wakeups._events == {}
    asyncio.run(_run(BODY, test))


def test_a_new_daemon_for_the_same_name_keeps_its_wakeups_when_the_old_one_ends():
    async def test():
        wakeups = Wakeups()
        old = wakeups.register("models", "llama")
        new = wakeups.register("models", "llama")
        wakeups.forget("models", "llama", old)
        wakeups.wake("models", "llama")
        assert new.is_set() and not old.is_set()
    asyncio.run(test())
