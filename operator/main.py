"""`fleetwise operator`: leader election, metrics, then kopf."""

import asyncio
import logging
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import start_http_server

from fleetwise.controllers.deployment import DRAIN_TIMEOUT_SECONDS
from fleetwise.fleet import FleetActions
from fleetwise.logs import configure as configure_logs
from fleetwise.telemetry.prometheus import PrometheusClient

from . import handlers
from .actions import KubeFleet
from .admin_sink import AdminSink, ReportingFleet
from .faults import FaultControl
from .internal_token import TokenCopies
from .kube import Kube, load_client, own_client
from .leader import LeaderElector, StandbyLiveness
from .metrics import OperatorMetrics
from .pod_cache import PodCache
from .power import PERIOD_SECONDS, PowerControl
from .reconcile import Operator

log = logging.getLogger(__name__)


def run_operator(kubeconfig: str | None, namespaces: list[str], lease_namespace: str, metrics_port: int,
                 liveness_port: int, tolerate_taints: list[str], identity: str | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT_SECONDS, token_file: Path | None = None,
                 prometheus_url: str | None = None, power_period: float = PERIOD_SECONDS,
                 admin_url: str | None = None, admin_token_file: Path | None = None,
                 power_actuator: str = "worker") -> None:
    """`token_file`: the shared internal token, copied into the workers' namespaces.
    `prometheus_url`: where the power loops read the GPUs' power and the fault loops the
    workers' signals (None: neither runs).
    `admin_url`: where incidents and actions go (`memo.admin`, an `AdminSink`), with the
    token in `admin_token_file`. `power_actuator`: who applies caps, the workers (modelled
    GPUs) or `fleetwise node-agent` on each GPU node (real GPUs)."""
    configure_logs(logging.INFO)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per watch event
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Prometheus query
    api = load_client(kubeconfig)
    metrics = OperatorMetrics()
    kube = Kube(api, on_request=lambda verb, resource: metrics.api_requests.labels(verb, resource).inc())
    tolerations = [{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in tolerate_taints]
    tokens = TokenCopies(kube, token_file) if token_file else None
    pods = PodCache()  # the watch's worker pods: reconciles and power loops read no pod on their own
    memo = handlers.operator_memo(Operator(kube, metrics=metrics, tolerations=tolerations,
                                           drain_timeout=drain_timeout, tokens=tokens, pods=pods))
    memo.admin = AdminSink(admin_url, admin_token_file, metrics).start() if admin_url and admin_token_file else None
    memo.pods = pods
    fleet: FleetActions = KubeFleet(kube, token_file, memo.pods, power_actuator)
    if memo.admin is not None:  # what the loops do reaches the admin API's records
        fleet = ReportingFleet(fleet, memo.admin)
    memo.power = PowerControl(kube, fleet, PrometheusClient(prometheus_url) if prometheus_url else None, power_period,
                              pods=memo.pods, metrics=metrics, admin=memo.admin)
    memo.faults = FaultControl(kube, fleet, PrometheusClient(prometheus_url) if prometheus_url else None, memo.admin,
                               metrics, pods=memo.pods)
    if metrics_port:
        start_http_server(metrics_port, addr="0.0.0.0", registry=metrics.registry)
    # the lease on connections of its own: never waiting behind the reconciles' requests
    elector = LeaderElector(own_client(api.configuration), lease_namespace, identity=identity)
    standby = StandbyLiveness(liveness_port) if liveness_port else None
    try:
        elector.acquire()
    finally:
        if standby is not None:
            standby.close()  # the port is kopf's from here on

    @kopf.on.login()
    def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf connects with the credentials the kubernetes client loaded above."""
        cfg = client.Configuration.get_default_copy()
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        scheme, token = header.split(" ", 1) if header and " " in header else (None, header)
        return kopf.ConnectionInfo(server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
                                   scheme=scheme, token=token, username=cfg.username or None,
                                   password=cfg.password or None, certificate_path=cfg.cert_file,
                                   private_key_path=cfg.key_file)

    try:
        liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
        asyncio.run(kopf.operator(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
                                  liveness_endpoint=liveness, memo=memo))
    finally:
        memo.reconcilers.shutdown(wait=False, cancel_futures=True)
        if memo.admin is not None:
            memo.admin.stop()
        elector.release()
