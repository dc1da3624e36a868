"""A sequence's tokens, its progress through the model and its sampling parameters."""

import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: a positive temperature below it is raised to it


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0               # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus the top k (the engine bounds k)
    n: int = 1

    def __post_init__(self):
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        # the bounds are vLLM's (SamplingParams._verify_args); the seed's is torch.long's
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.seed is None or -(1 << 63) <= self.seed < (1 << 63), "seed must be in [-2^63, 2^63)"),
            (self.n >= 1, "n must be at least 1"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be non-negative"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if 0 < self.temperature < MIN_TEMPERATURE:
            # as vLLM: a smaller one overflows the logits / temperature to inf and NaN
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    RESERVED = auto()   # blocks allocated, keys and values arriving from a prefill worker
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str = "",
                 index: int = 0, parent: "Sequence | None" = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index               # choice index within its request (n > 1)
        self.parent = parent             # a sibling whose prompt blocks this one reuses
        self.hold_kv = False             # prefill role: keep the prompt's blocks for a decode worker
        self.skip_draws = 0              # random draws another worker already made for this request
        self.params = params
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0       # prompt tokens found in the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full, computed blocks
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.output_logprobs: list = []  # per output token: (logprob, [(id, logprob), ...]) when asked
        self._generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def generator(self, device: torch.device, vocab_size: int) -> torch.Generator:
        """The request's own random stream (seeded requests only); it survives preemption
        and continues where a prefill worker's left off."""
        if self._generator is None:
            assert self.params.seed is not None  # the runner asks seeded requests only
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed + self.index)
            for _ in range(self.skip_draws):
                torch.empty(vocab_size, device=device).exponential_(generator=self._generator)
        return self._generator
