"""The router benchmark's load: seeded request bodies and Poisson schedules, an open loop
(each request sent at its time whatever the answers before it) and a closed loop (clients
that each send the next request when the last one returned), and what one run of either
measured."""

import asyncio
import gc
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetwise.bench.harness import Alarm, summary
from fleetwise.bench.router.backend import MODEL

NUM_PREFIXES = 16             # shared prompt prefixes (so prefix affinity has something to find)
NUM_BODIES = 512
REQUEST_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 0.5


def percentiles_ms(values: Any) -> dict | None:
    """Latency percentiles of seconds, in ms."""
    return summary(values, "p50", "p90", "p99", "p999", "mean", "max", "n", scale=1e3)


@dataclass
class Run:
    """Measured load against one system: one round, or all its rounds merged."""
    mode: str                       # open_loop | closed_loop
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lag_s: np.ndarray = field(default_factory=lambda: np.zeros(0))   # open loop: late start vs schedule
    span_s: float = 0.0             # open loop: start to last answer, at least the schedule's span;
                                    # closed loop: the measured window
    scheduled_s: float = 0.0        # open loop: the time the schedule spans (offered = sent / this)
    clients: int | None = None
    loadgen_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    ttft_s: np.ndarray = field(default_factory=lambda: np.zeros(0))         # streams: send to first event
    chunk_delay_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # streams: backend write to arrival
    tokens: int = 0                 # streams: events received (completed requests)

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
        """One run of all the parts: counts and times added, latencies pooled."""
        errors: dict[str, int] = {}
        for r in parts:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        cpu = [r.server_cpu_s for r in parts if r.server_cpu_s is not None]
        return Run(parts[0].mode, sum(r.sent for r in parts), sum(r.completed for r in parts), errors,
                   np.concatenate([r.latencies_s for r in parts]), np.concatenate([r.lag_s for r in parts]),
                   sum(r.span_s for r in parts), sum(r.scheduled_s for r in parts), parts[0].clients,
                   sum(r.loadgen_cpu_s for r in parts), None if len(cpu) < len(parts) else sum(cpu),
                   np.concatenate([r.ttft_s for r in parts]), np.concatenate([r.chunk_delay_s for r in parts]),
                   sum(r.tokens for r in parts))

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
        if self.tokens:
            d["tokens"] = self.tokens
            d["ttft_ms"] = percentiles_ms(self.ttft_s)
            d["chunk_delay_ms"] = percentiles_ms(self.chunk_delay_s)
        if self.server_cpu_s is not None:
            d["router_cpu_s"] = self.server_cpu_s
            d["router_cpu_us_per_request"] = 1e6 * self.server_cpu_s / max(1, self.completed)
            if self.tokens:
                d["router_cpu_us_per_token"] = 1e6 * self.server_cpu_s / self.tokens
            d["router_cpu_cores"] = self.server_cpu_s / self.span_s if self.span_s > 0 else None
        return d


def make_bodies(seed: int, n: int = NUM_BODIES) -> list[bytes]:
    """Completion requests of ~0.5 KB: one of a few shared prefixes, then words of their own."""
    import random
    rng = random.Random(seed)
    words = ["fleet", "replica", "prefill", "decode", "cache", "token", "router", "policy", "latency", "budget",
             "node", "queue", "block", "stream", "handoff", "lease", "prompt", "model", "batch", "schedule", "kernel"]
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
    n = max(1, round(rate * seconds))
    return np.sort(np.random.default_rng(seed).uniform(0.0, seconds, n))


def split_schedule(schedule: np.ndarray, seconds: float, rounds: int) -> list[tuple[np.ndarray, float]]:
    """Consecutive slices of equal duration, each starting at 0, with that duration."""
    edges = np.linspace(0.0, seconds, rounds + 1)
    edges[-1] = np.nextafter(max(seconds, schedule[-1]), np.inf)
    parts = []
    for a, b in itertools.pairwise(edges):
        seg = schedule[(schedule >= a) & (schedule < b)]
        if seg.size:
            parts.append((seg - a, float(b - a)))
    return parts


_HEADERS = {"content-type": "application/json"}


def session(limit: int) -> Any:
    """An aiohttp client session with up to `limit` kept-alive connections."""
    import aiohttp
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=300, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), auto_decompress=False)


async def _one(session: Any, url: str, body: bytes) -> str | None:
    """Sends one completion; None when it succeeded, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=_HEADERS) as r:
            data = await r.read()
            if r.status != 200:
                return f"HTTP {r.status}"
            if not data.startswith(b"{"):
                return "bad body"
            return None
    except TimeoutError:
        return "timeout"
    except Exception as e:  # counted, never fatal: the run goes on
        return type(e).__name__


_STAMP = re.compile(rb'"t":([0-9.]+)')


@dataclass
class Stream:
    """What one streamed answer's events said: their count, when the first came, how long
    each took from the backend's write (its `"t"` stamp, CLOCK_MONOTONIC) to arrival here."""
    events: int = 0
    first: float | None = None
    delays: list[float] = field(default_factory=list)


async def _one_stream(session: Any, url: str, body: bytes, seen: Stream) -> str | None:
    """Sends one streamed completion and reads its events as they come."""
    try:
        async with session.post(url, data=body, headers=_HEADERS) as r:
            if r.status != 200:
                await r.read()
                return f"HTTP {r.status}"
            tail = b""
            async for data in r.content.iter_any():
                now = time.monotonic()
                if seen.first is None:
                    seen.first = time.perf_counter()
                for m in _STAMP.finditer(data):
                    seen.delays.append(now - float(m.group(1)))
                    seen.events += 1
                tail = (tail + data)[-64:]
            if b"{\"error\"" in tail or not tail.endswith(b"data: [DONE]\n\n"):
                return "stream did not finish"
            return None
    except TimeoutError:
        return "timeout"
    except Exception as e:  # counted, never fatal: the run goes on
        return type(e).__name__


