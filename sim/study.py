"""Studies over several simulations. `fleetwise sim power`: how far a row's power can be
oversubscribed: the same fleet grown by a ratio (servers and
offered load alike, so each server sees the same load) inside the power budget of the
original fleet, run with each power controller (the operator's, POLCA's two thresholds, none)
and compared with the original fleet under no controller.

A ratio holds for a controller when no domain stays above its budget longer than one control
period and high-priority requests lose at most `max_loss` at p99 on TTFT and on TBT. The
answer per controller is the largest ratio up to which every ratio holds, as added servers
(ratio - 1).

`fleetwise sim faults`: the configured faults with the fault detector and without it, goodput
(requests meeting both objectives per second) against the same fleet healthy.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .power import PowerConfig
from .results import SimResult
from .run import SimConfig, config_from_dict, run_simulation


@dataclass
class StudyRow:
    ratio: float
    controller: str
    gpus: int
    ttft_p50_s: float            # high priority
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    ttft_p99_loss: float         # against the original fleet, uncontrolled
    tbt_p99_loss: float
    over_budget_s: float         # summed over domains
    longest_over_budget_s: float
    cap_changes: int
    mean_of_budget: float        # the domains' mean power over their budgets (the mean of the ratios)
    peak_of_budget: float        # the highest one-second sample over its domain's budget
    holds: bool


@dataclass
class Study:
    rows: list[StudyRow]
    added_servers: dict[str, float]   # per controller: the largest ratio that holds, less one
    period_s: float
    max_loss: float


def grown(base: SimConfig, ratio: float) -> SimConfig:
    """The fleet `ratio` times as large, with `ratio` times the load, in the original budget."""
    pools = [replace(p, count=max(1, round(p.count * ratio))) for p in base.pools]
    real = sum(p.count * p.tp for p in pools) / sum(p.count * p.tp for p in base.pools)
    layout = replace(base.layout, oversubscription=base.layout.oversubscription * real)
    config = replace(base, pools=pools, layout=layout)
    if base.poisson_rate is not None:
        return replace(config, poisson_rate=base.poisson_rate * real)
    return replace(config, rate_scale=base.rate_scale * real)


def _high(result: SimResult) -> tuple[float, float, float, float]:
    p = result.by_priority.get("High") or next(iter(result.by_priority.values()))
    return p["ttft_s"].p50, p["ttft_s"].p99, p["tbt_s"].p50, p["tbt_s"].p99


def study(base: SimConfig, ratios: list[float],
          controllers: tuple[str, ...] = ("fleetwise", "fleetwise-mean", "polca", "none"),
          max_loss: float = 0.01, progress: Callable[[str], None] | None = None) -> Study:
    power = base.power or PowerConfig()
    reference = run_simulation(replace(base, power=replace(power, controller="none")))
    _, ref_ttft, _, ref_tbt = _high(reference)
    rows = []
    for ratio in ratios:
        for controller in controllers:
            if progress is not None:
                progress(f"ratio {ratio:.2f}, {controller}")
            config = grown(replace(base, power=replace(power, controller=controller)), ratio)
            result = run_simulation(config)
            ttft50, ttft99, tbt50, tbt99 = _high(result)
            domains = result.power or []
            longest = max((d.longest_over_budget_s for d in domains), default=0.0)
            ttft_loss, tbt_loss = ttft99 / ref_ttft - 1, tbt99 / ref_tbt - 1
            holds = longest <= power.period_s and max(ttft_loss, tbt_loss) <= max_loss
            rows.append(StudyRow(ratio, controller, sum(p.count * p.tp for p in config.pools), ttft50, ttft99,
                                 tbt50, tbt99, ttft_loss, tbt_loss, sum(d.over_budget_s for d in domains), longest,
                                 sum(d.cap_changes for d in domains),
                                 sum(d.mean_watts / d.budget_watts for d in domains) / max(1, len(domains)),
                                 max((d.peak_watts / d.budget_watts for d in domains), default=0.0), holds))
    added = {}
    for controller in controllers:   # the ratios up to the first that fails
        best = 1.0
        for r in sorted((r for r in rows if r.controller == controller), key=lambda r: r.ratio):
            if not r.holds:
                break
            best = r.ratio
        added[controller] = best - 1
    return Study(rows, added, power.period_s, max_loss)


def main(config_path: Path, ratios: list[float], out: Path | None, plot: Path | None = None) -> int:
    """`fleetwise sim power CONFIG`: the study with a progress bar, a table, and JSON."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    base = config_from_dict(yaml.safe_load(config_path.read_text()))
    runs = 1 + len(ratios) * 4
    with Progress(transient=True) as bar:
        task = bar.add_task("oversubscription study", total=runs)
        result = study(base, ratios, progress=lambda what: bar.update(task, advance=1, description=what))
    table = Table(title=f"High priority, p50/p99 and p99 loss (TTFT/TBT) against ratio 1; power's mean and peak "
                        f"of the budget; time over budget (all domains, longest run); at most "
                        f"{result.max_loss:.0%} loss and one period over")
    for column in ("ratio", "control", "GPUs", "TTFT s", "TBT ms", "p99 loss", "mean/peak", "over s", "max s", "caps",
                   "ok"):
        table.add_column(column)
    for r in result.rows:
        table.add_row(f"{r.ratio:.2f}", r.controller, str(r.gpus), f"{r.ttft_p50_s:.3f}/{r.ttft_p99_s:.3f}",
                      f"{r.tbt_p50_s * 1e3:.1f}/{r.tbt_p99_s * 1e3:.1f}",
                      f"{r.ttft_p99_loss:+.1%}/{r.tbt_p99_loss:+.1%}",
                      f"{r.mean_of_budget:.0%}/{r.peak_of_budget:.0%}", f"{r.over_budget_s:.0f}",
                      f"{r.longest_over_budget_s:.0f}", str(r.cap_changes), "yes" if r.holds else "no")
    console = Console(width=max(Console().width, 130))
    console.print(table)
    for controller, added in result.added_servers.items():
        console.print(f"{controller}: {added:+.0%} servers in the same budget")
    if out is not None:
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    if plot is not None:
        from .plots import study_plot
        console.print(study_plot(result.rows, plot))
    return 0


