"""The power controller's decisions: thresholds, priority and cost order, the hysteresis band
without oscillation under a noisy series, stale and missing telemetry, minimum caps, and the
bound on changes per period."""

import itertools
import random

import pytest

from fleetwise import gpus
from fleetwise.controllers.power import STEP_FRACTION, PowerState, PowerWorker, Reading, Settings, decide
from fleetwise.spec import PowerBudgetSpec

H100 = gpus.PRODUCTS["H100"]
BUDGET = PowerBudgetSpec(node_selector={"row": "r1"}, limit_watts=10_000, cap_threshold=0.9,
                         emergency_threshold=0.98, release_threshold=0.8, min_gpu_cap_watts=200)


def fleet(**caps) -> list[PowerWorker]:
    """Two low- and two high-priority workers on H100s, one prefill and one decode each."""
    workers = []
    for priority in ("Low", "High"):
        for role, drawn in (("prefill", 680.0), ("decode", 424.0)):
            name = f"{priority.lower()}-{role}"
            workers.append(PowerWorker(name, priority, role, "NVIDIA-H100-80GB-HBM3", gpus=4,
                                       cap_watts=caps.get(name.replace("-", "_")), drawn_watts=drawn))
    return workers


def caps(decision) -> dict[str, float | None]:
    return {c.worker: c.cap_watts for c in decision.changes}


def test_inside_the_band_nothing_changes():
    d = decide(BUDGET, Reading(8_500), fleet(low_decode=400), PowerState(), now=0)
    assert d.changes == [] and d.situation == "band"


def test_above_the_cap_threshold_low_priority_decode_goes_first_by_cost_and_high_priority_is_untouched():
    d = decide(BUDGET, Reading(9_200), fleet(), PowerState(), now=0)
    assert d.situation == "capping" and d.changes
    assert set(caps(d)) <= {"low-decode", "low-prefill"}
    assert d.changes[0].worker == "low-decode"  # a watt of token work costs the least latency
    assert d.projected_watts <= (0.9 + 0.8) / 2 * BUDGET.limit_watts
    assert all("latency per watt" in c.reason and "Low priority" in c.reason for c in d.changes)


def test_the_order_comes_from_the_model_not_from_the_role():
    """A prefill worker idling at a low draw saves nothing when capped; the decode one does."""
    workers = [PowerWorker("prefill", "Low", "prefill", "H100", drawn_watts=150.0),
               PowerWorker("decode", "Low", "decode", "H100", drawn_watts=424.0)]
    d = decide(BUDGET, Reading(9_500), workers, PowerState(), now=0)
    assert list(caps(d)) == ["decode"]


def test_at_most_max_changes_workers_per_period_unless_in_an_emergency():
    many = [PowerWorker(f"w{i}", "Low", "decode", "H100", drawn_watts=424.0) for i in range(20)]
    d = decide(BUDGET, Reading(9_700), many, PowerState(), now=0, settings=Settings(max_changes=3))
    assert len(d.changes) == 3
    e = decide(BUDGET, Reading(9_900), many, PowerState(), now=0, settings=Settings(max_changes=3))
    assert e.situation == "emergency" and len(e.changes) == 20


def test_the_emergency_threshold_takes_low_priority_to_its_floor_and_spares_high_priority_when_that_is_enough():
    d = decide(BUDGET, Reading(9_900), fleet(), PowerState(), now=0)
    assert d.situation == "emergency"
    floor = BUDGET.min_gpu_cap_watts
    assert caps(d) == {"low-prefill": floor, "low-decode": floor}   # all at once, not a step
    assert d.projected_watts < BUDGET.emergency_threshold * BUDGET.limit_watts


def test_above_the_emergency_threshold_high_priority_gives_the_cheapest_watts_and_only_back_to_the_threshold():
    """Low priority at its floor leaves 10,184 W: high priority's token work goes first (the
    cheapest watt) and stops as soon as the projection is under 9,800 W, not at the band."""
    d = decide(BUDGET, Reading(13_000), fleet(), PowerState(), now=0)
    assert d.situation == "emergency"
    step = STEP_FRACTION * H100.rated_watts
    assert caps(d)["high-decode"] == pytest.approx(424 - 2 * step)
    assert "high-prefill" not in caps(d)
    emergency = BUDGET.emergency_threshold * BUDGET.limit_watts
    assert emergency - 4 * step <= d.projected_watts < emergency


def test_between_the_cap_and_emergency_thresholds_high_priority_is_never_capped():
    """Low priority already at its floor: nothing more to take below the emergency threshold."""
    d = decide(BUDGET, Reading(9_700), fleet(low_prefill=200, low_decode=200), PowerState(), now=0)
    assert d.situation == "capping" and d.changes == []


