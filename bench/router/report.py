"""The router benchmark's report: overheads against direct calls, the targets, the tables
and notes it prints, and its plot (latency CDFs, overhead per percentile, sustained rate)."""

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwise.bench.harness import (
    AT_LEAST,
    AT_MOST,
    Target,
    cdf,
    figure,
    finish,
    header,
    label_bars,
    mark,
    percentile,
    target_values,
)
from fleetwise.bench.router.backend import COMPLETION, MODEL
from fleetwise.bench.router.systems import (
    CLOSED_LOOP_CLIENTS,
    CLOSED_LOOP_WARMUP_S,
    SEED,
    TURN_WARMUP_S,
    WARMUP_S,
    System,
)

NUM_BACKENDS = 2
POLICIES = ("prefix_load", "round_robin", "least_outstanding")  # the first is the router's default
DEFAULT_POLICY = POLICIES[0]
# vllm-router runs twice: round robin, its lightest policy, which every fleetwise policy is
# held to; and cache_aware, its default, prefix-aware as fleetwise's default is (like for like)
VLLM_ROUTER_POLICY = "round_robin"
VLLM_ROUTER_DEFAULT = "cache_aware"
VLLM_ROUTERS = {"vllm-router": VLLM_ROUTER_POLICY, f"vllm-router/{VLLM_ROUTER_DEFAULT}": VLLM_ROUTER_DEFAULT}
# how the targets and ratios against each vllm-router system are named: p99_overhead_vs_vllm_router{suffix}
VS_SUFFIX = {"vllm-router": "", f"vllm-router/{VLLM_ROUTER_DEFAULT}": "_default"}
BASELINE = "fleetwise-baseline"  # `--baseline-python`: another install's router, its default policy
# the reference proxies (floor.py): what Python itself costs, and migration's per-token work on top
FLOOR, FLOOR_IDS = "python-floor", "python-floor+ids"

# per fleetwise policy; "vs vllm-router": at most 2x its overhead (at most 0 where its is 0 or
# less), against each of its policies run; "sustains": completed/s at least 95% of the offered
# rate, and no errors
TARGETS = {
    "p50_overhead_ms": Target(AT_MOST, 1.0, "p50 overhead", "<= 1 ms"),
    "p99_overhead_ms": Target(AT_MOST, 5.0, "p99 overhead", "<= 5 ms"),
    "p50_overhead_vs_vllm_router": Target(AT_MOST, 2.0, f"p50 overhead / vllm-router {VLLM_ROUTER_POLICY}'s", "<= 2x"),
    "p99_overhead_vs_vllm_router": Target(AT_MOST, 2.0, f"p99 overhead / vllm-router {VLLM_ROUTER_POLICY}'s", "<= 2x"),
    "p50_overhead_vs_vllm_router_default": Target(AT_MOST, 2.0, f"p50 overhead / vllm-router {VLLM_ROUTER_DEFAULT}'s",
                                                  "<= 2x"),
    "p99_overhead_vs_vllm_router_default": Target(AT_MOST, 2.0, f"p99 overhead / vllm-router {VLLM_ROUTER_DEFAULT}'s",
                                                  "<= 2x"),
    "sustains_offered_rate": Target(AT_LEAST, 0.95, "takes the offered rate, no errors", ">= 95% of offered"),
}


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
    out: dict[str, float | int] = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        out[name] = float(np.median([percentile(a, q) - percentile(b, q) for a, b in pairs]) * 1e3)
    out["mean"] = float(np.median([a.mean() - b.mean() for a, b in pairs]) * 1e3)
    out["rounds"] = len(pairs)
    return out


# the vllm-router system each "vs" target compares with
VS = {f"{p}_overhead_vs_vllm_router{suffix}": key for key, suffix in VS_SUFFIX.items() for p in ("p50", "p99")}


