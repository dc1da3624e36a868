"""The agreement's picture: the real fleet's and the simulator's TTFT, per-request TBT and
per-token gap distributions as CDFs, and the relative errors of their percentiles."""

from pathlib import Path
from typing import Any

from matplotlib.ticker import FormatStrFormatter, LogLocator

from fleetwise.bench.harness import cdf, figure, finish


def draw(report: dict[str, Any], real: dict[str, list[float]], sim: dict[str, list[float]], path: Path) -> None:
    """`real`, `sim`: TTFT and per-request TBT samples (`sim`: the result's, from the client's send)."""
    fig, axes = figure(4, (17, 4))
    panels = ((axes[0], "ttft", "time to first token"), (axes[1], "tbt", "time between tokens, per request"))
    for ax, key, title in panels:
        cdf(ax, real[key], label="fleetwise up", color="C0")
        cdf(ax, sim[key], label="simulator", color="C1", ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))   # 1, 2, 5 times powers of ten, plainly:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))   # the default minor labels overlap
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("seconds")
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    cdf(ax, real["gaps"], label="fleetwise up", color="C0")
    q = report["sim"]["tbt_token_s"]
    ax.plot([q["p50"], q["p90"], q["p99"]], [0.5, 0.9, 0.99], "o", color="C1", label="simulator p50/p90/p99")
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_title("every gap between two tokens")
    ax.legend()
    ax = axes[3]
    err = report["relative_error"]
    labels, values = [], []
    for key, name in (("ttft_s", "TTFT"), ("tbt_s", "TBT"), ("tbt_token_s", "gap")):
        for p in ("p50", "p90", "p99"):
            if p in err.get(key, {}):
                labels.append(f"{name}\n{p}")
                values.append(100 * err[key][p])
    labels.append("tokens/s")
    values.append(100 * err["output_tokens_per_s"])
    ax.bar(range(len(values)), values, color=["C2" if abs(v) <= 15 else "C3" for v in values])
    ax.axhspan(-15, 15, color="0.9", zorder=0)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("simulator / real - 1 (%)")
    ax.set_title("relative error (shaded: 15%)")
    finish(fig, path, f"{report['requests']} requests of the Azure conversation trace, {report['workers']} worker(s), "
                      f"profile {report['profile']['model']}: largest TTFT/TBT p50/p90 error "
                      f"{err['max_abs_ttft_tbt_p50_p90']:.1%}")
