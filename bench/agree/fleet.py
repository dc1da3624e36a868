"""The real side: `fleetwise up` (colocated, one or two mixed workers, every process with one
torch thread, each worker pinned to a core of its own) serving the workload's requests at their
trace arrival times, streamed, greedy, EOS ignored, with per-token log probabilities asked so
that every token comes in an event of its own; each token's arrival time is kept, and every
engine step of every worker (its makeup, wall and CPU seconds: `worker/engine/step_trace.py`)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from fleetwise.net import free_port
from fleetwise.procs import answers_200
from fleetwise.telemetry import catalog as c
from fleetwise.worker.engine import step_trace


@dataclass
class Measured:
    arrival: float                     # seconds from the start of the run, as sent
    prompt_tokens: int
    output_tokens: int
    token_times: list[float] = field(default_factory=list)   # seconds from the start, one per token
    error: str | None = None


def start_fleet(model_dir: Path, workdir: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", step_trace.ENV: str(workdir / "steps")}
    with open(workdir / "up.log", "w") as log:   # the child keeps its own copy of the descriptor
        up = subprocess.Popen([sys.executable, "-m", "fleetwise", "up", "--model", str(model_dir), "--mode",
                               "colocated", "--mixed", str(workers), "--port", str(port), "--workdir", str(workdir),
                               "--admin-port", "0"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    return up, f"http://127.0.0.1:{port}"


def wait_ready(up: subprocess.Popen, url: str, model: str, workdir: Path, workers: int,
               timeout: float = 180.0) -> None:
    """The router serves and every worker's own listener answers /health (a router on a port
    another fleet took meanwhile would answer the first alone)."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2}
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"fleetwise up exited ({up.returncode}); see its log")
        try:
            if (httpx.post(url + "/v1/completions", json=body, timeout=10).status_code == 200
                    and len(urls := public_urls(workdir)) == workers and all(answers_200(u + "/health") for u in urls)):
                return
        except (httpx.HTTPError, OSError, ValueError):   # OSError, ValueError: pids.json not written yet
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the fleet was not serving within {timeout:.0f} s")


def stop_fleet(up: subprocess.Popen) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)


async def _one(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], m: Measured, t0: float,
               rid: str) -> None:
    await asyncio.sleep(max(0.0, t0 + m.arrival - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "max_tokens": m.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers={"x-request-id": rid}) as r:
            if r.status_code != 200:
                m.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter() - t0
                obj = orjson.loads(line[6:])
                if "error" in obj:
                    m.error = str(obj["error"])[:200]
                    return
                for choice in obj.get("choices", []):
                    lp = choice.get("logprobs") or {}
                    m.token_times += [now] * len(lp.get("tokens") or [None])
    except httpx.HTTPError as e:
        m.error = f"{type(e).__name__}: {e}"


async def drive(url: str, model: str, requests: list[tuple[float, list[int], int]],
                t0: float) -> tuple[list[Measured], float]:
    """Sends every (arrival, prompt ids, output tokens) at its time after `t0` (perf_counter);
    returns what each saw and the run's wall seconds."""
    measured = [Measured(a, len(p), o) for a, p, o in requests]
    limits = httpx.Limits(max_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        await asyncio.gather(*(_one(http, url, model, p, m, t0, f"agree-{i}")
                               for i, ((_, p, _), m) in enumerate(zip(requests, measured))))
        return measured, time.perf_counter() - t0


def worker_pids(workdir: Path) -> dict[str, int]:
    """The fleet's mixed workers' process ids by name (mixed-0, ...)."""
    return {n: int(p) for n, p in json.loads((workdir / "pids.json").read_text()).items() if n.startswith("mixed-")}


def pin(workdir: Path) -> dict[str, int]:
    """Every thread of worker i onto the i-th core this process may use (threads started later
    inherit it); returns each worker's core."""
    cores = sorted(os.sched_getaffinity(0))
    placed = {}
    for i, (name, pid) in enumerate(sorted(worker_pids(workdir).items())):
        core = cores[i % len(cores)]
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {core})
            except ProcessLookupError:   # a thread that ended meanwhile
                pass
        placed[name] = core
    return placed


def worker_urls(workdir: Path, flag: str = "--port") -> dict[str, str]:
    """Each worker's listener by name, from its command line: the public one (`--port`, where
    /metrics is) or the one the router calls (`--internal-port`, the URL its policy ranks)."""
    urls = {}
    for name, pid in worker_pids(workdir).items():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        urls[name] = f"http://127.0.0.1:{argv[argv.index(flag.encode()) + 1].decode()}"
    return urls


def public_urls(workdir: Path) -> list[str]:
    return list(worker_urls(workdir).values())


def engine_steps(workdir: Path) -> tuple[float, float]:
    """(step seconds, steps) so far, summed over the fleet's workers, from their own metrics."""
    seconds = steps = 0.0
    for u in public_urls(workdir):
        text = httpx.get(u + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(c.STEP_SECONDS + "_sum"):
                seconds += float(line.rsplit(" ", 1)[1])
            elif line.startswith(c.STEP_SECONDS + "_count"):
                steps += float(line.rsplit(" ", 1)[1])
    return seconds, steps


def worker_steps(workdir: Path, pids: dict[str, int], t0: float) -> dict[str, list[dict[str, Any]]]:
    """Each worker's engine steps from `t0` on (perf_counter seconds), their times made relative to it."""
    out = {}
    for name, pid in sorted(pids.items()):
        path = workdir / "steps" / f"steps-{pid}.jsonl"
        steps = step_trace.read(path) if path.exists() else []
        out[name] = [s | {"t": s["t"] - t0} | ({"first": [[rid, came - t0] for rid, came in s["first"]]}
                                             if "first" in s else {}) for s in steps if s["t"] >= t0]
    return out


@dataclass
class FleetRun:
    measured: list[Measured]
    wall: float                                  # the run's seconds
    engine_s: float                              # step seconds the workers' metrics reported, summed
    steps: float                                 # steps they reported
    cores: dict[str, int]                        # each worker's core
    worker_steps: dict[str, list[dict[str, Any]]]   # each worker's steps in the run (step_trace)
    router_urls: dict[str, str]                  # each worker's URL as the router knows it


def run_fleet(model_dir: Path, workdir: Path, workers: int, requests: list[tuple[float, list[int], int]]) -> FleetRun:
    """What each request saw, and what each worker did, during the run."""
    workdir.mkdir(parents=True, exist_ok=True)
    up, url = start_fleet(model_dir, workdir, workers)
    try:
        wait_ready(up, url, model_dir.name, workdir, workers)
        cores = pin(workdir)
        pids = worker_pids(workdir)
        router_urls = worker_urls(workdir, "--internal-port")
        s0, n0 = engine_steps(workdir)
        t0 = time.perf_counter() + 0.5   # the client's loop starts in well under that
        measured, wall = asyncio.run(drive(url, model_dir.name, requests, t0))
        s1, n1 = engine_steps(workdir)
        return FleetRun(measured, wall, s1 - s0, n1 - n0, cores, worker_steps(workdir, pids, t0), router_urls)
    finally:
        stop_fleet(up)
