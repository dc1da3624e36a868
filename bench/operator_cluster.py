"""The operator benchmark's control-plane half: the same pods placed on the same kwok GPU nodes
of one real control plane, twice, by the stock kube-scheduler and by the fleetwise operator.

kube-scheduler (its defaults, as testenv starts it) gets bare pods, one GPU each, with a
nodeSelector for the GPU product and the kwok toleration; the benchmark creates them itself
through the API, 16 at a time, so no controller's client rate limit delays them. The
operator gets the ModelDeployments that make the same pods, created the same way (16 at a
time, through the API), and creates the pods itself. The
stock run comes first, on the fresh control plane; its pods are deleted before the operator
starts. For each: seconds from the first create to every pod bound (the latest PodScheduled
condition) and to every pod Ready (the latest Ready condition), from the API server's own
timestamps (whole seconds), and each pod's creation-to-bound time. A pod created with its node
already set (as the operator creates the pods it can place) is bound at its creation.

CPU seconds are read from /proc for the binder (kube-scheduler, or the operator process) and
for the rest of the control plane (kube-apiserver, kine, kwok, kube-controller-manager) over
each run: on a shared machine they say what each system cost where wall time cannot.
"""

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from fleetwise.bench.harness import process_cpu_seconds, progress, summary

H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"
OURS_NS, STOCK_NS = "bench", "bench-stock"
CREATE_THREADS = 16
CONTROL_PLANE = ("kube-apiserver", "kine", "kwok", "kube-controller-manager")


def _epoch(ts: str) -> float:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _condition(pod: dict, kind: str) -> float | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True" and c.get("lastTransitionTime"):
            return _epoch(c["lastTransitionTime"])
    return None


def _bound(pod: dict) -> float | None:
    """When the pod was bound: its PodScheduled condition, or its creation when it was created
    with its node set (nothing binds it then, and nothing writes that condition)."""
    at = _condition(pod, "PodScheduled")
    if at is None and (pod.get("spec") or {}).get("nodeName"):
        return _epoch(pod["metadata"]["creationTimestamp"])
    return at


def timings(pods: list[dict], t0: float) -> dict[str, Any]:
    """From the pods' own timestamps (whole seconds): the latest bind and Ready after `t0`,
    and each pod's creation to bound."""
    bound = [_bound(p) for p in pods]
    ready = [_condition(p, "Ready") for p in pods]
    created = [_epoch(p["metadata"]["creationTimestamp"]) for p in pods]
    per_pod = [b - c for b, c in zip(bound, created) if b is not None]
    to_ready = [r - c for r, c in zip(ready, created) if r is not None]
    bound_at = sorted(b - t0 for b in bound if b is not None)
    ready_at = sorted(r - t0 for r in ready if r is not None)
    every = bool(pods)
    return {"pods": len(pods), "bound": len(bound_at), "ready": len(ready_at),
            "seconds_to_all_bound": bound_at[-1] if every and len(bound_at) == len(pods) else None,
            "seconds_to_all_ready": ready_at[-1] if every and len(ready_at) == len(pods) else None,
            "last_created_s": max(created) - t0 if created else None,
            "created_to_bound_s": summary(per_pod, "p50", "p90", "p99", "max"),
            "created_to_ready_s": summary(to_ready, "p50", "p90", "p99", "max"), "bound_at_s": bound_at}


def cpu_seconds(cluster: Any, names: tuple[str, ...] = CONTROL_PLANE) -> float:
    """CPU seconds so far of the control plane's processes named."""
    return sum(process_cpu_seconds(cluster.procs[n].pid) or 0.0 for n in names if n in cluster.procs)


def _list_pods(cluster: Any, ns: str) -> list[dict]:
    return json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]


def wait_ready(cluster: Any, ns: str, want: int, t0: float, timeout: float, console: Console,
               what: str) -> float | None:
    """Polls until `want` pods of `ns` are Ready; seconds from `t0` when seen, None on timeout."""
    ready_path = "{.status.conditions[?(@.type==\"Ready\")].status}"
    with progress(console) as bar:
        task = bar.add_task(what, total=want)
        while time.time() - t0 < timeout:
            out = cluster.kubectl("get", "pods", "-n", ns, "-o",
                                  f"jsonpath={{range .items[*]}}{ready_path}{{\"\\n\"}}{{end}}").stdout
            ready = out.split().count("True")
            bar.update(task, completed=ready)
            if ready >= want:
                return time.time() - t0
            time.sleep(2)  # kubectl listing 1,000 pods is load on the API server too
    return None


def create_all(cluster: Any, token: str, path: str, objects: list[dict]) -> None:
    """POSTs the objects to `path`, `CREATE_THREADS` at a time (each system's input is created
    alike: the stock run's pods, the operator run's ModelDeployments)."""
    with (httpx.Client(verify=False, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
          ThreadPoolExecutor(CREATE_THREADS) as pool):
        codes = list(pool.map(lambda obj: http.post(f"{cluster.server}{path}", json=obj).status_code, objects))
    bad = [c for c in codes if c != 201]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(objects)} objects were refused (HTTP {sorted(set(bad))})")


