"""The one target rule with ratios measured in the same run, repeated runs (rotated order,
median and spread), and how the core benchmark sums its runs up and judges them."""

import json

import pytest

from fleetwise.bench.core.report import evaluate, plot, print_notes, print_summary, ratios
from fleetwise.bench.core.result import SystemResult
from fleetwise.bench.core.rounds import best_static, median_run, run_rounds, summarise
from fleetwise.bench.harness import over_runs, rotated
from fleetwise.bench.targets import AT_LEAST, AT_MOST, Check, Target, all_met, checks_json


def test_a_ratio_is_ours_over_the_baseline_and_keeps_both():
    c = Target(AT_LEAST, 3.0, "core / static").ratio(30.0, 10.0)
    assert c.measured == 3.0 and c.met is True and c.is_ratio
    assert c.to_json() == {"op": ">=", "value": 3.0, "measured": 3.0, "met": True, "label": "core / static",
                           "ours": 30.0, "baseline": 10.0}
    assert Target(AT_LEAST, 3.0).ratio(29.9, 10.0).met is False


def test_a_ratio_without_a_baseline_is_neither_met_nor_failed():
    assert Target(AT_MOST, 1.0).ratio(5.0, 0.0).met is None  # nothing to compare with
    assert Target(AT_LEAST, 1.0).ratio(5.0, None).met is None  # the baseline could not run
    assert Target(AT_MOST, 1.0).ratio(None, 2.0).met is None
    assert Target(AT_MOST, 1.0).check(None).met is None


def test_a_target_needs_a_direction():
    with pytest.raises(ValueError, match="bound"):
        Target("<", 1.0)


def test_all_met_ignores_what_could_not_be_measured():
    t = Target(AT_MOST, 1.0)
    assert all_met({"a": t.check(1.0), "b": t.check(None)}) is True
    assert all_met({"a": t.check(1.0), "b": t.check(2.0)}) is False
    assert all_met({"b": t.check(None)}) is None
    assert json.dumps(checks_json({"a": t.check(0.5)}))  # a result can hold it


