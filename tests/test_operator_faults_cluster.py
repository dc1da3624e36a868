"""The operator's fault loop against the real test control plane: six kwok worker pods of one
deployment on three two-GPU nodes, a stand-in Prometheus whose series make one pod, then both
pods of one node, the odd ones out, the operator with the chart's RBAC and a real admin API.
A FaultPolicy quarantines the slow pod (label, Events, status, an incident in the admin
store), then, with the admin API down, cordons the bad node, drains its pods and says the
admin API is unreachable. A second policy's RestartPod deletes an odd pod and its replacement
is placed on another node than the one it left."""

import json
import time

import httpx
import pytest
import yaml

from fleetwise.admin.auth import Role, token_entry
from fleetwise.procs import Process, fleetwise_argv, wait_healthy
from fleetwise.testenv.cluster import (
    address_map,
    apply,
    create_namespace,
    get,
    gpu_node,
    operator_kubeconfig,
    start_cluster,
    start_operator,
    wait_for,
)

from .stand_in_prometheus import StandInPrometheus
from .workers import free_port

NS = "faults"
A100 = "NVIDIA-A100-SXM4-80GB"
ADMIN_TOKEN, OPERATOR_TOKEN = "faults-admin-token-0123456789", "faults-operator-token-0123456789"
pytestmark = pytest.mark.cluster


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    c = start_cluster(workdir / "k8s")
    prom = StandInPrometheus().start()
    op = api = None
    try:
        for i in range(3):
            apply(c, gpu_node(f"a100-{i}", A100, gpus=2))
        create_namespace(c, NS)
        tokens, operator_token = workdir / "tokens.yaml", workdir / "operator-admin-token"
        tokens.write_text(yaml.safe_dump({"tokens": [token_entry("ops", Role.ADMIN, ADMIN_TOKEN),
                                                     token_entry("operator", Role.OPERATOR, OPERATOR_TOKEN)]}))
        operator_token.write_text(OPERATOR_TOKEN)
        kc = operator_kubeconfig(c)
        port = free_port()
        api = Process("admin", fleetwise_argv("admin", "--tokens", str(tokens), "--database", str(workdir / "admin.db"),
                                              "--host", "127.0.0.1", "--port", str(port), "--kubeconfig", str(kc)),
                      workdir / "admin.log", f"http://127.0.0.1:{port}", die_with_parent=True).start()
        wait_healthy([api], 60, ready=lambda p: _answers(p.url + "/healthz"))
        op = start_operator(c, kc, extra_args=("--prometheus-url", prom.url, "--admin-url", api.url,
                                               "--admin-token-file", str(operator_token)))
        apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
                  "metadata": {"name": "chat", "namespace": NS},
                  "spec": {"model": {"name": "tiny", "uri": "/models/tiny"}, "image": "fleetwise:1",
                           "mode": "Colocated", "mixed": {"replicas": 6, "gpuType": "A100"}}})
        def running() -> list[dict]:
            return [p for p in get(c, "pods", "-n", NS)["items"] if (p.get("status") or {}).get("phase") == "Running"]
        pods = wait_for(lambda: len(r := running()) == 6 and r, 90, what="six running pods")
        # each pod answers nowhere: the stand-in Prometheus is all the loop reads about them
        workers = {p["metadata"]["name"]: (p["spec"]["nodeName"], f"127.0.0.1:{31000 + i}")
                   for i, p in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"]))}
        address_map(c).write_text(json.dumps({f"{NS}/{name}": {"url": f"http://{inst}", "internal": f"http://{inst}"}
                                              for name, (_, inst) in workers.items()}))
        yield c, prom, workers, api
    finally:
        if op is not None:
            op.stop()
        if api is not None:
            api.stop()
        prom.stop()
        c.stop()


def series(workers: dict, slow: set[str]) -> dict:
    """One window's step seconds and tokens: 2 ms per token, 6 ms for the slow ones."""
    return {"fleetwise_step_seconds_sum": [({"instance": inst}, 6.0 if name in slow else 2.0)
                                           for name, (_, inst) in workers.items()],
            "fleetwise_batch_tokens_sum": [({"instance": inst}, 1000.0) for _, inst in workers.values()]}


def policy() -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "FaultPolicy",
            "metadata": {"name": "peers", "namespace": NS},
            "spec": {"detection": {"windowSeconds": 10, "minPeers": 3, "consecutiveWindows": 1},
                     "remediation": {"actions": ["Quarantine", "CordonNode"], "maxUnavailableFraction": 0.25,
                                     "cooldownSeconds": 60}}}


def events(c, ns: str, name: str) -> str:
    return c.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}").stdout


def status(c) -> dict:
    return get(c, "faultpolicy", "peers", "-n", NS).get("status") or {}


