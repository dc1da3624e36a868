"""The core benchmark's workload: requests shaped like the Azure LLM inference trace
(conversation file), their lengths fitted to the model's context and bounded by a work factor,
their prompts random token ids without special tokens."""

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetwise.bench.harness import summary
from fleetwise.bench.models import prompt_token_ids

TRACE_FILE = "AzureLLMInferenceTrace_conv.csv"
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "data" / "azure-llm-trace-2023" / TRACE_FILE


@dataclass
class Request:
    request_id: str
    arrival_s: float       # seconds after the first sampled request (trace order)
    trace_prompt: int      # lengths in the trace
    trace_output: int
    prompt_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Workload:
    requests: list[Request]
    context: int
    fit_scale: float       # puts the trace's p99 of prompt+output at the context
    length_scale: float    # extra factor on top, to bound the work
    trace_path: str
    trace_rows: int
    trace_p99_total: float
    num_clipped: int

    @property
    def scale(self) -> float:
        return self.fit_scale * self.length_scale

    def summary(self) -> dict:
        p = np.array([r.prompt_len for r in self.requests])
        o = np.array([r.output_len for r in self.requests])
        arrivals = [r.arrival_s for r in self.requests]

        def stats(a: np.ndarray) -> dict | None:
            return summary(a, "mean", "p50", "p90", "p99", "min", "max", "total")

        return {
            "trace": self.trace_path, "trace_rows": self.trace_rows,
            "requests": len(self.requests), "context": self.context,
            "trace_p99_prompt_plus_output": self.trace_p99_total,
            "fit_scale": self.fit_scale, "length_scale": self.length_scale, "scale": self.scale,
            "clipped_requests": self.num_clipped,
            "prompt_tokens": stats(p), "output_tokens": stats(o), "total_tokens": stats(p + o),
            "trace_span_s": float(max(arrivals) - min(arrivals)) if arrivals else 0.0,
        }


def resolve_trace(trace: Path | None) -> Path:
    if trace is not None:
        candidates = [Path(trace)]
        where = "--trace"
    elif os.environ.get("FLEETWISE_TRACE_DIR"):
        d = Path(os.environ["FLEETWISE_TRACE_DIR"])
        candidates = [d / TRACE_FILE, d] if d.is_dir() or not d.suffix else [d]
        where = "FLEETWISE_TRACE_DIR"
    else:
        candidates = [DEFAULT_TRACE]
        where = "the default location"
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(
        f"error: the Azure LLM trace is missing: {candidates[0]} (from {where}) does not exist.\n"
        f"Pass --trace PATH/{TRACE_FILE}, or set FLEETWISE_TRACE_DIR to the folder that holds it "
        "(the repository keeps a copy in data/azure-llm-trace-2023/; the original is\n"
        "github.com/Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv).")


def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival seconds, context tokens and generated tokens of every row."""
    stamps, prompts, outputs = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= set(reader.fieldnames or ()):
            raise SystemExit(f"error: {path} lacks the columns {sorted(need)} (has {reader.fieldnames})")
        for row in reader:
            stamps.append(row["TIMESTAMP"])
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
    if not prompts:
        raise SystemExit(f"error: {path} holds no requests")
    t = np.array(stamps, dtype="datetime64[us]")
    seconds = (t - t.min()).astype("timedelta64[us]").astype(np.float64) / 1e6
    return seconds, np.array(prompts), np.array(outputs)


def build_workload(trace_path: Path, model_dir: Path, num_requests: int, seed: int,
                   length_scale: float) -> Workload:
    cfg = json.loads((model_dir / "config.json").read_text())
    context = int(cfg.get("max_position_embeddings", 2048))
    allowed = prompt_token_ids(model_dir)

    seconds, prompts, outputs = read_trace(trace_path)
    p99 = float(np.percentile(prompts + outputs, 99))
    fit = min(1.0, context / p99)
    scale = fit * length_scale

    rng = np.random.default_rng(seed)
    n = min(num_requests, len(prompts))
    rows = np.sort(rng.choice(len(prompts), size=n, replace=False))
    rows = rows[np.argsort(seconds[rows], kind="stable")]  # arrival order
    t_first = seconds[rows[0]] if n else 0.0
    reqs, clipped = [], 0
    for k, row in enumerate(rows):
        p = max(1, round(prompts[row] * scale))
        o = max(1, round(outputs[row] * scale))
        if p + o > context:
            clipped += 1
            o = min(o, context - 1)
            p = context - o
        ids = rng.choice(allowed, size=p).tolist()
        reqs.append(Request(f"req-{k}", float(seconds[row] - t_first), int(prompts[row]),
                            int(outputs[row]), ids, o))
    return Workload(reqs, context, fit, length_scale, str(trace_path), len(prompts), p99, clipped)
