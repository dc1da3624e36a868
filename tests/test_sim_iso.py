"""Phase splitting at iso-power in the simulator: the objectives' reference is the simulator's
own time for a request alone, and the search's answer is a rate that meets them with the next
rate tried above it failing."""

import pytest
from typer.testing import CliRunner

from fleetwise.cli import app
from fleetwise.sim.iso import IsoConfig, _Search, context_free, fleet, iso_power, simulation, slowdowns
from fleetwise.sim.perf import PROFILE_CONTEXT, perf_model
from fleetwise.sim.run import build
from fleetwise.sim.trace import Request


@pytest.mark.parametrize("prompt_machines", [0, 2])
def test_a_request_alone_is_its_own_reference(prompt_machines):
    config = IsoConfig(machines=4)
    flights = build(fleet(config, prompt_machines)).run([Request(0, 0.0, 1000, 50)])
    s = slowdowns(flights, config)
    assert s["ttft"][0] == pytest.approx(1.0, rel=1e-6)
    # one token step at the mean context, against the simulator's growing context (and, split, the KV handoff)
    assert s["tbt"][0] == pytest.approx(1.0, abs=0.05) and s["e2e"][0] == pytest.approx(1.0, abs=0.05)


def test_context_free_token_steps_are_the_profiles_by_batch_alone():
    perf = perf_model("A100", "bloom-176b", 8)
    flat = context_free(perf)
    for batch in (1, 8, 32):
        assert flat.token_ms(batch, 0) == pytest.approx(perf.token_ms(batch, batch * PROFILE_CONTEXT))
        assert flat.token_ms(batch, 10**6) == flat.token_ms(batch, 0) < perf.token_ms(batch, 10**6)
    config = IsoConfig(machines=4, context_free=True)
    sim = simulation(config, 2)
    assert all(w.kv_s == 0 for w in sim.workers)
    s = slowdowns(sim.run([Request(0, 0.0, 1000, 50)]), config)
    assert s["tbt"][0] == pytest.approx(1.0, abs=0.05)


def test_the_search_answers_a_rate_that_meets_the_objectives_below_one_that_fails():
    config = IsoConfig(machines=6, trial_s=30, rate_lo=0.5, rate_hi=40, steps=4, splits=[3])
    result = iso_power(config)
    assert 0.5 <= result.baseline_rate < 40 and 0.5 <= result.split_rate < 40
    for name, rate in (("Baseline-A100", result.baseline_rate), ("Splitwise-AA 3P/3T", result.by_split[3])):
        mine = [t for t in result.trials if t.fleet == name]
        assert any(t.rate == rate and t.meets for t in mine)
        assert all(not t.meets for t in mine if t.rate > rate)
    assert result.ratio == pytest.approx(result.split_rate / result.baseline_rate)
    assert _Search(config, None).trial(0, 100.0) is False   # far past what six machines carry


def test_the_sim_commands_refuse_a_bad_controller_and_run_iso_on_a_small_fleet(tmp_path):
    bad = CliRunner().invoke(app, ["sim", "power", "sim/examples/power-row.yaml", "--controllers", "magic"])
    assert bad.exit_code == 2 and "--controllers" in bad.output
    ok = CliRunner().invoke(app, ["sim", "iso", "--machines", "4", "--trial-s", "20", "--out", str(tmp_path / "i.json"),
                                  "--plot", str(tmp_path / "i.png")])
    assert ok.exit_code == 0, ok.output
    assert "Baseline-A100" in ok.output and (tmp_path / "i.json").exists() and (tmp_path / "i.png").exists()