def test_a_fault_policy_quarantines_the_odd_pod_out_then_cordons_a_bad_node(setup):
    c, prom, workers, admin = setup
    api = admin.url + "/api/v1"
    odd = sorted(workers)[0]
    prom.set(series(workers, {odd}))
    t0 = time.monotonic()
    apply(c, policy())
    pod = wait_for(lambda: (p := get(c, "pod", odd, "-n", NS))["metadata"]["labels"].get("fleetwise.dev/routable")
                   == "false" and p, 30, what="the odd pod quarantined")
    took = time.monotonic() - t0
    assert pod["metadata"]["annotations"]["fleetwise.dev/routability"] == "quarantined"
    assert "out of its peers" in pod["metadata"]["annotations"]["fleetwise.dev/routability-reason"]
    assert "Quarantined" in events(c, NS, odd)
    st = wait_for(lambda: (s := status(c)).get("quarantined") and s, 20, what="the status")
    assert [q["pod"] for q in st["quarantined"]] == [odd] and st["workers"] == 6 and st["lastWindowTime"]
    inc = st["incidents"][0]
    assert (inc["kind"], inc["target"], inc["state"]) == ("worker", odd, "Remediated"), st
    assert inc["actions"] == ["Quarantine: done"] and inc["group"].startswith(f"{NS}/chat/mixed/")
    assert inc["evidence"]["score"] > 4 and st["openCount"] == 0
    scores = {x["worker"]: x["score"] for x in st["scores"]}
    # the odd one is scored in the window that found it, and not after (out of routing, it has no peers)
    assert scores.get(odd, 100) > 4 and all(scores[w] < 4 for w in workers if w != odd), scores
    conds = {x["type"]: x for x in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    assert conds["AdminReachable"]["status"] == "True"
    on_policy = events(c, NS, "peers")
    assert "FaultIncident" in on_policy and "FaultAction" in on_policy
    assert set(c.kubectl("get", "faultpolicy", "peers", "-n", NS).stdout.split()[:6]) >= {"OPEN", "READY", "DEGRADED"}

    h = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    found = wait_for(lambda: httpx.get(f"{api}/incidents", headers=h, params={"subject": odd}).json()["items"], 20,
                     what="the incident in the admin store")
    assert (found[0]["kind"], found[0]["subject_kind"], found[0]["namespace"]) == ("slow_worker", "worker", NS)
    assert found[0]["source"] == "operator" and any(e["signal"] == "score" and e["value"] > 4
                                                    for e in found[0]["evidence"])
    done = httpx.get(f"{api}/actions/remediation", headers=h).json()["items"]
    assert any(a["verb"] == "quarantine" and a["target"] == odd and a["outcome"] == "done" for a in done), done

    # the admin API goes away; both pods of a node with no quarantined pod go bad together: the node
    # is cordoned and its pods drained all the same, and the policy says its records wait (that they
    # arrive once it is back is tests/test_admin_sink.py's)
    admin.stop()
    by_node: dict[str, list[str]] = {}
    for name, (node, _) in workers.items():
        by_node.setdefault(node, []).append(name)
    node, pair = next((n, ps) for n, ps in sorted(by_node.items()) if odd not in ps and len(ps) == 2)
    prom.set(series(workers, {odd, *pair}))
    try:
        wait_for(lambda: get(c, "node", node)["spec"].get("unschedulable"), 40, what="the node cordoned")
    except AssertionError as e:
        pods = [(p["metadata"]["name"], p["spec"].get("nodeName"), p["metadata"].get("annotations"))
                for p in get(c, "pods", "-n", NS)["items"]]
        raise AssertionError(f"{e}; the policy's status: {status(c)}; {workers}; {pods}; {prom.series}") from None
    assert "Cordoned" in events(c, "default", node)
    st = wait_for(lambda: (s := status(c)).get("cordoned") and s, 20, what="the cordon in the status")
    assert st["cordoned"][0]["node"] == node and "out of its peers" in st["cordoned"][0]["reason"]
    inc = next(i for i in st["incidents"] if i["kind"] == "node")
    assert inc["target"] == node and inc["state"] == "Remediated" and set(inc["evidence"]) == set(pair)
    assert inc["actions"][0].startswith("CordonNode: done; drained ")
    for name in pair:  # drained: out of routing, then gone once the drain runs out
        p = get(c, "pods", "-n", NS, "--field-selector", f"metadata.name={name}")["items"]
        assert not p or p[0]["metadata"]["labels"].get("fleetwise.dev/routable") == "false"
    down = wait_for(lambda: next((x for x in status(c)["conditions"] if x["type"] == "AdminReachable"
                                  and x["status"] == "False"), None), 30, what="AdminReachable False")
    assert "wait in the queue" in down["message"] and "AdminReachableUnreachable" in events(c, NS, "peers")
    print(f"quarantined after {took:.1f} s")


def test_a_restart_remediation_replaces_the_pod_away_from_its_node(setup):
    """Three pods on two two-GPU nodes (two on h100-0): the odd one out on h100-0 is deleted and
    its replacement goes to h100-1, where spread alone would put it back (equal counts, equal
    free GPUs, h100-0 first by name): h100-0 is marked suspect."""
    c, prom, _, _ = setup
    ns, h100 = "restarts", "NVIDIA-H100-80GB-HBM3"
    for i in range(2):
        apply(c, gpu_node(f"h100-{i}", h100, gpus=2))
    create_namespace(c, ns)
    apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
              "metadata": {"name": "echo", "namespace": ns},
              "spec": {"model": {"name": "tiny", "uri": "/models/tiny"}, "image": "fleetwise:1",
                       "mode": "Colocated", "mixed": {"replicas": 3, "gpuType": "H100"}}})

    def running() -> dict[str, str]:
        return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in get(c, "pods", "-n", ns)["items"]
                if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}
    placed = wait_for(lambda: len(r := running()) == 3 and r, 60, what="three running pods")
    odd = sorted(name for name, node in placed.items() if node == "h100-0")[0]
    workers = {name: (node, f"127.0.0.1:{32000 + i}") for i, (name, node) in enumerate(sorted(placed.items()))}
    addresses = json.loads(address_map(c).read_text())
    address_map(c).write_text(json.dumps(addresses | {f"{ns}/{name}": {"url": f"http://{inst}",
                                                                        "internal": f"http://{inst}"}
                                                       for name, (_, inst) in workers.items()}))
    prom.set(series(workers, {odd}))
    apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "FaultPolicy",
              "metadata": {"name": "restarts", "namespace": ns},
              "spec": {"detection": {"windowSeconds": 10, "minPeers": 3, "consecutiveWindows": 1},
                       "remediation": {"actions": ["RestartPod"], "maxUnavailableFraction": 0.34,
                                       "cooldownSeconds": 60}}})
    now = wait_for(lambda: odd not in (r := running()) and len(r) == 3 and r, 60, what="the odd pod replaced")
    [new] = set(now) - set(placed)
    assert now[new] == "h100-1", now
    taints = get(c, "node", "h100-0")["spec"].get("taints") or []
    assert {"key": "fleetwise.dev/suspect", "effect": "PreferNoSchedule"} in taints, taints
    assert "Restarting" in events(c, ns, odd) and "MarkedSuspect" in events(c, "default", "h100-0")
    st = wait_for(lambda: (s := get(c, "faultpolicy", "restarts", "-n", ns).get("status") or {}).get("incidents")
                  and s, 20, what="the incident in the status")
    inc = st["incidents"][0]
    assert (inc["target"], inc["state"], inc["actions"]) == (odd, "Remediated", ["RestartPod: done"]), inc


