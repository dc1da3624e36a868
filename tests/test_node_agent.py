"""`fleetwise node-agent` on a machine with no GPU: a stand-in `pynvml` (tests/fake_nvml, 2 to 8
GPUs, one lost at start, one lost while running, one that refuses limits) answers as NVML
does; the kubelet's pod-resources API is a real gRPC server on a unix socket answering in
protobuf's wire format. The agent applies each pod's cap to the GPUs that pod holds, lapses
it to the fallback and then to the default, restores every default on exit, and its
/metrics page passes promtool and is scraped by a real Prometheus under the DCGM names the
power loop queries. NVML on a real GPU is not tested here."""

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import generate_latest, start_http_server

from fleetwise.net import free_port
from fleetwise.operator.node_agent import CapIntent, NodeAgent, cap_intent
from fleetwise.operator.pod_resources import Holder, PodResourcesError, gpu_holders, list_gpu_holders
from fleetwise.telemetry import nvml
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer

FAKE_DIR = Path(__file__).parent / "fake_nvml"
_spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_DIR / "pynvml.py")
assert _spec is not None and _spec.loader is not None
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)
NOW = 1_700_000_000.0


@pytest.fixture
def gpus_file(tmp_path, monkeypatch):
    """make(n) -> the fake's state file with n H100s; NVML answers from it in this process."""
    def make(n: int, **changes) -> Path:
        state = tmp_path / "nvml.json"
        gpus = [fake.gpu(i) for i in range(n)]
        for index, fields in changes.items():
            gpus[int(index.removeprefix("gpu"))].update(fields)
        fake.write_state(state, {"gpus": gpus})
        monkeypatch.setenv("FAKE_NVML_STATE", str(state))
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(nvml, "_initialised", False)
        return state
    return make


def limits(state: Path) -> list[float]:
    return [g["limit_mw"] / 1000 for g in fake.read_state(state)["gpus"]]


# -- the kubelet's pod-resources API -------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def list_answer(pods: dict[tuple[str, str, str], list[str]], resource: str = "nvidia.com/gpu") -> bytes:
    """A ListPodResourcesResponse: (namespace, pod, container) -> device ids."""
    out = b""
    for (ns, pod, container), ids in pods.items():
        devices = _field(1, resource.encode()) + b"".join(_field(2, i.encode()) for i in ids)
        cpus = _field(3, _varint(4) + _varint(5))  # packed cpu_ids: skipped
        c = _field(1, container.encode()) + _field(2, devices) + cpus
        out += _field(1, _field(1, pod.encode()) + _field(2, ns.encode()) + _field(3, c) + _varint(4 << 3) + b"\x01")
    return out


class Kubelet:
    """A gRPC server on a unix socket with `v1.PodResourcesLister/List`, answering `answer`."""

    def __init__(self) -> None:
        self.socket = Path(tempfile.mkdtemp(prefix="kl", dir="/tmp")) / "kubelet.sock"
        self.answer = b""
        handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            "List": grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.answer,
                                                        request_deserializer=lambda b: b,
                                                        response_serializer=lambda b: b)})
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)
        shutil.rmtree(self.socket.parent, ignore_errors=True)


@pytest.fixture
def kubelet():
    k = Kubelet()
    yield k
    k.stop()


def test_the_kubelets_answer_names_each_gpus_pod_over_real_grpc(kubelet):
    kubelet.answer = list_answer({("models", "chat-0", "worker"): ["GPU-a", "GPU-b"],
                                  ("models", "batch-0", "worker"): ["GPU-c"]})
    kubelet.answer += list_answer({("kube-system", "nic", "c"): ["eth1"]}, resource="example.com/nic")
    assert list_gpu_holders(str(kubelet.socket)) == {
        "GPU-a": Holder("models", "chat-0", "worker"), "GPU-b": Holder("models", "chat-0", "worker"),
        "GPU-c": Holder("models", "batch-0", "worker")}
    with pytest.raises(PodResourcesError, match=r"nowhere\.sock"):
        list_gpu_holders("/tmp/nowhere.sock", timeout=1)
    with pytest.raises(PodResourcesError, match="truncated"):
        gpu_holders(kubelet.answer[:-3])


# -- the agent -----------------------------------------------------------------------------------

def agent_for(n: int, holders: dict[str, Holder], intents: dict, **kw) -> NodeAgent:
    return NodeAgent("gpu-node-1", nvml.all_gpus()[0], lambda: intents, lambda: holders, **kw)


