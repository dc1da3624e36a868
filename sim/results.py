"""What a simulation reports: latency percentiles (time to first token, time between tokens,
end to end), throughput, attainment of TTFT and TBT objectives, and energy and mean power by
step phase from fleetwise.gpus' model. Plain dataclasses that `asdict` turns into JSON.

Time between tokens is per request: (last token - first token) / (tokens - 1), so a request
whose decodes waited behind prompt passes shows the wait spread over its tokens. The worst gap
is per request too: the longest of its wait for the second token (the KV handoff, a full
batch), the prompt passes it waited behind (colocated) and its mean; steps that merely grow
with the batch are not tracked one by one, so it is a lower bound. `tbt_token_s` is the other
view: the distribution of every single gap (gaps.py), where a stall is one long gap for each
waiting sequence, not spread over a request's tokens.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .faults import Detection
from .gaps import GapHistogram
from .power import DomainReport
from .workers import Flight, Worker


@dataclass
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float


@dataclass
class Energy:
    prompt_j: float
    token_j: float
    idle_j: float
    total_j: float
    mean_watts: float
    gpus: int


@dataclass
class SimResult:
    requests: int
    duration_s: float                  # first arrival to last completion
    ttft_s: Percentiles
    tbt_s: Percentiles
    tbt_worst_s: Percentiles
    e2e_s: Percentiles
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    slo_ttft_s: float
    slo_tbt_s: float
    ttft_attained: float               # fractions of requests
    tbt_attained: float
    both_attained: float
    energy: Energy
    events: int
    wall_s: float
    events_per_s: float
    pools: dict[str, dict[str, float]] = field(default_factory=dict)
    by_priority: dict[str, dict[str, Percentiles]] = field(default_factory=dict)   # ttft_s, tbt_s per priority
    power: list[DomainReport] | None = None
    faults: Detection | None = None
    tbt_token_s: Percentiles | None = None   # every single gap between two tokens (gaps.py), not per request

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: list[float]) -> Percentiles:
    if not values:
        return Percentiles(math.nan, math.nan, math.nan, math.nan)
    xs = sorted(values)

    def at(q: float) -> float:
        # nearest rank
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]
    return Percentiles(at(0.5), at(0.9), at(0.99), sum(xs) / len(xs))


def tbt(f: Flight) -> float | None:
    if f.req.output_tokens <= 1:
        return None
    return (f.done - f.first_token) / (f.req.output_tokens - 1)


def energy(workers: list[Worker], span: float) -> Energy:
    prompt_j = sum(w.prompt_j for w in workers)
    token_j = sum(w.token_j for w in workers)
    idle_j = sum(max(0.0, span - w.prompt_s - w.token_s) * w.pool.gpu.idle_watts * w.gpus for w in workers)
    total = prompt_j + token_j + idle_j
    return Energy(prompt_j, token_j, idle_j, total, total / span if span > 0 else 0.0, sum(w.gpus for w in workers))


def pool_use(workers: list[Worker], span: float) -> dict[str, dict[str, float]]:
    """Per pool: workers, and the fraction of their time in prompt passes and in decodes."""
    out: dict[str, dict[str, float]] = {}
    for w in workers:
        p = out.setdefault(w.pool.name, {"workers": 0, "prompt_busy": 0.0, "token_busy": 0.0})
        p["workers"] += 1
        p["prompt_busy"] += w.prompt_s / span if span > 0 else 0.0
        p["token_busy"] += w.token_s / span if span > 0 else 0.0
    for p in out.values():
        p["prompt_busy"] /= p["workers"]
        p["token_busy"] /= p["workers"]
    return out


def summarise(flights: list[Flight], workers: list[Worker], slo_ttft: float, slo_tbt: float,
              events: int, wall: float) -> SimResult:
    start = min((f.dispatched for f in flights), default=0.0)
    span = max((f.done for f in flights), default=0.0) - start
    ttfts = [f.first_token - f.req.arrival for f in flights]
    tbts = {id(f): t for f in flights if (t := tbt(f)) is not None}
    ok_ttft = [t <= slo_ttft for t in ttfts]
    ok_tbt = [tbts.get(id(f), 0.0) <= slo_tbt for f in flights]
    n = max(1, len(flights))
    rate = (lambda x: x / span) if span > 0 else (lambda x: 0.0)
    return SimResult(
        requests=len(flights), duration_s=span,
        ttft_s=percentiles(ttfts), tbt_s=percentiles(list(tbts.values())),
        tbt_worst_s=percentiles([max(f.max_gap, tbts[id(f)]) for f in flights if id(f) in tbts]),
        e2e_s=percentiles([f.done - f.req.arrival for f in flights]),
        requests_per_s=rate(len(flights)),
        output_tokens_per_s=rate(sum(f.req.output_tokens for f in flights)),
        prompt_tokens_per_s=rate(sum(f.req.prompt_tokens for f in flights)),
        slo_ttft_s=slo_ttft, slo_tbt_s=slo_tbt,
        ttft_attained=sum(ok_ttft) / n, tbt_attained=sum(ok_tbt) / n,
        both_attained=sum(a and b for a, b in zip(ok_ttft, ok_tbt)) / n,
        energy=energy(workers, span), events=events, wall_s=wall,
        events_per_s=events / wall if wall > 0 else 0.0, pools=pool_use(workers, span),
        by_priority=by_priority(flights), tbt_token_s=token_gaps(workers))


def token_gaps(workers: list[Worker]) -> Percentiles:
    gaps = GapHistogram()
    for w in workers:
        gaps.merge(w.gaps)
    return Percentiles(gaps.quantile(0.5), gaps.quantile(0.9), gaps.quantile(0.99), gaps.mean())


def by_priority(flights: list[Flight]) -> dict[str, dict[str, Percentiles]]:
    out = {}
    for priority in sorted({f.priority for f in flights}):
        mine = [f for f in flights if f.priority == priority]
        out[priority] = {"ttft_s": percentiles([f.first_token - f.req.arrival for f in mine]),
                         "tbt_s": percentiles([t for f in mine if (t := tbt(f)) is not None])}
    return out
