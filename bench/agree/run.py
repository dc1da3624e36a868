"""`fleetwise sim agree`: the simulator against the real fleet on the same requests.

1. The workload: a slice of the Azure trace (the first `seconds` after its arrivals are slowed
   by `rate_scale`), lengths times `length_scale` and fitted into the model's context.
2. Calibration: the real engine's steps measured in this process (calibrate.py), before and
   after the fleet runs, and fitted into a step profile (`fleetwise.sim.calibration`).
3. The real fleet: `fleetwise up` with `workers` mixed workers, each pinned to a core of its
   own, serving the workload (fleet.py); every step of every worker is traced
   (`worker/engine/step_trace.py`) and saved with what the client saw (`agree-raw-*.json`).
4. The simulator: the same requests, colocated workers with the engine's token budget and
   batch limit, timed in several ways (compare.py). The result (`sim`) times each worker by a
   profile fitted from its own steps in the run, on the engine thread's CPU time, at the pace
   its steps ran on the wall clock, window by window (`fleetwise.sim.pace`): on a shared
   machine the share of a core a worker gets changes several-fold within a run. The variants
   beside it (`sim_paced`: the calibration's profile at that pace; `sim_per_worker`: one pace
   per worker; `sim_one_factor`: one factor for the fleet; `sim_unscaled`) show what each step
   of that buys.
Both sides report TTFT, time between tokens (per request, and every single gap) and throughput;
the result states each percentile's relative error and the largest over TTFT and TBT p50/p90.
"""

import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fleetwise.bench.harness import header, save_plot, write_json, wrote
from fleetwise.bench.models import preset_model, prompt_token_ids
from fleetwise.router.policies import prompt_text
from fleetwise.sim import calibration, trace

from .calibrate import measure_steps
from .compare import VARIANTS, compare, real_cdfs
from .fleet import run_fleet
from .plot import draw


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
    # each simulated request carries its prompt as the router reads it: the router's policy routes by it
    requests = [replace(r, text=prompt_text({"prompt": ids}, "completion")) for r, (_, ids, _) in zip(requests, sent)]
    console.print(f"the real fleet: fleetwise up, {workers} mixed worker(s), one torch thread each")
    fleet = run_fleet(model_dir, out / "agree-fleet", workers, sent)
    measured, wall, engine_s, steps = fleet.measured, fleet.wall, fleet.engine_s, fleet.steps
    write_json(out / f"agree-raw-{preset}-{workers}w.json",
               {"requests": [asdict(r) for r in requests], "measured": [asdict(m) for m in measured],
                "cores": fleet.cores, "worker_steps": fleet.worker_steps, "router_urls": fleet.router_urls,
                "engine": [engine_s, steps]})
    after, _, _ = measure_steps(model_dir, lengths, calibration_steps, seed + 1)
    # measured on both sides of the run: how far apart the two fits are says how well the shape is known
    profile = calibration.fit(before + after, model_dir.name, kv_tokens, kv_bytes)
    drift = {name: asdict(calibration.fit(part, model_dir.name, kv_tokens, kv_bytes))
             for name, part in (("before", before), ("after", after))}
    console.print(f"profile: {profile}")
    compared, samples = compare(requests, measured, fleet.worker_steps, profile, out, (engine_s, steps),
                                fleet.router_urls)
    report: dict[str, Any] = header("sim-agree") | {
        "command": (f"fleetwise sim agree --preset {preset} --workers {workers} --start {start:g} "
                    f"--rate-scale {rate_scale:g} --seconds {seconds:g} --length-scale {length_scale:g} "
                    f"--calibration-steps {calibration_steps}"),
        "trace": str(trace_path), "requests": len(requests), "workers": workers, "cores": fleet.cores,
        "rate_scale": rate_scale, "length_scale": length_scale, "seconds": seconds, "fleet_wall_s": wall,
        "profile": asdict(profile), "profiles_before_and_after": drift} | compared
    name = f"sim-agree-{preset}-{workers}w"
    json_path = write_json(out / f"{name}.json", report)
    png = save_plot(lambda p: draw(report, real_cdfs(measured), samples, p), out / f"{name}.png", console)
    wrote(console, json_path, png)
    routing = report["routing"]
    console.print(f"the router's policy at the real loads chooses the real worker for "
                  f"{routing['policy_at_real_loads']} of {routing['real_routes']} requests")
    for variant in VARIANTS:
        err = report[f"relative_error_{variant}"]
        console.print(f"{variant}: sim vs real: TTFT p50 {err['ttft_s']['p50']:+.1%} p90 {err['ttft_s']['p90']:+.1%}; "
                      f"TBT p50 {err['tbt_s']['p50']:+.1%} p90 {err['tbt_s']['p90']:+.1%}; "
                      f"throughput {err['output_tokens_per_s']:+.1%}; largest {err['max_abs_ttft_tbt_p50_p90']:.1%}")
    return report
