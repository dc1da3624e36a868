"""A rollout with long streams running, in the real test control plane: the operator replaces
a ModelDeployment's two worker pods (a new image: surge one, drain one old, ...), a router
that discovers the pods from the API server (with the chart's RBAC) moves each drained
pod's streams with their KV when its grace period ends, and the old pods go as soon as
their workers are idle. The rollout is over long before the streams are: it does not wait
on them. Every stream completes with exactly its max_tokens and the text of an undisturbed
run (greedy). The pods are kwok's; real worker processes stand behind them through the
operator's and the router's address map, one taken from a pool for each new pod and
stopped when its pod is deleted, as the kubelet would."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from kubernetes import client as kclient
from kubernetes import config as kconfig

from fleetwise.addresses import ADDRESS_MAP_ENV
from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv, wait_healthy
from fleetwise.testenv.cluster import (
    SYSTEM_NS,
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

from .test_migration import read_stream, same
from .workers import slow_steps, start_worker_process, token_file

NS = "rollout"
A100 = "NVIDIA-A100-SXM4-80GB"
GRACE = 1.0          # the router's drain grace: a drained pod's streams move after it
DRAIN_TIMEOUT = 300  # the operator's: a drained pod that never goes idle would hold the rollout this long
STEP = {"step_delay_seconds": 0.03}  # every engine step 30 ms more: a 900-token stream lasts 27 s at least
STREAMS = [{"prompt": f"stream {i} outlives the rollout", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
           for i, tokens in enumerate((900, 900, 700, 700))]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def deployment(image: str) -> dict:
    return {"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"model": {"name": "tiny", "uri": "/models/tiny"}, "image": image,
                     "mode": "Colocated", "mixed": {"replicas": 2, "gpuType": "A100"}}}


class Kubelet:
    """Each new pod gets a worker from the pool (its entry in the address map, written
    before the pod is Ready most of the time); a deleted pod's worker is stopped."""

    def __init__(self, kubeconfig, path, pool: list) -> None:
        self.core = kclient.CoreV1Api(kconfig.new_client_from_config(config_file=str(kubeconfig)))
        self.path, self.free = path, list(pool)
        self.workers: dict[str, Process] = {}   # pod -> its worker
        self.gone: dict[str, float] = {}        # pod -> when it was seen deleted (its worker then stopped)
        self.log: list[tuple[float, str]] = []
        self.unserved: set[str] = set()         # pods created beyond the pool: one per replica is all a rollout needs
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed.wait(0.1):
            pods = {p.metadata.name: p for p in self.core.list_namespaced_pod(NS).items}
            changed = False
            for name, pod in pods.items():
                if name not in self.workers and not pod.metadata.deletion_timestamp:
                    if not self.free:
                        self.unserved.add(name)
                        continue
                    self.workers[name] = self.free.pop(0)
                    self.log.append((time.monotonic(), f"{name} -> {self.workers[name].internal_url}"))
                    changed = True
            if changed:
                self.path.write_text(json.dumps({f"{NS}/{name}": {"url": w.url, "internal": w.internal_url}
                                                 for name, w in self.workers.items()}))
            for name, w in self.workers.items():
                deleted = name not in pods or pods[name].metadata.deletion_timestamp
                if deleted and name not in self.gone:
                    self.gone[name] = time.monotonic()
                    self.log.append((self.gone[name], f"{name} deleted"))
                    threading.Thread(target=w.stop, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(10)


def router_kubeconfig(c):
    token = c.kubectl("create", "token", "t-fleetwise-router", "-n", SYSTEM_NS, "--duration=1h").stdout.strip()
    return c.kubeconfig_for(token, "router")


def metric(url: str, name: str) -> dict[str, float]:
    page = httpx.get(url + "/metrics", timeout=10).text
    return {line.split("{", 1)[1].split("}", 1)[0] if "{" in line else "": float(line.rsplit(" ", 1)[1])
            for line in page.splitlines() if line.startswith(name)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("rollout")
    c = start_cluster(workdir / "k8s")
    pool = [start_worker_process(tiny_model_dir, "mixed", "--block-size", "8", "--fault", "switches", wait=False)
            for _ in range(4)]
    op = router = kubelet = None
    try:
        for i in range(2):
            apply(c, gpu_node(f"a100-{i}", A100))
        create_namespace(c, NS)
        op = start_operator(c, operator_kubeconfig(c), extra_args=("--drain-timeout", str(DRAIN_TIMEOUT)))
        port = free_port()
        router = Process("router", fleetwise_argv(
            "router", "--kubernetes", "--kubeconfig", str(router_kubeconfig(c)), "--namespace", NS,
            "--port", str(port), "--internal-token-file", str(token_file()), "--drain-grace", str(GRACE),
            "--probe-interval", "0.5"), workdir / "router.log", f"http://127.0.0.1:{port}", die_with_parent=True,
            env={ADDRESS_MAP_ENV: str(address_map(c))}).start()
        wait_healthy(pool, 180, interval=0.1)
        kubelet = Kubelet(c.kubeconfig, address_map(c), pool)
        apply(c, deployment("fleetwise:1"))
        yield c, router, kubelet, pool
    finally:
        if kubelet is not None:
            kubelet.close()
        for p in (router, op, *pool):
            if p is not None:
                p.stop()
        c.stop()


def pods(c) -> list[dict]:
    return get(c, "pods", "-n", NS)["items"]


def rolled_out(c, image: str) -> bool:
    """Every pod (being deleted or not) on the new image, two of them, the deployment Ready."""
    ps = pods(c)
    md = get(c, "md", "chat", "-n", NS)
    ready = any(x["type"] == "Ready" and x["status"] == "True" for x in (md.get("status") or {}).get("conditions", []))
    return (len(ps) == 2 and all(p["spec"]["containers"][0]["image"] == image for p in ps) and ready
            and (md.get("status") or {}).get("observedGeneration") == md["metadata"]["generation"])


def test_a_rollout_with_long_streams_running_does_not_wait_for_them_and_every_stream_completes(fleet):
    c, router, kubelet, pool = fleet
    wait_for(lambda: rolled_out(c, "fleetwise:1"), 90, what="two pods of fleetwise:1")
    wait_for(lambda: (h := httpx.get(router.url + "/health", timeout=5)).status_code == 200
             and h.json()["models"]["tiny"]["mixed"] == 2, 60, what="the router serving both pods")
    old = set(kubelet.workers)
    # the undisturbed streams, from one of the old pods' workers, at full speed
    first = kubelet.workers[sorted(old)[0]]
    with ThreadPoolExecutor(len(STREAMS)) as ex:
        want = list(ex.map(lambda body: read_stream(first.url, {"model": "tiny", **body}), STREAMS))
    for w in pool:
        slow_steps(w, STEP)

    counts = [0] * len(STREAMS)
    ends: list[float] = [0.0] * len(STREAMS)

    def run(i: int) -> dict:
        def seen(n: int) -> None:
            counts[i] = n
        out = read_stream(router.url, {"model": "tiny", **STREAMS[i]}, seen)
        ends[i] = time.monotonic()
        return out
    with ThreadPoolExecutor(len(STREAMS)) as ex:
        running = [ex.submit(run, i) for i in range(len(STREAMS))]
        wait_for(lambda: min(counts) >= 20 or any(f.done() for f in running), 60, 0.05, what="every stream started")
        t0 = time.monotonic()
        print(f"rollout begins at {time.strftime('%H:%M:%S')}")
        apply(c, deployment("fleetwise:2"))
        try:
            wait_for(lambda: rolled_out(c, "fleetwise:2"), 120, 0.3, what="the rollout")
        except AssertionError:
            print(c.kubectl("get", "events", "-n", NS).stdout, json.dumps(pods(c), indent=1)[:4000])
            raise
        rollout = time.monotonic() - t0
        left = [STREAMS[i]["max_tokens"] - counts[i] for i in range(len(STREAMS))]
        got = [f.result() for f in running]
    print("\n".join(f"{t - t0:.1f} {what}" for t, what in kubelet.log))
    last_gone = max(kubelet.gone.get(p, float("nan")) for p in old) - t0
    print(f"rollout {rollout:.1f} s (old pods deleted by {last_gone:.1f} s); streams ended "
          f"{[round(e - t0, 1) for e in ends]} s after it began; tokens left at its end {left}")
    for w, g, body in zip(want, got, STREAMS):
        same(w, g)
        assert g["usage"]["completion_tokens"] == body["max_tokens"] and g["finish"] == {0: "length"}
    # the rollout did not wait for the streams: it was over while each still had tokens to go
    assert all(n > 0 for n in left), left
    assert rollout < min(ends) - t0
    assert set(kubelet.gone) == old and not kubelet.unserved  # the old pods deleted, no pod made in vain
    moves = metric(router.url, "fleetwise_router_migrations_total")
    assert moves.get('model_name="tiny",reason="worker_failed"', 0) == 0, moves
    assert moves.get('model_name="tiny",reason="drain"', 0) >= len(STREAMS), moves
    # the streams moved with their KV: the new pods' workers pulled it
    drained = re.findall(r"drained: (\d+) running sequence", c.kubectl("get", "events", "-n", NS).stdout)
    assert sum(map(int, drained)) >= len(STREAMS), drained  # the operator's Drained Events say so
    new = [w for name, w in kubelet.workers.items() if name not in old]
    assert sum(v for w in new for labels, v in metric(w.url, "fleetwise_kv_transfer_bytes_total").items()
               if 'direction="received"' in labels) > 0
