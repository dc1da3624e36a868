"""Both sides' measures and the simulator's variants, from what a run recorded: the requests,
what the client saw of each, the workers' traced steps and the step profile. Kept apart from
the run so that a saved run (`agree-raw-*.json`) can be compared again.

A step profile is the engine thread's CPU time per step; on a shared machine the wall clock
runs slower than that by however much of the core others take. The variants:

- `own` (the result): each worker timed by a profile fitted from its own steps in the run, at
  its own pace step by step (`fleetwise.sim.pace.per_step`: each traced step's wall over its
  CPU seconds, the 2 s windows' pace while the engine was idle), and each request's way outside
  the engine (client, router, the worker's HTTP side) at the windows' pace (`HttpPath`,
  measured from the step trace's first tokens), and the stretches when that way stopped
  altogether (`outside.stops`: the client and router share the cores unpinned); the simulated
  router counts a request finished when its last token has come back to it (that way out);
- `own_window_pace`: `own` at the pace of 2 s windows (`fleetwise.sim.pace.windows`);
- `own_no_stops`: `own` without those stretches;
- `own_engine_only`: the same without the way outside the engine;
- `paced`: the calibration's profile (measured before and after the run) at each worker's pace
  step by step;
- `per_worker`: the calibration's profile at each worker's pace over the whole run;
- `one_factor`: the calibration's profile times one factor for the fleet, the workers' summed
  step seconds (their metrics) over what the profile gives the work;
- `unscaled`: the calibration's profile as it is;
- `own_recorded_routes` (a diagnostic): `own` with each request sent to the worker the real
  router sent it to, as the step trace recorded it.

Every other variant routes with the real router's policy (`prefix_load`, the default `fleetwise
up` runs), fed what the real one read: each request's prompt text and the workers' URLs as the
router knows them (it breaks ties between equally loaded workers by a hash of the prompt and the
URL). `routed_as_real` says for how many requests the simulator chose the real worker.
"""

import argparse
import json
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

from .outside import HttpPath, http_path
from .routes import ROUTER_POLICY, RecordedRoutes, Routing, policy_at_real_loads, real_routes

STATS = ("p50", "p90", "p99", "mean", "n")
AGREED = ("ttft_s", "tbt_s")   # the measure: these at p50 and p90
PACE_WINDOW_S = 2.0            # a few to a few dozen steps of a worker: contention changes over seconds
VARIANTS = ("own", "own_no_stops", "own_engine_only", "paced", "per_worker", "one_factor", "unscaled",
            "own_recorded_routes", "own_window_pace")
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
             paces: list[pace.Pace] | list[pace.StepPace] | None = None, http: HttpPath | None = None,
             routing: Routing | None = None) -> tuple[dict[str, Any], Any, dict[str, list[float]]]:
    """The simulated side: `workers` mixed workers timed by one profile, or each by its own,
    routed by the router's policy (given the real workers' URLs in `routing`); with `http`, each
    request reaches the fleet that much later and its first token the client after it, at the
    workers' mean pace then. Returns the summary, the flights, and the TTFT and per-request TBT
    samples the summary was made of."""
    sent = {r.id: r.arrival for r in requests}
    index = {r.id: i for i, r in enumerate(requests)}
    order = sorted(routing.urls) if routing is not None else [f"mixed-{i}" for i in range(workers)]
    urls = [routing.urls[n] for n in order] if routing is not None else None
    windowed = [p.between if isinstance(p, pace.StepPace) else p for p in paces] if paces is not None else None
    if http is not None:
        requests = [replace(r, arrival=http.held(r.arrival) + http.in_s * http.pace_at(windowed, r.arrival))
                    for r in requests]
    pools = ([PoolConfig("mixed", workers, profile=str(profiles[0]), urls=urls)] if len(profiles) == 1 else
             [PoolConfig("mixed", 1, name=name, profile=str(p), urls=[urls[i]] if urls else None)
              for i, (name, p) in enumerate(zip(order, profiles))])
    config = SimConfig(pools=pools, mode="colocated", policy=ROUTER_POLICY,
                       settings=Settings(prompt_budget=defaults.MAX_NUM_BATCHED_TOKENS,
                                         max_batch=defaults.MAX_NUM_SEQS))
    sim = build(config)
    if routing is not None and routing.replay:
        sim.policies[("mixed", "High")] = RecordedRoutes(requests, routing.real, routing.urls)
    if paces is not None:
        sim.tickers.append(pace.Pacer(sim, paces).tick)
    if http is not None:
        sim.router_sees = lambda t: http.held(t) + http.out_s * http.pace_at(windowed, t)
    flights = sim.run(requests)
    gaps = sim.workers[0].gaps
    for w in sim.workers[1:]:
        gaps.merge(w.gaps)
    span = max(f.done for f in flights) - min(f.req.arrival for f in flights)
    seen = (lambda t: http.held(t) + http.out_s * http.pace_at(windowed, t)) if http is not None else (lambda t: t)
    cdfs = {"ttft": [seen(f.first_token) - sent[f.req.id] for f in flights],
            "tbt": [t for f in flights if (t := tbt(f)) is not None]}
    out = side(cdfs["ttft"], cdfs["tbt"], [], sum(f.req.output_tokens for f in flights), span)
    out["tbt_token_s"] = {"p50": gaps.quantile(0.5), "p90": gaps.quantile(0.9), "p99": gaps.quantile(0.99),
                          "mean": gaps.mean(), "n": round(gaps.total)}
    if routing is not None and routing.real:
        name_of = {u: n for n, u in routing.urls.items()}
        same = sum(name_of.get(f.prefill.replica.url) == routing.real.get(index[f.req.id])
                   for f in flights if f.prefill is not None)
        out["routed_as_real"] = {"same_worker": same, "of": len(routing.real)}
    return out, flights, cdfs


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
            profile: calibration.StepProfile, out: Path, engine: tuple[float, float],
            urls: dict[str, str] | None = None) -> tuple[dict[str, Any], Any]:
    """The real side, each variant's simulated side and errors, the paces; and the paced run's
    TTFT and TBT samples (for the plot). `urls`: each worker's URL as the router knew it (without them the
    simulated router breaks its ties otherwise)."""
    workers = len(worker_steps)
    routing = Routing(urls or {name: f"sim://{name}" for name in worker_steps}, real_routes(worker_steps))
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
    stepped = [pace.per_step(s, PACE_WINDOW_S) for s in ordered]
    real = real_side(measured)
    report: dict[str, Any] = {"real": real, "one_factor": {"load_factor": load, "engine_step_seconds": engine_s,
                                                           "engine_steps": steps, "profile": scaled.__dict__},
                              "paces": {name: pace_summary(p) for name, p in zip(sorted(worker_steps), paced)}}
    samples = None
    report["own_profiles"] = {name: asdict(p) for name, p in zip(sorted(worker_steps), own)}
    report["http_path"] = asdict(http) if http is not None else None
    report["routing"] = {"policy": ROUTER_POLICY, "urls": routing.urls, "real_routes": len(routing.real),
                         "policy_at_real_loads": policy_at_real_loads(requests, measured, routing.real, routing.urls)}
    replay = replace(routing, replay=True)
    runs = (("own", own_paths, stepped, http, routing),
            ("own_window_pace", own_paths, paced, http, routing),
            ("own_no_stops", own_paths, stepped, http.without_stops() if http is not None else None, routing),
            ("own_engine_only", own_paths, stepped, None, routing),
            ("paced", [profile_path], stepped, None, routing), ("per_worker", [profile_path], whole, None, routing),
            ("one_factor", [scaled_path], None, None, routing), ("unscaled", [profile_path], None, None, routing),
            ("own_recorded_routes", own_paths, stepped, http, replay))
    for variant, paths, paces, way, routes in runs:
        sim, _, cdfs = sim_side(requests, paths, workers, paces, way, routes)
        report[f"sim_{variant}"] = sim
        report[f"relative_error_{variant}"] = errors(real, sim)
        samples = samples or cdfs
    report["sim"], report["relative_error"] = report["sim_own"], report["relative_error_own"]
    return report, samples


