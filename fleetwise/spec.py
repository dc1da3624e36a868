"""The custom resources as Python types (group fleetwise.dev, version v1alpha1).

They mirror the CRD schemas in charts/fleetwise/crds/, which the API server enforces; these
models read what it stored (defaults included) and carry the same rules, so that code that
builds specs without an API server (the simulator, tests, `fleetwise up`) gets the same
answers. tests/test_spec.py checks the two against each other.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from fleetwise import defaults, model_source

GROUP, VERSION = "fleetwise.dev", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ROLES = ("prefill", "decode", "mixed")


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class ModelRef(_Spec):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    uri: str = Field(min_length=1, max_length=1024)
    # hf:// only: the Secret (in the deployment's namespace) whose key holds the hub token
    token_secret: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _uri_parses(self):
        source = model_source.parse(self.uri)  # ModelUriError is a ValueError: pydantic reports it
        if self.token_secret is not None and source.kind != "hf":
            raise ValueError("model.tokenSecret is for hf:// models only")
        return self

    def source(self) -> model_source.ModelSource:
        return model_source.parse(self.uri)


class Resources(_Spec):
    cpu: str | int | None = None
    memory: str | int | None = None


class Pool(_Spec):
    replicas: int = Field(ge=0, le=1000)
    gpu_type: str = Field(min_length=1)
    gpus_per_replica: int = Field(default=1, ge=1, le=16)
    resources: Resources | None = None


class Engine(_Spec):
    block_size: Literal[8, 16, 32, 64, 128] = defaults.BLOCK_SIZE  # type: ignore[assignment]
    max_num_seqs: int = Field(default=defaults.MAX_NUM_SEQS, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=defaults.MAX_NUM_BATCHED_TOKENS, ge=16, le=1048576)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = defaults.DTYPE  # type: ignore[assignment]
    kv_cache_mib: int | None = Field(default=None, ge=1, alias="kvCacheMiB")

    @model_validator(mode="after")
    def _budget_covers_seqs(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("maxNumBatchedTokens must be at least maxNumSeqs "
                             "(every running sequence needs a token per step)")
        return self


class Routing(_Spec):
    policy: Literal["prefix_affinity", "prefix_load", "least_outstanding", "round_robin"] = "prefix_load"


class SLO(_Spec):
    ttft_milliseconds: int | None = Field(default=None, ge=1)
    tpot_milliseconds: int | None = Field(default=None, ge=1)


class ModelDeploymentSpec(_Spec):
    model: ModelRef
    image: str = Field(min_length=1)
    mode: Literal["Disaggregated", "Colocated"] = "Disaggregated"
    prefill: Pool | None = None
    decode: Pool | None = None
    mixed: Pool | None = None
    engine: Engine = Field(default_factory=Engine)
    routing: Routing = Field(default_factory=Routing)
    slo: SLO | None = None
    priority: Literal["High", "Low"] = "High"

    @model_validator(mode="after")
    def _pools_match_mode(self):
        if self.mode == "Disaggregated" and not (self.prefill and self.decode):
            raise ValueError("mode Disaggregated needs both a prefill and a decode pool")
        if self.mode == "Colocated":
            if not self.mixed:
                raise ValueError("mode Colocated needs a mixed pool")
            if self.prefill or self.decode:
                raise ValueError("mode Colocated takes a mixed pool, not prefill or decode pools")
        return self

    def pools(self) -> dict[str, Pool]:
        """The pools this mode runs, by role."""
        roles = ("prefill", "decode") if self.mode == "Disaggregated" else ("mixed",)
        return {r: getattr(self, r) for r in roles}


class PowerBudgetSpec(_Spec):
    node_selector: dict[str, str] = Field(min_length=1)
    limit_watts: float = Field(gt=0)
    oversubscription: float = Field(default=1.0, ge=1, le=4)
    cap_threshold: float = Field(default=0.9, gt=0, le=1)
    emergency_threshold: float = Field(default=0.98, gt=0, le=1.5)
    release_threshold: float = Field(default=0.8, gt=0, le=1)
    min_gpu_cap_watts: float = Field(default=200, ge=50)

    @model_validator(mode="after")
    def _thresholds_ordered(self):
        if not self.cap_threshold < self.emergency_threshold:
            raise ValueError("capThreshold must be below emergencyThreshold")
        if not self.release_threshold < self.cap_threshold:
            raise ValueError("releaseThreshold must be below capThreshold (the hysteresis band)")
        return self


class Selector(_Spec):
    match_labels: dict[str, str] = Field(default_factory=dict)


class Detection(_Spec):
    window_seconds: int = Field(default=120, ge=10, le=86400)
    min_peers: int = Field(default=3, ge=2)
    deviation_threshold: float = Field(default=4.0, ge=1)
    consecutive_windows: int = Field(default=2, ge=1)
    xid_errors: bool = True


RemediationAction = Literal["Quarantine", "RestartPod", "CordonNode", "RouteAround"]


def _default_actions() -> list[RemediationAction]:
    return ["Quarantine", "RestartPod", "RouteAround"]


class Remediation(_Spec):
    actions: list[RemediationAction] = Field(default_factory=_default_actions)
    max_actions_per_hour: int = Field(default=10, ge=0)
    max_unavailable_fraction: float = Field(default=0.25, ge=0, le=1)
    cooldown_seconds: int = Field(default=300, ge=0)


class FaultPolicySpec(_Spec):
    selector: Selector = Field(default_factory=Selector)
    detection: Detection = Field(default_factory=Detection)
    remediation: Remediation = Field(default_factory=Remediation)
