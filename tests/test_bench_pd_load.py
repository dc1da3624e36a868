"""The pd load study's workload and measures: the trace's bursts kept at every rate, TBT
from every gap between two tokens (not per-request means)."""

import numpy as np
import pytest

from fleetwise.bench.pd.load import TRACE, LoadRequest, Outcome, at_rate, summarize, trace_requests


def test_scaled_arrivals_keep_the_traces_bursts_and_meet_the_mean_rate():
    reqs = trace_requests(TRACE, 40, 100, 0.5, 1024, 32, np.arange(10, 100))
    assert all(16 <= len(r.prompt) <= 1024 and 4 <= r.max_tokens <= 32 for r in reqs)
    for rate in (0.5, 3.0):
        t = at_rate(reqs, rate)
        assert t[0] == 0 and (len(t) - 1) / t[-1] == pytest.approx(rate)
        gaps, own = np.diff(t), np.diff([r.arrival_s for r in reqs])
        assert np.allclose(gaps / gaps.sum(), own / own.sum())  # the same shape, only scaled


def test_tbt_pools_every_token_gap_and_failed_requests_are_left_out():
    steady = Outcome(0.0, ttft_s=0.1, token_times=[1.0 + 0.01 * i for i in range(50)], tokens=50)
    stalled = Outcome(0.0, ttft_s=0.5, token_times=[0.0, 0.01, 1.01], tokens=3)
    failed = Outcome(0.0, error="500: boom")
    row = summarize([steady, stalled, failed], 10.0, 1.0)
    assert row["completed"] == 2 and row["tbt_gaps"] == 51 and row["errors"] == ["500: boom"]
    assert row["tbt_p50_s"] == pytest.approx(0.01) and row["tbt_max_s"] == pytest.approx(1.0)
    # one stall in 51 gaps is p99's business; the stalled request's mean gap would hide it among others'
    assert row["tbt_p99_s"] > 0.5
    assert row["ttft_p50_s"] == pytest.approx(0.3)


def test_a_load_request_is_what_the_trace_row_says_scaled():
    [r] = trace_requests(TRACE, 1, 0, 0.5, 1024, 32, np.arange(10, 100))
    assert isinstance(r, LoadRequest) and r.arrival_s == 0.0
    assert len(r.prompt) == round(374 * 0.5) and r.max_tokens == round(44 * 0.5)  # row 0: 374 context, 44 generated