def test_an_emergency_steps_a_bursty_prefill_worker_from_its_pass_not_from_its_mostly_idle_mean():
    """A prefill worker busy a third of the window measures about 280 W; a step below that
    would hold its passes near the floor (1.6x longer), where a step below the pass's draw
    stretches them by 4%. Its mean does not fall, so it takes one step a period, not more."""
    workers = [PowerWorker("bursty", "High", "prefill", "H100", gpus=4, drawn_watts=280.0)]
    d = decide(BUDGET.model_copy(update={"limit_watts": 1_200}), Reading(1_190), workers, PowerState(), now=0)
    assert d.situation == "emergency"
    working = gpus.step_demand_watts(H100, 2048, 1)
    assert caps(d)["bursty"] == pytest.approx(working - STEP_FRACTION * H100.rated_watts)
    assert gpus.stretch("prompt", working, caps(d)["bursty"]) < 1.05


def test_caps_never_go_below_the_budgets_minimum_or_the_products_lowest_limit():
    budget = BUDGET.model_copy(update={"min_gpu_cap_watts": 300})
    workers = fleet()
    state = PowerState()
    for _ in range(30):  # power stays high: the controller keeps lowering
        d = decide(budget, Reading(9_990), workers, state, now=0)
        state = d.state
        applied = caps(d)
        workers = [PowerWorker(w.name, w.priority, w.role, w.gpu, w.gpus, applied.get(w.name, w.cap_watts),
                               w.drawn_watts) for w in workers]
    assert {w.cap_watts for w in workers} == {300.0}
    a100 = PowerWorker("a", "Low", "decode", "A100", drawn_watts=240.0)
    d = decide(BUDGET.model_copy(update={"min_gpu_cap_watts": 50}), Reading(9_990), [a100], PowerState(), now=0)
    assert caps(d)["a"] >= gpus.PRODUCTS["A100"].min_limit_watts


def applied(workers: list[PowerWorker], decision) -> list[PowerWorker]:
    """The decision's caps in force, each worker held at its cap (drawing it)."""
    new = caps(decision)
    out = []
    for w in workers:
        cap = new.get(w.name, w.cap_watts)
        out.append(PowerWorker(w.name, w.priority, w.role, w.gpu, w.gpus, cap, cap))
    return out


def test_release_steps_high_priority_up_every_period_and_low_priority_after_the_wait():
    workers = fleet(low_decode=300, high_decode=300, low_prefill=500, high_prefill=500)
    workers = [PowerWorker(w.name, w.priority, w.role, w.gpu, w.gpus, w.cap_watts, w.cap_watts) for w in workers]
    settings = Settings(max_changes=1, release_periods=3)
    d = decide(BUDGET, Reading(5_000), workers, PowerState(), now=0, settings=settings)
    # both high-priority caps, past max_changes, one step each, not all the way
    assert d.situation == "releasing" and caps(d) == {"high-prefill": 570.0, "high-decode": 370.0}
    workers = applied(workers, d)
    d = decide(BUDGET, Reading(5_000), workers, d.state, now=5, settings=settings)
    # 440 W is above what a token step draws uncapped (424 W): the cap is lifted, not kept at 440
    assert caps(d) == {"high-prefill": 640.0, "high-decode": None}
    workers = applied(workers, d)
    d = decide(BUDGET, Reading(5_000), workers, d.state, now=10, settings=settings)
    # the third period below: low priority's turn too, at most max_changes, the costliest cap first
    assert caps(d) == {"high-prefill": None, "low-prefill": 570.0}
    assert d.state.periods_below_release == 0  # low priority's next step waits again


def test_a_cap_raised_to_the_rating_is_lifted_and_release_stops_short_of_the_threshold():
    worker = PowerWorker("w", "High", "decode", "H100", gpus=8, cap_watts=650, drawn_watts=424)
    d = decide(BUDGET, Reading(5_000), [worker], PowerState(periods_below_release=2), now=0)
    assert caps(d) == {"w": None} and "lifted" in d.changes[0].reason
    tight = [PowerWorker(f"w{i}", "High", "prefill", "H100", gpus=8, cap_watts=300, drawn_watts=300)
             for i in range(4)]
    d = decide(BUDGET, Reading(7_500), tight, PowerState(periods_below_release=2), now=0)
    assert len(d.changes) == 0  # 8 GPUs x 70 W more each would cross 8,000 W


