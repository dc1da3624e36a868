"""The Grafana dashboards in dashboards/: generated, current, every query valid PromQL
(promtool), every metric they name exported by a part of fleetwise, and the fleet overview,
prefill/decode and router panels returning data from a real Prometheus that scraped real
workers and a router under load. A PNG of each dashboard's queries, plotted from that
Prometheus, goes to bench/results/ for a person to look at."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from fleetwise import gpus
from fleetwise.operator.metrics import OperatorMetrics
from fleetwise.router.metrics import RouterMetrics
from fleetwise.telemetry import catalog
from fleetwise.telemetry.modelled_gpu import ModelledGPU
from fleetwise.telemetry.prometheus import PrometheusClient
from fleetwise.telemetry.prometheus_server import PrometheusServer
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.metrics import WorkerMetrics

from .promql import metric_names
from .workers import start_router, start_worker, write_router_config

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RATE_WINDOW = "30s"
# counters that exist only after an event; exported, but a healthy run need not show them
EVENT_ONLY = ("fleetwise_kv_recomputes", "fleetwise_kv_leases_expired", "fleetwise_requests_rejected",
              "fleetwise_router_retries", 'status="429"', "fleetwise_router_replica_server_errors",
              "fleetwise_router_replica_timeouts",
              "fleetwise_router_migration", "fleetwise_router_unmigratable", "fleetwise_router_handoff_retries",
              "fleetwise_kv_exported",  # a drain's KV handed over
              "vllm:num_preemptions",
              "fleetwise_power_cap")  # a worker's cap: a series only while one is in force


def queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of a dashboard, its variables made concrete."""
    d = json.loads(path.read_text())
    out = []
    for panel in d["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace('"$model"', '".*"')
            out.append((panel["title"], expr))
    return out


def test_the_committed_dashboards_are_what_the_generator_makes():
    r = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert {"fleetwise / fleet overview", "fleetwise / prefill, decode and KV transfer", "fleetwise / router",
            "fleetwise / operator"} <= titles


def test_every_query_parses_with_promtool(tmp_path):
    rules = [{"record": f"fleetwise:query_{i}", "expr": expr}
             for i, (_, expr) in enumerate(q for p in DASHBOARDS for q in queries(p))]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr


def exported_series() -> set[str]:
    """Every sample name the parts' metrics expose (counters as _total, histograms as
    _bucket, _sum, _count), whether or not an event has made a labelled child yet."""
    registries = [WorkerMetrics("m", "prefill").registry, RouterMetrics().registry, OperatorMetrics().registry]
    gpu = CollectorRegistry()
    gpu.register(ModelledGPU(gpus.PRODUCTS["H100"]))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "unknown": ("",)}
    return {family.name + s for r in (*registries, gpu) for family in r.collect() for s in suffixes[family.type]}


def test_every_metric_a_dashboard_names_is_exported_by_a_part():
    exported = exported_series()
    not_yet = set(catalog.NOT_EXPORTED_YET)
    assert not (not_yet & exported), "exported now: take these out of catalog.NOT_EXPORTED_YET"
    named = {n for p in DASHBOARDS for _, expr in queries(p) for n in metric_names(expr)}
    assert named - exported - not_yet == set()
    assert {catalog.POWER_DOMAIN_WATTS, catalog.POWER_DOMAIN_LIMIT_WATTS} <= named & exported  # the operator's


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_model_dir):
    """Real prefill and decode workers and a router under load, scraped by a real Prometheus."""
    work = tmp_path_factory.mktemp("dash")
    cfg = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=256)
    prefill, decode = start_worker(cfg, "prefill"), start_worker(cfg, "decode")
    write_router_config(work / "r.yaml", "tiny", prefill=[prefill.internal_url], decode=[decode.internal_url])
    router = start_router(work / "r.yaml")
    targets = {"workers": [w.url.removeprefix("http://") for w in (prefill, decode)],
               "router": [router.url.removeprefix("http://")]}
    prom = PrometheusServer(work / "prometheus", targets, scrape_interval=0.5).start()
    try:
        start = time.time()
        with httpx.Client(timeout=60) as c:
            while time.time() - start < 15:  # shared prefixes, so the prefix cache hits; some streamed
                i = int(time.time() - start)
                r = c.post(router.url + "/v1/completions", json={
                    "model": "tiny", "prompt": "the fleet serves requests on many nodes " * (2 + i % 4),
                    "max_tokens": 12, "temperature": 0, "stream": i % 3 == 0})
                assert r.status_code == 200, r.text
        time.sleep(2)  # a few scrapes after the last request
        yield PrometheusClient(prom.url), start
    finally:
        prom.stop()
        for x in (router, prefill, decode):
            x.stop()


def test_the_serving_panels_return_data_from_a_real_prometheus(scraped):
    client, start = scraped
    names = set(httpx.get(client.base_url + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    operators = ("fleetwise_operator", "fleetwise_power_domain", "fleetwise_incidents")
    exported_here = {n for n in exported_series() if n.startswith(("vllm:", "fleetwise_")) and
                     not n.startswith(operators)}
    assert {n for n in exported_here if not n.startswith(EVENT_ONLY)} - names == set()
    empty = []
    for path in DASHBOARDS:
        if path.stem not in ("fleet", "pd", "router"):
            continue
        for title, expr in queries(path):
            if any(marker in expr for marker in EVENT_ONLY):
                continue
            if not [x for x in client.instant(expr) if math.isfinite(x.value)]:
                empty.append(f"{path.stem}: {title}: {expr}")
    assert empty == []
    plot(client, start)


def plot(client: PrometheusClient, start: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    end = time.time()
    for path in DASHBOARDS:
        panels: dict[str, list[str]] = {}
        for title, expr in queries(path):
            panels.setdefault(title, []).append(expr)
        cols = 3
        fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(15, 3 * ((len(panels) + 2) // 3)),
                                 squeeze=False)
        for ax, (title, exprs) in zip(axes.flat, panels.items()):
            for expr in exprs:
                for labels, points in client.range(expr, start, end, 0.5).items():
                    ax.plot([t - start for t, _ in points], [v for _, v in points],
                            label=re.sub(r"[()']", "", str(labels))[:40])
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        fig.suptitle(json.loads(path.read_text())["title"] + " (seconds since the load began)")
        fig.tight_layout()
        fig.savefig(out / f"dashboard-{path.stem}.png", dpi=80)
        plt.close(fig)
