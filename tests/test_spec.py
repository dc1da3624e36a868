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
