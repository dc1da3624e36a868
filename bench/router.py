"""`fleetwise bench router`: the latency the router adds and the rate it sustains.

Fast stand-in backends (an OpenAI-completions-shaped HTTP server that answers at once with
a small fixed completion, one process each) take the requests. The same load goes

  direct             straight to the backends (the client round-robins over them)
  fleetwise/POLICY   through `fleetwise router` over the same backends: prefix_affinity
                     (its default), round_robin and least_outstanding
  vllm-router        through `vllm-router` (the Rust router, round_robin) over them

First an open loop: Poisson arrivals at `rate` requests/s, `seconds` of them per system,
the same seeded schedule and bodies for all. Then a closed loop for the rate each one
sustains: a fixed number of clients, each sending its next request when its last one has
returned. Every server is its own process, all of them up from the start; the load
generator is this process. The systems take turns in short rounds (the same slice of the
schedule each, the order turning every round), so load on the machine from elsewhere falls
on all of them alike. A router's overhead is its latency percentile minus the direct one.
The result goes to `OUT/router.json` and `OUT/router.png`; see bench/README.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetwise.net import free_port

MODEL = "bench-model"
NUM_BACKENDS = 2
POLICIES = ("prefix_affinity", "round_robin", "least_outstanding")  # the first is the router's default
DEFAULT_POLICY = POLICIES[0]
VLLM_ROUTER_VERSION = "0.1.17"
VLLM_ROUTER_POLICY = "round_robin"
SEED = 0
ROUND_S = 2.0                 # open loop: each system's turn in a round
CLOSED_ROUND_S = 1.0          # closed loop: each system's turn in a round
CLOSED_LOOP_MAX_S = 5.0
WARMUP_S = 1.0                # open-loop load per system before the rounds, not recorded
TURN_WARMUP_S = 0.25          # and before each of its open-loop turns
CLOSED_LOOP_CLIENTS = 32      # concurrent clients in the max-rate run
CLOSED_LOOP_WARMUP_S = 0.25   # per closed-loop turn, not recorded
NUM_PREFIXES = 16             # shared prompt prefixes (so prefix affinity has something to find)
NUM_BODIES = 512
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 0.5

TARGETS = {  # measured value -> (comparison, target)
    "p50_overhead_ms": ("<", 1.0),
    "p99_overhead_ms": ("<", 5.0),
    "p50_overhead_vs_vllm_router": ("<=", 2.0),
    "p99_overhead_vs_vllm_router": ("<=", 2.0),
    "sustains_offered_rate": (">=", 0.95),  # completed/s over offered/s, and no errors
}
TARGET_LABELS = {
    "p50_overhead_ms": "p50 overhead",
    "p99_overhead_ms": "p99 overhead",
    "p50_overhead_vs_vllm_router": "p50 overhead / vllm-router's",
    "p99_overhead_vs_vllm_router": "p99 overhead / vllm-router's",
    "sustains_offered_rate": "takes the offered rate, no errors",
}

COMPLETION = (b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
              + b'","choices":[{"index":0,"text":" the quick brown fox jumps over the lazy dog again and again",'
              b'"logprobs":null,"finish_reason":"length","stop_reason":null}],'
              b'"usage":{"prompt_tokens":96,"completion_tokens":16,"total_tokens":112}}')
MODELS = (b'{"object":"list","data":[{"id":"' + MODEL.encode()
          + b'","object":"model","created":0,"owned_by":"fleetwise-bench"}]}')


# -- stand-in backend --------------------------------------------------------------------


def _response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + (b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n") + body)


_ROUTES = {
    (b"POST", b"/v1/completions"): (b"200 OK", COMPLETION),
    (b"POST", b"/v1/chat/completions"): (b"200 OK", COMPLETION),
    (b"GET", b"/v1/models"): (b"200 OK", MODELS),
    (b"GET", b"/health"): (b"200 OK", b"{}"),
}
_NOT_FOUND = (b"404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
_CANNED = {(route, ka): _response(status, body, ka) for route, (status, body) in [*_ROUTES.items(), (None, _NOT_FOUND)]
           for ka in (True, False)}


class _Backend:
    """HTTP/1.1 over asyncio with httptools: keep-alive and pipelining, a canned answer per
    route, nothing else. Each answer costs tens of microseconds."""

    def __init__(self):
        import httptools
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None

    def data_received(self, data: bytes):
        import httptools
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(_response(b"400 Bad Request", b"{}", False))
                self.transport.close()

    def eof_received(self):
        return False

    def on_url(self, url: bytes):
        self.url += url

    def on_message_complete(self):
        route = (self.parser.get_method(), self.url.split(b"?", 1)[0])
        self.url = b""
        keep_alive = self.parser.should_keep_alive()
        if self.transport is None:
            return
        self.transport.write(_CANNED[(route if route in _ROUTES else None, keep_alive)])
        if not keep_alive:
            self.transport.close()


def serve_backend(host: str, port: int) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, host, port, backlog=2048, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
    _run_loop(main())


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- processes ---------------------------------------------------------------------------



def _die_with_parent():
    """In the child: end when the benchmark ends, even if it is killed outright."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Processes:
    """The servers of one benchmark run; every one of them is stopped on the way out."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name.replace('/', '_')}.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        self.procs[name] = p
        return p

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.logdir / f"{name.replace('/', '_')}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str, grace_s: float = 3.0) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            p.terminate()
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _post(url: str, body: bytes, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        return r.status


def wait_ready(procs: Processes, name: str, url: str, body: bytes, timeout: float = READY_TIMEOUT_S) -> float:
    """Until a completion through `url` succeeds; returns the seconds it took."""
    t0 = time.perf_counter()
    p = procs.procs[name]
    last = ""
    while time.perf_counter() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode} before it was ready:\n{procs.log_tail(name)}")
        try:
            if _post(url, body) == 200:
                return time.perf_counter() - t0
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{name} was not ready after {timeout:.0f}s ({last}):\n{procs.log_tail(name)}")


# -- vllm-router -------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def ensure_vllm_router(console) -> tuple[list[str] | None, str | None, str | None]:
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


# -- load ------------------------------------------------------------------------------


@dataclass
class Run:
    """Measured load against one system: one round, or all its rounds merged."""
    mode: str                       # open_loop | closed_loop
    sent: int = 0
    completed: int = 0
    errors: dict = field(default_factory=dict)
    latencies_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lag_s: np.ndarray = field(default_factory=lambda: np.zeros(0))   # open loop: late start vs schedule
    span_s: float = 0.0             # open loop: start to last answer, at least the schedule's span;
                                    # closed loop: the measured window
    scheduled_s: float = 0.0        # open loop: the time the schedule spans (offered = sent / this)
    clients: int | None = None
    loadgen_cpu_s: float = 0.0
    server_cpu_s: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def achieved_rps(self) -> float:
        return self.completed / self.span_s if self.span_s > 0 else 0.0

    @property
    def offered_rps(self) -> float | None:
        return self.sent / self.scheduled_s if self.mode == "open_loop" and self.scheduled_s > 0 else None

    @staticmethod
    def merge(parts: list["Run"]) -> "Run":
        errors: dict[str, int] = {}
        for r in parts:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        cpu = [r.server_cpu_s for r in parts]
        return Run(parts[0].mode, sum(r.sent for r in parts), sum(r.completed for r in parts), errors,
                   np.concatenate([r.latencies_s for r in parts]), np.concatenate([r.lag_s for r in parts]),
                   sum(r.span_s for r in parts), sum(r.scheduled_s for r in parts), parts[0].clients,
                   sum(r.loadgen_cpu_s for r in parts), None if None in cpu else sum(cpu))

    def to_json(self) -> dict:
        d = {"mode": self.mode, "sent": self.sent, "completed": self.completed, "errors": self.error_count,
             "error_kinds": self.errors, "span_s": self.span_s, "achieved_rps": self.achieved_rps,
             "latency_ms": percentiles_ms(self.latencies_s),
             "loadgen_cpu_us_per_request": 1e6 * self.loadgen_cpu_s / max(1, self.sent)}
        if self.mode == "open_loop":
            d["offered_rps"] = self.offered_rps
            d["dispatch_lag_ms"] = percentiles_ms(self.lag_s)
        else:
            d["clients"] = self.clients
        if self.server_cpu_s is not None:
            d["router_cpu_s"] = self.server_cpu_s
            d["router_cpu_us_per_request"] = 1e6 * self.server_cpu_s / max(1, self.completed)
            d["router_cpu_cores"] = self.server_cpu_s / self.span_s if self.span_s > 0 else None
        return d


def percentiles_ms(values) -> dict | None:
    a = np.asarray(values, dtype=np.float64) * 1e3
    if a.size == 0:
        return None
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "p999": float(np.percentile(a, 99.9)),
            "mean": float(a.mean()), "max": float(a.max()), "n": int(a.size)}


def make_bodies(seed: int, n: int = NUM_BODIES) -> list[bytes]:
    """Completion requests of ~0.5 KB: one of a few shared prefixes, then words of their own."""
    import random
    rng = random.Random(seed)
    words = ("fleet replica prefill decode cache token router policy latency budget node queue block "
             "stream handoff lease prompt model batch schedule kernel").split()
    prefixes = [f"System {k}: " + " ".join(rng.choice(words) for _ in range(40)) for k in range(NUM_PREFIXES)]
    bodies = []
    for _ in range(n):
        prompt = prefixes[rng.randrange(NUM_PREFIXES)] + "\nUser: " + " ".join(rng.choice(words) for _ in range(24))
        bodies.append(json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0.0},
                                 separators=(",", ":")).encode())
    return bodies


def poisson_schedule(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Send times (s after the start) of a Poisson process at `rate` over `seconds`, given that
    it has `rate * seconds` arrivals: that many uniform times, sorted. The offered rate is then
    exactly `rate`, and the gaps are exponential as in any Poisson process."""
    n = max(1, int(round(rate * seconds)))
    return np.sort(np.random.default_rng(seed).uniform(0.0, seconds, n))


