"""Sampling: distributions, filters, penalties, seeds, stop conditions, n > 1."""

import pytest
import torch

from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.runner import sampling_metadata
from fleetwise.worker.engine.sequence import SamplingParams, Sequence
from fleetwise.worker.model.sampler import apply_penalties, sample

V = 6
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draw(params: SamplingParams, rows: int = 20000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    seqs = [Sequence([1, 2, 3], params) for _ in range(rows)]
    meta = sampling_metadata(seqs, V, torch.device("cpu"))
    tokens = sample(LOGITS.expand(rows, V).clone(), meta).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=V).float() / rows


def test_plain_sampling_follows_softmax():
    freq = draw(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, LOGITS.softmax(-1), atol=0.015)
    hot = draw(SamplingParams(temperature=2.0))
    assert torch.allclose(hot, (LOGITS / 2).softmax(-1), atol=0.015)


def test_top_k_top_p_min_p_restrict_and_renormalise():
    p = LOGITS.softmax(-1)
    freq = draw(SamplingParams(temperature=1.0, top_k=2))
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], p[:2] / p[:2].sum(), atol=0.015)
    # the smallest set whose probability reaches top_p: tokens 0 and 1 (p0 < 0.6 <= p0 + p1)
    assert p[0] < 0.6 <= p[0] + p[1]
    freq = draw(SamplingParams(temperature=1.0, top_p=0.6))
    assert freq[2:].sum() == 0 and freq[1] > 0.2
    freq = draw(SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.2 * p0
    kept = p >= 0.2 * p[0]
    assert freq[~kept].sum() == 0 and (freq[kept] > 0).all()


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    seqs = [Sequence([1], SamplingParams(temperature=0.0)), Sequence([1], SamplingParams(temperature=5.0))] * 50
    meta = sampling_metadata(seqs, V, torch.device("cpu"))
    tokens = sample(LOGITS.expand(100, V).clone(), meta).token_ids
    assert tokens[0::2] == [0] * 50
    assert len(set(tokens[1::2])) > 1


def test_penalties_arithmetic():
    seq = Sequence([1, 1, 2], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    seq.append_token(3)
    seq.append_token(3)
    seq.append_token(0)
    meta = sampling_metadata([seq], V, torch.device("cpu"))
    out = apply_penalties(LOGITS[None].clone(), meta)[0]
    expected = LOGITS.clone()
    for t in (0, 1, 2, 3):  # seen in prompt or output: divided if positive, multiplied if not
        expected[t] = expected[t] / 2 if expected[t] > 0 else expected[t] * 2
    expected[3] -= 0.5 + 2 * 0.25  # output twice
    expected[0] -= 0.5 + 1 * 0.25  # output once
    assert torch.allclose(out, expected)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), block_size=8, num_blocks=400))


def generate(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[tuple[str, int], dict] = {}
    while engine.has_work():
        for o in engine.step():
            d = outs.setdefault((o.request_id, o.index), {"tokens": [], "text": "", "reason": None})
            d["tokens"] += o.token_ids
            d["text"] += o.text
            if o.finished:
                d["reason"] = o.finish_reason
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return outs


def test_seeded_requests_repeat_in_any_batch(engine):
    prompt = [0] + list(range(30, 70))
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    alone = generate(engine, {"a": (prompt, params)})[("a", 0)]["tokens"]
    others = {f"o{i}": ([0] + list(range(i, i + 20 + i)), SamplingParams(max_tokens=15, temperature=1.0))
              for i in range(8)}
    together = generate(engine, {"a": (prompt, params), **others})[("a", 0)]["tokens"]
    assert together == alone
    other_seed = generate(engine, {"b": (prompt, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9,
                                                                seed=12, ignore_eos=True))})[("b", 0)]["tokens"]
    assert other_seed != alone


def test_stop_strings_and_stop_tokens(engine):
    prompt = engine.tokenizer.encode("the router hands prompts to")
    base = generate(engine, {"x": (prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))})[("x", 0)]
    text, tokens = base["text"], base["tokens"]
    assert base["reason"] == "length" and len(text) > 12
    stop = text[8:11]
    cut = generate(engine, {"y": (prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                         stop=[stop, "\x00never"]))})[("y", 0)]
    assert cut["reason"] == "stop" and cut["text"] == text[:text.index(stop)]
    stop_token = tokens[5]
    first = tokens.index(stop_token)
    by_token = generate(engine, {"z": (prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                              stop_token_ids=[stop_token]))})[("z", 0)]
    assert by_token["reason"] == "stop" and by_token["tokens"] == tokens[:first + 1]
    assert by_token["text"] == engine.tokenizer.decode(tokens[:first])


def test_n_choices_share_the_prompt_blocks(engine):
    prompt = [0] + list(range(100, 180))  # 81 tokens: 10 full blocks of 8
    bm = engine.block_manager
    hits = bm.prefix_hits
    outs = generate(engine, {"n": (prompt, SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=3,
                                                          ignore_eos=True))})
    assert sorted(i for _, i in outs) == [0, 1, 2, 3]
    assert all(len(o["tokens"]) == 10 for o in outs.values())
    assert bm.prefix_hits - hits >= 3 * 80, "the three siblings should reuse the first one's prompt blocks"
    assert len({tuple(o["tokens"]) for o in outs.values()}) > 1


def test_invalid_sampling_params_are_refused():
    for kwargs, word in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
                         ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"),
                         ({"n": 0}, "n"), ({"presence_penalty": 3}, "presence_penalty"),
                         ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"),
                         ({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
                         ({"min_p": float("nan")}, "min_p"), ({"repetition_penalty": float("inf")}, "repetition"),
                         ({"presence_penalty": float("nan")}, "presence"), ({"frequency_penalty": float("-inf")},
                                                                            "frequency"),
                         ({"seed": 1 << 63}, "seed"), ({"seed": -(1 << 63) - 1}, "seed")]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kwargs)


def test_the_engine_bounds_logprobs_by_its_max_logprobs(engine):
    from fleetwise.worker.engine.engine import RequestError
    assert engine.config.max_logprobs == 20  # vLLM's default
    engine.validate([1, 2], SamplingParams(logprobs=20))
    with pytest.raises(RequestError, match="at most 20") as e:
        engine.validate([1, 2], SamplingParams(logprobs=21))
    assert e.value.param == "logprobs"


def test_a_tiny_temperature_is_raised_to_vllms_floor():
    assert SamplingParams(temperature=1e-300).temperature == 1e-2
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=0.5).temperature == 0.5
