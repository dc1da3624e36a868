"""What the operator and the chart run: worker pods and the chart's pods under Kubernetes'
"restricted" Pod Security Standard, with a read-only root filesystem and a writable /tmp."""

import base64
import subprocess

import pytest
import yaml

from fleetwise.addresses import WORKER_INTERNAL_PORT, WORKER_PORT
from fleetwise.operator.manifests import TOKEN_SECRET, worker_pod
from fleetwise.spec import ModelDeploymentSpec

BODY = {"metadata": {"name": "llama", "namespace": "models", "uid": "u-1"}}
SPEC = ModelDeploymentSpec.model_validate({"model": {"name": "llama", "uri": "/models/llama"}, "image": "img:1",
                                           "prefill": {"replicas": 1, "gpuType": "H100"},
                                           "decode": {"replicas": 1, "gpuType": "A100"}})


def assert_restricted(pod_spec: dict, where: str) -> None:
    pod = pod_spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, where
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
    mounts = {v["name"] for v in pod_spec.get("volumes", []) if "emptyDir" in v}
    for container in pod_spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert any(m["mountPath"] == "/tmp" and m["name"] in mounts for m in container["volumeMounts"]), where
        assert {"name": "HOME", "value": "/tmp"} in container["env"], where


def test_worker_pods_run_restricted_without_an_api_token():
    pod = worker_pod(BODY, SPEC, "prefill", "abc")
    assert_restricted(pod["spec"], "worker")
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_worker_pods_mount_the_internal_token_and_listen_twice():
    pod = worker_pod(BODY, SPEC, "decode", "abc")
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--port") + 1] == str(WORKER_PORT)
    assert args[args.index("--internal-port") + 1] == str(WORKER_INTERNAL_PORT)
    token_file = args[args.index("--internal-token-file") + 1]
    [volume] = [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == TOKEN_SECRET
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and token_file == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert {p["containerPort"] for p in container["ports"]} == {WORKER_PORT, WORKER_INTERNAL_PORT}
    # the kubelet probes the public port: it has no token
    probes = container["readinessProbe"], container["livenessProbe"]
    assert [probe["httpGet"]["port"] for probe in probes] == [WORKER_PORT, WORKER_PORT]


def helm_template(*args: str) -> list[dict]:
    from fleetwise.testenv.cluster import CHART, ensure_built
    rendered = subprocess.run([str(ensure_built() / "helm"), "template", "t", str(CHART), "--namespace", "sys", *args],
                              capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


@pytest.mark.cluster
def test_the_chart_keeps_the_workers_internal_port_to_the_router_and_the_workers():
    [policy] = [d for d in helm_template() if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "sys"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "fleetwise"}}
    public, internal = policy["spec"]["ingress"]
    assert public == {"ports": [{"port": WORKER_PORT, "protocol": "TCP"}]}  # probes, from anywhere
    assert internal["ports"] == [{"port": WORKER_INTERNAL_PORT, "protocol": "TCP"}]
    router, operator, workers = internal["from"]
    for peer, component in ((router, "router"), (operator, "operator")):  # the operator sends power caps
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "sys"}}
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "t",
                                                      "app.kubernetes.io/component": component}
    assert workers == {"podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "fleetwise"}}}
    scoped = [d for d in helm_template("--set", "operator.watchNamespaces={team-a,team-b}")
              if d["kind"] == "NetworkPolicy"]
    assert {d["metadata"]["namespace"] for d in scoped} == {"team-a", "team-b"}
    assert not [d for d in helm_template("--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]


@pytest.mark.cluster
def test_the_chart_makes_one_token_secret_that_the_router_and_the_operator_mount():
    docs = helm_template()
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "t-fleetwise-internal-token" and secret["metadata"]["namespace"] == "sys"
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    for d in (d for d in docs if d["kind"] == "Deployment"):
        spec = d["spec"]["template"]["spec"]
        [volume] = [v for v in spec["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "t-fleetwise-internal-token", d["metadata"]["name"]
        container = spec["containers"][0]
        [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["FLEETWISE_INTERNAL_TOKEN_FILE"] == f"{mount['mountPath']}/token", d["metadata"]["name"]


@pytest.mark.cluster
def test_the_charts_pods_run_restricted():
    from fleetwise.testenv.cluster import CHART, ensure_built
    rendered = subprocess.run([str(ensure_built() / "helm"), "template", "t", str(CHART), "--namespace", "sys"],
                              capture_output=True, text=True, check=True).stdout
    deployments = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"t-fleetwise-operator", "t-fleetwise-router"}
    for d in deployments:
        assert_restricted(d["spec"]["template"]["spec"], d["metadata"]["name"])


@pytest.mark.cluster
def test_with_watched_namespaces_the_operator_changes_things_only_there():
    from fleetwise.testenv.cluster import CHART, ensure_built

    def rbac(*args: str) -> list[dict]:
        rendered = subprocess.run([str(ensure_built() / "helm"), "template", "t", str(CHART), "--namespace", "sys",
                                   "--show-only", "templates/rbac.yaml", *args],
                                  capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(rendered) if d]

    def pod_verbs(doc: dict) -> set[str]:
        return {v for rule in doc["rules"] if "pods" in rule["resources"] for v in rule["verbs"]}

    def operator_roles(docs: list[dict], kind: str) -> dict[str, dict]:
        return {d["metadata"].get("namespace", ""): d for d in docs
                if d["kind"] == kind and d["metadata"]["name"] == "t-fleetwise-operator"}

    everywhere = rbac()
    assert pod_verbs(operator_roles(everywhere, "ClusterRole")[""]) >= {"create", "delete", "patch"}
    assert operator_roles(everywhere, "Role") == {}
    scoped = rbac("--set", "operator.watchNamespaces={team-a,team-b}")
    assert pod_verbs(operator_roles(scoped, "ClusterRole")[""]) == {"get", "list", "watch"}  # placement sees all
    roles = operator_roles(scoped, "Role")
    assert set(roles) == {"team-a", "team-b"}
    assert all(pod_verbs(r) == {"create", "delete", "patch"} for r in roles.values())
    # the internal token's copy: created and kept in the watched namespaces, that Secret only
    for role in roles.values():
        secrets = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
        assert {v for rule in secrets for v in rule["verbs"]} == {"create", "get", "patch"}
        assert all(rule.get("resourceNames") == ["fleetwise-internal-token"]
                   for rule in secrets if set(rule["verbs"]) & {"get", "patch"})
    assert not [rule for rule in operator_roles(scoped, "ClusterRole")[""]["rules"] if "secrets" in rule["resources"]]
    bindings = operator_roles(scoped, "RoleBinding")
    assert set(bindings) == {"team-a", "team-b"}
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "t-fleetwise-operator", "namespace": "sys"}]
               for b in bindings.values())


@pytest.mark.cluster
def test_the_router_serves_only_the_namespaces_the_operator_watches():
    from fleetwise.testenv.cluster import CHART, ensure_built
    rendered = subprocess.run([str(ensure_built() / "helm"), "template", "t", str(CHART), "--namespace", "sys",
                               "--set", "operator.watchNamespaces={team-a,team-b}",
                               "--show-only", "templates/router.yaml"], capture_output=True, text=True, check=True)
    [deployment] = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


def spec_with(uri: str, **model) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {"name": "llama", "uri": uri, **model}, "image": "img:1",
                                               "mode": "Colocated", "mixed": {"replicas": 1, "gpuType": "H100"}})


