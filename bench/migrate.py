"""The gap a client sees when a drain moves its stream to another worker: with the KV moved
over the transfer path (live migration) against the baseline, the prompt and output
recomputed on the new worker, for a few context lengths, in one run.

    python -m fleetwise.bench.migrate [--out bench/results] [--repeats 3]

Two mixed workers (processes, the small preset unless --model) behind a router in this
process (round robin, drain grace 0). Each stream is a fresh random token-id prompt of the
context length (so no prefix cache holds it) and 64 greedy tokens; at its 16th event its
worker is marked draining in the router's endpoints file and the router moves it. The gap
is the router's own `fleetwise_router_migration_gap_seconds` (the last token relayed from
the old worker to the first from the new one), one migration at a time; the largest gap
between two events the client read is kept beside it. Each migrated stream's text is
checked against the same prompt sent again, undisturbed. Results: JSON and PNG under --out.
"""

import argparse
import asyncio
import json
import platform
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
import yaml
from rich.console import Console

from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv, stop_all, wait_healthy

from .harness import percentile
from .models import preset_model, prompt_token_ids

CONTEXTS = (128, 512, 1024, 1792)
MAX_TOKENS, DRAIN_AT = 64, 16
STEP_DELAY_S = 0.02
TRIES = 3  # a run whose stream ended before the drain reached it is run again


def start_workers(model_dir: Path, out: Path, count: int, token: Path, name: str,
                  *extra: str) -> tuple[list[Process], list[str]]:
    """`count` mixed worker processes (fault switches on), started: them and their internal URLs."""
    workers, internal = [], []
    for i in range(count):
        port, inner = free_port(), free_port()
        workers.append(Process(f"worker-{i}", fleetwise_argv(
            "worker", "--model", str(model_dir), "--role", "mixed", "--port", str(port), "--internal-port",
            str(inner), "--internal-token-file", str(token), "--served-model-name", name, "--fault", "switches",
            *extra), out / f"worker-{i}.log", f"http://127.0.0.1:{port}").start())
        internal.append(f"http://127.0.0.1:{inner}")
    return workers, internal


def slow_steps(token: Path, internal: list[str], delay: float) -> None:
    """Each worker's steps `delay` seconds longer (its fault switch)."""
    auth = {"Authorization": f"Bearer {token.read_text().strip()}"}
    for url in internal:
        httpx.post(url + "/internal/faults", json={"step_delay_seconds": delay}, headers=auth,
                   timeout=10).raise_for_status()


class Fleet:
    """Two worker processes and a router in a thread of this process."""

    def __init__(self, model_dir: Path, out: Path):
        from fleetwise.router.endpoints import StaticEndpoints
        from fleetwise.router.proxy import Router
        from fleetwise.up import write_token
        self.token = write_token(out)
        # the workers' internal listeners: what the router reaches
        self.workers, self.internal = start_workers(model_dir, out, 2, self.token, "m", "--kv-cache-mib", "256")
        self.config = out / "router.yaml"
        self.write()
        self.router = Router(StaticEndpoints(self.config), "round_robin", probe_interval=0.05,
                             token=self.token.read_text().strip(), drain_grace=0.0)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        from fleetwise.router.app import build_app
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.router), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()

    def slow_steps(self) -> None:
        """Each decode step STEP_DELAY_S longer (the workers' fault switch), so that a stream
        is still on its worker when the client has read DRAIN_AT events, however loaded the
        machine; both modes pay it once in their gap (the new worker's first step)."""
        slow_steps(self.token, self.internal, STEP_DELAY_S)

    def write(self, draining: str | None = None) -> None:
        entries = [u if u != draining else {"url": u, "state": "draining", "reason": "scale-down"}
                   for u in self.internal]
        self.config.write_text(yaml.safe_dump({"models": [{"name": "m", "mixed": entries}]}))

    def replicas(self) -> list:
        return self.router.source.models()["m"].replicas["mixed"]

    def settle(self) -> None:
        """All replicas back in routing and healthy."""
        self.write()
        deadline = time.monotonic() + 30
        while not all(r.routable and r.healthy for r in self.replicas()):
            if time.monotonic() > deadline:
                raise SystemExit("error: the router did not take the workers back")
            time.sleep(0.02)

    def gap(self) -> tuple[float, float]:
        """The router's migration gap histogram: (sum, count)."""
        total = count = 0.0
        for family in self.router.metrics.migration_gap.collect():
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
        return total, count

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        stop_all([self.workers])


def read_stream(url: str, body: dict, on_event=None) -> tuple[str, list[float], int]:
    """A streamed completion read: its text, the arrival time of each event with text, and
    its usage's completion tokens (0 when not asked); `on_event(k)` after the k-th event.
    A stream that ends in an error raises RuntimeError."""
    text, times, used = [], [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"the stream failed: {data['error']}")
            used = (data.get("usage") or {}).get("completion_tokens", used)
            if data.get("choices"):
                text += [c["text"] for c in data["choices"]]
                times.append(time.perf_counter())
                if on_event is not None:
                    on_event(len(times))
    return "".join(text), times, used


