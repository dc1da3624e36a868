"""`fleetwise sim power`: how far a row's power can be oversubscribed. The row keeps the power
domains and budgets sized for its original servers (their GPUs' nameplate); the study grows the
servers in it by a ratio, and the offered load with them (so each server sees the same load),
and runs the grown row with each power controller (the operator's, the same reading 5 s means
only, POLCA's two thresholds) and with none.

A ratio holds for a controller when no domain stays above its budget longer than one control
period and high-priority requests lose at most `max_loss` at p99, on TTFT and on TBT, against
the same grown row with no power limit acted on (the run with no controller: what the capping
costs, apart from what a larger fleet's statistics change). The answer per controller is the
largest ratio up to which every ratio holds, as added servers (ratio - 1).
"""

import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from fleetwise import gpus

from .power import PowerConfig
from .results import SimResult
from .run import SimConfig, config_from_dict, run_simulation

CONTROLLERS = ("fleetwise", "polca", "none")   # and fleetwise-mean, on request


@dataclass
class StudyRow:
    ratio: float
    controller: str
    gpus: int
    ttft_p50_s: float            # high priority
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    ttft_p99_loss: float         # against the same row with no controller
    tbt_p99_loss: float
    low_ttft_p99_loss: float     # low priority, the same way (it is not judged)
    low_tbt_p99_loss: float
    over_budget_s: float         # summed over domains
    longest_over_budget_s: float
    cap_changes: int
    mean_of_budget: float        # the domains' mean power over their budgets (the mean of the ratios)
    peak_of_budget: float        # the highest one-second sample over its domain's budget
    capped_high: float           # of high-priority GPU-time, the share under a cap (all domains)
    capped_low: float
    holds: bool


@dataclass
class Study:
    rows: list[StudyRow]
    added_servers: dict[str, float]   # per controller: the largest ratio that holds, less one
    period_s: float
    max_loss: float
    budget_watts: float               # per domain, sized for the original servers
    domains: int


def row_layout(base: SimConfig) -> tuple[float, int]:
    """The original row's budget per domain and its number of domains (one GPU product)."""
    families = {gpus.product(p.gpu).family for p in base.pools}
    if len(families) != 1:
        raise ValueError(f"the oversubscription study takes pools of one GPU product, not {sorted(families)}")
    layout = base.layout
    nodes = math.ceil(sum(p.count * p.tp for p in base.pools) / layout.gpus_per_node)
    domains = math.ceil(nodes / layout.nodes_per_domain)
    budget = layout.domain_watts or (layout.nodes_per_domain * layout.gpus_per_node
                                     * gpus.product(base.pools[0].gpu).rated_watts / layout.oversubscription)
    return budget, domains


def grown(base: SimConfig, ratio: float) -> SimConfig:
    """`ratio` times the servers in the same domains and budgets, with `ratio` times the load."""
    budget, domains = row_layout(base)
    pools = [replace(p, count=max(1, round(p.count * ratio))) for p in base.pools]
    real = sum(p.count * p.tp for p in pools) / sum(p.count * p.tp for p in base.pools)
    gpn = base.layout.gpus_per_node
    per_domain = math.ceil(math.ceil(sum(p.count * p.tp for p in pools) / gpn) / domains)
    nameplate = per_domain * gpn * gpus.product(base.pools[0].gpu).rated_watts
    layout = replace(base.layout, nodes_per_domain=per_domain, domain_watts=budget,
                     oversubscription=max(1.0, nameplate / budget))
    config = replace(base, pools=pools, layout=layout)
    if base.poisson_rate is not None:
        return replace(config, poisson_rate=base.poisson_rate * real)
    return replace(config, rate_scale=base.rate_scale * real)


def _p99(result: SimResult, priority: str) -> tuple[float, float]:
    p = result.by_priority.get(priority)
    return (p["ttft_s"].p99, p["tbt_s"].p99) if p else (math.nan, math.nan)


def _row(ratio: float, controller: str, config: SimConfig, result: SimResult, reference: SimResult,
         power: PowerConfig, max_loss: float) -> StudyRow:
    high, low = result.by_priority["High"], _p99(result, "Low")
    (ref_ttft, ref_tbt), (ref_low_ttft, ref_low_tbt) = _p99(reference, "High"), _p99(reference, "Low")
    domains = result.power or []
    longest = max((d.longest_over_budget_s for d in domains), default=0.0)
    ttft_loss, tbt_loss = high["ttft_s"].p99 / ref_ttft - 1, high["tbt_s"].p99 / ref_tbt - 1

    def capped(priority: str) -> float:
        return sum(d.capped_share.get(priority, 0.0) for d in domains) / max(1, len(domains))
    return StudyRow(ratio, controller, sum(p.count * p.tp for p in config.pools), high["ttft_s"].p50,
                    high["ttft_s"].p99, high["tbt_s"].p50, high["tbt_s"].p99, ttft_loss, tbt_loss,
                    low[0] / ref_low_ttft - 1, low[1] / ref_low_tbt - 1,
                    sum(d.over_budget_s for d in domains), longest, sum(d.cap_changes for d in domains),
                    sum(d.mean_watts / d.budget_watts for d in domains) / max(1, len(domains)),
                    max((d.peak_watts / d.budget_watts for d in domains), default=0.0),
                    capped("High"), capped("Low"),
                    longest <= power.period_s and max(ttft_loss, tbt_loss) <= max_loss)


