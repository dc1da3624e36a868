"""The simulated fleet's machines and where its workers run: nodes of `gpus_per_node` GPUs of
each product the pools ask for, grouped into power domains of `nodes_per_domain` nodes, and
each worker's node as the controllers' own placement (fleetwise.controllers.placement)
decides it, as the operator would. The power controller acts per domain (power.py)."""

import math
from dataclasses import dataclass

from fleetwise import gpus
from fleetwise.controllers.placement import Node, Pod, PowerDomain, place_all

from .workers import Pool

DOMAIN_LABEL = "fleetwise.dev/power-domain"


@dataclass
class Layout:
    gpus_per_node: int = 8
    nodes_per_domain: int = 16
    domain_watts: float | None = None   # a domain's budget; None: its nodes' nameplate / oversubscription
    oversubscription: float = 1.0       # nameplate placed in a domain over its budget


def make_nodes(pools: list[tuple[Pool, int]], layout: Layout) -> tuple[list[Node], list[PowerDomain]]:
    """Just enough nodes of each product for the pools' GPUs, in domains of
    `nodes_per_domain` nodes of one product."""
    needed: dict[str, int] = {}
    for pool, count in pools:
        needed[pool.gpu.family] = needed.get(pool.gpu.family, 0) + count * pool.perf.tp
    nodes: list[Node] = []
    domains: list[PowerDomain] = []
    for family, gpu_count in needed.items():
        product = gpus.product(family)
        n_nodes = math.ceil(gpu_count / layout.gpus_per_node)
        for d in range(math.ceil(n_nodes / layout.nodes_per_domain)):
            name = f"{family.lower()}-d{d}"
            members = min(layout.nodes_per_domain, n_nodes - d * layout.nodes_per_domain)
            nameplate = members * layout.gpus_per_node * product.rated_watts
            budget = layout.domain_watts or nameplate / layout.oversubscription
            # (a hair over, so that budget x oversubscription admits the whole nameplate despite rounding)
            domains.append(PowerDomain(name, {DOMAIN_LABEL: name}, budget, layout.oversubscription * (1 + 1e-12)))
            for i in range(members):
                index = d * layout.nodes_per_domain + i
                nodes.append(Node(f"{family.lower()}-{index:04d}", product.dcgm_model_name, layout.gpus_per_node,
                                  {DOMAIN_LABEL: name}))
    return nodes, domains


def place_workers(pools: list[tuple[Pool, int]], layout: Layout) -> tuple[list[str], list[Node], list[PowerDomain]]:
    """Each worker's node, in the order of the pools and their workers."""
    nodes, domains = make_nodes(pools, layout)
    pods = [Pod(f"{pool.name}-{i}", pool.name, pool.perf.tp, pool.gpu.family)
            for pool, count in pools for i in range(count)]
    decisions = place_all(nodes, [], pods, domains)
    unplaced = [f"{d.pod.name}: {d.reason}" for d in decisions if d.node is None]
    if unplaced:
        raise ValueError(f"{len(unplaced)} workers do not fit the fleet, e.g. {unplaced[0]}")
    return [d.node or "" for d in decisions], nodes, domains