def evaluate(systems: dict) -> dict:
    """Per fleetwise policy: each target met (True/False), or None where it cannot be told."""
    out = {}
    for policy in POLICIES:
        s = systems.get(f"fleetwise/{policy}")
        if not s or "skipped" in s:
            continue
        ov = s.get("overhead_ms")
        checks: dict[str, bool | None] = {}
        for p in ("p50", "p99"):
            checks[f"{p}_overhead_ms"] = None if ov is None else TARGETS[f"{p}_overhead_ms"].met(ov[p])
        for k, key in VS.items():
            p, vllm = k[:3], systems.get(key, {}).get("overhead_ms")
            # where vllm-router adds nothing measurable (<= 0), within 2x of it means the same of fleetwise
            checks[k] = None if ov is None or vllm is None else TARGETS[k].met(ov[p], relative_to=max(vllm[p], 0.0))
        o = s["open_loop"]
        checks["sustains_offered_rate"] = bool(
            o["errors"] == 0 and TARGETS["sustains_offered_rate"].met(o["achieved_rps"], relative_to=o["offered_rps"]))
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


def print_summary(console: Console, report: dict) -> None:
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

    def shown(policy: str, name: str) -> str:
        s = systems[f"fleetwise/{policy}"]
        ov = s.get("overhead_ms")
        if name == "sustains_offered_rate":
            o = s["open_loop"]
            v = f"{o['achieved_rps']:.0f} req/s, {o['errors']} err"
        elif name.endswith("_ms"):
            v = "-" if ov is None else f"{ov[name[:3]]:+.2f} ms"
        else:
            p, vllm = name[:3], systems.get(VS[name], {}).get("overhead_ms")
            v = "-" if (ov is None or vllm is None) else f"{ov[p]:+.2f} vs {vllm[p]:+.2f} ms"
        return f"{v}  {mark(checks[policy].get(name))}"

    for name, target in TARGETS.items():
        c.add_row(target.label, target.shown, *(shown(p, name) for p in checks))
    console.print(c)


def print_notes(console: Console, report: dict) -> None:
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
    _floor_note(console, systems)
    for key in VLLM_ROUTERS:
        v = systems.get(key, {})
        if v.get("command"):
            console.print(f"{key}: " + " ".join(v["command"]))


def _floor_note(console: Console, systems: dict) -> None:
    """Where fleetwise's CPU per request goes: the bare proxy, migration's per-token work on
    top of it, and the router's own work beyond both."""
    def cpu(key: str) -> float | None:
        return (systems.get(key, {}).get("open_loop") or {}).get("router_cpu_us_per_request")
    bare, ids, ours = cpu(FLOOR), cpu(FLOOR_IDS), cpu(f"fleetwise/{DEFAULT_POLICY}")
    if bare is None or ids is None or ours is None:
        return
    console.print(f"CPU µs per request: {FLOOR} {bare:.0f}; migration's per-token work adds {ids - bare:.0f} "
                  f"({FLOOR_IDS} {ids:.0f}); fleetwise/{DEFAULT_POLICY} spends {ours - ids:.0f} more on routing, "
                  f"retries, limits, metrics and its tasks ({ours:.0f})")


COLORS = {"direct": "#555555", "fleetwise/prefix_load": "#dd8452",
          "fleetwise/round_robin": "#c44e52", "fleetwise/least_outstanding": "#8172b3", "vllm-router": "#4c72b0",
          f"vllm-router/{VLLM_ROUTER_DEFAULT}": "#2f3e73", BASELINE: "#937860", FLOOR: "#8c8c8c", FLOOR_IDS: "#64b5cd"}