def study(base: SimConfig, ratios: list[float], controllers: tuple[str, ...] = CONTROLLERS,
          max_loss: float = 0.01, progress: Callable[[str], None] | None = None, jobs: int = 1) -> Study:
    """Every (ratio, controller) run, `jobs` at a time in processes of their own (each run is
    deterministic and independent of the others: the same rows whatever `jobs`)."""
    power = base.power or PowerConfig()
    order = ("none", *[c for c in controllers if c != "none"])   # the reference first
    configs = {(ratio, c): grown(replace(base, power=replace(power, controller=c)), ratio)
               for ratio in sorted(ratios) for c in order}
    results: dict[tuple[float, str], SimResult] = {}
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(run_simulation, config): key for key, config in configs.items()}
            for done in as_completed(futures):
                ratio, controller = key = futures[done]
                results[key] = done.result()
                if progress is not None:
                    progress(f"ratio {ratio:.2f}, {controller} done")
    else:
        for (ratio, controller), config in configs.items():
            if progress is not None:
                progress(f"ratio {ratio:.2f}, {controller}")
            results[ratio, controller] = run_simulation(config)
    rows = [_row(ratio, c, configs[ratio, c], results[ratio, c], results[ratio, "none"], power, max_loss)
            for ratio in sorted(ratios) for c in controllers]
    added = {}
    for controller in controllers:   # the ratios up to the first that fails
        best = 1.0
        for r in (r for r in rows if r.controller == controller):
            if not r.holds:
                break
            best = r.ratio
        added[controller] = best - 1
    budget, domains = row_layout(base)
    return Study(rows, added, power.period_s, max_loss, budget, domains)


def main(config_path: Path, ratios: list[float], out: Path | None, plot: Path | None = None,
         controllers: tuple[str, ...] = CONTROLLERS, jobs: int = 1) -> int:
    """`fleetwise sim power CONFIG`: the study with a progress bar, a table, and JSON."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    base = config_from_dict(yaml.safe_load(config_path.read_text()))
    runs = len(ratios) * len(set(controllers) | {"none"})
    with Progress(transient=True) as bar:
        task = bar.add_task("oversubscription study", total=runs)
        result = study(base, ratios, controllers,
                       progress=lambda what: bar.update(task, advance=1, description=what), jobs=jobs)
    table = Table(title=f"High priority p50/p99 and p99 loss (TTFT/TBT), low priority's p99 loss, against the same "
                        f"row with no controller; power's mean and peak of the budget; time over budget (all "
                        f"domains, longest run); share of GPU-time capped (high/low). A ratio holds with at most "
                        f"{result.max_loss:.0%} high-priority loss and one period ({result.period_s:g} s) over")
    for column in ("ratio", "control", "GPUs", "TTFT s", "TBT ms", "p99 loss", "low loss", "mean/peak", "over s",
                   "max s", "caps", "capped", "ok"):
        table.add_column(column)
    for r in result.rows:
        table.add_row(f"{r.ratio:.2f}", r.controller, str(r.gpus), f"{r.ttft_p50_s:.3f}/{r.ttft_p99_s:.3f}",
                      f"{r.tbt_p50_s * 1e3:.1f}/{r.tbt_p99_s * 1e3:.1f}",
                      f"{r.ttft_p99_loss:+.1%}/{r.tbt_p99_loss:+.1%}",
                      f"{r.low_ttft_p99_loss:+.0%}/{r.low_tbt_p99_loss:+.0%}",
                      f"{r.mean_of_budget:.0%}/{r.peak_of_budget:.0%}", f"{r.over_budget_s:.0f}",
                      f"{r.longest_over_budget_s:.0f}", str(r.cap_changes), f"{r.capped_high:.0%}/{r.capped_low:.0%}",
                      "yes" if r.holds else "no")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for controller, added in result.added_servers.items():
        console.print(f"{controller}: {added:+.0%} servers in the same budget")
    if out is not None:
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    if plot is not None:
        from .plots import study_plot
        console.print(study_plot(result.rows, plot))
    return 0
