"""`helm install` of the chart into the real test control plane, as a platform team runs it:
every object accepted (the monitoring ones against the Prometheus Operator's own CRDs), the
CRDs established, a wrong value refused by name, the upgrade path for CRDs (`helm upgrade`
never touches crds/) with a field added, and the operator, running as the chart's
ServiceAccount, giving each kind of model uri the pod it needs."""

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fleetwise.testenv.cluster import (
    CHART,
    SYSTEM_NS,
    Cluster,
    apply,
    create_namespace,
    ensure_built,
    get,
    gpu_node,
    operator_kubeconfig,
    prometheus_operator_crds,
    start_operator,
    wait_for,
)

pytestmark = pytest.mark.cluster

NS = "models"
EVERYTHING = "admin.enabled=true,serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboards.enabled=true"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(cluster.bin / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 or not check, r.stdout + r.stderr
    return r


def previous_release(tmp: Path) -> Path:
    """The chart as the release before this one shipped it: its ModelDeployment CRD without
    spec.model.tokenSecret, the field this release adds."""
    old = tmp / "fleetwise-previous"
    shutil.copytree(CHART, old, symlinks=False)
    crd_path = old / "crds" / "modeldeployments.yaml"
    crd = yaml.safe_load(crd_path.read_text())
    model = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    del model["properties"]["tokenSecret"]
    del model["x-kubernetes-validations"]
    crd_path.write_text(yaml.safe_dump(crd))
    return old


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The previous release installed with every feature on, through helm, into a bare control plane."""
    work = tmp_path_factory.mktemp("chart")
    cluster = Cluster(work / "k8s", ensure_built()).start()
    try:
        for crd in prometheus_operator_crds():
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        r = helm(cluster, "install", "t", str(previous_release(work)), "-n", SYSTEM_NS, "--create-namespace",
                 "--set", EVERYTHING)
        for node in ("h100-0", "h100-1"):
            apply(cluster, gpu_node(node, "NVIDIA-H100-80GB-HBM3"))
        create_namespace(cluster, NS)
        yield cluster, r.stdout
    finally:
        cluster.stop()


def test_every_object_is_accepted_and_the_notes_say_what_next(installed):
    cluster, notes = installed
    for crd in ("modeldeployments", "powerbudgets", "faultpolicies"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}.fleetwise.dev", "--timeout=60s")
    manifest = helm(cluster, "get", "manifest", "t", "-n", SYSTEM_NS).stdout
    kinds = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest) if d}
    for kind, name in kinds:
        ns = [] if kind.startswith("Cluster") else ["-n", SYSTEM_NS]
        assert cluster.kubectl("get", kind, name, *ns, check=False).returncode == 0, (kind, name)
    assert {k for k, _ in kinds} >= {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor",
                                     "PrometheusRule", "ConfigMap", "Secret", "NetworkPolicy", "ClusterRole"}
    # the other shape of the chart, the operator kept to named namespaces: checked by the API server too
    create_namespace(cluster, "team-a")
    scoped = helm(cluster, "template", "t", str(CHART), "-n", SYSTEM_NS, "--set", EVERYTHING,
                  "--set", "operator.watchNamespaces={team-a}").stdout
    dry = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=scoped, check=False)
    assert dry.returncode == 0, dry.stderr
    assert 'role.rbac.authorization.k8s.io/t-fleetwise-operator created (server dry run)' in dry.stdout
    assert "kubectl get md" in notes and "port-forward svc/t-fleetwise-router" in notes
    assert "get secret t-fleetwise-admin-token" in notes and "kubectl apply --server-side" in notes


def test_a_wrong_value_fails_helm_upgrade_naming_it(installed):
    cluster, _ = installed
    r = helm(cluster, "upgrade", "t", str(CHART), "-n", SYSTEM_NS, "--set", "router.replicas=many", check=False)
    assert r.returncode != 0 and "at '/router/replicas': got string, want integer" in r.stderr


def md(name: str, uri: str, **model) -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"name": name, "uri": uri, **model}, "image": "fleetwise-worker:1", "mode": "Colocated",
                     "mixed": {"replicas": 1, "gpuType": "H100"}}}


def test_crds_upgrade_by_the_documented_step_and_a_new_field_is_kept(installed):
    cluster, _ = installed
    hub = md("hub", "hf://acme/tiny@v1", tokenSecret={"name": "hf", "key": "hf-token"})
    refused = apply(cluster, hub, check=False)  # the previous release's CRD has no such field
    assert refused.returncode != 0 and "tokenSecret" in refused.stderr
    # README "Upgrading": the new CRDs first, then helm upgrade (which leaves crds/ alone)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    helm(cluster, "upgrade", "t", str(CHART), "-n", SYSTEM_NS, "--set", EVERYTHING)
    apply(cluster, hub)
    stored = get(cluster, "md", "hub", "-n", NS)
    assert stored["spec"]["model"]["tokenSecret"] == {"name": "hf", "key": "hf-token"}


def test_a_bad_uri_is_refused_by_the_api_server_naming_the_field(installed):
    cluster, _ = installed
    for uri, words in (("models/x", "must be an absolute path in the image"),
                       ("pvc://Bad_Claim/x", "expected pvc://CLAIM/PATH"), ("hf://only-org", "expected hf://ORG/NAME")):
        r = apply(cluster, md("bad", uri), check=False)
        assert r.returncode != 0 and "spec.model.uri" in r.stderr and words in r.stderr, r.stderr
    r = apply(cluster, md("bad", "/models/x", tokenSecret={"name": "hf"}), check=False)
    assert r.returncode != 0 and "tokenSecret is for hf:// models only" in r.stderr


def workers_gauge(op, deployment: str, state: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fleetwise_operator_workers" and sample.labels == {
                    "namespace": NS, "deployment": deployment, "state": state}:
                return sample.value
    return None


def test_the_operator_as_the_charts_service_account_gives_each_uri_its_pod(installed):
    cluster, _ = installed
    op = start_operator(cluster, operator_kubeconfig(cluster))
    try:
        apply(cluster, md("image", "/models/tiny"))
        apply(cluster, md("claim", "pvc://weights/llama/8b"))
        if cluster.kubectl("get", "md", "hub", "-n", NS, check=False).returncode != 0:
            apply(cluster, md("hub", "hf://acme/tiny@v1", tokenSecret={"name": "hf", "key": "hf-token"}))

        def pod(name: str) -> dict | None:
            items = get(cluster, "pods", "-n", NS, "-l", f"fleetwise.dev/deployment={name}")["items"]
            return items[0] if items else None

        pods = {n: wait_for(lambda n=n: pod(n), 90, what=f"{n}'s pod") for n in ("image", "claim", "hub")}
        # the quarantine alert's series: each deployment's workers by routability state
        wait_for(lambda: workers_gauge(op, "image", "serving") == 1, 30, what="serving workers counted")
        victim = pods["image"]["metadata"]["name"]
        cluster.kubectl("annotate", "pod", victim, "-n", NS, "fleetwise.dev/routability=quarantined")
        cluster.kubectl("label", "--overwrite", "pod", victim, "-n", NS, "fleetwise.dev/routable=false")
        wait_for(lambda: workers_gauge(op, "image", "quarantined") == 1, 60, what="the quarantined worker counted")
    finally:
        op.stop()
    image = pods["image"]["spec"]
    assert not image.get("initContainers") and "--model" in image["containers"][0]["args"]
    assert image["containers"][0]["args"][image["containers"][0]["args"].index("--model") + 1] == "/models/tiny"
    claim = pods["claim"]["spec"]
    [volume] = [v for v in claim["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    args = claim["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/var/lib/fleetwise/model/llama/8b"
    hub = pods["hub"]["spec"]
    [init] = hub["initContainers"]
    assert init["args"][:3] == ["model", "download", "hf://acme/tiny@v1"]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "hf-token"}
    assert any("emptyDir" in v and v["name"] == "model" for v in hub["volumes"])
    assert json.dumps(hub).count("/var/lib/fleetwise/model") >= 3  # init's mount and --out, the worker's mount
