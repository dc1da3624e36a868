"""Greedy tokens of the core equal those of Hugging Face transformers on the same files,
alone and in a batch that forces prefix caching, chunked prefill and preemption."""

import random

import pytest
import torch

from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams
from fleetwise.worker.model.files import write_model

from .reference import Reference


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got = {rid: [] for rid in requests}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
        steps += 1
        assert steps < 100_000
    return got


def assert_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.requests


def mixed_requests(seed: int, count: int, vocab: int, max_prompt: int, max_out: int):
    """Prompts of mixed lengths; half share one of a few long prefixes (prefix cache hits)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(5, vocab) for _ in range(rng.randint(20, 60))] for _ in range(3)]
    requests = {}
    for i in range(count):
        body = [rng.randrange(5, vocab) for _ in range(rng.randint(1, max_prompt))]
        prompt = [0] + (rng.choice(prefixes) if i % 2 else []) + body
        requests[f"r{i}"] = (prompt, SamplingParams(max_tokens=rng.randint(1, max_out), temperature=0.0))
    return requests


def test_single_requests_match_reference(tiny_model_dir, reference):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    rng = random.Random(1)
    for i in range(6):
        prompt = [0] + [rng.randrange(5, 500) for _ in range(rng.randint(1, 200))]
        n = rng.randint(1, 48)
        got = run_all(engine, {f"s{i}": (prompt, SamplingParams(max_tokens=n, temperature=0.0))})[f"s{i}"]
        reference.assert_same_greedy(prompt, reference.greedy(prompt, n), got, f"request {i}")
    assert_no_leak(engine)


def test_64_concurrent_requests_with_prefix_cache_chunking_and_preemption(tiny_model_dir, reference):
    # 60 blocks of 4 tokens cannot hold 64 running sequences: preemption is forced;
    # a 48-token budget splits every long prompt into chunks
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), block_size=4, num_blocks=60,
                                    max_num_batched_tokens=48, max_num_seqs=64))
    requests = mixed_requests(seed=2, count=64, vocab=500, max_prompt=120, max_out=40)
    got = run_all(engine, requests)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert engine.block_manager.prefix_hits > 0, "shared prefixes were meant to hit the cache"
    for rid, (prompt, params) in requests.items():
        reference.assert_same_greedy(prompt, reference.greedy(prompt, params.max_tokens), got[rid], rid)
    assert_no_leak(engine)


def test_batching_does_not_change_tokens(tiny_model_dir):
    """The same requests alone and all together, with a roomy and a tiny pool."""
    requests = mixed_requests(seed=3, count=24, vocab=500, max_prompt=80, max_out=24)
    alone = {}
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), enable_prefix_caching=False))
    for rid, req in requests.items():
        alone.update(run_all(engine, {rid: req}))
    tight = LLMEngine(EngineConfig(model=str(tiny_model_dir), block_size=8, num_blocks=30,
                                   max_num_batched_tokens=32))
    together = run_all(tight, requests)
    assert together == alone
    assert tight.scheduler.num_preemptions > 0
    assert_no_leak(tight)


@pytest.mark.parametrize("overrides", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"tie_word_embeddings": True, "num_key_value_heads": 4},
], ids=["llama3-rope", "linear-rope", "tied-mha"])
def test_config_variants_match_reference(tmp_path, overrides):
    model_dir = write_model(tmp_path / "variant", "tiny", seed=5, **overrides)
    ref = Reference(model_dir)
    engine = LLMEngine(EngineConfig(model=str(model_dir), block_size=8, max_num_batched_tokens=40))
    requests = mixed_requests(seed=4, count=8, vocab=500, max_prompt=150, max_out=20)
    got = run_all(engine, requests)
    for rid, (prompt, params) in requests.items():
        ref.assert_same_greedy(prompt, ref.greedy(prompt, params.max_tokens), got[rid], rid)


def test_logprobs_match_reference(tiny_model_dir, reference):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    prompt = [0] + list(range(40, 90))
    engine.add_request("lp", prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    ref = reference.logits(prompt + tokens).log_softmax(-1)
    for i, (chosen, top) in enumerate(logprobs):
        row = ref[len(prompt) - 1 + i]
        assert chosen == pytest.approx(float(row[tokens[i]]), abs=1e-4)
        ref_top = row.topk(3)
        assert [t for t, _ in top] == ref_top.indices.tolist()
        assert [v for _, v in top] == pytest.approx(ref_top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_reference(tiny_model_dir, reference, dtype):
    """Half precision cannot match float32 token for token; its logits must stay close."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype=dtype))
    prompt = [0] + list(range(100, 160))
    engine.add_request("h", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    out = engine.step()[0]
    _chosen, top = out.logprobs[0]
    ref = reference.logits(prompt)[-1].log_softmax(-1)
    assert out.token_ids[0] in ref.topk(3).indices.tolist()
    for token, value in top:
        assert value == pytest.approx(float(ref[token]), abs=0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference(tiny_model_dir, reference):
    """The CUDA path: float32 gives the reference's tokens; bfloat16 stays close in logits."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="float32",
                                    block_size=8, num_blocks=80, max_num_batched_tokens=64))
    requests = mixed_requests(seed=6, count=32, vocab=500, max_prompt=100, max_out=24)
    got = run_all(engine, requests)
    for rid, (prompt, params) in requests.items():
        reference.assert_same_greedy(prompt, reference.greedy(prompt, params.max_tokens), got[rid], rid)
    assert_no_leak(engine)
    bf16 = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16"))
    prompt = [0] + list(range(100, 160))
    bf16.add_request("h", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    _, top = bf16.step()[0].logprobs[0]
    ref = reference.logits(prompt)[-1].log_softmax(-1)
    for token, value in top:
        assert value == pytest.approx(float(ref[token]), abs=0.15)
