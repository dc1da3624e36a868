"""What the fault detector sees, read from Prometheus: one window's load-normalised signal per
worker, its hard signals, and KV transfer seconds per byte per (sender, receiver) link, as
`controllers/faults.py`'s `Member` and `Transfer`.

The worker's signal is the device's busy seconds against the work done
(`fleetwise_step_device_seconds`: GPU time of the forward passes, or the engine thread's CPU
time on a CPU worker; increases over the window): what a slow GPU changes, and what a busy
host, which stretches wall time, does not. A group in which any member lacks the series (a
worker from before it) is scored on wall step seconds (`fleetwise_step_seconds`) instead, all
of it, so that peers are measured alike. The work is load-normalised: a step costs a fixed part
(weights read, kernels launched) and a part per token, so a worker with twice the load, which
runs bigger batches, spends less per token without being faster. Each group of at least three
is fitted, per window, to seconds per step = a + b x tokens per step (`fit_step_cost`: Theil-Sen,
robust to one odd member), and a member's value is its seconds against the fit's cost of its own
steps, as seconds per token at the group's median batch; with too few members, or no step counts,
the value is seconds per token. The limit: a single member whose batches differ from all its
peers' sets the fit's slope, so its slowness is taken for load for as long as its load alone
differs (in tests/test_fault_device_e2e.py the busier worker sits on the fit). Inter-token
latency, the router's 5xx and timeouts against the replica, and failed KV pulls go along as
evidence. Hard signals (on wall time and the
heartbeat, not the device): a non-zero DCGM XID, an engine heartbeat older than `stall_seconds`.

Missing data is never healthy and never zero: a worker with no series, or fewer than
`min_tokens` tokens computed in the window, has value None (the detector scores it not at
all) and is listed in `missing`; a link with no bytes pulled is left out.
"""

import math
import statistics
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fleetwise.controllers.faults import Member, Transfer
from fleetwise.telemetry import catalog as c
from fleetwise.telemetry.prometheus import PrometheusClient, Sample

MIN_TOKENS = 64          # tokens in a window below which a worker's step time says little
MIN_FIT = 3              # members of a group for a fitted step cost
MIN_BATCH_GAP = 0.25     # tokens per step two members differ by (relatively) for their pair to fit a slope
STALL_SECONDS = 10.0     # an engine heartbeat older than this is a stalled loop


@dataclass(frozen=True)
class Worker:
    """A worker as the fault loop knows it: its name, its peers' group, its node, and the
    addresses Prometheus and its peers know it by."""
    name: str
    group: str
    url: str                  # public: the scrape target (Prometheus' `instance`)
    internal_url: str = ""    # what the router and the decode workers call (the `url` and `peer` labels)
    node: str | None = None
    namespace: str = "local"  # a pod's namespace; "local" under `fleetwise up` (as `WorkerRef`)


@dataclass
class Signals:
    members: list[Member]
    transfers: list[Transfer]
    evidence: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> named readings
    missing: list[str] = field(default_factory=list)                       # workers with no usable signal


def _instance(url: str) -> str:
    return urlsplit(url).netloc


def _by(samples: list[Sample], label: str) -> dict[str, float]:
    return {s.labels.get(label, ""): s.value for s in samples if math.isfinite(s.value)}


def fit_step_cost(work: dict[str, tuple[float, float, float]]) -> tuple[float, float]:
    """(a, b) of seconds per step = a + b x tokens per step over `work` (name -> seconds, steps,
    tokens): Theil-Sen, the median slope of the pairs whose tokens per step differ by at least
    `MIN_BATCH_GAP`, then the median intercept; neither negative. Without such a pair (peers
    under alike load, where any fit ranks them alike) the cost is per token: a = 0."""
    pts = [(tokens / steps, seconds / steps) for seconds, steps, tokens in work.values() if steps > 0 and tokens > 0]
    slopes = [(y1 - y0) / (x1 - x0) for i, (x0, y0) in enumerate(pts) for x1, y1 in pts[i + 1:]
              if abs(x1 - x0) >= MIN_BATCH_GAP * max(x0, x1)]
    per_token = statistics.median(y / x for x, y in pts) if pts else 0.0
    if not slopes:
        return 0.0, per_token
    b = max(0.0, statistics.median(slopes))
    a = statistics.median(y - b * x for x, y in pts)
    return (a, b) if a >= 0 else (0.0, per_token)


