"""How the operator converges a deployment without a request it does not need: pods created on
their node (no binding after), its reconciles reading the pod cache (the watch and the answers
to its own writes), the cache never taking an older version of a pod over a newer one."""

import itertools

from fleetwise.operator.cluster import ClusterState
from fleetwise.operator.metrics import OperatorMetrics
from fleetwise.operator.pod_cache import PodCache
from fleetwise.operator.reconcile import Operator

NS = "models"
H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"


def worker(name: str, rv: int, deployment: str = "llama", **meta) -> dict:
    return {"metadata": {"name": name, "namespace": NS, "resourceVersion": str(rv),
                         "labels": {"app.kubernetes.io/managed-by": "fleetwise", "fleetwise.dev/deployment": deployment,
                                    "fleetwise.dev/role": "decode"}, **meta}, "spec": {}}


def test_an_older_watch_event_never_overwrites_a_newer_write():
    cache = PodCache()
    cache.written(worker("a", 7, annotations={"fleetwise.dev/draining": "1"}))
    cache.on_pod("MODIFIED", worker("a", 5))  # from before the write
    assert cache.deployment_pods(NS, "llama")[0]["metadata"]["annotations"]
    cache.on_pod("MODIFIED", worker("a", 9))
    assert not cache.deployment_pods(NS, "llama")[0]["metadata"].get("annotations")


def test_a_deleted_pod_is_not_brought_back_by_a_late_answer_or_event():
    cache = PodCache()
    cache.on_pod("ADDED", worker("a", 3))
    cache.on_pod("DELETED", worker("a", 8))
    cache.written(worker("a", 6))
    cache.on_pod("MODIFIED", worker("a", 7))
    assert cache.deployment_pods(NS, "llama") == []
    cache.on_pod("ADDED", worker("a", 12))  # made again under the same name, later
    assert [p["metadata"]["resourceVersion"] for p in cache.deployment_pods(NS, "llama")] == ["12"]
    cache.written(worker("b", 20))
    cache.written(None, NS, "b")  # deleted at once: what the watch still brings of it is no newer
    cache.on_pod("MODIFIED", worker("b", 20))
    assert [p["metadata"]["name"] for p in cache.deployment_pods(NS, "llama")] == ["a"]


def test_a_relist_drops_what_the_watch_missed_and_keeps_what_is_newer_than_the_list():
    cache = PodCache()
    for name, rv in (("missed", 4), ("kept", 5), ("new", 30)):
        cache.on_pod("ADDED", worker(name, rv))
    cache.on_pod("ADDED", worker("other", 6, deployment="mistral"))
    listed = worker("kept", 5)
    del listed["metadata"]["namespace"]  # a list's items may leave it out
    cache.relisted(NS, "llama", [listed, worker("listed", 9)], "20")
    assert sorted(p["metadata"]["name"] for p in cache.deployment_pods(NS, "llama")) == ["kept", "listed", "new"]
    assert [p["metadata"]["name"] for p in cache.deployment_pods(NS, "mistral")] == ["other"]


class FakeKube:
    """The API server as far as a reconcile goes, counting each request; pods get increasing
    resourceVersions, and a pod on the node `refuse` names is refused."""

    def __init__(self, refuse: str | None = None) -> None:
        self.requests: list[tuple[str, str]] = []
        self.pods_stored: dict[str, dict] = {}
        self.rv = itertools.count(100)
        self.refuse = refuse
        self.events: list[tuple[str, str]] = []

    def pod_list(self, namespace: str, selector: str, cached: bool = False) -> tuple[list[dict], str]:
        self.requests.append(("list", "pods"))
        return list(self.pods_stored.values()), str(next(self.rv))

    def create_pod(self, namespace: str, pod: dict) -> dict:
        from kubernetes.client.rest import ApiException
        self.requests.append(("create", "pods"))
        if self.refuse and pod["spec"].get("nodeName") == self.refuse:
            raise ApiException(status=403, reason="Forbidden: refused on this node")
        stored = {**pod, "metadata": {**pod["metadata"], "namespace": namespace, "resourceVersion": str(next(self.rv)),
                                      "creationTimestamp": "2026-01-01T00:00:00Z"}}
        self.pods_stored[pod["metadata"]["name"]] = stored
        return stored

    def bind(self, namespace: str, pod: str, node: str) -> bool:
        self.requests.append(("create", "pods/binding"))
        return True

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.requests.append(("create", "events"))
        self.events.append((reason, message))

    def ensure_service(self, namespace: str, service: dict) -> None:
        self.requests.append(("create", "services"))

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        self.requests.append(("patch", "modeldeployments/status"))


