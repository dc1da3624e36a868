"""The simulator's figures for the same faults (`fleetwise sim faults`' model, `sim/faults.py`):
a fleet of the benchmark's shape (H100 workers of 4 GPUs, one a node, the same pools, window, threshold and windows
in a row), each fault injected on its own worker, one after the other. The simulator's link
fault slows every pair of its sender (its links are per sender), and its dead worker stands
for the stalled engine (a hard signal, /health failing)."""

from dataclasses import asdict

from fleetwise.bench.faults.cases import Case
from fleetwise.sim.faults import Fault, FaultConfig
from fleetwise.sim.nodes import Layout
from fleetwise.sim.run import DATA, PoolConfig, SimConfig, run_simulation

CONV = DATA / "azure-llm-trace-2023" / "AzureLLMInferenceTrace_conv.csv"
SPACING_S = 120.0       # between two injections in simulated time
RATE_PER_WORKER = 0.5   # requests/s offered per worker


def sim_detection(cases: list[Case], mode: str, per_pool: int, window: int, consecutive: int,
                  restart_s: float) -> dict[str, dict]:
    """Case name -> the simulator's detection and action seconds after injection."""
    kinds = {"slow": "slow", "xid": "xid", "stall": "dead", "link": "link"}
    roles = ("prefill", "decode") if mode == "disaggregated" else ("mixed",)
    faults, names = [], []
    for i, c in enumerate(x for x in cases if x.kind in kinds):
        role, index = (c.link.split("->")[0] if c.kind == "link" else c.worker).rsplit("-", 1)
        factor = 10.0 if c.kind == "link" else max(c.factor, 1.0)
        faults.append(Fault(kinds[c.kind], f"{role}/{index}", SPACING_S * (i + 1), factor))
        names.append(c.name)
    if not faults:
        return {}
    config = SimConfig([PoolConfig(r, per_pool, name=r) for r in roles], mode=mode if mode == "disaggregated"
                       else "colocated", trace=str(CONV), poisson_rate=RATE_PER_WORKER * per_pool * len(roles),
                       layout=Layout(gpus_per_node=4),  # one worker (4 GPUs) a node, as on one machine
                       duration_s=SPACING_S * (len(faults) + 1),
                       faults=FaultConfig(faults, window_s=window, min_peers=3, deviation_threshold=4.0,
                                          consecutive_windows=consecutive, restart_s=restart_s, cooldown_s=300,
                                          max_unavailable_fraction=0.5))
    result = run_simulation(config)
    assert result.faults is not None
    out = {}
    for name, f in zip(names, result.faults.faults):
        r = asdict(f)
        out[name] = {"sim_kind": r["kind"], "detected_s": r["detection_s"],
                     "acted_s": None if r["acted_s"] is None else r["acted_s"] - r["injected_s"],
                     "action": r["action"]}
    out["_false_positives"] = {"windows": result.faults.windows, "by_kind": result.faults.false_positives_by_kind}
    return out
