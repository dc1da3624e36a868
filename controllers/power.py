"""Power capping for one power domain, after POLCA: keep the measured power of an
oversubscribed domain under its `PowerBudget`, taking each watt where it costs the least
latency, low-priority work first, and give power back in steps once it stays low.

One control period, `decide`, given the domain's measured power, its budget and its workers:
- **Stale or missing telemetry**: never lift a cap. Hold; once the telemetry has been stale for
  `stale_deadline_seconds`, cap low-priority work to a conservative level.
- **Above `emergencyThreshold x limitWatts`**: every worker, high priority too, comes down by a
  double step, then more where needed, with no bound on the number of changes. A prefill
  worker's double step is taken from what its passes draw, not from its window mean: a worker
  busy a third of the window measures about 280 W on an H100, and two steps below that held its
  passes near the floor, 1.6x longer, for as long as the caps stayed (in the simulator's row at
  1.5x its budget's servers, +37% high-priority p99 TTFT; from the pass's draw, +9%).
- **Above `capThreshold x limitWatts`**: take steps until the projected power is back at the
  middle of the hysteresis band, at most `max_changes` workers a period. Low-priority workers
  first; among workers of one priority, the step with the least latency cost per watt saved,
  judged by the modelled GPU (fleetwise/gpus.py). With the profile's numbers, token (decode)
  work goes first on every product: a token step draws 0.61 of rated power and a cap below that
  stretches it by (demand / cap) ** 0.10, about 2% for a watt of rated power in ten, while a
  prompt step runs at the rating and a cap stretches it by ** 0.38, about 5% for the first tenth.
  That order is not written in; it falls out of the costs, so a product whose numbers differ gets
  its own order.
- **A burst**: a reading may carry, besides the long window's mean, the highest short-window
  mean inside it (`Reading.peak_watts`; the simulator's 1 s samples in its 5 s window). Prompt
  passes come in bursts that a 5 s mean averages away, so the mean can sit in the band while the
  row is over its budget for a second or two. A peak over `limitWatts` itself is shed as a
  crossing of the cap threshold, from the peak. The thresholds are otherwise judged on the mean,
  and caps are lifted on the mean only: two windows, as POLCA's two thresholds with hysteresis
  between them. (Judging every threshold on the peak was tried in the simulator, 400 H100s grown
  to twice the budget's servers: three times the caps and +43% high-priority p99 TTFT, against
  +18% on the mean. Stepping a bursty prefill worker down from its pass's draw rather than its
  mean, so that it is never capped far below a full pass, was tried too: it saves little per
  step, so more high-priority work was capped, and p99 TTFT rose from +1% to +15%.)
- **Between `releaseThreshold` and `capThreshold`**: hold (the hysteresis band).
- **Below `releaseThreshold x limitWatts` for `release_periods` periods in a row**: raise caps one
  step, high-priority and then the costliest caps first, while the power projected stays under
  the release threshold (a worker held at its cap may draw up to the new one; a worker drawing
  well below its cap is not held by it and draws what it does); then wait again. A cap raised to
  the rating is lifted.
A cap is per GPU, never below `minGpuCapWatts` nor the product's lowest power limit.

Reaction time, worst case: power crosses the threshold just after a scrape, so the controller
sees it one scrape interval plus one control period later (5 s + 5 s at the defaults), and a
GPU takes a new limit within a second; above the emergency threshold every worker is capped in
that one period. Above the cap threshold and below the emergency one, a bound of `max_changes`
workers a period may take several periods. For scale: a UL 489 circuit breaker's calibration
lets it carry 135% of its rating for up to an hour and 200% for up to two minutes before it
must trip, so seconds are well inside what the row's breakers tolerate; the margin that
matters is the one between `emergencyThreshold` and the breaker's rating.
"""

from dataclasses import dataclass, field, replace

from fleetwise import gpus
from fleetwise.spec import PowerBudgetSpec

STEP_FRACTION = 0.10          # of a GPU's rated power, per step
PROMPT_TOKENS_TYPICAL = 2048  # a busy prefill worker's step: the rating's plateau
PINNED_FRACTION = 0.95        # a worker drawing this share of its cap is held by it


@dataclass(frozen=True)
class Settings:
    max_changes: int = 4                 # workers whose cap changes in one period (not in an emergency)
    release_periods: int = 3             # periods in a row below the release threshold before a step up
    stale_after_seconds: float = 30.0    # a reading older than this is stale
    stale_deadline_seconds: float = 120.0  # stale for this long: conservative caps for low priority
    conservative_fraction: float = 0.6   # of rated power: the cap for low-priority work past the deadline


