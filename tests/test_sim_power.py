"""The power controller in the simulator's loop: the domain meters agree with the workers' own
energy, an oversubscribed row breaches its budget without a controller and not for longer than a
control period with the operator's controller, which caps low priority first; POLCA's baseline
runs in the same place; the controller called is the controllers' module itself."""

import pytest

from fleetwise.controllers import power as controllers_power
from fleetwise.sim import power as sim_power
from fleetwise.sim.engine import Settings
from fleetwise.sim.nodes import Layout
from fleetwise.sim.power import PowerConfig
from fleetwise.sim.run import DATA, PoolConfig, SimConfig, build, requests_for, run_simulation
from fleetwise.sim.study import grown, study

CONV = DATA / "azure-llm-trace-2023" / "AzureLLMInferenceTrace_conv.csv"


def fleet(ratio: float = 1.0, controller: str = "fleetwise", duration: float = 120) -> SimConfig:
    """Two domains of H100 nodes (8 GPUs, 5 nodes a domain) at 0.18 requests/s per GPU,
    a quarter of the requests and pools low priority, grown by `ratio` inside the original budget
    (the nodes twice as many at ratio 2, so four domains of half the budget each)."""
    pools = [PoolConfig("prefill", 6), PoolConfig("prefill", 2, priority="Low"),
             PoolConfig("decode", 9), PoolConfig("decode", 3, priority="Low")]
    base = SimConfig(pools, trace=str(CONV), poisson_rate=0.18 * 80, duration_s=duration,
                     settings=Settings(low_priority_share=0.25), layout=Layout(nodes_per_domain=5),
                     power=PowerConfig(controller=controller))
    return grown(base, ratio)


def test_the_domain_meters_add_up_to_the_workers_energy():
    config = fleet(2.0)
    sim = build(config)
    sim.run(requests_for(config))
    assert sim.power is not None
    metered = sum(d.meter.energy(sim.now) for d in sim.power.domains)
    booked = sum(w.prompt_j + w.token_j + (sim.now - w.prompt_s - w.token_s) * w.idle_watts for w in sim.workers)
    assert metered == pytest.approx(booked, rel=1e-6)
    assert sum(d.cap_changes for d in sim.power.domains) > 0   # caps changed the draw on the way


def test_oversubscription_breaches_the_budget_without_a_controller_and_not_with_one():
    none, ours, polca = (run_simulation(fleet(2.4, c)) for c in ("none", "fleetwise", "polca"))
    assert none.power and ours.power and polca.power
    # the row's two domains keep the budgets sized for their first five nodes each
    assert len(ours.power) == 2 and all(d.budget_watts == pytest.approx(5 * 8 * 700) for d in ours.power)
    assert all(d.nameplate_watts == pytest.approx(2.4 * d.budget_watts) for d in ours.power)
    assert max(d.longest_over_budget_s for d in none.power) > 5.0
    assert sum(d.over_budget_s for d in none.power) > 5 * sum(d.over_budget_s for d in ours.power)
    assert max(d.longest_over_budget_s for d in ours.power) <= 5.0      # one control period
    assert sum(d.cap_changes for d in ours.power) > 0 and sum(d.cap_changes for d in polca.power) > 0
    assert none.requests == ours.requests == polca.requests
    # caps stretch steps: the run under caps is no faster than the one without
    assert ours.ttft_s.mean >= none.ttft_s.mean
    assert all(d.capped_share == {"High": 0.0, "Low": 0.0} for d in none.power)
    # this far over, low priority's floor is not enough: high priority is capped too, for less of the time
    assert all(0 < d.capped_share["High"] < d.capped_share["Low"] for d in ours.power)


def test_a_row_moderately_over_is_held_by_capping_low_priority_alone():
    result = run_simulation(fleet(1.8))
    assert result.power and max(d.longest_over_budget_s for d in result.power) <= 5.0
    assert all(d.capped_share["High"] == 0 < d.capped_share["Low"] for d in result.power)


