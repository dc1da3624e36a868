"""The fault benchmark's result: a table per fault (detection, action, serving again, the
simulator's figures), false positives per hour, targets (`bench/targets.py`), the JSON and a
PNG (detection times by fault; each worker's score window by window with the injections)."""

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fleetwise.bench import harness
from fleetwise.bench.faults.cases import CaseResult
from fleetwise.bench.faults.fleet import Window
from fleetwise.bench.faults.goodput_report import goodput_checks, plot_goodput, print_goodput
from fleetwise.bench.targets import AT_MOST, Target, all_met, checks_json, checks_table

HOUR = 3600.0


def targets(window: int, max_windows: int) -> dict[str, Target]:
    """A hard signal within a window and a half; a slowdown within three windows (the issue's
    bound for 1.3x); no false positive in a healthy run."""
    return {"hard_detection_s": Target(AT_MOST, 1.5 * window, "XID and stall: injection to incident",
                                       f"<= {1.5 * window:g} s"),
            "slow_detection_s": Target(AT_MOST, 3 * window, "each slowdown: injection to incident",
                                       f"<= {3 * window} s"),
            "false_positives_per_hour": Target(AT_MOST, 0.0, "false positives per hour", "<= 0")}


def _worst(results: list[CaseResult], kinds: tuple[str, ...], missed: float) -> float | None:
    """The slowest detection among the cases of `kinds`; a missed one counts as `missed`."""
    times = [missed if r.detected_s is None else r.detected_s for r in results if r.case.kind in kinds]
    return max(times) if times else None


def report(out: Path, name: str, run: dict, results: list[CaseResult], fp: list[dict], windows: list[Window],
           sim: dict, comparison: dict, console: Console) -> dict:
    window, max_windows = run["window_s"], run["max_windows"]
    hours = run["detector_seconds"] / HOUR
    fp_per_hour = len(fp) / hours if hours else None
    t = targets(window, max_windows)
    missed = float(max_windows * window + 5)
    checks = {"hard_detection_s": t["hard_detection_s"].check(_worst(results, ("xid", "stall"), missed)),
              "slow_detection_s": t["slow_detection_s"].check(_worst(results, ("slow",), missed)),
              "false_positives_per_hour": t["false_positives_per_hour"].check(fp_per_hour),
              **goodput_checks(comparison)}
    table = Table(title=f"faults: {run['mode']}, {run['workers_per_pool']} workers a pool, {window} s windows")
    for col in ("fault", "target", "incident s", "action s", "actions", "serving again s", "sim incident s",
                "sim action"):
        table.add_column(col)
    for r in results:
        if r.case.kind == "healthy":
            continue
        s = sim.get(r.case.name, {})
        table.add_row(_named(r), r.case.target, _s(r.detected_s), _s(r.acted_s),
                      ", ".join(f"{v} ({o.split(':')[0]})" for v, _, o in r.actions) or "-", _s(r.serving_s),
                      _s(s.get("detected_s")) if s else "-", str(s.get("action") or "-"))
    console.print(table)
    console.print(f"{run['windows']} windows over {run['detector_seconds']:.0f} s; {len(fp)} false positive "
                  f"episodes ({fp_per_hour if fp_per_hour is not None else float('nan'):.1f} per hour); load "
                  f"{run['load']}")
    print_goodput(console, comparison, run["arm_span_s"])
    console.print(checks_table(checks, {k: "{:.1f}" for k in t}))
    result: dict[str, Any] = {**harness.header(name), "run": run, "cases": [r.to_json() for r in results],
                              "false_positives": fp, "false_positives_per_hour": fp_per_hour, "simulator": sim,
                              "goodput": comparison,
                              "windows": [w.to_json() for w in windows], "targets": checks_json(checks),
                              "all_met": all_met(checks)}
    json_path = harness.write_json(out / f"{name}.json", result)
    png = harness.save_plot(lambda p: _plot(p, results, windows, sim, run), out / f"{name}.png", console)
    harness.wrote(console, json_path, png)
    png = harness.save_plot(lambda p: plot_goodput(p, comparison, f"fleetwise bench faults: goodput lost with the "
                                                   f"detector and without it ({run['mode']})"),
                            out / f"{name}-goodput.png", console)
    if png:
        console.print(f"wrote {png}")
    return result


def _named(r: CaseResult) -> str:
    return f"{r.case.name} ({r.arm})" if r.arm else r.case.name


def _s(x: float | None) -> str:
    return "missed" if x is None else f"{x:.1f}"


def _plot(path: Path, results: list[CaseResult], windows: list[Window], sim: dict, run: dict) -> None:
    fig, (a, b) = harness.figure(2, (13, 4.5))
    faults = [r for r in results if r.case.kind != "healthy"]
    x = range(len(faults))
    cap = run["max_windows"] * run["window_s"] + 5
    ours = [r.detected_s if r.detected_s is not None else cap for r in faults]
    theirs = [(sim.get(r.case.name) or {}).get("detected_s") for r in faults]
    bars = a.bar([i - 0.2 for i in x], ours, 0.4, label="local fleet")
    a.bar([i + 0.2 for i in x], [v if v is not None else 0 for v in theirs], 0.4, label="simulator")
    harness.label_bars(a, bars, ["missed" if r.detected_s is None else f"{r.detected_s:.0f}" for r in faults])
    a.set_xticks(list(x), [_named(r) for r in faults], rotation=30, ha="right", fontsize=8)
    a.set_ylabel("injection to incident (s)")
    a.legend(fontsize=8)
    if windows:
        t0 = windows[0].at
        for name in sorted({n for w in windows for n in w.scores}):
            b.plot([w.at - t0 for w in windows if name in w.scores],
                   [w.scores[name] for w in windows if name in w.scores], lw=0.8, label=name)
        for r in faults:
            b.axvline(r.injected - t0, color="grey", ls=":", lw=0.8)
            b.annotate(r.case.name, (r.injected - t0, 0), fontsize=6, rotation=90, va="bottom")
    b.set_xlabel("seconds")
    b.set_ylabel("score (robust SDs above the group)")
    b.set_yscale("symlog")
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize=6, ncol=2)
    harness.finish(fig, path, f"fleetwise bench faults ({run['mode']}, {run['window_s']} s windows)")
