"""The goodput benchmark's workload and verdict: every system gets the same arrivals and
lengths with words of its own, popularity is Zipf, and the ratio is taken against the best
baseline at each load with the spread stated."""

import numpy as np

from fleetwise.bench.goodput.load import SLO, Outcome
from fleetwise.bench.goodput.report import System, build_report
from fleetwise.bench.goodput.workload import Shape, read_code_lengths, turn_requests, zipf_weights


def test_systems_get_the_same_arrivals_and_lengths_but_their_own_words():
    shape, lengths = Shape(), read_code_lengths()
    a = turn_requests(shape, lengths, 2.0, 60.0, 0, turn=3, words=0)
    b = turn_requests(shape, lengths, 2.0, 60.0, 0, turn=3, words=1)
    assert 80 < len(a) < 160 and len(a) == len(b)
    assert [(x.at, x.rank, x.max_tokens, x.prompt_words) for x in a] == \
           [(y.at, y.rank, y.max_tokens, y.prompt_words) for y in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    same = [x.prompt.split("\nuser: ")[0] for x in a if x.rank == 0]
    assert len(set(same)) == 1          # one system prompt per rank within a system's turn
    other_turn = turn_requests(shape, lengths, 2.0, 60.0, 0, turn=4, words=0)
    assert [x.at for x in other_turn] != [x.at for x in a]


def test_popularity_is_zipf_and_lengths_stay_in_their_bounds():
    shape, lengths = Shape(), read_code_lengths()
    reqs = turn_requests(shape, lengths, 50.0, 60.0, 1, turn=1, words=0)
    share = np.bincount([r.rank for r in reqs], minlength=shape.system_prompts) / len(reqs)
    assert np.allclose(share, zipf_weights(shape.system_prompts, shape.zipf_s), atol=0.03)
    assert all(shape.output_tokens[0] <= r.max_tokens <= shape.output_tokens[1] for r in reqs)
    longest = shape.system_words[1] + shape.suffix_words[1] + 4
    assert all(r.prompt_words <= longest for r in reqs)


def _system(key, goodputs):
    s = System(key, "", None)  # type: ignore[arg-type]  # no process: the report reads numbers only
    s.init(1)
    slo = SLO(1.0, 0.1)
    for g in goodputs:
        met = [Outcome(0, ok=True, ttft_s=0.5, tpot_s=0.05, tokens=2)] * g
        missed = [Outcome(0, ok=True, ttft_s=3.0, tpot_s=0.05, tokens=2)] * (10 - g)
        s.add(0, met + missed, 10.0, slo, 10.0)
    return s


def test_the_ratio_is_against_the_best_baseline_and_says_whether_it_beats_the_spread():
    systems = [_system("fleetwise/prefix_load", [9, 8, 9]), _system("vllm-router/cache_aware", [6, 7, 5]),
               _system("vllm-router/round_robin", [7, 7, 6])]
    r = build_report(systems, [1.0], [1.0], 10.0, 3, SLO(1.0, 0.1), Shape(), 0.2, {}, {})
    row = r["ratios"][0]["fleetwise/prefix_load"]
    assert row["vs"] == "vllm-router/round_robin"        # its median 0.7 beats cache_aware's 0.6
    assert abs(row["ratio"] - 0.9 / 0.7) < 1e-9 and row["met"] and row["beyond_spread"]
    assert r["systems"]["fleetwise/prefix_load"][0]["slo_attainment"] == 0.9


def test_the_modelled_workload_fits_the_context_and_outgrows_one_workers_cache():
    from fleetwise.bench.goodput.run import FLEETS, MODELLED_FORWARD, MODELLED_GPU, run_goodput_bench
    from fleetwise.sim.perf import perf_model
    from fleetwise.worker.engine.modelled_device import parse_forward
    kind = FLEETS["modelled"]
    reqs = turn_requests(kind.shape, read_code_lengths(), 20.0, 60.0, 0, turn=1, words=0)
    assert kind.context is not None
    assert max(r.prompt_words + r.max_tokens for r in reqs) + 16 < kind.context
    systems = {r.prompt.split("\nuser: ")[0] for r in reqs}
    kv = perf_model(MODELLED_GPU, *parse_forward(MODELLED_FORWARD)).kv_capacity_tokens
    assert kv < sum(len(s.split()) for s in systems) < 4 * kv   # routing decides what the caches hold
    import pytest
    with pytest.raises(ValueError, match="fleet must be one of"):
        run_goodput_bench(fleet_kind="gpu")


def test_the_report_says_which_target_each_missed_request_missed():
    s = System("fleetwise/prefix_load", "", None)  # type: ignore[arg-type]
    s.init(1)
    s.add(0, [Outcome(0, ok=True, ttft_s=2.0, tpot_s=0.05, tokens=3), Outcome(0, ok=True, ttft_s=0.2, tpot_s=0.5,
                                                                             tokens=3),
              Outcome(0, ok=True, ttft_s=0.2, tpot_s=0.05, tokens=3)], 1.0, SLO(1.0, 0.1), 1.0)
    at = s.at(0)
    assert (at["missed_ttft"], at["missed_tpot_only"], at["goodput_rps"]["median"]) == (1, 1, 1.0)