def split_schedule(schedule: np.ndarray, seconds: float, rounds: int) -> list[tuple[np.ndarray, float]]:
    """Consecutive slices of equal duration, each starting at 0, with that duration."""
    edges = np.linspace(0.0, seconds, rounds + 1)
    edges[-1] = np.nextafter(max(seconds, schedule[-1]), np.inf)
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = schedule[(schedule >= a) & (schedule < b)]
        if seg.size:
            parts.append((seg - a, float(b - a)))
    return parts


_HEADERS = {"content-type": "application/json"}


def _session(limit: int):
    import aiohttp
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=300, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), auto_decompress=False)


async def _one(session, url: str, body: bytes) -> str | None:
    """Sends one completion; None when it succeeded, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=_HEADERS) as r:
            data = await r.read()
            if r.status != 200:
                return f"HTTP {r.status}"
            if not data.startswith(b"{"):
                return "bad body"
            return None
    except asyncio.TimeoutError:
        return "timeout"
    except Exception as e:  # counted, never fatal: the run goes on
        return type(e).__name__


async def _ticker(tick, every: float = PROGRESS_EVERY_S):
    while True:
        await asyncio.sleep(every)
        tick()


async def open_loop(session, urls: list[str], bodies: list[bytes], schedule: np.ndarray, duration: float,
                    first_body: int = 0, tick=None, cpu=None) -> Run:
    """Sends request i at schedule[i] whatever the answers before it (open loop); latency
    runs from the send to the last byte of the answer. `duration`: the span the schedule
    stands for (for the offered rate); `cpu`: reads the server's CPU seconds."""
    n = len(schedule)
    lat = np.full(n, np.nan)
    lag = np.zeros(n)
    ends = np.zeros(n)
    errors: dict[str, int] = {}
    pending = set()
    done = [0]
    ticker = asyncio.create_task(_ticker(lambda: tick(done[0]))) if tick else None
    nurls, nbodies = len(urls), len(bodies)

    async def one(i: int):
        t0 = time.perf_counter()
        lag[i] = t0 - (start + schedule[i])
        err = await _one(session, urls[i % nurls], bodies[(first_body + i) % nbodies])
        t1 = time.perf_counter()
        ends[i] = t1
        if err is None:
            lat[i] = t1 - t0
        else:
            errors[err] = errors.get(err, 0) + 1
        done[0] += 1

    cpu0, lg0 = cpu() if cpu else None, time.process_time()
    start = time.perf_counter() + 0.002
    for i in range(n):
        delay = start + schedule[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(i))
        pending.add(t)
        t.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    cpu1, lg1 = cpu() if cpu else None, time.process_time()
    if ticker:
        ticker.cancel()
        tick(done[0])
    ok = ~np.isnan(lat)
    return Run("open_loop", sent=n, completed=int(ok.sum()), errors=errors, latencies_s=lat[ok], lag_s=lag,
               span_s=max(float(ends.max() - start), duration), scheduled_s=duration,
               loadgen_cpu_s=lg1 - lg0, server_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0)


