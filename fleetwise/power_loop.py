"""One power domain's control period, wherever it runs: read the measured power from
Prometheus, ask `controllers/power.py`, apply the caps through `FleetActions`, and renew the
caps in force so that their leases do not lapse. The operator runs one per `PowerBudget`;
`fleetwise up --power-limit-watts` runs one over the local fleet.

Measured power is the sum of the domain's workers' `DCGM_FI_DEV_POWER_USAGE` series, so the
same query reads a DCGM exporter on GPU nodes and the modelled GPUs elsewhere. A worker is
picked out by label matchers (`pod` and `namespace` in a cluster, as the DCGM exporter labels
its series; `instance` under `fleetwise up`). When Prometheus cannot answer, or any worker of
the domain has no series, the reading is missing, never a partial sum or a zero: the
controller then holds its caps, and past its deadline caps low-priority work.

The reading also carries the period's peak (`Reading.peak_watts`): the highest value of the
domain's summed power at 1 s steps over the last control period, one PromQL subquery
(`max_over_time(sum(...)[PERIOD:1s])`), so that a burst of prompt passes over the budget that
the period's reading hides is shed. When Prometheus cannot answer it, or has no point for it,
the peak is missing (None), never zero: the controller then judges the reading alone.

A person's override (`FleetActions.power_override`) wins: that worker is left out of the
controller's decision (its draw still counts in the domain's power) and its cap is the
override's until it lapses. Each cap goes out with a lease of `ttl_periods` control periods
(at least `MIN_TTL_SECONDS`) and a fallback, a conservative cap for low-priority work and none for high-priority, which
the worker applies if the lease is not renewed (the controller stopped).
"""

import logging
import time
from dataclasses import dataclass, field

from fleetwise import gpus
from fleetwise.controllers.power import CapChange, PowerDecision, PowerState, PowerWorker, Reading, Settings, decide
from fleetwise.fleet import ActionRefused, FleetActions, PowerOverride, WorkerRef
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry import catalog as c
from fleetwise.telemetry.prometheus import PrometheusClient, PrometheusError, Sample

log = logging.getLogger(__name__)

MIN_TTL_SECONDS = 15.0  # a cap's lease, at least: one slow renewal (a busy worker) must not lapse it


@dataclass(frozen=True)
class DomainWorker:
    ref: WorkerRef
    priority: str                      # High | Low
    role: str                          # prefill | decode | mixed
    gpu: str                           # product family or node label
    gpus: int = 1
    series: tuple[tuple[str, str], ...] = ()  # label matchers that pick out its DCGM series

    @property
    def key(self) -> str:
        return f"{self.ref.namespace}/{self.ref.name}"

    def picks(self, sample: Sample) -> bool:
        return bool(self.series) and all(sample.labels.get(k) == v for k, v in self.series)


@dataclass
class Period:
    """What one control period saw and did."""
    reading: Reading
    decision: PowerDecision
    at: float
    caps: dict[str, float]                       # worker key -> cap in force (W per GPU) after the period
    changed: list[CapChange] = field(default_factory=list)   # applied this period (not renewals)
    failed: list[str] = field(default_factory=list)          # what could not be applied, and why
    overridden: dict[str, PowerOverride] = field(default_factory=dict)
    telemetry_error: str | None = None


PEAK_STEP_SECONDS = 1.0   # the peak's resolution: one summed point a second


