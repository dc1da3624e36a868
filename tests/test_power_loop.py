"""The power loop's glue, against a Prometheus that answers what a test says and a fleet that
records what it is told: which series make a domain's power, missing and failed telemetry,
caps applied with their leases and fallbacks, renewals, a person's override, a restarted loop
finding the caps in force."""

import pytest

from fleetwise.fleet import ActionRefused, PowerOverride, WorkerRef
from fleetwise.power_loop import DomainWorker, PowerLoop
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry.prometheus import Latest, PrometheusError, Sample

BUDGET = PowerBudgetSpec(node_selector={"row": "r1"}, limit_watts=2000, cap_threshold=0.9, emergency_threshold=0.98,
                         release_threshold=0.8, min_gpu_cap_watts=200)
NOW = 1_000_000.0


class FakePrometheus:
    def __init__(self) -> None:
        self.power: dict[str, float] = {}    # instance -> watts
        self.limits: dict[str, float] = {}
        self.age = 1.0
        self.down = False
        self.peak: float | None = None       # the peak query's answer; None: no point
        self.peak_down = False
        self.queries: list[str] = []

    def latest(self, selector: str, at: float | None = None) -> Latest:
        if self.down:
            raise PrometheusError("http://prometheus: ConnectError: connection refused")
        values = self.power if selector == "DCGM_FI_DEV_POWER_USAGE" else self.limits
        return Latest([Sample({"instance": i, "gpu": "0"}, v, NOW - self.age) for i, v in values.items()], NOW)

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        self.queries.append(query)
        if self.down or self.peak_down:
            raise PrometheusError("http://prometheus: ReadTimeout")
        return [] if self.peak is None else [Sample({}, self.peak, NOW)]


class FakeFleet:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None, float, float | None]] = []
        self.overrides: dict[str, PowerOverride] = {}
        self.refuse: set[str] = set()

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        return self.overrides.get(worker.name)

    def cap_power(self, worker: WorkerRef, watts, until, reason, fallback_watts=None) -> None:
        if worker.name in self.refuse:
            raise ActionRefused(f"cap_power: {worker.name} unreachable")
        self.calls.append((worker.name, watts, until, fallback_watts))


def workers() -> list[DomainWorker]:
    return [DomainWorker(WorkerRef(name), priority, role, "H100", series=(("instance", name),))
            for name, priority, role in (("low-decode", "Low", "decode"), ("low-prefill", "Low", "prefill"),
                                         ("high-decode", "High", "decode"))]


@pytest.fixture
def loop():
    prom, fleet = FakePrometheus(), FakeFleet()
    prom.power = {"low-decode": 600.0, "low-prefill": 700.0, "high-decode": 600.0, "elsewhere": 5000.0}
    return PowerLoop(prom, fleet, period_seconds=5.0, ttl_periods=4), prom, fleet  # type: ignore[arg-type]  # fakes of what the loop calls


def test_the_domains_power_is_the_sum_of_its_workers_series_only(loop):
    power_loop, _, _ = loop
    reading, drawn, error = power_loop.measure(workers())
    assert reading.watts == 1900 and reading.age_seconds == pytest.approx(1.0) and error is None
    assert drawn == {"local/low-decode": 600.0, "local/low-prefill": 700.0, "local/high-decode": 600.0}


def test_a_worker_without_a_series_makes_the_reading_missing_not_partial(loop):
    power_loop, prom, _ = loop
    del prom.power["high-decode"]
    reading, _, error = power_loop.measure(workers())
    assert reading.watts is None and "local/high-decode" in error


def test_the_peak_is_the_domains_summed_power_at_1_s_steps_over_the_period(loop):
    power_loop, prom, _ = loop
    prom.peak = 2400.0
    reading, _, _ = power_loop.measure(workers())
    assert reading.watts == 1900 and reading.peak_watts == 2400.0
    query = prom.queries[-1]
    assert query.startswith("max_over_time(sum(") and query.endswith(")[5s:1s])")
    assert 'DCGM_FI_DEV_POWER_USAGE{instance="low-decode"} or' in query and "elsewhere" not in query


def test_a_missing_or_failed_peak_reads_as_missing_not_zero_and_the_reading_stays(loop):
    power_loop, prom, _ = loop
    prom.peak = None
    reading, _, error = power_loop.measure(workers())
    assert reading.watts == 1900 and reading.peak_watts is None and error is None
    prom.peak, prom.peak_down = 2400.0, True
    reading, _, error = power_loop.measure(workers())
    assert reading.watts == 1900 and reading.peak_watts is None and error is None


