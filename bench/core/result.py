"""One system's run in the core benchmark: its timings and outputs, the latencies read from
them, and the CPU it used while timed."""

import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fleetwise.bench.harness import summary

SYSTEM_LABELS = {
    "static": "transformers generate (static batches)",
    "continuous": "transformers continuous batching",
    "core": "fleetwise core (LLMEngine)",
}


def percentiles(values: list[float]) -> dict | None:
    return summary(values, "p50", "p90", "p99", "mean", "n")


@dataclass
class SystemResult:
    name: str
    wall_s: float
    useful_tokens: int
    generated_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # measures of this system alone
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "label": SYSTEM_LABELS[self.name], "wall_s": self.wall_s,
            "useful_output_tokens": self.useful_tokens, "generated_tokens": self.generated_tokens,
            "output_tokens_per_s": self.tokens_per_s,
            "ttft_s": percentiles(self.ttft_s), "itl_s": percentiles(self.itl_s),
            **self.extra, "notes": self.notes,
        }


def latencies(t0: float, stamps: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """Time to first token from t0, and the gaps between a request's tokens, pooled."""
    ttft: list[float] = []
    itl: list[float] = []
    for ts in stamps.values():
        if ts:
            ttft.append(ts[0] - t0)
            itl.extend(np.diff(ts).tolist())
    return ttft, itl


def _cpu_pressure_us() -> float | None:
    """Linux PSI: total microseconds in which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def usage_snapshot() -> tuple[float, float, float | None]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, _cpu_pressure_us()


def usage_since(start: tuple[float, float, float | None]) -> dict:
    """CPU seconds this process used, its share of `torch threads` cores, and the share of
    the time in which some task on the machine waited for a CPU (another load, or more
    threads than cores: a timing taken while it is high is not worth much)."""
    t1, cpu1, psi1 = usage_snapshot()
    t0, cpu0, psi0 = start
    wall = max(t1 - t0, 1e-9)
    return {"cpu_s": cpu1 - cpu0,
            "cpu_utilisation": (cpu1 - cpu0) / (wall * torch.get_num_threads()),
            "cpu_pressure_share": None if psi0 is None or psi1 is None else (psi1 - psi0) / 1e6 / wall}
