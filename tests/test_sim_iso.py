"""Phase splitting at iso-power in the simulator: the objectives' reference is the simulator's
own time for a request alone, and the search's answer is a rate that meets them with the next
rate tried above it failing."""

import math

import pytest
from typer.testing import CliRunner

from fleetwise.cli import app
from fleetwise.sim.iso import IsoConfig, _Search, context_free, fleet, iso_power, meets, simulation, slowdowns
from fleetwise.sim.perf import PROFILE_CONTEXT, perf_model, splitwise_sim_kv_capacity, splitwise_sim_model
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


def test_splitwise_sims_step_times_are_its_profile_read_by_batched_prompt_tokens():
    """SplitwiseSim keys token times by batch x prompt size and reads them at the batch size:
    512 sequences cost within 4% of one; prompt passes extrapolate linearly below 128 tokens."""
    sw = splitwise_sim_model("A100", "bloom-176b", 8)
    assert sw.kv_ms_per_token == 0 and sw.token_ms(512, 10**6) < 1.04 * sw.token_ms(1, 0)
    assert perf_model("A100", "bloom-176b", 8).token_ms(32, 32 * PROFILE_CONTEXT) > 1.3 * sw.token_ms(32, 0)
    (x0, y0), (x1, y1), (x2, y2) = sw.prompt_points[:3]
    assert x0 == 1 and (y1 - y0) / (x1 - x0) == pytest.approx((y2 - y1) / (x2 - x1))
    assert splitwise_sim_kv_capacity("bloom-176b", 8) > perf_model("A100", "bloom-176b", 8).kv_capacity_tokens


def test_splitwise_sim_objectives_use_its_fixed_reference_and_strict_bounds():
    config = IsoConfig(machines=4, objectives="splitwise-sim", step_times="splitwise-sim")
    s = slowdowns(simulation(config, 2).run([Request(0, 0.0, 1000, 50)]), config)
    assert s["ttft"][0] == pytest.approx(1.0, rel=1e-6)
    # its reference time per token is the token curve read at the prompt size (1000: 49.4 ms), a step alone 47.5 ms
    assert 0.9 < s["tbt"][0] < 0.99
    at_bound = {"ttft": [2.0, 1, 1], "tbt": [1, 1, 1], "e2e": [1, 1, 1]}
    assert meets(at_bound, IsoConfig()) and not meets(at_bound, config)
    with pytest.raises(ValueError, match="objectives"):
        IsoConfig(objectives="paper")


def test_splitwise_sim_batching_times_a_pass_with_decodes_over_both_and_routes_by_pending_tokens():
    config = IsoConfig(machines=2, step_times="splitwise-sim", batching="splitwise-sim", routing="splitwise-sim")
    sw = splitwise_sim_model("A100", "bloom-176b", 8)
    # A runs alone on machine 0 and decodes; B (prompt 8000) and C, D (short) come while it does
    reqs = [Request(0, 0.0, 100, 400), Request(1, 1.0, 8000, 5), Request(2, 1.001, 10, 5), Request(3, 1.002, 10, 5)]
    flights = {f.req.id: f for f in simulation(config, 0).run(reqs)}
    assert flights[1].prefill is not flights[0].prefill          # B to the idle machine
    assert flights[2].prefill is flights[0].prefill              # C: one request each, fewer tokens pending on A's
    assert flights[3].prefill is flights[0].prefill              # D: two requests there, but 110 pending tokens to 8000
    # C's pass begins when A's running step ends, takes D too and carries A's decode: a prompt pass
    # over 10 + 10 + 1 tokens, 1.1 times as long
    first, step = sw.prompt_ms(100) / 1e3, sw.token_ms(1, 0) / 1e3
    step_ends = first + math.ceil((1.001 - first) / step) * step
    assert flights[2].first_token == pytest.approx(step_ends + sw.prompt_ms(21) * 1.1 / 1e3, rel=1e-9)
    ours = {f.req.id: f for f in simulation(IsoConfig(machines=2), 0).run(reqs)}
    assert ours[3].prefill is ours[1].prefill                      # fewest outstanding requests: B's machine


def test_sim_iso_names_a_bad_definition():
    bad = CliRunner().invoke(app, ["sim", "iso", "--machines", "4", "--step-times", "magic"])
    assert bad.exit_code == 2 and "--step-times" in bad.output
    bad = CliRunner().invoke(app, ["sim", "iso", "--machines", "4", "--splits", "2,9"])
    assert bad.exit_code == 2 and "--splits" in bad.output
