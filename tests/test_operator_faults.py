"""The operator's fault loop per FaultPolicy (`operator/faults.py`) against a Kubernetes, a
Prometheus and an admin sink that answer what the test says: which pods are peers, what a
window writes to the status, the Events, the incidents sent once per episode, an admin outage
as a condition, a policy with no Prometheus or an invalid spec; and the shared loop's cordon,
which drains the node's serving workers."""

from fleetwise.controllers import fault_status as fs
from fleetwise.fault_loop import FaultLoop
from fleetwise.fault_signals import Worker
from fleetwise.fleet import ActionRefused, Routability, WorkerState
from fleetwise.operator.faults import FaultControl, admin_kind, policy_workers, selector
from fleetwise.operator.metrics import OperatorMetrics
from fleetwise.spec import FaultPolicySpec

from .test_fault_signals import FakeProm

NS = "models"
A100, H100 = "NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"


def node(name: str, product: str = A100, cordoned: str | None = None) -> dict:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product},
                         "annotations": {"fleetwise.dev/cordon-reason": cordoned} if cordoned else {}},
            "spec": {"unschedulable": True} if cordoned else {}}


def pod(i: int, node_name: str, deployment: str = "chat", phase: str = "Running", state: str | None = None) -> dict:
    annotations = {"fleetwise.dev/routability": state, "fleetwise.dev/routability-reason": "slow"} if state else {}
    return {"metadata": {"name": f"w{i}", "namespace": NS, "annotations": annotations,
                         "labels": {"fleetwise.dev/deployment": deployment, "fleetwise.dev/role": "mixed",
                                    "app.kubernetes.io/managed-by": "fleetwise"}},
            "spec": {"nodeName": node_name}, "status": {"phase": phase, "podIP": f"10.0.0.{i}"}}


class FakeKube:
    def __init__(self, pods: list[dict], nodes: list[dict]) -> None:
        self._pods, self._nodes = pods, nodes
        self.statuses: list[dict] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.selectors: list[str] = []

    def pods(self, namespace: str, selector: str) -> list[dict]:
        assert namespace == NS
        self.selectors.append(selector)
        return self._pods

    def nodes(self) -> list[dict]:
        return self._nodes

    def patch_fault_policy_status(self, namespace: str, name: str, status: dict) -> None:
        assert (namespace, name) == (NS, "peers")
        self.statuses.append(status)

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((involved["kind"], type_, reason, message))


class FakeFleet:
    def __init__(self, kube: FakeKube, refuse: bool = False) -> None:
        self.kube, self.refuse, self.calls = kube, refuse, []

    def state(self, worker) -> WorkerState:
        assert worker.namespace == NS
        p = next(p for p in self.kube._pods if p["metadata"]["name"] == worker.name)
        return WorkerState(Routability(p["metadata"]["annotations"].get("fleetwise.dev/routability", "serving")))

    def quarantine(self, worker, reason: str) -> None:
        if self.refuse:
            raise ActionRefused("quarantine: the pod is being deleted")
        self.calls.append(("quarantine", worker.namespace, worker.name))
        p = next(p for p in self.kube._pods if p["metadata"]["name"] == worker.name)
        p["metadata"]["annotations"] = {"fleetwise.dev/routability": "quarantined",
                                        "fleetwise.dev/routability-reason": reason}


class FakeSink:
    def __init__(self) -> None:
        self.incidents: list[tuple] = []
        self.reachable, self.queued = True, 0

    def incident(self, kind, subject_kind, subject, namespace="", severity="warning", summary="", evidence=None):
        self.incidents.append((kind, subject_kind, subject, namespace, severity, evidence))


def body(spec: dict | None = None) -> dict:
    return {"metadata": {"name": "peers", "namespace": NS, "generation": 3},
            "spec": spec if spec is not None else {
                "detection": {"windowSeconds": 10, "minPeers": 3, "consecutiveWindows": 1},
                "remediation": {"actions": ["Quarantine"], "maxUnavailableFraction": 0.5}}}


