"""`fleetwise sim scale`: how the simulator's run time grows with the fleet. The same
configuration (by default sim/examples/conv-1000-gpus.yaml: the conversation trace at about
180 requests/s on 1,000 H100s) with every pool and the offered load multiplied, so that each
GPU sees the same load at 1k, 4k and 16k GPUs; per size the wall time, the events handled and
events per second, and simulated seconds per wall second. A progress bar follows each run.
"""

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .run import SimConfig, config_from_dict, run_simulation

EXAMPLE = Path(__file__).resolve().parent / "examples" / "conv-1000-gpus.yaml"


@dataclass
class ScalePoint:
    gpus: int
    requests: int
    simulated_s: float
    wall_s: float                 # the event loop alone
    cpu_s: float                  # this process's CPU time for the whole run (the machine may be shared)
    setup_s: float                # trace, placement and summary
    events: int
    events_per_s: float
    sim_s_per_wall_s: float
    load_avg_1m: float            # the machine's one-minute load average at the end of the run


def scaled(base: SimConfig, factor: float) -> SimConfig:
    pools = [replace(p, count=max(1, round(p.count * factor))) for p in base.pools]
    if base.poisson_rate is not None:
        return replace(base, pools=pools, poisson_rate=base.poisson_rate * factor)
    return replace(base, pools=pools, rate_scale=base.rate_scale * factor)


def scaling(base: SimConfig, sizes: list[int], progress: Callable[..., None] | None = None) -> list[ScalePoint]:
    """`progress(gpus, simulated_seconds_reached, horizon=...)` now and then during each run."""
    gpus0 = sum(p.count * p.tp for p in base.pools)
    horizon = base.duration_s or 0.0
    out = []
    for size in sizes:
        config = scaled(base, size / gpus0)
        started, cpu = time.perf_counter(), time.process_time()
        result = run_simulation(config, functools.partial(progress, size, horizon=horizon) if progress else None)
        total = time.perf_counter() - started
        out.append(ScalePoint(sum(p.count * p.tp for p in config.pools), result.requests, result.duration_s,
                              result.wall_s, time.process_time() - cpu, total - result.wall_s, result.events,
                              result.events_per_s,
                              result.duration_s / result.wall_s if result.wall_s > 0 else 0.0,
                              os.getloadavg()[0]))
    return out


def main(config_path: Path | None, sizes: list[int], duration_s: float | None, out: Path | None,
         plot: Path | None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    base = config_from_dict(yaml.safe_load((config_path or EXAMPLE).read_text()))
    if duration_s is not None:
        base = replace(base, duration_s=duration_s)
    if base.duration_s is None:
        raise ValueError("the scaling report needs duration_s (in the configuration or --duration)")
    console = Console(width=max(Console().width, 110))
    with Progress(console=console, transient=True) as bar:
        tasks = {s: bar.add_task(f"{s:,} GPUs", total=base.duration_s) for s in sizes}
        points = scaling(base, sizes, lambda s, t, horizon: bar.update(tasks[s], completed=min(t, horizon)))
    table = Table(title=f"{base.duration_s:.0f} simulated seconds, the same load per GPU")
    for column in ("GPUs", "requests", "event loop s", "CPU s", "setup s", "events", "events/s", "sim s per wall s",
                   "load avg"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(f"{p.gpus:,}", f"{p.requests:,}", f"{p.wall_s:.1f}", f"{p.cpu_s:.1f}", f"{p.setup_s:.1f}",
                      f"{p.events:,}",
                      f"{p.events_per_s:,.0f}", f"{p.sim_s_per_wall_s:.0f}", f"{p.load_avg_1m:.1f}")
    console.print(table)
    if out is not None:
        out.write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")
    if plot is not None:
        from .plots import scaling_plot
        console.print(scaling_plot(points, plot))
    return 0
