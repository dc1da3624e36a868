"""Goodput lost to a fault with the detector acting against without it (C4's point: error-induced
downtime cut from about 31% to about 1%), on the same injected fault under the same load.

An arm is one segment of the run: the same requests (`segment_requests`) sent through the
router from its start, the fault injected `pre_s` after it (the loop's windows already see the
load), and the requests scheduled in the `span_s` after the injection counted: goodput is
those that met the SLO (`bench/targets.py`'s, checked by `bench/goodput/load.py`'s `SLO`) per
second of the span, the error rate those that got no answer. For each fault the arm
`without` the detector (the FaultPolicy allows no actions: incidents are still decided,
nothing is done) goes first, then the arm `with` it (the loop acts within its policy); a
healthy arm without a fault is the baseline, one before the faults and one after them, and
goodput lost = (healthy - faulted) / healthy, for each arm. The fault is held on for the whole
span in both arms; an action ends it where it would end it on a GPU: a quarantined worker gets
no new requests, a restarted one comes back with its switches off. What the router does of its
own (its /health probes take a worker whose engine stalls past `HEALTH_STALL_SECONDS` out, it
sends a request that never reached a replica elsewhere) works in both arms alike.

Each fault's arms start from a fresh detector (no windows out, episodes or cooldowns carried
from the arm before: the same fault twice on one worker within minutes would otherwise be
flapping) and go to the busiest worker of the role at that time (one the router sends work;
prefix affinity leaves some nearly idle). Between arms, the fault is cleared, the load's last
answers awaited, a worker left quarantined restored, and its target serving again.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetwise.bench.faults import cases as C
from fleetwise.bench.faults.fleet import BenchFleet
from fleetwise.bench.faults.load import LoadThread, Sent
from fleetwise.bench.faults.workload import Request, Shape, bursty_requests
from fleetwise.bench.goodput.load import SLO
from fleetwise.bench.harness import summary
from fleetwise.bench.targets import SLO_TPOT_S, SLO_TTFT_S
from fleetwise.fleet import ActionRefused, Routability, WorkerRef

SLO_FAULTS = SLO(SLO_TTFT_S, SLO_TPOT_S)
SKIP_S = 120.0      # the trace's first two minutes are sparse: segments start after them
MIN_LOSS = 0.05     # a ratio of losses is only formed when the arm without the detector lost this share


def segment_requests(shape: Shape, seconds: float, seed: int, skip_s: float = SKIP_S) -> list[Request]:
    """The requests of one arm: `seconds` of the bursty load from `skip_s` into it, from 0."""
    return [Request(r.at - skip_s, r.prompt, r.max_tokens, r.rank)
            for r in bursty_requests(shape, skip_s + seconds, seed=seed) if r.at >= skip_s]


@dataclass
class Arm:
    name: str                     # healthy | without | with
    case: C.Case
    started: float                # time.time() at the load's start
    pre_s: float
    span_s: float
    sent: list[Sent] = field(default_factory=list)
    result: C.CaseResult | None = None

    @property
    def injected(self) -> float:
        """Seconds from the load's start to the injection (to the span's start when healthy)."""
        return self.result.injected - self.started if self.result else self.pre_s

    def counted(self) -> list[Sent]:
        return [s for s in self.sent if self.pre_s <= s.at - self.started < self.pre_s + self.span_s]

    def measures(self, slo: SLO = SLO_FAULTS) -> dict[str, Any]:
        counted = self.counted()
        met = sum(slo.met(s.outcome) for s in counted)
        failed = sum(not s.outcome.ok for s in counted)
        r = self.result
        return {"arm": self.name, "fault": self.case.name, "target": self.case.target,
                "requests": len(counted), "met_slo": met, "failed": failed,
                "goodput_rps": met / self.span_s, "error_rate": failed / len(counted) if counted else None,
                "ttft_ms": summary([s.outcome.ttft_s for s in counted], "p50", "p90", "max", scale=1e3),
                "tpot_ms": summary([s.outcome.tpot_s for s in counted], "p50", "p90", "max", scale=1e3),
                "injected_s": self.injected,
                "detected_s": r.detected_s if r else None, "acted_s": r.acted_s if r else None,
                "actions": r.actions if r else [], "timeline": self.timeline(slo)}

    def timeline(self, slo: SLO, buckets: int = 9) -> dict[str, Any]:
        """Goodput per bucket (requests within the SLO per second, by scheduled send) over the
        whole segment, `buckets` of them over the span; seconds from the injection."""
        width = self.span_s / buckets
        edges = width * np.arange(-math.ceil(self.pre_s / width - 1e-9), buckets + 1)
        at = np.array([s.at - self.started - self.pre_s for s in self.sent if slo.met(s.outcome)])
        counts = np.histogram(at, bins=edges)[0] if at.size else np.zeros(len(edges) - 1)
        return {"start_s": [float(e) for e in edges[:-1]], "width_s": width,
                "goodput_rps": [float(c) / width for c in counts]}


def run_arm(f: BenchFleet, name: str, case: C.Case, requests: list[Request], pre_s: float, span_s: float,
            max_windows: int) -> Arm:
    """One arm: the load from the start, the case from `pre_s` on for `span_s` (and until its
    detection and action, as `cases.run_case` waits for them), then everything back."""
    if case.kind != "healthy":
        _back(f, case.worker)
        f.fresh_detector()
    f.set_acting(name != "without")
    load = LoadThread(f.router, "tiny", requests).start()
    while not load.started:
        time.sleep(0.01)
    time.sleep(max(0.0, load.started + pre_s - time.time()))
    run = C.healthy(span_s) if case.kind == "healthy" else case
    restarts = name == "with" and "RestartPod" in f.actions   # how long until it serves again is then a measure
    result = C.run_case(f, run, max_windows, wait_serving=restarts, hold_s=span_s,
                        arm=name if case.kind != "healthy" else "")
    time.sleep(max(0.0, load.started + pre_s + span_s - time.time()))
    load.stop(grace=60.0)
    if case.kind != "healthy":
        _back(f, case.worker)
    if name == "without":
        _quiet(f, case, time.time())   # acting now would act on what the detection-only arm left behind
    return Arm(name, case, load.started, pre_s, span_s, list(load.sent), result)


def _back(f: BenchFleet, worker: str, timeout: float = 120.0) -> None:
    """The worker routable again: restored if it was left quarantined, started again if a
    restart of the loop's failed; then serving."""
    ref = WorkerRef(worker)
    try:
        if not f.fleet.workers[worker].running:
            f.fleet.restart(ref, "the benchmark's next arm: it is not running")
        elif f.fleet.state(ref).state is Routability.QUARANTINED:
            f.fleet.restore(ref, "the benchmark's next arm")
    except ActionRefused:
        pass
    t0 = time.time()
    while time.time() - t0 < timeout and not f.serving(worker):
        time.sleep(0.5)


