"""`python -m fleetwise.bench.router segments`: every request of the measured window is
stamped at each point of its path, in order, and the summary is of those stamps."""

import pytest

from fleetwise.bench.router.segments import POINTS, run_segments, summarize


def test_the_summary_is_the_percentiles_of_each_segment_and_of_the_cpu_in_the_routers_own_stretches():
    rows = []
    for k in range(100):
        wall = dict(zip(POINTS, (0.0, 0.001, 0.002 + k * 1e-5, 0.003 + k * 1e-5, 0.010, 0.011, 0.013)))
        cpu = {"cpu_" + p: v / 2 for p, v in wall.items()}
        rows.append({**wall, **cpu})
    rows.append({"begin": 0.0, "parsed": 0.001})  # cut off (the load ended): left out
    r = summarize(rows)
    assert r["requests"] == 100
    assert r["segments"]["begin->parsed"]["p50"] == pytest.approx(1.0)
    assert r["segments"]["parsed->task"]["p99"] == pytest.approx(1.0 + 99 * 0.01 * 0.99, rel=1e-3)
    assert r["segments"]["resumed->written"]["p90"] == pytest.approx(2.0)
    assert r["segments"]["begin->written"]["p50"] == pytest.approx(13.0)
    assert r["cpu"]["resumed->written"]["p50"] == pytest.approx(1.0)
    assert r["cpu"]["task->sent"]["p50"] == pytest.approx(0.5)


def test_under_load_every_request_of_the_window_is_stamped_in_path_order():
    r = run_segments(rate=200, seconds=1.5)
    assert r["requests"] == 300  # the open loop's 1.5 s at 200/s, none of the warm-up's
    seg = r["segments"]
    for name, p in seg.items():
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"], name
    assert seg["begin->written"]["p50"] >= max(p["p50"] for n, p in seg.items() if n != "begin->written")
    # the router's CPU in a stretch cannot exceed the stretch's wall time (same stamps)
    assert r["cpu"]["task->sent"]["p50"] <= seg["task->sent"]["p50"] + 1e-3


@pytest.mark.parametrize("kwargs, says", [({"rate": 0}, "positive"), ({"seconds": -1}, "positive"),
                                          ({"policy": "nope"}, "unknown routing policy 'nope'")])
def test_bad_arguments_are_refused_before_anything_starts(kwargs, says):
    with pytest.raises(ValueError, match=says):
        run_segments(**kwargs)
