"""Power capping for one power domain, after POLCA: keep the measured power of an
oversubscribed domain under its `PowerBudget`, taking each watt where it costs the least
latency, low-priority work first, and give power back in steps once it stays low.

One control period, `decide`, given the domain's measured power, its budget and its workers:
- **Stale or missing telemetry**: never lift a cap. Hold; once the telemetry has been stale for
  `stale_deadline_seconds`, cap low-priority work to a conservative level.
- **Above `emergencyThreshold x limitWatts`, or a peak over `limitWatts` itself** (below): every
  low-priority worker goes to its floor at once; then high-priority workers come down step by
  step, cheapest watt first and with no bound on the number of changes, but only while the
  projected power is still at the emergency threshold or above. High priority is capped only to
  keep the domain under the emergency threshold, never to reach the hysteresis band: the band is
  margin against oscillation, cheap to buy with low-priority watts and dear with high-priority
  latency (the CRD's contract: low priority is capped from `capThreshold`, high priority too
  from `emergencyThreshold`, as far as it takes to get back under it). A prefill worker's step is taken from what
  its passes draw, not from its window mean: a worker busy a third of the window measures about
  280 W on an H100, and a step below that would hold its passes near the floor, 1.6x longer.
  (Every worker a double step at the emergency threshold, as before, held high-priority caps on
  the simulator's row at 1.5x its budget's servers for 81% of its GPU-time: +9% p99 TTFT, +4.5%
  p99 TBT. Low priority's floor carries that row's bursts on its own up to 1.6x.)
- **Above `capThreshold x limitWatts`**: low-priority workers take steps until the projected
  power is back at the middle of the hysteresis band, at most `max_changes` workers a period;
  high priority is not touched. Among workers of one priority, the step with the least latency cost per watt saved,
  judged by the modelled GPU (fleetwise/gpus.py). With the profile's numbers, token (decode)
  work goes first on every product: a token step draws 0.61 of rated power and a cap below that
  stretches it by (demand / cap) ** 0.10, about 2% for a watt of rated power in ten, while a
  prompt step runs at the rating and a cap stretches it by ** 0.38, about 5% for the first tenth.
  That order is not written in; it falls out of the costs, so a product whose numbers differ gets
  its own order.
- **A burst**: a reading may carry, besides the long window's mean, the highest short-window
  mean inside it (`Reading.peak_watts`; the simulator's 1 s samples in its 5 s window). Prompt
  passes come in bursts that a 5 s mean averages away, so the mean can sit in the band while the
  row is over its budget for a second or two. A peak over `limitWatts` itself is a breach in
  progress: it is shed as above the emergency threshold, from the higher of the mean and the
  peak (in a rising burst the mean lags: shedding from the mean left the row's bursts at 1.65x
  over the budget for 6-8 s). The thresholds are otherwise judged on the mean, and caps are
  lifted on the mean only: two windows, as POLCA's two thresholds with hysteresis between them.
  (Judging every threshold on the peak was tried in the simulator, 400 H100s grown to twice the
  budget's servers: three times the caps and +43% high-priority p99 TTFT, against +18% on the
  mean.)
- **Between `releaseThreshold` and `capThreshold`**: hold (the hysteresis band).
- **Below `releaseThreshold x limitWatts`**: raise caps one step, the costliest caps first, while
  the power projected stays under the release threshold (a worker held at its cap may draw up to
  the new one; a worker drawing well below its cap is not held by it and draws what it does).
  High-priority caps every period, all of them the projection allows; low-priority ones after
  `release_periods` periods in a row below the threshold, at most `max_changes`, then wait again.
  A cap raised to what the worker's phase draws uncapped (the rating for prompt work, 0.61 of it
  for token work) is lifted: above that it holds nothing back. (Releasing 4 caps every 3
  periods, and a decode worker's caps only at the rating, 4 steps of nothing after the one that
  mattered, kept high-priority caps from one burst to the next.)
A cap is per GPU, never below `minGpuCapWatts` nor the product's lowest power limit.

Reaction time, worst case: power crosses the threshold just after a scrape, so the controller
sees it one scrape interval plus one control period later (5 s + 5 s at the defaults), and a
GPU takes a new limit within a second; above the emergency threshold every cap it needs is set in
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
FLOOR_STEPS = 1 / STEP_FRACTION  # steps enough to reach any floor
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
    over = reading.peak_watts if reading.peak_watts is not None and reading.peak_watts >= limit else None
    if watts >= budget.emergency_threshold * limit or over is not None:
        # at the emergency threshold, or over the budget itself in a burst the mean hides: from the higher
        return _shed(budget, max(watts, over or 0.0), plans, replace(state, periods_below_release=0),
                     emergency=True, max_changes=len(plans), burst=watts < budget.emergency_threshold * limit)
    if watts >= budget.cap_threshold * limit:
        return _shed(budget, watts, plans, replace(state, periods_below_release=0), emergency=False,
                     max_changes=settings.max_changes)
    if watts >= budget.release_threshold * limit:
        return PowerDecision([], replace(state, periods_below_release=0), "band",
                             f"{watts:.0f} W is inside the hysteresis band: caps hold", watts)
    below = state.periods_below_release + 1
    low_due = below >= settings.release_periods and any(p.cap is not None for p in plans)
    high_capped = any(p.cap is not None and p.worker.priority != "Low" for p in plans)
    if not (low_due or high_capped):
        situation = "releasing" if any(p.cap is not None for p in plans) else "normal"
        return PowerDecision([], replace(state, periods_below_release=below), situation,
                             f"{watts:.0f} W, below the release threshold for {below} period(s)", watts)
    return _release(budget, watts, plans, replace(state, periods_below_release=0 if low_due else below),
                    settings, low_due)


def _target(budget: PowerBudgetSpec) -> float:
    """Where shedding aims: the middle of the hysteresis band, so the next period holds."""
    return (budget.cap_threshold + budget.release_threshold) / 2 * budget.limit_watts


def _shed(budget: PowerBudgetSpec, watts: float, plans: list[_Plan], state: PowerState, emergency: bool,
          max_changes: int, burst: bool = False) -> PowerDecision:
    projected = watts
    threshold = "budget in a burst" if burst else "emergency threshold" if emergency else "cap threshold"
    why = f"power {watts:.0f} W above the {threshold}"
    if emergency:  # low priority to its floor at once
        for p in plans:
            if p.worker.priority == "Low":
                projected -= _lower(p, budget, FLOOR_STEPS, why, working=True)
    # high priority gives power only while the projection is at the emergency threshold or above
    target, high_above = _target(budget), budget.emergency_threshold * budget.limit_watts
    spent: set[str] = set()   # stepped from its passes' draw with nothing off its mean: one step a period
    while projected > target:
        changed = sum(p.changed for p in plans)
        candidates = []
        for p in plans:
            high = p.worker.priority != "Low"
            if (not p.changed and changed >= max_changes) or (high and projected < high_above) \
                    or p.worker.name in spent:
                continue
            step = p.step_down(budget, working=high and emergency)
            if step is not None:
                candidates.append((high, step[1], p.worker.name, p))
        if not candidates:
            break
        _, cost, _, best = min(candidates, key=lambda c: c[:3])
        saved = _lower(best, budget, 1.0, f"{why}; {cost * 100:.3f}% latency per watt",
                       working=best.worker.priority != "Low" and emergency)
        if saved <= 0:
            spent.add(best.worker.name)
        projected -= saved
    changes = [CapChange(p.worker.name, p.cap, p.notes[-1]) for p in plans if p.changed]
    left = (" (still above the emergency threshold: more next period)" if projected >= high_above
            else " (above the band's middle: only low priority gives more)" if projected > target else "")
    summary = f"{watts:.0f} W above the {threshold}: {len(changes)} cap(s) lowered, projected {projected:.0f} W{left}"
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
             settings: Settings, low_due: bool) -> PowerDecision:
    high = [p for p in plans if p.cap is not None and p.worker.priority != "Low"]
    low = [p for p in plans if p.cap is not None and p.worker.priority == "Low"] if low_due else []
    # high priority first (every period, all of it), then low priority's (after the wait, a few);
    # in each, the caps that cost the most latency first
    for group in (high, low):
        group.sort(key=lambda p: (-gpus.stretch(p.phase, p.demand, p.cap), p.worker.name))
    projected, changes = watts, []
    ceiling = budget.release_threshold * budget.limit_watts
    for p in high + low[:settings.max_changes]:
        assert p.cap is not None
        raised = p.cap + STEP_FRACTION * p.product.rated_watts
        # a cap raised to what the phase draws uncapped holds nothing back: lifted
        new = None if raised >= min(p.product.rated_watts, p.demand) else raised
        # a worker held at its cap may draw up to the new one; one below its cap draws what it does
        pinned = p.drawn >= PINNED_FRACTION * p.cap
        rise = (min(new if new is not None else p.demand, p.demand) - p.drawn) * p.worker.gpus if pinned else 0.0
        if projected + max(0.0, rise) >= ceiling:
            break
        projected += max(0.0, rise)
        reason = (f"power {watts:.0f} W below the release threshold; "
                  + ("cap lifted" if new is None else f"cap raised to {new:.0f} W per GPU"))
        changes.append(CapChange(p.worker.name, new, reason))
    summary = f"{watts:.0f} W, below the release threshold: {len(changes)} cap(s) raised"
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