async def closed_loop(session, urls: list[str], bodies: list[bytes], clients: int, seconds: float,
                      warmup_s: float, tick=None, cpu=None) -> Run:
    """`clients` loops, each sending its next request when the last one returns; counts what
    completes inside the window after the warm-up."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    sent = [0]
    t_start = time.perf_counter()
    w0, w1 = t_start + warmup_s, t_start + warmup_s + seconds
    nurls, nbodies = len(urls), len(bodies)
    marks: dict[str, float | None] = {}
    ticker = asyncio.create_task(_ticker(lambda: tick(min(seconds, max(0.0, time.perf_counter() - w0))))) \
        if tick else None

    async def client(k: int):
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= w1:
                return
            err = await _one(session, urls[i % nurls], bodies[i % nbodies])
            t1 = time.perf_counter()
            i += clients
            if t0 >= w0 and t1 <= w1:
                sent[0] += 1
                if err is None:
                    lat.append(t1 - t0)
                else:
                    errors[err] = errors.get(err, 0) + 1

    async def window():
        await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
        marks["cpu0"], marks["lg0"] = cpu() if cpu else None, time.process_time()
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        marks["cpu1"], marks["lg1"] = cpu() if cpu else None, time.process_time()

    await asyncio.gather(window(), *(client(k) for k in range(clients)))
    if ticker:
        ticker.cancel()
        tick(seconds)
    server = None if marks["cpu0"] is None or marks["cpu1"] is None else marks["cpu1"] - marks["cpu0"]
    return Run("closed_loop", sent=sent[0], completed=len(lat), errors=errors, latencies_s=np.asarray(lat),
               span_s=seconds, clients=clients, loadgen_cpu_s=marks["lg1"] - marks["lg0"], server_cpu_s=server)


class _QuietGC:
    """No collector pauses in the load generator while it measures."""

    def __enter__(self):
        gc.collect()
        gc.freeze()
        gc.disable()

    def __exit__(self, *exc):
        gc.enable()
        gc.unfreeze()


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot (Linux)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tck = os.sysconf("SC_CLK_TCK")
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy / tck, (f[7] if len(f) > 7 else 0) / tck


# -- the systems -------------------------------------------------------------------------


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
        return _proc_cpu_s(self.pid) if self.pid else None

    def rounds_json(self) -> dict:
        return {"open_loop": [{"p50_ms": (percentiles_ms(r.latencies_s) or {}).get("p50"),
                               "p99_ms": (percentiles_ms(r.latencies_s) or {}).get("p99"),
                               "errors": r.error_count, "requests": r.sent} for r in self.open_rounds],
                "closed_loop_rps": [r.achieved_rps for r in self.closed_rounds]}


async def measure_all(systems: list[System], bodies: list[bytes], parts: list[tuple[np.ndarray, float]],
                      closed_rounds: int, closed_round_s: float, progress) -> None:
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
    sessions = {s.key: _session(limit=1024) for s in systems}
    try:
        rate = n_open / sum(d for _, d in parts)
        warm = poisson_schedule(rate, WARMUP_S, SEED + 1)
        for s in systems:  # opens the client's connections and the router's own pools
            await open_loop(sessions[s.key], s.urls, bodies, warm, WARMUP_S)
        # before each turn: connections a server closed while idle are opened again off the clock
        turn_warm = poisson_schedule(rate, TURN_WARMUP_S, SEED + 2)
        with _QuietGC():
            done_open = {s.key: 0 for s in systems}
            first = 0
            for r, (part, duration) in enumerate(parts):
                for j in range(len(systems)):
                    s = systems[(r + j) % len(systems)]
                    base = done_open[s.key]

                    def tick(n, s=s, base=base):
                        progress.update(bars[s.key][0], completed=base + n)
                        progress.refresh()
                    await open_loop(sessions[s.key], s.urls, bodies, turn_warm, TURN_WARMUP_S)
                    run = await open_loop(sessions[s.key], s.urls, bodies, part, duration, first, tick, s.cpu)
                    s.open_rounds.append(run)
                    done_open[s.key] += len(part)
                first += len(part)
            for r in range(closed_rounds):
                for j in range(len(systems)):
                    s = systems[(r + j) % len(systems)]
                    base = r * closed_round_s

                    def tick(x, s=s, base=base):
                        progress.update(bars[s.key][1], completed=base + x)
                        progress.refresh()
                    run = await closed_loop(sessions[s.key], s.urls, bodies, CLOSED_LOOP_CLIENTS, closed_round_s,
                                            CLOSED_LOOP_WARMUP_S, tick, s.cpu)
                    s.closed_rounds.append(run)
                gc.collect()
    finally:
        for session in sessions.values():
            await session.close()


# -- report ----------------------------------------------------------------------------


def overheads(system: dict, direct: dict, mode: str = "open_loop") -> dict | None:
    """Pooled: a percentile over all of a system's requests minus the same one for direct."""
    a, b = (system.get(mode) or {}).get("latency_ms"), (direct.get(mode) or {}).get("latency_ms")
    if not a or not b:
        return None
    return {p: a[p] - b[p] for p in ("p50", "p90", "p99", "mean")}


