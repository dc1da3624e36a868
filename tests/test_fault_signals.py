"""From PromQL answers to the detector's inputs (a fake Prometheus client answering by metric
name): load normalisation, hard signals, links by peer, and missing data never read as healthy
or as zero; then the fault loop's window over a fake fleet."""

from fleetwise.controllers.faults import FaultState
from fleetwise.fault_loop import FaultLoop
from fleetwise.fault_signals import Worker, read_signals
from fleetwise.fleet import ActionRefused, Routability, WorkerState
from fleetwise.spec import FaultPolicySpec
from fleetwise.telemetry.prometheus import PrometheusError, Sample

WORKERS = [Worker(f"w{i}", "tiny/mixed", f"http://127.0.0.1:80{i}0", f"http://127.0.0.1:90{i}0") for i in range(4)]


class FakeProm:
    """Answers each query with the samples of the first metric name it contains."""

    def __init__(self, answers: dict[str, dict[tuple[tuple[str, str], ...], float]], fail: bool = False):
        self.answers, self.fail, self.queries = answers, fail, []

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        self.queries.append(query)
        if self.fail:
            raise PrometheusError("no answer within 5 s")
        for name, series in self.answers.items():
            if name in query:
                return [Sample(dict(labels), value, 0.0) for labels, value in series.items()]
        return []


def inst(i: int) -> tuple[tuple[str, str], ...]:
    return (("instance", f"127.0.0.1:80{i}0"),)


def answers(step: dict[int, float], tokens: dict[int, float], **more) -> dict:
    return {"fleetwise_step_seconds_sum": {inst(i): v for i, v in step.items()},
            "fleetwise_batch_tokens_sum": {inst(i): v for i, v in tokens.items()}, **more}


def test_the_signal_is_step_time_per_token_so_twice_the_load_is_not_slowness():
    # w0 computes twice the tokens in twice the time; w3 is 1.5x slower per token
    prom = FakeProm(answers({0: 4.0, 1: 2.0, 2: 2.0, 3: 3.0}, {0: 2000, 1: 1000, 2: 1000, 3: 1000}))
    s = read_signals(prom, WORKERS, 10)
    values = {m.name: m.value for m in s.members}
    assert values == {"w0": 0.002, "w1": 0.002, "w2": 0.002, "w3": 0.003}
    assert all("[10s]" in q for q in prom.queries if "increase" in q)


def test_missing_or_idle_workers_have_no_value_not_a_healthy_or_zero_one():
    prom = FakeProm(answers({0: 2.0, 1: 2.0, 2: 0.0}, {0: 1000, 1: 1000, 2: 3}))  # w2 idle, w3 not scraped
    s = read_signals(prom, WORKERS, 10)
    values = {m.name: m.value for m in s.members}
    assert values["w2"] is None and values["w3"] is None and s.missing == ["w2", "w3"]


def test_xid_and_a_stalled_heartbeat_are_hard_signals():
    prom = FakeProm(answers({i: 2.0 for i in range(4)}, {i: 1000 for i in range(4)},
                            DCGM_FI_DEV_XID_ERRORS={inst(1): 79.0, inst(0): 0.0},
                            fleetwise_engine_heartbeat_age_seconds={inst(2): 42.0, inst(0): 0.1}))
    hard = {m.name: m.hard for m in read_signals(prom, WORKERS, 10).members}
    assert hard == {"w0": None, "w1": "XID error 79", "w2": "engine loop stalled for 42 s", "w3": None}


def test_links_are_keyed_by_sender_and_receiver_and_empty_links_left_out():
    def link(receiver: int, sender: int) -> tuple:
        return (("instance", f"127.0.0.1:80{receiver}0"), ("peer", f"http://127.0.0.1:90{sender}0"))
    prom = FakeProm(answers({}, {}, fleetwise_kv_peer_transfer_seconds={link(2, 0): 1.0, link(3, 0): 1.0,
                                                                        link(2, 1): 4.0, link(3, 1): 0.0},
                            fleetwise_kv_peer_transfer_bytes={link(2, 0): 1e6, link(3, 0): 1e6, link(2, 1): 1e6},
                            fleetwise_kv_peer_transfer_failures={link(3, 1): 2.0}))
    s = read_signals(prom, WORKERS, 10)
    got = {(t.sender, t.receiver): t.seconds_per_byte for t in s.transfers}
    assert got == {("w0", "w2"): 1e-6, ("w0", "w3"): 1e-6, ("w1", "w2"): 4e-6}
    assert s.evidence["w3"]["kv_failures_from_w1"] == 2.0


class FakeFleet:
    def __init__(self, refuse: set[str] = frozenset()):
        self.calls, self.refuse = [], refuse
        self.states: dict[str, WorkerState] = {}

    def state(self, worker):
        return self.states.get(worker.name, WorkerState(Routability.SERVING))

    def quarantine(self, worker, reason):
        if "Quarantine" in self.refuse:
            raise ActionRefused("not here")
        self.calls.append(("quarantine", worker.name))
        self.states[worker.name] = WorkerState(Routability.QUARANTINED, reason)

    def restart(self, worker, reason):
        self.calls.append(("restart", worker.name))


POLICY = FaultPolicySpec.model_validate({
    "detection": {"windowSeconds": 10, "minPeers": 3, "deviationThreshold": 4, "consecutiveWindows": 2},
    "remediation": {"actions": ["Quarantine", "RestartPod"], "maxUnavailableFraction": 0.25, "cooldownSeconds": 60}})


def test_the_loop_quarantines_and_restarts_a_worker_out_for_two_windows_and_nothing_else():
    prom = FakeProm(answers({0: 2.0, 1: 2.05, 2: 1.97, 3: 2.6}, {i: 1000 for i in range(4)}))
    fleet, incidents = FakeFleet(), []
    loop = FaultLoop(prom, fleet, POLICY, lambda: WORKERS, on_incident=incidents.append)  # type: ignore[arg-type]
    assert loop.tick(now=0.0) is not None and fleet.calls == []
    loop.tick(now=10.0)
    assert fleet.calls == [("quarantine", "w3"), ("restart", "w3")]
    assert [d.outcome for d in loop.done] == ["done", "done"]
    assert incidents[0].target == "w3" and incidents[0].evidence["readings"]["step_seconds_per_token"] == 0.0026


def test_no_prometheus_skips_the_window_and_a_refused_action_is_recorded():
    loop = FaultLoop(FakeProm({}, fail=True), FakeFleet(), POLICY, lambda: WORKERS)  # type: ignore[arg-type]
    assert loop.tick(now=0.0) is None and "no answer" in (loop.error or "")
    prom = FakeProm(answers({0: 2.0, 1: 2.0, 2: 2.0, 3: 9.0}, {i: 1000 for i in range(4)}))
    fleet = FakeFleet(refuse={"Quarantine"})
    loop = FaultLoop(prom, fleet, POLICY, lambda: WORKERS, state=FaultState())  # type: ignore[arg-type]
    loop.tick(now=0.0)
    loop.tick(now=10.0)
    assert [(d.action.verb, d.outcome) for d in loop.done] == [("Quarantine", "refused: not here"),
                                                              ("RestartPod", "done")]
