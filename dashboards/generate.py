"""The Grafana dashboards, as code: each dashboard is rows of panels, each panel its PromQL
over the metric names of telemetry/catalog.py, built with Grafana's grafana-foundation-sdk
into the JSON files beside this one, which the chart ships as ConfigMaps.

    python dashboards/generate.py          # write dashboards/*.json
    python dashboards/generate.py --check  # exit 1 when a committed file is not what this makes

Queries filter on the `model` variable (the model_name label) and use Grafana's
$__rate_interval; tests/test_dashboards.py substitutes both to parse each with promtool.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from fleetwise.telemetry import catalog as c

HERE = Path(__file__).resolve().parent
M = 'model_name=~"$model"'
RATE = "[$__rate_interval]"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass
class Panel:
    title: str
    unit: str
    queries: list[tuple[str, str]]  # (expr, legend)
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: dict[str, list[Panel]] = field(default_factory=dict)


def quantiles(metric: str, by: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99), where: str = M) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{where}}}{RATE})))",
             f"p{round(q * 100)} {{{{{by}}}}}") for q in qs]


def rate(metric: str, by: str, where: str = M) -> str:
    return f"sum by ({by}) (rate({metric}_total{{{where}}}{RATE}))"


FLEET = Dashboard("fleetwise-fleet", "fleetwise / fleet overview",
                  "Requests, latency, queues and KV cache over every model's workers.", {
    "Requests": [
        Panel("Requests/s by status", "reqps", [(rate(c.ROUTER_REQUESTS, "model_name, status"),
                                                 "{{model_name}} {{status}}")]),
        Panel("Tokens/s", "short", [(rate(c.GENERATION_TOKENS, "model_name"), "generated {{model_name}}"),
                                    (rate(c.PROMPT_TOKENS, "model_name"), "prompt {{model_name}}")]),
    ],
    "Latency": [
        Panel("Time to first token", "s", quantiles(c.TIME_TO_FIRST_TOKEN, "model_name")),
        Panel("Inter-token latency", "s", quantiles(c.INTER_TOKEN_LATENCY, "model_name")),
        Panel("End-to-end latency", "s", quantiles(c.E2E_REQUEST_LATENCY, "model_name")),
    ],
    "Queues and KV cache": [
        Panel("Requests waiting and running", "short", [
            (f"sum by (model_name) ({c.NUM_REQUESTS_WAITING}{{{M}}})", "waiting {{model_name}}"),
            (f"sum by (model_name) ({c.NUM_REQUESTS_RUNNING}{{{M}}})", "running {{model_name}}")]),
        Panel("KV cache in use per pool", "percentunit", [
            (f"sum by (model_name, role) ({c.KV_BLOCKS_USED}{{{M}}}) / (sum by (model_name, role) "
             f"({c.KV_BLOCKS_USED}{{{M}}}) + sum by (model_name, role) ({c.KV_BLOCKS_FREE}{{{M}}}))",
             "{{model_name}} {{role}}")]),
        Panel("Prefix cache hit rate", "percentunit", [
            (f"{rate(c.PREFIX_CACHE_HITS, 'model_name')} / {rate(c.PREFIX_CACHE_QUERIES, 'model_name')}",
             "{{model_name}}")], "Prompt tokens found in the prefix cache, of those looked up."),
        Panel("Requests refused before the engine", "reqps", [(rate(c.REQUESTS_REJECTED, "model_name, reason"),
                                                               "{{model_name}} {{reason}}")]),
    ],
})

PD = Dashboard("fleetwise-pd", "fleetwise / prefill, decode and KV transfer",
               "The prefill -> decode handoff: KV bytes moved, pull times, recomputes and leases.", {
    "KV transfer": [
        Panel("KV bytes/s", "Bps", [(rate(c.KV_TRANSFER_BYTES, "model_name, direction"),
                                     "{{model_name}} {{direction}}")]),
        Panel("KV pull time", "s", quantiles(c.KV_TRANSFER_SECONDS, "model_name")),
        Panel("Prompts recomputed instead of pulled, by reason", "short", [
            (rate(c.KV_RECOMPUTES, "model_name, reason"), "{{model_name}} {{reason}}")],
            "A failed pull is never used: the decode worker recomputes the prompt."),
        Panel("KV leases held and expired", "short", [
            (f"sum by (model_name) ({c.KV_LEASES}{{{M}}})", "held {{model_name}}"),
            (rate(c.KV_LEASES_EXPIRED, "model_name"), "expired/s {{model_name}}")]),
    ],
    "Engine steps by role": [
        Panel("Step time", "s", quantiles(c.STEP_SECONDS, "role", (0.5, 0.99))),
        Panel("Tokens per step", "short", quantiles(c.BATCH_TOKENS, "role", (0.5, 0.99))),
        Panel("Engine heartbeat age", "s", [(f"max by (role) ({c.ENGINE_HEARTBEAT_AGE}{{{M}}})", "{{role}}")]),
        Panel("Preemptions/s", "short", [(rate(c.NUM_PREEMPTIONS, "model_name"), "{{model_name}}")]),
    ],
})

ROUTER = Dashboard("fleetwise-router", "fleetwise / router",
                   "The front door: routing decisions, retries, refusals and each replica's health.", {
    "Decisions": [
        Panel("Decisions/s by policy and role", "short", [(rate(c.ROUTER_DECISIONS, "policy, role"),
                                                           "{{policy}} {{role}}")]),
        Panel("Retries/s", "short", [(rate(c.ROUTER_RETRIES, "model_name, role"), "{{model_name}} {{role}}")]),
        Panel("429s/s", "reqps", [(rate(c.ROUTER_REQUESTS, "model_name", f'{M}, status="429"'),
                                   "{{model_name}}")]),
        Panel("Router latency", "s", quantiles(c.ROUTER_REQUEST_SECONDS, "model_name")
              + quantiles(c.ROUTER_TTFT_SECONDS, "model_name", (0.99,))),
    ],
    "Replicas": [
        # each router pod reports every replica (the chart runs two): a replica counts once, as healthy
        # when some router finds it so
        Panel("Healthy replicas by role", "short", [(
            f"sum by (model_name, role) (max by (model_name, role, url) ({c.ROUTER_REPLICA_HEALTHY}{{{M}}}))",
            "{{model_name}} {{role}}")]),
        Panel("Outstanding requests per replica", "short", [
            (f"max by (url) ({c.ROUTER_REPLICA_OUTSTANDING}{{{M}}})", "{{url}}")]),
        Panel("Replica 5xx and timeouts/s", "short", [
            (rate(c.ROUTER_REPLICA_SERVER_ERRORS, "url"), "5xx {{url}}"),
            (rate(c.ROUTER_REPLICA_TIMEOUTS, "url"), "timeout {{url}}")]),
        Panel("In flight in the router", "short", [(f"sum({c.ROUTER_INFLIGHT})", "in flight")]),
    ],
})

OPERATOR = Dashboard("fleetwise-operator", "fleetwise / operator",
                     "Reconciles, errors, pods that cannot be placed, and binding latency.", {
    "Reconciles": [
        Panel("Reconciles/s", "short", [(f"sum(rate({c.OPERATOR_RECONCILES}_total{RATE}))", "reconciles")]),
        Panel("Reconcile errors/s by reason", "short", [
            (f"sum by (reason) (rate({c.OPERATOR_RECONCILE_ERRORS}_total{RATE}))", "{{reason}}")]),
        Panel("Kubernetes API requests/s", "short", [
            (f"sum by (verb, resource) (rate({c.OPERATOR_API_REQUESTS}_total{RATE}))", "{{verb}} {{resource}}")]),
    ],
    "Placement": [
        Panel("Pending worker pods by reason", "short", [(f"sum by (reason) ({c.OPERATOR_PENDING_PODS})",
                                                          "{{reason}}")]),
        Panel("Pod created -> bound", "s", [
            (f"histogram_quantile({q}, sum by (le) (rate({c.OPERATOR_BIND_SECONDS}_bucket{RATE})))", f"p{p}")
            for q, p in ((0.5, 50), (0.99, 99))]),
        Panel("Workers by routability", "short", [(f"sum by (state) ({c.OPERATOR_WORKERS})", "{{state}}")]),
    ],
})

POWER = Dashboard("fleetwise-power", "fleetwise / power",
                  "Each power domain against its budget, and each GPU's draw against its limit.", {
    "Domains": [
        Panel("Domain draw / limit", "percentunit", [
            (f"max by (domain) ({c.POWER_DOMAIN_WATTS} / {c.POWER_DOMAIN_LIMIT_WATTS})", "{{domain}}")]),
    ],
    "GPUs": [
        Panel("GPU power", "watt", [(f"sum by (Hostname) ({c.DCGM_POWER_USAGE})", "{{Hostname}}")]),
        Panel("GPU power limit set", "watt", [(f"min by (Hostname) ({c.DCGM_POWER_MGMT_LIMIT})", "{{Hostname}}")]),
        Panel("SM clock", "hertz", [(f"avg by (Hostname) ({c.DCGM_SM_CLOCK}) * 1e6", "{{Hostname}}")]),
    ],
})

DASHBOARDS = (FLEET, PD, ROUTER, OPERATOR, POWER)


def build(d: Dashboard) -> dict:
    b = (db.Dashboard(d.title).uid(d.uid).description(d.description).tags(["fleetwise"])
         .refresh("30s").time("now-1h", "now").timezone("browser")
         .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(db.QueryVariable("model").label("Model").datasource(DATASOURCE)
                        .query(f"label_values({c.NUM_REQUESTS_RUNNING}, model_name)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                        .all_value(".*")))
    for row, panels in d.rows.items():
        b = b.with_row(db.Row(row))
        for p in panels:
            ts = (timeseries.Panel().title(p.title).unit(p.unit).datasource(DATASOURCE).height(8).span(12)
                  .min(0))
            if p.description:
                ts = ts.description(p.description)
            for i, (expr, legend) in enumerate(p.queries):
                ts = ts.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).range()
                                    .ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
            b = b.with_panel(ts)
    return json.loads(json.dumps(b.build(), cls=JSONEncoder))


def render(d: Dashboard) -> str:
    return json.dumps(build(d), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for d in DASHBOARDS:
        path = HERE / f"{d.uid.removeprefix('fleetwise-')}.json"
        text = render(d)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
