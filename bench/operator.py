"""`fleetwise bench operator`: the operator converging a large fleet on a real API server, and
its placement alone, each against a baseline in the same run.

Convergence (bench/operator_cluster.py): kwok GPU nodes (half H100, half A100, 8 GPUs each,
10 racks) and ModelDeployments of prefill + decode replicas (by default 250 nodes, 100 x
(4 + 6) = 1,000 pods), against the stock kube-scheduler binding the same 1,000 pods
(nodeSelector for the GPU product) on the same control plane: seconds to every pod bound and
Ready, the operator's Kubernetes API requests per pod (from its own metrics), and the CPU
seconds of the binder (kube-scheduler, or the operator process) and of the rest of the
control plane over each run.

Placement, in-process, for 10,000 GPUs in 40 power domains, against a naive placement that
does the same work (the same nodes, pods and power domains, the same checks and ranking)
by scanning every node for every pod; both are timed whole, and must decide alike. Both
are single-threaded computations, timed in CPU seconds of the process (the wall time,
which on a shared machine moves with everything else, is kept beside it).

Targets (bench/targets.py states the rule): every pod Ready within 60 s of creation, every
pod bound no later than kube-scheduler binds its pods, placement of 10,000 GPUs within 1 s.
"""

import statistics
import time
from pathlib import Path

from rich.table import Table

from fleetwise.bench.harness import figure, finish, header, make_console, over_runs, save_plot, write_json, wrote
from fleetwise.bench.operator_cluster import A100, H100, cluster_bench
from fleetwise.bench.targets import AT_LEAST, AT_MOST, Check, Target, checks_json, checks_table, target_values

console = make_console(120)

TARGETS = {
    "converge_seconds": Target(AT_MOST, 60, "fleetwise: creation to all Ready", "<= 60 s"),
    "bound_vs_kube_scheduler": Target(AT_MOST, 1.0, "time to all bound, fleetwise / kube-scheduler", "<= 1.0x"),
    "placement_seconds": Target(AT_MOST, 1.0, "placement of 10,000 GPUs", "<= 1 s"),
    "placement_vs_naive": Target(AT_LEAST, 1.0, "placement speed, fleetwise / naive scan (same work)", ">= 1.0x"),
}
PLACEMENT_REPEATS = 3


def _naive_place(nodes, new, domains):
    """Baseline: for every pod, scan every node (no index, no heap), with the same checks,
    power domains included, and the same ranking as the placement under test."""
    from fleetwise.controllers.placement import Placement
    p = Placement(nodes, [], domains)
    out = []
    for pod in new:
        best, key = None, None
        for st in p.nodes.values():
            if p._why_not(st, pod) is None:
                k = p._key(st, pod)
                if key is None or k < key:
                    best, key = st, k
        if best is not None:
            p._book(best, pod)
        out.append(best.node.name if best else None)
    return out