@pytest.mark.parametrize("n", [2, 8])
def test_a_pods_cap_goes_to_its_gpus_lapses_to_the_fallback_then_the_default_when_it_goes(gpus_file, n):
    state = gpus_file(n)
    held = {f"GPU-{i:08d}-fake": Holder("models", "batch-0", "worker") for i in range(n - 1)}
    held[f"GPU-{n - 1:08d}-fake"] = Holder("models", "chat-0", "worker")
    intents: dict = {("models", "batch-0"): CapIntent(300.0, NOW + 20, 420.0), ("models", "chat-0"): None}
    agent = agent_for(n, held, intents)
    agent.step(NOW)
    assert limits(state) == [300.0] * (n - 1) + [700.0]
    calls = len(fake.read_state(state)["set_calls"])
    agent.step(NOW + 1)  # in force already: NVML is not asked again
    assert len(fake.read_state(state)["set_calls"]) == calls
    agent.step(NOW + 21)  # not renewed: the fallback
    assert limits(state) == [420.0] * (n - 1) + [700.0]
    intents[("models", "batch-0")] = CapIntent(250.0, NOW + 40, None)  # renewed, and high priority's lease
    agent.step(NOW + 22)
    assert limits(state) == [250.0] * (n - 1) + [700.0]
    agent.step(NOW + 41)
    assert limits(state) == [700.0] * n
    intents[("models", "batch-0")] = CapIntent(250.0, NOW + 80, 420.0)
    agent.step(NOW + 42)
    held.clear()  # the pod went: the kubelet gave its GPUs back
    agent.step(NOW + 43)
    assert limits(state) == [700.0] * n and agent.applied == {}


def test_a_gpu_lost_at_start_is_left_out_one_lost_later_is_counted_and_the_rest_go_on(gpus_file):
    state = gpus_file(4, gpu3={"lost": True}, gpu2={"deny_set": True})
    gpus, failed = nvml.all_gpus()
    assert [g.index for g in gpus] == [0, 1, 2] and "GPU 3" in failed[0] and "GPU is lost" in failed[0]
    held = {f"GPU-{i:08d}-fake": Holder("models", "batch-0", "worker") for i in range(3)}
    intents = {("models", "batch-0"): CapIntent(300.0, NOW + 20, 420.0)}
    agent = NodeAgent("gpu-node-1", gpus, lambda: intents, lambda: held)
    s = fake.read_state(state)
    s["gpus"][1]["lost"] = True
    fake.write_state(state, s)
    agent.step(NOW)
    assert limits(state)[:3] == [300.0, 700.0, 700.0]  # 1 lost, 2 refuses; 0 capped all the same
    page = generate_latest(agent.registry).decode()
    assert 'fleetwise_node_agent_errors_total{gpu="1",what="gpu_read"} 1.0' in page
    assert 'fleetwise_node_agent_errors_total{gpu="2",what="set_limit"} 1.0' in page
    power = [line for line in page.splitlines() if line.startswith("DCGM_FI_DEV_POWER_USAGE{")]
    assert len(power) == 2 and not any('gpu="1"' in line for line in power)  # no sample for the lost GPU
    caps = [line for line in page.splitlines() if line.startswith("fleetwise_power_cap_watts{")]
    assert len(caps) == 1 and 'gpu="0"' in caps[0] and caps[0].endswith(" 300.0")


def test_the_kubelet_away_keeps_the_last_answer_so_leases_still_lapse(gpus_file):
    state = gpus_file(2)
    answers: list = [{"GPU-00000000-fake": Holder("models", "batch-0", "worker")}]

    def holders() -> dict:
        if not answers:
            raise PodResourcesError("the kubelet's pod-resources API: UNAVAILABLE")
        return answers.pop()

    intents = {("models", "batch-0"): CapIntent(300.0, NOW + 20, 420.0)}
    agent = NodeAgent("gpu-node-1", nvml.all_gpus()[0], lambda: intents, holders)
    agent.step(NOW)
    agent.step(NOW + 30)
    assert limits(state) == [420.0, 700.0]
    assert 'what="pod_resources"} 1.0' in generate_latest(agent.registry).decode()


def test_on_exit_every_gpu_is_back_at_its_default(gpus_file):
    state = gpus_file(3, gpu1={"limit_mw": 350_000})  # a limit left by an agent that crashed
    held = {"GPU-00000000-fake": Holder("models", "batch-0", "worker")}
    agent = agent_for(3, held, {("models", "batch-0"): CapIntent(300.0, NOW + 20, None)})
    agent.step(NOW)
    assert limits(state) == [300.0, 700.0, 700.0]  # no pod holds GPU 1: its default, at once
    agent.step(NOW)
    agent.restore_all()
    assert limits(state) == [700.0] * 3 and "fleetwise_power_cap_watts{" not in generate_latest(
        agent.registry).decode()


