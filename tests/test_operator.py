"""The operator against a real kube-apiserver (kine, RBAC from the chart, kwok GPU nodes)."""

import time

import httpx
import pytest

from fleetwise.procs import answers_200
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

pytestmark = pytest.mark.cluster

NS = "models"
H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("k8s"))
    for i in range(3):
        apply(c, gpu_node(f"h100-{i}", H100, labels={"rack": f"r{i % 2}"}))
        apply(c, gpu_node(f"a100-{i}", A100, labels={"rack": f"r{i % 2}"}))
    create_namespace(c, NS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def operator(cluster):
    kc = operator_kubeconfig(cluster)
    op = start_operator(cluster, kc)
    yield op, kc
    op.stop()


def md(name, prefill=2, decode=3, image="fleetwise:1", **extra):
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"name": name, "uri": "/models/tiny"}, "image": image,
                     "prefill": {"replicas": prefill, "gpuType": "H100"},
                     "decode": {"replicas": decode, "gpuType": "A100"}, **extra}}


def pods(cluster, name, role=None):
    sel = f"fleetwise.dev/deployment={name}" + (f",fleetwise.dev/role={role}" if role else "")
    return [p for p in get(cluster, "pods", "-n", NS, "-l", sel)["items"] if not p["metadata"].get("deletionTimestamp")]


def ready(pod) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def condition(cluster, name, type_="Ready"):
    status = get(cluster, "md", name, "-n", NS).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def converged(cluster, name, prefill, decode):
    def check():
        obj = get(cluster, "md", name, "-n", NS)
        st = obj.get("status") or {}
        ps, ds = pods(cluster, name, "prefill"), pods(cluster, name, "decode")
        return (condition(cluster, name).get("status") == "True"
                and st.get("observedGeneration") == obj["metadata"]["generation"]
                and len(ps) == prefill and len(ds) == decode and all(ready(p) for p in ps + ds))
    return check


