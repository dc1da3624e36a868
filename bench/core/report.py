"""The core benchmark's report: its targets, the tables and notes it prints, and its plot
(tokens/s per system over the runs, where a core step's time goes, CDFs of TTFT and ITL)."""

import numpy as np
from rich.console import Console, JustifyMethod
from rich.table import Table

from fleetwise.bench.core.result import SystemResult
from fleetwise.bench.core.rounds import kind, median_run
from fleetwise.bench.harness import cdf, figure, finish, label_bars
from fleetwise.bench.targets import AT_LEAST, AT_MOST, Check, Target, checks_table

TARGETS = {
    "core_over_static": Target(AT_LEAST, 3.0, "core / best static tok/s (medians)", ">= 3.0x"),
    "core_over_continuous": Target(AT_LEAST, 1.5, "core / continuous tok/s (medians)", ">= 1.5x"),
    "outside_forward_share": Target(AT_MOST, 0.15, "core step time outside the forward pass (median)", "<= 15%"),
    "kv_waste": Target(AT_MOST, 0.04, "core KV slots wasted (median)", "<= 4%"),
}
FORMATS = {"outside_forward_share": "{:.1%}", "kv_waste": "{:.2%}"}

SHORT_LABELS = {"static": "static (generate)", "continuous": "continuous (transformers)",
                "core": "core (fleetwise)"}


def _median(systems: dict, name: str | None, measure: str = "output_tokens_per_s") -> float | None:
    s = systems.get(name or "", {})
    return s["over_runs"][measure]["median"] if "over_runs" in s else None


def evaluate(systems: dict, best_static: str | None) -> dict[str, Check]:
    """Each target against the medians over the runs; ratios of medians from the same run."""
    core = _median(systems, "core")
    return {
        "core_over_static": TARGETS["core_over_static"].ratio(core, _median(systems, best_static)),
        "core_over_continuous": TARGETS["core_over_continuous"].ratio(core, _median(systems, "continuous")),
        "outside_forward_share": TARGETS["outside_forward_share"].check(
            _median(systems, "core", "outside_forward_share")),
        "kv_waste": TARGETS["kv_waste"].check(_median(systems, "core", "kv_waste")),
    }


def ratios(systems: dict, best_static: str | None) -> dict:
    """core / baseline tok/s: of the medians, and the least of any core run over the best of
    any baseline run (what the ratio is at least, whatever the spread)."""
    out: dict = {}
    c = systems.get("core", {}).get("over_runs", {}).get("output_tokens_per_s")
    pairs = [("static", best_static), ("continuous", "continuous")]
    pairs += [(n, n) for n in systems if kind(n) == "static"]
    for key, name in pairs:
        b = systems.get(name or "", {}).get("over_runs", {}).get("output_tokens_per_s")
        out[f"core_over_{key}"] = None if not c or not b else {
            "median": c["median"] / b["median"], "worst": c["min"] / b["max"], "best": c["max"] / b["min"]}
    return out


def agreement(a: SystemResult, b: SystemResult) -> dict:
    """Greedy outputs of two systems: requests identical, and the mean share of equal tokens."""
    same, shares = 0, []
    for rid, x in a.outputs.items():
        y = b.outputs.get(rid, [])
        same += x == y
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        shares.append(k / max(1, len(x)))
    return {"identical_requests": same, "requests": len(a.outputs),
            "mean_matching_prefix_share": float(np.mean(shares)) if shares else 0.0}


def _fmt_lat(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['p50'] * 1e3:.0f} / {p['p90'] * 1e3:.0f} / {p['p99'] * 1e3:.0f}"


def _name(n: str) -> str:
    return SHORT_LABELS[kind(n)] + (f" batch {n.split('/')[1]}" if "/" in n else "")


def _spread(s: dict) -> str:
    o = s["over_runs"]["output_tokens_per_s"]
    return f"{o['min']:.0f}-{o['max']:.0f} ({o['spread'] * 100:.0f}%)"


def print_summary(console: Console, report: dict) -> None:
    systems = report["systems"]
    t = Table(title=f"fleetwise bench core: output tokens/s (useful tokens only), {report['config']['repeats']} "
                    "runs each in rotated order; latencies from the median run")
    columns: list[tuple[str, JustifyMethod]] = [
        ("system", "left"), ("tok/s median", "right"), ("min-max (spread)", "right"), ("wall s", "right"),
        ("generated", "right"), ("TTFT ms p50/p90/p99", "right"), ("ITL ms p50/p90/p99", "right")]
    for col, just in columns:
        t.add_column(col, justify=just)
    for name, s in systems.items():
        label = _name(name) + (" (best)" if name == report["static_best"] else "")
        if "skipped" in s:
            t.add_row(label, "-", "-", "-", "-", "-", f"skipped: {s['skipped']}"[:60])
            continue
        t.add_row(label, f"{s['over_runs']['output_tokens_per_s']['median']:.1f}", _spread(s),
                  f"{s['wall_s']:.1f}", f"{s['generated_tokens']}", _fmt_lat(s["ttft_s"]), _fmt_lat(s["itl_s"]))
    console.print(t)
    checks = {k: Check(TARGETS[k], v["measured"], v.get("ours"), v.get("baseline"), "ours" in v)
              for k, v in report["targets"].items()}
    console.print(checks_table(checks, FORMATS))


