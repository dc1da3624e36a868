"""The open loop's send clock (`bench.harness.Alarm`): never early, at once for a time that
has passed, its timerfd released; and the same promises where it falls back to sleep."""

import asyncio
import os
import random
import time

import pytest

from fleetwise.bench import harness
from fleetwise.bench.harness import Alarm


async def _never_early(alarm: Alarm) -> list[float]:
    rng = random.Random(0)
    start = time.perf_counter() + 0.001
    times = sorted(start + rng.uniform(0.0, 0.2) for _ in range(150))
    late = []
    for t in times:
        await alarm.until(t)
        now = time.perf_counter()
        assert now >= t, f"woke {t - now:.6f} s early"
        late.append(now - t)
    return late


def test_the_alarm_wakes_at_each_time_never_before_it_and_at_once_for_one_that_passed():
    async def main() -> None:
        async with Alarm() as alarm:
            assert alarm.fd >= 0  # Linux: the timerfd, not the fallback
            await _never_early(alarm)
            passed = alarm.until(time.perf_counter() - 1.0)
            with pytest.raises(StopIteration):
                passed.send(None)  # finished without waiting for the loop
            fd = alarm.fd
        assert alarm.fd == -1
        with pytest.raises(OSError):
            os.fstat(fd)  # closed

    asyncio.run(main())


def test_without_a_monotonic_perf_counter_it_sleeps_instead_and_is_still_never_early(monkeypatch):
    real = time.get_clock_info

    def info(name: str):
        i = real(name)
        if name == "perf_counter":
            i.implementation = "something else"
        return i

    monkeypatch.setattr(harness.time, "get_clock_info", info)

    async def main() -> None:
        async with Alarm() as alarm:
            assert alarm.fd == -1
            await _never_early(alarm)

    asyncio.run(main())