def test_the_controller_takes_low_priority_first(monkeypatch):
    """Every period the controller caps, it caps a high-priority worker only when every
    low-priority worker that could give a step (drawing above the floor) is capped too, and
    only at the emergency threshold or over the budget."""
    periods: list[tuple[set[str], set[str], bool]] = []   # (low with room, changed, any high changed)
    decide = controllers_power.decide

    def watching(budget, reading, workers, state, now, settings=controllers_power.Settings()):
        d = decide(budget, reading, workers, state, now, settings)
        if d.situation in ("capping", "emergency") and d.changes:
            room = {w.name for w in workers if w.priority == "Low"
                    and min(w.drawn_watts or 0, w.cap_watts or 1e9) > budget.min_gpu_cap_watts + 1}
            high = {w.name for w in workers if w.priority == "High"}
            changed = {c.worker for c in d.changes}
            periods.append((room, changed, bool(changed & high)))
            assert d.situation == "emergency" or not changed & high, d.summary
        return d
    monkeypatch.setattr(controllers_power, "decide", watching)
    run_simulation(fleet(2.0))
    assert periods and any(room for room, _, _ in periods)
    assert all(room <= changed for room, changed, high in periods if high)


def test_the_simulator_calls_the_controllers_own_power_module(monkeypatch):
    assert sim_power.power is controllers_power
    calls = []
    decide = controllers_power.decide
    monkeypatch.setattr(controllers_power, "decide", lambda *a, **k: calls.append(a[0]) or decide(*a, **k))
    config = fleet(1.0, duration=30)
    sim = build(config)
    sim.run(requests_for(config))
    assert sim.power is not None and sim.now > 30
    assert len(calls) == len(sim.power.domains) * int(sim.now // 5)   # every domain, every 5 s until the last token


def test_the_oversubscription_study_grows_the_fleet_inside_one_budget():
    base = fleet(1.0, duration=60)
    bigger = grown(base, 1.5)
    assert [p.count for p in bigger.pools] == [9, 3, 14, 4] and bigger.poisson_rate == pytest.approx(0.18 * 120)
    # the same two domains and budgets, with the nodes of 120 GPUs spread over them
    assert bigger.layout.domain_watts == pytest.approx(5 * 8 * 700) and bigger.layout.nodes_per_domain == 8
    out = study(base, [1.5, 2.5], controllers=("fleetwise", "none"))
    assert out.domains == 2 and out.budget_watts == pytest.approx(5 * 8 * 700)
    rows = {(r.ratio, r.controller): r for r in out.rows}
    # the loss is against the same grown row with no controller: none loses nothing by definition
    assert rows[(2.5, "none")].ttft_p99_loss == 0 and rows[(2.5, "none")].tbt_p99_loss == 0
    assert rows[(2.5, "none")].longest_over_budget_s > out.period_s and not rows[(2.5, "none")].holds
    assert rows[(1.5, "none")].holds and out.added_servers["none"] == pytest.approx(0.5)
    assert rows[(2.5, "none")].peak_of_budget > 1.0 > rows[(1.5, "none")].mean_of_budget > 0.3


def test_the_study_gives_the_same_rows_with_its_runs_in_parallel_processes():
    base = fleet(1.0, duration=30)
    one, two = (study(base, [2.0], controllers=("fleetwise", "none"), jobs=j) for j in (1, 2))
    assert one == two and one.rows[0].cap_changes > 0


def test_a_bad_power_setting_is_refused_by_name():
    with pytest.raises(ValueError, match=r"power\.controller"):
        PowerConfig(controller="magic")
    with pytest.raises(ValueError, match="priority"):
        build(SimConfig([PoolConfig("mixed", 1, priority="urgent")], mode="colocated"))


def test_the_study_and_a_run_draw_their_plots(tmp_path):
    from fleetwise.sim.plots import result_plot, study_plot

    out = study(fleet(1.0, duration=30), [1.5], controllers=("fleetwise",))
    assert study_plot(out.rows, tmp_path / "study.png") == f"wrote {tmp_path / 'study.png'}"
    result = run_simulation(fleet(2.0, duration=30)).to_json()
    assert result_plot(result, tmp_path / "run.png") == f"wrote {tmp_path / 'run.png'}"
    for name in ("study.png", "run.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
