"""A worker's own step times as the simulator's performance model: a linear cost per engine
step fitted from measured steps, saved as JSON that a pool's `profile` loads.

The Splitwise profile (perf.py) models a large model on a GPU, where a step's time is its
compute and cache reads. A small model on a CPU spends most of a step on fixed work (Python,
scheduling, sampling, kernel launches), which that profile has no term for; so a fleet that
can run here is simulated with a profile of its own worker, one step at a time:

    step seconds = overhead + per_prompt_token x prompt tokens + per_decode x decodes
                   + per_context_token x cached tokens the decodes read
                   + per_attended x each prompt chunk's tokens times the position it reaches
                   + decode_batch if two or more sequences decode in the step

fitted by least squares with every coefficient kept non-negative (a negative one is dropped and
the rest fitted again), then once more without the steps far off the first fit (a step another
process held off the CPU). `StepProfile.perf_model()` turns it into a `PerfModel`: a prompt
pass of n tokens is `overhead + per_prompt_token x n` plus its attention, a token step of b sequences is
`overhead + per_decode x b` plus the cache read, and a prompt pass that carries decodes (a
hybrid step) pays for them too (`PerfModel.hybrid`).
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .perf import PerfModel

REQUIRED = ("overhead_ms", "ms_per_prompt_token", "ms_per_decode", "ms_per_context_token")
# the prompt's attention, which grows with its square (a long prompt costs more per token), and
# what a step with a batch of decodes (two or more) pays once over a lone one (the small model on
# a CPU: 9 ms for one decode, 14.5 for two, then 1-2 ms more each); a profile saved without them
# has neither
TERMS = (*REQUIRED, "ms_per_attended", "ms_decode_batch")
MAX_BATCH_POINT = 4096   # the token-step line's far point (the line extends past it anyway)


@dataclass(frozen=True)
class StepSample:
    prompt_tokens: int      # prompt tokens computed in the step (every chunk)
    decodes: int            # sequences making one token
    context: int            # cached tokens the decodes read
    seconds: float
    attended: float = 0.0   # each prompt chunk's tokens times the position its last token reaches


@dataclass(frozen=True)
class StepProfile:
    model: str                   # what was measured (a model folder's name)
    overhead_ms: float
    ms_per_prompt_token: float
    ms_per_decode: float
    ms_per_context_token: float
    kv_capacity_tokens: int      # the worker's KV cache, in tokens
    kv_bytes_per_token: int
    samples: int = 0
    ms_per_attended: float = 0.0
    ms_decode_batch: float = 0.0
    r2: float = math.nan         # of the fit over its samples
    median_abs_error_ms: float = math.nan

    def step_ms(self, prompt_tokens: float, decodes: float, context: float, attended: float = 0.0) -> float:
        return (self.overhead_ms + self.ms_per_prompt_token * prompt_tokens + self.ms_per_decode * decodes
                + self.ms_per_context_token * context + self.ms_per_attended * attended
                + (self.ms_decode_batch if decodes >= 2 else 0.0))

    def perf_model(self, gpu: str = "CPU") -> PerfModel:
        o, p, d = self.overhead_ms, self.ms_per_prompt_token, self.ms_per_decode
        b, far = self.ms_decode_batch, MAX_BATCH_POINT
        return PerfModel(gpu, self.model, 1, ((1, o + p), (2, o + 2 * p)),
                         ((0, o), (1, o + d), (2, o + b + 2 * d), (far, o + b + d * far)), self.ms_per_context_token,
                         kv_capacity=self.kv_capacity_tokens, kv_bytes=self.kv_bytes_per_token, hybrid=True,
                         ms_per_attended=self.ms_per_attended)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def load(path: str | Path) -> StepProfile:
    """A saved profile; a missing or malformed field is named in the error."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a step profile is a JSON object")
    for key in ("model", *REQUIRED, "kv_capacity_tokens", "kv_bytes_per_token"):
        if key not in data:
            raise ValueError(f"{path}: the step profile lacks {key!r}")
    for key in (k for k in TERMS if k in data):
        if not isinstance(data[key], (int, float)) or data[key] < 0:
            raise ValueError(f"{path}: {key} must be a non-negative number, not {data[key]!r}")
    if not isinstance(data["kv_capacity_tokens"], int) or data["kv_capacity_tokens"] < 1:
        raise ValueError(f"{path}: kv_capacity_tokens must be a positive integer")
    known = {f for f in StepProfile.__dataclass_fields__}
    return StepProfile(**{k: v for k, v in data.items() if k in known})


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient non-negative: the most negative one is dropped and
    the rest fitted again until none is."""
    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[keep] = sol
        negative = [k for k in keep if coef[k] < 0]
        if not negative:
            break
        keep.remove(min(negative, key=lambda k: coef[k]))
    return np.clip(coef, 0.0, None)


def fit(samples: list[StepSample], model: str, kv_capacity_tokens: int, kv_bytes_per_token: int) -> StepProfile:
    """The non-negative least-squares line through the samples (at least one per term). Steps
    far off the first line (beyond 4 robust standard deviations: a step another process held
    off the CPU) are left out of the second fit."""
    if len(samples) < len(TERMS):
        raise ValueError(f"a fit needs at least {len(TERMS)} steps, got {len(samples)}")
    x = np.array([(1.0, s.prompt_tokens, s.decodes, s.context, s.attended, float(s.decodes >= 2)) for s in samples])
    y = np.array([s.seconds * 1e3 for s in samples])
    coef = _lstsq(x, y)
    residual = y - x @ coef
    mad = float(np.median(np.abs(residual - np.median(residual))))
    inliers = np.abs(residual) <= 4 * 1.4826 * mad if mad > 0 else np.ones(len(y), dtype=bool)
    if inliers.sum() >= len(TERMS):
        x, y = x[inliers], y[inliers]
        coef = _lstsq(x, y)
    predicted = x @ coef
    spread = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - predicted) ** 2)) / spread if spread > 0 else math.nan
    return StepProfile(model, **{k: float(c) for k, c in zip(TERMS, coef)}, kv_capacity_tokens=kv_capacity_tokens,
                       kv_bytes_per_token=kv_bytes_per_token, samples=len(y), r2=r2,
                       median_abs_error_ms=float(np.median(np.abs(y - predicted))))
