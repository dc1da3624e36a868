"""The core benchmark's rounds: every system runs once a round, in an order that turns from
round to round (harness.rotated), so that a slow spell of the machine does not fall on one
system only; then each system's runs are summed up as their median and spread.

The static baseline runs at every batch size of the sweep, each its own system
("static/8"); the one with the highest median throughput is the baseline the core is
compared with, as a user tuning its batch size would pick it.
"""

from collections.abc import Callable
from typing import Any

from fleetwise.bench.core.result import SystemResult
from fleetwise.bench.harness import over_runs

STATIC_BATCH_SIZES = (4, 8, 16, 32, 64)


def static_name(batch_size: int) -> str:
    return f"static/{batch_size}"


def kind(name: str) -> str:
    """"static/8" -> "static"."""
    return name.split("/", 1)[0]


def median_run(runs: list[SystemResult]) -> SystemResult:
    """The run whose throughput is the median (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    return ordered[(len(ordered) - 1) // 2]


def run_rounds(order: list[list[str]],
               run_one: Callable[[str, int], SystemResult | None]) -> dict[str, list[SystemResult]]:
    """`run_one(name, round)` for each name of each round's order; the runs by system (None:
    the system could not run, and has no entry unless an earlier run had)."""
    runs: dict[str, list[SystemResult]] = {}
    for r, names in enumerate(order):
        for name in names:
            res = run_one(name, r)
            if res is not None:
                runs.setdefault(name, []).append(res)
    return runs


def _compact(run: SystemResult) -> dict[str, Any]:
    """What a result keeps of every run besides the median one."""
    j = run.to_json()
    keep = ("wall_s", "output_tokens_per_s", "ttft_s", "itl_s", "cpu_pressure_share", "outside_forward_share",
            "phase_shares", "kv_waste")
    return {k: j[k] for k in keep if k in j}


def summarise(runs: dict[str, list[SystemResult]], order: list[list[str]]) -> dict[str, dict[str, Any]]:
    """Per system: the median run in full, every run in short, and the measures over the runs."""
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        s = median_run(rs).to_json()
        s["runs"] = [_compact(r) for r in rs]
        s["over_runs"] = {"output_tokens_per_s": over_runs(r.tokens_per_s for r in rs)}
        if kind(name) == "core":
            for m in ("outside_forward_share", "kv_waste"):
                s["over_runs"][m] = over_runs(r.extra[m] for r in rs)
        s["positions"] = [names.index(name) for names in order if name in names]
        out[name] = s
    return out


def best_static(systems: dict[str, dict[str, Any]]) -> str | None:
    """The static batch size with the highest median throughput."""
    static = [n for n, s in systems.items() if kind(n) == "static" and "over_runs" in s]
    return max(static, key=lambda n: systems[n]["over_runs"]["output_tokens_per_s"]["median"], default=None)
