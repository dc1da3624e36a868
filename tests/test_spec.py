"""The Python spec types and the CRD schemas the API server enforces say the same thing."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fleetwise.spec import FaultPolicySpec, ModelDeploymentSpec, PowerBudgetSpec

CRDS = Path(__file__).resolve().parents[1] / "charts" / "fleetwise" / "crds"


def schema(kind_file: str) -> dict:
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def walk_defaults(node: dict, path=()):
    """(path, default) for every property with a default in a CRD schema."""
    for name, prop in (node.get("properties") or {}).items():
        if "default" in prop:
            yield path + (name,), prop["default"]
        yield from walk_defaults(prop, path + (name,))


MINIMAL = {
    "modeldeployments.yaml": (ModelDeploymentSpec, {"model": {"name": "m", "uri": "/m"}, "image": "i",
                                                     "prefill": {"replicas": 1, "gpuType": "H100"},
                                                     "decode": {"replicas": 1, "gpuType": "A100"},
                                                     "mixed": None}),
    "powerbudgets.yaml": (PowerBudgetSpec, {"nodeSelector": {"rack": "r1"}, "limitWatts": 1000}),
    "faultpolicies.yaml": (FaultPolicySpec, {}),
}


@pytest.mark.parametrize("crd", sorted(MINIMAL))
def test_crd_defaults_equal_python_defaults(crd):
    model, minimal = MINIMAL[crd]
    dumped = model.model_validate({k: v for k, v in minimal.items() if v is not None}).model_dump(by_alias=True)
    checked = 0
    for path, default in walk_defaults(schema(crd)):
        value = dumped
        for key in path:
            if not isinstance(value, dict) or key not in value or value[key] is None:
                break
            value = value[key]
        else:
            if default != {}:
                assert value == default, f"{crd}: {'.'.join(path)}: CRD default {default!r}, Python {value!r}"
                checked += 1
    assert checked >= 3


@pytest.mark.parametrize("model, body, words", [
    (ModelDeploymentSpec, {"model": {"name": "m", "uri": "/m"}, "image": "i", "mode": "Colocated"}, "mixed pool"),
    (ModelDeploymentSpec, {"model": {"name": "m", "uri": "/m"}, "image": "i",
                           "prefill": {"replicas": -1, "gpuType": "H100"}, "decode": {"replicas": 1, "gpuType": "A"}},
     "greater than or equal to 0"),
    (ModelDeploymentSpec, {"model": {"name": "m", "uri": "/m"}, "image": "i", "mode": "Sideways"}, "Disaggregated"),
    (ModelDeploymentSpec, {"image": "i"}, "model"),
    (PowerBudgetSpec, {"nodeSelector": {"r": "1"}, "limitWatts": 10, "releaseThreshold": 0.95}, "hysteresis"),
    (FaultPolicySpec, {"remediation": {"actions": ["Reboot"]}}, "Quarantine"),
])
def test_python_side_refuses_what_the_crd_refuses(model, body, words):
    with pytest.raises(ValidationError, match=words):
        model.model_validate(body)


def test_engine_defaults_have_one_source():
    """The CRD's engine section (checked against spec.Engine above), spec.Engine, the worker's
    EngineConfig and the `fleetwise worker` options all take fleetwise.defaults."""
    import dataclasses

    import typer.main

    from fleetwise import defaults
    from fleetwise.cli import app
    from fleetwise.spec import Engine
    from fleetwise.worker.engine.config import EngineConfig

    engine = Engine()
    assert (engine.block_size, engine.max_num_seqs, engine.max_num_batched_tokens, engine.dtype) == (
        defaults.BLOCK_SIZE, defaults.MAX_NUM_SEQS, defaults.MAX_NUM_BATCHED_TOKENS, defaults.DTYPE)
    config = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert config["kv_cache_bytes"] == defaults.KV_CACHE_MIB << 20
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "dtype", "device", "max_waiting",
                 "kv_lease_seconds"):
        assert config[name] == getattr(defaults, name.upper()), name
    worker = next(c for c in typer.main.get_command(app).commands.values() if c.name == "worker")
    options = {p.name: p.default for p in worker.params}
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "dtype", "device", "max_waiting",
                 "kv_lease_seconds", "kv_cache_mib", "health_stall_seconds"):
        assert options[name] == getattr(defaults, name.upper()), name
