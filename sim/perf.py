"""How long a step takes: prompt passes and token steps per GPU product and model, fitted from
the Splitwise authors' profile (data/splitwise-perf-model/perf_model.csv).

The fit, per (product, model, tensor parallelism):
- **Prompt time** is a function of the prompt tokens batched into one pass (batch x prompt
  size): the median `prompt_time` of the rows with the same batched tokens (the profile sweeps
  prompt size at batch 1 and batch size at prompt 512; both sweeps meet on one curve),
  interpolated linearly between those points, flat below the first (a pass has a fixed cost)
  and extended along the last segment's slope above the last.
- **Token-step time** is `base(batch) + kv_ms_per_token x context`, where context is the KV
  cache the step reads (every running sequence's prompt and generated tokens). The profile's
  `token_time` depends on the batch only (it has no context column), so the second term is
  ours: reading the cache is bandwidth-bound, `kv_bytes_per_token / (tp x HBM bandwidth x
  HBM_EFFICIENCY)`. The profile's rows already read some cache (prompt 512, 128 tokens
  generated: `PROFILE_CONTEXT` = 576 tokens per sequence on average), so `base(batch)` is the
  median token time at that batch less that read; at the profile's own context the model
  gives back the profile.
- **Products the profile lacks** (H200, B200, L40S, ...) take the profiled product nearest in
  rated power (H100 from 700 W, else A100) with every time divided by the ratio of rated power
  (`product.rated / profiled.rated`), bandwidth multiplied by it. A crude stand-in: rated power
  tracks a generation's compute, not its memory system.
- **Caps** stretch a step by `fleetwise.gpus.stretch` (prompt and token phases differ).
- **KV capacity**: a worker's GPU memory (datasheets) times `MEMORY_UTILISATION`, less the
  fp16 weights, in tokens of the model's KV cache.

tests/test_sim.py checks the fit against every A100 and H100 row.
"""

import bisect
import csv
import functools
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fleetwise import gpus

PROFILE = Path(__file__).resolve().parents[1] / "data" / "splitwise-perf-model" / "perf_model.csv"
PROFILED = {"A100": "a100-80gb", "H100": "h100-80gb"}
HBM_BYTES_PER_S = {"A100": 2.039e12, "H100": 3.35e12}  # datasheets (SXM4-80GB, SXM5)
HBM_EFFICIENCY = 0.8   # what a decode kernel reaches of the datasheet bandwidth (assumed)
PROFILE_CONTEXT = 512 + 128 / 2


# GPU memory per product (datasheets, GB); one the table lacks gets its stand-in's
GPU_MEMORY_GB = {"A100": 80, "H100": 80, "H200": 141, "B200": 192, "L40S": 48, "L4": 24, "A10": 24, "V100": 32}
MEMORY_UTILISATION = 0.9   # of GPU memory, for weights and KV cache (the rest: activations, runtime)


@dataclass(frozen=True)
class ModelShape:
    name: str
    kv_bytes_per_token: int    # K and V, every layer, fp16
    weight_bytes: int          # fp16


MODELS = {m.name: m for m in (
    ModelShape("llama2-70b", 2 * 80 * 8 * 128 * 2, 2 * 69_000_000_000),    # 80 layers, 8 KV heads (GQA) x 128
    ModelShape("bloom-176b", 2 * 70 * 14336 * 2, 2 * 176_000_000_000),     # 70 layers, hidden 14336 (MHA)
)}


@dataclass(frozen=True)
class PerfModel:
    gpu: str                                  # product family
    model: str
    tp: int                                   # GPUs per worker (tensor parallelism)
    prompt_points: tuple[tuple[int, float], ...]   # (batched prompt tokens, ms)
    token_points: tuple[tuple[int, float], ...]    # (batch, ms) at zero context
    kv_ms_per_token: float                    # ms per context token read by one token step
    # a measured worker's own profile (calibration.py) states these; the Splitwise fit derives them
    kv_capacity: int | None = None            # tokens of KV cache per worker
    kv_bytes: int | None = None               # per token
    hybrid: bool = False                      # a prompt pass also pays for the decodes it carries
    ms_per_attended: float = 0.0              # a measured profile's prompt attention: ms per (token x position)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes if self.kv_bytes is not None else MODELS[self.model].kv_bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache a worker holds: its GPUs' memory, less the weights."""
        if self.kv_capacity is not None:
            return self.kv_capacity
        memory = GPU_MEMORY_GB.get(self.gpu) or GPU_MEMORY_GB[profiled_stand_in(self.gpu)]
        free = self.tp * memory * 1e9 * MEMORY_UTILISATION - MODELS[self.model].weight_bytes
        if free <= 0:
            raise ValueError(f"{self.model} does not fit {self.tp} x {self.gpu}")
        return int(free / self.kv_bytes_per_token)

    def prompt_ms(self, tokens: int) -> float:
        """One prompt pass over `tokens` batched prompt tokens."""
        return _interp(self.prompt_points, tokens)

    def attention_ms(self, attended: float) -> float:
        """What a prompt pass's attention adds for `attended` (each chunk's tokens times the
        positions they reach): the cost that grows with a prompt's square (a measured profile's;
        the Splitwise fit has it in its points)."""
        return self.ms_per_attended * attended

    def token_base_ms(self, batch: int) -> float:
        """A token step of `batch` sequences, before reading the KV cache."""
        return _interp(self.token_points, batch)

    def hybrid_ms(self, decodes: int, context: float) -> float:
        """What `decodes` sequences reading `context` cached tokens add to a prompt pass
        (nothing unless the model is `hybrid`: the Splitwise profile's passes carry none)."""
        if not self.hybrid or decodes == 0:
            return 0.0
        return self.token_base_ms(decodes) - self.token_base_ms(0) + self.kv_ms_per_token * context

    def token_ms(self, batch: int, context: float) -> float:
        """A token step of `batch` sequences reading `context` cached tokens in all."""
        return self.token_base_ms(batch) + self.kv_ms_per_token * context


