"""The router benchmark's `migrate` case: the gap a client sees when its stream moves to
another worker, and the router's CPU per relayed token with migration at work, on real
workers (the tiny preset, three `fleetwise worker` processes, steps slowed 20 ms so that a
stream outlasts the event that moves it) behind `fleetwise router` (its default policy,
drain grace 0).

Three phases over the same greedy streams (`streams` at once, `tokens` each, ignore_eos):
undisturbed (the baseline of the same run), one worker killed with SIGKILL once the streams
are a quarter through (its streams recomputed elsewhere: reason worker_failed), then one of
the two left marked draining in the router's endpoints file (its streams moved with their
KV: reason drain). A migrated stream's gap is the longest wait between two of its text events;
the router's own migrations counter says how many streams moved, and that many of the
longest waits are the gaps (the others' longest waits are an ordinary token interval, whose
p99 is reported beside them). Every stream is checked: exactly `tokens` tokens (its usage)
and the undisturbed text. The router's CPU (its process's user + system time over the phase) per
relayed token is compared with the undisturbed phase's.
"""

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import yaml
from rich.console import Console

from fleetwise.bench.harness import figure, finish, label_bars, percentile, process_cpu_seconds, progress_bar
from fleetwise.bench.migrate import read_stream, slow_steps, start_workers
from fleetwise.bench.models import preset_model
from fleetwise.bench.targets import AT_MOST, Target
from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv, stop_all, wait_healthy

TARGETS = {"gap_p99_s": Target(AT_MOST, 2.0, "migration gap p99, s", "<= 2 s")}
STEP_DELAY_S = 0.02


