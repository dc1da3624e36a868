"""The distribution of individual gaps between tokens, as a histogram with log-spaced bins.

A per-request mean time between tokens spreads a stall behind a prompt pass over all of the
request's tokens; the per-token distribution keeps it: a colocated batch that waits 300 ms for
a prompt pass adds one 300 ms gap per running sequence. The decode batch is modelled between
membership changes, not step by step, so a stretch of n steps over t seconds adds n gaps of
t / n each for every running sequence (the steps in a stretch differ only by the cache they
read, which grows by the batch size per step). Bins are 1% wide, so a percentile is within 1%.
"""

import math
from dataclasses import dataclass, field

BINS_PER_E = 100          # bins per factor of e: neighbouring bin edges 1% apart
FLOOR_S = 1e-7            # gaps below this share the lowest bin


@dataclass
class GapHistogram:
    weights: dict[int, float] = field(default_factory=dict)
    total: float = 0.0

    def add(self, seconds: float, count: float = 1.0) -> None:
        if count <= 0:
            return
        k = math.floor(math.log(max(seconds, FLOOR_S)) * BINS_PER_E)
        self.weights[k] = self.weights.get(k, 0.0) + count
        self.total += count

    def merge(self, other: "GapHistogram") -> None:
        for k, w in other.weights.items():
            self.weights[k] = self.weights.get(k, 0.0) + w
        self.total += other.total

    def quantile(self, q: float) -> float:
        """The gap below which a fraction q of the gaps fall (the bin's middle); NaN for none."""
        if self.total <= 0:
            return math.nan
        want, seen = q * self.total, 0.0
        for k in sorted(self.weights):
            seen += self.weights[k]
            if seen >= want:
                return math.exp((k + 0.5) / BINS_PER_E)
        return math.exp((max(self.weights) + 0.5) / BINS_PER_E)

    def mean(self) -> float:
        if self.total <= 0:
            return math.nan
        return sum(math.exp((k + 0.5) / BINS_PER_E) * w for k, w in self.weights.items()) / self.total
