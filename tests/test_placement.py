"""Placement of prefill and decode replicas on typed GPU nodes inside power budgets (pure)."""

import time

from fleetwise.controllers.placement import Node, Placement, Pod, PowerDomain, place_all
from fleetwise.gpus import gpu_family


def gpu_node(name, product, gpus=8, rack="r1", **kw):
    return Node(name, product, gpus, labels={"rack": rack, "nvidia.com/gpu.product": product}, **kw)


def pods(pool, n, gpus=1, gpu_type="H100"):
    return [Pod(f"{pool}-{i}", pool, gpus, gpu_type) for i in range(n)]


def test_gpu_family_matching():
    assert gpu_family("NVIDIA-H100-80GB-HBM3") == "H100"
    assert gpu_family("NVIDIA-A100-SXM4-80GB") == "A100"
    assert gpu_family("Tesla-V100") == "V100"
    assert gpu_family("NVIDIA-L40S") == "L40S" and gpu_family("NVIDIA-L4") == "L4"


def test_prefill_on_h100_and_decode_on_a100_spread_over_nodes():
    nodes = [gpu_node(f"h{i}", "NVIDIA-H100-80GB-HBM3") for i in range(3)] + \
            [gpu_node(f"a{i}", "NVIDIA-A100-SXM4-80GB") for i in range(3)]
    new = pods("ns/m/prefill", 3, 2, "H100") + pods("ns/m/decode", 6, 1, "A100")
    decisions = place_all(nodes, [], new)
    assert all(d.node for d in decisions)
    prefill = [d.node for d in decisions if d.pod.pool.endswith("prefill")]
    decode = [d.node for d in decisions if d.pod.pool.endswith("decode")]
    assert sorted(prefill) == ["h0", "h1", "h2"]          # one per node
    assert sorted(decode) == ["a0", "a0", "a1", "a1", "a2", "a2"]  # two per node, evenly


def test_spread_counts_existing_replicas_and_power_domains():
    nodes = [gpu_node("n1", "H100", rack="r1"), gpu_node("n2", "H100", rack="r1"), gpu_node("n3", "H100", rack="r2")]
    domains = [PowerDomain("rack-r1", {"rack": "r1"}, 100_000), PowerDomain("rack-r2", {"rack": "r2"}, 100_000)]
    placed = [Pod("old-0", "ns/m/decode", 1, "H100", node="n1")]
    [d] = place_all(nodes, placed, pods("ns/m/decode", 1), domains)
    assert d.node == "n3"  # n2 is empty too, but its rack already runs a replica of the pool


def test_resources_cordons_taints_and_readiness():
    nodes = [gpu_node("full", "H100", gpus=2), gpu_node("cordoned", "H100", unschedulable=True),
             gpu_node("tainted", "H100", taints=[("dedicated", "NoSchedule")]),
             gpu_node("gpu-taint", "H100", gpus=1, taints=[("nvidia.com/gpu", "NoSchedule")]),
             gpu_node("down", "H100", ready=False)]
    placed = [Pod("x", "ns/other/decode", 2, "H100", node="full")]
    decisions = place_all(nodes, placed, pods("ns/m/prefill", 2))
    assert decisions[0].node == "gpu-taint"  # the usual GPU taint is tolerated
    assert decisions[1].node is None
    reason = decisions[1].reason
    for words in ("0/5 nodes", "not enough free GPUs", "node cordoned", "untolerated taint", "node not ready"):
        assert words in reason, reason


def test_power_budget_admits_nameplate_up_to_limit_times_oversubscription():
    # 4 nodes x 8 H100 x 700 W = 22.4 kW of GPUs in a 10 kW rack oversubscribed 1.4x: 14 kW admits 20 GPUs
    nodes = [gpu_node(f"n{i}", "H100") for i in range(4)]
    rack = PowerDomain("rack-r1", {"rack": "r1"}, 10_000, oversubscription=1.4)
    decisions = place_all(nodes, [], pods("ns/m/prefill", 24, 1), [rack])
    placed = [d for d in decisions if d.node]
    assert len(placed) == 20
    assert all("power budget rack-r1 full" in d.reason for d in decisions if not d.node)
    watts, admit = Placement(nodes, [d.pod.__class__(d.pod.name, d.pod.pool, 1, "H100", d.node) for d in placed],
                             [rack]).domain_usage()["rack-r1"]
    assert watts == 14_000 and admit == 14_000


def test_wrong_gpu_type_is_explained():
    [d] = place_all([gpu_node("a", "A100")], [], pods("ns/m/prefill", 1, 1, "H100"))
    assert d.node is None and "1 GPU type is not H100" in d.reason


def test_a_batch_never_double_books():
    nodes = [gpu_node(f"n{i}", "H100", gpus=4) for i in range(5)]
    decisions = place_all(nodes, [], pods("ns/b/prefill", 3, 4) + pods("ns/a/decode", 12, 1))
    used = {}
    for d in decisions:
        if d.node:
            used[d.node] = used.get(d.node, 0) + d.pod.gpus
    assert all(v <= 4 for v in used.values())
    assert sum(1 for d in decisions if d.node) == 3 + 8  # 20 GPUs: three 4-GPU replicas, 8 of 12 singles
    assert all("not enough free GPUs" in d.reason for d in decisions if not d.node)


def test_placement_of_10000_gpus_is_fast_enough_to_run_every_reconcile():
    """A sanity bound only; the timed comparison is `fleetwise bench operator`."""
    nodes = [gpu_node(f"n{i}", "H100" if i % 2 else "A100", rack=f"r{(i // 2) % 40}") for i in range(1250)]
    # about 137 kW of nameplate per rack, admitted by 120 kW x 1.2
    domains = [PowerDomain(f"r{k}", {"rack": f"r{k}"}, 120_000, 1.2) for k in range(40)]
    new = []
    for m in range(100):
        new += pods(f"ns/m{m}/prefill", 25, 2, "H100") + pods(f"ns/m{m}/decode", 50, 1, "A100")
    t0 = time.perf_counter()
    decisions = place_all(nodes, [], new, domains)
    elapsed = time.perf_counter() - t0
    assert sum(1 for d in decisions if d.node) == len(new)
    assert elapsed < 10, elapsed


def test_a_node_marked_suspect_takes_a_replica_only_when_no_other_fits():
    suspect = gpu_node("n1", "H100", gpus=2, taints=[("fleetwise.dev/suspect", "PreferNoSchedule")])
    nodes = [suspect, gpu_node("n2", "H100", gpus=2)]
    placed = [Pod("old-0", "ns/m/decode", 1, "H100", node="n2")]  # spread alone would pick n1
    assert [d.node for d in place_all(nodes, placed, pods("ns/m/decode", 2))] == ["n2", "n1"]  # n1 when n2 is full
    tolerant = Pod("t-0", "ns/m/decode", 1, "H100", tolerations=("fleetwise.dev/suspect",))
    assert place_all(nodes, placed, [tolerant])[0].node == "n1"
