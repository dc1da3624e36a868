"""The power loop closed through `fleetwise node-agent` on the real test control plane: kwok
worker pods on a GPU node, the agent as its own process with the chart's RBAC for it (list
and watch pods, nothing else), a stand-in NVML whose GPUs draw what their load asks under
their limit (tests/fake_nvml), a gRPC kubelet socket that says which pod holds which GPU, a
real Prometheus scraping the agent, and the operator with `--power-actuator node-agent`.

The budget is crossed: the operator writes caps on the low-priority pods, the agent applies
them to those pods' GPUs (and no other), their draw falls, and no worker is ever called. The
operator dies: the leases lapse on the agent's clock to the conservative fallback. The agent
stops: every GPU is back at its default limit."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from fleetwise.net import free_port
from fleetwise.procs import Process, answers_200, fleetwise_argv
from fleetwise.telemetry.prometheus_server import PrometheusServer
from fleetwise.testenv.cluster import (
    CHART,
    SYSTEM_NS,
    apply,
    create_namespace,
    ensure_built,
    get,
    gpu_node,
    operator_kubeconfig,
    start_cluster,
    start_operator,
    wait_for,
)

from .test_node_agent import FAKE_DIR, Kubelet, fake, list_answer

NS = "agent"
H100 = "NVIDIA-H100-80GB-HBM3"
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")]


def agent_kubeconfig(c) -> Path:
    """A kubeconfig for the chart's node-agent ServiceAccount, with the chart's RBAC for it."""
    rendered = subprocess.run([str(ensure_built() / "helm"), "template", "t", str(CHART), "--namespace", SYSTEM_NS,
                               "--show-only", "templates/node-agent.yaml", "--set", "nodeAgent.enabled=true"],
                              capture_output=True, text=True, check=True).stdout
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] != "DaemonSet":
            apply(c, doc)
    token = c.kubectl("create", "token", "t-fleetwise-node-agent", "-n", SYSTEM_NS, "--duration=1h").stdout.strip()
    return c.kubeconfig_for(token, "node-agent")


def limits(state: Path) -> list[float]:
    return [g["limit_mw"] / 1000 for g in fake.read_state(state)["gpus"]]


def test_caps_reach_the_gpus_through_the_node_agent_lapse_without_the_operator_and_go_on_exit(tmp_path):
    c = start_cluster(tmp_path / "k8s")
    kubelet, agent, op, prometheus = Kubelet(), None, None, None
    state = tmp_path / "nvml.json"
    fake.write_state(state, {"gpus": [fake.gpu(i, draw_w=650) for i in range(4)]})
    try:
        port = free_port()
        prometheus = PrometheusServer(tmp_path / "prometheus", {"node-agent": [f"127.0.0.1:{port}"]},
                                      scrape_interval=0.5).start()
        apply(c, gpu_node("h100-0", H100, labels={"row": "r1"}))
        create_namespace(c, NS)
        op = start_operator(c, operator_kubeconfig(c), extra_args=(
            "--prometheus-url", prometheus.url, "--power-period", "1", "--power-actuator", "node-agent"))
        for name, priority, replicas in (("batch", "Low", 2), ("chat", "High", 1)):
            apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
                      "metadata": {"name": name, "namespace": NS},
                      "spec": {"model": {"name": "tiny", "uri": "/models/tiny"}, "image": "fleetwise:1",
                               "mode": "Colocated", "priority": priority,
                               "mixed": {"replicas": replicas, "gpuType": "H100"}}})

        def running() -> list[str] | None:
            items = get(c, "pods", "-n", NS)["items"]
            ok = len(items) == 3 and all((p.get("status") or {}).get("phase") == "Running" for p in items)
            return sorted(p["metadata"]["name"] for p in items) if ok else None

        pods = wait_for(running, 90, what="three running pods")
        gpu_of = {pod: i for i, pod in enumerate(pods)}  # GPU 3: held by no pod
        kubelet.answer = list_answer({(NS, pod, "worker"): [f"GPU-{i:08d}-fake"] for pod, i in gpu_of.items()})
        agent = Process("node-agent", fleetwise_argv(
            "node-agent", "--node", "h100-0", "--port", str(port), "--host", "127.0.0.1", "--period", "0.5",
            "--pod-resources-socket", str(kubelet.socket), "--kubeconfig", str(agent_kubeconfig(c))),
            tmp_path / "agent.log", f"http://127.0.0.1:{port}", die_with_parent=True,
            # an empty entry would put the working folder, and its operator/, before the standard library
            env={"PYTHONPATH": os.pathsep.join(p for p in (str(FAKE_DIR), os.environ.get("PYTHONPATH")) if p),
                 "FAKE_NVML_STATE": str(state)}).start()
        wait_for(lambda: answers_200(agent.url + "/metrics", timeout=2), 60, what="the agent's /metrics")

        # 3 x 650 W against 2100 W: over the cap threshold (1890 W), under the emergency one
        apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "PowerBudget", "metadata": {"name": "row-1"},
                  "spec": {"nodeSelector": {"row": "r1"}, "limitWatts": 2100, "minGpuCapWatts": 200}})
        batch = [gpu_of[p] for p in pods if p.startswith("batch")]
        chat = [gpu_of[p] for p in pods if p.startswith("chat")]
        wait_for(lambda: any(limits(state)[i] < 650 for i in batch), 60, what="a low-priority GPU capped")
        st = wait_for(lambda: (s := get(c, "powerbudget", "row-1").get("status") or {}).get("measuredWatts", 9e9)
                      < 1890 and s, 60, what="measured power back under the cap threshold")
        assert st["failures"] == []  # no worker was asked: the annotation is the only path
        assert {w["pod"] for w in st["cappedWorkers"]} <= {p for p in pods if p.startswith("batch")}
        now = limits(state)
        assert all(now[i] == 700 for i in chat) and now[3] == 700
        for name in (p for p in pods if p.startswith("batch")):
            intent = (get(c, "pod", name, "-n", NS)["metadata"].get("annotations") or {}).get(
                "fleetwise.dev/power-cap")
            if intent is not None:
                assert json.loads(intent)["watts"] == now[gpu_of[name]]
        page = httpx.get(agent.url + "/metrics", timeout=10).text
        assert any(line.startswith("fleetwise_power_cap_watts{") and f'namespace="{NS}"' in line
                   and 'pod="batch' in line for line in page.splitlines())

        # the operator dies: caps are not renewed, and lapse on the agent's clock to 0.6 x 700 W
        op.stop(kill=True)
        op = None
        capped = [i for i in batch if limits(state)[i] < 700]
        wait_for(lambda: all(limits(state)[i] == 420 for i in capped), 40, what="leases lapsed to the fallback")

        agent.stop()
        agent = None
        assert limits(state) == [700.0] * 4  # every default restored on exit
    finally:
        for p in (agent, op, prometheus):
            if p is not None:
                p.stop()
        kubelet.stop()
        c.stop()
