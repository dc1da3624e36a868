"""Where each prefill and decode replica goes (pure; the operator binds what this decides).

A pool's replicas go only to nodes with the pool's GPU product (Splitwise pairs prompt
machines with token machines of another type), that are schedulable, whose taints the
workers tolerate and that have the GPUs free. Among those, a node with a `PreferNoSchedule`
taint the pod does not tolerate comes last (as kube-scheduler scores it: a node marked suspect
takes a replica only when no other fits); then replicas spread: fewest
replicas of the same pool on the node, then in its power domain, then the most free GPUs
left (so a node is not split between pools when another is empty). A power domain
(`PowerBudget`) admits a replica only while the nameplate power of everything placed in it
stays within `limitWatts x oversubscription`. When nothing fits, the decision says which
constraint ruled each node out.
"""

import heapq
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetwise.gpus import gpu_family, product

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

TOLERATED_TAINTS = {GPU_RESOURCE}  # worker pods tolerate the usual "GPU nodes only" taint


def gpu_matches(gpu_product: str, wanted: str) -> bool:
    """A pool's gpuType matches a node's product by family ('H100') or exactly."""
    return gpu_product == wanted or gpu_family(gpu_product) == gpu_family(wanted)


@dataclass
class Node:
    name: str
    gpu_product: str = ""
    gpus_allocatable: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[tuple[str, str]] = field(default_factory=list)  # (key, effect)
    unschedulable: bool = False
    ready: bool = True
    gpu_watts: float | None = None  # per GPU; None: from the product

    @property
    def watts_per_gpu(self) -> float:
        """Nameplate power per GPU: the node's `fleetwise.dev/gpu-watts` label, else the product's rating."""
        if self.gpu_watts is not None:
            return self.gpu_watts
        return product(self.gpu_product).rated_watts


@dataclass(frozen=True)
class Pod:
    """A worker replica, placed (node set) or to place."""
    name: str
    pool: str          # "<namespace>/<deployment>/<role>"
    gpus: int
    gpu_type: str = ""
    node: str | None = None
    tolerations: tuple[str, ...] = ()  # taint keys tolerated besides the GPU taint


@dataclass
class PowerDomain:
    name: str
    selector: dict[str, str]   # node labels that put a node in this domain
    limit_watts: float
    oversubscription: float = 1.0

    @property
    def admit_watts(self) -> float:
        return self.limit_watts * self.oversubscription

    def contains(self, node: Node) -> bool:
        return all(node.labels.get(k) == v for k, v in self.selector.items())


@dataclass
class Decision:
    pod: Pod
    node: str | None
    reason: str = ""   # why nothing fits, when node is None


@dataclass
class _NodeState:
    node: Node
    free_gpus: int
    domains: list[str]
    pools: Counter = field(default_factory=Counter)
    watts: float = 0.0                # per GPU (node.watts_per_gpu, read once)
    blocking: tuple[str, ...] = ()    # NoSchedule / NoExecute taints a worker may still tolerate
    prefer_not: tuple[str, ...] = ()  # PreferNoSchedule taints


def _node_state(n: Node, domains: Sequence[PowerDomain]) -> _NodeState:
    """What placement asks of a node for every pod, worked out once."""
    return _NodeState(n, n.gpus_allocatable, [d.name for d in domains if d.contains(n)], watts=n.watts_per_gpu,
                      blocking=tuple(k for k, effect in n.taints
                                     if effect in ("NoSchedule", "NoExecute") and k not in TOLERATED_TAINTS),
                      prefer_not=tuple(k for k, effect in n.taints if effect == "PreferNoSchedule"))


