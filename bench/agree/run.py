"""`fleetwise sim agree`: the simulator against the real fleet on the same requests.

1. The workload: a slice of the Azure trace (the first `seconds` after its arrivals are slowed
   by `rate_scale`), lengths times `length_scale` and fitted into the model's context.
2. Calibration: the real engine's steps measured (calibrate.py) and fitted into a step profile
   (`fleetwise.sim.calibration`), saved as JSON.
3. The real fleet: `fleetwise up` with `workers` mixed workers serving the workload (fleet.py).
4. The simulator: the same requests, colocated pools timed by the saved profile, the engine's
   token budget and batch limit.
The profile is measured in the engine thread's CPU time (the shape of a step's cost, free of
other processes); on a shared machine the wall clock runs slower than that by however much of
the core others take, so the workers' own step metrics give the wall seconds they spent
stepping during the run, and the profile, scaled by one factor to match that total
(`load_factor`), times the simulator (`sim`); the unscaled profile's run is reported too
(`sim_unscaled`). The factor fixes the mean
cost of a step, not how latency spreads over requests: TTFT and TBT percentiles stay predictions,
while throughput is then close by construction.
Both sides report TTFT, time between tokens (per request, and every single gap) and throughput;
the result states each percentile's relative error and the largest over TTFT and TBT p50/p90.
"""

import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fleetwise import defaults
from fleetwise.bench.harness import header, save_plot, summary, write_json, wrote
from fleetwise.bench.models import preset_model, prompt_token_ids
from fleetwise.sim import calibration, trace
from fleetwise.sim.engine import Settings
from fleetwise.sim.results import tbt
from fleetwise.sim.run import PoolConfig, SimConfig, build

from .calibrate import measure_steps
from .fleet import Measured, run_fleet
from .plot import draw

STATS = ("p50", "p90", "p99", "mean", "n")
AGREED = ("ttft_s", "tbt_s")   # the measure: these at p50 and p90


