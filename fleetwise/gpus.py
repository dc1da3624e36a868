"""GPU products and the modelled GPU: what a step of the engine draws, and what a cap costs.

One table of products serves placement (nameplate power per GPU), the power controller
(which work a watt is cheapest to take from), the modelled GPU that exports DCGM's series
where there is no GPU, and the fleet simulator.

The model, with its sources (data/splitwise-perf-model/ is the Splitwise authors' profile):
- A **prompt** step is compute-bound: its power rises with the prompt tokens batched into it
  and saturates at the rated power. `PROMPT_POWER` is the median peak power, as a fraction of
  rated, of the profiled A100 rows by batched prompt tokens (batch x prompt size): 0.67 at 128
  tokens, 0.94 at 512, 1.01 to 1.02 from 1,024 on.
- A **token** step is memory-bound and draws about the same whatever the batch:
  `TOKEN_POWER` = 0.61 of rated, the median average power of the same rows, whose time is
  almost all token steps (128 of them against one prompt pass).
- A step holding a prompt chunk and decodes is a prompt step (compute sets its power).
- **Idle** power is per product (`idle_watts`): a typical reading, not a measurement of ours.
- A **cap** C below a step's demand D holds the draw at C and stretches the step by
  (D / C) ** k. For prompt steps k = 0.38: compute time goes as 1 / clock and dynamic power as
  about clock ** 2.6, so time goes as power ** (-1 / 2.6); it reproduces the profile's
  power-capped H100 rows, whose prompt time is 1.30x at half power (2 ** 0.38 = 1.30). For token
  steps k = 0.10: memory bandwidth does not follow the SM clock, and the same rows keep token
  time at 1.00x; 0.10 leaves a half-power cap under 2% on a token step, as Splitwise reports
  ("barely changes token latency") rather than exactly nothing.
The profile has power only for A100s; the same fractions of rated power are assumed for the
other products (Splitwise describes H100 prompt and token power with the same shape).
"""

import bisect
import functools
import math
from dataclasses import dataclass
from typing import Literal

Phase = Literal["prompt", "token"]


@dataclass(frozen=True)
class GPUProduct:
    family: str                 # as pools name it (gpuType): H100, A100, ...
    rated_watts: float          # nameplate board power (the vendor's datasheet)
    min_limit_watts: float      # the lowest power limit the driver accepts
    idle_watts: float           # draw with nothing running (typical, assumed)
    dcgm_model_name: str        # DCGM's `modelName` label
    max_sm_clock_mhz: float     # the datasheet's boost clock


PRODUCTS: dict[str, GPUProduct] = {p.family: p for p in (
    GPUProduct("H100", 700, 200, 70, "NVIDIA H100 80GB HBM3", 1980),
    GPUProduct("H200", 700, 200, 75, "NVIDIA H200", 1980),
    GPUProduct("B200", 1000, 200, 120, "NVIDIA B200", 1965),
    GPUProduct("A100", 400, 100, 55, "NVIDIA A100-SXM4-80GB", 1410),
    GPUProduct("L40S", 350, 100, 35, "NVIDIA L40S", 2520),
    GPUProduct("L4", 72, 40, 16, "NVIDIA L4", 2040),
    GPUProduct("A10", 150, 100, 20, "NVIDIA A10", 1695),
    GPUProduct("V100", 300, 100, 40, "Tesla V100-SXM2-32GB", 1530),
)}
DEFAULT_RATED_WATTS = 400  # a product not in the table, without a `fleetwise.dev/gpu-watts` label

# (batched prompt tokens, power as a fraction of rated): medians of the profile's A100 rows
PROMPT_POWER = ((128, 0.666), (256, 0.768), (512, 0.938), (1024, 1.008), (2048, 1.017), (4096, 1.022),
                (8192, 1.018))
TOKEN_POWER = 0.606
PROMPT_CAP_EXPONENT = 0.38
TOKEN_CAP_EXPONENT = 0.10


@functools.lru_cache(maxsize=1024)  # a fleet names a handful of products; placement asks per node and pod
def gpu_family(product: str) -> str:
    """'NVIDIA-H100-80GB-HBM3' (the node label) -> 'H100'; an unknown product stays as it is."""
    upper = product.upper()
    for family in sorted(PRODUCTS, key=len, reverse=True):
        if family in upper.replace("-", " ").replace("_", " ").split() or family in upper:
            return family
    return product


@functools.lru_cache(maxsize=1024)
def product(name: str) -> GPUProduct:
    """A product by family or node-label name; an unknown one gets the default rating and
    fractions of it."""
    family = gpu_family(name)
    if family in PRODUCTS:
        return PRODUCTS[family]
    rated = DEFAULT_RATED_WATTS
    return GPUProduct(family, rated, 0.25 * rated, 0.12 * rated, name, 1500)


def prompt_power_fraction(tokens: int) -> float:
    """Power of a prompt step with `tokens` batched prompt tokens, as a fraction of rated:
    the profile's points, interpolated in log2(tokens); below its first point, down towards a
    token step's power at one token."""
    if tokens <= 0:
        return 0.0
    xs = [math.log2(n) for n, _ in PROMPT_POWER]
    ys = [f for _, f in PROMPT_POWER]
    x = math.log2(tokens)
    if x <= xs[0]:
        return TOKEN_POWER + (ys[0] - TOKEN_POWER) * x / xs[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def step_demand_watts(gpu: GPUProduct, prompt_tokens: int, decode_seqs: int) -> float:
    """What the GPU would draw, uncapped, for a step with these prompt tokens and decodes."""
    if prompt_tokens > 0:
        fraction = prompt_power_fraction(prompt_tokens)
    elif decode_seqs > 0:
        fraction = TOKEN_POWER
    else:
        return gpu.idle_watts
    return max(gpu.idle_watts, fraction * gpu.rated_watts)


def phase_of(prompt_tokens: int) -> Phase:
    return "prompt" if prompt_tokens > 0 else "token"


def drawn_watts(demand: float, cap: float | None) -> float:
    """The draw under a cap (None: uncapped)."""
    return demand if cap is None else min(demand, cap)


def clock_mhz(gpu: GPUProduct, demand: float, cap: float | None) -> float:
    """The SM clock a cap leaves: power goes as about clock ** 2.6 (the prompt law above)."""
    if cap is None or cap >= demand:
        return gpu.max_sm_clock_mhz
    return gpu.max_sm_clock_mhz * (cap / demand) ** PROMPT_CAP_EXPONENT


def stretch(phase: Phase, demand: float, cap: float | None) -> float:
    """How much longer a step takes under the cap than without it (1.0: no longer)."""
    if cap is None or cap >= demand:
        return 1.0
    k = PROMPT_CAP_EXPONENT if phase == "prompt" else TOKEN_CAP_EXPONENT
    return (demand / max(cap, 1e-9)) ** k
