"""The power controller in the loop: each power domain's draw measured from the modelled GPU
(fleetwise.gpus) as the workers' steps change, read the way the operator reads DCGM through
Prometheus (the mean over the last scrape interval), and every control period handed to
`fleetwise.controllers.power.decide`, the operator's own function, whose cap changes then
stretch the workers' steps from that moment on.

The operator's controller is handed, besides each window's mean, the highest `sample_s` mean
inside it (prompt passes' bursts); `fleetwise-mean` is the same controller handed the mean alone.
Two other controllers run in the same place for comparison: `polca`, POLCA's two-threshold
policy (a fixed frequency cap, as a power fraction, on every low-priority worker above the
first threshold and on every worker above the second; all lifted below the release threshold),
and `none` (measure only). A domain's budget is `limitWatts`; the monitor samples each domain's
mean power every `sample_s` and counts the time above the budget and the longest run above it.
"""

from dataclasses import dataclass, field

from fleetwise.controllers import power
from fleetwise.controllers.placement import PowerDomain
from fleetwise.spec import PowerBudgetSpec

from .workers import Worker

CONTROLLERS = ("fleetwise", "fleetwise-mean", "polca", "none")


@dataclass
class PowerConfig:
    controller: str = "fleetwise"      # fleetwise | polca | none
    period_s: float = 5.0              # control period
    scrape_s: float = 5.0              # the reading is the mean over this window, ending now
    sample_s: float = 1.0              # the monitor's resolution for time over budget
    cap_threshold: float = 0.9
    emergency_threshold: float = 0.98
    release_threshold: float = 0.8
    min_gpu_cap_watts: float = 200.0
    polca_cap_fraction: float = 0.75   # POLCA's frequency cap, as a fraction of rated power
    series_points: int = 600           # per domain in the result (the monitor's samples, thinned)

    def __post_init__(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ValueError(f"power.controller must be one of {', '.join(CONTROLLERS)}, not {self.controller!r}")
        if min(self.period_s, self.scrape_s, self.sample_s) <= 0:
            raise ValueError("power.period_s, scrape_s and sample_s must be positive")


@dataclass
class Meter:
    """Energy of a piecewise-constant draw."""
    watts: float = 0.0
    joules: float = 0.0
    t: float = 0.0

    def set(self, now: float, watts: float) -> None:
        self.joules += self.watts * (now - self.t)
        self.t, self.watts = now, watts

    def energy(self, now: float) -> float:
        return self.joules + self.watts * (now - self.t)


@dataclass
class Domain:
    name: str
    budget: PowerBudgetSpec
    workers: list[Worker]
    meter: Meter = field(default_factory=Meter)
    state: power.PowerState = field(default_factory=power.PowerState)
    samples: list[tuple[float, float]] = field(default_factory=list)   # (t, mean watts over the sample)
    over_s: float = 0.0
    run_s: float = 0.0            # the current run above the budget
    longest_over_s: float = 0.0
    cap_changes: int = 0
    situations: dict[str, int] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)   # energy at the start of each window
    peak: float = 0.0             # the highest sample since the last control period
    capped_gpu_s: dict[str, float] = field(default_factory=dict)   # by priority: GPU-seconds under a cap


@dataclass
class DomainReport:
    name: str
    budget_watts: float
    nameplate_watts: float
    workers: int
    mean_watts: float
    peak_watts: float             # the highest sample
    over_budget_s: float
    longest_over_budget_s: float
    cap_changes: int
    situations: dict[str, int]
    series: list[tuple[float, float]]
    capped_share: dict[str, float] = field(default_factory=dict)   # by priority: of its GPU-time, under a cap