def _interp(points: tuple[tuple[int, float], ...], x: float) -> float:
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@functools.cache
def profile_rows(path: Path = PROFILE) -> tuple[dict[str, str], ...]:
    with open(path, newline="") as f:
        return tuple(csv.DictReader(f))


def _medians(groups: dict[int, list[float]]) -> tuple[tuple[int, float], ...]:
    return tuple((x, statistics.median(ys)) for x, ys in sorted(groups.items()))


@functools.cache
def _fit(family: str, model: str, tp: int) -> PerfModel:
    rows = [r for r in profile_rows() if r["hardware"] == PROFILED[family] and r["model"] == model
            and int(r["tensor_parallel"]) == tp]
    if not rows:
        raise ValueError(f"the profile has no rows for {model} on {family} at tensor parallelism {tp}")
    prompt: dict[int, list[float]] = defaultdict(list)
    token: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        batch = int(r["batch_size"])
        prompt[batch * int(r["prompt_size"])].append(float(r["prompt_time"]))
        token[batch].append(float(r["token_time"]))
    kv_ms = 1e3 * MODELS[model].kv_bytes_per_token / (tp * HBM_BYTES_PER_S[family] * HBM_EFFICIENCY)
    base = tuple((b, ms - kv_ms * b * PROFILE_CONTEXT) for b, ms in _medians(token))
    return PerfModel(family, model, tp, _medians(prompt), base, kv_ms)


def profiled_stand_in(family: str) -> str:
    """The profiled product whose times stand in for one the profile lacks."""
    if family in PROFILED:
        return family
    return "H100" if gpus.product(family).rated_watts >= gpus.PRODUCTS["H100"].rated_watts else "A100"


def perf_model(gpu: str, model: str = "llama2-70b", tp: int = 4) -> PerfModel:
    """The fitted model for a product (family or node-label name), model and TP degree."""
    family = gpus.gpu_family(gpu)
    base = _fit(profiled_stand_in(family), model, tp)
    if family == base.gpu:
        return base
    speed = gpus.product(family).rated_watts / gpus.PRODUCTS[base.gpu].rated_watts
    return PerfModel(family, model, tp, tuple((x, ms / speed) for x, ms in base.prompt_points),
                     tuple((x, ms / speed) for x, ms in base.token_points), base.kv_ms_per_token / speed)


# SplitwiseSim's own reading of the same profile (its performance_model.py, DatabasePerformanceModel),
# for comparisons run under its definitions (sim/iso.py): both curves keyed by batch x prompt size.
SPLITWISE_SIM_GPU_BYTES = 80 * 2**30          # its hardware_repo/processors/a100-80gb.yaml (and h100-80gb)
SPLITWISE_SIM_WEIGHTS = {"bloom-176b": 329_000_000_000, "llama2-70b": 135_000_000_000}   # model_repo/sizes/*


def _extended(points: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """The points with one more at x = 1 on the first segment's line, so that `_interp` (flat
    below its first point) extrapolates linearly below it as scipy's interp1d does."""
    (x0, y0), (x1, y1) = points[0], points[1]
    if x0 <= 1:
        return points
    return ((1, y0 - (y1 - y0) * (x0 - 1) / (x1 - x0)),) + points


@functools.cache
def splitwise_sim_model(gpu: str, model: str, tp: int) -> PerfModel:
    """The times SplitwiseSim gives: a prompt pass is the median `prompt_time` of the profile rows
    with the same batch x prompt size (as ours), and a token step of b sequences is the median
    `token_time` of the rows whose batch x prompt size is b (its token predictor is fitted on
    batched prompt tokens and called with the iteration's token count), so a step of up to 512
    sequences costs what a lone one does within a few per cent; no term for the context read;
    both curves extrapolated linearly at either end."""
    family = gpus.gpu_family(gpu)
    rows = [r for r in profile_rows() if r["hardware"] == PROFILED[family] and r["model"] == model
            and int(r["tensor_parallel"]) == tp]
    if not rows or model not in SPLITWISE_SIM_WEIGHTS:
        raise ValueError(f"no SplitwiseSim times for {model} on {family} at tensor parallelism {tp}")
    prompt: dict[int, list[float]] = defaultdict(list)
    token: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        key = int(r["batch_size"]) * int(r["prompt_size"])
        prompt[key].append(float(r["prompt_time"]))
        token[key].append(float(r["token_time"]))
    return PerfModel(family, model, tp, _extended(_medians(prompt)), _extended(_medians(token)), 0.0)


def splitwise_sim_kv_capacity(model: str, tp: int) -> int:
    """Tokens of KV cache a SplitwiseSim instance holds: its GPUs' whole memory less its model
    size (instance.py, model.py), in our KV bytes per token (the same as its request.py's)."""
    return int((tp * SPLITWISE_SIM_GPU_BYTES - SPLITWISE_SIM_WEIGHTS[model]) / MODELS[model].kv_bytes_per_token)
