"""A request's way outside the engine in an agreement run (the client, the router, the worker's
HTTP side), from the step trace and what the client saw: its usual delays each way, and the
stretches when it stopped altogether.

The client and the router are not pinned: they share the two cores with the pinned workers and
whatever else runs there, and now and then none of them runs for most of a second. In one run
(i2) the client received no token for 0.87 s from 97.42 s on while both workers made 30 steps;
the two requests sent in that time reached their worker at its end, and a first token made in it
reached the client then. Three of a run's 73 requests are a third of the slowest tenth, so a
stop like this moves TTFT p90 by a fifth. The usual delays (the mean of the rest) are a few
milliseconds; `stops` finds the stretches (from either side: tokens made and not received, a
request sent and not taken in), and the simulated side holds a request sent, or a first token
made, within one until it ends.
"""

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetwise.sim import pace, trace

from .routes import request_index

STOP_S = 0.15  # a token made and not at the client for this long: the way out stopped (usually 2-5 ms)


@dataclass(frozen=True)
class HttpPath:
    """A request's way outside the engine, in CPU-equivalent seconds (each delay measured in the
    run over its worker's pace then): in, from the client's send to the engine taking it in
    (the client, the router, the worker's HTTP side; the wait for the engine's running step
    left out, as the simulator has it), and out, from the step that made the first token to the
    client."""
    in_s: float
    out_s: float
    requests: int      # measured
    stops: tuple[tuple[float, float], ...] = ()   # (from, to): nothing passed outside the engine

    def pace_at(self, paces: list[pace.Pace] | None, t: float) -> float:
        return sum(p.at(t) for p in paces) / len(paces) if paces else 1.0

    def held(self, t: float) -> float:
        """When something due to pass at `t` passes: the end of the stop it falls in, else `t`."""
        k = bisect.bisect_right(self.stops, (t, float("inf"))) - 1
        return self.stops[k][1] if k >= 0 and t < self.stops[k][1] else t

    def without_stops(self) -> "HttpPath":
        return HttpPath(self.in_s, self.out_s, self.requests)


def taken_in(requests: list[trace.Request], measured: list[Any], worker_steps: dict[str, list[dict[str, Any]]]
             ) -> Iterator[tuple[int, str, float, float]]:
    """(request index, worker, `ran`, `made`) for each request the step trace saw taken in: `ran`
    the start of the step running when the engine took it in (then, when the engine was idle),
    `made` the end of the step that made its first token; on the run's clock."""
    for name, steps in worker_steps.items():
        ends = [s["t"] + s["s"] for s in steps]
        for s in steps:
            for rid, came in s.get("first", []):
                i = request_index(rid)
                # taken in before the step that made its first token, on the run's clock
                if i is None or i >= len(measured) or not measured[i].token_times or not -1.0 <= came <= s["t"] + 1e-3:
                    continue
                j = bisect.bisect_right(ends, came + 0.002) - 1    # the step that ended as it came in
                ran = steps[j]["t"] if j >= 0 and came - ends[j] < 0.05 else came
                yield i, name, ran, s["t"] + s["s"]


def stops(requests: list[trace.Request], measured: list[Any], worker_steps: dict[str, list[dict[str, Any]]],
          min_s: float = STOP_S) -> tuple[tuple[float, float], ...]:
    """The stretches when the way outside the engine stopped, overlapping ones merged: out, a
    step made tokens (decodes, or first tokens) and the client received no token at all for
    over `min_s` after it ended (from that end to the next token received); in, a request
    reached the engine over `min_s` after it was sent (from the send to the engine's step)."""
    got = sorted(t for m in measured for t in m.token_times)
    spans = [(requests[i].arrival, ran) for i, _, ran, _ in taken_in(requests, measured, worker_steps)
             if ran - requests[i].arrival > min_s]
    for steps in worker_steps.values():
        for s in steps:
            if s["d"] > 0 or s.get("first"):
                end = s["t"] + s["s"]
                k = bisect.bisect_left(got, end)
                if k < len(got) and got[k] - end > min_s:
                    spans.append((end, got[k]))
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


def http_path(requests: list[trace.Request], measured: list[Any], worker_steps: dict[str, list[dict[str, Any]]],
              paces: dict[str, pace.Pace]) -> HttpPath | None:
    """From the steps' first tokens (`first`: request id agree-I, when the engine took it in).
    The way in is a lower bound: from the send to the start of the step that was running when
    the engine took the request in (all of it when the engine was idle). A request sent, or whose
    first token was made, within a stop counts in neither mean (the stop has it). None without
    data."""
    found = stops(requests, measured, worker_steps)
    path = HttpPath(0.0, 0.0, 0, found)
    ins, outs = [], []
    for i, name, ran, made in taken_in(requests, measured, worker_steps):
        arrival = requests[i].arrival
        if path.held(arrival) != arrival or path.held(made) != made:
            continue
        speed = paces[name].at(arrival)
        ins.append(max(0.0, ran - arrival) / speed)
        outs.append(max(0.0, measured[i].token_times[0] - made) / speed)
    if not ins:
        return None
    return HttpPath(float(np.mean(ins)), float(np.mean(outs)), len(ins), found)
