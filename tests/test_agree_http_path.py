"""The agreement's way outside the engine, from the step trace: in, from the client's send to the
start of the step running when the engine took the request in (all of it when the engine was
idle); out, from the step that made the first token to the client; each over the worker's pace."""

import pytest

from fleetwise.bench.agree.fleet import Measured
from fleetwise.bench.agree.outside import HttpPath, http_path, stops
from fleetwise.sim import pace
from fleetwise.sim.trace import Request


def test_the_way_in_leaves_out_the_running_step_and_both_ways_are_over_the_pace():
    steps = [{"t": 1.0, "s": 0.5, "cpu": 0.25, "p": 0, "d": 1, "c": 5, "left": 1},
             # request 0 came at 1.2 during the step above and was taken in as it ended
             {"t": 1.5, "s": 0.5, "cpu": 0.25, "p": 10, "d": 1, "c": 6, "left": 1, "first": [["agree-0-ab", 1.5]]},
             # request 1 came at 3.0 to an idle engine and was taken in 0.1 s later
             {"t": 3.1, "s": 0.5, "cpu": 0.25, "p": 10, "d": 0, "c": 0, "left": 0, "first": [["agree-1-cd", 3.1]]},
             {"t": 9.0, "s": 0.1, "cpu": 0.05, "p": 1, "d": 0, "c": 0, "left": 0, "first": [["other", 9.0]]}]
    requests = [Request(0, 1.2, 10, 2), Request(1, 3.0, 10, 2)]
    # the third: the sequence the first step decoded (its token at the client 20 ms after)
    measured = [Measured(1.2, 10, 2, [2.1, 2.2]), Measured(3.0, 10, 2, [3.7, 3.8]), Measured(0.0, 5, 2, [0.9, 1.52])]
    p = pace.Pace(100.0, (2.0,), 2.0)
    got = http_path(requests, measured, {"mixed-0": steps}, {"mixed-0": p})
    assert got is not None and got.requests == 2
    assert got.in_s == pytest.approx((0.0 + 0.1) / 2 / 2.0)
    assert got.out_s == pytest.approx((0.1 + 0.1) / 2 / 2.0)
    assert http_path(requests, measured, {"mixed-0": steps[:1]}, {"mixed-0": p}) is None


def test_a_stretch_when_no_token_reached_the_client_is_a_stop_and_holds_what_falls_in_it():
    # decode steps every 0.1 s from 10 s to 13 s; the client got each 5 ms later, except that
    # from 11.0 to 11.8 nothing came (then everything made meanwhile at once)
    steps = [{"t": 10 + k / 10, "s": 0.09, "cpu": 0.03, "p": 0, "d": 1, "c": 9, "left": 1} for k in range(30)]
    ends = [s["t"] + s["s"] for s in steps]
    got = [e + 0.005 if not 11.0 <= e + 0.005 < 11.8 else 11.8 for e in ends]
    measured = [Measured(9.0, 5, len(got), got)]
    found = stops([], measured, {"mixed-0": steps})
    assert len(found) == 1 and found[0][0] == pytest.approx(11.09) and found[0][1] == pytest.approx(11.8)
    path = HttpPath(0.01, 0.005, 1, found)
    assert path.held(11.3) == pytest.approx(11.8) and path.held(10.5) == 10.5 and path.held(12.0) == 12.0
    assert path.without_stops().held(11.3) == 11.3
    # a request sent and not taken in for 0.4 s: a stop on the way in
    late = [*steps, {"t": 12.5, "s": 0.09, "cpu": 0.03, "p": 5, "d": 1, "c": 9, "left": 1,
                     "first": [["agree-0-z", 12.5]]}]
    both = [Measured(12.1, 5, 2, [12.6, 12.7]), *measured]
    assert stops([Request(0, 12.1, 5, 2)], both, {"mixed-0": late})[1] == pytest.approx((12.1, 12.4))
    # a request sent within the stop counts in neither mean: it waited for the stop, not the way in
    steps.append({"t": 13.0, "s": 0.1, "cpu": 0.03, "p": 5, "d": 0, "c": 0, "left": 0, "first": [["agree-0-x", 11.85]]})
    steps.append({"t": 14.0, "s": 0.1, "cpu": 0.03, "p": 5, "d": 0, "c": 0, "left": 0, "first": [["agree-1-y", 14.0]]})
    requests = [Request(0, 11.2, 5, 2), Request(1, 13.98, 5, 2)]
    both = [Measured(11.2, 5, 2, [13.2, 13.3]), Measured(13.98, 5, 2, [14.11, 14.2]), measured[0]]
    p = pace.Pace(100.0, (1.0,), 1.0)
    way = http_path(requests, both, {"mixed-0": steps}, {"mixed-0": p})
    assert way is not None and way.requests == 1 and way.in_s == pytest.approx(0.02)


def test_first_token_times_saved_on_the_monotonic_clock_are_moved_onto_the_runs():
    from fleetwise.bench.agree.compare import on_run_clock
    t0 = 54600.0
    steps = {"mixed-0": [{"t": 1.0, "s": 0.1, "first": [["agree-0-a", t0 + 1.0]]},      # taken in by an idle engine
                         {"t": 2.0, "s": 0.1, "first": [["agree-1-b", t0 + 1.95]]}],     # came during a step
             "mixed-1": [{"t": 1.5, "s": 0.1}]}
    moved = on_run_clock(steps)
    assert [c for s in moved["mixed-0"] for _, c in s["first"]] == pytest.approx([1.0, 1.95])
    assert moved["mixed-1"] == steps["mixed-1"]
    assert on_run_clock(moved) == moved    # a run on its own clock stays as it is
