"""The engine's step trace (FLEETWISE_STEP_TRACE): off by default; on, one line per step with its
makeup as the scheduler made it, its wall and CPU time, what was left, and the first tokens it
made with when their requests came in."""

from fleetwise.worker.engine import step_trace
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams


def test_each_step_is_traced_with_its_makeup_times_and_first_tokens(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(step_trace.ENV, str(tmp_path / "steps"))
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("a", list(range(5, 15)), params)
    engine.add_request("b", list(range(20, 26)), params)
    while engine.has_work():
        engine.step()
    (path,) = (tmp_path / "steps").iterdir()
    steps = step_trace.read(path)
    assert [(s["p"], s["d"], s["c"], s["left"]) for s in steps] == [(16, 0, 0, 2), (0, 2, 11 + 7, 2), (0, 2, 12 + 8, 0)]
    assert [s["a"] for s in steps] == [10 * 10 + 6 * 6, 0, 0]
    assert [rid for rid, _ in steps[0]["first"]] == ["a", "b"] and "first" not in steps[1]
    came = steps[0]["first"][0][1]
    assert came <= steps[0]["t"] <= steps[1]["t"] <= steps[2]["t"]
    assert all(s["s"] > 0 and s["cpu"] > 0 for s in steps)


def test_without_the_variable_nothing_is_traced(tiny_model_dir, monkeypatch):
    monkeypatch.delenv(step_trace.ENV, raising=False)
    assert LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu")).step_trace is None
