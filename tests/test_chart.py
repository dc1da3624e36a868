"""The Helm chart as a platform team installs it: `helm lint`, `helm template` and the values
schema with the project's real Helm; the monitoring objects, alerts and dashboards it renders.
(tests/test_chart_install.py installs it into the test control plane.)"""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fleetwise.operator.manifests import labels as worker_labels
from fleetwise.operator.manifests import worker_pod
from fleetwise.spec import ModelDeploymentSpec
from fleetwise.telemetry import catalog

pytestmark = pytest.mark.cluster  # helm comes with the test control plane's binaries

ROOT = Path(__file__).resolve().parents[1]
EVERYTHING = ["--set", "admin.enabled=true,serviceMonitor.enabled=true,prometheusRule.enabled=true,"
              "dashboards.enabled=true"]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    from fleetwise.testenv.cluster import ensure_built
    return subprocess.run([str(ensure_built() / "helm"), *args], capture_output=True, text=True, check=check)


def render(*args: str) -> list[dict]:
    from fleetwise.testenv.cluster import CHART
    out = helm("template", "t", str(CHART), "--namespace", "sys", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_helm_lint_passes_with_every_feature_on():
    from fleetwise.testenv.cluster import CHART
    r = helm("lint", str(CHART), "--strict", *EVERYTHING, check=False)
    assert r.returncode == 0 and "0 chart(s) failed" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("value, words", [
    ("router.port=http", "at '/router/port': got string, want integer"),
    ("router.policy=random", "at '/router/policy': value must be one of"),
    ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
    ("routr.enabled=false", "additional properties 'routr' not allowed"),
    ("serviceMonitor.interval=soon", "at '/serviceMonitor/interval'"),
    ("admin.database=mysql://db", "at '/admin/database'"),
    ("prometheusRule.kvRecomputeRatio=5", "at '/prometheusRule/kvRecomputeRatio'"),
    ("nodeAgent.period=0", "at '/nodeAgent/period'"),
    ("nodeAgent.podResourcesPath=kubelet", "at '/nodeAgent/podResourcesPath'"),
])
def test_a_wrong_value_fails_naming_it(value, words):
    from fleetwise.testenv.cluster import CHART
    r = helm("template", "t", str(CHART), "--set", value, check=False)
    assert r.returncode != 0 and words in r.stderr, r.stderr


def test_the_router_is_probed_bounded_spread_and_kept_through_node_drains():
    docs = render()
    router = one(docs, "Deployment", "t-fleetwise-router")["spec"]["template"]["spec"]
    container = router["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    keys = {c["topologyKey"] for c in router["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    selector = {"app.kubernetes.io/instance": "t", "app.kubernetes.io/component": "router"}
    assert all(c["labelSelector"]["matchLabels"] == selector for c in router["topologySpreadConstraints"])
    for component in ("router", "operator"):
        pdb = one(docs, "PodDisruptionBudget", f"t-fleetwise-{component}")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
    # one replica: a budget would block every node drain
    single = render("--set", "router.replicas=1,operator.replicas=1")
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]


def test_the_monitors_select_what_serves_metrics():
    docs = render(*EVERYTHING)
    assert not [d for d in render() if d["apiVersion"].startswith("monitoring.coreos.com")]  # off by default
    service = one(docs, "Service", "t-fleetwise-router")
    monitor = one(docs, "ServiceMonitor", "t-fleetwise-router")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    operator = one(docs, "Deployment", "t-fleetwise-operator")["spec"]["template"]
    pod_monitor = one(docs, "PodMonitor", "t-fleetwise-operator")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= operator["metadata"]["labels"].items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in operator["spec"]["containers"][0]["ports"]}
    spec = ModelDeploymentSpec.model_validate({"model": {"name": "m", "uri": "/m"}, "image": "i", "mode": "Colocated",
                                               "mixed": {"replicas": 1, "gpuType": "H100"}})
    pod = worker_pod({"metadata": {"name": "m", "uid": "u"}}, spec, "mixed", "h")
    workers = one(docs, "PodMonitor", "t-fleetwise-workers")
    assert workers["spec"]["selector"]["matchLabels"].items() <= worker_labels("m", spec, "mixed").items()
    assert workers["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert workers["spec"]["namespaceSelector"] == {"any": True}
    scoped = render(*EVERYTHING, "--set", "operator.watchNamespaces={team-a,team-b}")
    assert one(scoped, "PodMonitor", "t-fleetwise-workers")["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a", "team-b"]}


