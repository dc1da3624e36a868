"""The goodput benchmark's measures per system and load, the report, its table and its plot.

Per turn: goodput (requests that met both SLO targets, per second of the counted window),
attainment (their share of the counted requests), TTFT and TPOT percentiles, and the share
of prompt tokens the workers' prefix caches held (their usage's `cached_tokens`). Per load:
the median over repeats and the spread (min, max). The ratio is fleetwise's median goodput
over the best vllm-router policy's median at that load; the difference is beyond the spread
when fleetwise's worst repeat beats the best policy's best repeat.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwise.bench.goodput.load import SLO, Outcome
from fleetwise.bench.goodput.workload import Shape
from fleetwise.bench.harness import AT_LEAST, Target, figure, finish, header, mark, summary
from fleetwise.procs import Process

TARGET = Target(AT_LEAST, 1.2, "fleetwise goodput / vllm-router's best", ">= 1.2x at every load")


@dataclass
class System:
    key: str
    url: str
    proc: Process
    goodput: list[list[float]] = field(default_factory=list)       # per load, per repeat
    attainment: list[list[float]] = field(default_factory=list)
    outcomes: list[list[Outcome]] = field(default_factory=list)    # per load, all repeats
    spans: list[list[float]] = field(default_factory=list)
    slo_ttft_s: float = 0.0       # the SLO the turns were judged by (add sets it)
    slo_tpot_s: float = 0.0

    def init(self, loads: int) -> None:
        self.goodput = [[] for _ in range(loads)]
        self.attainment = [[] for _ in range(loads)]
        self.outcomes = [[] for _ in range(loads)]
        self.spans = [[] for _ in range(loads)]

    def add(self, load: int, counted: list[Outcome], window_s: float, slo: SLO, span: float) -> None:
        met = sum(slo.met(o) for o in counted)
        self.slo_ttft_s, self.slo_tpot_s = slo.ttft_s, slo.tpot_s
        self.goodput[load].append(met / window_s)
        self.attainment[load].append(met / len(counted) if counted else 0.0)
        self.outcomes[load].extend(counted)
        self.spans[load].append(span)

    def at(self, load: int) -> dict[str, Any]:
        o = self.outcomes[load]
        ok = [x for x in o if x.ok]
        cached = [x.cached_tokens for x in ok if x.cached_tokens is not None]
        g = self.goodput[load]
        return {"goodput_rps": {"median": float(np.median(g)), "min": min(g), "max": max(g), "repeats": g},
                "slo_attainment": float(np.median(self.attainment[load])),
                "requests": len(o), "errors": len(o) - len(ok),
                "missed_ttft": sum(1 for x in ok if x.ttft_s is not None and x.ttft_s > self.slo_ttft_s),
                "missed_tpot_only": sum(1 for x in ok if x.ttft_s is not None and x.ttft_s <= self.slo_ttft_s
                                        and (x.tpot_s or 0.0) > self.slo_tpot_s),
                "ttft_ms": summary([x.ttft_s for x in ok], "p50", "p90", "p99", scale=1e3),
                "tpot_ms": summary([x.tpot_s for x in ok], "p50", "p90", "p99", scale=1e3),
                "cached_prompt_tokens_mean": float(np.mean(cached)) if cached else None,
                "turn_span_s": self.spans[load]}


def build_report(systems: list[System], loads: list[float], capacities: list[float], seconds: float, repeats: int,
                 slo: SLO, shape: Shape, warmup_share: float, fleet: dict, env: dict) -> dict:
    per = {s.key: [s.at(i) for i in range(len(loads))] for s in systems}
    capacity = float(np.median(capacities))
    ours = [s.key for s in systems if s.key.startswith("fleetwise/")]
    theirs = [s.key for s in systems if s.key.startswith("vllm-router/")]
    rows = []
    for i, load in enumerate(loads):
        row: dict[str, Any] = {"load": load, "offered_rps": load * capacity}
        if ours and theirs:
            best = max(theirs, key=lambda k: per[k][i]["goodput_rps"]["median"])
            b = per[best][i]["goodput_rps"]
            for key in ours:
                g = per[key][i]["goodput_rps"]
                ratio = g["median"] / b["median"] if b["median"] > 0 else None
                row[key] = {"vs": best, "ratio": ratio, "met": TARGET.met(ratio) if ratio is not None else None,
                            "beyond_spread": g["min"] > b["max"]}
        rows.append(row)
    return {**header("goodput"), "fleet": fleet, "capacity_rps": capacity, "capacity_per_repeat_rps": capacities,
            "capacity_how": "each repeat, a closed loop straight to the workers, client round-robin, "
                            f"{fleet.get('capacity_clients_per_worker', 3)} clients per worker; offered_rps is the "
                            "median's",
            "loads": loads, "seconds_per_turn": seconds, "counted_after_s": warmup_share * seconds,
            "repeats": repeats, "slo": slo.to_json(), "workload": shape.to_json(),
            "targets": {"goodput_ratio": TARGET.to_json()}, "ratios": rows, "systems": per, "environment": env}


def print_summary(console: Console, report: dict) -> None:
    t = Table(title=f"goodput, requests/s within the SLO (median of {report['repeats']}; min-max)")
    t.add_column("load")
    keys = list(report["systems"])
    for k in keys:
        t.add_column(k)
    t.add_column("ratio (vs best vllm-router)")
    t.add_column("met")
    for i, row in enumerate(report["ratios"]):
        cells = []
        for k in keys:
            g = report["systems"][k][i]["goodput_rps"]
            cells.append(f"{g['median']:.2f} ({g['min']:.2f}-{g['max']:.2f})")
        ours = [v for v in row.values() if isinstance(v, dict)]
        ratio = "; ".join(f"{v['ratio']:.2f}x vs {v['vs']}" + ("" if v["beyond_spread"] else " (within spread)")
                          for v in ours if v["ratio"] is not None)
        t.add_row(f"{row['load']:.2f}x ({row['offered_rps']:.2f}/s)", *cells, ratio or "-",
                  mark(all(v["met"] for v in ours) if ours else None))
    console.print(t)


def plot(report: dict, path: Any) -> None:
    fig, (ax, ax2) = figure(2, (12, 4.5))
    loads = report["loads"]
    for key, per in report["systems"].items():
        med = [p["goodput_rps"]["median"] for p in per]
        lo = [m - p["goodput_rps"]["min"] for m, p in zip(med, per)]
        hi = [p["goodput_rps"]["max"] - m for m, p in zip(med, per)]
        style = "-o" if key.startswith("fleetwise/") else "--s"
        ax.errorbar(loads, med, yerr=[lo, hi], fmt=style, capsize=3, label=key)
        ax2.plot(loads, [p["ttft_ms"]["p90"] / 1e3 if p["ttft_ms"] else np.nan for p in per], style, label=key)
    ax.plot(loads, [x * report["capacity_rps"] for x in loads], ":", color="grey", label="offered")
    ax.set_xlabel("offered load (x the fleet's capacity)")
    ax.set_ylabel("goodput (requests/s within the SLO)")
    ax.legend(fontsize=7)
    ax2.axhline(report["slo"]["ttft_s"]["value"], color="grey", ls=":", label="TTFT target")
    ax2.set_yscale("log")
    ax2.set_xlabel("offered load (x the fleet's capacity)")
    ax2.set_ylabel("TTFT p90 (s)")
    ax2.legend(fontsize=7)
    slo = report["slo"]
    fleet = report["fleet"]
    args = fleet.get("worker_args", [])
    what = f"modelled {args[1]} ({args[3]})" if fleet.get("kind") == "modelled" else fleet["preset"]
    finish(fig, path, f"SLO goodput, {fleet['workers']} {what} workers, median of {report['repeats']} (min-max): "
                      f"TTFT <= {slo['ttft_s']['value']} s, TPOT <= {slo['tpot_s']['value'] * 1e3:.0f} ms")