def test_stale_or_missing_telemetry_never_lifts_a_cap_and_caps_low_priority_after_the_deadline():
    workers = fleet(high_decode=300)
    state = PowerState()
    for now, reading in ((0, Reading(None)), (60, Reading(9_999, age_seconds=90)), (100, Reading(None))):
        d = decide(BUDGET, reading, workers, state, now=now)
        assert d.changes == [] and d.situation == "stale"
        state = d.state
    d = decide(BUDGET, Reading(None), workers, state, now=130)
    assert d.situation == "stale_capping"
    conservative = 0.6 * H100.rated_watts
    assert caps(d) == {"low-prefill": conservative, "low-decode": conservative}
    fresh = decide(BUDGET, Reading(8_500), workers, d.state, now=140)
    assert fresh.state.stale_since is None


@pytest.mark.parametrize("seed", range(5))
def test_no_oscillation_under_a_noisy_load_swinging_across_the_thresholds(seed):
    """A closed loop: each worker draws min(its demand x load, its cap) with 3% noise, beside
    2 kW the controller does not own; the load swings between 1.3 and 0.7 every 60 periods.
    Power is back under the emergency threshold within a few periods of each rise, caps move down
    while it is high and up while it is low, never back and forth from one period to the next."""
    rng = random.Random(seed)
    workers = {f"w{i}": PowerWorker(f"w{i}", "Low" if i % 2 else "High", "decode" if i % 3 else "prefill",
                                    "H100", gpus=2) for i in range(8)}
    demand = {name: 424.0 if w.role == "decode" else 700.0 for name, w in workers.items()}
    state, directions, totals = PowerState(), [], []
    lifted_by_end_of_low = []
    for t in range(300):
        load = 1.3 if (t // 60) % 2 == 0 else 0.7
        if t in (119, 239):
            lifted_by_end_of_low.append(all(w.cap_watts is None for w in workers.values()))
        drawn = {n: min(demand[n] * load * rng.uniform(0.97, 1.03), w.cap_watts or 1e9) for n, w in workers.items()}
        total = sum(drawn[n] * w.gpus for n, w in workers.items()) + 2_000
        totals.append(total)
        workers = {n: PowerWorker(n, w.priority, w.role, w.gpu, w.gpus, w.cap_watts, drawn[n])
                   for n, w in workers.items()}
        d = decide(BUDGET, Reading(total), list(workers.values()), state, now=t)
        state = d.state
        moves = {c.worker: (c.cap_watts or 1e9) - (workers[c.worker].cap_watts or 1e9) for c in d.changes}
        if moves:
            directions.append((t, 1 if sum(moves.values()) > 0 else -1))
        for c in d.changes:
            workers[c.worker] = PowerWorker(c.worker, workers[c.worker].priority, workers[c.worker].role, "H100",
                                            2, c.cap_watts, drawn[c.worker])
    for rise in (0, 120, 240):
        settled = totals[rise + 3:rise + 60]
        # under the emergency threshold: between it and the cap threshold only low priority is
        # capped, and here low priority at its floor does not reach the cap threshold
        assert max(settled) < BUDGET.emergency_threshold * BUDGET.limit_watts, (rise, max(settled))
    assert lifted_by_end_of_low == [True, True]  # and given back, step by step, while it was low
    flips = [(a, b) for (a, da), (b, db) in itertools.pairwise(directions) if da != db and b - a == 1]
    assert not flips, f"cap direction flipped in consecutive periods: {flips}"
    assert sum(1 for (_, da), (_, db) in itertools.pairwise(directions) if da != db) <= 5  # one per swing


def test_a_burst_over_the_budget_that_the_mean_hides_is_shed_and_the_release_waits_for_the_mean():
    workers = [PowerWorker(f"d{i}", "Low", "decode", "H100", drawn_watts=424.0) for i in range(4)]
    calm = decide(BUDGET, Reading(8_500, peak_watts=9_800), workers, PowerState(), now=0)
    assert calm.situation == "band" and calm.changes == []          # the peak is under the budget
    burst = decide(BUDGET, Reading(8_500, peak_watts=10_400), workers, PowerState(), now=0)
    # a breach in progress: shed as an emergency, from the peak
    assert burst.situation == "emergency" and "burst" in burst.summary
    assert caps(burst) == {f"d{i}": BUDGET.min_gpu_cap_watts for i in range(4)}
    capped = [PowerWorker(f"d{i}", "Low", "decode", "H100", cap_watts=300.0, drawn_watts=300.0) for i in range(4)]
    state = PowerState(periods_below_release=5)
    # a high peak under the budget does not hold a release the mean allows
    release = decide(BUDGET, Reading(7_000, peak_watts=9_500), capped, state, now=0)
    assert release.situation == "releasing" and release.changes
