"""`fleetwise sim iso`: phase splitting at iso-power, Splitwise's headline comparison. BLOOM-176B
on DGX-A100 machines (8 GPUs, one tensor-parallel instance each; 70 of them are the paper's
iso-power budget of 40 DGX-H100), the conversation trace's lengths with Poisson arrivals (as
SplitwiseSim's request-rate traces). Baseline-A100 serves both phases on every machine
(colocated); Splitwise-AA splits the same machines into prompt and token machines, the split
searched. For each, the highest rate at which the fleet meets Splitwise's objectives, by
bisection over short runs; the answer is the ratio of the two rates.

The objectives are slowdowns over the request served alone on an idle machine of the fleet
(the perf model's prompt pass for its prompt; one token step of batch 1 at its mean context per
output token), at p50, p90 and p99: TTFT 2, 3, 6x; TBT 1.25, 1.5, 5x; end to end 1.25, 1.5, 5x
(the paper's Table of SLOs as we read it). TBT here is a request's mean gap between tokens.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import trace
from .engine import Settings, Simulation
from .perf import PROFILE_CONTEXT, PerfModel, perf_model
from .results import percentiles
from .run import DEFAULT_TRACE, PoolConfig, SimConfig, build
from .workers import Flight

SLO = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}   # p50, p90, p99 slowdown


@dataclass
class IsoConfig:
    machines: int = 70
    gpu: str = "A100"
    model: str = "bloom-176b"
    gpus_per_machine: int = 8
    trace: str = str(DEFAULT_TRACE)
    trial_s: float = 120.0            # simulated seconds of arrivals per trial
    rate_lo: float = 5.0              # requests/s: the bisection's bounds
    rate_hi: float = 250.0
    steps: int = 6                    # bisection steps per fleet (rate_hi / rate_lo = 50: about 1.9x)
    splits: list[int] = field(default_factory=lambda: [25, 35, 45])   # prompt machines tried first, then +-5
    link_gbps_per_gpu: float = 200.0  # DGX-A100: eight 200 Gb/s InfiniBand ports
    prompt_budget: int = 2048         # batched prompt tokens a pass: the profile's most tokens per second
    context_free: bool = False        # token steps by batch alone (SplitwiseSim's), without the KV-read term
    seed: int = 0


@dataclass
class Trial:
    fleet: str
    prompt_machines: int              # 0: colocated
    rate: float
    requests: int
    slowdown: dict[str, list[float]]  # ttft, tbt, e2e: p50, p90, p99
    meets: bool


@dataclass
class IsoResult:
    baseline_rate: float              # Baseline-A100's highest rate meeting the objectives
    split_rate: float                 # Splitwise-AA's, at its best split
    best_split: int                   # prompt machines (the rest token)
    ratio: float
    by_split: dict[int, float]        # prompt machines -> highest rate
    trials: list[Trial]
    machines: int
    wall_s: float


def context_free(perf: PerfModel) -> PerfModel:
    """The profile's token time by batch alone, as SplitwiseSim has it: its rows' own cache read
    (PROFILE_CONTEXT a sequence) folded back into the batch curve, nothing for a longer context."""
    points = tuple((b, ms + perf.kv_ms_per_token * b * PROFILE_CONTEXT) for b, ms in perf.token_points)
    return replace(perf, token_points=points, kv_ms_per_token=0.0)


def reference(config: IsoConfig) -> PerfModel:
    perf = perf_model(config.gpu, config.model, config.gpus_per_machine)
    return context_free(perf) if config.context_free else perf


def simulation(config: IsoConfig, prompt_machines: int) -> Simulation:
    sim = build(fleet(config, prompt_machines))
    if config.context_free:
        for pool in {id(w.pool): w.pool for w in sim.workers}.values():
            pool.perf = context_free(pool.perf)
            pool._steps.clear()
            pool._token_steps.clear()
        for w in sim.workers:
            w.set_cap(w.cap_watts)   # its step times from the new model
    return sim


def slowdowns(flights: list[Flight], config: IsoConfig) -> dict[str, list[float]]:
    perf = reference(config)
    out: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
    for f in flights:
        r = f.req
        ttft = perf.prompt_ms(r.prompt_tokens) / 1e3
        step = perf.token_ms(1, r.prompt_tokens + r.output_tokens / 2) / 1e3
        out["ttft"].append((f.first_token - r.arrival) / ttft)
        out["e2e"].append((f.done - r.arrival) / (ttft + step * (r.output_tokens - 1)))
        if r.output_tokens > 1:
            out["tbt"].append((f.done - f.first_token) / (r.output_tokens - 1) / step)
    return {k: [p.p50, p.p90, p.p99] for k, p in ((k, percentiles(v)) for k, v in out.items())}


def fleet(config: IsoConfig, prompt_machines: int) -> SimConfig:
    tp, m = config.gpus_per_machine, config.machines
    if prompt_machines == 0:
        pools = [PoolConfig("mixed", m, config.gpu, config.model, tp)]
    else:
        pools = [PoolConfig("prefill", prompt_machines, config.gpu, config.model, tp),
                 PoolConfig("decode", m - prompt_machines, config.gpu, config.model, tp)]
    return SimConfig(pools, mode="colocated" if prompt_machines == 0 else "disaggregated", trace=config.trace,
                     seed=config.seed, settings=Settings(prompt_budget=config.prompt_budget,
                                                                   link_gbps_per_gpu=config.link_gbps_per_gpu))


class _Search:
    def __init__(self, config: IsoConfig, progress: Callable[[str], None] | None) -> None:
        self.config, self.progress = config, progress
        self.rows = trace.read_trace(config.trace)
        self.trials: list[Trial] = []

    def trial(self, prompt_machines: int, rate: float) -> bool:
        c = self.config
        name = "Baseline-A100" if prompt_machines == 0 else f"Splitwise-AA {prompt_machines}P/" \
                                                            f"{c.machines - prompt_machines}T"
        if self.progress is not None:
            self.progress(f"{name} at {rate:.1f}/s")
        requests = trace.poisson(self.rows, rate, c.trial_s, c.seed)
        flights = simulation(c, prompt_machines).run(requests)
        s = slowdowns(flights, c)
        meets = all(q <= bound for k, bounds in SLO.items() for q, bound in zip(s[k], bounds))
        self.trials.append(Trial(name, prompt_machines, rate, len(flights), s, meets))
        return meets

    def max_rate(self, prompt_machines: int) -> float:
        """The highest rate meeting the objectives, by bisection in `steps` (0 if even rate_lo fails)."""
        lo, hi = self.config.rate_lo, self.config.rate_hi
        if not self.trial(prompt_machines, lo):
            return 0.0
        if self.trial(prompt_machines, hi):
            return hi
        for _ in range(self.config.steps):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.trial(prompt_machines, mid) else (lo, mid)
        return lo


def iso_power(config: IsoConfig, progress: Callable[[str], None] | None = None) -> IsoResult:
    started = time.perf_counter()
    search = _Search(config, progress)
    baseline = search.max_rate(0)
    by_split = {p: search.max_rate(p) for p in config.splits if 0 < p < config.machines}
    best = max(by_split, key=lambda p: by_split[p])
    for p in (best - 5, best + 5):   # a finer look either side of the best of the grid
        if 0 < p < config.machines and p not in by_split:
            by_split[p] = search.max_rate(p)
    best = max(by_split, key=lambda p: by_split[p])
    split = by_split[best]
    return IsoResult(baseline, split, best, split / baseline if baseline > 0 else math.inf,
                     dict(sorted(by_split.items())), search.trials, config.machines, time.perf_counter() - started)


def main(config: IsoConfig, out: Path | None, plot: Path | None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=max(Console().width, 110))
    trials = 2 + config.steps
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("iso-power", total=trials * (len(config.splits) + 3))   # at most
        result = iso_power(config, lambda what: bar.update(task, advance=1, description=what))
    steps = ", context-free token steps" if config.context_free else ""
    console.print(f"{config.machines} DGX-{config.gpu} machines, {config.model}, conversation lengths, Poisson "
                  f"arrivals, {config.trial_s:.0f} s trials{steps}")
    for p, rate in result.by_split.items():
        console.print(f"  Splitwise-AA {p}P/{config.machines - p}T: {rate:.1f} requests/s")
    console.print(f"Baseline-A100 {result.baseline_rate:.1f} requests/s; Splitwise-AA {result.split_rate:.1f} at "
                  f"{result.best_split}P/{config.machines - result.best_split}T: {result.ratio:.2f}x "
                  f"(paper 2.15x; SplitwiseSim >= 110 against 50, 2.2x); {len(result.trials)} trials in "
                  f"{result.wall_s:.0f} s")
    if out is not None:
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    if plot is not None:
        from .plots import iso_plot
        console.print(iso_plot(result, plot))
    return 0
