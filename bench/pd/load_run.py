"""`fleetwise bench pd-load`: one prefill + one decode worker against two mixed workers under
the same bursty load (bench/pd/load.py), on one machine.

The fleet (`load.FLEETS`): `modelled` (the default), workers that run the real engine, HTTP
API and KV handoff with each step's time from the simulator's performance model (Llama-2-70B
on two A100s), so that what is measured is how the phases interfere, not how the processes
share this machine's CPUs; or `cpu`, the small model's forward pass, each worker pinned to
its own core (`taskset -c`) with one torch thread, so that a prompt on one worker cannot take
the other's CPU: the prefill worker and one mixed worker on core 0, the decode worker and the
other mixed worker on core 1. The routers and the load generator are not pinned. Both fleets
run at once and the systems alternate at every load, in rotated order; the same requests go
to both.

First each system serves a few requests one at a time (idle: its TBT and TTFT without
queueing); its mean end-to-end time S sets the loads, as multiples of the two workers'
unbatched rate 2/S. The result goes to OUT/STEM.json and OUT/STEM.png (report.py has the
targets: at loads where the mixed pair's TBT p99 passes 2x its idle value, the 1P+1D pair's
stays within 1.3x of its own idle value)."""

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fleetwise.bench.harness import header, make_console, progress, save_plot, write_json, wrote
from fleetwise.bench.models import preset_model, prompt_token_ids
from fleetwise.bench.pd.e2e import kv_counters
from fleetwise.bench.pd.load import (
    FLEETS,
    MODELLED_FORWARD,
    MODELLED_GPU,
    TRACE,
    PdFleet,
    at_rate,
    kv_link_seconds,
    modelled_fleet,
    run_load,
    summarize,
    trace_requests,
)
from fleetwise.bench.pd.report import SYSTEMS, load_targets, load_verdict, plot_load, print_load
from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, fleetwise_argv, stop_all, wait_healthy
from fleetwise.telemetry.catalog import NUM_PREEMPTIONS


def _fleet(kind: PdFleet, model_dir: Path, out: Path) -> tuple[dict[str, Process], dict[str, Process]]:
    """Workers and one router per system, not yet started."""
    from fleetwise.up import write_token
    logs = out / "logs"
    token = ["--internal-token-file", str(write_token(out))]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cores = {"prefill": 0, "decode": 1, "mixed-a": 0, "mixed-b": 1}
    workers, internal = {}, {}
    for name, core in cores.items():
        port, internal[name] = free_port(), free_port()
        pin = ["taskset", "-c", str(core % (os.cpu_count() or 1))] if kind.pinned else []
        argv = [*pin, *fleetwise_argv("worker", "--model", str(model_dir), "--role", name.split("-")[0], *token,
                                      "--port", str(port), "--internal-port", str(internal[name]),
                                      "--served-model-name", model_dir.name, *kind.worker_args)]
        workers[name] = Process(f"load-{name}", argv, logs / f"load-{name}.log", f"http://127.0.0.1:{port}", env=env,
                                die_with_parent=True)
    url = {n: f"http://127.0.0.1:{p}" for n, p in internal.items()}
    configs = {"disaggregated": {"prefill": [url["prefill"]], "decode": [url["decode"]]},
               "colocated": {"mixed": [url["mixed-a"], url["mixed-b"]]}}
    routers = {}
    for system, cfg in configs.items():
        path = out / f"router-load-{system}.yaml"
        path.write_text(yaml.safe_dump({"models": [{"name": model_dir.name, **cfg}]}))
        port = free_port()
        routers[system] = Process(f"router-load-{system}", fleetwise_argv(
            "router", "--config", str(path), *token, "--policy", "least_outstanding", "--port", str(port)),
            logs / f"router-load-{system}.log", f"http://127.0.0.1:{port}", die_with_parent=True)
    return workers, routers


async def _idle(http: Any, url: str, model: str, requests: list) -> dict:
    """Requests one at a time: TBT and TTFT with nothing queued; S, the mean end to end."""
    outcomes, walls = [], []
    for req in requests:
        [o], wall = await run_load(http, url, model, [req], [0.0])
        outcomes.append(o)
        walls.append(wall)
    row = summarize(outcomes, sum(walls), 0.0)
    row["mean_e2e_s"] = float(np.mean(walls))
    return row


def _pulls(before: dict[str, float], after: dict[str, float]) -> dict:
    """The decode worker's pulls between two readings of its counters."""
    n = after["pulls"] - before["pulls"]
    return {"pulls": n, "mean_s": (after["seconds"] - before["seconds"]) / n if n else None,
            "bytes": after["bytes"] - before["bytes"], "recomputes": after["recomputes"] - before["recomputes"]}