def placement_fleet(gpus: int):
    """Nodes (half H100, half A100, 8 GPUs each), 40 racks as power domains, and 100 models'
    pods: a quarter of the GPUs' worth as 2-GPU H100 prefill, half as 1-GPU A100 decode."""
    from fleetwise.controllers.placement import Node, Pod, PowerDomain
    n_nodes = gpus // 8
    nodes = [Node(f"n{i}", H100 if i % 2 else A100, 8, {"rack": f"r{(i // 2) % 40}"}) for i in range(n_nodes)]
    domains = [PowerDomain(f"r{k}", {"rack": f"r{k}"}, 120_000, 1.2) for k in range(40)]
    per_model = max(1, gpus // 100)
    new = []
    for m in range(100):
        new += [Pod(f"m{m}-p{i}", f"ns/m{m}/prefill", 2, "H100") for i in range(per_model // 4)]
        new += [Pod(f"m{m}-d{i}", f"ns/m{m}/decode", 1, "A100") for i in range(per_model // 2)]
    return nodes, domains, new


def placement_bench(gpus: int = 10_000, repeats: int = PLACEMENT_REPEATS) -> dict:
    from fleetwise.controllers.placement import place_all
    nodes, domains, new = placement_fleet(gpus)
    ours, ours_wall, decisions = [], [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        decisions = place_all(nodes, [], new, domains)
        ours.append(time.process_time() - c0)
        ours_wall.append(time.perf_counter() - t0)
    with console.status(f"naive placement of {len(new)} pods (a scan of every node for each)"):
        c0, t0 = time.process_time(), time.perf_counter()
        naive = _naive_place(nodes, new, domains)
        naive_s, naive_wall = time.process_time() - c0, time.perf_counter() - t0
    same = sum(d.node == n for d, n in zip(decisions, naive))
    ours_med = statistics.median(ours)
    return {"gpus": gpus, "nodes": len(nodes), "pods": len(new), "power_domains": len(domains),
            "placed": sum(1 for d in decisions if d.node), "naive_placed": sum(1 for n in naive if n),
            "same_decisions": same, "clock": "CPU seconds of the process (single-threaded work; wall alongside)",
            "seconds": ours_med, "seconds_over_runs": over_runs(ours), "wall_seconds_over_runs": over_runs(ours_wall),
            "naive_seconds": naive_s, "naive_wall_seconds": naive_wall,
            "speedup": naive_s / ours_med if ours_med else None}


def evaluate(placement: dict, cluster: dict) -> dict[str, Check]:
    ours, stock = cluster["fleetwise"], cluster["kube_scheduler"]
    return {
        "converge_seconds": TARGETS["converge_seconds"].check(ours["seconds_to_all_ready"]),
        "bound_vs_kube_scheduler": TARGETS["bound_vs_kube_scheduler"].ratio(ours["seconds_to_all_bound"],
                                                                              stock["seconds_to_all_bound"]),
        "placement_seconds": TARGETS["placement_seconds"].check(placement["seconds"]),
        "placement_vs_naive": TARGETS["placement_vs_naive"].ratio(  # in pods placed a second
            placement["pods"] / placement["seconds"], placement["pods"] / placement["naive_seconds"]),
    }


def run_operator_bench(out: Path, nodes: int = 250, deployments: int = 100, prefill: int = 4, decode: int = 6,
                       timeout: float = 600.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    placement = placement_bench()
    console.print(f"placement of {placement['gpus']} GPUs: {placement['seconds'] * 1e3:.0f} ms CPU, naive scan "
                  f"{placement['naive_seconds']:.1f} s CPU")
    cluster = cluster_bench(nodes, deployments, prefill, decode, timeout, console)
    checks = evaluate(placement, cluster)
    report = {**header("operator"), "placement": placement, "cluster": cluster, "targets": checks_json(checks),
              "target_values": target_values(TARGETS)}
    json_path = write_json(out / "operator.json", report)
    _print(report, checks)
    wrote(console, json_path, save_plot(lambda p: _plot(report, p), out / "operator.png", console))
    return report


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} s"


def _cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _print(report: dict, checks: dict[str, Check]) -> None:
    c, p = report["cluster"], report["placement"]
    t = Table(title=f"{c['pods']} pods on {c['nodes']} kwok GPU nodes, one control plane "
                    "(server timestamps, whole seconds)")
    for col in ("system", "bound", "all bound", "all Ready", "created -> bound p50/p99", "API requests/pod",
                "binder CPU", "rest of control plane CPU"):
        t.add_column(col)
    for key in ("kube_scheduler", "fleetwise"):
        r = c[key]
        cb = r["created_to_bound_s"] or {}
        t.add_row(r["system"], f"{r['bound']}/{r['pods']}", _s(r["seconds_to_all_bound"]),
                  _s(r["seconds_to_all_ready"]), f"{cb.get('p50', 0):.0f} / {cb.get('p99', 0):.0f} s" if cb else "-",
                  f"{r['api_requests_per_pod']:.1f}" if "api_requests_per_pod" in r else "-",
                  _cpu(r.get("binder_cpu_s")), _cpu(r.get("control_plane_cpu_s")))
    console.print(t)
    console.print(f"placement of {p['gpus']} GPUs ({p['pods']} pods, {p['power_domains']} power domains), "
                  f"in-process: {p['seconds'] * 1e3:.0f} ms CPU (median of {p['seconds_over_runs']['n']}; wall "
                  f"{p['wall_seconds_over_runs']['median'] * 1e3:.0f} ms); naive scan, same work, timed whole: "
                  f"{p['naive_seconds']:.1f} s CPU (wall {p['naive_wall_seconds']:.1f} s), {p['speedup']:.0f}x; "
                  f"same decisions for {p['same_decisions']}/{p['pods']} pods")
    console.print(checks_table(checks, {"converge_seconds": "{:.0f} s", "placement_seconds": "{:.3f} s"}))


def _plot(report: dict, path: Path) -> None:
    c, p = report["cluster"], report["placement"]
    fig, axes = figure(2, (12, 4.2))
    ax = axes[0]
    for key, color in (("kube_scheduler", "#999999"), ("fleetwise", "#dd8452")):
        at = c[key]["bound_at_s"]
        ax.step([0, *at], range(len(at) + 1), where="post", color=color, label=f"{c[key]['system']}: bound")
    ax.set_xlabel("seconds since the first create")
    ax.set_ylabel("pods bound")
    ax.set_title(f"{c['pods']} pods on {c['nodes']} kwok nodes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    bars = ax.bar(["fleetwise", "naive scan"], [p["seconds"], p["naive_seconds"]], color=["#dd8452", "#999999"])
    ax.set_yscale("log")
    ax.set_ylabel("CPU seconds (log)")
    ax.set_title(f"placement of {p['gpus']} GPUs, {p['power_domains']} power domains ({p['speedup']:.0f}x)")
    for b, v in zip(bars, (p["seconds"], p["naive_seconds"])):
        ax.annotate(f"{v:.3g} s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    finish(fig, path, "fleetwise bench operator: convergence against kube-scheduler, placement against a naive scan")