def stock_pod(name: str, product: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": STOCK_NS},
            "spec": {"nodeSelector": {"nvidia.com/gpu.product": product},
                     "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "worker", "image": "fleetwise:bench",
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}


def stock_run(cluster: Any, token: str, deployments: int, prefill: int, decode: int, timeout: float,
              console: Console) -> dict:
    """The same pods as the operator's run, bound by kube-scheduler; deleted afterwards."""
    pods = [stock_pod(f"m{m}-{role}-{i}", product) for m in range(deployments)
            for role, n, product in (("prefill", prefill, H100), ("decode", decode, A100)) for i in range(n)]
    t0, cpu0, sched0 = time.time(), cpu_seconds(cluster), cpu_seconds(cluster, ("kube-scheduler",))
    create_all(cluster, token, f"/api/v1/namespaces/{STOCK_NS}/pods", pods)
    seen = wait_ready(cluster, STOCK_NS, len(pods), t0, timeout, console, "kube-scheduler: pods Ready")
    result = {"system": "kube-scheduler", "observed_all_ready_s": seen,
              "binder_cpu_s": cpu_seconds(cluster, ("kube-scheduler",)) - sched0,
              "control_plane_cpu_s": cpu_seconds(cluster) - cpu0, **timings(_list_pods(cluster, STOCK_NS), t0)}
    cluster.kubectl("delete", "pods", "--all", "-n", STOCK_NS, "--grace-period=0", "--force", "--wait=false")
    deadline = time.time() + timeout
    while _list_pods(cluster, STOCK_NS) and time.time() < deadline:
        time.sleep(2)
    return result


def model_deployments(deployments: int, prefill: int, decode: int, ns: str = OURS_NS) -> list[dict]:
    return [{"apiVersion": "fleetwise.dev/v1alpha1", "kind": "ModelDeployment",
             "metadata": {"name": f"m{i}", "namespace": ns},
             "spec": {"model": {"name": f"m{i}", "uri": "/models/m"}, "image": "fleetwise:bench",
                      "prefill": {"replicas": prefill, "gpuType": "H100"},
                      "decode": {"replicas": decode, "gpuType": "A100"}}} for i in range(deployments)]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def operator_run(cluster: Any, token: str, op: Any, deployments: int, prefill: int, decode: int, timeout: float,
                 console: Console, ns: str = OURS_NS, system: str = "fleetwise operator") -> dict:
    want = deployments * (prefill + decode)
    t0, cpu0, op0 = time.time(), cpu_seconds(cluster), process_cpu_seconds(op.pid) or 0.0
    create_all(cluster, token, f"/apis/fleetwise.dev/v1alpha1/namespaces/{ns}/modeldeployments",
               model_deployments(deployments, prefill, decode, ns))
    inputs_created = time.time() - t0
    seen = wait_ready(cluster, ns, want, t0, timeout, console, f"{system}: pods Ready")
    op_cpu = process_cpu_seconds(op.pid)
    result = {"system": system, "observed_all_ready_s": seen, "deployments_created_s": inputs_created,
              "binder_cpu_s": None if op_cpu is None else op_cpu - op0,
              "control_plane_cpu_s": cpu_seconds(cluster) - cpu0,
              **timings(_list_pods(cluster, ns), t0)}
    try:
        text = httpx.get(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError as exc:  # the operator is gone: what it did is in the pods, why in its log
        return {**result, "operator_exited": op.exited, "operator_log_tail": op.tail(20),
                "metrics_error": f"{type(exc).__name__}: {exc}"}
    requests = _metric(text, "fleetwise_operator_api_requests_total")
    binds = _metric(text, "fleetwise_operator_bind_seconds_sum")
    bind_count = _metric(text, "fleetwise_operator_bind_seconds_count")
    return {**result, "api_requests": requests, "api_requests_per_pod": requests / max(1, result["ready"]),
            "mean_bind_seconds": binds / bind_count if bind_count else None,
            "reconciles": _metric(text, "fleetwise_operator_reconciles_total")}


def cluster_bench(nodes: int, deployments: int, prefill: int, decode: int, timeout: float,
                  console: Console) -> dict:
    import tempfile

    from fleetwise.testenv.cluster import (
        ADMIN_TOKEN,
        Cluster,
        create_namespace,
        ensure_built,
        gpu_node,
        install,
        operator_kubeconfig,
        start_operator,
    )
    workdir = Path(tempfile.mkdtemp(prefix="fleetwise-bench-operator-"))
    b = ensure_built()
    cluster = Cluster(workdir, b)
    op = None
    try:
        with console.status("starting the control plane"):
            cluster.start()
            install(cluster, b)
            create_namespace(cluster, OURS_NS)
            create_namespace(cluster, STOCK_NS)
        items = [gpu_node(f"gpu-{i}", H100 if i % 2 else A100, labels={"rack": f"r{i % 10}"}) for i in range(nodes)]
        cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        time.sleep(3)  # kwok takes the nodes up and marks them Ready
        stock = stock_run(cluster, ADMIN_TOKEN, deployments, prefill, decode, timeout, console)
        op = start_operator(cluster, operator_kubeconfig(cluster), "bench-operator")
        time.sleep(3)  # leader election and the first list
        ours = operator_run(cluster, ADMIN_TOKEN, op, deployments, prefill, decode, timeout, console)
        return {"nodes": nodes, "deployments": deployments, "pods": deployments * (prefill + decode),
                "order": ["kube-scheduler", "fleetwise operator"], "kube_scheduler": stock, "fleetwise": ours}
    finally:
        if op:
            op.stop()
        cluster.stop()
