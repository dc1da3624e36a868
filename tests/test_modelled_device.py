"""The modelled device: the real engine (scheduler, paged blocks, prefix cache, batching) with
each step waiting out the performance model's time instead of a forward pass."""

import time

import pytest

from fleetwise.sim.perf import perf_model
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.modelled_device import ModelledRunner, parse_forward, step_seconds
from fleetwise.worker.engine.scheduler import ScheduledBatch
from fleetwise.worker.engine.sequence import SamplingParams, Sequence

PERF = perf_model("A100", "llama2-70b", 2)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), modelled_gpu="A100", modelled_forward="llama2-70b:tp2",
                                  **kw))


def _run(engine: LLMEngine, rid: str, prompt: list[int], max_tokens: int) -> list:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    outs = []
    while engine.has_work():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    return outs


def test_the_forward_spec_is_checked_and_names_what_is_wrong():
    assert parse_forward("llama2-70b:tp4") == ("llama2-70b", 4)
    for bad, why in (("llama3-8b:tp1", "model must be one of"), ("llama2-70b", "MODEL:tpN"),
                     ("llama2-70b:tp0", "MODEL:tpN"), ("llama2-70b:4", "MODEL:tpN")):
        with pytest.raises(ValueError, match=why):
            parse_forward(bad)


def test_a_step_costs_a_prompt_pass_or_a_token_step_as_the_performance_model_says():
    def seq(prompt: int, computed: int) -> Sequence:
        s = Sequence(list(range(1, prompt + 1)), SamplingParams(max_tokens=8))
        s.num_computed_tokens = computed
        return s
    prompt = ScheduledBatch([seq(1000, 0), seq(300, 0)], [1000, 300])
    assert step_seconds(PERF, prompt) == pytest.approx(PERF.prompt_ms(1300) / 1e3)
    decodes = ScheduledBatch([seq(500, 500), seq(700, 700)], [1, 1])
    assert step_seconds(PERF, decodes) == pytest.approx(PERF.token_ms(2, 501 + 701) / 1e3)
    assert step_seconds(PERF, prompt) > step_seconds(PERF, decodes) > 0.04


def test_the_engine_waits_out_the_modelled_time_and_its_prefix_cache_saves_it(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    assert isinstance(engine.runner, ModelledRunner)
    assert engine.block_manager.num_blocks == PERF.kv_capacity_tokens // engine.config.block_size
    shared = [(7 * i) % 200 + 3 for i in range(1, 400)]
    t0 = time.perf_counter()
    first = _run(engine, "a", shared + [11, 12, 13], 4)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = _run(engine, "b", shared + [21, 22, 23], 4)
    warm = time.perf_counter() - t0
    want_cold = (PERF.prompt_ms(402) + 3 * PERF.token_ms(1, 403)) / 1e3
    assert want_cold <= cold < want_cold + 0.25
    assert second[-1].num_cached_tokens >= 384 and first[-1].num_cached_tokens == 0
    assert warm < cold  # the cached prefix is not computed again
    tokens = [t for o in first for t in o.token_ids]
    assert len(tokens) == 4 and set(tokens) <= set(shared + [11, 12, 13])
    again = _engine(tiny_model_dir)
    assert [t for o in _run(again, "c", shared + [11, 12, 13], 4) for t in o.token_ids] == tokens  # deterministic


def test_a_step_asked_for_its_layers_reports_each_after_its_share_of_the_modelled_time(tiny_model_dir):
    """An early prefill's stream sends a layer once it is written: the modelled step tells
    of layer i no sooner than (i + 1) / layers of its time, in order, and takes no longer
    for being asked."""
    engine = _engine(tiny_model_dir)
    seq = Sequence(list(range(1, 1025)), SamplingParams(max_tokens=2))
    engine.block_manager.allocate(seq, 1024, [])
    batch = ScheduledBatch([seq], [1024])
    layers = engine.model_config.num_hidden_layers
    told: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    rows, out = engine.runner.run(batch, lambda i: told.append((i, time.perf_counter())))
    took = time.perf_counter() - t0
    step = step_seconds(PERF, batch)
    assert [i for i, _ in told] == list(range(layers)) and rows == [0] and out is not None
    assert all(at - t0 >= step * (i + 1) / layers for i, at in told)
    assert step <= took < step + 0.5


def test_num_blocks_overrides_the_modelled_kv_capacity_and_the_gpu_is_required(tiny_model_dir):
    assert _engine(tiny_model_dir, num_blocks=64).block_manager.num_blocks == 64
    with pytest.raises(ValueError, match="needs modelled_gpu"):
        LLMEngine(EngineConfig(model=str(tiny_model_dir), modelled_forward="llama2-70b:tp2"))


def test_the_worker_flag_is_checked_before_anything_starts(tiny_model_dir):
    from typer.testing import CliRunner

    from fleetwise.cli import app
    base = ["worker", "--model", str(tiny_model_dir), "--public-only"]
    r = CliRunner().invoke(app, [*base, "--modelled-forward", "llama2-70b:tp2"])
    assert r.exit_code == 2 and "--modelled-gpu" in r.output
    r = CliRunner().invoke(app, [*base, "--modelled-gpu", "A100", "--modelled-forward", "llama2-70b"])
    assert r.exit_code == 2 and "MODEL:tpN" in r.output


def test_a_modelled_worker_serves_the_api_and_reports_its_cache_in_metrics(tiny_model_dir):
    import httpx

    from .workers import start_worker_process
    w = start_worker_process(tiny_model_dir, "mixed", "--modelled-gpu", "A100", "--modelled-forward", "llama2-70b:tp2")
    try:
        prompt = "alpha beta gamma delta " * 30
        cached = []
        for i in range(2):
            r = httpx.post(w.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": prompt + f"question {i}", "max_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[0] == 0 and cached[1] > 100
        metrics = httpx.get(w.url + "/metrics", timeout=10).text
        hits = next(line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total"))
        assert float(hits.split()[-1]) == cached[1]
        assert 'modelName="NVIDIA A100-SXM4-80GB"' in metrics   # the modelled GPU's DCGM series
    finally:
        w.stop()


def test_the_fault_detectors_device_time_is_the_modelled_steps_and_a_slow_switch_adds_to_it(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    engine.add_request("a", list(range(3, 300)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # the prompt pass
    modelled = engine.runner.last_seconds
    assert modelled == pytest.approx(PERF.prompt_ms(297) / 1e3)
    assert engine.clock.stop() == modelled  # not the host's CPU time, which a sleep barely moves
    t0 = time.perf_counter()
    assert engine.clock.burn(0.05) == 0.05
    assert time.perf_counter() - t0 >= 0.05
