"""One simulation from a configuration: `run_simulation(SimConfig) -> SimResult`, and
`python -m fleetwise.sim CONFIG.yaml [--out RESULT.json]` for a run from a YAML file (the keys
of `SimConfig`, pools as a list of `PoolConfig` mappings), with a progress bar on long runs.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fleetwise import gpus

from . import calibration, trace
from .engine import Settings, Simulation
from .faults import Fault, FaultConfig, FaultLoop
from .nodes import DOMAIN_LABEL, Layout, place_workers
from .perf import perf_model
from .power import PowerConfig, PowerLoop
from .results import SimResult, summarise
from .workers import Pool

DATA = Path(__file__).resolve().parents[1] / "data"
DEFAULT_TRACE = DATA / "azure-llm-trace-2023" / "AzureLLMInferenceTrace_conv.csv"


@dataclass
class PoolConfig:
    role: str                         # prefill | decode | mixed
    count: int                        # workers (replicas), each with `tp` GPUs
    gpu: str = "H100"
    model: str = "llama2-70b"
    tp: int = 4
    cap_watts: float | None = None    # per-GPU power cap; None: uncapped
    name: str = ""
    priority: str = "High"            # High | Low: Low pools serve settings.low_priority_share of requests
    profile: str | None = None        # a measured worker's step profile (calibration.py's JSON) instead of the GPU's
    urls: list[str] | None = None     # the workers' replica URLs (a real fleet's, to route as its router did)


@dataclass
class SimConfig:
    pools: list[PoolConfig]
    mode: str = "disaggregated"       # or colocated (mixed workers)
    policy: str = "least_outstanding"   # the router's policy names: round_robin, prefix_affinity, ...
    trace: str = str(DEFAULT_TRACE)
    rate_scale: float = 1.0           # the trace's own arrivals, this many times as fast (repeated to fill duration_s)
    poisson_rate: float | None = None  # else: Poisson arrivals at this rate, lengths from the trace
    duration_s: float | None = None   # arrivals within this window (None: the whole trace)
    seed: int = 0
    slo_ttft_s: float = 1.0
    slo_tbt_s: float = 0.1
    settings: Settings = field(default_factory=Settings)
    layout: Layout = field(default_factory=Layout)
    power: PowerConfig | None = None   # the power controller in the loop; None: no power domains acted on
    faults: FaultConfig | None = None  # faults to inject and the fault detector; None: a healthy fleet


def requests_for(config: SimConfig) -> list[trace.Request]:
    rows = trace.read_trace(config.trace)
    if config.poisson_rate is not None:
        span = config.duration_s if config.duration_s is not None else rows[-1].arrival / config.rate_scale
        return trace.poisson(rows, config.poisson_rate, span, config.seed)
    rows = trace.scale_rate(rows, config.rate_scale)
    return trace.repeat(rows, config.duration_s) if config.duration_s is not None else rows


def build(config: SimConfig) -> Simulation:
    roles = {p.role for p in config.pools}
    want = {"colocated": {"mixed"}, "disaggregated": {"prefill", "decode"}}.get(config.mode)
    if want is None or roles != want:
        raise ValueError(f"mode {config.mode!r} needs pools with roles {sorted(want or [])}, got {sorted(roles)}")
    pools = []
    for i, p in enumerate(config.pools):
        name = p.name or f"{p.role}-{gpus.gpu_family(p.gpu)}-{i}"
        if p.priority not in ("High", "Low"):
            raise ValueError(f"pools[{i}].priority must be High or Low, not {p.priority!r}")
        perf = calibration.load(p.profile).perf_model() if p.profile else perf_model(p.gpu, p.model, p.tp)
        pools.append((Pool(name, p.role, gpus.product(p.gpu), perf, p.cap_watts, p.priority,
                                tuple(p.urls or ())), p.count))
    sim = Simulation(pools, config.settings, config.policy)
    where, nodes, domains = place_workers(pools, config.layout)
    for worker, node in zip(sim.workers, where):
        worker.node = node
    if config.power is not None:
        domain_of = {n.name: n.labels[DOMAIN_LABEL] for n in nodes}
        loop = PowerLoop(domains, {w: domain_of[w.node] for w in sim.workers}, config.power)
        loop.apply = sim.set_cap
        sim.on_draw = lambda w: loop.draw(w, sim.now)
        sim.tickers.append(loop.tick)
        sim.power = loop
    if config.faults is not None:
        detector = FaultLoop(sim, config.faults)
        sim.tickers.append(detector.tick)
        sim.faults = detector
    return sim


def run_simulation(config: SimConfig, progress: Callable[[float], None] | None = None,
                   requests: list[trace.Request] | None = None) -> SimResult:
    """Runs the configured fleet over its requests (or these). `progress(sim_seconds)` is
    called now and then with the simulated time reached."""
    if requests is None:
        requests = requests_for(config)
    sim = build(config)
    started = time.perf_counter()
    flights = sim.run(requests, progress)
    wall = time.perf_counter() - started
    result = summarise(flights, sim.workers, config.slo_ttft_s, config.slo_tbt_s, sim.events_done, wall)
    if sim.power is not None:
        result.power = sim.power.report(sim.now)
    if sim.faults is not None:
        result.faults = sim.faults.report()
    return result


def config_from_dict(raw: dict[str, Any]) -> SimConfig:
    raw = dict(raw)
    known = {f.name for f in fields(SimConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    pools = [PoolConfig(**p) for p in raw.pop("pools")]
    settings = Settings(**raw.pop("settings", {}))
    layout = Layout(**raw.pop("layout", {}))
    power = raw.pop("power", None)
    fault_config = raw.pop("faults", None)
    if fault_config is not None:
        fault_config = dict(fault_config)
        fault_config = FaultConfig(faults=[Fault(**f) for f in fault_config.pop("faults", [])], **fault_config)
    return SimConfig(pools=pools, settings=settings, layout=layout,
                     power=PowerConfig(**power) if power is not None else None, faults=fault_config, **raw)


def main(argv: list[str] | None = None) -> int:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(prog="python -m fleetwise.sim", description=__doc__)
    parser.add_argument("config", type=Path, help="a YAML file with SimConfig's keys")
    parser.add_argument("--out", type=Path, help="write the result as JSON here (default: stdout)")
    parser.add_argument("--plot", type=Path, help="draw latency, power per domain and pool use into this PNG")
    args = parser.parse_args(argv)
    config = config_from_dict(yaml.safe_load(args.config.read_text()))
    horizon = config.duration_s or trace.read_trace(config.trace)[-1].arrival / config.rate_scale
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=horizon)
        result = run_simulation(config, lambda t: bar.update(task, completed=min(t, horizon)))
    text = json.dumps(result.to_json(), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if args.plot:
        from .plots import result_plot
        sys.stderr.write(result_plot(result.to_json(), args.plot) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