def test_disaggregated_pools_on_their_gpu_types_spread_and_ready(cluster, operator):
    apply(cluster, md("llama"))
    wait_for(converged(cluster, "llama", 2, 3), 90, what="llama Ready")
    prefill, decode = pods(cluster, "llama", "prefill"), pods(cluster, "llama", "decode")
    assert {p["spec"]["nodeName"] for p in prefill} <= {"h100-0", "h100-1", "h100-2"}
    assert {p["spec"]["nodeName"] for p in decode} == {"a100-0", "a100-1", "a100-2"}  # spread
    assert len({p["spec"]["nodeName"] for p in prefill}) == 2
    for p in prefill + decode:
        assert p["spec"]["schedulerName"] == "fleetwise"
        assert p["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
        assert p["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
        assert p["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
    st = get(cluster, "md", "llama", "-n", NS)["status"]
    assert st["prefill"]["summary"] == "2/2" and st["decode"]["summary"] == "3/3"
    out = cluster.kubectl("get", "md", "-n", NS).stdout
    assert "MODE" in out and "PREFILL" in out and "DECODE" in out and "Disaggregated" in out and "2/2" in out
    services = {s["metadata"]["name"] for s in get(cluster, "services", "-n", NS)["items"]}
    assert {"llama-prefill", "llama-decode"} <= services


def test_the_internal_token_is_copied_where_the_workers_are_and_mounted(cluster, operator):
    import base64

    from fleetwise.addresses import WORKER_INTERNAL_PORT
    from fleetwise.testenv.cluster import INTERNAL_TOKEN
    wait_for(converged(cluster, "llama", 2, 3), 90, what="llama Ready")
    secret = get(cluster, "secret", "fleetwise-internal-token", "-n", NS)
    assert base64.b64decode(secret["data"]["token"]).decode() == INTERNAL_TOKEN
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "fleetwise"
    for p in pods(cluster, "llama"):
        [volume] = [v for v in p["spec"]["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "fleetwise-internal-token"
        container = p["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        args = container["args"]
        token_file = args[args.index("--internal-token-file") + 1]
        assert token_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
        assert args[args.index("--internal-port") + 1] == str(WORKER_INTERNAL_PORT)
        assert {"name": "internal", "containerPort": WORKER_INTERNAL_PORT, "protocol": "TCP"} in container["ports"]


def test_scale_up_down_and_replace(cluster, operator):
    apply(cluster, md("llama", decode=5))
    wait_for(converged(cluster, "llama", 2, 5), 90, what="scale up")
    apply(cluster, md("llama", decode=2))
    wait_for(converged(cluster, "llama", 2, 2), 90, what="scale down")
    victim = pods(cluster, "llama", "prefill")[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", NS, "--wait=false")
    wait_for(lambda: converged(cluster, "llama", 2, 2)() and victim not in
             [p["metadata"]["name"] for p in pods(cluster, "llama", "prefill")], 90, what="replacement")


def test_rollout_keeps_capacity(cluster, operator):
    apply(cluster, md("llama", decode=2, image="fleetwise:2"))
    lowest = 99
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ds = pods(cluster, "llama", "decode")
        serving = [p for p in ds if ready(p) and p["metadata"]["labels"].get("fleetwise.dev/routable") != "false"]
        lowest = min(lowest, len(serving))
        images = {p["spec"]["containers"][0]["image"] for p in ds}
        if converged(cluster, "llama", 2, 2)() and images == {"fleetwise:2"}:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("rollout did not finish")
    assert lowest >= 2, f"ready, routable decode pods dropped to {lowest}"


def test_invalid_resources_are_refused_naming_the_field(cluster, operator):
    bad = md("bad", prefill=-1)
    r = apply(cluster, bad, check=False)
    assert r.returncode != 0 and "spec.prefill.replicas" in r.stderr
    bad = md("bad")
    bad["spec"]["mode"] = "Sideways"
    r = apply(cluster, bad, check=False)
    assert r.returncode != 0 and "spec.mode" in r.stderr and "Disaggregated" in r.stderr
    bad = md("bad")
    del bad["spec"]["model"]
    r = apply(cluster, bad, check=False)
    assert r.returncode != 0 and "spec.model" in r.stderr
    bad = md("bad")
    bad["spec"]["mode"] = "Colocated"
    r = apply(cluster, bad, check=False)
    assert r.returncode != 0 and "mixed pool" in r.stderr


def test_pods_the_api_server_refuses_make_it_degraded_with_its_reason(cluster, operator):
    create_namespace(cluster, "quota")
    apply(cluster, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods", "namespace": "quota"},
                    "spec": {"hard": {"pods": "0"}}})
    apply(cluster, md("refused", prefill=1, decode=1) | {"metadata": {"name": "refused", "namespace": "quota"}})

    def degraded():
        status = get(cluster, "md", "refused", "-n", "quota").get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})
    cond = wait_for(lambda: (c := degraded()).get("reason") == "CreateFailed" and c, 60, what="CreateFailed")
    assert cond["status"] == "True" and "exceeded quota" in cond["message"]
    cluster.kubectl("delete", "resourcequota", "no-pods", "-n", "quota")
    wait_for(lambda: degraded().get("status") == "False", 60, what="pods created once the quota is gone")


def test_a_pool_service_deleted_by_hand_comes_back(cluster, operator):
    def service_exists() -> bool:
        return cluster.kubectl("get", "service", "svc-decode", "-n", NS, check=False).returncode == 0
    apply(cluster, md("svc", prefill=1, decode=1))
    wait_for(service_exists, 60, what="the decode pool's Service")
    cluster.kubectl("delete", "service", "svc-decode", "-n", NS)
    wait_for(service_exists, 60, what="the Service made again")
    cluster.kubectl("delete", "md", "svc", "-n", NS)


def test_unplaceable_pods_are_explained(cluster, operator):
    apply(cluster, md("huge", prefill=1, decode=1) | {"spec": {
        **md("huge")["spec"], "prefill": {"replicas": 1, "gpuType": "B200"},
        "decode": {"replicas": 1, "gpuType": "A100"}}})
    cond = wait_for(lambda: (c := condition(cluster, "huge", "Degraded")).get("status") == "True" and c, 60,
                    what="Degraded")
    assert "GPU type is not B200" in cond["message"]
    events = cluster.kubectl("get", "events", "-n", NS, "--field-selector", "involvedObject.name=huge").stdout
    assert "Unschedulable" in events
    cluster.kubectl("delete", "md", "huge", "-n", NS)


def test_operator_restart_mid_scale_up_converges_exactly(cluster, operator):
    op, kc = operator
    apply(cluster, md("restart", prefill=1, decode=1))
    wait_for(converged(cluster, "restart", 1, 1), 90, what="restart Ready")
    apply(cluster, md("restart", prefill=3, decode=3))
    time.sleep(0.3)
    op.stop(kill=True)
    time.sleep(1)
    fresh = start_operator(cluster, kc, "operator-2")
    op.proc = fresh.proc  # the module fixture stops this one at the end
    op.metrics_port, op.liveness_port, op.log = fresh.metrics_port, fresh.liveness_port, fresh.log
    # the killed replica's lease must run out (15 s) before the new one acts
    wait_for(converged(cluster, "restart", 3, 3), 120, what="converged after restart")
    time.sleep(3)  # and nothing more is created once converged
    assert len(pods(cluster, "restart", "prefill")) == 3 and len(pods(cluster, "restart", "decode")) == 3


def test_delete_removes_everything(cluster, operator):
    apply(cluster, md("gone", prefill=1, decode=1))
    wait_for(converged(cluster, "gone", 1, 1), 90, what="gone Ready")
    cluster.kubectl("delete", "md", "gone", "-n", NS, "--timeout=60s")
    wait_for(lambda: not pods(cluster, "gone"), 60, what="pods removed")


def test_router_discovers_ready_routable_worker_pods(cluster, operator, tiny_model_dir, tmp_path):
    """Real requests through the router to real workers standing behind the kwok pods (pod
    IPs are not reachable here: a test-only address map points each pod at a local worker)."""
    import json as _json

    import httpx
    from kubernetes import config

    from fleetwise.router.app import build_app
    from fleetwise.router.kube_source import KubernetesEndpoints
    from fleetwise.router.proxy import Router
    from fleetwise.worker.engine.config import EngineConfig

    from .workers import TOKEN, _serve_in_thread, free_port, start_worker, wait_healthy

    colocated = md("chat")
    colocated["spec"] |= {"mode": "Colocated", "mixed": {"replicas": 2, "gpuType": "A100"}}
    del colocated["spec"]["prefill"], colocated["spec"]["decode"]
    apply(cluster, colocated)
    wait_for(lambda: len([p for p in pods(cluster, "chat", "mixed") if ready(p)]) == 2
             and condition(cluster, "chat").get("status") == "True", 90, what="chat Ready")
    names = sorted(p["metadata"]["name"] for p in pods(cluster, "chat", "mixed"))
    workers = [start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="chat"), "mixed") for _ in names]
    address_map = tmp_path / "addresses.json"
    address_map.write_text(_json.dumps({f"{NS}/{n}": {"url": w.url, "internal": w.internal_url}
                                        for n, w in zip(names, workers)}))
    api = config.new_client_from_config(str(cluster.kubeconfig))
    source = KubernetesEndpoints(api, [NS], str(address_map))
    router = Router(source, "round_robin", probe_interval=0.2, token=TOKEN)
    port = free_port()
    server, thread = _serve_in_thread(build_app(router), port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)

    def served(w):
        return w.core.metrics.prompt_tokens.labels(model_name="chat")._value.get()

    def routed() -> set[str]:
        route = source.models().get("chat")
        return {r.url for r in route.replicas["mixed"]} if route else set()

    def send(n):
        for i in range(n):
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": "chat", "prompt": f"hello {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text

    try:
        before = [served(w) for w in workers]
        send(6)
        assert all(served(w) > b for w, b in zip(workers, before)), "both pods' workers take requests"
        # the operator (or a person) marks a pod not routable: it gets nothing more
        cluster.kubectl("label", "pod", names[0], "-n", NS, "fleetwise.dev/routable=false", "--overwrite")
        wait_for(lambda: workers[0].internal_url not in routed(), 30, what="the router to drop the pod")
        before = [served(w) for w in workers]
        send(6)
        assert served(workers[0]) == before[0] and served(workers[1]) > before[1]
        # a pod that goes away gets nothing more either, and no request fails
        cluster.kubectl("label", "pod", names[0], "-n", NS, "fleetwise.dev/routable=true", "--overwrite")
        cluster.kubectl("delete", "pod", names[1], "-n", NS, "--wait=false")
        wait_for(lambda: workers[0].internal_url in routed() and workers[1].internal_url not in routed(), 30,
                 what="the router to take the first pod back and drop the deleted one")
        # the operator's replacement has no worker behind it here: the map leaves it out, and the
        # router must not send to its kwok IP, where something else may answer
        wait_for(lambda: len([p for p in pods(cluster, "chat", "mixed") if ready(p)
                              and p["metadata"]["name"] not in names]) == 1, 60, what="the replacement pod")
        assert routed() == {workers[0].internal_url}
        before = [served(w) for w in workers]
        send(6)
        assert served(workers[1]) == before[1] and served(workers[0]) > before[0]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        source.close()
        for w in workers:
            w.stop()
        cluster.kubectl("delete", "md", "chat", "-n", NS, "--wait=false")


def test_a_second_replica_waits_for_the_lease(cluster, operator):
    leader, kc = operator
    wait_for(lambda: answers_200(f"http://127.0.0.1:{leader.liveness_port}/healthz"), 60, what="kopf's liveness")
    standby = start_operator(cluster, kc, "standby")
    try:
        # the standby's start (imports, the client) takes seconds on a busy machine: its tries are
        # waited for, not a fixed time; two tries (one renewal period apart) and it still waits
        tries = wait_for(lambda: (log := standby.log.read_text()).count("waiting for the lease") >= 2 and log,
                         90, what="the standby to try for the lease twice")
        assert standby.proc.poll() is None
        assert "leading as" not in tries and "Initial authentication" not in tries
        # a standby is alive: its liveness probe passes (else Kubernetes would restart it in a loop)
        live = httpx.get(f"http://127.0.0.1:{standby.liveness_port}/healthz", timeout=5)
        assert live.status_code == 200 and live.json() == {"status": "standby"}
        lease = get(cluster, "lease", "fleetwise-operator", "-n", "fleetwise-system")
        assert lease["spec"]["renewTime"] and f"leading as {lease['spec']['holderIdentity']}" in leader.log.read_text()
    finally:
        standby.stop()
