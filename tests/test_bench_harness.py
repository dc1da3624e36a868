"""The benchmarks' shared harness: one percentile definition, one target rule (the bound is
met), results that survive a failing plot."""

import json

import pytest
from rich.console import Console

from fleetwise.bench.harness import (
    AT_LEAST,
    AT_MOST,
    Target,
    percentile,
    progress_bar,
    save_plot,
    summary,
    target_values,
    write_json,
)


def test_percentiles_interpolate_between_the_closest_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    s = summary([4, 1, None, 3, 2], "p50", "p999", "mean", "median", "min", "max", "total", "n")
    assert s == {"p50": 2.5, "p999": pytest.approx(3.997), "mean": 2.5, "median": 2.5, "min": 1, "max": 4,
                 "total": 10, "n": 4}
    assert isinstance(s["min"], int) and isinstance(s["total"], int)  # whole numbers stay whole
    assert summary([0.001, 0.002], "p50", "max", scale=1e3) == {"p50": pytest.approx(1.5), "max": pytest.approx(2.0)}
    assert summary([None], "p50") is None and summary([], "n") is None


@pytest.mark.parametrize("bound, value, measured, met", [
    (AT_MOST, 1.0, 1.0, True),      # the bound itself is met
    (AT_MOST, 1.0, 1.0001, False),
    (AT_MOST, 1.0, 0.5, True),
    (AT_LEAST, 0.95, 0.95, True),
    (AT_LEAST, 0.95, 0.9499, False),
    (AT_LEAST, 0.95, 2.0, True),
])
def test_a_target_is_met_at_its_bound(bound, value, measured, met):
    assert Target(bound, value).met(measured) is met


def test_a_missing_measure_neither_meets_nor_fails():
    assert Target(AT_MOST, 1.0).met(None) is None


def test_targets_relative_to_a_baseline():
    at_most_twice = Target(AT_MOST, 2.0)
    assert at_most_twice.met(4.0, relative_to=2.0) is True
    assert at_most_twice.met(4.01, relative_to=2.0) is False
    assert at_most_twice.met(0.0, relative_to=0.0) is True  # a baseline of nothing allows nothing more
    assert target_values({"x": at_most_twice, "y": Target(AT_LEAST, 0.5)}) == {
        "x": {"op": "<=", "value": 2.0}, "y": {"op": ">=", "value": 0.5}}


def test_every_benchmark_states_its_targets_with_the_one_rule():
    from fleetwise.bench import operator, power
    from fleetwise.bench.core import report as core
    from fleetwise.bench.pd import report as pd
    from fleetwise.bench.router import report as router
    from fleetwise.bench.targets import Target as the_one
    for module in (core, pd, router, operator, power):
        assert all(type(t) is the_one for t in module.TARGETS.values())
        assert module.TARGETS and all(t.bound in (AT_MOST, AT_LEAST) for t in module.TARGETS.values())
        assert all(t.shown.startswith(t.bound) for t in module.TARGETS.values())


def test_the_result_is_written_even_when_the_plot_fails(tmp_path):
    console = Console(file=open(tmp_path / "out.txt", "w"), width=200)  # noqa: SIM115 - the test reads it back
    path = write_json(tmp_path / "r.json", {"benchmark": "x", "value": 1})
    assert json.loads(path.read_text()) == {"benchmark": "x", "value": 1}

    def broken(p):
        raise ValueError("no axes")
    assert save_plot(broken, tmp_path / "r.png", console) is None
    console.file.close()
    assert "plot not written: ValueError: no axes" in (tmp_path / "out.txt").read_text()


def test_the_progress_bar_in_a_log_prints_a_line_a_tenth(tmp_path):
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115 - the test reads it back
    with progress_bar(console, "core", 20, "tokens") as advance:
        for _ in range(20):
            advance(1)
    console.file.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 10 and lines[0].startswith("core: 10% (2/20 tokens") and "100% (20/20 tokens" in lines[-1]
