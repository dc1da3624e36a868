"""The operator's records to the admin API (`operator/admin_sink.py`): a send never waits
for the API; through an outage of the API, or of its PostgreSQL, records queue (bounded,
the oldest dropped first) and the outage is a metric; they arrive, in order, once it is
back. A real admin API on loopback, a real PostgreSQL for the database outage."""

import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client import generate_latest

from fleetwise.admin.app import Limits, Server, create_app
from fleetwise.admin.auth import Role, TokenBook, digest
from fleetwise.admin.deps import Ctx
from fleetwise.admin.store import Store
from fleetwise.operator.admin_sink import AdminSink
from fleetwise.operator.metrics import OperatorMetrics

from . import postgres as pg
from .admin_fleet import TOKENS, admin_fleet, headers
from .workers import free_port


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def sink_to(tmp_path):
    made = []

    def make(port: int, **kw) -> tuple[AdminSink, OperatorMetrics]:
        token = tmp_path / "operator-token"
        token.write_text(TOKENS[Role.OPERATOR])
        metrics = OperatorMetrics()
        sink = AdminSink(f"http://127.0.0.1:{port}", token, metrics, timeout=1.0, min_backoff=0.05, max_backoff=0.2,
                         **kw).start()
        made.append(sink)
        return sink, metrics
    yield make
    for sink in made:
        sink.stop()


def test_records_queue_through_an_outage_and_arrive_in_order_when_the_api_is_back(tmp_path, sink_to):
    port = free_port()
    sink, metrics = sink_to(port)
    took = []
    for i in range(3):
        t0 = time.perf_counter()
        sink.incident("slow_worker", "worker", f"w{i}", "ml", evidence=[{"signal": "p99_seconds", "value": 3.0}])
        took.append(time.perf_counter() - t0)
    sink.remediation("quarantine", "worker", "w0", "ml", "p99 3x its peers")
    sink.power("w1", "ml", 250.0, None, "domain over budget")
    assert max(took) < 0.01  # a control loop only appends
    until(lambda: value(metrics, "fleetwise_operator_admin_api_up") == 0)
    until(lambda: value(metrics, "fleetwise_operator_admin_records_queued") == 5)  # none dropped
    until(lambda: value(metrics, "fleetwise_operator_admin_outage_seconds_total") > 0)

    _, app = admin_fleet(tmp_path / "api")
    server = Server(app, "127.0.0.1", port).start()
    try:
        until(lambda: value(metrics, "fleetwise_operator_admin_records_queued") == 0)
        api, h = f"http://127.0.0.1:{port}/api/v1", headers(Role.VIEWER)
        incidents = httpx.get(f"{api}/incidents", headers=h).json()["items"]
        assert [i["subject"] for i in incidents] == ["w2", "w1", "w0"] and incidents[0]["source"] == "operator"
        done = httpx.get(f"{api}/actions/remediation", headers=h).json()["items"]
        assert [(d["verb"], d["target"], d["source"]) for d in done] == [("quarantine", "w0", "operator")]
        power = httpx.get(f"{api}/actions/power", headers=h).json()["items"]
        assert [(p["worker"], p["watts"], p["source"]) for p in power] == [("w1", 250.0, "controller")]
        assert value(metrics, "fleetwise_operator_admin_api_up") == 1
        assert value(metrics, "fleetwise_operator_admin_records_sent_total") == 5
        lint = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], capture_output=True,
                              input=generate_latest(metrics.registry).decode(), text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        server.stop()


def test_a_full_queue_drops_the_oldest_and_a_refused_record_does_not_hold_up_the_rest(tmp_path, sink_to):
    port = free_port()
    sink, metrics = sink_to(port, max_queued=3)
    for i in range(5):
        sink.remediation("drain", "worker", f"w{i}", "ml", "scale down")
    assert value(metrics, "fleetwise_operator_admin_records_dropped_total", reason="full") == 2
    _, app = admin_fleet(tmp_path / "api")
    server = Server(app, "127.0.0.1", port).start()
    try:
        until(lambda: value(metrics, "fleetwise_operator_admin_records_queued") == 0)
        sink.send("/incidents", {"kind": "x", "subject_kind": "planet", "subject": "mars"})  # never valid: a 422
        sink.remediation("drain", "worker", "w9", "ml", "after the bad one")
        until(lambda: value(metrics, "fleetwise_operator_admin_records_queued") == 0)
        done = httpx.get(f"http://127.0.0.1:{port}/api/v1/actions/remediation", headers=headers(Role.VIEWER))
        assert [d["target"] for d in done.json()["items"]] == ["w9", "w4", "w3", "w2"]  # w0, w1: the oldest went
        assert value(metrics, "fleetwise_operator_admin_records_dropped_total", reason="rejected") == 1
    finally:
        server.stop()


