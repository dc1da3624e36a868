"""Acting on workers in a cluster (`operator/actions.py`): the state as the pod records it
(pure), then quarantine, restore, drain, restart and cordon against a real kube-apiserver,
with the operator running and the chart's RBAC."""

import time

import pytest

from fleetwise.fleet import ActionRefused, Routability, WorkerRef
from fleetwise.testenv.cluster import (
    apply,
    create_namespace,
    get,
    gpu_node,
    operator_kubeconfig,
    start_cluster,
    start_operator,
    wait_for,
)

NS = "acts"
A100 = "NVIDIA-A100-SXM4-80GB"


def worker_pod(labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"metadata": {"name": "chat-mixed-1", "namespace": NS, "creationTimestamp": "2024-05-01T12:00:00Z",
                         "labels": {"app.kubernetes.io/managed-by": "fleetwise", "fleetwise.dev/role": "mixed",
                                    "fleetwise.dev/routable": "true", **(labels or {})},
                         "annotations": annotations or {}},
            "spec": {"nodeName": "a100-0"}, "status": {"phase": "Running"}}


def merged(pod: dict, labels: dict, annotations: dict) -> dict:
    """The pod after a merge patch of its labels and annotations (None removes a key)."""
    meta = pod["metadata"]
    meta["labels"] |= labels
    meta["annotations"] = {k: v for k, v in (meta["annotations"] | annotations).items() if v is not None}
    return pod


def test_each_state_round_trips_through_the_pod_and_the_plan_sees_it():
    from fleetwise.operator import manifests as m
    from fleetwise.operator.reconcile import pod_view
    pod = worker_pod()
    assert m.pod_state(pod).state is Routability.SERVING
    for state, routable in (("draining", "false"), ("quarantined", "false"), ("serving", "true")):
        merged(pod, *m.routability_patch(Routability(state), f"to {state}", 1714564800.0))
        got, view = m.pod_state(pod), pod_view(pod)
        assert (got.state, got.reason, got.since) == (state, f"to {state}", 1714564800.0)
        assert pod["metadata"]["labels"]["fleetwise.dev/routable"] == routable
        assert view.quarantined == (state == "quarantined")
        assert view.draining_since == (1714564800.0 if state == "draining" else None)  # a drain ends with its state
    legacy = worker_pod({"fleetwise.dev/routable": "false"}, {"fleetwise.dev/draining-since": "12.5"})
    assert m.pod_state(legacy).state is Routability.DRAINING and m.pod_state(legacy).since == 12.5


def test_a_power_override_is_read_back_only_while_in_force_and_well_formed():
    import json

    from fleetwise.operator import manifests as m
    key = "fleetwise.dev/power-override"
    pod = worker_pod(annotations={key: json.dumps({"watts": 250, "until": 100.0, "reason": "brownout drill"})})
    o = m.pod_power_override(pod, now=99.0)
    assert o is not None and (o.watts, o.until, o.reason) == (250.0, 100.0, "brownout drill")
    assert m.pod_power_override(pod, now=100.0) is None  # lapsed
    for bad in ("not json", json.dumps({"until": 100}), json.dumps({"watts": "many", "until": 100}), "[]"):
        assert m.pod_power_override(worker_pod(annotations={key: bad}), now=0.0) is None