class PowerLoop:
    def __init__(self, domains: list[PowerDomain], where: dict[Worker, str], config: PowerConfig) -> None:
        self.config = config
        self.domains: list[Domain] = []
        self.domain_of: dict[Worker, Domain] = {}
        self.meters = {w: Meter(w.draw) for w in where}
        for d in domains:
            spec = PowerBudgetSpec(node_selector=d.selector, limit_watts=d.limit_watts,
                                   oversubscription=min(4.0, d.oversubscription), cap_threshold=config.cap_threshold,
                                   emergency_threshold=config.emergency_threshold,
                                   release_threshold=config.release_threshold,
                                   min_gpu_cap_watts=config.min_gpu_cap_watts)
            members = [w for w, node_domain in where.items() if node_domain == d.name]
            domain = Domain(d.name, spec, members, Meter(sum(w.draw for w in members)))
            self.domains.append(domain)
            for w in members:
                self.domain_of[w] = domain
        self.next_control = config.period_s
        self.by_name = {w.replica.url: w for w in where}
        self.apply = lambda w, cap: w.set_cap(cap)   # the engine replaces it with its own

    def draw(self, w: Worker, now: float) -> None:
        meter = self.meters[w]
        watts = w.draw
        if watts != meter.watts:
            domain = self.domain_of.get(w)
            if domain is not None:
                domain.meter.set(now, domain.meter.watts + watts - meter.watts)
            meter.set(now, watts)

    def tick(self, now: float) -> float:
        step = self.config.sample_s
        for d in self.domains:
            watts = self._mean(d.meter, d.marks, "sample", now, step)
            d.samples.append((now, watts))
            d.peak = max(d.peak, watts)
            for w in d.workers:
                if w.cap_watts is not None:
                    d.capped_gpu_s[w.pool.priority] = d.capped_gpu_s.get(w.pool.priority, 0.0) + w.gpus * step
            if watts > d.budget.limit_watts:
                d.over_s += step
                d.run_s += step
                d.longest_over_s = max(d.longest_over_s, d.run_s)
            else:
                d.run_s = 0.0
        if now + 1e-9 >= self.next_control:
            self.next_control += self.config.period_s
            for d in self.domains:
                self.control(d, now)
        return now + step

    def _mean(self, meter: Meter, marks: dict[str, float], key: str, now: float, window: float) -> float:
        """The mean draw since the last call with this key (at most `window` ago at the start)."""
        energy = meter.energy(now)
        start = marks.get(key + "_t", max(0.0, now - window))
        mean = (energy - marks.get(key, 0.0)) / (now - start) if now > start else meter.watts
        marks[key], marks[key + "_t"] = energy, now
        return mean

    def control(self, d: Domain, now: float) -> None:
        window = self.config.scrape_s
        peaks = self.config.controller == "fleetwise"
        reading = power.Reading(self._mean(d.meter, d.marks, "scrape", now, window),
                                peak_watts=d.peak if peaks else None)
        d.peak = 0.0
        if self.config.controller == "none":
            return
        marks = d.marks
        workers = []
        for w in d.workers:
            m = self.meters[w]
            key = w.replica.url
            drawn = self._mean(m, marks, key, now, window) / w.gpus
            workers.append(power.PowerWorker(key, w.pool.priority, w.pool.role, w.pool.gpu.family, w.gpus,
                                             w.cap_watts, drawn))
        if self.config.controller in ("fleetwise", "fleetwise-mean"):
            decision = power.decide(d.budget, reading, workers, d.state, now)
            d.state = decision.state
            changes = [(c.worker, c.cap_watts) for c in decision.changes]
            situation = decision.situation
        else:
            changes, situation = self._polca(d, reading.watts or 0.0)
        d.situations[situation] = d.situations.get(situation, 0) + 1
        for name, cap in changes:
            w = self.by_name[name]
            if cap != w.cap_watts:
                self.apply(w, cap)
                d.cap_changes += 1

    def _polca(self, d: Domain, watts: float) -> tuple[list[tuple[str, float | None]], str]:
        """POLCA's policy: above T1 (the cap threshold) low priority at the frequency cap, above
        T2 (the emergency threshold) everyone; below the release threshold every cap lifted."""
        limit, c = d.budget.limit_watts, self.config
        if watts >= c.emergency_threshold * limit:
            chosen, situation = d.workers, "emergency"
        elif watts >= c.cap_threshold * limit:
            chosen, situation = [w for w in d.workers if w.pool.priority == "Low"], "capping"
        elif watts < c.release_threshold * limit:
            return [(w.replica.url, None) for w in d.workers if w.cap_watts is not None], "releasing"
        else:
            return [], "band"
        return [(w.replica.url, c.polca_cap_fraction * w.pool.gpu.rated_watts) for w in chosen], situation

    def report(self, now: float) -> list[DomainReport]:
        out = []
        for d in self.domains:
            energy = d.meter.energy(now)
            stride = max(1, len(d.samples) // self.config.series_points)
            nameplate = sum(w.gpus * w.pool.gpu.rated_watts for w in d.workers)
            gpus_by: dict[str, int] = {}
            for w in d.workers:
                gpus_by[w.pool.priority] = gpus_by.get(w.pool.priority, 0) + w.gpus
            span = len(d.samples) * self.config.sample_s
            capped = {p: d.capped_gpu_s.get(p, 0.0) / (n * span) if span > 0 else 0.0 for p, n in gpus_by.items()}
            out.append(DomainReport(d.name, d.budget.limit_watts, nameplate, len(d.workers),
                                    energy / now if now > 0 else 0.0, max((s[1] for s in d.samples), default=0.0),
                                    d.over_s, d.longest_over_s, d.cap_changes, d.situations,
                                    [(round(t, 3), round(w, 1)) for t, w in d.samples[::stride]], capped))
        return out
