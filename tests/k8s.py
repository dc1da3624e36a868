"""The Kubernetes test cluster for the operator's integration tests (session-scoped)."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleetwise.testenv import ROOT, Cluster, ensure_built

from .workers import free_port

CRDS = ROOT / "charts" / "fleetwise" / "crds"
CHART = ROOT / "charts" / "fleetwise"
SYSTEM_NS = "fleetwise-system"
KWOK_TAINT = "kwok.x-k8s.io/node"


def start_cluster(workdir: Path) -> Cluster:
    """Fails loudly if the control plane cannot be built or started: never a silent skip."""
    b = ensure_built()
    cluster = Cluster(workdir, b)
    try:
        cluster.start()
        _install(cluster, b)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _install(cluster: Cluster, b: Path) -> None:
    cluster.kubectl("apply", "-f", str(CRDS))
    for crd in ("modeldeployments", "powerbudgets", "faultpolicies"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}.fleetwise.dev", "--timeout=60s")
    cluster.kubectl("create", "namespace", SYSTEM_NS)
    _wait_default_sa(cluster, SYSTEM_NS)
    # the chart's own RBAC, rendered by helm, is all the operator under test may use
    rendered = subprocess.run([str(b / "helm"), "template", "t", str(CHART), "--namespace", SYSTEM_NS,
                               "--show-only", "templates/rbac.yaml"], capture_output=True, text=True, check=True)
    cluster.kubectl("apply", "-f", "-", input=rendered.stdout)


def _wait_default_sa(cluster: Cluster, ns: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"no default ServiceAccount in {ns}: is kube-controller-manager running?")


def create_namespace(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "namespace", ns)
    _wait_default_sa(cluster, ns)


def operator_kubeconfig(cluster: Cluster) -> Path:
    token = cluster.kubectl("create", "token", "t-fleetwise-operator", "-n", SYSTEM_NS, "--duration=24h").stdout.strip()
    return cluster.kubeconfig_for(token, "operator")


@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    metrics_port: int
    log: Path

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_operator(cluster: Cluster, kubeconfig: Path, name: str = "operator") -> OperatorProcess:
    metrics = free_port()
    log = cluster.workdir / f"{name}-{int(time.time() * 1000)}.log"
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "fleetwise", "operator", "--kubeconfig", str(kubeconfig),
                             "--lease-namespace", SYSTEM_NS, "--tolerate-taint", KWOK_TAINT,
                             "--metrics-port", str(metrics), "--liveness-port", str(free_port())],
                            stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return OperatorProcess(proc, metrics, log)


def apply(cluster: Cluster, obj: dict, check: bool = True) -> subprocess.CompletedProcess:
    return cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=check)


def get(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def dump(obj) -> str:
    return yaml.safe_dump(obj)
