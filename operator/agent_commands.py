"""`fleetwise node-agent`: the command (options, lazy imports), mounted by `fleetwise/cli.py`,
and its run: NVML's GPUs, the pods watch, the kubelet's pod-resources, one `NodeAgent` period
every `--period` seconds, `/metrics`, and every GPU's default limit restored on the way out
(SIGTERM, as a DaemonSet's pod is stopped, or SIGINT)."""

import logging
import signal
import threading
from pathlib import Path

import typer

log = logging.getLogger(__name__)

SYNC_SECONDS = 30.0  # the first pods list, before the first period: a restart must not lift caps for want of it


def run_node_agent(node: str, port: int, host: str, period: float, socket: Path, kubeconfig: str | None,
                   gpu_metrics: bool, stop: threading.Event | None = None) -> None:
    from prometheus_client import start_http_server

    from fleetwise.logs import configure as configure_logs
    from fleetwise.telemetry.nvml import XidWatch, all_gpus

    from .kube import load_client
    from .node_agent import NodeAgent
    from .node_pods import NodePods
    from .pod_resources import list_gpu_holders

    configure_logs(logging.INFO)
    gpus, failed = all_gpus()
    for reason in failed:
        log.error("left out: %s", reason)
    log.info("node %s: %d GPUs (%s)", node, len(gpus), ", ".join(f"{g.index}: {g.name}" for g in gpus))
    try:
        xid: XidWatch | None = XidWatch(gpus)
    except Exception as e:  # NVML's events are optional: no XID series then
        log.warning("XID errors not watched: %s", e)
        xid = None
    api = load_client(kubeconfig)
    pods = NodePods(api, node)
    agent = NodeAgent(node, gpus, pods.intents, lambda: list_gpu_holders(str(socket)), xid, gpu_metrics)
    pods.on_error = lambda: agent.errors.labels("pods_watch", "").inc()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server, _ = start_http_server(port, addr=host, registry=agent.registry)
    pods.start()
    try:
        if not pods.synced.wait(SYNC_SECONDS):
            log.warning("no pods list from the API server after %g s: GPUs at their defaults until it comes",
                        SYNC_SECONDS)
        while not stop.is_set():
            agent.step()
            stop.wait(period)
    finally:
        agent.restore_all()
        pods.stop()
        if xid is not None:
            xid.close()
        server.shutdown()
        log.info("stopped; every GPU at its default power limit")


def node_agent(
    node: str = typer.Option(..., "--node", envvar="NODE_NAME", help="This node's name (the downward API's "
                             "spec.nodeName): whose pods to watch."),
    port: int = typer.Option(9401, "--port", help="/metrics: the GPUs' DCGM series and the caps applied."),
    host: str = typer.Option("0.0.0.0", "--host"),
    period: float = typer.Option(1.0, "--period", min=0.2, max=60, help="Seconds between periods: caps applied, "
                                 "leases checked, GPUs read."),
    pod_resources_socket: Path = typer.Option(Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
                                              "--pod-resources-socket", help="The kubelet's pod-resources API."),
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Default: in-cluster, else ~/.kube/config."),
    gpu_metrics: bool = typer.Option(True, "--gpu-metrics/--no-gpu-metrics",
                                     help="Export the GPUs' DCGM series; --no-gpu-metrics where a DCGM exporter "
                                          "runs on the node (only the caps are exported then)."),
) -> None:
    """Apply the power loop's caps to this node's GPUs (NVML) and export their telemetry."""
    from fleetwise.telemetry.nvml import NvmlUnavailable
    try:
        run_node_agent(node, port, host, period, pod_resources_socket, kubeconfig, gpu_metrics)
    except NvmlUnavailable as e:
        typer.echo(f"fleetwise node-agent: {e}", err=True)
        raise typer.Exit(1) from None