def normalised(work: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """Each member's seconds against the fitted cost of its own steps (`fit_step_cost`, for
    `MIN_FIT` members or more with step counts), as seconds per token at the group's median
    tokens per step; else plain seconds per token."""
    if len(work) < MIN_FIT or any(steps <= 0 for _, steps, _ in work.values()):
        return {k: seconds / tokens for k, (seconds, _, tokens) in work.items()}
    a, b = fit_step_cost(work)
    x_ref = statistics.median(tokens / steps for _, steps, tokens in work.values())
    ref = (a + b * x_ref) / x_ref
    out = {}
    for k, (seconds, steps, tokens) in work.items():
        cost = steps * a + tokens * b  # the seconds the group's fit expects of this member's steps
        out[k] = seconds / cost * ref if cost > 0 else seconds / tokens
    return out


def read_signals(prom: PrometheusClient, workers: list[Worker], window: float, unavailable: Collection[str] = (),
                 min_tokens: float = MIN_TOKENS, stall_seconds: float = STALL_SECONDS) -> Signals:
    """One window's signals for `workers`; `unavailable`: those already out of routing."""
    w = f"{max(1, round(window))}s"

    def per(query: str, label: str = "instance") -> dict[str, float]:
        return _by(prom.instant(query), label)

    steps = per(f"sum by (instance) (increase({c.STEP_SECONDS}_sum[{w}]))")
    device = per(f"sum by (instance) (increase({c.STEP_DEVICE_SECONDS}_sum[{w}]))")
    tokens = per(f"sum by (instance) (increase({c.BATCH_TOKENS}_sum[{w}]))")
    counts = per(f"sum by (instance) (increase({c.STEP_SECONDS}_count[{w}]))")
    itl_sum = per(f"sum by (instance) (increase({c.INTER_TOKEN_LATENCY}_sum[{w}]))")
    itl_n = per(f"sum by (instance) (increase({c.INTER_TOKEN_LATENCY}_count[{w}]))")
    heartbeat = per(f"max by (instance) ({c.ENGINE_HEARTBEAT_AGE})")
    xid = per(f"max by (instance) ({c.DCGM_XID_ERRORS})")
    errors = per(f"sum by (url) (increase({c.ROUTER_REPLICA_SERVER_ERRORS}_total[{w}]))", "url")
    timeouts = per(f"sum by (url) (increase({c.ROUTER_REPLICA_TIMEOUTS}_total[{w}]))", "url")
    values = _values(workers, steps, device, tokens, counts, min_tokens)
    out = Signals([], [])
    for wk in workers:
        inst = _instance(wk.url)
        value = values.get(wk.name)
        if value is None:
            out.missing.append(wk.name)
        hard = None
        if xid.get(inst, 0.0) > 0:
            hard = f"XID error {xid[inst]:g}"
        elif heartbeat.get(inst, 0.0) > stall_seconds:
            hard = f"engine loop stalled for {heartbeat[inst]:.0f} s"
        n = tokens.get(inst)
        readings = {"value": value, "step_seconds_per_token": steps[inst] / n if n and inst in steps else None,
                    "device_seconds_per_token": device[inst] / n if n and inst in device else None,
                    "tokens": n, "steps": counts.get(inst), "step_seconds": steps.get(inst),
                    "device_seconds": device.get(inst),
                    "itl_seconds": itl_sum[inst] / itl_n[inst] if itl_n.get(inst) else None,
                    "router_5xx": errors.get(wk.internal_url), "router_timeouts": timeouts.get(wk.internal_url)}
        out.evidence[wk.name] = {k: v for k, v in readings.items() if v is not None}
        out.members.append(Member(wk.name, wk.group, wk.node, value, hard, wk.name in unavailable))
    out.transfers = _transfers(prom, workers, w, out.evidence)
    return out


def _values(workers: list[Worker], wall: dict[str, float], device: dict[str, float], tokens: dict[str, float],
            steps: dict[str, float], min_tokens: float) -> dict[str, float]:
    """Each group's load-normalised values (`normalised`): device seconds where every member with
    enough tokens has them, else wall step seconds; members with too few tokens have none."""
    groups: dict[str, dict[str, str]] = {}
    for wk in workers:
        inst = _instance(wk.url)
        if inst in wall and tokens.get(inst, 0.0) >= min_tokens:
            groups.setdefault(wk.group, {})[wk.name] = inst
    values: dict[str, float] = {}
    for members in groups.values():
        seconds = device if all(device.get(i, 0.0) > 0 for i in members.values()) else wall
        values.update(normalised({name: (seconds[i], steps.get(i, 0.0), tokens[i]) for name, i in members.items()}))
    return values


def _transfers(prom: PrometheusClient, workers: list[Worker], w: str,
               evidence: dict[str, dict[str, float]]) -> list[Transfer]:
    by_instance = {_instance(wk.url): wk.name for wk in workers}
    by_internal = {wk.internal_url.rstrip("/"): wk.name for wk in workers if wk.internal_url}
    key = "instance, peer"
    secs = {(s.labels.get("instance", ""), s.labels.get("peer", "")): s.value for s in prom.instant(
        f"sum by ({key}) (increase({c.KV_PEER_SECONDS}_total[{w}]))")}
    nbytes = {(s.labels.get("instance", ""), s.labels.get("peer", "")): s.value for s in prom.instant(
        f"sum by ({key}) (increase({c.KV_PEER_BYTES}_total[{w}]))")}
    failures = {(s.labels.get("instance", ""), s.labels.get("peer", "")): s.value for s in prom.instant(
        f"sum by ({key}) (increase({c.KV_PEER_FAILURES}_total[{w}]))")}
    out = []
    for (inst, peer), seconds in sorted(secs.items()):
        receiver, sender = by_instance.get(inst), by_internal.get(peer.rstrip("/"))
        if receiver is None or sender is None:
            continue
        if failures.get((inst, peer), 0.0) > 0:
            evidence.setdefault(receiver, {})[f"kv_failures_from_{sender}"] = failures[(inst, peer)]
        moved = nbytes.get((inst, peer), 0.0)
        if moved > 0:
            out.append(Transfer(sender, receiver, seconds / moved))
    return out
