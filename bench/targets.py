"""The benchmarks' targets and their one comparison rule, in one place.

A target bounds one measure: at most (`AT_MOST`) or at least (`AT_LEAST`) a value, the bound
included (1.0 ms against "<= 1 ms" is met). Where fleetwise is compared with a baseline the
measure is the ratio of the two, both measured in the same run: `ratio(ours, baseline)`
divides, so every benchmark forms its ratios the same way and a result shows the two values
it came from. A measure that could not be taken (None, or a baseline of zero) meets nothing
and fails nothing: `met` is None.

Every result states its targets as `{"op", "value", "measured", "met", ...}` (`Check.to_json`).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.table import Table

AT_MOST, AT_LEAST = "<=", ">="


@dataclass(frozen=True)
class Target:
    """A bound on one measure; `met` holds the rule of the module docstring."""
    bound: str        # AT_MOST or AT_LEAST
    value: float
    label: str = ""   # what is measured, for the table
    shown: str = ""   # the target as the table shows it, e.g. "<= 1 ms"

    def __post_init__(self) -> None:
        if self.bound not in (AT_MOST, AT_LEAST):
            raise ValueError(f"a target's bound is {AT_MOST!r} or {AT_LEAST!r}, not {self.bound!r}")

    def met(self, measured: float | None, relative_to: float = 1.0) -> bool | None:
        """`relative_to`: the target is `value` times that (a target set against a baseline)."""
        if measured is None:
            return None
        bound = self.value * relative_to
        return bool(measured <= bound if self.bound == AT_MOST else measured >= bound)

    def check(self, measured: float | None) -> "Check":
        """The target against a measure of its own."""
        return Check(self, measured)

    def ratio(self, ours: float | None, baseline: float | None) -> "Check":
        """The target against ours / baseline, both measured in the same run; a baseline that
        is missing (None) or zero leaves the ratio unmeasured."""
        return Check(self, None if ours is None or not baseline else ours / baseline, ours, baseline, True)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.bound, "value": self.value}


@dataclass(frozen=True)
class Check:
    """A target with what was measured: the value compared, and for a ratio the two it came from."""
    target: Target
    measured: float | None
    ours: float | None = None
    baseline: float | None = None
    is_ratio: bool = False

    @property
    def met(self) -> bool | None:
        return self.target.met(self.measured)

    def to_json(self) -> dict[str, Any]:
        out = {**self.target.to_json(), "measured": self.measured, "met": self.met, "label": self.target.label}
        if self.is_ratio:
            out |= {"ours": self.ours, "baseline": self.baseline}
        return out


def target_values(targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """The targets as a result states them: name -> {"op": "<=" or ">=", "value": ...}."""
    return {name: t.to_json() for name, t in targets.items()}


def checks_json(checks: dict[str, Check]) -> dict[str, dict[str, Any]]:
    return {name: c.to_json() for name, c in checks.items()}


def all_met(checks: dict[str, Check]) -> bool | None:
    """True when every target that could be checked is met; None when none could be."""
    known = [c.met for c in checks.values() if c.met is not None]
    return all(known) if known else None


def mark(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]yes[/green]" if ok else "[red]no[/red]")


def targets_table(rows: Iterable[tuple[str, str, str, bool | None]]) -> Table:
    """A table of (measure, measured, target, met) rows."""
    t = Table(title="targets")
    for col in ("measure", "measured", "target", "met"):
        t.add_column(col)
    for label, measured, shown, ok in rows:
        t.add_row(label, measured, shown, mark(ok))
    return t


def checks_table(checks: dict[str, Check], fmt: dict[str, str] | None = None) -> Table:
    """The checks as a targets table; `fmt` per name, a format for the measured value
    (default: "{:.2f}x" for a ratio, "{:.3g}" otherwise). A name "<case>.<target>" shows its case."""
    rows = []
    for name, c in checks.items():
        f = (fmt or {}).get(name) or ("{:.2f}x" if c.is_ratio else "{:.3g}")
        shown = "-" if c.measured is None else f.format(c.measured)
        if c.is_ratio and c.ours is not None and c.baseline is not None:
            shown += f" ({c.ours:.4g} / {c.baseline:.4g})"
        label = c.target.label or name
        if "." in name:  # "<case>.<target>": one target for each case of a benchmark
            label = f"{name.split('.', 1)[0]}: {label}"
        rows.append((label, shown, c.target.shown, c.met))
    return targets_table(rows)


# The SLO a request's goodput is counted against (`bench/goodput/load.py`'s `SLO`): time to the
# first token from the request's scheduled send, and the mean gap between output tokens after it.
# `fleetwise bench goodput --fleet cpu` defaults to it (the modelled fleet has its own, in
# `bench/goodput/run.py`'s FLEETS); `fleetwise bench faults` counts its goodput with it.
SLO_TTFT_S = 1.5
SLO_TPOT_S = 0.25