def test_records_wait_out_a_database_outage(tmp_path, sink_to):
    why = pg.missing()
    if why:
        pytest.skip(why)
    with pg.postgres() as cluster:
        store = Store(cluster.url)
        admin, _ = admin_fleet(tmp_path / "fleet")
        book = TokenBook([(role.label, role, digest(token)) for role, token in TOKENS.items()])
        port = free_port()
        server = Server(create_app(Ctx(store, admin.ctx.view, admin.fleet), book, Limits()), "127.0.0.1", port).start()
        sink, metrics = sink_to(port)
        try:
            cluster.stop()
            sink.incident("ecc_errors", "node", "gpu-7", summary="while the database was down")
            until(lambda: value(metrics, "fleetwise_operator_admin_api_up") == 0)  # the API answered 5xx
            assert value(metrics, "fleetwise_operator_admin_records_queued") == 1
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
            cluster.start()
            until(lambda: value(metrics, "fleetwise_operator_admin_records_queued") == 0)
            found = httpx.get(f"http://127.0.0.1:{port}/api/v1/incidents", headers=headers(Role.VIEWER)).json()
            assert [i["subject"] for i in found["items"]] == ["gpu-7"]
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        finally:
            server.stop()
            store.close()


def test_the_operator_s_verbs_are_reported_done_or_refused(tmp_path, sink_to):
    from fleetwise.fleet import ActionRefused, Routability, WorkerRef
    from fleetwise.operator.admin_sink import ReportingFleet
    admin, app = admin_fleet(tmp_path / "api")
    port = free_port()
    server = Server(app, "127.0.0.1", port).start()
    sink, metrics = sink_to(port)
    try:
        fleet = ReportingFleet(admin.fleet, sink)
        fleet.quarantine(WorkerRef("mixed-0"), "xid 79")
        assert admin.fleet.state(WorkerRef("mixed-0")).state is Routability.QUARANTINED
        with pytest.raises(ActionRefused):
            fleet.restore(WorkerRef("mixed-0"), "too soon")  # its process is not running
        with pytest.raises(ActionRefused):
            fleet.cordon("gpu-1", "ecc")
        with pytest.raises(ActionRefused):  # two mixed workers are no prefill -> decode pair
            fleet.avoid_link(WorkerRef("mixed-0"), WorkerRef("mixed-1"), "slow link", 4e9)
        until(lambda: value(metrics, "fleetwise_operator_admin_records_sent_total") == 4)
        done = httpx.get(f"http://127.0.0.1:{port}/api/v1/actions/remediation", headers=headers(Role.VIEWER))
        assert [(d["verb"], d["target"], d["outcome"]) for d in done.json()["items"]] == [
            ("avoid_link", "mixed-0->mixed-1", "refused"), ("cordon", "gpu-1", "refused"),
            ("restore", "mixed-0", "refused"), ("quarantine", "mixed-0", "done")]
    finally:
        server.stop()


def test_a_power_cap_is_reported_when_it_changes_not_at_each_renewal():
    from fleetwise.fleet import WorkerRef
    from fleetwise.operator.admin_sink import ReportingFleet

    class Fleet:  # records what reaches the workers
        def __init__(self):
            self.calls = []

        def cap_power(self, worker, watts, until, reason, fallback_watts=None):
            self.calls.append((worker.name, watts))

    class Sink:
        def __init__(self):
            self.records = []

        def power(self, worker, namespace, watts, until, reason):
            self.records.append((worker, namespace, watts, until))

    fleet, sink = Fleet(), Sink()
    reporting = ReportingFleet(fleet, sink)
    w, other = WorkerRef("decode-0", "prod"), WorkerRef("decode-1", "prod")
    reporting.cap_power(other, None, 10.0, "nothing held")  # a lift of what was never capped
    for t in (100.0, 101.0, 102.0):  # one cap, renewed each period
        reporting.cap_power(w, 300.0, t, "domain over 90%")
    reporting.cap_power(w, 250.0, 103.0, "deeper")
    reporting.cap_power(w, None, 104.0, "released")
    reporting.cap_power(w, None, 105.0, "released")
    assert len(fleet.calls) == 7  # every call still reaches the worker: renewals keep the lease alive
    assert sink.records == [("decode-0", "prod", 300.0, 100.0), ("decode-0", "prod", 250.0, 103.0),
                            ("decode-0", "prod", None, None)]
