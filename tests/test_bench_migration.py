"""The router benchmark's migrate case, its reading of a phase: the streams the router says
moved are the ones with the longest waits, and a stream counts as exact only with all its
tokens and the undisturbed text."""

from fleetwise.bench.router.migration import _summary


def test_the_moved_streams_gaps_are_the_longest_waits_and_exactness_needs_text_and_count():
    phase = {"texts": ["a", "b", "c", "x"], "tokens_each": [4, 4, 3, 4], "waits": [0.02, 0.9, 0.03, 0.5],
             "intervals": [0.01, 0.02, 0.9, 0.03, 0.5], "moved": {"drain": 2.0}, "router_cpu_us_per_token": 50.0,
             "tokens": 15}
    s = _summary("drained", phase, ["a", "b", "c", "d"], 4)
    assert s["exact_streams"] == 2  # "c" is short of its tokens, "x" is not the undisturbed text
    assert s["gap_s"]["max"] == 0.9 and s["gap_s"]["p50"] == 0.7  # the two longest waits: 0.5 and 0.9
    assert s["migrations"] == {"drain": 2.0}
    assert _summary("undisturbed", {**phase, "moved": {}}, ["a", "b", "c", "x"], 4)["gap_s"] is None
