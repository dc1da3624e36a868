"""The router benchmark's further cases, each over its own stand-in backends with direct,
fleetwise's router (its default policy) and vllm-router in the same rounds:

  stream    streamed completions of `tokens` events, paced `itl_ms` apart: the added latency
            to the first event and to the end, each event's delay from the backend's write to
            the client, the router's CPU per request and per relayed token
  whole     completions answered whole, generated at the stream case's pace (`tokens` tokens
            `itl_ms` apart): fleetwise's router asks for a coalesced stream and keeps its ids
            (migration's work on a request answered whole), vllm-router and direct get the
            answer at the end; and fleetwise's router again over stand-ins that send a line of
            ids per token, as workers of the release before did (`fleetwise-ids-per-token`)
  handoff   disaggregated: a prefill and a decode backend; fleetwise's router does its
            /internal/prefill -> /internal/decode handoff, vllm-router its PD mode
            (`--vllm-pd-disaggregation`: a prefill request, then the decode request);
            direct is one hop to the decode backend, so the overhead is both hops
  retry     each backend answers 429 to every `fail_every`-th request: the router sends it to
            the other (direct's client gets the 429, counted as its error)

  migrate   real workers: streams moved when a worker is killed and when one is drained; the
            gap the client sees and the router's CPU per token (bench/router/migration.py)

Plus `tracker_cost`: the CPU of migration's per-token work (Tracker.feed: the `fw:` line
parsed, the ids kept, the line stripped), timed in this process against passing the same
bytes through, so that no other load moves it.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwise.bench.harness import AT_LEAST, AT_MOST, Target, mark, percentile, progress
from fleetwise.bench.router.backend import MODEL, run_loop, stream_events
from fleetwise.bench.router.systems import SEED, System, measure_all
from fleetwise.net import free_port
from fleetwise.procs import fleetwise_argv

CASES = ("stream", "whole", "handoff", "retry", "migrate")
OWN_RUN = ("migrate",)  # not over the stand-in backends: run.py runs it on its own
TARGETS = {
    "p50_overhead_vs_vllm_router": Target(AT_MOST, 2.0, "p50 overhead / vllm-router's", "<= 2x"),
    "p99_overhead_vs_vllm_router": Target(AT_MOST, 2.0, "p99 overhead / vllm-router's", "<= 2x"),
    "max_rps_vs_vllm_router": Target(AT_LEAST, 0.5, "max req/s / vllm-router's", ">= 0.5x"),
}


@dataclass(frozen=True)
class Cases:
    """Which further cases run, and their load."""
    names: tuple[str, ...] = CASES
    rate: float = 500.0         # handoff and retry: requests/s offered
    stream_rate: float = 100.0  # stream and whole: requests/s offered
    seconds: float = 6.0        # each system, open loop
    tokens: int = 64            # stream and whole: tokens per request
    itl_ms: float = 1.0         # stream and whole: between tokens
    fail_every: int = 10        # retry: every k-th request at a backend gets 429


@dataclass
class Case:
    name: str
    rate: float
    stream: bool
    backends: list[tuple[str, list[str]]]  # (role, extra backend arguments) per backend
    tokens: int | None = None  # max_tokens asked (None: the bodies' own)
    per_token_too: bool = False  # also fleetwise's router over backends that send ids per token


def make_cases(rate: float, stream_rate: float, tokens: int, itl_ms: float, fail_every: int) -> dict[str, Case]:
    itl = ["--itl-ms", f"{itl_ms:g}"]
    return {
        "stream": Case("stream", stream_rate, True, [("mixed", itl), ("mixed", itl)], tokens),
        "whole": Case("whole", stream_rate, False, [("mixed", itl), ("mixed", itl)], tokens, per_token_too=True),
        "handoff": Case("handoff", rate, False, [("prefill", []), ("decode", [])]),
        "retry": Case("retry", rate, False, [("mixed", ["--fail-every", str(fail_every)])] * 2),
    }


def case_bodies(case: Case, bodies: list[bytes]) -> list[bytes]:
    if case.tokens is None:
        return bodies
    extra = {"stream": True} if case.stream else {}
    return [json.dumps({**json.loads(b), **extra, "max_tokens": case.tokens}, separators=(",", ":")).encode()
            for b in bodies]


def start_case(case: Case, servers, bodies: list[bytes], token: Path, vllm_cmd: list[str] | None,
               console: Console, baseline_python: str | None = None) -> list[System]:
    """The case's backends and systems, up and answering. `servers`: run.Servers;
    `baseline_python`: another install's Python whose router runs too (`fleetwise-baseline`)."""
    backends = list(case.backends)
    if case.per_token_too:
        backends += [(role, [*extra, "--ids-per-token"]) for role, extra in case.backends]
    urls = []
    for k, (role, extra) in enumerate(backends):
        port = free_port()
        servers.start(f"backend-{case.name}{k}", [sys.executable, "-m", "fleetwise.bench.router", "backend",
                                                   "--port", str(port), "--role", role, *extra],
                      f"http://127.0.0.1:{port}")
        urls.append(f"http://127.0.0.1:{port}")
    for k in range(len(urls)):
        servers.wait_ready(f"backend-{case.name}{k}", bodies[0])
    urls, per_token_urls = urls[:len(case.backends)], urls[len(case.backends):]
    roles = ("prefill", "decode") if case.name == "handoff" else ()
    cfg = router_config(servers.logdir / f"router-{case.name}.yaml", urls, roles)
    direct = [urls[1] + "/v1/completions"] if case.name == "handoff" else [u + "/v1/completions" for u in urls]
    systems = [System("direct", "direct to the backends" + (" (the decode one: one hop)" if case.name == "handoff"
                                                            else " (client round-robin)"), direct)]
    plan = [("fleetwise", fleetwise_argv("router", "--config", str(cfg), "--host", "127.0.0.1", "--port", "{port}",
                                         "--internal-token-file", str(token)))]
    if baseline_python:
        plan.append(("fleetwise-baseline", [baseline_python, *plan[0][1][1:]]))  # the same command, its Python
    if per_token_urls:
        per_token = router_config(servers.logdir / f"router-{case.name}-per-token.yaml", per_token_urls, roles)
        plan.append(("fleetwise-ids-per-token", fleetwise_argv(
            "router", "--config", str(per_token), "--host", "127.0.0.1", "--port", "{port}",
            "--internal-token-file", str(token))))
    if vllm_cmd:
        workers = (["--vllm-pd-disaggregation", "--prefill", urls[0], "--decode", urls[1]]
                   if case.name == "handoff" else ["--worker-urls", *urls])
        plan.append(("vllm-router", [*vllm_cmd, "--host", "127.0.0.1", "--port", "{port}", *workers,
                                     "--policy", "round_robin", "--prometheus-port", "{port2}",
                                     "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "60",
                                     "--log-level", "warning"]))
    for key, argv in plan:
        port, port2 = free_port(), free_port()
        argv = [a.replace("{port}", str(port)).replace("{port2}", str(port2)) for a in argv]
        name = f"{key}-{case.name}"
        p = servers.start(name, argv, f"http://127.0.0.1:{port}")
        systems.append(System(key, f"{key}, {case.name}", [f"{p.url}/v1/completions"], pid=p.pid, command=argv))
    for s in systems[1:]:
        s.startup_s = servers.wait_ready(f"{s.key}-{case.name}", bodies[0])
    return systems


