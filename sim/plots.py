"""PNG plots of simulation results: one run (latency percentiles, power per domain against its
budget, pool use), an oversubscription study (p99 loss and time over budget by ratio, per
controller) and a scaling report (wall time and events per second by GPU count). matplotlib
comes with the dev extra; without it a plot is skipped with a message, never an error."""

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _draw(path: Path, ncols: int, draw: Callable[[Any], None], title: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot: matplotlib is not installed (pip install matplotlib) for {path}"
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    draw(axes[0])
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def result_plot(result: dict[str, Any], path: Path) -> str:
    """One run: a SimResult's JSON."""
    domains = result.get("power") or []

    def draw(axes: Any) -> None:
        ax = axes[0]
        names = [n for n in ("ttft_s", "tbt_s", "tbt_token_s", "e2e_s") if result.get(n)]
        for i, q in enumerate(("p50", "p90", "p99")):
            ax.bar([k + (i - 1) * 0.27 for k in range(len(names))], [result[n][q] for n in names], 0.27, label=q)
        labels = {"ttft_s": "TTFT", "tbt_s": "TBT\n(request)", "tbt_token_s": "TBT\n(token)", "e2e_s": "end to end"}
        ax.set_xticks(range(len(names)), [labels[n] for n in names])
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.legend()
        ax = axes[1]
        for d in domains[:12]:
            ts, ws = zip(*d["series"]) if d["series"] else ((), ())
            line = ax.plot(ts, [w / 1e3 for w in ws], lw=0.8, label=d["name"])[0]
            ax.axhline(d["budget_watts"] / 1e3, color=line.get_color(), ls="--", lw=0.6)
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel("kW (dashed: budget)")
        ax.set_title("power per domain" if domains else "no power domains in the loop")
        if domains:
            ax.legend(fontsize=6)
        ax = axes[2]
        pools = result.get("pools", {})
        ax.bar(list(pools), [p["prompt_busy"] for p in pools.values()], label="prompt passes")
        ax.bar(list(pools), [p["token_busy"] for p in pools.values()],
               bottom=[p["prompt_busy"] for p in pools.values()], label="decoding")
        ax.set_ylabel("fraction of time busy")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend()
    title = (f"{result['requests']:,} requests, {result['requests_per_s']:.0f}/s, "
             f"SLO attained {result['both_attained']:.1%}, {result['energy']['gpus']:,} GPUs")
    return _draw(path, 3, draw, title)


def study_plot(rows: list[Any], path: Path) -> str:
    """An oversubscription study's rows (StudyRow)."""
    def draw(axes: Any) -> None:
        for controller in sorted({r.controller for r in rows}):
            mine = sorted((r for r in rows if r.controller == controller), key=lambda r: r.ratio)
            x = [r.ratio for r in mine]
            axes[0].plot(x, [100 * max(r.ttft_p99_loss, r.tbt_p99_loss) for r in mine], marker="o", label=controller)
            axes[1].plot(x, [r.longest_over_budget_s for r in mine], marker="o", label=controller)
        axes[0].axhline(1.0, color="grey", ls="--", lw=0.7)
        axes[0].set_ylabel("high-priority p99 loss, % (worse of TTFT, TBT)")
        axes[1].set_ylabel("longest run over budget, s")
        for ax in axes:
            ax.set_xlabel("servers / servers the budget is sized for")
            ax.legend()
    return _draw(path, 2, draw, "oversubscription under each power controller")


def scaling_plot(points: list[Any], path: Path) -> str:
    """A scaling report's points (ScalePoint)."""
    def draw(axes: Any) -> None:
        gpus = [p.gpus for p in points]
        axes[0].loglog(gpus, [p.wall_s for p in points], marker="o", label="measured")
        axes[0].loglog(gpus, [points[0].wall_s * g / gpus[0] for g in gpus], ls="--", label="linear")
        axes[0].set_ylabel("event loop, wall seconds")
        axes[1].semilogx(gpus, [p.events_per_s for p in points], marker="o")
        axes[1].set_ylabel("events per second")
        for ax in axes:
            ax.set_xlabel("GPUs (same load per GPU)")
        axes[0].legend()
    return _draw(path, 2, draw, "simulator run time by fleet size")


def iso_plot(result: Any, path: Path) -> str:
    """An iso-power comparison (IsoResult): the highest rate per split and each trial's p99 TTFT slowdown."""
    def draw(axes: Any) -> None:
        splits = list(result.by_split)
        axes[0].plot(splits, list(result.by_split.values()), marker="o", label="Splitwise-AA")
        axes[0].axhline(result.baseline_rate, color="grey", ls="--", label="Baseline-A100 (colocated)")
        axes[0].set_xlabel(f"prompt machines of {result.machines}")
        axes[0].set_ylabel("highest rate meeting the objectives, req/s")
        axes[0].legend()
        for name, marker in (("Baseline", "s"), ("Splitwise", "o")):
            mine = [t for t in result.trials if t.fleet.startswith(name)]
            axes[1].scatter([t.rate for t in mine], [t.slowdown["ttft"][2] for t in mine], marker=marker,
                            c=["tab:green" if t.meets else "tab:red" for t in mine], label=name)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("requests/s")
        axes[1].set_ylabel("p99 TTFT slowdown (green: every objective met)")
        axes[1].legend()
    return _draw(path, 2, draw, f"phase splitting at iso-power: {result.ratio:.2f}x")


def faults_plot(c: Any, path: Path) -> str:
    """A fault comparison (FaultComparison): goodput with, without, healthy; detection time per fault."""
    def draw(axes: Any) -> None:
        axes[0].bar(["healthy", "faults,\ndetector on", "faults,\ndetector off"],
                    [c.goodput_healthy, c.goodput_with, c.goodput_without], color=["grey", "tab:green", "tab:red"])
        axes[0].set_ylabel("goodput, requests/s meeting both objectives")
        faults = c.with_detector.faults.faults
        axes[1].barh([f"{f.kind} {f.target}" for f in faults],
                     [f.detection_s if f.detection_s is not None else 0 for f in faults])
        axes[1].set_xlabel("seconds from injection to the incident (0: not detected)")
    return _draw(path, 2, draw, f"faults: {c.lost_with:.1%} of goodput lost with the detector, "
                                f"{c.lost_without:.1%} without; {c.healthy_incidents} false positives in "
                                f"{c.healthy_s:.0f} s healthy")