def steps(values: dict[int, float]) -> FakeProm:
    """Step seconds over 1000 tokens per worker, each scraped at its pod IP's public port."""
    return FakeProm({"fleetwise_step_seconds_sum": {(("instance", f"10.0.0.{i}:8000"),): v for i, v in values.items()},
                     "fleetwise_batch_tokens_sum": {(("instance", f"10.0.0.{i}:8000"),): 1000.0 for i in values}})


def test_peers_are_one_deployment_role_and_gpu_product_running_with_an_address():
    pods = [pod(0, "a"), pod(1, "b"), pod(2, "h"), pod(3, "a", deployment="other"), pod(4, "a", phase="Pending"),
            {**pod(5, "a"), "status": {"phase": "Running"}}]
    workers = policy_workers(pods, [node("a"), node("b"), node("h", H100)], {})
    assert [(w.name, w.group, w.url, w.internal_url, w.node, w.namespace) for w in workers] == [
        ("w0", f"{NS}/chat/mixed/{A100}", "http://10.0.0.0:8000", "http://10.0.0.0:9000", "a", NS),
        ("w1", f"{NS}/chat/mixed/{A100}", "http://10.0.0.1:8000", "http://10.0.0.1:9000", "b", NS),
        ("w2", f"{NS}/chat/mixed/{H100}", "http://10.0.0.2:8000", "http://10.0.0.2:9000", "h", NS),
        ("w3", f"{NS}/other/mixed/{A100}", "http://10.0.0.3:8000", "http://10.0.0.3:9000", "a", NS)]
    spec = FaultPolicySpec.model_validate({"selector": {"matchLabels": {"team": "a"}}})
    assert selector(spec) == "app.kubernetes.io/managed-by=fleetwise,fleetwise.dev/role,team=a"


def test_a_window_quarantines_the_odd_one_out_and_writes_status_events_and_one_admin_incident():
    kube = FakeKube([pod(i, "ab"[i % 2]) for i in range(4)], [node("a"), node("b"), node("c", cordoned="XID 79")])
    sink = FakeSink()
    control = FaultControl(kube, FakeFleet(kube), steps({0: 2.0, 1: 2.0, 2: 2.1, 3: 6.0}), sink)  # type: ignore[arg-type]
    assert control.window(body(), now=1000.0) == 10.0
    assert control.fleet.calls == [("quarantine", NS, "w3")]  # type: ignore[attr-defined]
    st = kube.statuses[-1]
    assert st["quarantined"] == [{"pod": "w3", "node": "b", "reason": st["quarantined"][0]["reason"], "since": None}]
    assert st["cordoned"] == [{"node": "c", "reason": "XID 79"}] and st["workers"] == 4 and st["openCount"] == 0
    assert st["incidents"][0]["target"] == "w3" and st["incidents"][0]["state"] == "Remediated"
    assert st["observedGeneration"] == 3 and st["lastWindowTime"] == "1970-01-01T00:16:40Z"
    conds = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert conds == {"Ready": ("True", "Watching"), "Degraded": ("False", "Acting"),
                     "AdminReachable": ("True", "Delivering")}
    reasons = [e[2] for e in kube.events if e[0] == "FaultPolicy"]
    assert reasons == ["FaultIncident", "FaultAction"]
    assert [(k, sk, s, ns, sev) for k, sk, s, ns, sev, _ in sink.incidents] == [
        ("slow_worker", "worker", "w3", NS, "warning")]
    assert {"signal": "readings.step_seconds_per_token", "value": 0.006} in sink.incidents[0][5]

    # the admin API goes away: the next window says so as a condition, and an Event
    sink.reachable, sink.queued = False, 7
    control.prometheus = steps({0: 2.0, 1: 2.0, 2: 2.1, 3: 6.0})
    control.policies[(NS, "peers")].loop.prometheus = control.prometheus
    control.window(body(), now=1010.0)
    conds = {c["type"]: c for c in kube.statuses[-1]["conditions"]}
    assert conds["AdminReachable"]["status"] == "False" and "7 wait" in conds["AdminReachable"]["message"]
    assert ("FaultPolicy", "Warning", "AdminReachableUnreachable") in [e[:3] for e in kube.events]
    assert len(sink.incidents) == 1  # w3 is out of routing: no new incident