def print_notes(console: Console, report: dict) -> None:
    """What the tables leave out: where the core's step time goes, its KV, static's waste, the
    CPU use while timed (adding a warning to the report when other work competed), the
    greedy agreement."""
    systems = report["systems"]
    c = systems["core"]
    sh = c["phase_shares"]
    console.print(f"core (median run): {c['steps']} steps; step time: forward {sh['forward'] * 100:.1f}%, "
                  f"input preparation {sh['prepare'] * 100:.1f}%, sampling {sh['sample'] * 100:.1f}%, "
                  f"scheduling {sh['schedule'] * 100:.1f}%, output processing {sh['other'] * 100:.1f}%; "
                  f"bench loop outside step() {c['outside_step_share'] * 100:.1f}% of wall; KV waste "
                  f"{c['kv_waste'] * 100:.2f}% (peak {c['kv_slots_allocated_peak']} of "
                  f"{c['kv_num_blocks'] * c['block_size']} slots), {c['preemptions']} preemptions")
    full = report.get("core_kv_at_trace_lengths")
    if full:
        console.print(
            f"core KV waste at the trace's fitted lengths (x{full['length_scale']:g}, {full['requests']} requests: "
            f"prompt mean {full['prompt_tokens_mean']:.0f}, output mean {full['output_tokens_mean']:.0f} tokens; "
            f"one run, not a target's measure): {full['kv_waste'] * 100:.2f}% "
            f"(peak {full['kv_slots_allocated_peak']} slots), {full['preemptions']} preemptions")
    best = report["static_best"]
    if best:
        s = systems[best]
        console.print(f"static at its best batch size ({best.split('/')[1]}): {s['wasted_output_share'] * 100:.1f}% "
                      f"of generated tokens past a request's length; {s['padded_prompt_tokens']} padded prompt "
                      f"tokens for {s['prompt_tokens']}")
    busy = []
    for n, s in systems.items():
        pressures = [r.get("cpu_pressure_share") for r in s.get("runs", [])]
        worst = max((p for p in pressures if p is not None), default=None)
        if worst is not None:
            busy.append(f"{n} {worst * 100:.0f}%")
            if worst > 0.10:
                report.setdefault("warnings", []).append(f"{n}: tasks waited for a CPU {worst * 100:.0f}% of a run")
    if busy:
        console.print("CPU contention (share of the time some task waited for a CPU), worst run: " + "; ".join(busy))
    if report.get("warnings"):
        console.print("[yellow]warning: other work competed for the CPUs during the run; each system's spread "
                      "over its runs says how much it moved[/yellow]")
    for n, a in report["greedy_agreement_with_core"].items():
        console.print(f"greedy agreement core vs {n}: {a['identical_requests']}/{a['requests']} requests "
                      f"identical, mean matching prefix {a['mean_matching_prefix_share'] * 100:.1f}%")


COLORS = {"static": "#999999", "continuous": "#4c72b0", "core": "#dd8452"}
PHASE_COLORS = {"forward": "#4c72b0", "prepare": "#dd8452", "sample": "#55a868", "schedule": "#c44e52",
                "other": "#8172b2"}


def _throughput(ax, report: dict) -> None:
    systems = {n: s for n, s in report["systems"].items() if "over_runs" in s}
    names = list(systems)
    med = [systems[n]["over_runs"]["output_tokens_per_s"]["median"] for n in names]
    lo = [m - systems[n]["over_runs"]["output_tokens_per_s"]["min"] for n, m in zip(names, med)]
    hi = [systems[n]["over_runs"]["output_tokens_per_s"]["max"] - m for n, m in zip(names, med)]
    bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color=[COLORS[kind(n)] for n in names])
    core = systems.get("core", {}).get("over_runs", {}).get("output_tokens_per_s", {}).get("median")
    label_bars(ax, bars, [f"{m:.0f}" + (f"\n{core / m:.2f}x" if core and n != "core" and m else "")
                          for n, m in zip(names, med)], fontsize=7)
    ax.set_xticks(range(len(names)), [n.replace("static/", "static\nbatch ") for n in names], fontsize=7)
    ax.set_ylabel("useful output tokens/s (median, bars: min-max)")
    ax.set_title(f"throughput, {report['config']['repeats']} runs each; core / system above the bars")
    ax.margins(y=0.25)


def _phases(ax, report: dict) -> None:
    sh = report["systems"]["core"]["phase_shares"]
    left = 0.0
    for p in ("forward", "prepare", "sample", "schedule", "other"):
        ax.barh([0], [sh[p] * 100], left=[left], color=PHASE_COLORS[p], label=f"{p} {sh[p] * 100:.1f}%")
        left += sh[p] * 100
    ax.axvline((1 - TARGETS["outside_forward_share"].value) * 100, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of the core's step time (median run); dashed: the target's forward share")
    ax.set_title("where a core step's time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)


def plot(report: dict, runs: dict[str, list[SystemResult]], path) -> None:
    fig, axes = figure(4, (22, 4.8))
    _throughput(axes[0], report)
    _phases(axes[1], report)
    shown = [n for n in (report["static_best"], "continuous", "core") if n in runs]
    for ax, attr, title in ((axes[2], "ttft_s", "time to first token (offline: all sent at t0)"),
                            (axes[3], "itl_s", "inter-token latency")):
        for n in shown:
            cdf(ax, getattr(median_run(runs[n]), attr), label=n, color=COLORS[kind(n)])
        ax.set_xlabel("seconds")
        ax.set_ylabel("CDF (median run)")
        ax.set_title(title)
        if attr == "itl_s":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    w = report["workload"]
    finish(fig, path, f"{report['config']['model_name']}: {w['requests']} requests from the Azure conversation "
                      f"trace, lengths x{w['scale']:.3f}, {report['config']['device']}")
