"""Engine settings (the ModelDeployment's engine section maps onto these)."""

from dataclasses import dataclass
from pathlib import Path

from fleetwise import defaults


@dataclass
class EngineConfig:
    model: str
    served_model_name: str | None = None  # None: the model folder's name (`served_name`)
    dtype: str = defaults.DTYPE
    device: str = defaults.DEVICE
    block_size: int = defaults.BLOCK_SIZE
    num_blocks: int | None = None    # KV blocks; None: sized from kv_cache_bytes
    kv_cache_bytes: int = defaults.KV_CACHE_MIB << 20  # KV memory budget when num_blocks is None
    max_num_seqs: int = defaults.MAX_NUM_SEQS
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_waiting: int = defaults.MAX_WAITING  # sequences (a request with n choices counts n)
    max_logprobs: int = defaults.MAX_LOGPROBS
    seed: int = 0
    kv_lease_seconds: float = defaults.KV_LEASE_SECONDS
    max_kv_leases: int = defaults.MAX_KV_LEASES  # prefills held for decode workers at once
    max_kv_lease_fraction: float = defaults.MAX_KV_LEASE_FRACTION  # of the KV blocks, held by leases at most
    # no GPU: model one of this product (H100, A100, ...): its power, a cap's cost, DCGM's series
    modelled_gpu: str | None = None
    # with modelled_gpu: no forward pass, each step waits out this model's time on that product
    # (MODEL:tpN of sim/perf.py, e.g. llama2-70b:tp2; modelled_device.py)
    modelled_forward: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_kv_leases < 1 or not 0 < self.max_kv_lease_fraction <= 1:
            raise ValueError("max_kv_leases must be at least 1 and max_kv_lease_fraction in (0, 1]")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be non-negative")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")

    @property
    def served_name(self) -> str:
        """The name clients ask for: `served_model_name`, else the model folder's name."""
        return Path(self.model).name if self.served_model_name is None else self.served_model_name