async def _preemptions(http: Any, urls: list[str]) -> float:
    """Sequences the workers preempted (to recompute later) so far, all together."""
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for url in urls:
        r = await http.get(url + "/metrics")
        total += sum(s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
                     if s.name == NUM_PREEMPTIONS + "_total")
    return total


async def _sweep(routers: dict[str, str], workers: dict[str, str], model: str, workload: Callable[[int], list],
                 multipliers: list[float], idle_n: int, console: Any) -> dict:
    """`workload(k)`: the trace's requests with prompts of their own (k: 0 idle, 1..n the loads,
    n + 1 the warm-up), so that no turn finds its prompts in a worker's prefix cache."""
    import httpx
    decode = workers["decode"]
    of = {"disaggregated": [workers["prefill"], decode], "colocated": [workers["mixed-a"], workers["mixed-b"]]}
    http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0),
                             limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
    try:
        idle_reqs = workload(0)[:idle_n]
        for s in SYSTEMS:  # warm both
            await _idle(http, routers[s], model, workload(len(multipliers) + 1)[:1])
        before = await kv_counters(http, decode)
        idle = {s: await _idle(http, routers[s], model, idle_reqs) for s in SYSTEMS}
        idle_pulls = _pulls(before, await kv_counters(http, decode))  # the mixed pair pulls nothing
        unbatched = 2.0 / idle["colocated"]["mean_e2e_s"]
        console.print(f"idle: mean end to end {idle['colocated']['mean_e2e_s']:.2f} s (colocated); "
                      f"two workers' unbatched rate {unbatched:.2f} req/s")
        points: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        with progress(console, unit="turns") as bar:
            task = bar.add_task("loads x systems", total=len(multipliers) * len(SYSTEMS))
            for i, m in enumerate(multipliers):
                rate, requests = m * unbatched, workload(i + 1)
                send_at = at_rate(requests, rate)
                for s in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
                    before, preempted = await kv_counters(http, decode), await _preemptions(http, of[s])
                    outcomes, wall = await run_load(http, routers[s], model, requests, send_at)
                    row = summarize(outcomes, wall, rate)
                    row["load_multiple"] = m
                    row["preemptions"] = await _preemptions(http, of[s]) - preempted
                    if s == "disaggregated":
                        row["kv_pulls"] = _pulls(before, await kv_counters(http, decode))
                    points[s].append(row)
                    bar.advance(task)
                    console.print(f"{s:>13} x{m:<4} {rate:5.2f} req/s: TBT p50 {_ms(row['tbt_p50_s'])} p99 "
                                  f"{_ms(row['tbt_p99_s'])}  TTFT p50 {_ms(row['ttft_p50_s'])} p99 "
                                  f"{_ms(row['ttft_p99_s'])}  done {row['completed']}/{row['requests']}")
    finally:
        await http.aclose()
    return {"idle": idle, "idle_kv_pulls": idle_pulls, "unbatched_rate": unbatched, "points": points}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:7.0f} ms"


def _notes(kind: PdFleet, result: dict, workload: list, forward: tuple[str, str]) -> list[str]:
    """What the handoff cost here, against what the modelled model's KV would take on a link."""
    pulls = [p["kv_pulls"] for p in result["points"]["disaggregated"]]
    n = sum(p["pulls"] for p in pulls)
    notes = []
    if n:
        mean = sum(p["mean_s"] * p["pulls"] for p in pulls if p["mean_s"]) / n
        notes.append(f"decode worker: {n:.0f} KV pulls under load, {mean * 1e3:.1f} ms each on average "
                     f"({sum(p['bytes'] for p in pulls) / n / 2**20:.1f} MiB: the tokenizer model's KV, real tensors)")
        if kind.name == "modelled":
            tokens = float(np.mean([len(r.prompt) for r in workload]))
            link = kv_link_seconds(round(tokens), *forward)
            notes.append(f"the modelled model's KV of the mean prompt ({tokens:.0f} tokens) would take "
                         f"{link * 1e3:.1f} ms on the simulator's link alone, "
                         + ("less than the real pull here: the handoff measured is, if anything, slower than a GPU's"
                            if link < mean else "more than the real pull here: the handoff measured is faster"))
    for s, who in (("disaggregated", "the 1P+1D pair"), ("colocated", "the mixed pair")):
        by_load = [(p["load_multiple"], p["preemptions"]) for p in result["points"][s] if p["preemptions"]]
        if by_load:
            notes.append(f"{who} preempted sequences (to recompute them later, a prompt pass among the decodes) "
                         f"at {', '.join(f'x{m:g}: {n:.0f}' for m, n in by_load)}")
    recomputes = sum(p["recomputes"] for p in pulls)
    if recomputes:
        notes.append(f"{recomputes:.0f} prompts were recomputed on the decode worker instead of pulled "
                     "(no blocks to spare there): a prompt pass on the decode worker stalls its decodes")
    return notes


