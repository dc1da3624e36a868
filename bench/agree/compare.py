"""Both sides' measures and the simulator's variants, from what a run recorded: the requests,
what the client saw of each, the workers' traced steps and the step profile. Kept apart from
the run so that a saved run (`agree-raw-*.json`) can be compared again.

The profile is the engine thread's CPU time per step; on a shared machine the wall clock runs
slower than that by however much of the core others take. The simulator's variants differ only
in how that slow-down is given:

- `paced` (the result): each worker's own pace, window by window, from its traced steps
  (`fleetwise.sim.pace`): the steps' wall seconds over their CPU seconds;
- `per_worker`: each worker's own factor over the whole run;
- `one_factor`: one factor for the fleet, the workers' summed step seconds (their metrics)
  over what the profile gives the work;
- `unscaled`: the CPU profile as it is.
"""

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleetwise import defaults
from fleetwise.bench.harness import summary
from fleetwise.sim import calibration, pace, trace
from fleetwise.sim.engine import Settings
from fleetwise.sim.results import tbt
from fleetwise.sim.run import PoolConfig, SimConfig, build

STATS = ("p50", "p90", "p99", "mean", "n")
AGREED = ("ttft_s", "tbt_s")   # the measure: these at p50 and p90
PACE_WINDOW_S = 2.0            # a few to a few dozen steps of a worker: contention changes over seconds
VARIANTS = ("own", "paced", "per_worker", "one_factor", "unscaled")


def side(ttft: list[float], tbts: list[float], gaps: list[float], out_tokens: int, span: float) -> dict[str, Any]:
    return {"ttft_s": summary(ttft, *STATS), "tbt_s": summary(tbts, *STATS), "tbt_token_s": summary(gaps, *STATS),
            "output_tokens_per_s": out_tokens / span if span > 0 else 0.0, "span_s": span}


def real_cdfs(measured: list[Any]) -> dict[str, list[float]]:
    ok = [m for m in measured if m.error is None and m.token_times]
    return {"ttft": [m.token_times[0] - m.arrival for m in ok],
            "tbt": [(m.token_times[-1] - m.token_times[0]) / (len(m.token_times) - 1)
                    for m in ok if len(m.token_times) > 1],
            "gaps": [float(g) for m in ok for g in np.diff(m.token_times)]}


def real_side(measured: list[Any]) -> dict[str, Any]:
    ok = [m for m in measured if m.error is None and m.token_times]
    cdfs = real_cdfs(measured)
    span = max((m.token_times[-1] for m in ok), default=0.0) - min((m.arrival for m in ok), default=0.0)
    out = side(cdfs["ttft"], cdfs["tbt"], cdfs["gaps"], sum(len(m.token_times) for m in ok), span)
    out["errors"] = [m.error for m in measured if m.error is not None][:5]
    out["failed"] = len(measured) - len(ok)
    return out


def sim_side(requests: list[trace.Request], profiles: list[Path], workers: int,
             paces: list[pace.Pace] | None = None) -> tuple[dict[str, Any], Any]:
    """The simulated side: `workers` mixed workers timed by one profile, or each by its own."""
    pools = ([PoolConfig("mixed", workers, profile=str(profiles[0]))] if len(profiles) == 1 else
             [PoolConfig("mixed", 1, name=f"mixed-{i}", profile=str(p)) for i, p in enumerate(profiles)])
    config = SimConfig(pools=pools, mode="colocated",
                       settings=Settings(prompt_budget=defaults.MAX_NUM_BATCHED_TOKENS,
                                         max_batch=defaults.MAX_NUM_SEQS))
    sim = build(config)
    if paces is not None:
        sim.tickers.append(pace.Pacer(sim, paces).tick)
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


def pace_summary(p: pace.Pace) -> dict[str, Any]:
    f = np.array(p.factors) if p.factors else np.array([p.overall])
    return {"window_s": p.window_s, "overall": p.overall, "min": float(f.min()), "p50": float(np.median(f)),
            "max": float(f.max()), "factors": [round(x, 3) for x in p.factors]}


def compare(requests: list[trace.Request], measured: list[Any], worker_steps: dict[str, list[dict[str, Any]]],
            profile: calibration.StepProfile, out: Path, engine: tuple[float, float]) -> tuple[dict[str, Any], Any]:
    """The real side, each variant's simulated side and errors, the paces; and the paced run's
    flights (for the plot)."""
    workers = len(worker_steps)
    profile_path = profile.save(out / f"agree-profile-{profile.model}.json")
    engine_s, steps = engine
    load = engine_s / predicted_engine_s(profile, requests, steps) if steps else 1.0
    scaled = replace(profile, **{k: getattr(profile, k) * load for k in calibration.TERMS})
    scaled_path = scaled.save(out / f"agree-profile-{profile.model}-load-scaled.json")
    ordered = [worker_steps[name] for name in sorted(worker_steps)]
    own = [calibration.fit([calibration.StepSample(int(x["p"]), int(x["d"]), int(x["c"]), x["cpu"]) for x in s],
                           profile.model, profile.kv_capacity_tokens, profile.kv_bytes_per_token) for s in ordered]
    own_paths = [p.save(out / f"agree-profile-{profile.model}-{name}.json")
                 for p, name in zip(own, sorted(worker_steps))]
    paced = [pace.windows(s, PACE_WINDOW_S) for s in ordered]
    whole = [pace.windows(s, 1e9) for s in ordered]
    real = real_side(measured)
    report: dict[str, Any] = {"real": real, "one_factor": {"load_factor": load, "engine_step_seconds": engine_s,
                                                           "engine_steps": steps, "profile": scaled.__dict__},
                              "paces": {name: pace_summary(p) for name, p in zip(sorted(worker_steps), paced)}}
    flights = None
    report["own_profiles"] = {name: asdict(p) for name, p in zip(sorted(worker_steps), own)}
    for variant, paths, paces in (("own", own_paths, paced), ("paced", [profile_path], paced),
                                  ("per_worker", [profile_path], whole), ("one_factor", [scaled_path], None),
                                  ("unscaled", [profile_path], None)):
        sim, f = sim_side(requests, paths, workers, paces)
        report[f"sim_{variant}"] = sim
        report[f"relative_error_{variant}"] = errors(real, sim)
        flights = flights or f
    report["sim"], report["relative_error"] = report["sim_own"], report["relative_error_own"]
    return report, flights