def round_overheads(system: System, direct: System) -> dict | None:
    """Per round, a percentile of the system minus the same one of direct in that round (the
    same slice of the schedule, a few seconds apart); the median of those over the rounds.
    A stall from outside that hits one round moves this far less than the pooled numbers."""
    pairs = [(a.latencies_s, b.latencies_s) for a, b in zip(system.open_rounds, direct.open_rounds)
             if a.latencies_s.size and b.latencies_s.size]
    if not pairs:
        return None
    out = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        out[name] = float(np.median([np.percentile(a, q) - np.percentile(b, q) for a, b in pairs]) * 1e3)
    out["mean"] = float(np.median([a.mean() - b.mean() for a, b in pairs]) * 1e3)
    out["rounds"] = len(pairs)
    return out


def evaluate(systems: dict) -> dict:
    """Per fleetwise policy: each target met (True/False), or None where it cannot be told."""
    vllm = systems.get("vllm-router", {}).get("overhead_ms")
    out = {}
    for policy in POLICIES:
        s = systems.get(f"fleetwise/{policy}")
        if not s or "skipped" in s:
            continue
        ov = s.get("overhead_ms")
        checks: dict = {}
        checks["p50_overhead_ms"] = None if ov is None else bool(ov["p50"] < TARGETS["p50_overhead_ms"][1])
        checks["p99_overhead_ms"] = None if ov is None else bool(ov["p99"] < TARGETS["p99_overhead_ms"][1])
        for p in ("p50", "p99"):
            k = f"{p}_overhead_vs_vllm_router"
            # where vllm-router adds nothing measurable (<= 0), within 2x of it means the same of fleetwise
            checks[k] = None if ov is None or vllm is None else bool(ov[p] <= TARGETS[k][1] * max(vllm[p], 0.0))
        o = s["open_loop"]
        checks["sustains_offered_rate"] = bool(
            o["errors"] == 0 and o["achieved_rps"] >= TARGETS["sustains_offered_rate"][1] * o["offered_rps"])
        out[policy] = checks
    return out