def test_rounds_turn_so_no_system_keeps_its_place():
    order = rotated(["static/4", "static/8", "continuous", "core"], 3)
    assert all(sorted(o) == sorted(order[0]) for o in order)
    for name in order[0]:
        assert len({o.index(name) for o in order}) == 3
    assert over_runs([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "spread": 1.0, "n": 3,
                                          "values": [3.0, 1.0, 2.0]}


def _result(name: str, tok_s: float, extra: dict | None = None) -> SystemResult:
    r = SystemResult(name, wall_s=100 / tok_s, useful_tokens=100, generated_tokens=100, ttft_s=[0.1, 0.2],
                     itl_s=[0.01, 0.02], outputs={"r0": [1, 2]})
    r.extra = extra or {}
    return r


def _core_extra(outside: float) -> dict:
    shares = {"schedule": 0.01, "prepare": outside - 0.03, "forward": 1 - outside, "sample": 0.01, "other": 0.01}
    return {"outside_forward_share": outside, "kv_waste": 0.01, "phase_shares": shares, "steps": 10,
            "outside_step_share": 0.0, "kv_slots_allocated_peak": 64, "kv_num_blocks": 8, "block_size": 16,
            "preemptions": 0}


def _static_extra(bs: int) -> dict:
    return {"batch_size": bs, "wasted_output_share": 0.2, "padded_prompt_tokens": 10, "prompt_tokens": 8}


def test_the_core_is_judged_against_the_best_static_batch_size_by_medians(tmp_path):
    rates = {"static/4": [10, 11, 9], "static/16": [20, 30, 25], "continuous": [40, 41, 39], "core": [80, 70, 75]}
    order = rotated(list(rates), 3)
    seen: list[str] = []

    def run_one(name: str, r: int) -> SystemResult:
        seen.append(name)
        n = sum(1 for s in seen if s == name) - 1
        extra = _core_extra(0.10 + n / 100) if name == "core" else _static_extra(4) if "static" in name else {}
        return _result(name.split("/")[0], rates[name][n], extra)

    runs = run_rounds(order, run_one)
    assert seen == [n for o in order for n in o]
    assert median_run(runs["core"]).tokens_per_s == pytest.approx(75)
    systems = summarise(runs, order)
    best = best_static(systems)
    assert best == "static/16"
    checks = evaluate(systems, best)
    assert checks["core_over_static"].measured == pytest.approx(75 / 25)
    assert checks["core_over_static"].met is True
    assert checks["core_over_continuous"].measured == pytest.approx(75 / 40) and checks["core_over_continuous"].met
    assert checks["outside_forward_share"].measured == pytest.approx(0.11) and checks["outside_forward_share"].met
    r = ratios(systems, best)
    assert r["core_over_static"]["worst"] == pytest.approx(70 / 30)  # least core run over the best static run
    assert systems["core"]["over_runs"]["output_tokens_per_s"]["spread"] == pytest.approx(10 / 75)

    report = {"systems": systems, "static_best": best, "config": {"repeats": 3, "model_name": "m", "device": "cpu"},
              "targets": checks_json(checks), "greedy_agreement_with_core": {},
              "workload": {"requests": 1, "scale": 0.1}}
    from rich.console import Console
    with open(tmp_path / "out.txt", "w") as f:
        console = Console(file=f, width=200)
        print_summary(console, report)
        print_notes(console, report)
    text = (tmp_path / "out.txt").read_text()
    assert "3.00x (75 / 25)" in text and "static (generate) batch 16 (best)" in text
    plot(report, runs, tmp_path / "core.png")
    assert (tmp_path / "core.png").stat().st_size > 10_000


def test_a_baseline_that_cannot_run_is_left_out_of_the_rounds():
    runs = run_rounds([["continuous", "core"], ["core", "continuous"]],
                      lambda name, r: None if name == "continuous" else _result("core", 10, _core_extra(0.1)))
    assert list(runs) == ["core"] and len(runs["core"]) == 2
    checks = evaluate(summarise(runs, [["core"]]), None)
    assert checks["core_over_continuous"].met is None and checks["core_over_static"].met is None


def test_a_check_reads_back_from_a_result():
    c = Target(AT_MOST, 0.15).check(0.2)
    back = Check(c.target, **{k: c.to_json().get(k) for k in ("measured", "ours", "baseline")})
    assert back.met is False and not back.is_ratio


def test_the_power_bench_judges_each_workload_by_the_same_rule():
    from fleetwise.bench.power import evaluate as power_checks
    capped = {"cap_applied_s": 1.0, "under_threshold_s": 6.0, "power_after_watts": 900.0, "threshold_watts": 1000.0}
    checks = power_checks({"prompt_heavy": {"capped": capped}, "token_heavy": {"capped": {
        **capped, "cap_applied_s": None, "under_threshold_s": 2.0, "power_after_watts": 1100.0}}})
    assert checks["prompt_heavy.cap_applied_s"].met is True
    assert checks["prompt_heavy.under_threshold_s"].met is False  # 6 s: more than 5 periods
    assert checks["prompt_heavy.power_after_over_threshold"].measured == pytest.approx(0.9)
    assert checks["token_heavy.cap_applied_s"].met is None  # never capped: not measured
    assert checks["token_heavy.power_after_over_threshold"].met is False


def test_the_targets_table_names_each_case_and_shows_what_a_ratio_came_from(tmp_path):
    from rich.console import Console

    from fleetwise.bench.targets import checks_table
    t = Target(AT_MOST, 1.0, "power / threshold", "<= 1.0x")
    with open(tmp_path / "t.txt", "w") as f:
        Console(file=f, width=200).print(checks_table({"token_heavy.p": t.ratio(380.0, 500.0)}))
    text = (tmp_path / "t.txt").read_text()
    assert "token_heavy: power / threshold" in text and "0.76x (380 / 500)" in text