class Placement:
    """The cluster as placement sees it; `place` decides for new pods and books them, so
    a batch of decisions never oversubscribes a node or a domain."""

    def __init__(self, nodes: list[Node], placed: list[Pod], domains: Sequence[PowerDomain] = ()):
        self.domains = {d.name: d for d in domains}
        self.admit = {d.name: d.admit_watts for d in domains}
        self.nodes: dict[str, _NodeState] = {n.name: _node_state(n, domains) for n in nodes}
        self.domain_watts: dict[str, float] = defaultdict(float)
        self.domain_pools: dict[str, Counter] = defaultdict(Counter)
        for p in placed:
            st = self.nodes.get(p.node or "")
            if st is not None:
                self._book(st, p)
        self.by_family: dict[str, list[_NodeState]] = defaultdict(list)
        for st in self.nodes.values():
            self.by_family[gpu_family(st.node.gpu_product)].append(st)

    def _book(self, st: _NodeState, pod: Pod) -> None:
        st.free_gpus -= pod.gpus
        st.pools[pod.pool] += 1
        for d in st.domains:
            self.domain_watts[d] += pod.gpus * st.watts
            self.domain_pools[d][pod.pool] += 1

    # _why_not and _key run for every candidate node of every pool: hence the work done once in _node_state
    def _why_not(self, st: _NodeState, pod: Pod) -> str | None:
        n = st.node
        if not n.ready:
            return "node not ready"
        if n.unschedulable:
            return "node cordoned"
        if st.blocking and any(key not in pod.tolerations for key in st.blocking):
            return "untolerated taint"
        if pod.gpu_type and not gpu_matches(n.gpu_product, pod.gpu_type):
            return f"GPU type is not {pod.gpu_type}"
        if st.free_gpus < pod.gpus:
            return "not enough free GPUs"
        watts = pod.gpus * st.watts
        for d in st.domains:
            if self.domain_watts[d] + watts > self.admit[d]:
                return f"power budget {d} full"
        return None

    def _key(self, st: _NodeState, pod: Pod) -> tuple:
        pool = pod.pool
        domain_load = 0
        for d in st.domains:
            domain_load = max(domain_load, self.domain_pools[d][pool])
        avoid = bool(st.prefer_not) and any(key not in pod.tolerations for key in st.prefer_not)
        return (avoid, st.pools[pool], domain_load, -st.free_gpus, st.node.name)

    def place(self, pod: Pod) -> Decision:
        return self.place_many([pod])[0]

    def place_many(self, pods: list[Pod]) -> list[Decision]:
        """Decisions in order. Pods of one pool share a lazily updated heap of candidate
        nodes, so a pool of n replicas over m nodes costs O((n + m) log m), not O(n m)."""
        decisions: dict[int, Decision] = {}  # by index into pods; every index gets one
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(pods):
            groups[(p.pool, p.gpus, p.gpu_type)].append(i)
        for (_, _, gpu_type), indices in groups.items():
            family = gpu_family(gpu_type) if gpu_type else None
            candidates = self.by_family.get(family, []) if family else list(self.nodes.values())
            heap = [(self._key(st, pods[indices[0]]), st.node.name) for st in candidates
                    if self._why_not(st, pods[indices[0]]) is None]
            heapq.heapify(heap)
            for i in indices:
                pod = pods[i]
                chosen = None
                while heap:
                    key, name = heapq.heappop(heap)
                    st = self.nodes[name]
                    if self._why_not(st, pod) is not None:
                        continue  # full now (GPUs or power): never fits this group again
                    fresh = self._key(st, pod)
                    if fresh != key:  # spread counts moved since it was pushed
                        heapq.heappush(heap, (fresh, name))
                        continue
                    chosen = st
                    break
                if chosen is None:
                    decisions[i] = Decision(pod, None, self._explain(pod))
                    continue
                self._book(chosen, pod)
                decisions[i] = Decision(pod, chosen.node.name)
                if self._why_not(chosen, pod) is None:
                    heapq.heappush(heap, (self._key(chosen, pod), chosen.node.name))
        return [decisions[i] for i in range(len(pods))]

    def _explain(self, pod: Pod) -> str:
        if not self.nodes:
            return "no GPU nodes"
        reasons = Counter(self._why_not(st, pod) or "fits" for st in self.nodes.values())
        parts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        return f"0/{len(self.nodes)} nodes fit a {pod.gpus}-GPU {pod.gpu_type or 'any-GPU'} replica: {parts}"

    def free_gpus(self, node: str) -> int:
        return self.nodes[node].free_gpus

    def domain_usage(self) -> dict[str, tuple[float, float]]:
        """Nameplate watts booked per domain, and what it admits."""
        return {d: (self.domain_watts[d], dom.admit_watts) for d, dom in self.domains.items()}


def place_all(nodes: list[Node], placed: list[Pod], new: list[Pod],
              domains: Sequence[PowerDomain] = ()) -> list[Decision]:
    return Placement(nodes, placed, domains).place_many(new)