def test_a_burst_over_the_budget_seen_only_in_the_peak_is_shed(loop):
    power_loop, prom, _ = loop
    prom.power = {"low-decode": 500.0, "low-prefill": 500.0, "high-decode": 500.0}   # 1500 W: under the band
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert not period.changed
    prom.peak = 2100.0   # over limitWatts for a second inside the period
    period = power_loop.run_period(BUDGET, workers(), now=NOW + 5)
    assert period.reading.peak_watts == 2100.0 and period.changed
    assert {ch.worker for ch in period.changed} <= {"local/low-decode", "local/low-prefill"}


def test_above_the_threshold_low_priority_is_capped_with_a_lease_and_a_conservative_fallback(loop):
    power_loop, _, fleet = loop
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert period.decision.situation == "capping" and period.changed
    capped = {name for name, *_ in fleet.calls}
    assert capped <= {"low-decode", "low-prefill"}
    for _, watts, until, fallback in fleet.calls:
        assert watts is not None and until == NOW + 20.0
        assert fallback == 0.6 * 700  # the conservative cap of an H100's rating
    assert period.caps == {f"local/{name}": watts for name, watts, *_ in fleet.calls}


def test_caps_in_force_are_renewed_each_period_and_high_priority_ones_fall_back_to_none(loop):
    power_loop, prom, fleet = loop
    power_loop.caps = {"local/high-decode": 500.0}
    prom.power = {"low-decode": 600.0, "low-prefill": 550.0, "high-decode": 500.0}  # in the band: caps hold
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert period.decision.situation == "band" and period.changed == []
    assert fleet.calls == [("high-decode", 500.0, NOW + 20.0, None)]


def test_prometheus_down_lifts_nothing_and_past_the_deadline_caps_low_priority(loop):
    power_loop, prom, fleet = loop
    power_loop.caps = {"local/low-decode": 500.0}
    prom.down = True
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert period.decision.situation == "stale" and "connection refused" in period.telemetry_error
    assert fleet.calls == [("low-decode", 500.0, NOW + 20.0, 420.0)]  # renewed, not lifted
    fleet.calls.clear()
    period = power_loop.run_period(BUDGET, workers(), now=NOW + 200)
    assert period.decision.situation == "stale_capping"
    assert {(name, watts) for name, watts, *_ in fleet.calls} == {("low-decode", 420.0), ("low-prefill", 420.0)}


def test_an_override_wins_and_its_worker_is_left_out_of_the_decision(loop):
    power_loop, _, fleet = loop
    fleet.overrides["low-decode"] = PowerOverride(650.0, NOW + 7.0, "hands off: a benchmark runs")
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert ("low-decode", 650.0, NOW + 7.0, 420.0) in fleet.calls  # the lease ends with the override
    assert all(ch.worker != "local/low-decode" or "override" in ch.reason for ch in period.changed)
    assert "local/low-decode" in period.overridden and period.caps["local/low-decode"] == 650.0


def test_a_cap_the_fleet_refuses_is_reported_and_not_taken_as_in_force(loop):
    power_loop, _, fleet = loop
    fleet.refuse = {"low-decode", "low-prefill"}
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert period.failed and all("unreachable" in f for f in period.failed)
    assert "local/low-decode" not in period.caps and "local/low-prefill" not in period.caps


def test_a_restarted_loop_finds_the_caps_in_force_from_the_enforced_limit(loop):
    power_loop, prom, fleet = loop
    prom.limits = {"low-decode": 490.0, "low-prefill": 700.0, "high-decode": 700.0}
    prom.power = {"low-decode": 490.0, "low-prefill": 300.0, "high-decode": 300.0}  # low: release when due
    period = power_loop.run_period(BUDGET, workers(), now=NOW)
    assert period.caps == {"local/low-decode": 490.0}  # and renewed, not forgotten
    assert fleet.calls == [("low-decode", 490.0, NOW + 20.0, 420.0)]


def test_release_all_lifts_what_the_loop_holds(loop):
    power_loop, _, fleet = loop
    power_loop.caps = {"local/low-decode": 500.0}
    assert power_loop.release_all(workers(), "the PowerBudget was deleted") == []
    assert [(name, watts) for name, watts, *_ in fleet.calls] == [("low-decode", None)]
    assert power_loop.caps == {}