def test_a_refused_action_makes_the_policy_degraded_and_a_skipped_window_keeps_that():
    kube = FakeKube([pod(i, "a") for i in range(4)], [node("a")])
    metrics = OperatorMetrics()
    control = FaultControl(kube, FakeFleet(kube, refuse=True), steps({0: 2.0, 1: 2.0, 2: 2.0, 3: 9.0}),  # type: ignore[arg-type]
                           metrics=metrics)
    control.window(body(), now=0.0)
    assert metrics.registry.get_sample_value("fleetwise_incidents_open",
                                             {"namespace": NS, "policy": "peers", "kind": "worker"}) == 1
    conds = {c["type"]: c for c in kube.statuses[-1]["conditions"]}
    assert (conds["Degraded"]["status"], conds["Degraded"]["reason"]) == ("True", "ActionsRefused")
    assert "being deleted" in conds["Degraded"]["message"] and "AdminReachable" not in conds
    assert kube.statuses[-1]["incidents"][0]["state"] == "Open" and kube.statuses[-1]["openCount"] == 1
    assert ("FaultPolicy", "Warning", "FaultActionRefused") in [e[:3] for e in kube.events]
    assert ("FaultPolicy", "Warning", "DegradedActionsRefused") in [e[:3] for e in kube.events]
    control.policies[(NS, "peers")].loop.prometheus = FakeProm({}, fail=True)
    control.window(body(), now=10.0)
    conds = {c["type"]: c for c in kube.statuses[-1]["conditions"]}
    assert conds["Ready"]["status"] == "False" and "no answer" in conds["Ready"]["message"]
    assert conds["Degraded"]["reason"] == "ActionsRefused"  # nothing new was learnt
    assert kube.statuses[-1]["incidents"][0]["state"] == "Open"
    control.deleted(NS, "peers")
    assert metrics.registry.get_sample_value("fleetwise_incidents_open",
                                             {"namespace": NS, "policy": "peers", "kind": "worker"}) is None


def test_no_prometheus_or_an_invalid_spec_is_said_in_the_status():
    kube = FakeKube([], [])
    control = FaultControl(kube, FakeFleet(kube), None)  # type: ignore[arg-type]
    assert control.window(body()) is None
    assert kube.statuses[-1]["conditions"][0]["reason"] == "NoPrometheus"
    assert control.window(body({"detection": {"windowSeconds": 1}})) == 30.0
    ready = kube.statuses[-1]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec") and "windowSeconds" in ready["message"]


class NodeFleet:
    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.calls, self.refuse = [], refuse

    def state(self, worker) -> WorkerState:
        return WorkerState(Routability.QUARANTINED if worker.name == "w1" else Routability.SERVING)

    def cordon(self, node: str, reason: str) -> None:
        self.calls.append(("cordon", node))

    def drain(self, worker, reason: str) -> None:
        if worker.name in self.refuse:
            raise ActionRefused("being deleted")
        assert "n1 is cordoned" in reason
        self.calls.append(("drain", worker.name))