async def _ticker(tick: Callable[[], None], every: float = PROGRESS_EVERY_S) -> None:
    while True:
        await asyncio.sleep(every)
        tick()


async def open_loop(session: Any, urls: list[str], bodies: list[bytes], schedule: np.ndarray, duration: float,
                    first_body: int = 0, tick: Callable[[int], None] | None = None,
                    cpu: Callable[[], float | None] | None = None, stream: bool = False) -> Run:
    """Sends request i at schedule[i] whatever the answers before it (open loop); latency
    runs from the send to the last byte of the answer. `duration`: the span the schedule
    stands for (for the offered rate); `cpu`: reads the server's CPU seconds; `stream`: the
    bodies ask for streams, whose events are timed too."""
    n = len(schedule)
    lat = np.full(n, np.nan)
    lag = np.zeros(n)
    ends = np.zeros(n)
    ttft = np.full(n, np.nan)
    delays: list[float] = []
    tokens = [0]
    errors: dict[str, int] = {}
    pending = set()
    done = [0]
    ticker = asyncio.create_task(_ticker(lambda: tick(done[0]))) if tick else None
    nurls, nbodies = len(urls), len(bodies)

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        lag[i] = t0 - (start + schedule[i])
        seen = Stream()
        url, body = urls[i % nurls], bodies[(first_body + i) % nbodies]
        err = await (_one_stream(session, url, body, seen) if stream else _one(session, url, body))
        t1 = time.perf_counter()
        ends[i] = t1
        if err is None:
            lat[i] = t1 - t0
            if stream and seen.first is not None:
                ttft[i] = seen.first - t0
                delays.extend(seen.delays)
                tokens[0] += seen.events
        else:
            errors[err] = errors.get(err, 0) + 1
        done[0] += 1

    cpu0, lg0 = cpu() if cpu else None, time.process_time()
    start = time.perf_counter() + 0.002
    async with Alarm() as alarm:  # each send at its time, not on the loop's millisecond ticks
        for i in range(n):
            await alarm.until(start + schedule[i])
            t = asyncio.create_task(one(i))
            pending.add(t)
            t.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    cpu1, lg1 = cpu() if cpu else None, time.process_time()
    if ticker:
        ticker.cancel()
    if tick:
        tick(done[0])
    ok = ~np.isnan(lat)
    return Run("open_loop", sent=n, completed=int(ok.sum()), errors=errors, latencies_s=lat[ok], lag_s=lag,
               span_s=max(float(ends.max() - start), duration), scheduled_s=duration,
               loadgen_cpu_s=lg1 - lg0, server_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
               ttft_s=ttft[~np.isnan(ttft)], chunk_delay_s=np.asarray(delays), tokens=tokens[0])


async def closed_loop(session: Any, urls: list[str], bodies: list[bytes], clients: int, seconds: float,
                      warmup_s: float, tick: Callable[[float], None] | None = None,
                      cpu: Callable[[], float | None] | None = None, stream: bool = False) -> Run:
    """`clients` loops, each sending its next request when the last one returns; counts what
    completes inside the window after the warm-up."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    sent, tokens = [0], [0]
    t_start = time.perf_counter()
    w0, w1 = t_start + warmup_s, t_start + warmup_s + seconds
    nurls, nbodies = len(urls), len(bodies)
    cpu_at: dict[str, float | None] = {}  # the server's CPU seconds at the window's start and end
    lg_at: dict[str, float] = {}          # the load generator's
    ticker = asyncio.create_task(_ticker(lambda: tick(min(seconds, max(0.0, time.perf_counter() - w0))))) \
        if tick else None

    async def client(k: int) -> None:
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= w1:
                return
            seen = Stream()
            err = await (_one_stream(session, urls[i % nurls], bodies[i % nbodies], seen) if stream
                         else _one(session, urls[i % nurls], bodies[i % nbodies]))
            t1 = time.perf_counter()
            i += clients
            if t0 >= w0 and t1 <= w1:
                sent[0] += 1
                tokens[0] += seen.events if err is None else 0
                if err is None:
                    lat.append(t1 - t0)
                else:
                    errors[err] = errors.get(err, 0) + 1

    async def window() -> None:
        await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
        cpu_at["start"], lg_at["start"] = cpu() if cpu else None, time.process_time()
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        cpu_at["end"], lg_at["end"] = cpu() if cpu else None, time.process_time()

    await asyncio.gather(window(), *(client(k) for k in range(clients)))
    if ticker:
        ticker.cancel()
    if tick:
        tick(seconds)
    cpu0, cpu1 = cpu_at["start"], cpu_at["end"]
    server = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return Run("closed_loop", sent=sent[0], completed=len(lat), errors=errors, latencies_s=np.asarray(lat),
               span_s=seconds, clients=clients, loadgen_cpu_s=lg_at["end"] - lg_at["start"], server_cpu_s=server,
               tokens=tokens[0])


class QuietGC:
    """No collector pauses in the load generator while it measures."""

    def __enter__(self) -> None:
        gc.collect()
        gc.freeze()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()
        gc.unfreeze()
