"""What every benchmark shares: statistics, targets, the console and its progress bars,
the JSON result and the PNG plot.

Statistics: a percentile is numpy's default, linear interpolation between the two closest
ranks (Hyndman and Fan's type 7): p50 of [1, 2, 3, 4] is 2.5. Every pNN in a result is that.

Targets and their one comparison rule live in bench/targets.py; this module re-exports
them for the benchmarks that import them from here.
"""

import asyncio
import ctypes
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# the targets live in bench/targets.py; re-exported here, where the benchmarks have long imported them from
from fleetwise.bench.targets import AT_LEAST, AT_MOST, Target, mark, target_values, targets_table  # noqa: F401


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a running process, all its threads (Linux); None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    return float(np.percentile(np.asarray(list(values), dtype=np.float64), q))


def _q(name: str) -> float:
    """"p50" -> 50, "p999" -> 99.9."""
    digits = name[1:]
    return int(digits) / 10 ** max(0, len(digits) - 2)


def summary(values: Iterable[float | int | None], *fields: str, scale: float = 1.0) -> dict[str, Any] | None:
    """Named statistics of the values (None left out), each times `scale`; None when no value is
    left. Fields: pNN (p50, p90, p99, p999 = 99.9), mean, median, min, max, std, total, n.
    min, max and total of whole numbers stay whole numbers."""
    a = np.asarray([v for v in values if v is not None])
    if a.size == 0:
        return None
    if scale != 1.0:
        a = a * scale
    out: dict[str, Any] = {}
    for f in fields:
        if f == "n":
            out[f] = int(a.size)
        elif f in ("min", "max", "total"):
            out[f] = (a.min() if f == "min" else a.max() if f == "max" else a.sum()).item()
        elif f in ("mean", "median", "std"):
            out[f] = float(getattr(np, f)(a))
        else:
            out[f] = percentile(a, _q(f))
    return out


def over_runs(values: Iterable[float]) -> dict[str, Any]:
    """One measure over repeated runs: the median, the extremes, and the spread, (max - min) /
    median, the share by which the runs disagree."""
    v = [float(x) for x in values]
    med = float(np.median(v))
    return {"median": med, "min": min(v), "max": max(v), "spread": (max(v) - min(v)) / med if med else 0.0,
            "n": len(v), "values": v}


def rotated(names: list[str], rounds: int) -> list[list[str]]:
    """An order of `names` for each round, turned a share of the list each round so that no
    name keeps its place (and whatever else the machine does at that time)."""
    n = len(names)
    turn = max(1, n // max(1, rounds))
    return [names[(r * turn) % n:] + names[:(r * turn) % n] for r in range(rounds)] if n else []


# -- open loops ---------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1


class Alarm:
    """Waits on the running event loop until a time on `time.perf_counter()`'s clock, to a few
    microseconds: a Linux timerfd the loop watches. The loop's own timers (asyncio.sleep) fire
    on whole milliseconds, up to 0.3 ms early and 0.65 ms late under uvloop: an open loop's
    sends scheduled apart leave together, and a server with one event loop sees bursts that
    its schedule does not have. Elsewhere (no timerfd, or perf_counter not CLOCK_MONOTONIC)
    it falls back to asyncio.sleep. One waiter at a time; use as an async context manager."""

    def __init__(self) -> None:
        self.fd = -1
        self.waiter: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            self._settime = libc.timerfd_settime
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self.fd = fd
            self.loop.add_reader(fd, self._fired)

    async def __aenter__(self) -> "Alarm":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def until(self, t: float) -> None:
        """Returns at `t` (a `time.perf_counter()` value) or, when it has passed, at once."""
        if t <= time.perf_counter():
            return
        if self.fd < 0:
            while (wait := t - time.perf_counter()) > 0:  # a loop's timer may fire a little early
                await asyncio.sleep(wait)
            return
        spec = _Itimerspec()
        sec = int(t)
        spec.it_value.tv_sec, spec.it_value.tv_nsec = sec, min(int((t - sec) * 1e9), 999_999_999)
        if self._settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


# -- console and progress ---------------------------------------------------------------------


def make_console(min_width: int) -> Console:
    """The terminal's console; in a log file, one wide enough for the tables."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, min_width))
    return console


def progress(console: Console, unit: str | None = None, percent: bool = False, remaining: bool = False,
             auto_refresh: bool = True) -> Progress:
    """A rich progress display: description, bar, done/total (`percent`: a percentage), then
    `unit`, elapsed (and `remaining`) time. Add tasks to it inside `with`."""
    columns: list[ProgressColumn | str] = [TextColumn("[bold]{task.description}"), BarColumn(),
                                           TaskProgressColumn() if percent else MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False, auto_refresh=auto_refresh)


@contextmanager
def progress_bar(console: Console, description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """One bar; yields `advance(n)`. In a log file, a line at every tenth instead."""
    if not console.is_terminal:
        state = {"done": 0, "next": 1}
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            state["done"] += n
            while state["next"] <= 10 and state["done"] * 10 >= state["next"] * total:
                console.print(f"{description.strip()}: {state['next'] * 10}% ({state['done']}/{total} {unit}, "
                              f"{time.perf_counter() - t0:.0f} s)")
                state["next"] += 1

        yield advance
        return
    with progress(console, unit=unit, remaining=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- results --------------------------------------------------------------------------------


def header(benchmark: str) -> dict[str, str]:
    """The first keys of every result."""
    return {"benchmark": benchmark, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def save_plot(draw: Callable[[Path], None], path: Path, console: Console) -> Path | None:
    """`draw(path)`; a failure is printed, not raised: the numbers matter more than the picture."""
    try:
        draw(path)
    except Exception as exc:
        console.print(f"[yellow]plot not written: {type(exc).__name__}: {exc}[/yellow]")
        return None
    return path


def wrote(console: Console, json_path: Path, png_path: Path | None) -> None:
    console.print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))


# -- plots ----------------------------------------------------------------------------------


def figure(ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure of `ncols` axes, drawn off screen (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=size)


def finish(fig: Any, path: Path, title: str) -> None:
    """Title, layout, PNG at `path`; the figure is closed."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cdf(ax: Any, values: Iterable[float], **line: Any) -> None:
    """The empirical CDF of the values (nothing for none)."""
    v = np.sort(np.asarray(list(values), dtype=np.float64))
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, **line)


def label_bars(ax: Any, bars: Any, labels: Iterable[str], fontsize: float = 8) -> None:
    """A label above each bar."""
    for b, label in zip(bars, labels):
        ax.annotate(label, (b.get_x() + b.get_width() / 2, max(b.get_height(), 0)), ha="center", va="bottom",
                    fontsize=fontsize)
