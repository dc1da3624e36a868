"""The operator's power loop per PowerBudget, against a Kubernetes and a Prometheus that answer
what the test says: which pods make up the domain, the status and Events it writes, a budget
with no Prometheus, and a deleted budget's caps lifted."""

from fleetwise.fleet import PowerOverride, WorkerRef
from fleetwise.operator.power import PowerControl, domain_workers
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry.prometheus import Latest, Sample

NOW = 1_000_000.0
SPEC = {"nodeSelector": {"row": "r1"}, "limitWatts": 2000, "minGpuCapWatts": 200}


def node(name: str, row: str) -> dict:
    return {"metadata": {"name": name, "labels": {"row": row, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}


def pod(name: str, node_name: str, deployment: str, role: str, phase: str = "Running") -> dict:
    return {"metadata": {"name": name, "namespace": "models",
                         "labels": {"fleetwise.dev/deployment": deployment, "fleetwise.dev/role": role,
                                    "app.kubernetes.io/managed-by": "fleetwise"}},
            "spec": {"nodeName": node_name, "containers": [{"resources": {"requests": {"nvidia.com/gpu": "1"}}}]},
            "status": {"phase": phase}}


class FakeKube:
    def __init__(self) -> None:
        self.statuses: list[tuple[str, dict]] = []
        self.events: list[tuple[str, str, str]] = []

    def nodes(self) -> list[dict]:
        return [node("a", "r1"), node("b", "r1"), node("c", "r2")]

    def all_pods(self, selector: str = "") -> list[dict]:
        return [pod("batch-decode-0", "a", "batch", "decode"), pod("chat-decode-0", "b", "chat", "decode"),
                pod("batch-prefill-0", "a", "batch", "prefill"), pod("other-row", "c", "batch", "decode"),
                pod("starting", "a", "batch", "decode", phase="Pending")]

    def model_deployments(self, namespace: str) -> list[dict]:
        assert namespace == "models"
        return [{"metadata": {"namespace": "models", "name": "batch"}, "spec": {"priority": "Low"}},
                {"metadata": {"namespace": "models", "name": "chat"}, "spec": {"priority": "High"}}]

    def patch_budget_status(self, name: str, status: dict) -> None:
        self.statuses.append((name, status))

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        assert involved["kind"] == "PowerBudget"
        self.events.append((type_, reason, message))


class FakePrometheus:
    def __init__(self, watts: dict[str, float]) -> None:
        self.watts = watts

    def latest(self, selector: str, at: float | None = None) -> Latest:
        if selector != "DCGM_FI_DEV_POWER_USAGE":
            return Latest([], NOW)
        return Latest([Sample({"pod": p, "namespace": "models", "gpu": "0"}, w, NOW - 2)
                       for p, w in self.watts.items()], NOW)


class FakeFleet:
    def __init__(self) -> None:
        self.caps: dict[str, float | None] = {}
        self.overrides: dict[str, PowerOverride] = {}

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        return self.overrides.get(worker.name)

    def cap_power(self, worker: WorkerRef, watts, until, reason, fallback_watts=None) -> None:
        self.caps[worker.name] = watts


def body(spec: dict | None = None) -> dict:
    return {"metadata": {"name": "row-1", "uid": "u-1"}, "spec": spec or SPEC}


def test_the_domain_is_the_running_worker_pods_on_the_selected_nodes():
    kube = FakeKube()
    workers = domain_workers(PowerBudgetSpec.model_validate(SPEC), kube.nodes(), kube.all_pods(),
                             kube.model_deployments("models"))
    assert {(w.ref.name, w.priority, w.role, w.ref.node) for w in workers} == {
        ("batch-decode-0", "Low", "decode", "a"), ("chat-decode-0", "High", "decode", "b"),
        ("batch-prefill-0", "Low", "prefill", "a")}
    assert all(w.gpu == "NVIDIA-H100-80GB-HBM3" and dict(w.series) == {"namespace": "models", "pod": w.ref.name}
               for w in workers)


def test_a_period_caps_low_priority_and_writes_the_status_with_an_event_on_each_change_of_state():
    kube, fleet = FakeKube(), FakeFleet()
    prom = FakePrometheus({"batch-decode-0": 650.0, "chat-decode-0": 650.0, "batch-prefill-0": 600.0})
    control = PowerControl(kube, fleet, prom)  # type: ignore[arg-type]  # fakes of what it calls
    status = control.period(body())
    assert status["state"] == "Capping" and status["measuredWatts"] == 1900
    assert status["headroomWatts"] == 100 and status["capThresholdWatts"] == 1800
    assert status["telemetryAgeSeconds"] == 2.0
    assert set(fleet.caps) <= {"batch-decode-0", "batch-prefill-0"} and fleet.caps
    assert status["cappedCount"] == len(fleet.caps)
    assert {c["pod"] for c in status["cappedWorkers"]} == set(fleet.caps)
    assert all(c["node"] == "a" for c in status["cappedWorkers"])
    assert "above the cap threshold" in status["lastAction"] and status["lastActionTime"]
    assert [e[1] for e in kube.events] == ["PowerCapping"]
    # the band: caps hold, still capping, no new Event
    prom.watts = {"batch-decode-0": 600.0, "chat-decode-0": 600.0, "batch-prefill-0": 500.0}
    assert control.period(body())["state"] == "Capping"
    assert "inside the hysteresis band" in kube.statuses[-1][1]["message"]
    assert [e[1] for e in kube.events] == ["PowerCapping"]
    assert kube.statuses[-1][1]["cappedCount"] == len(fleet.caps)  # held, not lifted
    # low for three periods: releasing, a new state and its Event
    prom.watts = {"batch-decode-0": 300.0, "chat-decode-0": 300.0, "batch-prefill-0": 300.0}
    for _ in range(3):
        control.period(body())
    assert [e[1] for e in kube.events] == ["PowerCapping", "PowerReleasing"]


def test_without_prometheus_nothing_is_capped_and_the_status_says_why():
    kube, fleet = FakeKube(), FakeFleet()
    status = PowerControl(kube, fleet, None).period(body())  # type: ignore[arg-type]  # fakes of what it calls
    assert status["state"] == "Unmanaged" and "--prometheus-url" in status["message"]
    assert fleet.caps == {} and kube.events[0][0] == "Warning"


def test_an_invalid_budget_is_reported_not_run():
    kube, fleet = FakeKube(), FakeFleet()
    control = PowerControl(kube, fleet, FakePrometheus({}))  # type: ignore[arg-type]  # fakes of what it calls
    status = control.period(body({**SPEC, "capThreshold": 0.7, "releaseThreshold": 0.8}))
    assert status["state"] == "Invalid" and "releaseThreshold" in status["message"]


def test_a_deleted_budget_lifts_the_caps_it_holds():
    kube, fleet = FakeKube(), FakeFleet()
    prom = FakePrometheus({"batch-decode-0": 700.0, "chat-decode-0": 700.0, "batch-prefill-0": 700.0})
    control = PowerControl(kube, fleet, prom)  # type: ignore[arg-type]  # fakes of what it calls
    control.period(body())
    capped = {k for k, v in fleet.caps.items() if v is not None}
    assert capped
    control.deleted("row-1")
    assert all(fleet.caps[k] is None for k in capped) and "row-1" not in control.loops