def router_config(path: Path, urls: list[str], roles: tuple[str, ...] = ()) -> Path:
    """fleetwise's endpoints file over stand-in backends: each URL with its role in `roles`
    (none: every one mixed)."""
    by_role: dict[str, list[str]] = {}
    for role, url in zip(roles or ("mixed",) * len(urls), urls):
        by_role.setdefault(role, []).append(url)
    path.write_text("models:\n  - name: " + MODEL + "\n" + "".join(
        f"    {role}:\n" + "".join(f"      - {u}\n" for u in us) for role, us in by_role.items()))
    return path


def run_case(case: Case, systems: list[System], bodies: list[bytes], seconds: float, rounds: int,
             closed_rounds: int, closed_round_s: float, console: Console) -> dict:
    from fleetwise.bench.router.load import poisson_schedule, split_schedule
    schedule = poisson_schedule(case.rate, seconds, SEED)
    parts = split_schedule(schedule, seconds, rounds)
    with progress(console, percent=True, auto_refresh=False) as bar:
        run_loop(measure_all(systems, bodies, parts, closed_rounds, closed_round_s, bar, stream=case.stream))
    return case_report(case, systems, seconds)


def _round_overhead(system: System, direct: System, field: str, q: float) -> float | None:
    """Per round, the system's percentile of `field` minus direct's; the median over rounds (ms)."""
    pairs = [(getattr(a, field), getattr(b, field)) for a, b in zip(system.open_rounds, direct.open_rounds)]
    diffs = [percentile(a, q) - percentile(b, q) for a, b in pairs if a.size and b.size]
    return float(np.median(diffs) * 1e3) if diffs else None


