"""`fleetwise bench pd-load`: one prefill + one decode worker against two mixed workers under
the same bursty load (bench/pd/load.py), on one machine.

Each worker is pinned to its own core (`taskset -c`) and runs one torch thread, so that a
prompt on one worker cannot take the other's CPU: the prefill worker and one mixed worker
on core 0, the decode worker and the other mixed worker on core 1. The routers and the
load generator are not pinned (they share both cores). Both fleets run at once and the
systems alternate at every load, in rotated order; the same requests go to both.

First each system serves a few requests one at a time (idle: its TBT and TTFT without
queueing); its mean end-to-end time S sets the loads, as multiples of the two workers'
unbatched rate 2/S. The result goes to OUT/pd_load.json and OUT/pd_load.png; the targets:
at loads where the mixed pair's TBT p99 passes 2x its idle value, the 1P+1D pair's stays
within 1.3x of its own idle value."""

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.table import Table

from fleetwise.bench.harness import figure, finish, header, make_console, save_plot, write_json, wrote
from fleetwise.bench.models import preset_model, prompt_token_ids
from fleetwise.bench.pd.load import TRACE, run_load, summarize, trace_requests
from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, fleetwise_argv, stop_all, wait_healthy

SYSTEMS = ("disaggregated", "colocated")
WORKER_ARGS = ["--kv-cache-mib", "256", "--max-num-batched-tokens", "256", "--kv-lease-seconds", "60"]
LENGTH_SCALE, MAX_PROMPT, MAX_OUTPUT = 0.5, 1024, 32
IDLE_REQUESTS = 4
COLOC_TBT_BLOWUP, DISAGG_TBT_BOUND = 2.0, 1.3   # the targets, relative to each system's idle TBT p99


def _fleet(model_dir: Path, out: Path) -> tuple[dict[str, Process], dict[str, Process]]:
    """Workers (pinned, one torch thread) and one router per system, not yet started."""
    from fleetwise.up import write_token
    logs = out / "logs"
    token = ["--internal-token-file", str(write_token(out))]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cores = {"prefill": 0, "decode": 1, "mixed-a": 0, "mixed-b": 1}
    workers, internal = {}, {}
    for name, core in cores.items():
        port, internal[name] = free_port(), free_port()
        role = name.split("-")[0]
        argv = ["taskset", "-c", str(core % (os.cpu_count() or 1)),
                *fleetwise_argv("worker", "--model", str(model_dir), "--role", role, *token, "--port", str(port),
                                "--internal-port", str(internal[name]), "--served-model-name", model_dir.name,
                                *WORKER_ARGS)]
        workers[name] = Process(f"load-{name}", argv, logs / f"load-{name}.log", f"http://127.0.0.1:{port}", env=env)
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
            logs / f"router-load-{system}.log", f"http://127.0.0.1:{port}")
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


async def _sweep(routers: dict[str, str], model: str, requests: list, multipliers: list[float],
                 console: Any) -> dict:
    import httpx
    http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0),
                             limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
    try:
        idle_reqs = requests[:IDLE_REQUESTS]
        await _idle(http, routers["colocated"], model, idle_reqs[:1])  # warm both
        await _idle(http, routers["disaggregated"], model, idle_reqs[:1])
        idle = {s: await _idle(http, routers[s], model, idle_reqs) for s in SYSTEMS}
        unbatched = 2.0 / idle["colocated"]["mean_e2e_s"]
        console.print(f"idle: mean end to end {idle['colocated']['mean_e2e_s']:.2f} s (colocated); "
                      f"two workers' unbatched rate {unbatched:.2f} req/s")
        points: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for i, m in enumerate(multipliers):
            from fleetwise.bench.pd.load import at_rate
            rate = m * unbatched
            send_at = at_rate(requests, rate)
            order = SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]
            for s in order:
                outcomes, wall = await run_load(http, routers[s], model, requests, send_at)
                row = summarize(outcomes, wall, rate)
                row["load_multiple"] = m
                points[s].append(row)
                console.print(f"{s:>13} x{m:<4} {rate:5.2f} req/s: TBT p50 {_ms(row['tbt_p50_s'])} p99 "
                              f"{_ms(row['tbt_p99_s'])}  TTFT p50 {_ms(row['ttft_p50_s'])} p99 "
                              f"{_ms(row['ttft_p99_s'])}  done {row['completed']}/{row['requests']}")
    finally:
        await http.aclose()
    return {"idle": idle, "unbatched_rate": unbatched, "points": points}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:7.0f} ms"


def _verdict(result: dict) -> dict:
    """Each load: both systems' TBT p99 over their idle p99; whether the target applies and holds."""
    idle = {s: result["idle"][s]["tbt_p99_s"] for s in SYSTEMS}
    rows = []
    for d, c in zip(result["points"]["disaggregated"], result["points"]["colocated"]):
        dr = d["tbt_p99_s"] / idle["disaggregated"] if d["tbt_p99_s"] and idle["disaggregated"] else None
        cr = c["tbt_p99_s"] / idle["colocated"] if c["tbt_p99_s"] and idle["colocated"] else None
        applies = cr is not None and cr > COLOC_TBT_BLOWUP
        rows.append({"load_multiple": d["load_multiple"], "offered_rate": d["offered_rate"],
                     "disaggregated_tbt_p99_over_idle": dr, "colocated_tbt_p99_over_idle": cr,
                     "target_applies": applies,
                     "met": (dr is not None and dr <= DISAGG_TBT_BOUND) if applies else None})
    return {"by_load": rows, "met": all(r["met"] for r in rows if r["target_applies"])
            if any(r["target_applies"] for r in rows) else None}