def model_arg(pod: dict) -> str:
    args = pod["spec"]["containers"][0]["args"]
    return args[args.index("--model") + 1]


def test_a_model_in_the_image_needs_no_volume_and_no_init_container():
    pod = worker_pod(BODY, spec_with("/models/llama"), "mixed", "abc")
    assert model_arg(pod) == "/models/llama"
    assert pod["spec"]["initContainers"] == []
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"tmp", "internal-token"}


def test_a_model_on_a_claim_is_mounted_read_only_and_loaded_from_its_path():
    pod = worker_pod(BODY, spec_with("pvc://weights/llama-3/8b"), "mixed", "abc")
    [volume] = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    [mount] = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert model_arg(pod) == f"{mount['mountPath']}/llama-3/8b"
    assert pod["spec"]["initContainers"] == []
    assert model_arg(worker_pod(BODY, spec_with("pvc://weights"), "mixed", "abc")) == mount["mountPath"]


def test_a_hub_model_is_downloaded_by_an_init_container_into_a_volume_the_worker_reads():
    pod = worker_pod(BODY, spec_with("hf://meta-llama/Llama-3.1-8B@0e9e39f", tokenSecret={"name": "hf",
                                                                                         "key": "hf-token"}),
                     "mixed", "abc")
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] not in ("tmp", "internal-token")]
    assert volume["emptyDir"] == {}
    [init] = pod["spec"]["initContainers"]
    assert init["image"] == "img:1"
    assert init["command"] == ["fleetwise"] and init["args"][:3] == ["model", "download",
                                                                     "hf://meta-llama/Llama-3.1-8B@0e9e39f"]
    out = init["args"][init["args"].index("--out") + 1]
    [init_mount] = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
    assert init_mount["mountPath"] == out and not init_mount.get("readOnly")
    [worker_mount] = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert worker_mount["readOnly"] is True and model_arg(pod) == worker_mount["mountPath"] == out
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "hf-token"}}
    # the init container runs restricted too, with its writable /tmp
    assert_restricted({"securityContext": pod["spec"]["securityContext"], "volumes": pod["spec"]["volumes"],
                       "containers": [init]}, "model-download")
    public = worker_pod(BODY, spec_with("hf://org/name"), "mixed", "abc")
    assert "HF_TOKEN" not in {e["name"] for e in public["spec"]["initContainers"][0]["env"]}
