"""The operator's power loop per PowerBudget, against a Kubernetes and a Prometheus that answer
what the test says: which pods make up the domain, the status and Events it writes, a budget
with no Prometheus, and a deleted budget's caps lifted."""

from dataclasses import dataclass

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

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        return []  # no peak over the window: the loop judges the latest reading alone


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


class CountingKube(FakeKube):
    """FakeKube with the pod reads and writes `KubeFleet` makes, each counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.annotations: dict[str, dict] = {}

    def all_pods(self, selector: str = "") -> list[dict]:
        self.calls.append(("list", "pods"))
        return super().all_pods(selector)

    def pod(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get", "pods"))
        return next((p for p in super().all_pods() if p["metadata"]["name"] == name), None)

    def patch_pod_metadata(self, namespace: str, name: str, labels=None, annotations=None) -> None:
        self.calls.append(("patch", "pods"))
        self.annotations.setdefault(name, {}).update(annotations or {})

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def test_a_period_reads_pods_and_overrides_from_the_watch_cache_with_no_per_pod_get():
    import json

    from fleetwise.operator.actions import KubeFleet
    from fleetwise.operator.pod_cache import PodCache
    kube, cache = CountingKube(), PodCache()
    for p in FakeKube().all_pods():
        cache.on_pod("ADDED", p)
    cache.loaded = True
    override = {"watts": 300, "until": 4e9, "reason": "drill"}
    chat = pod("chat-decode-0", "b", "chat", "decode")
    chat["metadata"]["annotations"] = {"fleetwise.dev/power-override": json.dumps(override)}
    cache.on_pod("MODIFIED", chat)  # the override as the watch brings it
    fleet = KubeFleet(kube, pods=cache, power_actuator="node-agent")  # type: ignore[arg-type]  # a fake Kube
    prom = FakePrometheus({"batch-decode-0": 650.0, "chat-decode-0": 650.0, "batch-prefill-0": 600.0})
    control = PowerControl(kube, fleet, prom, pods=cache)  # type: ignore[arg-type]  # fakes of what it calls
    for _ in range(3):
        status = control.period(body())
    assert ("get", "pods") not in kube.calls and ("list", "pods") not in kube.calls, kube.calls
    assert {w["pod"]: w["override"] for w in status["cappedWorkers"]}["chat-decode-0"] is True
    assert json.loads(kube.annotations["chat-decode-0"]["fleetwise.dev/power-cap"])["watts"] == 300
    assert any(json.loads(a["fleetwise.dev/power-cap"])["watts"] < 700 for n, a in kube.annotations.items()
               if n.startswith("batch"))
    # a pod the watch has seen go is no worker of the domain, and no verb reads it by GET
    cache.on_pod("DELETED", chat)
    control.period(body())
    assert "chat-decode-0" not in {w["pod"] for w in kube.statuses[-1][1]["cappedWorkers"]}
    assert ("get", "pods") not in kube.calls


def test_each_period_exports_the_domains_draw_and_limit_and_a_missing_reading_is_no_sample():
    from prometheus_client import generate_latest

    from fleetwise.operator.metrics import OperatorMetrics
    kube, fleet, metrics = FakeKube(), FakeFleet(), OperatorMetrics()
    prom = FakePrometheus({"batch-decode-0": 400.0, "chat-decode-0": 500.0, "batch-prefill-0": 300.0})
    control = PowerControl(kube, fleet, prom, metrics=metrics)  # type: ignore[arg-type]  # fakes of what it calls
    control.period(body())
    page = generate_latest(metrics.registry).decode()
    assert 'fleetwise_power_domain_watts{domain="row-1"} 1200.0' in page
    assert 'fleetwise_power_domain_limit_watts{domain="row-1"} 2000.0' in page
    prom.watts = {"batch-decode-0": 400.0}  # two workers without a series: the reading is missing
    control.period(body())
    page = generate_latest(metrics.registry).decode()
    assert "fleetwise_power_domain_watts{" not in page and 'limit_watts{domain="row-1"} 2000.0' in page
    control.deleted("row-1")
    assert "domain=" not in generate_latest(metrics.registry).decode()


@dataclass
class FakeAdmin:
    reachable: bool = True
    queued: int = 0


def test_an_admin_outage_is_a_condition_on_the_budget_with_an_event_each_way():
    kube, fleet, admin = FakeKube(), FakeFleet(), FakeAdmin()
    control = PowerControl(kube, fleet, None, admin=admin)  # type: ignore[arg-type]  # fakes of what it calls
    cond = control.period(body())["conditions"][0]
    assert (cond["type"], cond["status"]) == ("AdminReachable", "True")
    assert not [e for e in kube.events if e[1].startswith("AdminReachable")]  # a healthy first is no news
    admin.reachable, admin.queued = False, 7
    cond = control.period(body())["conditions"][0]
    assert (cond["status"], cond["reason"]) == ("False", "Unreachable") and "7 wait" in cond["message"]
    assert kube.events[-1][:2] == ("Warning", "AdminReachableUnreachable")
    since = cond["lastTransitionTime"]
    assert control.period(body())["conditions"][0]["lastTransitionTime"] == since  # no change, no new time
    admin.reachable = True
    assert control.period(body())["conditions"][0]["status"] == "True"
    assert kube.events[-1][:2] == ("Normal", "AdminReachableDelivering")