class Fleet:
    """Three workers and a router, each a process; the router reads an endpoints file."""

    def __init__(self, model_dir: Path, workdir: Path):
        from fleetwise.up import write_token
        self.workdir, self.token = workdir, write_token(workdir)
        self.workers, self.internal = start_workers(model_dir, workdir, 3, self.token, "tiny", "--block-size", "8")
        self.config = workdir / "endpoints.yaml"
        self.write()
        port = free_port()
        self.router = Process("router", fleetwise_argv(
            "router", "--config", str(self.config), "--port", str(port), "--internal-token-file", str(self.token),
            "--drain-grace", "0", "--probe-interval", "0.2"), workdir / "router.log", f"http://127.0.0.1:{port}")
        self.router.start()
        wait_healthy([*self.workers, self.router], 180)
        slow_steps(self.token, self.internal, STEP_DELAY_S)

    def write(self, gone: tuple[int, ...] = (), draining: tuple[int, ...] = ()) -> None:
        mixed = [url if i not in draining else {"url": url, "state": "draining", "reason": "bench"}
                 for i, url in enumerate(self.internal) if i not in gone]
        self.config.write_text(yaml.safe_dump({"models": [{"name": "tiny", "mixed": mixed}]}))

    def cpu_s(self) -> float:
        """The router process's user + system CPU seconds so far."""
        return process_cpu_seconds(self.router.pid) or 0.0

    def moves(self) -> dict[str, float]:
        page = httpx.get(self.router.url + "/metrics", timeout=10).text
        out = {}
        for line in page.splitlines():
            if line.startswith("fleetwise_router_migrations_total{"):
                out[line.split('reason="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        stop_all([[self.router], self.workers])


def read(url: str, body: dict, seen: list[int], i: int) -> tuple[str, list[float], int]:
    """One stream (bench/migrate.py's reading); `seen[i]` counts its events."""
    def count(k: int) -> None:
        seen[i] = k
    return read_stream(url, body, count)


def phase(fleet: Fleet, bodies: list[dict], act=None, at: int = 0) -> dict:
    """The streams at once; `act()` once every stream has `at` events."""
    seen = [0] * len(bodies)
    before, cpu0 = fleet.moves(), fleet.cpu_s()
    with ThreadPoolExecutor(len(bodies)) as ex:
        running = [ex.submit(read, fleet.router.url, b, seen, i) for i, b in enumerate(bodies)]
        if act is not None:
            while min(seen) < at and not all(f.done() for f in running):
                time.sleep(0.005)
            act()
        results = [f.result() for f in running]
    cpu = fleet.cpu_s() - cpu0
    after = fleet.moves()
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if after.get(k, 0.0) > before.get(k, 0.0)}
    tokens = sum(used for _, _, used in results)
    gaps = [[b - a for a, b in pairwise(t)] for _, t, _ in results]
    return {"texts": [x for x, _, _ in results], "waits": [max(g) for g in gaps],
            "intervals": [x for g in gaps for x in g], "tokens_each": [used for _, _, used in results],
            "moved": moved, "router_cpu_us_per_token": 1e6 * cpu / max(1, tokens), "tokens": tokens}


def _summary(name: str, p: dict, want: list[str], tokens: int) -> dict:
    moved = int(sum(p["moved"].values()))
    gaps = sorted(p["waits"])[len(p["waits"]) - moved:] if moved else []
    exact = sum(1 for text, n, w in zip(p["texts"], p["tokens_each"], want) if n == tokens and text == w)
    return {"phase": name, "migrations": p["moved"], "streams": len(want), "exact_streams": exact,
            "gap_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "max": max(gaps)} if gaps else None,
            "token_interval_p99_s": percentile(p["intervals"], 99),
            "router_cpu_us_per_token": p["router_cpu_us_per_token"], "tokens_relayed": p["tokens"]}


def run_migration(out: Path, console: Console, streams: int = 12, tokens: int = 96) -> dict:
    """The three phases; returns the report (the router benchmark keeps it in router.json as
    `migration` and draws it with `plot_migration`). The tiny model is written under OUT."""
    model = preset_model(Path(out), "tiny", console)
    bodies = [{"model": "tiny", "prompt": f"stream {i} of the migration case", "max_tokens": tokens,
               "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for i in range(streams)]
    fleet = Fleet(model, Path(tempfile.mkdtemp(prefix="fleetwise-bench-migrate-")))
    phases = []
    try:
        with progress_bar(console, "migrate case", 3, "phases") as advance:
            base = phase(fleet, bodies)
            advance(1)
            killed = phase(fleet, bodies, fleet.workers[0].kill, tokens // 4)
            advance(1)
            fleet.write(gone=(0,))
            time.sleep(0.5)  # the router reads the file again
            drained = phase(fleet, bodies, lambda: fleet.write(gone=(0,), draining=(1,)), tokens // 4)
            advance(1)
    finally:
        fleet.stop()
    for name, p in (("undisturbed", base), ("worker_killed", killed), ("drained", drained)):
        phases.append(_summary(name, p, base["texts"], tokens))
    gaps = sorted(g for p in (killed, drained) for g in sorted(p["waits"])[streams - int(sum(p["moved"].values())):])
    p99 = percentile(gaps, 99) if gaps else None
    report = {"streams": streams, "tokens": tokens, "step_delay_s": STEP_DELAY_S, "phases": phases,
              "gap_s": {"p50": percentile(gaps, 50), "p99": p99, "count": len(gaps)} if gaps else None,
              "router_cpu_per_token_vs_undisturbed": [p["router_cpu_us_per_token"] / base["router_cpu_us_per_token"]
                                                      for p in (killed, drained)],
              "targets": {k: TARGETS[k].check(p99).to_json() for k in TARGETS}}
    for p in phases:
        gap = p["gap_s"]
        console.print(f"migrate {p['phase']}: {p['exact_streams']}/{p['streams']} streams exact, "
                      f"moves {p['migrations']}"
                      + (f", gap p50 {gap['p50'] * 1e3:.0f} ms p99 {gap['p99'] * 1e3:.0f} ms" if gap else "")
                      + f", token interval p99 {p['token_interval_p99_s'] * 1e3:.0f} ms, router "
                      f"{p['router_cpu_us_per_token']:.0f} µs CPU/token")
    return report


def plot_migration(report: dict, path: Path) -> None:
    fig, axes = figure(2, (11, 4))
    phases = report["phases"]
    ax = axes[0]
    names = [p["phase"] for p in phases if p["gap_s"]]
    for j, q in enumerate(("p50", "p99")):
        vals = [1e3 * p["gap_s"][q] for p in phases if p["gap_s"]]
        bars = ax.bar([k + (j - 0.5) * 0.35 for k in range(len(names))], vals, 0.35, label=f"gap {q}")
        label_bars(ax, bars, [f"{v:.0f}" for v in vals])
    base = 1e3 * phases[0]["token_interval_p99_s"]
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"undisturbed token interval p99 ({base:.0f} ms)")
    ax.axhline(2000, color="r", lw=0.8, label="target p99 2 s")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("client's wait at the move, ms")
    ax.set_title("migration gap")
    ax.legend(fontsize=8)
    ax = axes[1]
    vals = [p["router_cpu_us_per_token"] for p in phases]
    bars = ax.bar([p["phase"] for p in phases], vals, color="#dd8452")
    label_bars(ax, bars, [f"{v:.0f}" for v in vals])
    ax.set_ylabel("router CPU µs per relayed token")
    ax.set_title("router CPU per token, same run")
    finish(fig, path, f"migrate: {report['streams']} streams of {report['tokens']} tokens, tiny model, real workers")

