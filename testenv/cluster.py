"""A real Kubernetes control plane on loopback for tests and benchmarks: kine (etcd API
over SQLite), kube-apiserver with RBAC, kube-controller-manager, kube-scheduler and kwok for
fake GPU nodes. Binaries come from testenv/k8s/build.sh (in .testenv/bin by default)."""

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from fleetwise.addresses import ADDRESS_MAP_ENV
from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv, stop_all

ROOT = Path(__file__).resolve().parents[1]  # the repository
DEFAULT_BIN = ROOT / ".testenv" / "bin"
BINARIES = ("kine", "kwok", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm")
ADMIN_TOKEN = "fleetwise-admin-token"


class TestEnvError(RuntimeError):
    pass


def bin_dir() -> Path:
    return Path(os.environ.get("FLEETWISE_TESTENV_BIN", DEFAULT_BIN))


def ensure_built() -> Path:
    """The binaries, built now if missing (needs Go; about 10 minutes the first time)."""
    b = bin_dir()
    if all((b / x).exists() for x in BINARIES):
        return b
    if shutil.which("go") is None:
        raise TestEnvError("the Kubernetes test control plane is not built and there is no Go toolchain: "
                           "install Go and run testenv/k8s/build.sh")
    subprocess.run([str(ROOT / "testenv" / "k8s" / "build.sh")], check=True,
                   env={**os.environ, "FLEETWISE_TESTENV_BIN": str(b)})
    return b



@dataclass
class Cluster:
    workdir: Path
    bin: Path = field(default_factory=bin_dir)
    procs: dict[str, Process] = field(default_factory=dict)
    api_port: int = 0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def kubeconfig_for(self, token: str, name: str) -> Path:
        path = self.workdir / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}]}))
        return path

    def _start(self, name: str, args: list[str]) -> None:
        self.procs[name] = Process(name, [str(self.bin / name), *args], self.workdir / f"{name}.log").start()

    def start(self, timeout: float = 60.0) -> "Cluster":
        try:
            return self._start_all(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, timeout: float) -> "Cluster":
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "genrsa", "-out", str(w / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(w / "sa.key"), "-pubout", "-out", str(w / "sa.pub")],
                       check=True, capture_output=True)
        (w / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        etcd, self.api_port = free_port(), free_port()
        self._start("kine", ["--listen-address", f"127.0.0.1:{etcd}", "--metrics-bind-address", "0",
                             "--endpoint", f"sqlite://{w}/kine.db?_journal=WAL&cache=shared"])
        self._start("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--cert-dir={w}/certs",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={w}/sa.pub", f"--service-account-signing-key-file={w}/sa.key",
            f"--token-auth-file={w}/tokens.csv", "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16", "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500"])
        self.kubeconfig_for(ADMIN_TOKEN, "admin").rename(self.kubeconfig)
        self._wait_ready(timeout)
        kc = str(self.kubeconfig)
        self._start("kube-controller-manager", [
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            f"--service-account-private-key-file={w}/sa.key", "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
            "--controllers=*,-nodeipam"])
        self._start("kube-scheduler", [
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false"])
        self._start("kwok", [
            f"--kubeconfig={kc}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.0.0.0/16", "--node-ip=10.0.0.1", "--node-lease-duration-seconds=40"])
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.exited is not None:
                    raise TestEnvError(f"{name} exited with {p.exited}:\n{p.tail(40)}")
            try:
                r = httpx.get(self.server + "/readyz", verify=False, timeout=2,
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TestEnvError("kube-apiserver did not become ready")

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, check=check, timeout=120)

    def stop(self) -> None:
        """One after the other, the API server's clients first and its store last."""
        order = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "kine")
        stop_all([[self.procs[name]] for name in order if name in self.procs], grace=10.0)


def gpu_node(name: str, product: str, gpus: int = 8, labels: dict | None = None) -> dict:
    """A kwok-managed node with GPUs (kwok keeps it Ready and runs what is bound to it)."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"kubernetes.io/hostname": name, "type": "kwok", "nvidia.com/gpu.product": product,
                                **(labels or {})}},
        "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


CRDS = ROOT / "charts" / "fleetwise" / "crds"
CHART = ROOT / "charts" / "fleetwise"
SYSTEM_NS = "fleetwise-system"
KWOK_TAINT = "kwok.x-k8s.io/node"


def start_cluster(workdir: Path) -> Cluster:
    """A started control plane with the CRDs and the chart's RBAC installed. Fails loudly if
    it cannot be built or started: the tests that need it never skip silently."""
    b = ensure_built()
    cluster = Cluster(workdir, b)
    try:
        cluster.start()
        install(cluster, b)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def install(cluster: Cluster, b: Path) -> None:
    cluster.kubectl("apply", "-f", str(CRDS))
    for crd in ("modeldeployments", "powerbudgets", "faultpolicies"):
        _wait_established(cluster, f"{crd}.fleetwise.dev")
    cluster.kubectl("create", "namespace", SYSTEM_NS)
    _wait_default_sa(cluster, SYSTEM_NS)
    # the chart's own RBAC, rendered by helm, is all the operator under test may use
    rendered = subprocess.run([str(b / "helm"), "template", "t", str(CHART), "--namespace", SYSTEM_NS,
                               "--show-only", "templates/rbac.yaml"], capture_output=True, text=True, check=True)
    cluster.kubectl("apply", "-f", "-", input=rendered.stdout)


def _wait_established(cluster: Cluster, crd: str, timeout: float = 90) -> None:
    """Until the API server serves the CRD. `kubectl wait` alone gives up at once on an error
    (a busy API server's discovery not caught up yet), with nothing said of why."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        r = cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", f"--timeout={max(1, int(left))}s",
                            check=False)
        if r.returncode == 0:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the CRD {crd} was not established in {timeout:g} s: {(r.stderr or r.stdout).strip()}")
        time.sleep(0.5)


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
class OperatorProcess(Process):
    """`fleetwise operator` in its own process; `proc` is its Popen."""
    metrics_port: int = 0
    liveness_port: int = 0

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.popen

    @proc.setter
    def proc(self, popen: subprocess.Popen | None) -> None:
        self.popen = popen

    def stop(self, grace: float = 20.0, kill: bool = False) -> None:
        """SIGTERM and up to `grace` seconds to go; with `kill`, SIGKILL at once (a crash)."""
        self.kill() if kill else super().stop(grace)


DRAIN_TIMEOUT_S = 5


def address_map(cluster: Cluster) -> Path:
    """The operator's address map: tests that put real workers behind kwok pods write it."""
    return cluster.workdir / "addresses.json"


INTERNAL_TOKEN = "testenv-internal-token-0123456789"


def token_file(cluster: Cluster) -> Path:
    """The internal token the operator copies into the workers' namespaces (the chart's
    Secret, mounted, in a real cluster)."""
    path = cluster.workdir / "internal-token"
    if not path.exists():
        path.write_text(INTERNAL_TOKEN)
        path.chmod(0o600)
    return path


def start_operator(cluster: Cluster, kubeconfig: Path, name: str = "operator",
                   extra_args: tuple[str, ...] = ()) -> OperatorProcess:
    metrics, liveness = free_port(), free_port()
    log = cluster.workdir / f"{name}-{int(time.time() * 1000)}.log"
    proc = OperatorProcess(name, fleetwise_argv("operator", "--kubeconfig", str(kubeconfig),
                                                "--lease-namespace", SYSTEM_NS, "--tolerate-taint", KWOK_TAINT,
                                                "--metrics-port", str(metrics), "--liveness-port", str(liveness),
                                                # kwok's pods have no workers to ask: their drains run out
                                                "--drain-timeout", str(DRAIN_TIMEOUT_S),
                                                "--internal-token-file", str(token_file(cluster)), *extra_args),
                           log, metrics_port=metrics, liveness_port=liveness, die_with_parent=True,
                           env={ADDRESS_MAP_ENV: str(address_map(cluster))})
    proc.start()
    return proc


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


PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.79.2"


def prometheus_operator_crds() -> list[Path]:
    """The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), from its Go
    module (the module proxy serves the whole repository), so that the chart's monitoring
    objects are checked by a real API server against their real schemas."""
    if shutil.which("go") is None:
        raise TestEnvError("the Prometheus Operator's CRDs come from its Go module: install Go")
    out = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR], capture_output=True, text=True,
                         check=True, timeout=300, cwd="/")
    crds = Path(json.loads(out.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [crds / f"monitoring.coreos.com_{kind}.yaml" for kind in ("servicemonitors", "podmonitors",
                                                                     "prometheusrules")]
