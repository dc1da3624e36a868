"""The operator's power loop against the real test control plane: kwok pods with real worker
processes behind them (each a modelled A100 labelled with its pod's name, as the DCGM exporter
labels a GPU's series), a real Prometheus scraping them, the operator with the chart's RBAC.
A PowerBudget over the nodes writes its status, caps the pods (annotation, Event, the
worker's own cap), takes an edit at its next period, and lifts its caps when deleted; its
domain's draw and limit are on the operator's /metrics, and its periods read no pod by GET."""

import contextlib
import json
import shutil
import threading
import time

import httpx
import pytest

from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv, wait_healthy
from fleetwise.protocol import POWER_PATH
from fleetwise.telemetry.prometheus_server import PrometheusServer
from fleetwise.testenv.cluster import (
    INTERNAL_TOKEN,
    address_map,
    apply,
    create_namespace,
    get,
    gpu_node,
    operator_kubeconfig,
    start_cluster,
    start_operator,
    token_file,
    wait_for,
)

NS = "power"
A100 = "NVIDIA-A100-SXM4-80GB"
AUTH = {"authorization": f"Bearer {INTERNAL_TOKEN}"}
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("power")
    c = start_cluster(workdir / "k8s")
    prometheus = PrometheusServer(workdir / "prometheus", {"workers": []}, scrape_interval=0.5).start()
    workers: list[Process] = []
    op = None
    try:
        for i in range(2):
            apply(c, gpu_node(f"a100-{i}", A100, labels={"row": "r1"}))
        create_namespace(c, NS)
        op = start_operator(c, operator_kubeconfig(c), extra_args=("--prometheus-url", prometheus.url,
                                                                  "--power-period", "1"))
        apply(c, {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
                  "metadata": {"name": "batch", "namespace": NS},
                  "spec": {"model": {"name": "tiny", "uri": "/models/tiny"}, "image": "fleetwise:1",
                           "mode": "Colocated", "priority": "Low", "mixed": {"replicas": 2, "gpuType": "A100"}}})
        def running() -> list[dict] | None:  # both, or not yet: a pod still Pending would have no worker
            items = [p for p in get(c, "pods", "-n", NS)["items"] if (p.get("status") or {}).get("phase") == "Running"]
            return items if len(items) == 2 else None
        pods = wait_for(running, 90, what="two running pods")
        addresses = {}
        for pod in pods:
            name, port, internal = pod["metadata"]["name"], free_port(), free_port()
            w = Process(name, fleetwise_argv("worker", "--model", str(tiny_model_dir), "--role", "mixed",
                                             "--port", str(port), "--internal-port", str(internal),
                                             "--internal-token-file", str(token_file(c)), "--modelled-gpu", "A100"),
                        workdir / f"{name}.log", f"http://127.0.0.1:{port}", die_with_parent=True,
                        env={"POD_NAME": name, "POD_NAMESPACE": NS})
            workers.append(w.start())
            addresses[f"{NS}/{name}"] = {"url": w.url, "internal": f"http://127.0.0.1:{internal}"}
        address_map(c).write_text(json.dumps(addresses))
        wait_healthy(workers, 120)
        prometheus.set_targets({"workers": [w.url.removeprefix("http://") for w in workers]})
        yield c, addresses, op
    finally:
        for w in workers:
            w.stop()
        if op is not None:
            op.stop()
        prometheus.stop()
        c.stop()


def budget(limit: float) -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "PowerBudget", "metadata": {"name": "row-1"},
            "spec": {"nodeSelector": {"row": "r1"}, "limitWatts": limit, "minGpuCapWatts": 100}}


def status(c) -> dict:
    return get(c, "powerbudget", "row-1").get("status") or {}


def operator_series(op, name: str) -> dict[str, float]:
    """The samples of one metric on the operator's /metrics page, by their label text."""
    page = httpx.get(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=10).text
    return {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in page.splitlines() if line.startswith(name + "{")}


def pod_gets(op) -> float:
    return operator_series(op, "fleetwise_operator_api_requests_total").get('verb="get",resource="pods"', 0.0)


