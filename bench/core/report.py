"""The core benchmark's report: its targets, the tables and notes it prints, and its plot
(tokens/s per system, CDFs of TTFT and ITL)."""

import numpy as np
import torch
from rich.console import Console, JustifyMethod
from rich.table import Table

from fleetwise.bench.core.result import SystemResult
from fleetwise.bench.harness import AT_LEAST, AT_MOST, Target, cdf, figure, finish, label_bars, targets_table

TARGETS = {
    "core_over_static": Target(AT_LEAST, 3.0, "core / static tok/s", ">= 3.0x"),
    "core_over_continuous": Target(AT_LEAST, 1.5, "core / continuous tok/s", ">= 1.5x"),
    "outside_forward_share": Target(AT_MOST, 0.15, "core step time outside forward", "<= 15%"),
    "kv_waste": Target(AT_MOST, 0.04, "core KV slots wasted", "<= 4%"),
}

SHORT_LABELS = {"static": "static (generate)", "continuous": "continuous (transformers)",
                "core": "core (fleetwise)"}
SYSTEMS = ("static", "continuous", "core")


def measured(report: dict, name: str) -> float | None:
    """A target's measure: a ratio, or a share the core measured."""
    if name.startswith("core_over"):
        return report["ratios"].get(name)
    return report["systems"].get("core", {}).get(name)


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


def print_summary(console: Console, report: dict) -> None:
    systems = report["systems"]
    t = Table(title="fleetwise bench core: output tokens/s (useful tokens only)", show_lines=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("system", "left"), ("wall s", "right"), ("useful tok", "right"), ("generated", "right"),
        ("tok/s", "right"), ("TTFT ms p50/p90/p99", "right"), ("ITL ms p50/p90/p99", "right")]
    for col, just in columns:
        t.add_column(col, justify=just)
    for name in SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        if "skipped" in s:
            t.add_row(SHORT_LABELS[name], "-", "-", "-", "-", "-", f"skipped: {s['skipped']}"[:60])
            continue
        t.add_row(SHORT_LABELS[name], f"{s['wall_s']:.1f}", f"{s['useful_output_tokens']}",
                  f"{s['generated_tokens']}", f"{s['output_tokens_per_s']:.1f}",
                  _fmt_lat(s["ttft_s"]), _fmt_lat(s["itl_s"]))
    console.print(t)
    rows = []
    for name, target in TARGETS.items():
        v = measured(report, name)
        shown = "-" if v is None else (f"{v:.2f}x" if name.startswith("core_over") else f"{v * 100:.1f}%")
        rows.append((target.label, shown, target.shown, report["targets"].get(name)))
    console.print(targets_table(rows))


def print_notes(console: Console, report: dict) -> None:
    """What the tables leave out: the core's steps and KV, static's waste, the CPU use while
    timed (adding a warning to the report when other work competed), the greedy agreement."""
    systems = report["systems"]
    c = systems["core"]
    console.print(f"core: {c['steps']} steps, step time outside forward {c['outside_forward_share'] * 100:.1f}%, "
                  f"bench loop outside step() {c['outside_step_share'] * 100:.1f}% of wall, KV waste "
                  f"{c['kv_waste'] * 100:.2f}% (peak {c['kv_slots_allocated_peak']} of "
                  f"{c['kv_num_blocks'] * c['block_size']} slots), {c['preemptions']} preemptions")
    if "static" in systems and "skipped" not in systems["static"]:
        s = systems["static"]
        console.print(f"static: {s['wasted_output_share'] * 100:.1f}% of generated tokens past a request's "
                      f"length; {s['padded_prompt_tokens']} padded prompt tokens for {s['prompt_tokens']}")
    busy = []
    threads = torch.get_num_threads()
    for n in SYSTEMS:
        s = systems.get(n, {})
        if "cpu_s" not in s:
            continue
        p = s.get("cpu_pressure_share")
        busy.append(f"{n} {s['cpu_utilisation'] * threads:.1f}/{threads} cores"
                    + ("" if p is None else f", CPU contention {p * 100:.0f}% of the time"))
        if p is not None and p > 0.10:
            report.setdefault("warnings", []).append(f"{n}: tasks waited for a CPU {p * 100:.0f}% of its run")
    if busy:
        console.print("CPU use while timed: " + "; ".join(busy))
    if report.get("warnings"):
        console.print("[yellow]warning: other work competed for the CPUs during the run (" +
                      "; ".join(report["warnings"]) + "); the timings and ratios are unreliable, "
                      "rerun on a quiet machine[/yellow]")
    for n, a in report["greedy_agreement_with_core"].items():
        console.print(f"greedy agreement core vs {n}: {a['identical_requests']}/{a['requests']} requests "
                      f"identical, mean matching prefix {a['mean_matching_prefix_share'] * 100:.1f}%")


COLORS = {"static": "#999999", "continuous": "#4c72b0", "core": "#dd8452"}


def plot(report: dict, results: dict[str, SystemResult], path) -> None:
    names = [n for n in SYSTEMS if n in results]
    fig, axes = figure(3, (16, 4.8))
    ax = axes[0]
    bars = ax.bar(names, [results[n].tokens_per_s for n in names], color=[COLORS[n] for n in names])
    core = results.get("core")
    labels = []
    for n in names:
        label = f"{results[n].tokens_per_s:.0f}"
        if core and n != "core" and results[n].tokens_per_s > 0:
            label += f"\ncore {core.tokens_per_s / results[n].tokens_per_s:.2f}x"
        labels.append(label)
    label_bars(ax, bars, labels, fontsize=9)
    ax.set_ylabel("useful output tokens/s")
    ax.set_title("throughput")
    ax.margins(y=0.25)
    for ax, attr, title in ((axes[1], "ttft_s", "time to first token (offline: all sent at t0)"),
                            (axes[2], "itl_s", "inter-token latency")):
        for n in names:
            cdf(ax, getattr(results[n], attr), label=n, color=COLORS[n])
        ax.set_xlabel("seconds")
        ax.set_ylabel("CDF")
        ax.set_title(title)
        if attr == "itl_s":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    w = report["workload"]
    finish(fig, path, f"{report['config']['model_name']}: {w['requests']} requests from the Azure conversation "
                      f"trace, lengths x{w['scale']:.3f}, {report['config']['device']}")
