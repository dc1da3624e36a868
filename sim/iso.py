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

`splitwise-sim` definitions, each switched on alone or all together, are SplitwiseSim's own where
they differ from ours (its source: github.com/Mutinifni/splitwise-sim):
- objectives: the same bounds, met strictly (notebooks/utils.py `find_within_slo`), at pandas'
  interpolated quantiles, over slowdowns against a fixed reference (notebooks/perf_model.py
  `add_baseline_perf`: the A100 TP8 profile's prompt time at the request's prompt size, and its
  token-time curve, keyed by batched prompt tokens, read at the prompt size as the time per
  token); TBT is (end to end - TTFT) / output tokens (scheduler.py `get_results`).
- step times: its performance model (performance_model.py): token steps from that same curve read at
  the batch size, so nearly flat up to 512 sequences, and no context term (`perf.splitwise_sim_model`).
- batching: its instance (configs/start_state/baseline.yaml and splitwise.yaml, instance.py): at
  most 2048 tokens an iteration, decodes included, whole prompts (no chunking), 512 sequences,
  its memory (whole GPU memory less its 329 GB model), a pass carrying decodes timed as a
  prompt pass over prompt and decode tokens, times 1.1, and its 200 GiB/s KV link
  (configs/orchestrator_repo/schedulers/mixed_pool.yml).
- routing: a prompt goes to the machine with the fewest pending tokens (scheduler.py
  `TokenJSQScheduler`, the baseline's, and `MixedPoolScheduler`'s prompt choice), not the fewest
  outstanding requests. Not modelled: the mixed pool lending a token machine to prompts when
  every prompt machine has over 8192 tokens queued, and the reverse when memory runs out.
"""

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fleetwise import gpus

from . import trace
from .engine import Settings, Simulation
from .perf import PROFILE_CONTEXT, PerfModel, perf_model, splitwise_sim_kv_capacity, splitwise_sim_model
from .results import percentiles
from .run import DEFAULT_TRACE, PoolConfig, SimConfig
from .trace import Request
from .workers import Flight, Pool, Worker

SLO = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}   # p50, p90, p99 slowdown
OURS, SPLITWISE_SIM, CONTEXT_FREE = "fleetwise", "splitwise-sim", "context-free"
STEPS = (OURS, CONTEXT_FREE, SPLITWISE_SIM)
SPLITWISE_SIM_LINK_GBPS = 200 * 2**30 * 8 / 1e9   # its KV link, 200 GiB/s a machine, in Gb/s
MIXED_PASS = 1.1          # SplitwiseSim's cost of a pass that carries decodes, over a prompt pass of its tokens


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
    context_free: bool = False        # token steps by batch alone, without the KV-read term
    seed: int = 0
    objectives: str = OURS            # or splitwise-sim: its reference, TBT, quantiles (module docstring)
    step_times: str = OURS            # or context-free, splitwise-sim: whose step times the machines take
    batching: str = OURS              # or splitwise-sim: its iteration limits, memory, mixed passes, link
    routing: str = OURS               # or splitwise-sim: prompts to the fewest pending tokens

    def __post_init__(self) -> None:
        for name, allowed in (("objectives", (OURS, SPLITWISE_SIM)), ("step_times", STEPS),
                              ("batching", (OURS, SPLITWISE_SIM)), ("routing", (OURS, SPLITWISE_SIM))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.context_free:
            self.step_times = CONTEXT_FREE


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
    definitions: dict[str, str] = field(default_factory=dict)   # objectives, step_times, batching, routing


def context_free(perf: PerfModel) -> PerfModel:
    """The profile's token time by batch alone, as SplitwiseSim has it: its rows' own cache read
    (PROFILE_CONTEXT a sequence) folded back into the batch curve, nothing for a longer context."""
    points = tuple((b, ms + perf.kv_ms_per_token * b * PROFILE_CONTEXT) for b, ms in perf.token_points)
    return replace(perf, token_points=points, kv_ms_per_token=0.0)


def reference(config: IsoConfig) -> PerfModel:
    """The machines' step times: ours, ours without the context term, or SplitwiseSim's."""
    args = (config.gpu, config.model, config.gpus_per_machine)
    if config.step_times == SPLITWISE_SIM:
        perf = splitwise_sim_model(*args)
    else:
        perf = perf_model(*args)
        perf = context_free(perf) if config.step_times == CONTEXT_FREE else perf
    if config.batching == SPLITWISE_SIM:
        perf = replace(perf, kv_capacity=splitwise_sim_kv_capacity(config.model, config.gpus_per_machine))
    return perf


@dataclass(eq=False)
class _MixedPassPool(Pool):
    """SplitwiseSim's pass that carries decodes: a prompt pass over its prompt and decode tokens,
    1.1 times as long (performance_model.py `get_iteration_duration`)."""

    def prompt_step(self, tokens: int, decodes: int, cap: float | None) -> tuple[float, float]:
        seconds, watts = super().prompt_step(tokens + decodes, decodes, cap)
        return (seconds * MIXED_PASS if decodes else seconds), watts


class _PendingTokensSimulation(Simulation):
    """SplitwiseSim's choice of the machine for a prompt (scheduler.py: `TokenJSQScheduler` for
    Baseline-A100, `MixedPoolScheduler`'s prompt instance for Splitwise-AA): the fewest pending
    tokens, each unfinished prompt's tokens plus one for each request it still serves (ties to the
    first). Decodes keep the router's policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[Worker, int] = {w: 0 for w in self.workers}

    def route(self, role: str, priority: str = "High", req: Request | None = None) -> Worker:
        if role == "decode" or req is None:
            return super().route(role, priority, req)
        replicas = self.replicas[self.route_key[(role, priority)]]
        best = min((r for r in replicas if r.available),
                   key=lambda r: self.pending[self.by_url[r.url]] + r.outstanding, default=None)
        if best is None:
            raise RuntimeError(f"no {role} replica is available")
        best.outstanding += 1
        w = self.by_url[best.url]
        self.pending[w] += req.prompt_tokens
        return w

    def prefill_done(self, w: Worker, version: int) -> None:
        if version == w.passes:
            self.pending[w] -= sum(f.req.prompt_tokens for f in w.prefilling)
        super().prefill_done(w, version)