@dataclass(frozen=True)
class PowerWorker:
    """One worker as the controller sees it. Watts are per GPU."""
    name: str
    priority: str                  # High | Low (the ModelDeployment's)
    role: str                      # prefill | decode | mixed
    gpu: str                       # product family or node label
    gpus: int = 1
    cap_watts: float | None = None     # the cap in force; None: none (the product's default limit)
    drawn_watts: float | None = None   # measured; None: unknown (the model's figure for the role)


@dataclass(frozen=True)
class Reading:
    """The domain's measured power: None when there is no series; age of its newest sample.
    `watts` is the long window's mean; `peak_watts`, when known, the highest short-window mean
    inside it (a burst the mean hides)."""
    watts: float | None
    age_seconds: float = 0.0
    peak_watts: float | None = None


@dataclass
class PowerState:
    """What the controller carries from one period to the next."""
    periods_below_release: int = 0
    stale_since: float | None = None


@dataclass(frozen=True)
class CapChange:
    worker: str
    cap_watts: float | None  # per GPU; None: lift the cap
    reason: str


@dataclass
class PowerDecision:
    changes: list[CapChange]
    state: PowerState
    situation: str   # normal | band | capping | emergency | releasing | stale | stale_capping
    summary: str
    projected_watts: float | None = None


@dataclass
class _Plan:
    """A worker's cap as the period's decision lowers or raises it."""
    worker: PowerWorker
    product: gpus.GPUProduct
    cap: float | None
    changed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def phase(self) -> gpus.Phase:
        return "token" if self.worker.role == "decode" else "prompt"

    @property
    def demand(self) -> float:
        tokens = 0 if self.phase == "token" else PROMPT_TOKENS_TYPICAL
        return gpus.step_demand_watts(self.product, tokens, 1)

    @property
    def drawn(self) -> float:
        """Watts per GPU now, under the planned cap."""
        measured = self.worker.drawn_watts if self.worker.drawn_watts is not None else self.demand
        return gpus.drawn_watts(measured, self.cap)

    def floor(self, budget: PowerBudgetSpec) -> float:
        return max(budget.min_gpu_cap_watts, self.product.min_limit_watts)

    def step_down(self, budget: PowerBudgetSpec, steps: float = 1.0,
                  working: bool = False) -> tuple[float, float] | None:
        """(new cap, latency cost per watt saved) of the next step down, or None at the floor.
        `working`: step from what the worker draws while it works (its phase's demand under its
        cap), not from its measured mean, which for a bursty prefill worker is mostly idle."""
        level = gpus.drawn_watts(self.demand, self.cap) if working and self.phase == "prompt" else self.drawn
        new = max(self.floor(budget), level - steps * STEP_FRACTION * self.product.rated_watts)
        saved = (level - new) * self.worker.gpus
        if saved <= 0:
            return None
        cost = gpus.stretch(self.phase, self.demand, new) / gpus.stretch(self.phase, self.demand, self.cap) - 1
        return new, cost / saved


def decide(budget: PowerBudgetSpec, reading: Reading, workers: list[PowerWorker], state: PowerState,
           now: float, settings: Settings = Settings()) -> PowerDecision:
    plans = [_Plan(w, gpus.product(w.gpu), w.cap_watts) for w in workers]
    limit = budget.limit_watts
    if reading.watts is None or reading.age_seconds > settings.stale_after_seconds:
        return _stale(budget, reading, plans, state, now, settings)
    state = replace(state, stale_since=None)
    watts = reading.watts
    if watts >= budget.emergency_threshold * limit:
        return _shed(budget, watts, plans, replace(state, periods_below_release=0), emergency=True,
                     max_changes=len(plans))
    if watts >= budget.cap_threshold * limit:
        return _shed(budget, watts, plans, replace(state, periods_below_release=0), emergency=False,
                     max_changes=settings.max_changes)
    if reading.peak_watts is not None and reading.peak_watts >= limit:
        # a burst over the budget itself that the mean hides: shed from the peak, as above the cap threshold
        return _shed(budget, reading.peak_watts, plans, replace(state, periods_below_release=0), emergency=False,
                     max_changes=settings.max_changes, burst=True)
    if watts >= budget.release_threshold * limit:
        return PowerDecision([], replace(state, periods_below_release=0), "band",
                             f"{watts:.0f} W is inside the hysteresis band: caps hold", watts)
    below = state.periods_below_release + 1
    if below < settings.release_periods or not any(p.cap is not None for p in plans):
        situation = "releasing" if any(p.cap is not None for p in plans) else "normal"
        return PowerDecision([], replace(state, periods_below_release=below), situation,
                             f"{watts:.0f} W, below the release threshold for {below} period(s)", watts)
    return _release(budget, watts, plans, replace(state, periods_below_release=0), settings)


def _target(budget: PowerBudgetSpec) -> float:
    """Where shedding aims: the middle of the hysteresis band, so the next period holds."""
    return (budget.cap_threshold + budget.release_threshold) / 2 * budget.limit_watts