def test_the_crd_takes_route_around_by_default_and_keeps_the_avoided_links_in_the_status(setup):
    c = setup[0]
    nobody = {"matchLabels": {"fleetwise.dev/team": "nobody"}}  # its loop watches no pod
    refused = apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "FaultPolicy",
                        "metadata": {"name": "bad", "namespace": NS},
                        "spec": {"selector": nobody, "remediation": {"actions": ["Reroute"]}}}, check=False)
    assert refused.returncode != 0 and "RouteAround" in refused.stderr, refused.stderr  # the supported values
    apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "FaultPolicy",
              "metadata": {"name": "links", "namespace": NS},
              "spec": {"selector": nobody, "detection": {"windowSeconds": 3600}}})
    try:
        fp = wait_for(lambda: (p := get(c, "faultpolicy", "links", "-n", NS)).get("status", {}).get("lastWindowTime")
                      and p, 30, what="the policy's first window")
        assert fp["spec"]["remediation"]["actions"] == ["Quarantine", "RestartPod", "RouteAround"]
        assert fp["status"]["avoided"] == [] and fp["status"]["workers"] == 0
        link = {"prefill": "chat-prefill-0", "decode": "chat-decode-1", "until": "2030-01-01T00:00:00Z",
                "reason": "link chat-prefill-0->chat-decode-1 out of its peers"}
        c.kubectl("patch", "faultpolicy", "links", "-n", NS, "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"avoided": [link]}}))
        assert get(c, "faultpolicy", "links", "-n", NS)["status"]["avoided"] == [link]  # the schema keeps it
        bad = c.kubectl("patch", "faultpolicy", "links", "-n", NS, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"avoided": [{**link, "until": "tomorrow"}]}}), check=False)
        assert bad.returncode != 0 and "until" in bad.stderr, bad.stderr
    finally:
        c.kubectl("delete", "faultpolicy", "links", "-n", NS, "--ignore-not-found")