def case_report(case: Case, systems: list[System], seconds: float) -> dict:
    direct = systems[0]
    out: dict = {"rate": case.rate, "seconds": seconds, "stream": case.stream,
                 "tokens_per_request": case.tokens,
                 "backends": [{"role": r, "args": a} for r, a in case.backends], "systems": {}}
    for s in systems:
        o, c = s.open, s.closed
        assert o is not None and c is not None
        d = {"label": s.label, "command": s.command, "open_loop": o.to_json(), "closed_loop": c.to_json()}
        if s is not direct:
            d["overhead_ms"] = {f"p{q}": _round_overhead(s, direct, "latencies_s", q) for q in (50, 99)}
            if case.stream:
                d["ttft_overhead_ms"] = {f"p{q}": _round_overhead(s, direct, "ttft_s", q) for q in (50, 99)}
                d["chunk_delay_overhead_ms"] = {f"p{q}": _round_overhead(s, direct, "chunk_delay_s", q)
                                                for q in (50, 99)}
        out["systems"][s.key] = d
    out["targets"] = evaluate(out["systems"])
    return out


def evaluate(systems: dict) -> dict:
    f, v = systems.get("fleetwise"), systems.get("vllm-router")
    if not f or not v:
        return {}
    checks: dict[str, bool | None] = {}
    for p in ("p50", "p99"):
        ours, theirs = f["overhead_ms"][p], v["overhead_ms"][p]
        checks[f"{p}_overhead_vs_vllm_router"] = None if ours is None or theirs is None else \
            TARGETS[f"{p}_overhead_vs_vllm_router"].met(ours, relative_to=max(theirs, 0.0))
    checks["max_rps_vs_vllm_router"] = TARGETS["max_rps_vs_vllm_router"].met(
        f["closed_loop"]["achieved_rps"], relative_to=v["closed_loop"]["achieved_rps"])
    return checks


def tracker_cost(tokens: int = 64, repeat: int = 300) -> dict:
    """CPU µs per relayed event: migration's Tracker.feed over a worker's stream (with its
    `fw:` lines) against the bytes passed through as they are; one event per chunk."""
    from fleetwise.router.tracker import Tracker
    events = [p % 0.0 for p in stream_events(tokens, True, True)]
    plain = [p % 0.0 for p in stream_events(tokens, False, True)]

    def timed(feed) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(repeat):
                feed()
            best = min(best, time.process_time() - t0)
        return 1e6 * best / (repeat * tokens)

    def tracked() -> None:
        t = Tracker(1 << 17)
        for e in events:
            t.feed(e)

    def passed() -> None:
        out = []
        for e in plain:
            out.append(e)
    ours, base = timed(tracked), timed(passed)
    return {"tokens": tokens, "tracker_us_per_event": ours, "pass_through_us_per_event": base,
            "migration_us_per_token": ours - base}


