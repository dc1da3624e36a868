"""`fleetwise plan`: the cheapest fleet it returns meets the objectives and one worker fewer
does not; a power budget it cannot fit is refused; the time budget stops the search."""

import pytest
from typer.testing import CliRunner

from fleetwise.cli import app
from fleetwise.sim.plan import PlanConfig, plan


def test_the_plan_is_the_fewest_workers_that_meet_the_objectives():
    config = PlanConfig(rate=8, shapes=["H100/H100"], trial_s=60, time_budget_s=300)
    result = plan(config)
    best = result.best
    assert best is not None and best.meets and best.attainment >= 0.99 and result.complete
    tried = {(c.prefill, c.decode): c for c in result.candidates}
    fewer_decode = [c for c in result.candidates if c.decode == best.decode - 1]
    assert fewer_decode and not any(c.meets for c in fewer_decode)   # even with prefill to spare
    assert best.prefill == 1 or not tried[(best.prefill - 1, best.decode)].meets
    assert best.gpus == 4 * (best.prefill + best.decode) and best.usd_per_hour == pytest.approx(4.0 * best.gpus)
    assert all(c.usd_per_hour >= best.usd_per_hour for c in result.candidates if c.meets)


def test_a_power_budget_bounds_the_fleet_and_runs_it_under_the_power_controller():
    result = plan(PlanConfig(rate=8, shapes=["H100/H100"], trial_s=60, power_budget_watts=10_000,
                             max_oversubscription=1.5, time_budget_s=300))
    assert result.best is not None and result.best.meets
    assert all(c.nameplate_kw <= 15.0 for c in result.candidates if c.attainment > 0)   # every trial run fit
    assert any(c.oversubscription > 1 for c in result.candidates if c.attainment > 0)   # some ran capped


def test_a_power_budget_too_small_leaves_no_plan_and_time_runs_out():
    tight = plan(PlanConfig(rate=8, shapes=["H100"], trial_s=30, power_budget_watts=2_000, time_budget_s=60))
    assert tight.best is None and tight.trials == 0           # 2 kW holds no 4 x 700 W worker
    hurried = plan(PlanConfig(rate=8, shapes=["H100/H100", "A100/A100"], trial_s=30, time_budget_s=0.0))
    assert not hurried.complete and hurried.trials <= 1


def test_fleetwise_plan_prints_the_cheapest_fleet_and_refuses_bad_shapes():
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "--rate", "4", "--shapes", "H100", "--trial-s", "30", "--time-budget", "120"])
    assert ok.exit_code == 0, ok.output
    assert "cheapest: H100 with 0 prefill and" in ok.output
    bad = runner.invoke(app, ["plan", "--rate", "4", "--shapes", "H100/A100/B200"])
    assert bad.exit_code == 2 and "shapes" in bad.output