def simulation(config: IsoConfig, prompt_machines: int) -> Simulation:
    c = fleet(config, prompt_machines)
    kind = _MixedPassPool if config.batching == SPLITWISE_SIM else Pool
    perf = reference(config)
    sim = _PendingTokensSimulation if config.routing == SPLITWISE_SIM else Simulation
    return sim([(kind(p.name or p.role, p.role, gpus.product(p.gpu), perf), p.count) for p in c.pools],
               c.settings, c.policy)


def _quantiles(values: list[float]) -> list[float]:
    """p50, p90, p99 interpolated between order statistics, as pandas' `quantile`."""
    if len(values) < 2:
        return [values[0] if values else math.nan] * 3
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[49], cuts[89], cuts[98]]


def slowdowns(flights: list[Flight], config: IsoConfig) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
    if config.objectives == SPLITWISE_SIM:   # its fixed reference, whatever the machines' step times
        ref = splitwise_sim_model(config.gpu, config.model, config.gpus_per_machine)
        for f in flights:
            r = f.req
            ttft, per_token = ref.prompt_ms(r.prompt_tokens) / 1e3, ref.token_base_ms(r.prompt_tokens) / 1e3
            out["ttft"].append((f.first_token - r.arrival) / ttft)
            out["tbt"].append((f.done - f.first_token) / r.output_tokens / per_token)
            out["e2e"].append((f.done - r.arrival) / (ttft + per_token * (r.output_tokens - 1)))
        return {k: _quantiles(v) for k, v in out.items()}
    perf = reference(config)
    for f in flights:
        r = f.req
        ttft = perf.prompt_ms(r.prompt_tokens) / 1e3
        step = perf.token_ms(1, r.prompt_tokens + r.output_tokens / 2) / 1e3
        out["ttft"].append((f.first_token - r.arrival) / ttft)
        out["e2e"].append((f.done - r.arrival) / (ttft + step * (r.output_tokens - 1)))
        if r.output_tokens > 1:
            out["tbt"].append((f.done - f.first_token) / (r.output_tokens - 1) / step)
    return {k: [p.p50, p.p90, p.p99] for k, p in ((k, percentiles(v)) for k, v in out.items())}


def meets(s: dict[str, list[float]], config: IsoConfig) -> bool:
    """Every slowdown within its bound (strictly below it under SplitwiseSim's objectives)."""
    strict = config.objectives == SPLITWISE_SIM
    return all(q < bound if strict else q <= bound for k, bounds in SLO.items() for q, bound in zip(s[k], bounds))


def fleet(config: IsoConfig, prompt_machines: int) -> SimConfig:
    tp, m = config.gpus_per_machine, config.machines
    if prompt_machines == 0:
        pools = [PoolConfig("mixed", m, config.gpu, config.model, tp)]
    else:
        pools = [PoolConfig("prefill", prompt_machines, config.gpu, config.model, tp),
                 PoolConfig("decode", m - prompt_machines, config.gpu, config.model, tp)]
    if config.batching == SPLITWISE_SIM:
        settings = Settings(prompt_budget=2048, chunked_prefill=False, max_batch=512,
                            link_gbps_per_gpu=SPLITWISE_SIM_LINK_GBPS / tp)
    else:
        settings = Settings(prompt_budget=config.prompt_budget, link_gbps_per_gpu=config.link_gbps_per_gpu)
    return SimConfig(pools, mode="colocated" if prompt_machines == 0 else "disaggregated", trace=config.trace,
                     seed=config.seed, settings=settings)


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
        ok = meets(s, c)
        self.trials.append(Trial(name, prompt_machines, rate, len(flights), s, ok))
        return ok

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
                     dict(sorted(by_split.items())), search.trials, config.machines, time.perf_counter() - started,
                     {"objectives": config.objectives, "step_times": config.step_times, "batching": config.batching,
                      "routing": config.routing})


def main(config: IsoConfig, out: Path | None, plot: Path | None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=max(Console().width, 110))
    trials = 2 + config.steps
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("iso-power", total=trials * (len(config.splits) + 3))   # at most
        result = iso_power(config, lambda what: bar.update(task, advance=1, description=what))
    console.print(f"{config.machines} DGX-{config.gpu} machines, {config.model}, conversation lengths, Poisson "
                  f"arrivals, {config.trial_s:.0f} s trials; objectives {config.objectives}, step times "
                  f"{config.step_times}, batching {config.batching}, routing {config.routing}")
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
