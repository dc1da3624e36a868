"""What the fault detector sees, read from Prometheus: one window's load-normalised signal per
worker, its hard signals, and KV transfer seconds per byte per (sender, receiver) link, as
`controllers/faults.py`'s `Member` and `Transfer`.

The worker's signal is step seconds per token computed (`fleetwise_step_seconds_sum` over
`fleetwise_batch_tokens_sum`, both increases over the window): what a slow GPU changes, and
what a busy worker does not (it computes more tokens in its longer steps). Inter-token latency,
the router's 5xx and timeouts against the replica, and failed KV pulls go along as evidence.
Hard signals: a non-zero DCGM XID, an engine heartbeat older than `stall_seconds`.

Missing data is never healthy and never zero: a worker with no series, or fewer than
`min_tokens` tokens computed in the window, has value None (the detector scores it not at
all) and is listed in `missing`; a link with no bytes pulled is left out.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fleetwise.controllers.faults import Member, Transfer
from fleetwise.telemetry import catalog as c
from fleetwise.telemetry.prometheus import PrometheusClient, Sample

MIN_TOKENS = 64          # tokens in a window below which a worker's step time says little
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


def read_signals(prom: PrometheusClient, workers: list[Worker], window: float, unavailable: Collection[str] = (),
                 min_tokens: float = MIN_TOKENS, stall_seconds: float = STALL_SECONDS) -> Signals:
    """One window's signals for `workers`; `unavailable`: those already out of routing."""
    w = f"{max(1, round(window))}s"

    def per(query: str, label: str = "instance") -> dict[str, float]:
        return _by(prom.instant(query), label)

    steps = per(f"sum by (instance) (increase({c.STEP_SECONDS}_sum[{w}]))")
    tokens = per(f"sum by (instance) (increase({c.BATCH_TOKENS}_sum[{w}]))")
    counts = per(f"sum by (instance) (increase({c.STEP_SECONDS}_count[{w}]))")
    itl_sum = per(f"sum by (instance) (increase({c.INTER_TOKEN_LATENCY}_sum[{w}]))")
    itl_n = per(f"sum by (instance) (increase({c.INTER_TOKEN_LATENCY}_count[{w}]))")
    heartbeat = per(f"max by (instance) ({c.ENGINE_HEARTBEAT_AGE})")
    xid = per(f"max by (instance) ({c.DCGM_XID_ERRORS})")
    errors = per(f"sum by (url) (increase({c.ROUTER_REPLICA_SERVER_ERRORS}_total[{w}]))", "url")
    timeouts = per(f"sum by (url) (increase({c.ROUTER_REPLICA_TIMEOUTS}_total[{w}]))", "url")
    out = Signals([], [])
    for wk in workers:
        inst = _instance(wk.url)
        value = None
        if inst in steps and tokens.get(inst, 0.0) >= min_tokens:
            value = steps[inst] / tokens[inst]
        else:
            out.missing.append(wk.name)
        hard = None
        if xid.get(inst, 0.0) > 0:
            hard = f"XID error {xid[inst]:g}"
        elif heartbeat.get(inst, 0.0) > stall_seconds:
            hard = f"engine loop stalled for {heartbeat[inst]:.0f} s"
        readings = {"step_seconds_per_token": value, "tokens": tokens.get(inst), "steps": counts.get(inst),
                    "step_seconds": steps.get(inst),
                    "itl_seconds": itl_sum[inst] / itl_n[inst] if itl_n.get(inst) else None,
                    "router_5xx": errors.get(wk.internal_url), "router_timeouts": timeouts.get(wk.internal_url)}
        out.evidence[wk.name] = {k: v for k, v in readings.items() if v is not None}
        out.members.append(Member(wk.name, wk.group, wk.node, value, hard, wk.name in unavailable))
    out.transfers = _transfers(prom, workers, w, out.evidence)
    return out


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
