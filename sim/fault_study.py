"""`fleetwise sim faults`: the configured faults with the operator's fault detector and without
it, goodput (requests meeting both objectives per second) against the same fleet healthy, and
false positives over a long healthy run with the detector on (C4 reports error-induced
downtime cut from 31.19% to 1.16%; goodput lost is this fleet's measure of the same thing).
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .faults import Detection
from .results import SimResult
from .run import SimConfig, config_from_dict, run_simulation


@dataclass
class FaultComparison:
    goodput_with: float          # requests meeting both objectives per second, detector on
    goodput_without: float
    goodput_healthy: float       # the same fleet and trace with no fault
    lost_with: float             # of the healthy goodput
    lost_without: float
    with_detector: SimResult
    without_detector: SimResult
    healthy_s: float             # the long healthy run with the detector on
    healthy_windows: int
    healthy_incidents: int       # every one a false positive: nothing was injected
    healthy_actions: list[str]


def goodput(r: SimResult) -> float:
    return r.both_attained * r.requests / r.duration_s if r.duration_s > 0 else 0.0


def fault_comparison(config: SimConfig, healthy_s: float | None = None,
                     progress: Any = None) -> FaultComparison:
    """The configured faults with the detector and without it, against a healthy run; then
    `healthy_s` seconds (default: the configuration's duration) healthy with the detector on."""
    if config.faults is None:
        raise ValueError("a fault comparison needs a `faults` section")
    step = progress or (lambda what: None)
    runs = []
    for on in (True, False):
        step("faults, detector " + ("on" if on else "off"))
        runs.append(run_simulation(replace(config, faults=replace(config.faults, detector=on))))
    step("healthy, detector off")
    healthy = run_simulation(replace(config, faults=replace(config.faults, faults=[], detector=False)))
    step("long healthy run, detector on")
    long = run_simulation(replace(config, duration_s=healthy_s or config.duration_s,
                                  faults=replace(config.faults, faults=[], detector=True)))
    assert isinstance(long.faults, Detection)
    base = goodput(healthy)
    g_with, g_without = goodput(runs[0]), goodput(runs[1])
    return FaultComparison(g_with, g_without, base, 1 - g_with / base, 1 - g_without / base, runs[0], runs[1],
                           long.duration_s, long.faults.windows, long.faults.incidents, long.faults.actions)


def faults_main(config_path: Path, out: Path | None, plot: Path | None = None, healthy_s: float | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    config = config_from_dict(yaml.safe_load(config_path.read_text()))
    console = Console(width=max(Console().width, 130))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("fault study", total=4)
        c = fault_comparison(config, healthy_s, lambda what: bar.update(task, advance=1, description=what))
    detection = c.with_detector.faults
    assert detection is not None
    for f in detection.faults:
        when = f"detected after {f.detection_s:.0f} s, {f.action} at {f.acted_s:.0f} s" if f.detection_s is not None \
            else "not detected"
        console.print(f"{f.kind} {f.target} at {f.injected_s:.0f} s: {when}")
    console.print(f"{detection.windows} windows, {detection.incidents} incidents, false positives by kind "
                  f"{detection.false_positives_by_kind or 'none'}")
    console.print(f"goodput {c.goodput_healthy:.1f} req/s healthy; lost {c.lost_with:.2%} with the detector, "
                  f"{c.lost_without:.2%} without")
    console.print(f"healthy with the detector on for {c.healthy_s:.0f} s: {c.healthy_windows} windows, "
                  f"{c.healthy_incidents} incidents (false positives), {len(c.healthy_actions)} actions")
    if out is not None:
        out.write_text(json.dumps(asdict(c), indent=2, default=str) + "\n")
    if plot is not None:
        from .plots import faults_plot
        console.print(faults_plot(c, plot))
    return 0
