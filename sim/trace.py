"""Requests for the simulator from a trace (the Azure LLM inference trace 2023's
`TIMESTAMP,ContextTokens,GeneratedTokens` rows): arrival times relative to the first row, the
rate scaled by a factor (the trace repeated when the run is longer than the scaled trace), or
arrivals re-sampled as a Poisson process at a target rate with the trace's prompt and output
lengths.

A request may carry its prompt as the router reads it (`text`, `router.policies.prompt_text`):
the prefix policies route by it, so a simulated run of requests with their text routes as the
real router did. The trace has no text; its requests route by load alone."""

import csv
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    arrival: float          # seconds from the start of the run
    prompt_tokens: int
    output_tokens: int      # tokens to generate, the first (from the prompt pass) included
    text: str = ""          # the prompt as the router reads it; "" when unknown (the trace's)


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds (the trace has 7 fractional digits)."""
    whole, _, frac = stamp.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float("0." + frac) if frac else 0.0)


def read_trace(path: str | Path) -> list[Request]:
    """The trace's requests in order, arrivals relative to the first row."""
    out: list[Request] = []
    start = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = _seconds(row["TIMESTAMP"])
            if start is None:
                start = t
            out.append(Request(len(out), t - start, max(1, int(row["ContextTokens"])),
                               max(1, int(row["GeneratedTokens"]))))
    out.sort(key=lambda r: r.arrival)
    return out


def scale_rate(requests: list[Request], k: float) -> list[Request]:
    """The same requests arriving k times as fast (k = 2: twice the rate, half the gaps)."""
    if k <= 0:
        raise ValueError("the rate factor must be positive")
    return [replace(r, arrival=r.arrival / k) for r in requests]


def poisson(requests: list[Request], rate: float, duration: float, seed: int = 0) -> list[Request]:
    """Arrivals of a Poisson process at `rate` per second over `duration` seconds, each with
    the lengths of a trace request drawn at random (with replacement)."""
    if rate <= 0 or not requests:
        raise ValueError("a Poisson trace needs a positive rate and some requests to draw lengths from")
    rng = random.Random(seed)
    out: list[Request] = []
    t = rng.expovariate(rate)
    while t < duration:
        r = requests[rng.randrange(len(requests))]
        out.append(Request(len(out), t, r.prompt_tokens, r.output_tokens))
        t += rng.expovariate(rate)
    return out


def repeat(requests: list[Request], duration: float) -> list[Request]:
    """The trace played again and again, back to back (one mean gap between the end of one
    pass and the start of the next), until `duration` seconds are covered."""
    if not requests or duration <= 0:
        return []
    span = requests[-1].arrival - requests[0].arrival
    period = span + span / max(1, len(requests) - 1)
    if period <= 0:
        return window(requests, duration)
    out: list[Request] = []
    offset = 0.0
    while offset < duration:
        for r in requests:
            t = offset + r.arrival - requests[0].arrival
            if t >= duration:
                break
            out.append(Request(len(out), t, r.prompt_tokens, r.output_tokens))
        offset += period
    return out


def window(requests: list[Request], duration: float) -> list[Request]:
    """The requests arriving within the first `duration` seconds."""
    return [r for r in requests if r.arrival < duration]