def run_pd_load_bench(out: Path = Path("bench/results"), preset: str = "small", requests: int = 24,
                      multipliers: list[float] | None = None, trace_start: int = 0, trace: Path = TRACE,
                      fleet: str = "modelled", modelled_gpu: str = MODELLED_GPU,
                      modelled_forward: str = MODELLED_FORWARD) -> dict:
    """Start both systems' workers, measure idle and the loads, stop them; write OUT/STEM.json and .png."""
    if fleet not in FLEETS:
        raise SystemExit(f"error: --fleet must be one of {', '.join(FLEETS)}; got {fleet!r}")
    from fleetwise.gpus import PRODUCTS
    from fleetwise.worker.engine.modelled_device import parse_forward
    if modelled_gpu not in PRODUCTS:
        raise SystemExit(f"error: --modelled-gpu must be one of {', '.join(PRODUCTS)}; got {modelled_gpu!r}")
    try:
        parse_forward(modelled_forward)
    except ValueError as e:
        raise SystemExit(f"error: --modelled-forward: {e}")
    kind = modelled_fleet(modelled_gpu, modelled_forward) if fleet == "modelled" else FLEETS[fleet]
    console = make_console(150)
    multipliers = multipliers or ([1.0, 2.0, 4.0, 8.0] if fleet == "modelled" else [0.5, 1.0, 2.0, 4.0])
    out = Path(out)
    model_dir = preset_model(out, preset, console, kind.context)
    allowed = prompt_token_ids(model_dir)

    def workload_for(k: int) -> list:
        return trace_requests(trace, requests, trace_start, kind.length_scale, kind.max_prompt, kind.max_output,
                              allowed, seed=k)
    workload = workload_for(0)
    workers, routers = _fleet(kind, model_dir, out)
    procs = [*workers.values(), *routers.values()]
    load_before = os.getloadavg()
    console.rule(f"fleetwise bench pd-load --fleet {fleet}")
    console.print(f"{requests} requests from row {trace_start} of {trace.name}, lengths x{kind.length_scale} "
                  f"(prompt <= {kind.max_prompt}, output <= {kind.max_output}); workers {' '.join(kind.worker_args)}; "
                  f"load average {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        for p in procs:
            p.start()
        wait_healthy(procs, 300.0, interval=0.3)
        result = asyncio.run(_sweep({s: r.url for s, r in routers.items()}, {n: w.url for n, w in workers.items()},
                                    model_dir.name, workload_for, multipliers, kind.idle_requests, console))
    except ProcessError as e:
        raise SystemExit(f"error: {e}")
    finally:
        stop_all([list(routers.values()), list(workers.values())])
    report = {**header("pd_load"), **result, "verdict": load_verdict(result), "targets": load_targets(),
              "notes": _notes(kind, result, workload, (modelled_gpu, modelled_forward)),
              "config": {"fleet": fleet, "preset": preset, "model_dir": str(model_dir), "requests": requests,
                         "multipliers": multipliers, "trace": str(trace), "trace_start": trace_start,
                         "length_scale": kind.length_scale, "max_prompt": kind.max_prompt,
                         "max_output": kind.max_output, "worker_args": list(kind.worker_args),
                         "idle_requests": kind.idle_requests, "torch_threads_per_worker": 1,
                         **({"modelled_gpu": modelled_gpu, "modelled_forward": modelled_forward} if fleet == "modelled"
                            else {}),
                         "pinning": ("prefill and mixed-a on core 0, decode and mixed-b on core 1 (taskset)"
                                     if kind.pinned else "none (a modelled step sleeps)")
                         + "; routers and the load generator unpinned",
                         "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                         "loadavg_after": os.getloadavg(),
                         "prompt_tokens": [len(r.prompt) for r in workload],
                         "output_tokens": [r.max_tokens for r in workload]}}
    json_path = write_json(out / f"{kind.stem}.json", report)
    png_path = save_plot(lambda p: plot_load(report, p), out / f"{kind.stem}.png", console)
    print_load(console, report)
    wrote(console, json_path, png_path)
    return report
