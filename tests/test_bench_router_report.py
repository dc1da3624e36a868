"""The router benchmark's targets: each fleetwise policy against each vllm-router policy run."""

from pathlib import Path

from fleetwise.bench.router.report import POLICIES, VLLM_ROUTERS, evaluate
from fleetwise.bench.router.run import _plan


def _system(p50: float, p99: float) -> dict:
    return {"overhead_ms": {"p50": p50, "p99": p99},
            "open_loop": {"errors": 0, "achieved_rps": 500.0, "offered_rps": 500.0}}


def test_each_policy_is_held_to_round_robin_and_to_vllm_routers_default_separately():
    systems = {f"fleetwise/{p}": _system(0.5, 1.3) for p in POLICIES}
    systems["vllm-router"] = _system(0.3, 0.6)               # its lightest policy: 1.3 ms is over 2x
    systems["vllm-router/cache_aware"] = _system(0.7, 1.5)   # its default: within 2x
    checks = evaluate(systems)["prefix_load"]
    assert checks["p50_overhead_vs_vllm_router"] is True
    assert checks["p99_overhead_vs_vllm_router"] is False
    assert checks["p50_overhead_vs_vllm_router_default"] is True
    assert checks["p99_overhead_vs_vllm_router_default"] is True


def test_a_vllm_router_that_did_not_run_leaves_its_comparison_untold():
    systems = {"fleetwise/prefix_load": _system(0.5, 1.0), "vllm-router": _system(0.4, 0.8)}
    checks = evaluate(systems)["prefix_load"]
    assert checks["p99_overhead_vs_vllm_router"] is True
    assert checks["p99_overhead_vs_vllm_router_default"] is None


def test_vllm_router_runs_once_per_policy_over_the_same_backends(tmp_path: Path):
    backends = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    plan = {key: argv for key, _, argv in _plan(tmp_path / "router.yaml", backends, ["vllm-router"], "0.1.17")}
    for key, policy in VLLM_ROUTERS.items():
        argv = plan[key]
        assert argv is not None and argv[argv.index("--policy") + 1] == policy
        assert argv[argv.index("--worker-urls") + 1:][:2] == backends
    assert not set(VLLM_ROUTERS) & {k for k, _, _ in _plan(tmp_path / "r.yaml", backends, None, None)}
