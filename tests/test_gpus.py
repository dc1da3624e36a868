"""The modelled GPU against the profile it comes from (data/splitwise-perf-model), and the
shape the power controller relies on: prompt power rises with batched tokens to the rating,
token power stays flat, a cap costs prompt steps far more than token steps."""

import csv
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from fleetwise import gpus

PROFILE = Path(__file__).resolve().parents[1] / "data" / "splitwise-perf-model" / "perf_model.csv"


@pytest.fixture(scope="module")
def profile():
    return list(csv.DictReader(PROFILE.open()))


def test_power_curve_is_the_profiles(profile):
    measured = [r for r in profile if float(r["peak_power"]) > 0]
    by_tokens = defaultdict(list)
    for r in measured:
        by_tokens[int(r["prompt_size"]) * int(r["batch_size"])].append(float(r["peak_power"]))
    assert {n for n, _ in gpus.PROMPT_POWER} == set(by_tokens)
    for tokens, fraction in gpus.PROMPT_POWER:
        assert fraction == pytest.approx(statistics.median(by_tokens[tokens]), abs=0.001), tokens
    median_average = statistics.median(float(r["average_power"]) for r in measured)
    assert median_average == pytest.approx(gpus.TOKEN_POWER, abs=0.001)


def test_cap_law_reproduces_the_power_capped_rows(profile):
    rows = defaultdict(dict)
    for r in profile:
        if r["hardware"].startswith("h100"):
            key = (r["model"], r["tensor_parallel"], r["prompt_size"], r["batch_size"])
            rows[key][r["hardware"]] = r
    ratios = [(float(v["h100-80gb-pcap"]["prompt_time"]) / float(v["h100-80gb"]["prompt_time"]),
               float(v["h100-80gb-pcap"]["token_time"]) / float(v["h100-80gb"]["token_time"]))
              for v in rows.values() if len(v) == 2]
    prompt, token = statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)
    h100 = gpus.PRODUCTS["H100"]
    assert gpus.stretch("prompt", h100.rated_watts, h100.rated_watts / 2) == pytest.approx(prompt, rel=0.01)
    token_step = gpus.step_demand_watts(h100, 0, 16)
    half_power_token = gpus.stretch("token", token_step, h100.rated_watts / 2)
    assert token == 1.0 and 1.0 < half_power_token < 1.02  # "barely changes token latency"


def test_prompt_power_rises_with_batched_tokens_to_the_rating_and_token_power_is_flat():
    h100 = gpus.PRODUCTS["H100"]
    rising = [gpus.step_demand_watts(h100, n, 0) for n in (1, 16, 64, 128, 300, 512, 1024)]
    assert rising == sorted(rising) and len(set(rising)) == len(rising)
    saturated = [gpus.step_demand_watts(h100, n, 0) / h100.rated_watts for n in (1024, 3000, 8192, 65536)]
    assert all(1.0 <= f <= 1.03 for f in saturated)
    token = {gpus.step_demand_watts(h100, 0, b) for b in (1, 8, 64, 256)}
    assert token == {gpus.TOKEN_POWER * h100.rated_watts}
    assert gpus.step_demand_watts(h100, 0, 0) == h100.idle_watts
    assert gpus.step_demand_watts(h100, 64, 32) == gpus.step_demand_watts(h100, 64, 0)  # a chunk sets the power


def test_a_cap_holds_the_draw_and_costs_prompts_more_than_tokens():
    a100 = gpus.PRODUCTS["A100"]
    prompt, token = gpus.step_demand_watts(a100, 2048, 0), gpus.step_demand_watts(a100, 0, 32)
    cap = 0.5 * a100.rated_watts
    assert gpus.drawn_watts(prompt, cap) == cap and gpus.drawn_watts(token, None) == token
    assert gpus.stretch("prompt", prompt, None) == gpus.stretch("token", token, token + 1) == 1.0
    assert gpus.stretch("prompt", prompt, cap) > 1.25 > 1.02 > gpus.stretch("token", token, cap) > 1.0


@pytest.mark.parametrize("label, family", [("NVIDIA-H100-80GB-HBM3", "H100"), ("NVIDIA-A100-SXM4-80GB", "A100"),
                                           ("NVIDIA-L40S", "L40S"), ("NVIDIA-L4", "L4"), ("H200", "H200"),
                                           ("Some-Future-GPU", "Some-Future-GPU")])
def test_products_from_node_labels(label, family):
    assert gpus.gpu_family(label) == family
    assert gpus.product(label).rated_watts == (gpus.PRODUCTS[family].rated_watts if family in gpus.PRODUCTS
                                               else gpus.DEFAULT_RATED_WATTS)
