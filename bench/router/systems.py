"""The systems of the router benchmark (direct, fleetwise's router under each policy,
vllm-router) and how they take turns under load: round after round, each system runs the
same slice of the schedule, in an order that turns by one each round. Also what the machine's
CPUs did meanwhile, and the environment the numbers come from."""

import gc
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from fleetwise.bench.harness import process_cpu_seconds
from fleetwise.bench.router.load import QuietGC, Run, closed_loop, open_loop, percentiles_ms, poisson_schedule, session
from fleetwise.procs import Process

VLLM_ROUTER_VERSION = "0.1.17"
SEED = 0
WARMUP_S = 1.0                # open-loop load per system before the rounds, not recorded
TURN_WARMUP_S = 0.25          # and before each of its open-loop turns
CLOSED_LOOP_CLIENTS = 32      # concurrent clients in the max-rate run
CLOSED_LOOP_WARMUP_S = 0.25   # per closed-loop turn, not recorded


def machine_cpu() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot (Linux)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tck = os.sysconf("SC_CLK_TCK")
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy / tck, (f[7] if len(f) > 7 else 0) / tck


def ours_cpu(procs: list[Process]) -> float:
    """CPU seconds of this process and every server it started."""
    t = os.times()
    total = t.user + t.system
    for p in procs:
        total += process_cpu_seconds(p.pid) or 0.0
    return total


@dataclass
class System:
    key: str
    label: str
    urls: list[str]
    pid: int | None = None
    startup_s: float | None = None
    command: list[str] | None = None
    skipped: str | None = None
    open_rounds: list[Run] = field(default_factory=list)
    closed_rounds: list[Run] = field(default_factory=list)

    @property
    def open(self) -> Run | None:
        return Run.merge(self.open_rounds) if self.open_rounds else None

    @property
    def closed(self) -> Run | None:
        return Run.merge(self.closed_rounds) if self.closed_rounds else None

    def cpu(self) -> float | None:
        """CPU seconds of its server process so far."""
        return process_cpu_seconds(self.pid)

    def rounds_json(self) -> dict:
        return {"open_loop": [{"p50_ms": (percentiles_ms(r.latencies_s) or {}).get("p50"),
                               "p99_ms": (percentiles_ms(r.latencies_s) or {}).get("p99"),
                               "errors": r.error_count, "requests": r.sent} for r in self.open_rounds],
                "closed_loop_rps": [r.achieved_rps for r in self.closed_rounds]}


async def measure_all(systems: list[System], bodies: list[bytes], parts: list[tuple[np.ndarray, float]],
                      closed_rounds: int, closed_round_s: float, progress: Progress, stream: bool = False) -> None:
    """Round after round, each system gets the same slice of the schedule, in an order that
    turns by one each round, so load on the machine from elsewhere falls on all of them
    alike; then the closed-loop rounds in the same way."""
    n_open = sum(len(p) for p, _ in parts)
    bars = {}
    for s in systems:
        bars[s.key] = (progress.add_task(f"{s.key}: open loop", total=n_open),
                       progress.add_task(f"{s.key}: {CLOSED_LOOP_CLIENTS} clients closed loop",
                                         total=closed_rounds * closed_round_s))
    progress.refresh()
    sessions = {s.key: session(limit=1024) for s in systems}
    try:
        rate = n_open / sum(d for _, d in parts)
        warm = poisson_schedule(rate, WARMUP_S, SEED + 1)
        for s in systems:  # opens the client's connections and the router's own pools
            await open_loop(sessions[s.key], s.urls, bodies, warm, WARMUP_S, stream=stream)
        # before each turn: connections a server closed while idle are opened again off the clock
        turn_warm = poisson_schedule(rate, TURN_WARMUP_S, SEED + 2)
        with QuietGC():
            done_open = {s.key: 0 for s in systems}
            first = 0
            for r, (part, duration) in enumerate(parts):
                for j in range(len(systems)):
                    s = systems[(r + j) % len(systems)]
                    base = done_open[s.key]

                    def tick(n: int, s: System = s, base: int = base) -> None:
                        progress.update(bars[s.key][0], completed=base + n)
                        progress.refresh()
                    await open_loop(sessions[s.key], s.urls, bodies, turn_warm, TURN_WARMUP_S, stream=stream)
                    run = await open_loop(sessions[s.key], s.urls, bodies, part, duration, first, tick, s.cpu,
                                          stream=stream)
                    s.open_rounds.append(run)
                    done_open[s.key] += len(part)
                first += len(part)
            for r in range(closed_rounds):
                for j in range(len(systems)):
                    s = systems[(r + j) % len(systems)]
                    start = r * closed_round_s

                    def tick_closed(x: float, s: System = s, start: float = start) -> None:
                        progress.update(bars[s.key][1], completed=start + x)
                        progress.refresh()
                    run = await closed_loop(sessions[s.key], s.urls, bodies, CLOSED_LOOP_CLIENTS, closed_round_s,
                                            CLOSED_LOOP_WARMUP_S, tick_closed, s.cpu, stream=stream)
                    s.closed_rounds.append(run)
                gc.collect()
    finally:
        for client in sessions.values():
            await client.close()




def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def ensure_vllm_router(console: Console) -> tuple[list[str] | None, str | None, str | None]:
    """The command that starts vllm-router (installing it if missing), or why there is none."""
    installed = _version("vllm-router")
    if installed is None:
        cmd = [sys.executable, "-m", "pip", "install", f"vllm-router=={VLLM_ROUTER_VERSION}"]
        console.print(f"vllm-router is not installed; installing it for the baseline: {' '.join(cmd[2:])} "
                      f"(leave the baseline out with --skip-vllm-router)")
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            tail = "\n".join(r.stdout.splitlines()[-5:])
            return None, f"`pip install vllm-router=={VLLM_ROUTER_VERSION}` failed:\n{tail}", None
        import importlib
        importlib.invalidate_caches()
        installed = _version("vllm-router")
        if installed is None:
            return None, "vllm-router was installed but cannot be found in this environment", None
    elif installed != VLLM_ROUTER_VERSION:
        console.print(f"[yellow]vllm-router {installed} is installed; the targets were set against "
                      f"{VLLM_ROUTER_VERSION}[/yellow]")
    exe = Path(sys.executable).with_name("vllm-router")
    if exe.exists():
        return [str(exe)], None, installed
    found = shutil.which("vllm-router")
    if found:
        return [found], None, installed
    return [sys.executable, "-c", "from vllm_router.launch_router import main; main()"], None, installed


def environment(vllm_version: str | None) -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {d: _version(d) for d in ("fleetwise", "aiohttp", "uvicorn", "starlette", "uvloop", "httptools",
                                         "orjson", "prometheus-client", "numpy")}
    versions["vllm-router"] = vllm_version
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "router_event_loop": "uvloop" if versions["uvloop"] else "asyncio",
            "router_http_parser": "httptools" if versions["httptools"] else "h11"}
