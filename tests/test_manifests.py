"""What the operator and the chart run: worker pods and the chart's pods under Kubernetes'
"restricted" Pod Security Standard, with a read-only root filesystem and a writable /tmp."""

import subprocess

import pytest
import yaml

from fleetwise.operator.manifests import worker_pod
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
