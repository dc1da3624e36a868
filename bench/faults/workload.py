"""The fault benchmark's load: uneven and bursty, as a healthy fleet sees it, so that the
detector is judged where false positives come from.

- Arrivals: consecutive rows of the Azure LLM inference trace 2023 (conversation file), their
  gaps scaled together to a mean rate, so the trace's bursts stay bursts (`bench/pd/load.py`'s
  `read_trace` and `at_rate`); the trace repeats when the run is longer.
- Prompts: token ids, one of `prefixes` shared prefixes picked by Zipf popularity
  (`bench/goodput/workload.py`'s weights; the router's prefix affinity then loads some workers
  more than others) followed by a suffix of its own whose length follows the trace's context.
- Outputs: the trace's generated tokens, scaled and clipped, so long and short answers mix.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetwise.bench.goodput.workload import zipf_weights
from fleetwise.bench.pd.load import TRACE, read_trace


@dataclass(frozen=True)
class Shape:
    rate: float = 3.0                       # requests/s, mean (bursts above it)
    prefixes: int = 6
    zipf_s: float = 1.2
    prefix_tokens: tuple[int, int] = (64, 384)
    suffix_scale: float = 0.05              # the trace's context tokens times this
    suffix_tokens: tuple[int, int] = (8, 256)
    output_scale: float = 0.5               # the trace's generated tokens times this
    output_tokens: tuple[int, int] = (2, 160)
    vocab: int = 512                        # token ids drawn from [3, vocab)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Request:
    at: float            # seconds after the load's start
    prompt: list[int]
    max_tokens: int
    rank: int            # which shared prefix (0: the most popular)


def bursty_requests(shape: Shape, seconds: float, seed: int = 0, trace: Path = TRACE,
                    start_row: int = 0) -> list[Request]:
    """Requests for `seconds` of load at `shape.rate` on average."""
    stamps, contexts, outputs = read_trace(trace)
    order = np.argsort(stamps, kind="stable")
    stamps, contexts, outputs = stamps[order], contexts[order], outputs[order]
    span = float(stamps[-1] - stamps[0])
    scale = (len(stamps) - 1) / span / shape.rate      # trace seconds -> run seconds at the mean rate
    rng = np.random.default_rng(seed)
    lo, hi = shape.prefix_tokens
    prefixes = [rng.integers(3, shape.vocab, int(n)).tolist() for n in rng.integers(lo, hi + 1, shape.prefixes)]
    weights = zipf_weights(shape.prefixes, shape.zipf_s)
    out: list[Request] = []
    row, base = start_row % len(stamps), 0.0
    first = float(stamps[row])
    while True:
        at = base + (float(stamps[row]) - first) * scale
        if at >= seconds:
            return out
        rank = int(rng.choice(shape.prefixes, p=weights))
        n = int(np.clip(round(contexts[row] * shape.suffix_scale), *shape.suffix_tokens))
        m = int(np.clip(round(outputs[row] * shape.output_scale), *shape.output_tokens))
        out.append(Request(at, prefixes[rank] + rng.integers(3, shape.vocab, n).tolist(), m, rank))
        row += 1
        if row == len(stamps):  # the trace again, after one mean gap
            row, base, first = 0, at + 1.0 / shape.rate, float(stamps[0])


def burstiness(requests: list[Request], bucket_s: float = 10.0) -> dict:
    """Requests per `bucket_s` bucket: mean, max and the peak-to-mean ratio the load had."""
    if not requests:
        return {"buckets": 0}
    counts = np.bincount(np.floor(np.array([r.at for r in requests]) / bucket_s).astype(int))
    return {"bucket_s": bucket_s, "buckets": int(counts.size), "mean": float(counts.mean()),
            "max": int(counts.max()), "peak_to_mean": float(counts.max() / counts.mean())}