def test_actions_on_what_is_not_a_worker_pod_are_refused():
    from fleetwise.operator.actions import KubeFleet

    class Kube:  # answers every read with `found`
        def __init__(self, found):
            self.found = found

        def pod(self, namespace, name):
            return self.found

        def node(self, name):
            return self.found

    with pytest.raises(ActionRefused, match="quarantine: no pod acts/x"):
        KubeFleet(Kube(None)).quarantine(WorkerRef("x", NS), "r")
    stranger = worker_pod({"app.kubernetes.io/managed-by": "helm"})
    with pytest.raises(ActionRefused, match="is not a fleetwise worker pod"):
        KubeFleet(Kube(stranger)).restart(WorkerRef("chat-mixed-1", NS), "r")
    deleting = worker_pod()
    deleting["metadata"]["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    with pytest.raises(ActionRefused, match="is being deleted"):
        KubeFleet(Kube(deleting)).drain(WorkerRef("chat-mixed-1", NS), "r")
    with pytest.raises(ActionRefused, match="cordon: no node gpu-9"):
        KubeFleet(Kube(None)).cordon("gpu-9", "r")


def test_restart_and_quarantine_mark_the_node_suspect_keeping_its_other_taints_and_uncordon_lifts_it():
    from fleetwise.operator.actions import TAINT_SUSPECT, KubeFleet

    class Kube:
        def __init__(self) -> None:
            self.node_body = {"metadata": {"name": "a100-0"}, "spec": {"taints": [
                {"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}}
            self.calls: list[tuple] = []

        def pod(self, namespace, name):
            return worker_pod()

        def node(self, name):
            return self.node_body

        def patch_node(self, name, patch):
            self.calls.append(("patch", name, patch))
            self.node_body["spec"] = {k: v for k, v in (self.node_body["spec"] | patch.get("spec", {})).items()
                                      if v is not None}

        def delete_pod(self, namespace, name):
            self.calls.append(("delete", name))

        def event(self, involved, type_, reason, message):
            self.calls.append(("event", involved["kind"], reason))

    kube = Kube()
    fleet = KubeFleet(kube)  # type: ignore[arg-type]  # a fake of what it calls
    fleet.restart(WorkerRef("chat-mixed-1", NS), "slow steps")
    assert [c[0] for c in kube.calls] == ["patch", "event", "event", "delete"]  # marked before the pod goes
    assert kube.node_body["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"},
                                                {"key": TAINT_SUSPECT, "effect": "PreferNoSchedule"}]
    fleet.restart(WorkerRef("chat-mixed-1", NS), "again")  # marked already: no second patch
    assert sum(c[0] == "patch" for c in kube.calls) == 1
    fleet.uncordon("a100-0", "replaced the GPU")
    kube.calls.clear()
    kube.patch_pod_metadata = lambda *a, **kw: kube.calls.append(("patch pod",))  # type: ignore[method-assign]
    fleet.quarantine(WorkerRef("chat-mixed-1", NS), "slow steps")  # its replacement is placed next: marked first
    assert [c[0] for c in kube.calls][:3] == ["patch", "event", "patch pod"], kube.calls
    fleet.uncordon("a100-0", "replaced the GPU")
    assert kube.node_body["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    assert ("event", "Node", "SuspectLifted") in kube.calls


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("k8s"))
    for i in range(2):
        apply(c, gpu_node(f"a100-{i}", A100))
    create_namespace(c, NS)
    kc = operator_kubeconfig(c)
    op = start_operator(c, kc)
    yield c, kc
    op.stop()
    c.stop()


@pytest.fixture(scope="module")
def fleet(cluster):
    from kubernetes import config

    from fleetwise.operator.actions import KubeFleet
    from fleetwise.operator.kube import Kube
    _, kc = cluster  # the operator's own account: the actions need nothing more than its role
    return KubeFleet(Kube(config.new_client_from_config(str(kc))))


def chat(replicas: int) -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"model": {"name": "chat", "uri": "/models/tiny"}, "image": "fleetwise:1", "mode": "Colocated",
                     "mixed": {"replicas": replicas, "gpuType": "A100"}}}


def pods(c) -> list[dict]:
    return [p for p in get(c, "pods", "-n", NS, "-l", "fleetwise.dev/deployment=chat")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    return any(x["type"] == "Ready" and x["status"] == "True" for x in pod.get("status", {}).get("conditions", []))


def serving(c) -> list[dict]:
    return [p for p in pods(c) if ready(p) and p["metadata"]["labels"].get("fleetwise.dev/routable") == "true"]


def events(c, name: str, namespace: str = NS) -> str:
    return c.kubectl("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}").stdout


def ref(pod: dict) -> WorkerRef:
    return WorkerRef(pod["metadata"]["name"], NS, pod["spec"].get("nodeName"))


@pytest.mark.cluster
def test_quarantine_replaces_and_keeps_the_pod_then_restore(cluster, fleet):
    c, _ = cluster
    apply(c, chat(2))
    wait_for(lambda: len(serving(c)) == 2 and len(pods(c)) == 2, 90, what="chat ready")
    held = ref(pods(c)[0])
    fleet.quarantine(held, "latency outlier: p99 3x its peers")
    pod = get(c, "pod", held.name, "-n", NS)
    annotations = pod["metadata"]["annotations"]
    assert pod["metadata"]["labels"]["fleetwise.dev/routable"] == "false"
    assert annotations["fleetwise.dev/routability"] == "quarantined"
    assert annotations["fleetwise.dev/routability-reason"] == "latency outlier: p99 3x its peers"
    assert annotations["fleetwise.dev/routability-since"].endswith("Z")
    state = fleet.state(held)
    assert state.state is Routability.QUARANTINED and state.since > 0
    assert "Quarantined" in events(c, held.name) and "latency outlier" in events(c, held.name)
    wait_for(lambda: len(serving(c)) == 2 and len(pods(c)) == 3, 60, what="a replacement beside the quarantined pod")
    assert held.name in [p["metadata"]["name"] for p in pods(c)]
    st = get(c, "md", "chat", "-n", NS)["status"]["mixed"]
    assert st["summary"] == "2/2 (1 quarantined)"

    fleet.restore(held, "a false alarm")
    assert fleet.state(held).state is Routability.SERVING
    assert "fleetwise.dev/draining-since" not in get(c, "pod", held.name, "-n", NS)["metadata"]["annotations"]
    wait_for(lambda: len(pods(c)) == 2 and len(serving(c)) == 2, 60, what="the extra pod drained after restore")
    assert "Restored" in events(c, held.name)


@pytest.mark.cluster
def test_a_power_override_lives_on_the_pod_until_cleared(cluster, fleet):
    import time
    c, _ = cluster
    apply(c, chat(2))
    wait_for(lambda: len(serving(c)) == 2, 90, what="two serving pods")
    pod = serving(c)[0]
    fleet.override_power(ref(pod), 300.0, time.time() + 600, "maintenance on the PDU")
    o = fleet.power_override(ref(pod))
    assert o is not None and o.watts == 300.0 and o.reason == "maintenance on the PDU"
    assert "PowerOverride" in events(c, pod["metadata"]["name"])
    fleet.override_power(ref(pod), None, 0.0, "done")
    assert fleet.power_override(ref(pod)) is None
    assert "fleetwise.dev/power-override" not in (get(c, "pod", "-n", NS, pod["metadata"]["name"])
                                                  ["metadata"].get("annotations") or {})


@pytest.mark.cluster
def test_drain_and_restart_replace_the_pod(cluster, fleet):
    c, _ = cluster
    wait_for(lambda: len(serving(c)) == 2 and len(pods(c)) == 2, 60, what="chat ready")
    drained, restarted = (ref(p) for p in pods(c))
    fleet.drain(drained, "moving load off a hot node")
    assert get(c, "pod", drained.name, "-n", NS)["metadata"]["annotations"]["fleetwise.dev/draining-since"]
    fleet.restart(restarted, "engine wedged")
    assert "Restarting" in events(c, restarted.name)
    wait_for(lambda: len(serving(c)) == 2 and {drained.name, restarted.name}.isdisjoint(
        p["metadata"]["name"] for p in pods(c)), 90, what="both pods replaced")
    with pytest.raises(ActionRefused, match="no pod"):
        fleet.quarantine(drained, "it is gone")


@pytest.mark.cluster
def test_cordon_places_nothing_new_on_the_node(cluster, fleet):
    c, _ = cluster
    fleet.cordon("a100-0", "ECC errors climbing")
    node = get(c, "node", "a100-0")
    assert node["spec"]["unschedulable"] is True
    assert node["metadata"]["annotations"]["fleetwise.dev/cordon-reason"] == "ECC errors climbing"
    assert "Cordoned" in events(c, "a100-0", "default")
    before = {p["metadata"]["name"] for p in pods(c)}
    apply(c, chat(5))
    wait_for(lambda: len(serving(c)) == 5, 90, what="scaled up")
    new = [p for p in pods(c) if p["metadata"]["name"] not in before]
    assert len(new) == 3 and {p["spec"]["nodeName"] for p in new} == {"a100-1"}
    fleet.uncordon("a100-0", "ECC errors cleared")
    assert not get(c, "node", "a100-0")["spec"].get("unschedulable")
    assert "fleetwise.dev/cordon-reason" not in (get(c, "node", "a100-0")["metadata"].get("annotations") or {})
    with pytest.raises(ActionRefused, match="no node"):
        fleet.cordon("nowhere", "x")


@pytest.mark.cluster
def test_a_slow_link_is_recorded_on_the_decode_pod_and_the_routers_discovery_pairs_around_it(cluster, fleet, tmp_path):
    import json

    from kubernetes import config

    from fleetwise.router.handoff import paired
    from fleetwise.router.kube_source import KubernetesEndpoints
    c, _ = cluster
    apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
              "metadata": {"name": "pd", "namespace": NS},
              "spec": {"model": {"name": "pd", "uri": "/models/tiny"}, "image": "fleetwise:1",
                       "prefill": {"replicas": 2, "gpuType": "A100"}, "decode": {"replicas": 2, "gpuType": "A100"}}})

    def by_role() -> dict[str, list[str]] | None:
        found = [p for p in get(c, "pods", "-n", NS, "-l", "fleetwise.dev/deployment=pd")["items"] if ready(p)]
        out: dict[str, list[str]] = {"prefill": [], "decode": []}
        for p in sorted(found, key=lambda p: p["metadata"]["name"]):
            out.setdefault(p["metadata"]["labels"]["fleetwise.dev/role"], []).append(p["metadata"]["name"])
        return out if all(len(v) == 2 for v in out.values()) else None
    roles = wait_for(by_role, 90, what="pd ready")
    (p0, p1), (d0, d1) = roles["prefill"], roles["decode"]
    urls = {n: f"http://127.0.0.1:{9300 + i}" for i, n in enumerate((p0, p1, d0, d1))}
    addresses = tmp_path / "addresses.json"
    addresses.write_text(json.dumps({f"{NS}/{n}": {"url": u, "internal": u} for n, u in urls.items()}))
    # the operator's own account writes it (its role's pod patch), the router's reads it (its pod watch)
    fleet.avoid_link(WorkerRef(p0, NS), WorkerRef(d0, NS), "slow KV link", time.time() + 300)
    assert "LinkAvoided" in events(c, d0)
    source = KubernetesEndpoints(config.new_client_from_config(str(c.kubeconfig)), [NS], str(addresses))
    try:
        def decodes() -> list:
            source.refresh()
            route = source.models().get("pd")
            return route.replicas["decode"] if route and len(route.replicas["decode"]) == 2 else []
        ds = wait_for(lambda: (d := decodes()) and any(r.avoid for r in d) and d, 30, what="the avoidance seen")
        assert paired(ds, urls[p0], time.time()) == [r for r in ds if r.url == urls[d1]]
        assert paired(ds, urls[p1], time.time()) == ds  # d0 still takes p1's prompts
        assert all(r.routable for r in ds)
        fleet.avoid_link(WorkerRef(p0, NS), WorkerRef(d0, NS), "healed", None)
        wait_for(lambda: (d := decodes()) and not any(r.avoid for r in d), 30, what="the avoidance lifted")
    finally:
        source.close()
    c.kubectl("delete", "modeldeployment", "pd", "-n", NS)
