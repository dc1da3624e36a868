"""The goodput comparison's part of the fault benchmark's result (`goodput.py`): a table per
fault (goodput and error rate of each arm, goodput lost with and without the detector, their
ratio), its targets, and a PNG (goodput lost by fault and arm; goodput over time per fault
with the injection, the detector's incident and its action marked)."""

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fleetwise.bench import harness
from fleetwise.bench.targets import AT_MOST, Check, Target

LOST_RATIO = 0.5    # with the detector, at most half the goodput lost without it


def ratio_target() -> Target:
    return Target(AT_MOST, LOST_RATIO, "goodput lost with the detector / without it", f"<= {LOST_RATIO:g}")


def goodput_checks(comparison: dict[str, Any]) -> dict[str, Check]:
    """One check per fault: lost with / lost without (the ratio rule of bench/targets.py), left
    unmeasured where the arm without the detector lost too little to divide by."""
    t = ratio_target()
    out = {}
    for f in comparison["faults"]:
        without = f.get("lost_without")
        big = without is not None and without >= comparison["min_loss_for_ratio"]
        out[f"{f['fault']}.goodput_lost_ratio"] = t.ratio(f.get("lost_with"), without if big else None)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_goodput(console: Console, comparison: dict[str, Any], span_s: float) -> None:
    slo = comparison["slo"]
    table = Table(title=f"goodput within the SLO (TTFT <= {slo['ttft_s']['value']:g} s, TPOT <= "
                        f"{slo['tpot_s']['value'] * 1e3:.0f} ms) over the {span_s:g} s after injection; healthy "
                        f"{comparison['healthy_goodput_rps'] or 0:.2f} req/s")
    for col in ("fault", "target", "without: req/s", "errors", "lost", "with: req/s", "errors", "lost",
                "with / without", "incident s", "action s"):
        table.add_column(col)
    for f in comparison["faults"]:
        wo, w = f.get("without", {}), f.get("with", {})
        table.add_row(f["fault"], f["target"], f"{wo.get('goodput_rps', 0):.2f}", _pct(wo.get("error_rate")),
                      _pct(f.get("lost_without")), f"{w.get('goodput_rps', 0):.2f}", _pct(w.get("error_rate")),
                      _pct(f.get("lost_with")), "-" if f["lost_ratio"] is None else f"{f['lost_ratio']:.2f}",
                      _s(w.get("detected_s")), _s(w.get("acted_s")))
    console.print(table)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def plot_goodput(path: Path, comparison: dict[str, Any], title: str) -> None:
    faults = comparison["faults"]
    n = 1 + len(faults)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    a = flat[0]
    x = list(range(len(faults)))
    for off, arm, label in ((-0.2, "without", "without the detector"), (0.2, "with", "with it")):
        vals = [100 * (f.get(f"lost_{arm}") or 0.0) for f in faults]
        bars = a.bar([i + off for i in x], vals, 0.4, label=label)
        harness.label_bars(a, bars, [_pct(f.get(f"lost_{arm}")) for f in faults], fontsize=7)
    a.axhline(0, color="black", lw=0.6)
    a.set_xticks(x, [f["fault"] for f in faults], rotation=30, ha="right", fontsize=8)
    a.set_ylabel("goodput lost (% of healthy)")
    a.legend(fontsize=8)
    for ax, f in zip(flat[1:], faults):
        for arm in ("without", "with"):
            m = f.get(arm)
            if m:
                t = m["timeline"]
                ax.step([*t["start_s"], t["start_s"][-1] + t["width_s"]], [*t["goodput_rps"], t["goodput_rps"][-1]],
                        where="post", label=f"{arm} the detector")
        if comparison["baselines"]:   # the same requests with no fault: the load's own bursts
            t = comparison["baselines"][0]["timeline"]
            ax.step([*t["start_s"], t["start_s"][-1] + t["width_s"]], [*t["goodput_rps"], t["goodput_rps"][-1]],
                    where="post", color="grey", ls="--", lw=0.8, label="healthy")
        ax.axvline(0, color="red", lw=0.8, label="injection")
        w = f.get("with") or {}
        if w.get("detected_s") is not None:
            ax.axvline(w["detected_s"], color="orange", ls=":", lw=0.8, label="incident")
        if w.get("acted_s") is not None:
            ax.axvline(w["acted_s"], color="green", ls="--", lw=0.8, label="action")
        ax.set_title(f"{f['fault']} on {f['target']}", fontsize=9)
        ax.set_xlabel("seconds from injection")
        ax.set_ylabel("req/s within the SLO")
        ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.set_visible(False)
    harness.finish(fig, path, title)
