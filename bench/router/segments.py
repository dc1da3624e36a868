"""Where a non-streamed request's time goes inside fleetwise's router, under the router
benchmark's load: `python -m fleetwise.bench.router segments` (`--rate`, `--seconds`).

The router runs in a process of its own with stamps at seven points of each request's path,
on the wall clock and on the thread's CPU clock: the request's first byte parsed (`begin`),
its last (`parsed`), its task's first step (`task`), the request written to the replica
(`sent`), the replica's answer head parsed (`head`), the task going on with the answer
(`resumed`), the answer written to the client (`written`). The stand-in backends and the
open-loop load are the router benchmark's own. Between `parsed` and `task`, and between
`head` and `resumed`, a request waits for the event loop, busy with other requests; `sent`
to `head` is the replica's round trip; the rest is the router's own work, and the CPU clock
says how much of its wall time that work ran.

The stamps wrap methods of the router's front door and its upstream client from outside
(this module, not the router, holds them): the router serves as it always does.
"""

import asyncio
import contextvars
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleetwise.bench.harness import make_console, summary
from fleetwise.bench.router.cases import router_config
from fleetwise.bench.router.load import make_bodies, open_loop, poisson_schedule, session
from fleetwise.bench.router.run import Servers, start_backends
from fleetwise.bench.router.systems import SEED
from fleetwise.net import free_port

POINTS = ("begin", "parsed", "task", "sent", "head", "resumed", "written")
WARMUP_S = 1.0
_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("segments_request", default=None)


def instrument(rows: list[dict[str, float]]) -> None:
    """Stamps on the router's classes; each request served appends its stamps to `rows`."""
    from fleetwise.router import front, http1, upstream

    wall, cpu = time.perf_counter, time.thread_time

    def stamp(where: dict, point: str) -> None:
        where[point], where["cpu_" + point] = wall(), cpu()

    begin, complete = http1.Connection.on_message_begin, http1.Connection.on_message_complete
    serve, send, post = front.Door.serve, upstream._Connection.send, upstream.Pool.post
    head = upstream._Connection.on_headers_complete

    def on_message_begin(self) -> None:
        self._stamps = {}
        stamp(self._stamps, "begin")
        begin(self)

    def on_message_complete(self) -> None:
        stamp(self._stamps, "parsed")
        self.__dict__.setdefault("_queued", []).append(self._stamps)
        complete(self)

    async def traced_serve(self, conn, req, keep) -> None:
        where = conn._queued.pop(0)
        stamp(where, "task")
        _current.set(where)  # the request's task: its call to the replica finds it here
        await serve(self, conn, req, keep)
        stamp(where, "written")
        rows.append(where)

    def traced_send(self, request: bytes):
        self._stamps = _current.get()
        if self._stamps is not None and "sent" not in self._stamps:  # the first try's
            stamp(self._stamps, "sent")
        return send(self, request)

    async def traced_post(self, *args, **kwargs):
        response = await post(self, *args, **kwargs)
        where = _current.get()
        if where is not None and "resumed" not in where:
            stamp(where, "resumed")
        return response

    def on_headers_complete(self) -> None:
        where = getattr(self, "_stamps", None)
        if where is not None and "head" not in where:
            stamp(where, "head")
        head(self)

    http1.Connection.on_message_begin = on_message_begin  # type: ignore[method-assign]
    http1.Connection.on_message_complete = on_message_complete  # type: ignore[method-assign]
    front.Door.serve = traced_serve  # type: ignore[method-assign]
    upstream._Connection.send = traced_send  # type: ignore[method-assign]
    upstream.Pool.post = traced_post  # type: ignore[method-assign]
    upstream._Connection.on_headers_complete = on_headers_complete  # type: ignore[method-assign]


def serve_traced(config: str, port: int, token_file: str, policy: str, out: str) -> None:
    """The router with stamps, until SIGTERM; then every request's stamps to `out` (JSON)."""
    from fleetwise.router.app import serve
    from fleetwise.router.endpoints import StaticEndpoints

    rows: list[dict[str, float]] = []
    instrument(rows)
    token = Path(token_file).read_text().strip()
    try:
        serve(StaticEndpoints(config), "127.0.0.1", port, token, policy=policy)
    finally:
        Path(out).write_text(json.dumps(rows))