@dataclass
class FaultComparison:
    goodput_with: float          # requests meeting both objectives per second, detector on
    goodput_without: float
    goodput_healthy: float       # the same fleet and trace with no fault
    lost_with: float             # of the healthy goodput
    lost_without: float
    with_detector: SimResult
    without_detector: SimResult


def fault_comparison(config: SimConfig) -> FaultComparison:
    """The configured faults with the detector and without it, against a healthy run."""
    if config.faults is None:
        raise ValueError("a fault comparison needs a `faults` section")
    runs = [run_simulation(replace(config, faults=replace(config.faults, detector=on))) for on in (True, False)]
    healthy = run_simulation(replace(config, faults=replace(config.faults, faults=[], detector=False)))

    def goodput(r: SimResult) -> float:
        return r.both_attained * r.requests / r.duration_s if r.duration_s > 0 else 0.0
    base = goodput(healthy)
    g_with, g_without = goodput(runs[0]), goodput(runs[1])
    return FaultComparison(g_with, g_without, base, 1 - g_with / base, 1 - g_without / base, runs[0], runs[1])


def faults_main(config_path: Path, out: Path | None) -> int:
    from rich.console import Console

    config = config_from_dict(yaml.safe_load(config_path.read_text()))
    console = Console(width=max(Console().width, 130))
    with console.status("three runs: with the detector, without, healthy"):
        c = fault_comparison(config)
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
    if out is not None:
        out.write_text(json.dumps(asdict(c), indent=2, default=str) + "\n")
    return 0
