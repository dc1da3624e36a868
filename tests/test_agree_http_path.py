"""The agreement's way outside the engine, from the step trace: in, from the client's send to the
start of the step running when the engine took the request in (all of it when the engine was
idle); out, from the step that made the first token to the client; each over the worker's pace."""

import pytest

from fleetwise.bench.agree.compare import http_path
from fleetwise.bench.agree.fleet import Measured
from fleetwise.sim import pace
from fleetwise.sim.trace import Request


def test_the_way_in_leaves_out_the_running_step_and_both_ways_are_over_the_pace():
    steps = [{"t": 1.0, "s": 0.5, "cpu": 0.25, "p": 0, "d": 1, "c": 5, "left": 1},
             # request 0 came at 1.2 during the step above and was taken in as it ended
             {"t": 1.5, "s": 0.5, "cpu": 0.25, "p": 10, "d": 1, "c": 6, "left": 1, "first": [["agree-0-ab", 1.5]]},
             # request 1 came at 3.0 to an idle engine and was taken in 0.2 s later
             {"t": 3.2, "s": 0.5, "cpu": 0.25, "p": 10, "d": 0, "c": 0, "left": 0, "first": [["agree-1-cd", 3.2]]},
             {"t": 9.0, "s": 0.1, "cpu": 0.05, "p": 1, "d": 0, "c": 0, "left": 0, "first": [["other", 9.0]]}]
    requests = [Request(0, 1.2, 10, 2), Request(1, 3.0, 10, 2)]
    measured = [Measured(1.2, 10, 2, [2.1, 2.2]), Measured(3.0, 10, 2, [3.8, 3.9])]
    p = pace.Pace(100.0, (2.0,), 2.0)
    got = http_path(requests, measured, {"mixed-0": steps}, {"mixed-0": p})
    assert got is not None and got.requests == 2
    assert got.in_s == pytest.approx((0.0 + 0.2) / 2 / 2.0)
    assert got.out_s == pytest.approx((0.1 + 0.1) / 2 / 2.0)
    assert http_path(requests, measured, {"mixed-0": steps[:1]}, {"mixed-0": p}) is None
