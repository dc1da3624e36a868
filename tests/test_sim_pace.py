"""A worker's measured pace in the simulator: the factor of each window from traced steps (their
wall time and the loop's time between steps while work was left, over their CPU time), played
as a changing slow-down; and a prompt that reaches a busy worker waits for the running step."""

import pytest

from fleetwise import gpus
from fleetwise.sim import pace
from fleetwise.sim.calibration import StepProfile
from fleetwise.sim.engine import Settings, Simulation
from fleetwise.sim.trace import Request
from fleetwise.sim.workers import Pool


def step(t: float, wall: float, cpu: float, left: int = 1) -> dict[str, float]:
    return {"t": t, "s": wall, "cpu": cpu, "p": 0, "d": 1, "c": 10, "left": left}


def test_a_windows_pace_is_its_steps_wall_and_busy_gaps_over_their_cpu():
    steps = [step(0.0, 0.2, 0.1), step(0.3, 0.2, 0.1, left=0),   # 0.1 s to the next step counts; then idle
             step(1.5, 0.4, 0.1), step(1.9, 0.4, 0.1, left=0),   # 0.8 s wall for 0.2 s CPU
             step(4.2, 0.001, 0.001)]                           # too little CPU to tell: the whole run's pace
    p = pace.windows(steps, 1.0)
    assert p.factors[0] == pytest.approx(0.5 / 0.2)
    assert p.factors[1] == pytest.approx(0.8 / 0.2)
    overall = (0.5 + 0.8 + 0.001) / 0.401
    assert p.overall == pytest.approx(overall)
    assert p.factors[2] == p.factors[3] == p.factors[4] == pytest.approx(overall)
    assert p.at(-1.0) == p.at(99.0) == pytest.approx(overall)
    assert pace.windows([], 1.0).at(0.0) == 1.0
    with pytest.raises(ValueError, match="window_s"):
        pace.windows(steps, 0.0)


PROFILE = StepProfile("tiny", overhead_ms=10.0, ms_per_prompt_token=0.0, ms_per_decode=0.0, ms_per_context_token=0.0,
                      kv_capacity_tokens=100_000, kv_bytes_per_token=64)


def simulation() -> Simulation:
    return Simulation([(Pool("m", "mixed", gpus.product("H100"), PROFILE.perf_model()), 1)],
                      Settings(prompt_budget=4096, max_batch=8))


def test_a_decode_runs_at_each_windows_pace():
    sim = simulation()
    sim.tickers.append(pace.Pacer(sim, [pace.Pace(1.0, (1.0, 3.0), 3.0)]).tick)
    # the prompt pass 0.01 s, then 10 ms steps until 1 s (99 tokens), 30 ms steps after (past the
    # last window: the whole run's pace)
    (f,) = sim.run([Request(0, 0.0, 1, 200)])
    assert f.first_token == pytest.approx(0.01)
    assert f.done == pytest.approx(1.0 + (199 - 99) * 0.03, rel=1e-6)


def test_a_prompt_reaching_a_busy_worker_waits_for_the_running_step():
    sim = simulation()
    # one sequence decodes in 10 ms steps from 0.01 s; the prompt comes 4 ms into a step
    flights = sim.run([Request(0, 0.0, 1, 50), Request(1, 0.054, 1, 2)])
    late = next(f for f in flights if f.req.id == 1)
    assert late.first_token == pytest.approx(0.06 + 0.01)


def test_a_step_pace_is_each_steps_own_wall_over_cpu_and_the_windows_between():
    steps = [step(0.0, 0.1, 0.05), step(0.15, 0.2, 0.05, left=0),   # busy to the next step: 0.15 / 0.05
             step(3.0, 0.4, 0.1)]
    p = pace.per_step(steps, 1.0)
    windows = pace.windows(steps, 1.0)
    assert p.at(0.05) == pytest.approx(3.0)
    assert p.at(0.2) == pytest.approx(4.0)          # its own wall: idle after it
    assert p.at(0.5) == windows.at(0.5)             # the engine idle: the window's pace
    assert p.at(3.2) == pytest.approx(4.0)
    assert p.next_change(0.05) == pytest.approx(0.15)
    assert p.next_change(0.5) == pytest.approx(1.0)  # the window's end comes before the next step
    # 0.1 s of work from 0.1: 0.05 s at 3, 0.2 s at 4, the rest at the window's pace
    rest = 0.1 - 0.05 / 3.0 - 0.2 / 4.0
    assert p.wall_for(0.1, 0.1) == pytest.approx(0.05 + 0.2 + rest * windows.at(0.5))


def test_a_prompt_pass_takes_the_pace_of_every_moment_it_spans():
    sim = simulation()
    # a lone 10 ms prompt pass from 0.995: 5 ms of work at pace 1, the other 5 ms at pace 3
    sim.tickers.append(pace.Pacer(sim, [pace.Pace(1.0, (1.0, 3.0), 3.0)]).tick)
    (f,) = sim.run([Request(0, 0.995, 1, 1)])
    assert f.first_token == pytest.approx(1.0 + 0.005 * 3.0)
