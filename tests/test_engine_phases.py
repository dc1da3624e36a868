"""The engine's phase clock: off by default; attached, it splits each step into scheduling,
input preparation, the forward pass alone and sampling, which together stay within the step."""

from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.phases import PHASES, attach, detach
from fleetwise.worker.engine.sequence import SamplingParams


def _drain(engine: LLMEngine) -> tuple[float, float]:
    """Steps until done; the engine's own step and "forward" (the runner's whole call) seconds, summed."""
    step = run = 0.0
    while engine.has_work():
        engine.step()
        step += engine.last_step_seconds
        run += engine.last_step_forward_seconds
    return step, run


def test_the_phases_split_a_step_and_cost_nothing_when_off(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    assert engine.runner.clock is None and engine.scheduler.clock is None  # off by default

    clock = attach(engine)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(1, 30 + i)), SamplingParams(max_tokens=5, temperature=0.0,
                                                                            ignore_eos=True))
    stepped, run = _drain(engine)
    seconds = clock.snapshot()
    assert set(seconds) == set(PHASES) and all(seconds[p] > 0 for p in PHASES), seconds
    assert sum(seconds.values()) <= stepped
    # the runner's call is preparation, the forward pass and sampling: the forward pass alone is less
    assert seconds["prepare"] + seconds["forward"] + seconds["sample"] <= run

    detach(engine)
    engine.add_request("after", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    _drain(engine)
    assert clock.snapshot() == seconds  # detached: nothing more is timed