def _ms(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _triple(p: dict | None, signed: bool = False) -> str:
    if not p:
        return "-"
    return "/".join(_ms(p[k], signed) for k in ("p50", "p90", "p99"))


def print_summary(console, report: dict) -> None:
    from rich.table import Table
    cfg = report["config"]
    t = Table(title=f"fleetwise bench router: {cfg['rate']} req/s offered (Poisson, open loop), "
                    f"{cfg['requests_per_system']} requests per system; max req/s: {cfg['closed_loop_clients']} "
                    f"clients closed loop, {cfg['closed_loop_seconds']:g} s per system")
    for col in ("system", "req/s offered>done", "errors", "latency ms p50/p90/p99", "overhead ms p50/p90/p99",
                "pooled overhead p50/p99", "router CPU µs/req", "max req/s", "closed loop ms p50/p99"):
        t.add_column(col, justify="left" if col == "system" else "right", no_wrap=col == "system")
    for key, s in report["systems"].items():
        if "skipped" in s:
            t.add_row(key, "-", "-", f"skipped: {s['skipped'].splitlines()[0]}", "-", "-", "-", "-", "-")
            continue
        o, c = s["open_loop"], s["closed_loop"]
        cpu = o.get("router_cpu_us_per_request")
        cl, pooled = c["latency_ms"], s.get("overhead_pooled_ms")
        t.add_row(key, f"{o['offered_rps']:.0f}>{o['achieved_rps']:.0f}", str(o["errors"] + c["errors"]),
                  _triple(o["latency_ms"]), _triple(s.get("overhead_ms"), signed=True),
                  "-" if not pooled else f"{pooled['p50']:+.2f}/{pooled['p99']:+.2f}",
                  "-" if cpu is None else f"{cpu:.0f}", f"{c['achieved_rps']:.0f}",
                  "-" if not cl else f"{cl['p50']:.2f}/{cl['p99']:.2f}")
    console.print(t)

    checks = report["targets"]
    if not checks:
        return
    c = Table(title="targets: fleetwise router (overhead: a round's percentile minus direct's in that round, "
                    "median over the rounds)")
    c.add_column("measure")
    c.add_column("target")
    for policy in checks:
        c.add_column(policy + (" (default)" if policy == DEFAULT_POLICY else ""), justify="right")
    systems = report["systems"]
    vllm = systems.get("vllm-router", {}).get("overhead_ms")

    def shown(policy: str, name: str) -> str:
        s = systems[f"fleetwise/{policy}"]
        ov = s.get("overhead_ms")
        if name == "sustains_offered_rate":
            o = s["open_loop"]
            v = f"{o['achieved_rps']:.0f} req/s, {o['errors']} err"
        elif name.endswith("_ms"):
            v = "-" if ov is None else f"{ov[name[:3]]:+.2f} ms"
        else:
            p = name[:3]
            v = "-" if (ov is None or vllm is None) else f"{ov[p]:+.2f} vs {vllm[p]:+.2f} ms"
        ok = checks[policy].get(name)
        mark = "-" if ok is None else ("[green]yes[/green]" if ok else "[red]no[/red]")
        return f"{v}  {mark}"

    targets_shown = {"p50_overhead_ms": "< 1 ms", "p99_overhead_ms": "< 5 ms",
                     "p50_overhead_vs_vllm_router": "<= 2x", "p99_overhead_vs_vllm_router": "<= 2x",
                     "sustains_offered_rate": ">= 95% of offered"}
    for name in TARGETS:
        c.add_row(TARGET_LABELS[name], targets_shown[name], *(shown(p, name) for p in checks))
    console.print(c)


def print_notes(console, report: dict) -> None:
    systems = report["systems"]
    d = systems["direct"]
    lag, rounds = d["open_loop"].get("dispatch_lag_ms") or {}, d["rounds"]["open_loop"]
    if lag:
        console.print(f"load generator: sends {lag['p50']:.2f} ms (p50) / {lag['p99']:.2f} ms (p99) after their "
                      f"scheduled time, {d['open_loop']['loadgen_cpu_us_per_request']:.0f} µs of its CPU per request")
    p99s = [r["p99_ms"] for r in rounds if r["p99_ms"] is not None]
    if len(p99s) > 1:
        console.print(f"direct p99 from round to round: {min(p99s):.2f} .. {max(p99s):.2f} ms "
                      f"(how much the machine itself moves the tail)")
    m = report.get("machine_during_measurement") or {}
    if m:
        note = (f"machine while measuring: {m['busy_cores']:.2f} cores busy, {m['this_benchmark_cores']:.2f} of them "
                f"this benchmark, {max(0.0, m['other_load_cores']):.2f} other load, {m['steal_cores']:.2f} stolen")
        if m["other_load_cores"] > 0.25 or m["steal_cores"] > 0.1:
            note += ": the latencies, their tails most, are not those of a quiet machine; rerun on one"
            console.print(f"[yellow]{note}[/yellow]")
        else:
            console.print(note)
    v = systems.get("vllm-router", {})
    if v.get("command"):
        console.print("vllm-router: " + " ".join(v["command"]))


COLORS = {"direct": "#555555", "fleetwise/prefix_affinity": "#dd8452",
          "fleetwise/round_robin": "#c44e52", "fleetwise/least_outstanding": "#8172b3", "vllm-router": "#4c72b0"}


def plot(report: dict, runs: dict[str, System], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    measured = [k for k, s in runs.items() if s.open is not None]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))

    ax = axes[0]
    for k in measured:
        v = np.sort(runs[k].open.latencies_s * 1e3)
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=k, color=COLORS.get(k))
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("CDF")
    ax.set_title(f"open loop, {report['config']['rate']} req/s (Poisson)")
    ax.axhline(0.99, color="k", lw=0.5, alpha=0.4)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    ax = axes[1]
    routers = [k for k in measured if systems[k].get("overhead_ms")]
    ps = ("p50", "p90", "p99")
    width = 0.8 / max(1, len(routers))
    x = np.arange(len(ps))
    for j, k in enumerate(routers):
        vals = [systems[k]["overhead_ms"][p] for p in ps]
        bars = ax.bar(x + (j - (len(routers) - 1) / 2) * width, vals, width, label=k, color=COLORS.get(k))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, max(v, 0)), ha="center", va="bottom",
                        fontsize=7)
    ax.plot([-0.45, 0.45], [1.0, 1.0], color="green", lw=1, ls=":", label="targets (p50 1 ms, p99 5 ms)")
    ax.plot([1.55, 2.45], [5.0, 5.0], color="green", lw=1, ls=":")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, ps)
    ax.set_ylabel("added latency vs direct, ms")
    ax.set_title("router overhead vs direct (open loop; median over rounds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)

    ax = axes[2]
    names = [k for k in measured if runs[k].closed is not None]
    vals = [runs[k].closed.achieved_rps for k in names]
    bars = ax.bar(range(len(names)), vals, color=[COLORS.get(k, "#999999") for k in names])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace("fleetwise/", "fleetwise\n") for n in names], fontsize=8)
    ax.set_ylabel("completed requests/s")
    ax.set_title(f"sustained rate, {report['config']['closed_loop_clients']} clients closed loop")
    ax.margins(y=0.15)
    ax.grid(alpha=0.3, axis="y")

    env = report["environment"]
    fig.suptitle(f"{NUM_BACKENDS} stand-in backends; {env['cpu_count']} CPUs ({env['cpu_model']}); "
                 f"servers and load generator share them", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(vllm_version: str | None) -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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


# -- entry point -----------------------------------------------------------------------


def _router_config(path: Path, backends: list[str]) -> None:
    path.write_text("models:\n  - name: " + MODEL + "\n    mixed:\n"
                    + "".join(f"      - {u}\n" for u in backends))


def run_router_bench(out: Path = Path("bench/results"), rate: int = 500, seconds: float = 10.0,
                     skip_vllm_router: bool = False) -> dict:
    """Direct, fleetwise router (each policy) and vllm-router over the same stand-in backends;
    writes OUT/router.json and OUT/router.png and returns the report."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the tables
        console = Console(width=max(console.width, 180))
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bodies = make_bodies(SEED)
    schedule = poisson_schedule(rate, seconds, SEED)
    open_rounds = max(1, int(round(seconds / ROUND_S)))
    parts = split_schedule(schedule, seconds, open_rounds)
    closed_s = min(CLOSED_LOOP_MAX_S, max(1.0, seconds / 2))
    closed_rounds = max(1, int(round(closed_s / CLOSED_ROUND_S)))
    closed_round_s = closed_s / closed_rounds

    vllm_cmd, vllm_skip, vllm_version = (None, "--skip-vllm-router", None) if skip_vllm_router \
        else ensure_vllm_router(console)
    if vllm_skip and not skip_vllm_router:
        console.print(f"[yellow]vllm-router baseline left out: {vllm_skip}[/yellow]")
    env = environment(vllm_version)
    if env["cpus_usable"] and env["cpus_usable"] < 4:
        console.print(f"[yellow]{env['cpus_usable']} CPUs: the load generator, the routers and the backends share "
                      f"them; latencies include that contention, alike for every system[/yellow]")

    systems: list[System] = []
    skipped: dict[str, System] = {}
    logdir = Path(tempfile.mkdtemp(prefix="fleetwise-bench-router-"))
    procs = Processes(logdir)
    old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    machine = {}
    try:
        backends = []
        for k in range(NUM_BACKENDS):
            port = free_port()
            procs.start(f"backend{k}", [sys.executable, "-m", "fleetwise.bench.router", "backend",
                                        "--port", str(port)])
            backends.append(f"http://127.0.0.1:{port}")
        for k, b in enumerate(backends):
            wait_ready(procs, f"backend{k}", b + "/v1/completions", bodies[0])
        cfg = logdir / "router.yaml"
        _router_config(cfg, backends)

        plan: list[tuple[str, str, list[str] | None]] = [
            ("direct", "direct to the backends (client round-robin)", None)]
        for policy in POLICIES:
            plan.append((f"fleetwise/{policy}", f"fleetwise router, {policy}"
                         + (" (its default)" if policy == DEFAULT_POLICY else ""),
                         [sys.executable, "-m", "fleetwise", "router", "--config", str(cfg), "--host", "127.0.0.1",
                          "--port", "{port}", "--policy", policy]))
        if vllm_cmd:
            plan.append(("vllm-router", f"vllm-router {vllm_version}, {VLLM_ROUTER_POLICY}",
                         [*vllm_cmd, "--host", "127.0.0.1", "--port", "{port}", "--worker-urls", *backends,
                          "--policy", VLLM_ROUTER_POLICY, "--prometheus-port", "{port2}",
                          "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "60",
                          "--log-level", "warning"]))
        else:
            skipped["vllm-router"] = System("vllm-router", "vllm-router", [], skipped=vllm_skip)

        for key, label, argv in plan:  # all of them up before any measurement
            if argv is None:
                systems.append(System(key, label, [b + "/v1/completions" for b in backends]))
                continue
            port, port2 = free_port(), free_port()
            argv = [a.replace("{port}", str(port)).replace("{port2}", str(port2)) for a in argv]
            p = procs.start(key, argv)
            systems.append(System(key, label, [f"http://127.0.0.1:{port}/v1/completions"], pid=p.pid, command=argv))
        for s in list(systems):
            if s.pid is None:
                continue
            try:
                s.startup_s = wait_ready(procs, s.key, s.urls[0], bodies[0])
            except RuntimeError as e:
                if s.key != "vllm-router":
                    raise
                console.print(f"[yellow]vllm-router left out: {e}[/yellow]")
                procs.stop(s.key)
                systems.remove(s)
                s.skipped = f"did not start: {str(e).splitlines()[0]}"
                skipped[s.key] = s
        console.print(f"{NUM_BACKENDS} stand-in backends, {len(systems)} systems up; "
                      f"{_n(open_rounds, 'open-loop round')} of {seconds / open_rounds:.1f} s and "
                      f"{_n(closed_rounds, 'closed-loop round')} of "
                      f"{closed_round_s:.1f} s each, the systems taking turns")

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                      TimeElapsedColumn(), console=console, auto_refresh=False, transient=False) as progress:
            m0, w0 = _machine_cpu(), time.perf_counter()
            ours0 = _ours_cpu(procs)
            _run_loop(measure_all(systems, bodies, parts, closed_rounds, closed_round_s, progress))
            m1, w1, ours1 = _machine_cpu(), time.perf_counter(), _ours_cpu(procs)
        if m0 and m1:
            wall = w1 - w0
            machine = {"wall_s": wall, "busy_cores": (m1[0] - m0[0]) / wall, "steal_cores": (m1[1] - m0[1]) / wall,
                       "this_benchmark_cores": (ours1 - ours0) / wall}
            machine["other_load_cores"] = machine["busy_cores"] - machine["this_benchmark_cores"]
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)

    runs = {s.key: s for s in systems}
    report = build_report(runs, skipped, rate, seconds, parts, closed_rounds, closed_round_s, bodies, env, machine)
    json_path, png_path = out / "router.json", out / "router.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, runs, png_path)
    except Exception as exc:  # the numbers matter more than the picture
        console.print(f"[yellow]plot not written: {type(exc).__name__}: {exc}[/yellow]")
        png_path = None
    console.rule("summary")
    print_summary(console, report)
    print_notes(console, report)
    shutil.rmtree(logdir, ignore_errors=True)
    console.print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return report


def _n(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def _ours_cpu(procs: Processes) -> float:
    """CPU seconds of this process and every server it started."""
    t = os.times()
    total = t.user + t.system
    for p in procs.procs.values():
        total += _proc_cpu_s(p.pid) or 0.0
    return total


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def build_report(runs: dict[str, System], skipped: dict[str, System], rate: int, seconds: float,
                 parts: list, closed_rounds: int, closed_round_s: float, bodies: list[bytes], env: dict,
                 machine: dict) -> dict:
    systems: dict[str, dict] = {}
    order = ["direct", *(f"fleetwise/{p}" for p in POLICIES), "vllm-router"]
    for key in order:
        if key in skipped:
            systems[key] = {"label": skipped[key].label, "skipped": skipped[key].skipped}
        elif key in runs:
            s = runs[key]
            systems[key] = {"label": s.label, "command": s.command, "startup_s": s.startup_s,
                            "open_loop": s.open.to_json(), "closed_loop": s.closed.to_json(),
                            "rounds": s.rounds_json()}
    direct = systems["direct"]
    for key, s in systems.items():
        if key != "direct" and "skipped" not in s:
            s["overhead_ms"] = round_overheads(runs[key], runs["direct"])
            s["overhead_pooled_ms"] = overheads(s, direct)
            s["closed_loop_overhead_ms"] = overheads(s, direct, "closed_loop")
            s["max_rps_vs_direct"] = _ratio(s["closed_loop"]["achieved_rps"], direct["closed_loop"]["achieved_rps"])
    vllm_rps = systems.get("vllm-router", {}).get("closed_loop", {}).get("achieved_rps")
    if vllm_rps is not None:
        for key, s in systems.items():
            if key.startswith("fleetwise/") and "closed_loop" in s:
                s["max_rps_vs_vllm_router"] = _ratio(s["closed_loop"]["achieved_rps"], vllm_rps)
    return {
        "benchmark": "router",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "rate": rate, "seconds": seconds, "arrivals": "Poisson, open loop, seeded; the same for every system",
            "seed": SEED, "requests_per_system": int(sum(len(p) for p, _ in parts)), "open_loop_rounds": len(parts),
            "warmup_s": WARMUP_S, "turn_warmup_s": TURN_WARMUP_S, "closed_loop_clients": CLOSED_LOOP_CLIENTS,
            "closed_loop_rounds": closed_rounds,
            "closed_loop_round_s": closed_round_s, "closed_loop_seconds": closed_rounds * closed_round_s,
            "closed_loop_warmup_s_per_round": CLOSED_LOOP_WARMUP_S, "backends": NUM_BACKENDS, "model": MODEL,
            "request_bytes_mean": float(np.mean([len(b) for b in bodies])), "response_bytes": len(COMPLETION),
            "default_policy": DEFAULT_POLICY, "vllm_router_policy": VLLM_ROUTER_POLICY,
            "latency": "send to the last byte of the answer, in the load generator (aiohttp, one process)",
            "overhead": "a router's latency percentile minus the direct run's same percentile",
            "order": "rounds: every system runs the same slice of the schedule, the order turning each round",
        },
        "environment": env,
        "machine_during_measurement": machine,
        "systems": systems,
        "targets": evaluate(systems),
        "target_values": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
    }


def _main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fleetwise.bench.router",
                                 description="Pieces of `fleetwise bench router`.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend", help="A stand-in OpenAI completions server that answers at once.")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "backend":
        serve_backend(args.host, args.port)


if __name__ == "__main__":
    _main(sys.argv[1:])