def workload(path: Path, start: float, rate_scale: float, seconds: float, length_scale: float,
             context: int) -> list[trace.Request]:
    """The trace's requests from `start` seconds in, arrivals slowed by `rate_scale`, the first
    `seconds` of them."""
    rows = [replace(r, arrival=r.arrival - start) for r in trace.read_trace(path) if r.arrival >= start]
    rows = trace.window(trace.scale_rate(rows, rate_scale), seconds)
    out = []
    for r in rows:
        o = max(2, min(round(r.output_tokens * length_scale), context // 4))
        p = max(1, min(round(r.prompt_tokens * length_scale), context - o))
        out.append(trace.Request(r.id, r.arrival, p, o))
    return out


def side(ttft: list[float], tbts: list[float], gaps: list[float], out_tokens: int, span: float) -> dict[str, Any]:
    return {"ttft_s": summary(ttft, *STATS), "tbt_s": summary(tbts, *STATS), "tbt_token_s": summary(gaps, *STATS),
            "output_tokens_per_s": out_tokens / span if span > 0 else 0.0, "span_s": span}


def real_side(measured: list[Measured]) -> dict[str, Any]:
    ok = [m for m in measured if m.error is None and m.token_times]
    ttft = [m.token_times[0] - m.arrival for m in ok]
    tbts = [(m.token_times[-1] - m.token_times[0]) / (len(m.token_times) - 1) for m in ok if len(m.token_times) > 1]
    gaps = [float(g) for m in ok for g in np.diff(m.token_times)]
    span = max((m.token_times[-1] for m in ok), default=0.0) - min((m.arrival for m in ok), default=0.0)
    out = side(ttft, tbts, gaps, sum(len(m.token_times) for m in ok), span)
    out["errors"] = [m.error for m in measured if m.error is not None][:5]
    out["failed"] = len(measured) - len(ok)
    return out


def sim_side(requests: list[trace.Request], profile: Path, workers: int) -> tuple[dict[str, Any], Any]:
    config = SimConfig(pools=[PoolConfig("mixed", workers, profile=str(profile))], mode="colocated",
                       settings=Settings(prompt_budget=defaults.MAX_NUM_BATCHED_TOKENS,
                                         max_batch=defaults.MAX_NUM_SEQS))
    sim = build(config)
    flights = sim.run(requests)
    gaps = sim.workers[0].gaps
    for w in sim.workers[1:]:
        gaps.merge(w.gaps)
    span = max(f.done for f in flights) - min(f.req.arrival for f in flights)
    out = side([f.first_token - f.req.arrival for f in flights], [t for f in flights if (t := tbt(f)) is not None],
               [], sum(f.req.output_tokens for f in flights), span)
    out["tbt_token_s"] = {"p50": gaps.quantile(0.5), "p90": gaps.quantile(0.9), "p99": gaps.quantile(0.99),
                          "mean": gaps.mean(), "n": round(gaps.total)}
    return out, flights


def predicted_engine_s(profile: calibration.StepProfile, requests: list[trace.Request], steps: float) -> float:
    """Engine seconds the profile gives the requests' work over `steps` steps: each step's fixed
    cost, every prompt token, every decode and the cache each decode reads, however the steps
    grouped them."""
    prompt = sum(r.prompt_tokens for r in requests)
    decodes = sum(r.output_tokens - 1 for r in requests)
    context = sum((r.output_tokens - 1) * (r.prompt_tokens + 1) + (r.output_tokens - 1) * (r.output_tokens - 2) / 2
                  for r in requests)
    return profile.step_ms(prompt, decodes, context) / 1e3 + profile.overhead_ms * (steps - 1) / 1e3


def errors(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    """sim / real - 1 for every percentile both have, and throughput."""
    out: dict[str, Any] = {}
    for key in ("ttft_s", "tbt_s", "tbt_token_s"):
        if real[key] and sim[key]:
            out[key] = {q: sim[key][q] / real[key][q] - 1 for q in ("p50", "p90", "p99", "mean") if real[key][q]}
    out["output_tokens_per_s"] = sim["output_tokens_per_s"] / real["output_tokens_per_s"] - 1
    out["max_abs_ttft_tbt_p50_p90"] = max(abs(out[k][q]) for k in AGREED for q in ("p50", "p90") if k in out)
    return out


def run_agree(out: Path, preset: str, workers: int, trace_path: Path, start: float, rate_scale: float,
              seconds: float, length_scale: float, calibration_steps: int, seed: int = 0) -> dict[str, Any]:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = preset_model(out, preset, console)
    context = int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    requests = workload(trace_path, start, rate_scale, seconds, length_scale, context)
    if not requests:
        raise SystemExit("error: the trace slice holds no requests; give more --seconds or a larger --rate-scale")
    console.print(f"{len(requests)} requests over {seconds:g} s; calibrating the worker "
                  f"({calibration_steps} steps before the fleet runs, as many after)")
    lengths = [(r.prompt_tokens, r.output_tokens) for r in requests]
    before, kv_tokens, kv_bytes = measure_steps(model_dir, lengths, calibration_steps, seed)
    allowed = prompt_token_ids(model_dir).tolist()
    rng = random.Random(seed)
    sent = [(r.arrival, [rng.choice(allowed) for _ in range(r.prompt_tokens)], r.output_tokens) for r in requests]
    console.print(f"the real fleet: fleetwise up, {workers} mixed worker(s), one torch thread each")
    measured, wall, (engine_s, steps) = run_fleet(model_dir, out / "agree-fleet", workers, sent)
    after, _, _ = measure_steps(model_dir, lengths, calibration_steps, seed + 1)
    # measured on both sides of the run: how far apart the two fits are says how well the shape is known
    profile = calibration.fit(before + after, model_dir.name, kv_tokens, kv_bytes)
    drift = {name: asdict(calibration.fit(part, model_dir.name, kv_tokens, kv_bytes))
             for name, part in (("before", before), ("after", after))}
    profile_path = profile.save(out / f"agree-profile-{preset}.json")
    console.print(f"profile: {profile}")
    real = real_side(measured)
    load = engine_s / predicted_engine_s(profile, requests, steps) if steps else 1.0
    scaled = replace(profile, **{k: getattr(profile, k) * load for k in calibration.TERMS})
    scaled_path = scaled.save(out / f"agree-profile-{preset}-load-scaled.json")
    unscaled, _ = sim_side(requests, profile_path, workers)
    sim, flights = sim_side(requests, scaled_path, workers)
    report = header("sim-agree") | {
        "command": (f"fleetwise sim agree --preset {preset} --workers {workers} --start {start:g} "
                    f"--rate-scale {rate_scale:g} --seconds {seconds:g} --length-scale {length_scale:g} "
                    f"--calibration-steps {calibration_steps}"),
        "trace": str(trace_path), "requests": len(requests), "workers": workers, "rate_scale": rate_scale,
        "length_scale": length_scale, "seconds": seconds, "fleet_wall_s": wall,
        "profile": asdict(profile), "profiles_before_and_after": drift,
        "fleet_engine": {"step_seconds": engine_s, "steps": steps, "load_factor": load},
        "profile_load_scaled": asdict(scaled), "real": real, "sim": sim, "relative_error": errors(real, sim),
        "sim_unscaled": unscaled, "relative_error_unscaled": errors(real, unscaled)}
    name = f"sim-agree-{preset}-{workers}w"
    json_path = write_json(out / f"{name}.json", report)
    real_cdfs = {"ttft": [m.token_times[0] - m.arrival for m in measured if m.token_times],
                 "tbt": [(m.token_times[-1] - m.token_times[0]) / (len(m.token_times) - 1)
                         for m in measured if len(m.token_times) > 1],
                 "gaps": [float(g) for m in measured for g in np.diff(m.token_times)]}
    png = save_plot(lambda p: draw(report, real_cdfs, flights, p), out / f"{name}.png", console)
    wrote(console, json_path, png)
    err = errors(real, sim)
    console.print(f"sim vs real: TTFT p50 {err['ttft_s']['p50']:+.1%} p90 {err['ttft_s']['p90']:+.1%}; "
                  f"TBT p50 {err['tbt_s']['p50']:+.1%} p90 {err['tbt_s']['p90']:+.1%}; "
                  f"throughput {err['output_tokens_per_s']:+.1%}; largest {err['max_abs_ttft_tbt_p50_p90']:.1%}")
    return report
