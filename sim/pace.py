"""A worker's measured pace over time: how many times longer than its own CPU time its steps
took on the wall clock, window by window.

A worker that shares its core with other processes gets a changing share of it: on the two
shared cores where `fleetwise sim agree` runs, the same worker's steps took 2x their CPU time
in one 20 s stretch and 6x in the next. A step profile fitted on CPU time gives the shape of a
step's cost; the pace gives how long the wall clock made it. One factor over a whole run
spreads a burst of contention over every step, so the steps inside the burst, where the queue
forms and the slow percentiles come from, are modelled too fast and the rest too slow.

`windows` makes the pace from a worker's traced steps (`worker/engine/step_trace.py`): in each
window, the steps' wall seconds plus the engine loop's time between two steps while work was
left, over their CPU seconds. `Pacer` plays it in the simulation as a changing slow-down of
that worker (the fault injector's `slow`), one event per window and worker: the batch model
stays analytic between them.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

MIN_CPU_S = 0.02      # a window whose steps used less CPU than this takes the worker's whole-run pace


@dataclass(frozen=True)
class Pace:
    window_s: float
    factors: tuple[float, ...]     # window k covers [k * window_s, (k + 1) * window_s)
    overall: float                 # over the whole run: before the first window's steps, after the last

    def at(self, t: float) -> float:
        k = int(t // self.window_s) if t >= 0 else -1
        return self.factors[k] if 0 <= k < len(self.factors) else self.overall

    def next_change(self, t: float) -> float:
        return (int(t // self.window_s) + 1) * self.window_s if 0 <= t < len(self.factors) * self.window_s else (
            0.0 if t < 0 else float("inf"))

    def wall_for(self, t: float, cpu_s: float) -> float:
        return wall_for(self, t, cpu_s)


class Paced(Protocol):
    """A slow-down that changes over time: its factor at `t`, and when it next changes."""

    def at(self, t: float) -> float: ...

    def next_change(self, t: float) -> float: ...


def wall_for(pace: Paced, t: float, cpu_s: float) -> float:
    """Wall seconds from `t` for `cpu_s` seconds of work at the changing pace."""
    start, left = t, cpu_s
    while True:
        factor, change = pace.at(t), pace.next_change(t)
        if (change - t) / factor >= left:
            return t + left * factor - start
        left -= (change - t) / factor
        t = change


@dataclass(frozen=True)
class StepPace:
    """A worker's pace step by step: over each traced step, from its start to the next step's
    (the loop went straight on) or to its own end, that time over its CPU time; between steps
    (the engine idle) the windows' pace. A prompt pass the host slowed twice over inside a
    window whose pace is lower is played as slow as it was."""
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    factors: tuple[float, ...]
    between: Pace

    @property
    def window_s(self) -> float:
        return self.between.window_s

    def at(self, t: float) -> float:
        k = bisect.bisect_right(self.starts, t) - 1
        return self.factors[k] if k >= 0 and t < self.ends[k] else self.between.at(t)

    def next_change(self, t: float) -> float:
        k = bisect.bisect_right(self.starts, t) - 1
        if k >= 0 and t < self.ends[k]:
            return self.ends[k]
        following = self.starts[k + 1] if k + 1 < len(self.starts) else float("inf")
        return min(following, self.between.next_change(t))

    def wall_for(self, t: float, cpu_s: float) -> float:
        return wall_for(self, t, cpu_s)


def windows(steps: Sequence[dict[str, Any]], window_s: float) -> Pace:
    """A worker's pace from its traced steps (each with `t`, `s`, `cpu`, `left`; `t` in seconds
    from the run's start). A window with too little CPU to measure takes the whole run's pace."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, not {window_s}")
    if not steps:
        return Pace(window_s, (), 1.0)
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for i, s in enumerate(steps):
        k = int(s["t"] // window_s)
        took = s["s"]
        if s["left"] > 0 and i + 1 < len(steps):   # the loop went straight on: its time between steps counts
            took += max(0.0, steps[i + 1]["t"] - (s["t"] + s["s"]))
        wall[k] = wall.get(k, 0.0) + took
        cpu[k] = cpu.get(k, 0.0) + s["cpu"]
    total_cpu = sum(cpu.values())
    overall = sum(wall.values()) / total_cpu if total_cpu > 0 else 1.0
    last = max(wall)
    factors = tuple(max(1.0, wall[k] / cpu[k]) if cpu.get(k, 0.0) >= MIN_CPU_S else max(1.0, overall)
                    for k in range(last + 1))
    return Pace(window_s, factors, max(1.0, overall))


def per_step(steps: Sequence[dict[str, Any]], window_s: float) -> StepPace:
    """A worker's step-by-step pace from its traced steps (as `windows` takes them); a step with
    no CPU time measured takes its window's pace."""
    between = windows(steps, window_s)
    starts: list[float] = []
    ends: list[float] = []
    factors: list[float] = []
    for i, s in enumerate(steps):
        end = s["t"] + s["s"]
        if s["left"] > 0 and i + 1 < len(steps):
            end = max(end, steps[i + 1]["t"])
        if starts and s["t"] < ends[-1]:   # overlapping clocks: the later step starts where the last ended
            continue
        if end > s["t"]:
            starts.append(s["t"])
            ends.append(end)
            factors.append(max(1.0, (end - s["t"]) / s["cpu"]) if s["cpu"] > 0 else between.at(s["t"]))
    return StepPace(tuple(starts), tuple(ends), tuple(factors), between)


class Pacer:
    """Each worker's pace in the simulation: at every window's start its `slow` is set to the
    window's factor (a ticker of `Simulation`); the batch running then changes pace there."""

    def __init__(self, sim: Any, paces: Sequence[Pace | StepPace]):
        if len(paces) != len(sim.workers):
            raise ValueError(f"{len(paces)} paces for {len(sim.workers)} workers")
        self.sim, self.paces = sim, list(paces)
        for w, p in zip(sim.workers, paces):   # a prompt pass takes the pace of every moment it spans
            w.pass_wall = p.wall_for

    def tick(self, now: float) -> float | None:
        for w, pace in zip(self.sim.workers, self.paces):
            factor = pace.at(now + 1e-9)
            if factor != w.slow:
                w.slow = factor
                self.sim.set_cap(w, w.cap_watts)   # the steps from now on at this pace
        upcoming = min(p.next_change(now + 1e-9) for p in self.paces)
        return upcoming if upcoming < float("inf") else None