def stream(url: str, prompt: list[int], on_event=None) -> tuple[str, list[float]]:
    """The completion's text and the times of its events."""
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        text, times, _ = read_stream(url, body, on_event)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}")
    return text, times


def migrate_once(fleet: Fleet, prompt: list[int], kv: bool) -> dict | None:
    """One drained stream: its gap, or None when the stream was no longer on its worker."""
    fleet.router.mover.export = fleet.router._export if kv else None
    fleet.settle()
    before = fleet.gap()
    drained: list[str] = []

    def drain(n: int) -> None:
        busy = [r.url for r in fleet.replicas() if r.outstanding > 0]
        if n == DRAIN_AT and not drained and len(busy) == 1:
            drained.append(busy[0])
            fleet.write(draining=busy[0])
    text, times = stream(fleet.url, prompt, drain)
    after = fleet.gap()
    if after[1] - before[1] != 1:
        return None
    fleet.settle()
    again, _ = stream(fleet.url, prompt)
    return {"gap_s": after[0] - before[0], "client_max_gap_s": float(np.max(np.diff(times))),
            "identical": text == again}


def run(out: Path, model: Path | None, repeats: int, contexts: tuple[int, ...]) -> dict:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model or preset_model(out, "small", console)
    vocab = prompt_token_ids(model_dir)
    rng = np.random.default_rng(0)
    fleet = Fleet(model_dir, out)
    try:
        wait_healthy(fleet.workers, 300)
        fleet.slow_steps()
        fleet.settle()
        stream(fleet.url, [int(t) for t in rng.choice(vocab, 32)])  # warm up both
        stream(fleet.url, [int(t) for t in rng.choice(vocab, 32)])
        rows = []
        for ctx in contexts:
            for r in range(repeats):
                for kv in ((True, False) if r % 2 == 0 else (False, True)):  # alternate who goes first
                    for _ in range(TRIES):
                        prompt = [int(t) for t in rng.choice(vocab, ctx)]
                        if (got := migrate_once(fleet, prompt, kv)) is not None:
                            break
                    else:
                        raise SystemExit(f"error: {TRIES} streams of {ctx} tokens ended before the drain reached them")
                    row = {"context": ctx, "mode": "kv" if kv else "recompute", **got}
                    console.print(row)
                    rows.append(row)
    finally:
        fleet.stop()
    summary: dict[str, dict[str, float]] = {}
    for ctx in contexts:
        gaps = {m: [r["gap_s"] for r in rows if r["context"] == ctx and r["mode"] == m] for m in ("kv", "recompute")}
        p50 = {m: percentile(v, 50) for m, v in gaps.items()}
        summary[str(ctx)] = {"kv_gap_p50_s": p50["kv"], "recompute_gap_p50_s": p50["recompute"],
                             "recompute_over_kv": p50["recompute"] / p50["kv"]}
    result = {"benchmark": "migrate", "model_dir": str(model_dir), "max_tokens": MAX_TOKENS, "drain_at": DRAIN_AT,
              "step_delay_s": STEP_DELAY_S,
              "repeats": repeats, "machine": f"{platform.machine()} CPU, {platform.node()}", "device": "cpu",
              "all_identical": all(r["identical"] for r in rows), "summary": summary, "runs": rows,
              "command": f"python -m fleetwise.bench.migrate --out {out} --repeats {repeats}"}
    (out / "migrate.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "migrate.png")
    for c, s in summary.items():
        console.print(f"context {c:>5}: gap p50 KV moved {s['kv_gap_p50_s'] * 1e3:7.1f} ms, recomputed "
                      f"{s['recompute_gap_p50_s'] * 1e3:7.1f} ms, ratio {s['recompute_over_kv']:.2f}x")
    console.print(f"every migrated stream identical to the undisturbed one: {result['all_identical']}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ctxs = [int(c) for c in result["summary"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, label in (("kv", "KV moved"), ("recompute", "recomputed (baseline)")):
        runs = [r for r in result["runs"] if r["mode"] == mode]
        ax.scatter([r["context"] for r in runs], [r["gap_s"] * 1e3 for r in runs], alpha=0.4, s=12)
        ax.plot(ctxs, [result["summary"][str(c)][f"{mode}_gap_p50_s"] * 1e3 for c in ctxs], marker="o", label=label)
    ax.set_xlabel("context at the drain (prompt tokens)")
    ax.set_yscale("log")
    ax.set_ylabel("migration gap, ms (log; p50 line, runs as dots)")
    ax.set_title("A drained stream's gap: KV moved vs recomputed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contexts", type=lambda s: tuple(int(x) for x in s.split(",")), default=CONTEXTS)
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    run(a.out, a.model, a.repeats, a.contexts)


if __name__ == "__main__":
    main()