def print_case(console: Console, name: str, report: dict) -> None:
    tokens = report.get("tokens_per_request")
    t = Table(title=f"{name}: {report['rate']:g} req/s offered"
              + (f", {tokens} events per stream" if report["stream"] else
                 f", answers of {tokens} tokens" if tokens else ""))
    cols = ["system", "req/s done", "errors", "latency p50/p99 ms", "overhead p50/p99 ms"]
    if report["stream"]:
        cols += ["TTFT overhead p50/p99", "event delay p50/p99 ms", "µs CPU/token"]
    cols += ["µs CPU/req", "max req/s"]
    for c in cols:
        t.add_column(c, justify="left" if c == "system" else "right")
    for key, s in report["systems"].items():
        o, c = s["open_loop"], s["closed_loop"]
        lat, ov = o["latency_ms"] or {}, s.get("overhead_ms")

        def pair(d: dict | None, signed: bool = True) -> str:
            if not d or d.get("p50") is None or d.get("p99") is None:
                return "-"
            return f"{d['p50']:+.2f}/{d['p99']:+.2f}" if signed else f"{d['p50']:.2f}/{d['p99']:.2f}"
        row = [key, f"{o['achieved_rps']:.0f}", str(o["errors"] + c["errors"]), pair(lat, False), pair(ov)]
        if report["stream"]:
            cpu_tok = o.get("router_cpu_us_per_token")
            row += [pair(s.get("ttft_overhead_ms")), pair(o.get("chunk_delay_ms"), False),
                    "-" if cpu_tok is None else f"{cpu_tok:.1f}"]
        cpu = o.get("router_cpu_us_per_request")
        row += ["-" if cpu is None else f"{cpu:.0f}", f"{c['achieved_rps']:.0f}"]
        t.add_row(*row)
    console.print(t)
    held, per_token = (report["systems"].get(k, {}).get("open_loop", {}).get("router_cpu_us_per_request")
                       for k in ("fleetwise", "fleetwise-ids-per-token"))
    if held and per_token:
        console.print(f"  fleetwise's CPU per request: {held:.0f} µs with the ids held and merged, {per_token:.0f} µs "
                      f"with a line per token ({per_token / held:.1f}x)")
    if report["targets"]:
        console.print("  targets (fleetwise vs vllm-router): " + ", ".join(
            f"{TARGETS[k].label} {TARGETS[k].shown} {mark(v)}" for k, v in report["targets"].items()))


def plot_cases(cases: dict, path: Path) -> None:
    from fleetwise.bench.harness import figure, finish, label_bars
    fig, axes = figure(4, (24, 5))
    colors = {"fleetwise": "#dd8452", "vllm-router": "#4c72b0", "fleetwise-ids-per-token": "#c44e52"}
    ax = axes[0]
    names = list(cases)
    width = 0.2
    for j, (key, p) in enumerate([(k, p) for k in ("fleetwise", "vllm-router") for p in ("p50", "p99")]):
        vals = [(cases[n]["systems"].get(key, {}).get("overhead_ms") or {}).get(p) or 0.0 for n in names]
        bars = ax.bar(np.arange(len(names)) + (j - 1.5) * width, vals, width, label=f"{key} {p}",
                      color=colors[key], alpha=1.0 if p == "p50" else 0.55)
        label_bars(ax, bars, [f"{v:.2f}" for v in vals], fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("added latency vs direct, ms (median over rounds)")
    ax.set_title("overhead per case (end of answer)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1]
    s = cases.get("stream", {}).get("systems", {})
    for key in ("direct", "fleetwise", "vllm-router"):
        d = (s.get(key) or {}).get("open_loop", {}).get("chunk_delay_ms")
        if d:
            ax.bar(key, d["p50"], color=colors.get(key, "#555555"), alpha=1.0)
            ax.bar(key, d["p99"] - d["p50"], bottom=d["p50"], color=colors.get(key, "#555555"), alpha=0.4)
            ax.text(key, d["p99"], f"p50 {d['p50']:.2f}\np99 {d['p99']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("backend write to client arrival, ms")
    ax.set_title("stream: each event's delay (p50, p99)")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[2]
    labels, rates, cols = [], [], []
    for n in names:
        for key in ("fleetwise", "vllm-router"):
            c = cases[n]["systems"].get(key)
            if c:
                labels.append(f"{n}\n{key}")
                rates.append(c["closed_loop"]["achieved_rps"])
                cols.append(colors[key])
    bars = ax.bar(range(len(labels)), rates, color=cols)
    label_bars(ax, bars, [f"{v:.0f}" for v in rates])
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("completed requests/s, closed loop")
    ax.set_title("sustained rate per case")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[3]
    labels, cpus, cols = [], [], []
    for n in names:
        for key in ("fleetwise", "fleetwise-ids-per-token", "vllm-router"):
            cpu = (cases[n]["systems"].get(key) or {}).get("open_loop", {}).get("router_cpu_us_per_request")
            if cpu:
                labels.append(f"{n}\n" + {"fleetwise-ids-per-token": "ids per token"}.get(key, key))
                cpus.append(cpu)
                cols.append(colors[key])
    bars = ax.bar(range(len(labels)), cpus, color=cols)
    label_bars(ax, bars, [f"{v:.0f}" for v in cpus])
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
    ax.set_ylabel("router CPU µs per request, open loop")
    ax.set_title("router CPU per request (whole: ids held, or a line per token)")
    ax.grid(alpha=0.3, axis="y")
    finish(fig, path, "router cases: streams, whole answers, the prefill -> decode handoff, retries")