def _shed(budget: PowerBudgetSpec, watts: float, plans: list[_Plan], state: PowerState, emergency: bool,
          max_changes: int, burst: bool = False) -> PowerDecision:
    projected = watts
    threshold = "emergency threshold" if emergency else "budget in a burst" if burst else "cap threshold"
    if emergency:  # everyone comes down a double step first
        for p in plans:
            projected -= _lower(p, budget, 2.0, f"power {watts:.0f} W above the {threshold}", working=True)
    target = _target(budget)
    while projected > target:
        changed = sum(p.changed for p in plans)
        candidates = []
        for p in plans:
            if not p.changed and changed >= max_changes:
                continue
            step = p.step_down(budget)
            if step is not None:
                candidates.append((p.worker.priority != "Low", step[1], p.worker.name, p))
        if not candidates:
            break
        _, cost, _, best = min(candidates, key=lambda c: c[:3])
        projected -= _lower(best, budget, 1.0, f"power {watts:.0f} W above the {threshold}; "
                                               f"{cost * 100:.3f}% latency per watt")
    changes = [CapChange(p.worker.name, p.cap, p.notes[-1]) for p in plans if p.changed]
    short = projected > target
    summary = (f"{watts:.0f} W above the {threshold}: {len(changes)} cap(s) lowered, "
               f"projected {projected:.0f} W" + (" (still above: more next period)" if short else ""))
    return PowerDecision(changes, state, "emergency" if emergency else "capping", summary, projected)


def _lower(p: _Plan, budget: PowerBudgetSpec, steps: float, why: str, working: bool = False) -> float:
    """Lowers a worker's planned cap; returns the watts that saves."""
    step = p.step_down(budget, steps, working)
    if step is None:
        return 0.0
    before = p.drawn * p.worker.gpus
    p.cap, p.changed = step[0], True
    p.notes.append(f"{why}; cap {step[0]:.0f} W per GPU ({p.worker.role}, {p.worker.priority} priority)")
    return before - p.drawn * p.worker.gpus


def _release(budget: PowerBudgetSpec, watts: float, plans: list[_Plan], state: PowerState,
             settings: Settings) -> PowerDecision:
    capped = [p for p in plans if p.cap is not None]
    # high priority first, then the caps that cost the most latency
    capped.sort(key=lambda p: (p.worker.priority == "Low",
                               -gpus.stretch(p.phase, p.demand, p.cap), p.worker.name))
    projected, changes = watts, []
    ceiling = budget.release_threshold * budget.limit_watts
    for p in capped[:settings.max_changes]:
        assert p.cap is not None
        raised = p.cap + STEP_FRACTION * p.product.rated_watts
        new = None if raised >= p.product.rated_watts else raised
        # a worker held at its cap may draw up to the new one; one below its cap draws what it does
        pinned = p.drawn >= PINNED_FRACTION * p.cap
        rise = (min(new if new is not None else p.demand, p.demand) - p.drawn) * p.worker.gpus if pinned else 0.0
        if projected + max(0.0, rise) >= ceiling:
            break
        projected += max(0.0, rise)
        reason = (f"power {watts:.0f} W below the release threshold for {settings.release_periods} periods; "
                  + ("cap lifted" if new is None else f"cap raised to {new:.0f} W per GPU"))
        changes.append(CapChange(p.worker.name, new, reason))
    summary = f"{watts:.0f} W, low for {settings.release_periods} periods: {len(changes)} cap(s) raised"
    return PowerDecision(changes, state, "releasing", summary, projected)


def _stale(budget: PowerBudgetSpec, reading: Reading, plans: list[_Plan], state: PowerState, now: float,
           settings: Settings) -> PowerDecision:
    since = state.stale_since if state.stale_since is not None else now - reading.age_seconds
    state = replace(state, stale_since=since, periods_below_release=0)
    what = "no power series" if reading.watts is None else f"the newest sample is {reading.age_seconds:.0f} s old"
    if now - since < settings.stale_deadline_seconds:
        return PowerDecision([], state, "stale", f"telemetry stale ({what}): caps hold, none is lifted")
    changes = []
    for p in plans:
        if p.worker.priority != "Low":
            continue
        conservative = max(p.floor(budget), settings.conservative_fraction * p.product.rated_watts)
        if p.cap is None or p.cap > conservative:
            changes.append(CapChange(p.worker.name, conservative,
                                     f"telemetry stale for {now - since:.0f} s ({what}): conservative cap "
                                     f"{conservative:.0f} W per GPU for low-priority work"))
    return PowerDecision(changes, state, "stale_capping",
                         f"telemetry stale for {now - since:.0f} s: {len(changes)} low-priority cap(s)")