def test_a_cordon_drains_the_node_s_serving_workers_and_says_which():
    workers = [Worker(f"w{i}", "g", f"http://127.0.0.1:80{i}0", node="n1" if i < 4 else "n2") for i in range(8)]
    prom = FakeProm({"fleetwise_step_seconds_sum": {(("instance", f"127.0.0.1:80{i}0"),): 9.0 if i in (0, 2, 3) else 2.0
                                                    for i in range(8)},
                     "fleetwise_batch_tokens_sum": {(("instance", f"127.0.0.1:80{i}0"),): 1000.0 for i in range(8)}})
    policy = FaultPolicySpec.model_validate({"detection": {"windowSeconds": 10, "consecutiveWindows": 1},
                                             "remediation": {"actions": ["CordonNode"]}})
    fleet = NodeFleet(refuse={"w3"})
    loop = FaultLoop(prom, fleet, policy, lambda: workers)  # type: ignore[arg-type]
    loop.tick(now=0.0)
    assert fleet.calls == [("cordon", "n1"), ("drain", "w0"), ("drain", "w2")]  # w1 already out
    assert loop.done[0].outcome == "done; drained w0, w2; not drained w3: being deleted"


def test_an_incident_s_kind_in_the_admin_store_says_what_was_out():
    def kind(k: str, evidence: dict) -> str:
        return admin_kind(fs.Record(k, "x", "", 0.0, 0.0, evidence))
    assert kind("worker", {"score": 9.0, "hard": None}) == "slow_worker"
    assert kind("worker", {"hard": "XID error 79"}) == "hard_signal"
    assert kind("worker", {"kv_sender": {"a->b": 9.0}}) == "slow_kv_sender"
    assert (kind("node", {"w1": {}}), kind("link", {"score": 9.0})) == ("bad_node", "slow_link")


class CountingKube(FakeKube):
    """FakeKube with the pod reads and writes `KubeFleet` makes, each counted."""

    def __init__(self, pods: list[dict], nodes: list[dict]) -> None:
        super().__init__(pods, nodes)
        self.calls: list[tuple[str, str]] = []

    def pods(self, namespace: str, selector: str) -> list[dict]:
        self.calls.append(("list", "pods"))
        return super().pods(namespace, selector)

    def pod(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get", "pods"))
        return next((p for p in self._pods if p["metadata"]["name"] == name), None)

    def patch_pod_metadata(self, namespace: str, name: str, labels=None, annotations=None) -> None:
        self.calls.append(("patch", "pods"))

    def node(self, name: str) -> dict | None:
        self.calls.append(("get", "nodes"))
        return next((n for n in self._nodes if n["metadata"]["name"] == name), None)

    def patch_node(self, name: str, patch: dict) -> None:
        self.calls.append(("patch", "nodes"))


def test_windows_read_pods_and_their_states_from_the_watch_cache_with_no_get_per_pod():
    from fleetwise.operator.actions import KubeFleet
    from fleetwise.operator.pod_cache import PodCache
    pods = [pod(i, "ab"[i % 2]) for i in range(6)] + [pod(9, "a", deployment="other")]
    pods[-1]["metadata"]["namespace"] = "elsewhere"  # another namespace's worker: not this policy's
    kube, cache = CountingKube(pods, [node("a"), node("b")]), PodCache()
    for p in pods:
        cache.on_pod("ADDED", p)
    cache.loaded = True
    fleet = KubeFleet(kube)  # type: ignore[arg-type]  # a fake of what it calls
    fleet.pods = cache
    healthy = {i: 2.0 + 0.01 * i for i in range(6)}
    control = FaultControl(kube, fleet, steps(healthy), pods=cache)  # type: ignore[arg-type]  # fakes
    for t in (1000.0, 1010.0, 1020.0):
        control.window(body(), now=t)
        assert kube.statuses[-1]["workers"] == 6
    assert kube.calls == [], kube.calls  # three windows over six pods: no GET, no LIST
    control.prometheus = control.policies[(NS, "peers")].loop.prometheus = steps(healthy | {3: 6.0})
    control.window(body(), now=1030.0)
    # acting reads the one pod it changes fresh (and marks its node suspect), then lists the
    # policy's pods once for the status
    assert kube.calls == [("get", "pods"), ("get", "nodes"), ("patch", "nodes"), ("patch", "pods"),
                          ("list", "pods")], kube.calls
