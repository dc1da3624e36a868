"""`fleetwise admin` in a cluster: a real process over a real kube-apiserver (with the
operator placing kwok worker pods), reading the fleet through `KubeView` and acting through
`KubeFleet`, so what the API says and does is what is on the pods and nodes; power domains
from the PowerBudgets, their draw from a real Prometheus."""

import time

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fleetwise.admin.auth import Role, token_entry
from fleetwise.procs import Process, fleetwise_argv, wait_healthy
from fleetwise.telemetry import catalog
from fleetwise.telemetry.prometheus_server import PrometheusServer
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

from .workers import free_port

NS = "adm"
A100 = "NVIDIA-A100-SXM4-80GB"
TOKEN = "the-cluster-admin-token"
H = {"authorization": f"Bearer {TOKEN}"}
OPERATOR_SA = "system:serviceaccount:fleetwise-system:t-fleetwise-operator"
TOKEN_REVIEWER = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "t-token-reviewer"},
     "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "t-token-reviewer"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "t-token-reviewer"},
     "subjects": [{"kind": "ServiceAccount", "name": "t-fleetwise-operator", "namespace": "fleetwise-system"}]},
]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus scraping GPU power in the DCGM exporter's shape: a100-0's 8 GPUs draw
    300 W each; a100-1 has no exporter (no reading, never 0); a100-2.rack one GPU at 250 W."""
    registry = CollectorRegistry()
    gauge = Gauge(catalog.DCGM_POWER_USAGE, "Power draw (W).", list(catalog.DCGM_LABELS), registry=registry)
    for gpu in range(8):
        gauge.labels(str(gpu), f"GPU-{gpu}", A100, "a100-0").set(300.0)
    gauge.labels("0", "GPU-x", A100, "a100-2.rack").set(250.0)  # a dotted name: no regex wildcard
    port = free_port()
    exporter, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), {"dcgm": [f"127.0.0.1:{port}"]},
                            scrape_interval=0.5).start()
    yield prom.url
    prom.stop()
    exporter.shutdown()


@pytest.fixture(scope="module")
def admin_api(tmp_path_factory, prometheus):
    workdir = tmp_path_factory.mktemp("k8s")
    c = start_cluster(workdir)
    for i, name in enumerate(("a100-0", "a100-1", "a100-2.rack")):
        apply(c, gpu_node(name, A100, labels={"row": f"r{i}"}))
    for i in range(3):
        apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "PowerBudget", "metadata": {"name": f"row-{i}"},
                  "spec": {"nodeSelector": {"row": f"r{i}"}, "limitWatts": 3000}})
    create_namespace(c, NS)
    kc = operator_kubeconfig(c)
    op = start_operator(c, kc)
    tokens = workdir / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [token_entry("ops", Role.ADMIN, TOKEN)],
                                      "serviceAccounts": [{"name": OPERATOR_SA, "role": "operator"}]}))
    # what the chart grants the admin service's account, to ask who a ServiceAccount token is
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(TOKEN_REVIEWER))
    port = free_port()
    # the operator's account: the chart gives the admin service a role of its own with the same verbs
    api = Process("admin", fleetwise_argv("admin", "--tokens", str(tokens), "--database", str(workdir / "admin.db"),
                                          "--host", "127.0.0.1", "--port", str(port), "--kubeconfig", str(kc),
                                          "--prometheus-url", prometheus, "--token-review"),
                  workdir / "admin.log", f"http://127.0.0.1:{port}", die_with_parent=True)
    api.start()
    try:
        wait_healthy([api], 60, ready=lambda p: _answers(p.url + "/healthz"))
        yield c, api.url + "/api/v1"
    finally:
        api.stop()
        op.stop()
        c.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def chat() -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"model": {"name": "chat", "uri": "/models/tiny"}, "image": "fleetwise:1", "mode": "Colocated",
                     "mixed": {"replicas": 2, "gpuType": "A100"}}}


@pytest.mark.cluster
def test_the_api_reads_and_acts_on_pods_and_nodes(admin_api):
    c, api = admin_api
    apply(c, chat())

    def fleet() -> dict:
        return httpx.get(f"{api}/fleet", headers=H, timeout=10).json()
    wait_for(lambda: sum(w["health"] == "ready" for w in fleet()["workers"]) == 2, 90, what="two ready workers")
    f = fleet()
    assert {n["name"] for n in f["nodes"]} == {"a100-0", "a100-1", "a100-2.rack"}
    assert not any(n["cordoned"] for n in f["nodes"])
    w = f["workers"][0]
    assert (w["namespace"], w["role"], w["model"], w["deployment"], w["state"]) == (NS, "mixed", "chat", "chat",
                                                                                    "serving")
    assert w["node"] in ("a100-0", "a100-1", "a100-2.rack")

    r = httpx.post(f"{api}/workers/{NS}/{w['name']}/quarantine", headers=H, json={"reason": "xid 79"})
    assert r.status_code == 200 and r.json()["state"] == "quarantined", r.text
    pod = get(c, "pod", w["name"], "-n", NS)
    assert pod["metadata"]["labels"]["fleetwise.dev/routable"] == "false"
    assert pod["metadata"]["annotations"]["fleetwise.dev/routability-reason"].startswith("xid 79 (by ops")
    assert next(x for x in fleet()["workers"] if x["name"] == w["name"])["state"] == "quarantined"

    r = httpx.post(f"{api}/workers/{NS}/{w['name']}/power-override", headers=H,
                   json={"watts": 300, "expires_in_seconds": 600, "reason": "PDU work"})
    assert r.status_code == 200 and r.json()["power_override"]["watts"] == 300
    assert "fleetwise.dev/power-override" in get(c, "pod", w["name"], "-n", NS)["metadata"]["annotations"]

    r = httpx.post(f"{api}/nodes/{w['node']}/cordon", headers=H, json={"reason": "ECC errors"})
    assert r.status_code == 200 and get(c, "node", w["node"])["spec"]["unschedulable"] is True
    assert next(n for n in fleet()["nodes"] if n["name"] == w["node"])["cordoned"]
    r = httpx.post(f"{api}/nodes/{w['node']}/uncordon", headers=H, json={"reason": "replaced"})
    assert r.status_code == 200 and not get(c, "node", w["node"])["spec"].get("unschedulable")

    r = httpx.post(f"{api}/workers/{NS}/nobody/drain", headers=H, json={"reason": "x"})
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.post(f"{api}/nodes/gpu-9/cordon", headers=H, json={"reason": "x"})
    assert r.status_code == 409 and "no node gpu-9" in r.json()["detail"]
    time.sleep(0.2)
    audit = httpx.get(f"{api}/audit", headers=H).json()["items"]
    assert [a["outcome"] for a in audit] == ["refused", "refused", "ok", "ok", "ok", "ok"]


@pytest.mark.cluster
def test_power_domains_have_their_budget_nodes_and_measured_headroom(admin_api):
    _, api = admin_api

    def domains() -> dict:
        return {d["name"]: d for d in httpx.get(f"{api}/power-domains", headers=H, timeout=10).json()["domains"]}
    wait_for(lambda: domains()["row-0"]["gpus_measured"] == 8, 30, what="a power reading")
    d = domains()
    assert d["row-0"]["nodes"] == ["a100-0"] and d["row-0"]["measured_watts"] == 2400
    assert d["row-0"]["headroom_watts"] == 600 and 0 <= d["row-0"]["measured_age_seconds"] < 10
    assert d["row-1"]["nodes"] == ["a100-1"] and d["row-1"]["limit_watts"] == 3000
    assert d["row-1"]["measured_watts"] is None and d["row-1"]["headroom_watts"] is None  # no reading is not 0 W
    assert d["row-2"]["nodes"] == ["a100-2.rack"] and d["row-2"]["measured_watts"] == 250


@pytest.mark.cluster
def test_a_listed_service_account_s_token_gets_its_role_and_no_other_does(admin_api):
    c, api = admin_api
    sa = c.kubectl("create", "token", "t-fleetwise-operator", "-n", "fleetwise-system").stdout.strip()
    r = httpx.post(f"{api}/incidents", headers={"authorization": f"Bearer {sa}"},
                   json={"kind": "ecc_errors", "subject_kind": "node", "subject": "a100-1"})
    assert r.status_code == 201 and r.json()["source"] == OPERATOR_SA
    r = httpx.get(f"{api}/audit", headers={"authorization": f"Bearer {sa}"})
    assert r.status_code == 403  # an operator, not an admin
    other = c.kubectl("create", "token", "default", "-n", NS).stdout.strip()
    r = httpx.get(f"{api}/fleet", headers={"authorization": f"Bearer {other}"})
    assert r.status_code == 401  # a real token, but of an account the file does not list