def on_run_clock(worker_steps: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """A run saved before its steps' first-token times (`first`: when the engine took each
    request in) were moved onto the run's clock has them on the monotonic clock: moved back by
    the run's start, which is where an idle engine takes a request in at once (the step starts
    as the request comes: the latest `came - t` of all)."""
    firsts = [(came, s["t"]) for steps in worker_steps.values() for s in steps for _, came in s.get("first", [])]
    end = max((s["t"] + s["s"] for steps in worker_steps.values() for s in steps), default=0.0)
    if not firsts or max(came for came, _ in firsts) < end + 60.0:
        return worker_steps
    t0 = max(came - t for came, t in firsts)
    return {name: [s | {"first": [[rid, came - t0] for rid, came in s["first"]]} if "first" in s else s
                   for s in steps] for name, steps in worker_steps.items()}


def main(argv: list[str] | None = None) -> int:
    """Compares a saved run (`agree-raw-*.json`) again with the simulator as it is now."""
    from fleetwise.bench.agree.fleet import Measured

    parser = argparse.ArgumentParser(prog="python -m fleetwise.bench.agree.compare", description=main.__doc__)
    parser.add_argument("raw", type=Path, help="the run's agree-raw-*.json")
    parser.add_argument("profile", type=Path, help="the run's calibration profile (agree-profile-MODEL.json)")
    parser.add_argument("--out", type=Path, required=True, help="where the result JSON and profiles go")
    parser.add_argument("--plot", type=Path, help="draw the distributions and errors into this PNG")
    args = parser.parse_args(argv)
    raw = json.loads(args.raw.read_text())
    requests = [trace.Request(**r) for r in raw["requests"]]
    measured = [Measured(**m) for m in raw["measured"]]
    steps = on_run_clock(raw["worker_steps"])
    engine = raw.get("engine") or (sum(x["s"] for s in steps.values() for x in s), sum(len(s) for s in steps.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    profile = calibration.load(args.profile)
    report, samples = compare(requests, measured, steps, profile, args.out, tuple(engine), raw.get("router_urls"))
    report |= {"requests": len(requests), "workers": len(steps), "profile": asdict(profile)}
    (args.out / "compared.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        from .plot import draw
        draw(report, real_cdfs(measured), samples, args.plot)
    print(f"the router's policy at the real loads chooses the real worker for "
          f"{report['routing']['policy_at_real_loads']} of {report['routing']['real_routes']} requests")
    for variant in VARIANTS:
        err, routed = report[f"relative_error_{variant}"], report[f"sim_{variant}"].get("routed_as_real", {})
        print(f"{variant:30s} TTFT p50 {err['ttft_s']['p50']:+.0%} p90 {err['ttft_s']['p90']:+.0%}  "
              f"TBT p50 {err['tbt_s']['p50']:+.0%} p90 {err['tbt_s']['p90']:+.0%}  "
              f"largest {err['max_abs_ttft_tbt_p50_p90']:.0%}  routed as real "
              f"{routed.get('same_worker', '-')}/{routed.get('of', '-')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