def plot(report: dict, runs: dict[str, System], path: Path) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    systems = report["systems"]
    opened = {k: s.open for k, s in runs.items() if s.open is not None}
    measured = list(opened)
    fig, axes = figure(3, (18, 5))

    ax = axes[0]
    for k, run in opened.items():
        cdf(ax, run.latencies_s * 1e3, label=k, color=COLORS.get(k))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.2, 0.5, 1, 2, 5 ms: labels that fit
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
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
        label_bars(ax, bars, [f"{v:.2f}" for v in vals], fontsize=7)
    ax.plot([-0.45, 0.45], [1.0, 1.0], color="green", lw=1, ls=":", label="targets (p50 1 ms, p99 5 ms)")
    ax.plot([1.55, 2.45], [5.0, 5.0], color="green", lw=1, ls=":")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, ps)
    ax.set_ylabel("added latency vs direct, ms")
    ax.set_title("router overhead vs direct (open loop; median over rounds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)

    ax = axes[2]
    closed = {k: runs[k].closed for k in measured}
    names = [k for k, run in closed.items() if run is not None]
    rates = [run.achieved_rps for run in closed.values() if run is not None]
    bars = ax.bar(range(len(names)), rates, color=[COLORS.get(k, "#999999") for k in names])
    label_bars(ax, bars, [f"{v:.0f}" for v in rates])
    ax.set_xticks(range(len(names)), [n.replace("/", "\n").replace("python-floor", "python\nfloor")
                                      .replace("least_outstanding", "least_\noutstanding") for n in names], fontsize=7)
    ax.set_ylabel("completed requests/s")
    ax.set_title(f"sustained rate, {report['config']['closed_loop_clients']} clients closed loop")
    ax.margins(y=0.15)
    ax.grid(alpha=0.3, axis="y")

    env = report["environment"]
    finish(fig, path, f"{NUM_BACKENDS} stand-in backends; {env['cpu_count']} CPUs ({env['cpu_model']}); "
                      "servers and load generator share them")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def build_report(runs: dict[str, System], skipped: dict[str, System], rate: int, seconds: float,
                 parts: list[tuple[np.ndarray, float]], closed_rounds: int, closed_round_s: float,
                 bodies: list[bytes], env: dict,
                 machine: dict) -> dict:
    systems: dict[str, dict] = {}
    order = ["direct", *(f"fleetwise/{p}" for p in POLICIES), BASELINE, FLOOR, FLOOR_IDS, *VLLM_ROUTERS]
    for key in order:
        if key in skipped:
            systems[key] = {"label": skipped[key].label, "skipped": skipped[key].skipped}
        elif key in runs:
            system = runs[key]
            open_run, closed_run = system.open, system.closed
            assert open_run is not None and closed_run is not None  # measure_all runs every system every round
            systems[key] = {"label": system.label, "command": system.command, "startup_s": system.startup_s,
                            "open_loop": open_run.to_json(), "closed_loop": closed_run.to_json(),
                            "rounds": system.rounds_json()}
    direct = systems["direct"]
    for key, s in systems.items():
        if key != "direct" and "skipped" not in s:
            s["overhead_ms"] = round_overheads(runs[key], runs["direct"])
            s["overhead_pooled_ms"] = overheads(s, direct)
            s["closed_loop_overhead_ms"] = overheads(s, direct, "closed_loop")
            s["max_rps_vs_direct"] = _ratio(s["closed_loop"]["achieved_rps"], direct["closed_loop"]["achieved_rps"])
    for vkey, suffix in VS_SUFFIX.items():
        vllm_rps = systems.get(vkey, {}).get("closed_loop", {}).get("achieved_rps")
        if vllm_rps is None:
            continue
        for key, s in systems.items():
            if key.startswith("fleetwise") and "closed_loop" in s:
                s[f"max_rps_vs_vllm_router{suffix}"] = _ratio(s["closed_loop"]["achieved_rps"], vllm_rps)
    return {
        **header("router"),
        "config": {
            "rate": rate, "seconds": seconds, "arrivals": "Poisson, open loop, seeded; the same for every system",
            "seed": SEED, "requests_per_system": int(sum(len(p) for p, _ in parts)), "open_loop_rounds": len(parts),
            "warmup_s": WARMUP_S, "turn_warmup_s": TURN_WARMUP_S, "closed_loop_clients": CLOSED_LOOP_CLIENTS,
            "closed_loop_rounds": closed_rounds,
            "closed_loop_round_s": closed_round_s, "closed_loop_seconds": closed_rounds * closed_round_s,
            "closed_loop_warmup_s_per_round": CLOSED_LOOP_WARMUP_S, "backends": NUM_BACKENDS, "model": MODEL,
            "request_bytes_mean": float(np.mean([len(b) for b in bodies])), "response_bytes": len(COMPLETION),
            "default_policy": DEFAULT_POLICY, "vllm_router_policies": VLLM_ROUTERS,
            "latency": "send to the last byte of the answer, in the load generator (aiohttp, one process)",
            "overhead": "a router's latency percentile minus the direct run's same percentile",
            "order": "rounds: every system runs the same slice of the schedule, the order turning each round",
        },
        "environment": env,
        "machine_during_measurement": machine,
        "systems": systems,
        "targets": evaluate(systems),
        "target_values": target_values(TARGETS),
    }