def _quoted(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def peak_query(workers: list[DomainWorker], window_seconds: float) -> str:
    """The highest 1 s point of the workers' summed power over the window (a subquery)."""
    picks = " or ".join(c.DCGM_POWER_USAGE + "{" + ",".join(f"{k}={_quoted(v)}" for k, v in w.series) + "}"
                        for w in workers)
    return f"max_over_time(sum({picks})[{max(1, round(window_seconds))}s:{PEAK_STEP_SECONDS:g}s])"


class PowerLoop:
    def __init__(self, prometheus: PrometheusClient, fleet: FleetActions, settings: Settings = Settings(),
                 period_seconds: float = 5.0, ttl_periods: float = 4.0, min_ttl: float = MIN_TTL_SECONDS) -> None:
        self.prometheus, self.fleet, self.settings = prometheus, fleet, settings
        self.period_seconds, self.ttl_periods, self.min_ttl = period_seconds, ttl_periods, min_ttl
        self.state = PowerState()
        self.caps: dict[str, float] = {}     # worker key -> the cap this loop holds in force
        self.reasons: dict[str, str] = {}    # worker key -> why that cap (a renewal says it again)
        self._seeded = False

    @property
    def ttl(self) -> float:
        return max(self.min_ttl, self.ttl_periods * self.period_seconds)

    def measure(self, workers: list[DomainWorker]) -> tuple[Reading, dict[str, float], str | None]:
        """The domain's power, each worker's draw per GPU, and why the reading is missing (if it is)."""
        try:
            latest = self.prometheus.latest(c.DCGM_POWER_USAGE)
        except PrometheusError as e:
            return Reading(None), {}, str(e)
        drawn: dict[str, float] = {}
        oldest = latest.at
        for w in workers:
            mine = [s for s in latest.samples if w.picks(s)]
            if not mine:
                return Reading(None), {}, f"no {c.DCGM_POWER_USAGE} series for {w.key}"
            drawn[w.key] = sum(s.value for s in mine) / max(1, w.gpus)
            oldest = min(oldest, *(s.timestamp for s in mine))
        total = sum(drawn[w.key] * w.gpus for w in workers)
        peak = self.peak(workers, latest.at)
        # the newest samples lie inside the window, even when no 1 s step of the subquery has them yet
        return Reading(total, max(0.0, latest.at - oldest), None if peak is None else max(peak, total)), drawn, None

    def peak(self, workers: list[DomainWorker], at: float) -> float | None:
        """The domain's peak over the last period at `at`; None when Prometheus has none or fails."""
        if not workers:
            return None
        try:
            samples = self.prometheus.instant(peak_query(workers, self.period_seconds), at)
        except PrometheusError as e:
            log.warning("the power peak is missing: %s", e)
            return None
        if not samples or samples[0].value != samples[0].value:   # no point, or NaN: missing
            return None
        return samples[0].value

    def _seed(self, workers: list[DomainWorker]) -> None:
        """Caps already in force (a restarted controller) from the enforced-limit series."""
        self._seeded = True
        try:
            limits = self.prometheus.latest(c.DCGM_POWER_MGMT_LIMIT).samples
        except PrometheusError:
            self._seeded = False
            return
        for w in workers:
            mine = [s.value for s in limits if w.picks(s)]
            if mine and max(mine) < gpus.product(w.gpu).rated_watts - 0.5:
                self.caps.setdefault(w.key, max(mine))

    def fallback(self, w: DomainWorker, budget: PowerBudgetSpec) -> float | None:
        """What the worker falls back to if the lease lapses: conservative for low priority."""
        if w.priority != "Low":
            return None
        product = gpus.product(w.gpu)
        return max(budget.min_gpu_cap_watts, product.min_limit_watts,
                   self.settings.conservative_fraction * product.rated_watts)

    def run_period(self, budget: PowerBudgetSpec, workers: list[DomainWorker], now: float | None = None) -> Period:
        now = time.time() if now is None else now
        if not self._seeded:
            self._seed(workers)
        keys = {w.key for w in workers}
        self.caps = {k: v for k, v in self.caps.items() if k in keys}  # gone from the domain
        reading, drawn, error = self.measure(workers)
        overridden = {w.key: o for w in workers if (o := self._override(w)) is not None}
        ours = [w for w in workers if w.key not in overridden]
        decision = decide(budget, reading, [PowerWorker(w.key, w.priority, w.role, w.gpu, w.gpus, self.caps.get(w.key),
                                                        drawn.get(w.key)) for w in ours],
                          self.state, now, self.settings)
        self.state = decision.state
        period = Period(reading, decision, now, {}, overridden=overridden, telemetry_error=error)
        by_key = {w.key: w for w in workers}
        for change in decision.changes:
            self._apply(period, by_key[change.worker], change.cap_watts, change.reason, budget, now, change)
        changed = {ch.worker for ch in decision.changes}
        for w in workers:
            o = overridden.get(w.key)
            if o is not None:
                self._apply(period, w, o.watts, f"override: {o.reason}", budget, now,
                            CapChange(w.key, o.watts, f"override: {o.reason}"), until=min(o.until, now + self.ttl))
            elif w.key in self.caps and w.key not in changed:
                self._apply(period, w, self.caps[w.key], self.reasons.get(w.key, "renewed"), budget, now, None)
        period.caps = dict(self.caps)
        return period

    def _override(self, w: DomainWorker) -> PowerOverride | None:
        try:
            return self.fleet.power_override(w.ref)
        except ActionRefused:
            return None

    def _apply(self, period: Period, w: DomainWorker, watts: float | None, reason: str, budget: PowerBudgetSpec,
               now: float, change: CapChange | None, until: float | None = None) -> None:
        """Sends the cap (a renewal when `change` is None); records what happened."""
        before = self.caps.get(w.key)
        try:
            self.fleet.cap_power(w.ref, watts, until or now + self.ttl, reason, self.fallback(w, budget))
        except ActionRefused as e:
            period.failed.append(str(e))
            log.warning("%s", e)
            return
        if watts is None:
            self.caps.pop(w.key, None)
            self.reasons.pop(w.key, None)
        else:
            self.caps[w.key] = watts
            self.reasons[w.key] = reason
        if change is not None and before != watts:
            period.changed.append(change)

    def release_all(self, workers: list[DomainWorker], reason: str) -> list[str]:
        """Lifts every cap this loop holds (its budget is gone); returns what failed."""
        failed = []
        for w in workers:
            if w.key in self.caps:
                try:
                    self.fleet.cap_power(w.ref, None, time.time(), reason)
                    self.caps.pop(w.key)
                except ActionRefused as e:
                    failed.append(str(e))
        return failed
