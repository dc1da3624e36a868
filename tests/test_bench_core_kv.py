"""bench core's KV waste at the trace's own lengths: one real core run beside the comparison's
shorter requests, where a sequence's last, partly filled block weighs more."""

import pytest

from fleetwise.bench.core.engine import kv_at_lengths
from fleetwise.bench.core.workload import build_workload, resolve_trace
from fleetwise.bench.harness import make_console


@pytest.fixture(scope="module")
def trace():
    try:
        return resolve_trace(None)
    except SystemExit as e:
        pytest.skip(f"no Azure trace here: {e}")


def test_the_core_wastes_fewer_kv_slots_at_the_traces_lengths_than_at_a_tenth_of_them(tiny_model_dir, trace):
    console = make_console(120)
    short, full = (kv_at_lengths(tiny_model_dir, build_workload(trace, tiny_model_dir, 8, 0, scale), "cpu", console)
                   for scale in (0.1, 1.0))
    assert full["length_scale"] == 1.0 and short["length_scale"] == 0.1
    assert full["prompt_tokens_mean"] > 5 * short["prompt_tokens_mean"]
    for r in (short, full):
        assert 0 < r["kv_slots_used"] <= r["kv_slots_allocated"]
        assert r["kv_waste"] == pytest.approx(1 - r["kv_slots_used"] / r["kv_slots_allocated"])
    assert full["kv_waste"] < short["kv_waste"]
