"""Both sides' measures and the simulator's variants, from what a run recorded: the requests,
what the client saw of each, the workers' traced steps and the step profile. Kept apart from
the run so that a saved run (`agree-raw-*.json`) can be compared again.

A step profile is the engine thread's CPU time per step; on a shared machine the wall clock
runs slower than that by however much of the core others take. The variants:

- `own` (the result): each worker timed by a profile fitted from its own steps in the run, at
  its own pace window by window (`fleetwise.sim.pace`: the steps' wall over CPU seconds), and
  each request's way outside the engine (client, router, the worker's HTTP side) at that pace
  (`HttpPath`, measured from the step trace's first tokens);
- `own_engine_only`: the same without the way outside the engine;
- `paced`: the calibration's profile (measured before and after the run) at each worker's pace;
- `per_worker`: the calibration's profile at each worker's pace over the whole run;
- `one_factor`: the calibration's profile times one factor for the fleet, the workers' summed
  step seconds (their metrics) over what the profile gives the work;
- `unscaled`: the calibration's profile as it is.
"""

import bisect
from dataclasses import asdict, dataclass, replace
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
VARIANTS = ("own", "own_engine_only", "paced", "per_worker", "one_factor", "unscaled")


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


@dataclass(frozen=True)
class HttpPath:
    """A request's way outside the engine, in CPU-equivalent seconds (each delay measured in the
    run over its worker's pace then): in, from the client's send to the engine taking it in
    (the client, the router, the worker's HTTP side; the wait for the engine's running step
    left out, as the simulator has it), and out, from the step that made the first token to the
    client."""
    in_s: float
    out_s: float
    requests: int      # measured

    def pace_at(self, paces: list[pace.Pace] | None, t: float) -> float:
        return sum(p.at(t) for p in paces) / len(paces) if paces else 1.0


def http_path(requests: list[trace.Request], measured: list[Any], worker_steps: dict[str, list[dict[str, Any]]],
              paces: dict[str, pace.Pace]) -> HttpPath | None:
    """From the steps' first tokens (`first`: request id agree-I, when the engine took it in).
    The way in is a lower bound: from the send to the start of the step that was running when
    the engine took the request in (all of it when the engine was idle). None without data."""
    ins, outs = [], []
    for name, steps in worker_steps.items():
        ends = [s["t"] + s["s"] for s in steps]
        for s in steps:
            for rid, came in s.get("first", []):
                parts = rid.split("-")
                if len(parts) < 2 or parts[0] != "agree" or not parts[1].isdigit():
                    continue
                i = int(parts[1])
                # taken in before the step that made its first token, on the run's clock
                if i >= len(measured) or not measured[i].token_times or not -1.0 <= came <= s["t"] + 1e-3:
                    continue
                arrival, speed = requests[i].arrival, paces[name].at(requests[i].arrival)
                j = bisect.bisect_right(ends, came + 0.002) - 1    # the step that ended as it came in
                ran = steps[j]["t"] if j >= 0 and came - ends[j] < 0.05 else came
                ins.append(max(0.0, ran - arrival) / speed)
                outs.append(max(0.0, measured[i].token_times[0] - (s["t"] + s["s"])) / speed)
    if not ins:
        return None
    return HttpPath(float(np.mean(ins)), float(np.mean(outs)), len(ins))


def sim_side(requests: list[trace.Request], profiles: list[Path], workers: int,
             paces: list[pace.Pace] | None = None, http: HttpPath | None = None) -> tuple[dict[str, Any], Any]:
    """The simulated side: `workers` mixed workers timed by one profile, or each by its own;
    with `http`, each request reaches the fleet that much later and its first token the client
    after it, at the workers' mean pace then."""
    sent = {r.id: r.arrival for r in requests}
    if http is not None:
        requests = [replace(r, arrival=r.arrival + http.in_s * http.pace_at(paces, r.arrival)) for r in requests]
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
    out_s = (lambda t: http.out_s * http.pace_at(paces, t)) if http is not None else (lambda t: 0.0)
    out = side([f.first_token + out_s(f.first_token) - sent[f.req.id] for f in flights],
               [t for f in flights if (t := tbt(f)) is not None], [], sum(f.req.output_tokens for f in flights), span)
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
    # a trace without the prompt's attention (`a`) is read as one whole prompt per step
    own = [calibration.fit([calibration.StepSample(int(x["p"]), int(x["d"]), int(x["c"]), x["cpu"],
                                                   x.get("a", x["p"] ** 2)) for x in s],
                           profile.model, profile.kv_capacity_tokens, profile.kv_bytes_per_token) for s in ordered]
    own_paths = [p.save(out / f"agree-profile-{profile.model}-{name}.json")
                 for p, name in zip(own, sorted(worker_steps))]
    paced = [pace.windows(s, PACE_WINDOW_S) for s in ordered]
    http = http_path(requests, measured, worker_steps, dict(zip(sorted(worker_steps), paced)))
    whole = [pace.windows(s, 1e9) for s in ordered]
    real = real_side(measured)
    report: dict[str, Any] = {"real": real, "one_factor": {"load_factor": load, "engine_step_seconds": engine_s,
                                                           "engine_steps": steps, "profile": scaled.__dict__},
                              "paces": {name: pace_summary(p) for name, p in zip(sorted(worker_steps), paced)}}
    flights = None
    report["own_profiles"] = {name: asdict(p) for name, p in zip(sorted(worker_steps), own)}
    report["http_path"] = asdict(http) if http is not None else None
    runs = (("own", own_paths, paced, http), ("own_engine_only", own_paths, paced, None),
            ("paced", [profile_path], paced, None), ("per_worker", [profile_path], whole, None),
            ("one_factor", [scaled_path], None, None), ("unscaled", [profile_path], None, None))
    for variant, paths, paces, way in runs:
        sim, f = sim_side(requests, paths, workers, paces, way)
        report[f"sim_{variant}"] = sim
        report[f"relative_error_{variant}"] = errors(real, sim)
        flights = flights or f
    report["sim"], report["relative_error"] = report["sim_own"], report["relative_error_own"]
    return report, flights