def _quiet(f: BenchFleet, case: C.Case, cleared: float, windows: int = 4) -> None:
    """Until a window decided after `cleared` names nothing of the case, at most `windows`
    windows: the detector's run of windows out on it has ended, and the next window looks back
    only at what came after the fault."""
    deadline = cleared + windows * f.window
    while time.time() < deadline:
        after = f.record.since(cleared)
        if after and not any(C.names(case, kind, target) for kind, target in after[-1].incidents):
            return
        time.sleep(0.5)


def label_of(case: C.Case) -> str:
    """"slow 6x decode": the fault and the role of its worker (a link names both)."""
    return case.name if case.kind == "link" else f"{case.name} {case.worker.rsplit('-', 1)[0]}"


def lost(healthy: float | None, faulted: float) -> float | None:
    """Goodput lost, the share of the healthy goodput; None without a healthy goodput."""
    return (healthy - faulted) / healthy if healthy else None


def compare(baselines: list[Arm], arms: list[Arm], slo: SLO = SLO_FAULTS) -> dict[str, Any]:
    """Per fault: each arm's measures, the goodput lost with and without the detector against
    the healthy baselines' mean, and with / without (formed when without lost >= MIN_LOSS)."""
    base = [a.measures(slo) for a in baselines]
    healthy = float(np.mean([b["goodput_rps"] for b in base])) if base else None
    faults: dict[str, dict[str, Any]] = {}
    for a in arms:
        m = a.measures(slo)
        label = label_of(a.case)
        entry = faults.setdefault(label, {"fault": label, "kind": a.case.kind, "target": a.case.target})
        entry[a.name] = m
        entry[f"lost_{a.name}"] = lost(healthy, m["goodput_rps"])
    for entry in faults.values():
        w, wo = entry.get("lost_with"), entry.get("lost_without")
        entry["lost_ratio"] = w / wo if w is not None and wo is not None and wo >= MIN_LOSS else None
    return {"slo": slo.to_json(), "healthy_goodput_rps": healthy, "baselines": base,
            "min_loss_for_ratio": MIN_LOSS, "faults": list(faults.values())}