def summarize(rows: list[dict[str, float]]) -> dict:
    """Percentiles (ms) of each segment's wall time, of the router's CPU time in the two
    stretches it works for one request alone, and of the whole."""
    whole = [r for r in rows if all(p in r for p in POINTS)]
    out: dict = {"requests": len(whole), "segments": {}, "cpu": {}}

    def pct(values: list[float]) -> dict:
        return summary(values, "p50", "p90", "p99", scale=1e3) or {}

    for a, b in itertools.pairwise(POINTS):
        out["segments"][f"{a}->{b}"] = pct([r[b] - r[a] for r in whole])
    for a, b in (("task", "sent"), ("resumed", "written")):
        out["cpu"][f"{a}->{b}"] = pct([r["cpu_" + b] - r["cpu_" + a] for r in whole])
    out["segments"]["begin->written"] = pct([r["written"] - r["begin"] for r in whole])
    return out


def run_segments(rate: float = 500.0, seconds: float = 10.0, policy: str = "prefix_load",
                 console: Console | None = None) -> dict:
    from fleetwise.router.policies import make_policy

    if rate <= 0 or seconds <= 0:
        raise ValueError("--rate and --seconds must be positive")
    make_policy(policy)  # an unknown name fails here, not after the router's start times out
    console = console or make_console(120)
    bodies = make_bodies(SEED)
    servers = Servers(Path(tempfile.mkdtemp(prefix="fleetwise-bench-segments-")))
    rows_path = servers.logdir / "stamps.json"
    try:
        backends = start_backends(servers, bodies)
        cfg, token = servers.logdir / "router.yaml", servers.logdir / "internal-token"
        router_config(cfg, backends)
        token.write_text("segments-" + "0" * 24)
        port = free_port()
        router = servers.start("router", [sys.executable, "-m", "fleetwise.bench.router", "traced-router",
                                          "--config", str(cfg), "--port", str(port), "--internal-token-file",
                                          str(token), "--policy", policy, "--out", str(rows_path)],
                               f"http://127.0.0.1:{port}")
        servers.wait_ready("router", bodies[0])
        url = router.url + "/v1/completions"

        measured_from = [0.0]

        async def load() -> None:
            async with session(256) as s:
                await open_loop(s, [url], bodies, poisson_schedule(rate, WARMUP_S, SEED + 1), WARMUP_S)
                measured_from[0] = time.perf_counter()  # CLOCK_MONOTONIC: the router's stamps are on it too
                await open_loop(s, [url], bodies, poisson_schedule(rate, seconds, SEED), seconds)

        console.print(f"{rate:g} req/s for {seconds:g} s through the router ({policy}), "
                      f"after {WARMUP_S:g} s of warm-up")
        asyncio.run(load())
    finally:
        servers.stop_all()
    rows = json.loads(rows_path.read_text())
    report = summarize([r for r in rows if r.get("begin", 0.0) >= measured_from[0]])
    report.update(rate=rate, seconds=seconds, policy=policy)
    _print(console, report)
    return report


def _print(console: Console, report: dict) -> None:
    t = Table(title=f"inside the router: {report['requests']} requests (ms)")
    for col in ("segment", "what", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col.startswith("p") else "left")
    what = {"begin->parsed": "the request arriving and parsed", "parsed->task": "waiting for the event loop",
            "task->sent": "routing, checks, the request written", "sent->head": "the replica's round trip",
            "head->resumed": "waiting for the event loop", "resumed->written": "the answer read, assembled, written",
            "begin->written": "all of it"}

    def cells(p: dict) -> list[str]:
        return [f"{p.get(q, float('nan')):.3f}" for q in ("p50", "p90", "p99")]

    for name, p in report["segments"].items():
        t.add_row(name, what.get(name, ""), *cells(p))
    for name, p in report["cpu"].items():
        t.add_row(f"{name} (CPU)", "the router's CPU in it", *cells(p))
    console.print(t)