def plot(report: dict, path: Path) -> None:
    fig, axes = figure(2, (13, 4.8))
    colors = {"disaggregated": "#dd8452", "colocated": "#4c72b0"}
    for ax, key, title in ((axes[0], "tbt", "TBT (every gap between two tokens)"),
                           (axes[1], "ttft", "TTFT")):
        for s in SYSTEMS:
            pts = report["points"][s]
            x = [p["offered_rate"] for p in pts]
            for q, ls in (("p50", "--"), ("p99", "-")):
                y = [(p[f"{key}_{q}_s"] or np.nan) * 1e3 for p in pts]
                ax.plot(x, y, ls=ls, marker="o", color=colors[s], label=f"{s} {q}")
            ax.axhline((report["idle"][s][f"{key}_p99_s"] or np.nan) * 1e3, color=colors[s], ls=":", lw=1,
                       label=f"{s} idle p99")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, Azure conversation arrivals scaled)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = report["config"]
    finish(fig, path, f"fleetwise bench pd-load: 1 prefill + 1 decode vs 2 mixed workers, each pinned to one core "
                      f"({cfg['cpu_count']} CPUs, shared with other work), {cfg['requests']} requests per load")


def _print(console: Any, report: dict) -> None:
    t = Table(title="TBT and TTFT under the same load (ms); x idle: TBT p99 over the system's idle TBT p99")
    for col in ("load", "req/s", "system", "TBT p50", "TBT p99", "x idle", "TTFT p50", "TTFT p99", "done"):
        t.add_column(col, justify="right")
    for i, v in enumerate(report["verdict"]["by_load"]):
        for s in SYSTEMS:
            p = report["points"][s][i]
            ratio = v[f"{s}_tbt_p99_over_idle"]
            t.add_row(f"x{v['load_multiple']}", f"{v['offered_rate']:.2f}", s, _ms(p["tbt_p50_s"]),
                      _ms(p["tbt_p99_s"]), "-" if ratio is None else f"{ratio:.2f}", _ms(p["ttft_p50_s"]),
                      _ms(p["ttft_p99_s"]), f"{p['completed']}/{p['requests']}")
    console.print(t)


def run_pd_load_bench(out: Path = Path("bench/results"), preset: str = "small", requests: int = 24,
                      multipliers: list[float] | None = None, trace_start: int = 0, trace: Path = TRACE) -> dict:
    """Start both fleets, measure idle and the loads, stop them; write OUT/pd_load.json and .png."""
    console = make_console(150)
    multipliers = multipliers or [0.5, 1.0, 2.0, 4.0]
    out = Path(out)
    model_dir = preset_model(out, preset, console)
    workload = trace_requests(trace, requests, trace_start, LENGTH_SCALE, MAX_PROMPT, MAX_OUTPUT,
                              prompt_token_ids(model_dir))
    workers, routers = _fleet(model_dir, out)
    procs = [*workers.values(), *routers.values()]
    load_before = os.getloadavg()
    console.rule("fleetwise bench pd-load")
    console.print(f"{requests} requests from row {trace_start} of {trace.name}, lengths x{LENGTH_SCALE} (prompt "
                  f"<= {MAX_PROMPT}, output <= {MAX_OUTPUT}); load average {load_before[0]:.2f} on "
                  f"{os.cpu_count()} CPUs")
    try:
        for p in procs:
            p.start()
        wait_healthy(procs, 300.0, interval=0.3)
        result = asyncio.run(_sweep({s: r.url for s, r in routers.items()}, model_dir.name, workload,
                                    multipliers, console))
    except ProcessError as e:
        raise SystemExit(f"error: {e}")
    finally:
        stop_all([list(routers.values()), list(workers.values())])
    report = {**header("pd_load"), **result, "verdict": _verdict(result),
              "targets": {"colocated_tbt_p99_over_idle_where_target_applies": {"op": ">", "value": COLOC_TBT_BLOWUP},
                          "disaggregated_tbt_p99_over_idle": {"op": "<=", "value": DISAGG_TBT_BOUND}},
              "config": {"preset": preset, "model_dir": str(model_dir), "requests": requests,
                         "multipliers": multipliers, "trace": str(trace), "trace_start": trace_start,
                         "length_scale": LENGTH_SCALE, "max_prompt": MAX_PROMPT, "max_output": MAX_OUTPUT,
                         "worker_args": WORKER_ARGS, "torch_threads_per_worker": 1,
                         "pinning": "prefill and mixed-a on core 0, decode and mixed-b on core 1 (taskset); "
                                    "routers and the load generator unpinned",
                         "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                         "loadavg_after": os.getloadavg(),
                         "prompt_tokens": [len(r.prompt) for r in workload],
                         "output_tokens": [r.max_tokens for r in workload]}}
    json_path = write_json(out / "pd_load.json", report)
    png_path = save_plot(lambda p: plot(report, p), out / "pd_load.png", console)
    _print(console, report)
    wrote(console, json_path, png_path)
    return report
