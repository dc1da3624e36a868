"""`fleetwise plan`: the cheapest fleet that serves a trace at a target rate within its latency
objectives and a power budget. For each shape (prefill and decode GPU products, or one product
colocated) it finds the fewest decode workers that meet the objectives with prefill to spare,
then the fewest prefill workers with those decode workers, each by doubling then bisection over
short simulations (the objectives get better with more workers, so the search is monotone).
With a power budget, a fleet whose nameplate is over the budget runs oversubscribed, up to
`max_oversubscription`, with the operator's power controller in the loop, so capping is in the
latency it is judged by. Cost is GPU-hours at `gpu_hourly_usd` (assumed list prices, not
quotes: set your own). The search stops at `time_budget_s` and says so.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fleetwise import gpus

from . import trace
from .nodes import Layout
from .perf import perf_model
from .power import PowerConfig
from .run import DEFAULT_TRACE, PoolConfig, SimConfig, run_simulation

GPU_HOURLY_USD = {"H100": 4.0, "H200": 5.0, "B200": 7.0, "A100": 2.0, "L40S": 1.2}   # assumed
MAX_WORKERS = 4096


@dataclass
class PlanConfig:
    rate: float                           # requests per second to serve (Poisson, trace lengths)
    trace: str = str(DEFAULT_TRACE)
    slo_ttft_s: float = 1.0
    slo_tbt_s: float = 0.1
    attainment: float = 0.99              # of requests meeting both objectives
    shapes: list[str] = field(default_factory=lambda: ["H100/H100", "A100/A100", "H100/A100", "H100"])
    model: str = "llama2-70b"
    tp: int = 4
    trial_s: float = 120.0                # simulated seconds per trial
    power_budget_watts: float | None = None   # the whole fleet's; None: no limit
    max_oversubscription: float = 1.0
    gpu_hourly_usd: dict[str, float] = field(default_factory=lambda: dict(GPU_HOURLY_USD))
    time_budget_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.trial_s <= 0 or not 0 < self.attainment <= 1:
            raise ValueError("rate and trial_s must be positive, attainment in (0, 1]")
        for shape in self.shapes:
            if len(shape.split("/")) > 2 or not all(shape.split("/")):
                raise ValueError(f"shapes: {shape!r} is PREFILL/DECODE (disaggregated) or one product (colocated)")


@dataclass
class Candidate:
    shape: str
    prefill: int                  # workers (0 when colocated)
    decode: int                   # workers, or mixed workers when colocated
    gpus: int
    usd_per_hour: float
    nameplate_kw: float
    oversubscription: float
    attainment: float
    ttft_p99_s: float
    tbt_p99_s: float
    meets: bool


@dataclass
class Plan:
    best: Candidate | None
    candidates: list[Candidate]
    trials: int
    complete: bool                # False: the time budget ran out first
    wall_s: float


class _Search:
    def __init__(self, config: PlanConfig, progress: Callable[[str], None] | None) -> None:
        self.config, self.progress = config, progress
        self.requests = trace.poisson(trace.read_trace(config.trace), config.rate, config.trial_s, config.seed)
        self.started = time.perf_counter()
        self.trials = 0
        self.seen: dict[tuple[str, int, int], Candidate] = {}

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.config.time_budget_s

    def products(self, shape: str) -> tuple[str, str | None]:
        parts = shape.split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)

    def fleet(self, shape: str, prefill: int, decode: int) -> tuple[SimConfig, Candidate]:
        c = self.config
        first, second = self.products(shape)
        if second is None:
            pools = [PoolConfig("mixed", decode, first, c.model, c.tp)]
        else:
            pools = [PoolConfig("prefill", prefill, first, c.model, c.tp),
                     PoolConfig("decode", decode, second, c.model, c.tp)]
        n_gpus = sum(p.count * p.tp for p in pools)
        usd = sum(p.count * p.tp * c.gpu_hourly_usd.get(p.gpu, math.inf) for p in pools)
        nameplate = sum(p.count * p.tp * gpus.product(p.gpu).rated_watts for p in pools)
        ratio = max(1.0, nameplate / c.power_budget_watts) if c.power_budget_watts else 1.0
        sim = SimConfig(pools, mode="colocated" if second is None else "disaggregated", trace=c.trace,
                        slo_ttft_s=c.slo_ttft_s, slo_tbt_s=c.slo_tbt_s, seed=c.seed,
                        layout=Layout(oversubscription=ratio),
                        power=PowerConfig() if c.power_budget_watts else None)
        return sim, Candidate(shape, prefill if second else 0, decode, n_gpus, usd, nameplate / 1e3, ratio,
                              0.0, math.nan, math.nan, False)

    def meets(self, shape: str, prefill: int, decode: int) -> bool | None:
        """Whether the fleet meets the objectives; None when it is over the power budget
        (more workers will not fit either)."""
        key = (shape, prefill, decode)
        if key not in self.seen:
            sim, cand = self.fleet(shape, prefill, decode)
            if cand.oversubscription <= self.config.max_oversubscription and math.isfinite(cand.usd_per_hour):
                if self.progress is not None:
                    self.progress(f"{shape}: {prefill} prefill, {decode} decode")
                result = run_simulation(replace(sim, poisson_rate=None), requests=self.requests)
                self.trials += 1
                cand = replace(cand, attainment=result.both_attained, ttft_p99_s=result.ttft_s.p99,
                               tbt_p99_s=result.tbt_s.p99, meets=result.both_attained >= self.config.attainment)
            self.seen[key] = cand
        cand = self.seen[key]
        return None if cand.oversubscription > self.config.max_oversubscription else cand.meets

    def fewest(self, test: Callable[[int], bool | None], start: int) -> int | None:
        """The smallest n with test(n), by doubling from `start` then bisection; None when
        even MAX_WORKERS fails, the power budget is passed first, or time runs out."""
        lo, hi = 0, max(1, start)
        while not (ok := test(hi)):
            if ok is None or hi >= MAX_WORKERS or self.out_of_time():
                return None
            lo, hi = hi, min(MAX_WORKERS, hi * 2)
        while hi - lo > 1 and not self.out_of_time():
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if test(mid) else (mid, hi)
        return hi

    def estimate(self, shape: str) -> tuple[int, int]:
        """Workers that would be busy all the time: where the doubling starts."""
        c = self.config
        first, second = self.products(shape)
        prompt = sum(r.prompt_tokens for r in self.requests) / c.trial_s
        output = sum(r.output_tokens for r in self.requests) / c.trial_s
        p = perf_model(first, c.model, c.tp)
        d = perf_model(second or first, c.model, c.tp)
        prefill = math.ceil(prompt * p.prompt_ms(8192) / 8192 / 1e3)
        decode = math.ceil(output * d.token_ms(64, 64 * 1500) / 64 / 1e3)
        return max(1, prefill), max(1, decode)

    def spare_prefill(self, shape: str, prefill0: int, decode0: int) -> int:
        """Prefill to spare while the decode count is searched: four times the estimate, or
        as many as the power budget leaves room for beside twice the decode estimate."""
        c = self.config
        if not c.power_budget_watts:
            return 4 * prefill0
        first, second = self.products(shape)
        decode_watts = 2 * decode0 * c.tp * gpus.product(second or first).rated_watts
        room = c.power_budget_watts * c.max_oversubscription - decode_watts
        return max(prefill0, min(4 * prefill0, int(room // (c.tp * gpus.product(first).rated_watts))))

    def shape(self, shape: str) -> None:
        prefill0, decode0 = self.estimate(shape)
        if self.products(shape)[1] is None:
            self.fewest(lambda n: self.meets(shape, 0, n), prefill0 + decode0)
            return
        spare = self.spare_prefill(shape, prefill0, decode0)
        decode = self.fewest(lambda n: self.meets(shape, spare, n), decode0)
        if decode is not None:
            self.fewest(lambda n: self.meets(shape, n, decode), prefill0)


def plan(config: PlanConfig, progress: Callable[[str], None] | None = None) -> Plan:
    search = _Search(config, progress)
    for shape in config.shapes:
        if search.out_of_time():
            break
        search.shape(shape)
    candidates = sorted(search.seen.values(), key=lambda c: (not c.meets, c.usd_per_hour))
    best = candidates[0] if candidates and candidates[0].meets else None
    return Plan(best, candidates, search.trials, not search.out_of_time(), time.perf_counter() - search.started)


def main(config: PlanConfig, out: Path | None = None) -> int:
    """Runs the search with a progress bar against the time budget; prints the candidates."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[trials]} trials"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("planning", total=config.time_budget_s, trials=0)
        started = time.perf_counter()
        trials = [0]

        def step(what: str) -> None:
            trials[0] += 1
            bar.update(task, completed=time.perf_counter() - started, description=what, trials=trials[0])
        result = plan(config, step)
    table = Table(title=f"{config.rate:g} requests/s, TTFT <= {config.slo_ttft_s:g} s and TBT <= "
                        f"{config.slo_tbt_s:g} s for {config.attainment:.0%} of requests")
    for column in ("shape", "prefill", "decode", "GPUs", "$/h", "kW", "oversub", "attained", "TTFT p99", "TBT p99"):
        table.add_column(column)
    for c in [c for c in result.candidates if c.meets][:10]:
        table.add_row(c.shape, str(c.prefill), str(c.decode), str(c.gpus), f"{c.usd_per_hour:.0f}",
                      f"{c.nameplate_kw:.0f}", f"{c.oversubscription:.2f}", f"{c.attainment:.3f}",
                      f"{c.ttft_p99_s:.2f}", f"{c.tbt_p99_s * 1e3:.0f} ms")
    console.print(table)
    if result.best is None:
        console.print("no fleet tried meets the objectives" + ("" if result.complete else " (time ran out)"))
    else:
        b = result.best
        console.print(f"cheapest: {b.shape} with {b.prefill} prefill and {b.decode} decode workers "
                      f"({b.gpus} GPUs, ${b.usd_per_hour:.0f}/h, {b.nameplate_kw:.0f} kW nameplate)")
    console.print(f"{result.trials} trials in {result.wall_s:.0f} s" +
                  ("" if result.complete else f"; stopped at the time budget of {config.time_budget_s:.0f} s"))
    if out is not None:
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.best is not None else 1
