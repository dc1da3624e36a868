"""The operator benchmark's baselines do the same work: the naive placement honours power
domains and decides as the placement under test does; convergence is read from the pods'
own timestamps for fleetwise and kube-scheduler alike."""

import pytest

from fleetwise.bench.operator import _naive_place, _plot, evaluate, placement_bench
from fleetwise.bench.operator_cluster import H100, stock_pod, timings
from fleetwise.controllers.placement import Node, Pod, PowerDomain, place_all


def test_the_naive_placement_honours_power_domains_and_decides_alike():
    nodes = [Node(f"n{i}", H100, 8, {"rack": f"r{i % 2}"}) for i in range(4)]
    # rack r0 admits 10 GPUs' nameplate power, r1 is unbounded in practice
    domains = [PowerDomain("r0", {"rack": "r0"}, 10 * 700, 1.0), PowerDomain("r1", {"rack": "r1"}, 1e9, 1.0)]
    pods = [Pod(f"p{i}", "ns/m/decode", 1, "H100") for i in range(30)]
    ours = [d.node for d in place_all(nodes, [], pods, domains)]
    naive = _naive_place(nodes, pods, domains)
    assert naive == ours
    in_r0 = sum(1 for n in naive if n in ("n0", "n2"))
    assert in_r0 == 10 and naive.count(None) == 30 - 10 - 16  # r0 stops at its budget, r1 at its GPUs


def test_the_placement_bench_times_both_whole_on_the_same_pods():
    r = placement_bench(gpus=400, repeats=1)
    assert r["pods"] == 300 and r["placed"] == r["naive_placed"] == r["same_decisions"] == 300
    assert r["power_domains"] == 40 and r["seconds"] > 0 and r["naive_seconds"] > 0


def _pod(created: str, bound: str | None, ready: str | None) -> dict:
    conds = [{"type": t, "status": "True", "lastTransitionTime": ts} for t, ts in
             (("PodScheduled", bound), ("Ready", ready)) if ts]
    return {"metadata": {"creationTimestamp": created}, "status": {"conditions": conds}}


def test_convergence_is_read_from_the_pods_timestamps():
    t0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    pods = [_pod("2023-11-14T22:13:21Z", "2023-11-14T22:13:23Z", "2023-11-14T22:13:25Z"),
            _pod("2023-11-14T22:13:22Z", "2023-11-14T22:13:30Z", "2023-11-14T22:13:31Z")]
    t = timings(pods, t0)
    assert t["seconds_to_all_bound"] == 10 and t["seconds_to_all_ready"] == 11 and t["last_created_s"] == 2
    assert t["bound_at_s"] == [3, 10] and t["created_to_bound_s"]["max"] == 8
    unbound = timings([*pods, _pod("2023-11-14T22:13:22Z", None, None)], t0)
    assert unbound["seconds_to_all_bound"] is None and unbound["bound"] == 2
    # created with its node set: nothing binds it, nothing writes PodScheduled; bound at creation
    on_node = {**_pod("2023-11-14T22:13:40Z", None, "2023-11-14T22:13:45Z"), "spec": {"nodeName": "gpu-1"}}
    t = timings([*pods, on_node], t0)
    assert t["seconds_to_all_bound"] == 20 and t["created_to_bound_s"]["max"] == 8
    assert t["created_to_ready_s"]["max"] == 9 and t["seconds_to_all_ready"] == 25


def test_the_stock_pod_asks_kube_scheduler_for_the_gpu_product():
    pod = stock_pod("x", H100)
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    assert "schedulerName" not in pod["spec"]  # the default scheduler
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}


def test_the_targets_compare_with_kube_scheduler_in_the_same_run(tmp_path):
    placement = placement_bench(gpus=400, repeats=1)
    run = {"pods": 2, "bound": 2, "ready": 2, "created_to_bound_s": None, "bound_at_s": [1.0, 4.0]}
    cluster = {"pods": 2, "nodes": 2,
               "kube_scheduler": {**run, "system": "kube-scheduler", "seconds_to_all_bound": 8.0},
               "fleetwise": {**run, "system": "fleetwise operator", "seconds_to_all_bound": 4.0,
                             "seconds_to_all_ready": 5.0}}
    checks = evaluate(placement, cluster)
    assert checks["bound_vs_kube_scheduler"].measured == pytest.approx(0.5) and checks["bound_vs_kube_scheduler"].met
    assert checks["converge_seconds"].met is True
    assert checks["placement_vs_naive"].measured == pytest.approx(placement["speedup"])
    _plot({"cluster": cluster, "placement": placement}, tmp_path / "operator.png")
    assert (tmp_path / "operator.png").stat().st_size > 10_000
