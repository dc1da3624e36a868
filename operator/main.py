"""`fleetwise operator`: leader election, metrics, then kopf."""

import asyncio
import logging
import os

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from . import handlers
from .kube import Kube
from .leader import LeaderElector
from .reconcile import Operator, OperatorMetrics

log = logging.getLogger(__name__)


def load_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        config.load_kube_config(kubeconfig)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def run_operator(kubeconfig: str | None, namespaces: list[str], lease_namespace: str, metrics_port: int,
                 liveness_port: int, tolerate_taints: list[str], identity: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = load_client(kubeconfig)
    metrics = OperatorMetrics()
    kube = Kube(api, on_request=lambda verb, resource: metrics.api_requests.labels(verb, resource).inc())
    tolerations = [{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in tolerate_taints]
    handlers.install(Operator(kube, metrics=metrics, tolerations=tolerations))
    if metrics_port:
        start_http_server(metrics_port, addr="0.0.0.0", registry=metrics.registry)
    elector = LeaderElector(api, lease_namespace, identity=identity)
    elector.acquire()

    @kopf.on.login()
    def login(**kwargs):
        # the same credentials as the kubernetes client above (kubeconfig or in-cluster)
        cfg = client.Configuration.get_default_copy()
        return kopf.ConnectionInfo(server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
                                   token=(cfg.api_key or {}).get("authorization", "").removeprefix("Bearer ") or None,
                                   certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
                                   default_namespace=lease_namespace)
    try:
        asyncio.run(kopf.operator(standalone=True, clusterwide=not namespaces, namespaces=namespaces or None,
                                  liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None))
    finally:
        elector.release()