def rule_expressions(docs: list[dict]) -> list[tuple[str, str]]:
    rule = one(docs, "PrometheusRule", "t-fleetwise")
    return [(r["alert"], r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


def test_the_alerts_pass_promtool_and_name_only_catalogued_metrics(tmp_path):
    from tests.promql import metric_names
    docs = render(*EVERYTHING)
    rule = one(docs, "PrometheusRule", "t-fleetwise")
    alerts = {name for name, _ in rule_expressions(docs)}
    assert {"FleetwiseNoReadyReplicas", "FleetwiseKVTransferFailures", "FleetwiseKVRecomputesHigh",
            "FleetwiseEngineStalled", "FleetwisePowerDomainOverThreshold", "FleetwiseIncidentsOpen",
            "FleetwiseWorkersQuarantined"} <= alerts
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0 and f"SUCCESS: {len(alerts)} rules found" in r.stdout, r.stdout + r.stderr
    known = {v for k, v in vars(catalog).items() if k.isupper() and isinstance(v, str)}
    known |= {n + s for n in known for s in ("_total", "_bucket", "_sum", "_count")}
    for name, expr in rule_expressions(docs):
        assert metric_names(expr) <= known, name
    # a threshold set in values reaches its expression
    tuned = rule_expressions(render(*EVERYTHING, "--set", "prometheusRule.engineStalledSeconds=90"))
    assert "> 90" in dict(tuned)["FleetwiseEngineStalled"]


def test_each_dashboard_is_a_configmap_for_grafanas_sidecar():
    files = sorted((ROOT / "dashboards").glob("*.json"))
    assert len(files) >= 4
    docs = render(*EVERYTHING, "--set", "dashboards.annotations.grafana_folder=fleetwise")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert len(maps) == len(files)
    for m, f in zip(sorted(maps, key=lambda m: m["metadata"]["name"]), files):
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert m["metadata"]["annotations"] == {"grafana_folder": "fleetwise"}
        assert json.loads(m["data"][f.name]) == json.loads(f.read_text())


def test_the_admin_api_is_off_until_enabled_and_then_gets_its_token():
    assert not [d for d in render() if "admin" in d["metadata"]["name"]]
    docs = render("--set", "admin.enabled=true,admin.port=8181")
    deployment = one(docs, "Deployment", "t-fleetwise-admin")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fleetwise", "admin"] and "--port=8181" in container["args"]
    secret = one(docs, "Secret", "t-fleetwise-admin-token")
    token = secret["stringData"]["token"]
    tokens = yaml.safe_load(secret["stringData"]["tokens.yaml"])["tokens"]
    assert tokens == [{"name": "chart-admin", "role": "admin", "sha256": hashlib.sha256(token.encode()).hexdigest()}]
    mounted = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert mounted[0]["secret"]["secretName"] == "t-fleetwise-admin-token"
    assert one(docs, "Service", "t-fleetwise-admin")["spec"]["ports"][0]["port"] == 8181
    # an existing Secret: the chart makes none
    own = render("--set", "admin.enabled=true,admin.tokenSecret=my-admin-tokens")
    assert not [d for d in own if d["kind"] == "Secret" and "admin" in d["metadata"]["name"]]


def test_the_packaged_chart_carries_the_dashboards_and_not_their_generator(tmp_path):
    import tarfile

    from fleetwise.testenv.cluster import CHART
    helm("package", str(CHART), "-d", str(tmp_path))
    [archive] = tmp_path.glob("fleetwise-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"fleetwise/dashboards/{p.name}" for p in (ROOT / "dashboards").glob("*.json")} <= names
    assert not [n for n in names if n.endswith(".py")]
    assert "fleetwise/values.schema.json" in names


def test_the_node_agent_is_off_by_default_and_on_gets_only_what_nvml_and_the_kubelet_need():
    assert not [d for d in render() if "node-agent" in d["metadata"]["name"]]
    operator_args = one(render(), "Deployment", "t-fleetwise-operator")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert not [a for a in operator_args if a.startswith("--power-actuator")]
    docs = render(*EVERYTHING, "--set", "nodeAgent.enabled=true,nodeAgent.gpuMetrics=false")
    agent = one(docs, "DaemonSet", "t-fleetwise-node-agent")["spec"]["template"]
    pod, [container] = agent["spec"], agent["spec"]["containers"]
    assert container["command"] == ["fleetwise", "node-agent"] and "--no-gpu-metrics" in container["args"]
    ctx = container["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] and not ctx["privileged"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # it takes no GPU from the workers
    [host] = [v for v in pod["volumes"] if "hostPath" in v]
    assert host["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] == host["name"])
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    role = one(docs, "ClusterRole", "t-fleetwise-node-agent")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = one(docs, "ClusterRoleBinding", "t-fleetwise-node-agent")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    monitor = one(docs, "PodMonitor", "t-fleetwise-node-agent")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= agent["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in container["ports"]}
    operator_args = one(docs, "Deployment", "t-fleetwise-operator")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--power-actuator=node-agent" in operator_args