def test_the_annotation_the_operator_writes_is_read_and_a_bad_one_is_none():
    import json
    pod = {"metadata": {"annotations": {"fleetwise.dev/power-cap": json.dumps(
        {"watts": 300, "until": NOW, "fallbackWatts": 420, "reason": "over the cap threshold"})}}}
    assert cap_intent(pod) == CapIntent(300.0, NOW, 420.0, "over the cap threshold")
    pod["metadata"]["annotations"]["fleetwise.dev/power-cap"] = '{"watts": "lots"}'
    assert cap_intent(pod) is None and cap_intent({"metadata": {}}) is None


def test_the_metrics_page_is_dcgms_with_pod_labels_an_xid_and_passes_promtool(gpus_file, tmp_path):
    state = gpus_file(2, gpu1={"ecc": False})
    s = fake.read_state(state)
    s["xid"] = [[1, 79]]
    fake.write_state(state, s)
    gpus = nvml.all_gpus()[0]
    xid = nvml.XidWatch(gpus, wait_ms=50)
    try:
        held = {"GPU-00000000-fake": Holder("models", "batch-0", "worker")}
        agent = NodeAgent("gpu-node-1", gpus, lambda: {("models", "batch-0"): CapIntent(300.0, NOW + 20, None)},
                          lambda: held, xid)
        deadline = time.monotonic() + 5
        while xid.last[1] != 79 and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.step(NOW)
        page = generate_latest(agent.registry).decode()
    finally:
        xid.close()
    lint = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=page,
                          capture_output=True, text=True)
    # DCGM's own label names (modelName, UUID, Hostname) are camelCase, which promtool's style
    # lint (exit code 3) points out; anything else it says is a fault of ours
    problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                if line.strip() and "label names should be written in 'snake_case'" not in line]
    assert lint.returncode in (0, 3) and not problems, lint.stdout + lint.stderr
    assert ('DCGM_FI_DEV_POWER_USAGE{Hostname="gpu-node-1",UUID="GPU-00000000-fake",container="worker",gpu="0",'
            'modelName="NVIDIA H100 80GB HBM3",namespace="models",pod="batch-0"} 300.0') in page
    assert 'DCGM_FI_DEV_XID_ERRORS{Hostname="gpu-node-1",UUID="GPU-00000001-fake"' in page
    assert [line.rsplit(" ", 1)[1] for line in page.splitlines() if line.startswith("DCGM_FI_DEV_XID_ERRORS{")] == [
        "0.0", "79.0"]
    ecc = [line for line in page.splitlines() if line.startswith("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{")]
    assert len(ecc) == 1 and 'gpu="0"' in ecc[0]  # GPU 1 has no ECC: no sample, not a zero
    assert 'fleetwise_power_cap_expiry_timestamp_seconds{UUID="GPU-00000000-fake"' in page
    quiet = NodeAgent("gpu-node-1", gpus, dict, dict, gpu_metrics=False)
    quiet.step(NOW)
    assert "DCGM_" not in generate_latest(quiet.registry).decode()  # a DCGM exporter exports them there


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
def test_a_real_prometheus_scrapes_the_agent_and_the_power_loops_query_finds_the_pods_draw(gpus_file, tmp_path):
    gpus_file(4, gpu0={"draw_mw": 650_000}, gpu1={"draw_mw": 600_000}, gpu2={"draw_mw": 200_000})
    held = {f"GPU-{i:08d}-fake": Holder("models", "batch-0", "worker") for i in range(2)}
    held["GPU-00000002-fake"] = Holder("models", "chat-0", "worker")
    agent = NodeAgent("gpu-node-1", nvml.all_gpus()[0], lambda: {("models", "batch-0"): CapIntent(
        400.0, time.time() + 60, None)}, lambda: held)
    agent.step()
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=agent.registry)
    prometheus = PrometheusServer(tmp_path / "prometheus", {"node-agent": [f"127.0.0.1:{port}"]},
                                  scrape_interval=0.5).start()
    try:
        client = PrometheusClient(prometheus.url)
        query = 'sum by (namespace, pod) (DCGM_FI_DEV_POWER_USAGE{namespace="models"})'
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(client.instant(query)) < 2:
            time.sleep(0.5)
        drawn = {s.labels["pod"]: s.value for s in client.instant(query)}
        assert drawn == {"batch-0": 800.0, "chat-0": 200.0}  # two GPUs held under 400 W, one at its load
        up = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": "up"}, timeout=10).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        prometheus.stop()
        server.shutdown()