def worker_caps(addresses: dict) -> dict[str, float | None]:
    return {key.split("/")[1]: httpx.get(a["internal"] + POWER_PATH, headers=AUTH, timeout=10).json()["watts"]
            for key, a in addresses.items()}


class Load:
    """Long prompts sent straight to the workers' public ports from threads, until stopped."""

    def __init__(self, addresses: dict, threads: int = 6) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(a["url"], k), daemon=True)
                        for a in addresses.values() for k in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, url: str, k: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            prompt = [(13 * j + 7 * i + 101 * k) % 500 + 1 for j in range(800)]
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16},
                           timeout=60)

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_a_power_budget_caps_reports_takes_edits_and_lifts_its_caps_when_deleted(setup):
    c, addresses, op = setup
    # two idle A100s draw 110 W, under the release threshold of a 200 W budget; busy, well over it
    apply(c, budget(200))
    wait_for(lambda: status(c).get("state") == "Normal" and status(c)["measuredWatts"] < 160, 60, what="idle")
    assert operator_series(op, "fleetwise_power_domain_limit_watts") == {'domain="row-1"': 200.0}
    assert 0 < operator_series(op, "fleetwise_power_domain_watts")['domain="row-1"'] < 160
    load = Load(addresses)
    try:
        seen: list[dict] = [{}]

        def capped() -> dict | None:
            seen[0] = status(c)
            return seen[0] if seen[0].get("cappedCount", 0) >= 1 else None

        try:
            st = wait_for(capped, 60, what="caps")
        except AssertionError as e:
            raise AssertionError(f"{e}; the budget's status: {seen[0]}") from None
        gets = pod_gets(op)  # caps held and renewed, overrides looked for: from the watch cache
        time.sleep(3.5)  # three periods
        assert pod_gets(op) == gets
        assert st["state"] in ("Capping", "Emergency", "Releasing") and st["limitWatts"] == 200
        assert st["capThresholdWatts"] == pytest.approx(180) and st["telemetryAgeSeconds"] < 5
        assert {w["node"] for w in st["cappedWorkers"]} <= {"a100-0", "a100-1"}
        assert "threshold" in st["lastAction"] and st["lastActionTime"]
        capped_pods = [w["pod"] for w in st["cappedWorkers"]]
        caps = worker_caps(addresses)
        assert all(caps[p] is not None and 100 <= caps[p] < 400 for p in capped_pods), caps
        for name in capped_pods:
            pod = get(c, "pod", name, "-n", NS)
            intent = json.loads(pod["metadata"]["annotations"]["fleetwise.dev/power-cap"])
            assert intent["fallbackWatts"] == 0.6 * 400 and intent["until"] > time.time()  # Low: conservative
            assert "PowerCapped" in c.kubectl("get", "events", "-n", NS, "--field-selector",
                                              f"involvedObject.name={name}").stdout
        assert "Power" + st["state"] in c.kubectl("get", "events", "-n", "default", "--field-selector",
                                                  "involvedObject.name=row-1").stdout
        columns = c.kubectl("get", "powerbudget", "row-1").stdout
        assert "STATE" in columns and any(state in columns for state in ("Capping", "Emergency", "Releasing", "Normal"))

        # edited: the room is there now, so the caps come up in steps, then go
        apply(c, budget(10_000))
        wait_for(lambda: status(c).get("state") == "Releasing", 30, what="releasing")
        wait_for(lambda: status(c).get("cappedCount") == 0, 90, what="caps lifted in steps")
        assert all(w is None for w in worker_caps(addresses).values())

        # capped again, then deleted: the caps go with it, though the load goes on
        apply(c, budget(200))
        wait_for(lambda: any(w is not None for w in worker_caps(addresses).values()), 60, what="capped again")
        c.kubectl("delete", "powerbudget", "row-1", "--wait=true", "--timeout=60s")
        wait_for(lambda: all(w is None for w in worker_caps(addresses).values()), 30, what="caps lifted")
    finally:
        load.end()
    for name in worker_caps(addresses):
        assert "fleetwise.dev/power-cap" not in (get(c, "pod", name, "-n", NS)["metadata"].get("annotations") or {})