def body(prefill: int, decode: int) -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "llama", "namespace": NS, "uid": "u-1", "generation": 1},
            "spec": {"model": {"name": "llama", "uri": "/models/tiny"}, "image": "fleetwise:1",
                     "prefill": {"replicas": prefill, "gpuType": "H100"},
                     "decode": {"replicas": decode, "gpuType": "A100"}}}


def node(name: str, product: str, gpus: int) -> dict:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def operator(kube: FakeKube, gpus_per_node: int = 8) -> Operator:
    cluster = ClusterState()
    for i, product in enumerate((H100, H100, A100, A100)):
        cluster.on_node("ADDED", node(f"n{i}", product, gpus_per_node))
    return Operator(kube, cluster, OperatorMetrics(), pods=PodCache())  # type: ignore[arg-type]  # a fake Kube


def test_pods_are_created_on_their_node_once_with_no_binding_and_no_second_list():
    kube = FakeKube()
    op = operator(kube)
    status = op.reconcile(body(3, 5))
    nodes = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in kube.pods_stored.values()}
    assert len(nodes) == 8 and all(nodes.values())
    assert {n for name, n in nodes.items() if "-prefill-" in name} == {"n0", "n1"}  # spread on the H100s
    assert ("create", "pods/binding") not in kube.requests
    assert any(r == "Placed" and "bound 8 pod(s)" in m for r, m in kube.events)
    assert status["decode"]["desired"] == 5
    # woken again before any watch event came back: the cache holds what it created
    before = len(kube.requests)
    op.reconcile(body(3, 5))
    assert len(kube.pods_stored) == 8
    assert ("list", "pods") not in kube.requests[before:] and ("create", "pods") not in kube.requests[before:]


def test_pods_that_do_not_fit_wait_unbound_and_a_refused_one_gives_its_gpus_back():
    kube = FakeKube(refuse="n2")
    op = operator(kube, gpus_per_node=1)  # two GPUs of each product
    status = op.reconcile(body(1, 4))
    # 2 A100 GPUs for 4 decode pods: two go on their nodes (the one on n2 is refused), two that
    # do not fit are created unbound and wait
    assert len(kube.pods_stored) == 4
    unbound = sorted(p["metadata"]["name"] for p in kube.pods_stored.values() if not p["spec"].get("nodeName"))
    assert sorted(u["pod"] for u in status["pending"]) == unbound and len(unbound) == 2
    # what is booked is exactly what was created on a node: the refused pod's GPU came back
    assert sorted((p.name, p.node) for p in op.cluster.placed.values()) == sorted(
        (p["metadata"]["name"], p["spec"]["nodeName"]) for p in kube.pods_stored.values() if p["spec"].get("nodeName"))
    assert "n2" not in {p.node for p in op.cluster.placed.values()}
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "refused on this node" in degraded["message"]
    # n2 takes pods again and a node comes: the missing pod is created on one, a waiting pod
    # bound to the other through the binding subresource, the last still waits
    kube.refuse = None
    op.cluster.on_node("ADDED", node("n4", A100, 1))
    status = op.reconcile(body(1, 4))
    assert ("create", "pods/binding") in kube.requests and len(kube.pods_stored) == 5
    assert len(status["pending"]) == 1 and {p.node for p in op.cluster.placed.values()} == {"n0", "n2", "n3", "n4"}
    # woken again before the watch brings that binding back, with room for two more: only the
    # pod still waiting is bound, not the one bound a moment ago
    binds = kube.requests.count(("create", "pods/binding"))
    for name in ("n5", "n6"):
        op.cluster.on_node("ADDED", node(name, A100, 1))
    status = op.reconcile(body(1, 4))
    assert kube.requests.count(("create", "pods/binding")) == binds + 1 and status["pending"] == []


def test_only_what_a_reconcile_acts_on_wakes_it():
    cache = PodCache()
    created = {**worker("a", 10), "status": {"phase": "Pending"}}  # as the API server answers a create
    cache.written(created)
    assert cache.on_pod("ADDED", created) is False  # the operator's own create, come back
    placed = {**worker("a", 11), "status": {"phase": "Pending", "podIP": "10.0.0.7",
                                            "conditions": [{"type": "Initialized", "status": "True"}]}}
    assert cache.on_pod("MODIFIED", placed) is False  # an address and a condition it does not read
    ready = {**worker("a", 12), "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert cache.on_pod("MODIFIED", ready) is True
    assert cache.on_pod("MODIFIED", worker("a", 11)) is False  # older than what it holds
    assert cache.on_pod("ADDED", worker("b", 13)) is True  # a pod it did not make
    assert cache.on_pod("DELETED", worker("a", 14)) is True and cache.on_pod("DELETED", worker("a", 14)) is False
