"""The pd benchmark's load study (Splitwise's point): bursty arrivals from the Azure LLM
inference trace (conversation file), sent open-loop at a chosen mean rate through a router
over one prefill + one decode worker, or over two mixed workers, with every streamed
token's arrival time kept. TBT is each gap between two tokens of one request (pooled over
all requests, not a per-request mean); TTFT is from the request's send to its first token.

The trace's arrival times are kept in order and scaled together, so its bursts stay bursts
at every rate; its lengths are scaled by the fleet's factor and capped (the same requests, in
the same order, for both systems).

Two fleets (`FLEETS`): `modelled`, workers whose engine, HTTP API, KV leases, stream and pull
are the real ones but whose device is a modelled A100 pair running Llama-2-70B
(worker/engine/modelled_device.py: each step waits out the simulator's time for it), at the
trace's own lengths; and `cpu`, the small model's forward pass on one pinned core per worker,
at half the lengths and 32 output tokens at most."""

import asyncio
import csv
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleetwise.bench.harness import percentile

TRACE = Path(__file__).resolve().parents[2] / "data" / "azure-llm-trace-2023" / "AzureLLMInferenceTrace_conv.csv"


@dataclass(frozen=True)
class PdFleet:
    """What the workers are and what they are given."""
    name: str
    worker_args: tuple[str, ...]
    length_scale: float
    max_prompt: int
    max_output: int
    pinned: bool              # each worker on a core of its own (taskset), one torch thread
    context: int | None       # the tokenizer model's context (None: the preset's)
    idle_requests: int        # served one at a time first
    stem: str                 # OUT/STEM.json, OUT/STEM.png


MODELLED_GPU, MODELLED_FORWARD = "A100", "llama2-70b:tp2"
COMMON_ARGS = ("--max-num-batched-tokens", "2048", "--kv-lease-seconds", "60")
FLEETS = {
    "modelled": PdFleet("modelled", ("--modelled-gpu", MODELLED_GPU, "--modelled-forward", MODELLED_FORWARD,
                                     *COMMON_ARGS), 1.0, 4096, 256, False, 8192, 8, "pd_load"),
    "cpu": PdFleet("cpu", ("--kv-cache-mib", "256", "--max-num-batched-tokens", "256", "--kv-lease-seconds", "60"),
                   0.5, 1024, 32, True, None, 4, "pd_load-cpu"),
}


def modelled_fleet(gpu: str, forward: str) -> PdFleet:
    """The modelled fleet with another GPU or model (MODEL:tpN); its own result files."""
    kind = FLEETS["modelled"]
    args = ("--modelled-gpu", gpu, "--modelled-forward", forward, *COMMON_ARGS)
    if (gpu, forward) == (MODELLED_GPU, MODELLED_FORWARD):
        return kind
    return replace(kind, worker_args=args, stem=f"{kind.stem}-{gpu}-{forward.replace(':', '-')}")


def kv_link_seconds(tokens: int, gpu: str, forward: str) -> float:
    """A prompt's KV of the modelled model over a prefill worker's link, alone on it: the
    simulator's link (sim/engine.py's `Settings`: per GPU of the worker, and its latency)."""
    from fleetwise.sim.engine import Settings
    from fleetwise.sim.perf import perf_model
    from fleetwise.worker.engine.modelled_device import parse_forward
    perf, link = perf_model(gpu, *parse_forward(forward)), Settings()
    return link.link_latency_s + tokens * perf.kv_bytes_per_token * 8 / (link.link_gbps_per_gpu * 1e9 * perf.tp)


@dataclass
class LoadRequest:
    arrival_s: float      # after the first request, at the trace's own rate
    prompt: list[int]
    max_tokens: int


@dataclass
class Outcome:
    sent_s: float                         # after the run's start
    ttft_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token (event)
    tokens: int = 0                       # completion tokens, from usage
    error: str | None = None


def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival seconds, context tokens and generated tokens of every row, in trace order."""
    stamps, prompts, outputs = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            stamps.append(row["TIMESTAMP"])
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
    t = np.array(stamps, dtype="datetime64[us]")
    return (t - t.min()).astype("timedelta64[us]").astype(np.float64) / 1e6, np.array(prompts), np.array(outputs)


def trace_requests(path: Path, count: int, start: int, length_scale: float, max_prompt: int, max_output: int,
                   allowed: np.ndarray, seed: int = 0) -> list[LoadRequest]:
    """`count` consecutive trace rows from row `start`: their arrivals (from 0) and their
    lengths times `length_scale`, capped; prompts are random token ids from `allowed`."""
    seconds, prompts, outputs = read_trace(path)
    if start + count > len(seconds):
        raise SystemExit(f"error: the trace has {len(seconds)} rows; {start}+{count} asked for")
    rng = np.random.default_rng(seed)
    t0 = seconds[start]
    out = []
    for i in range(start, start + count):
        n = int(np.clip(round(prompts[i] * length_scale), 16, max_prompt))
        m = int(np.clip(round(outputs[i] * length_scale), 4, max_output))
        out.append(LoadRequest(float(seconds[i] - t0), rng.choice(allowed, size=n).tolist(), m))
    return out


def at_rate(requests: list[LoadRequest], rate: float) -> list[float]:
    """Send times (s) for a mean rate of `rate` requests/s: the trace's gaps scaled together."""
    span = requests[-1].arrival_s - requests[0].arrival_s
    own = (len(requests) - 1) / span if span > 0 else rate
    return [r.arrival_s * own / rate for r in requests]


async def stream_one(http: Any, url: str, model: str, req: LoadRequest, t_start: float) -> Outcome:
    """One streamed completion: greedy, EOS ignored; the arrival time of every token event."""
    import orjson
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = Outcome(t0 - t_start)
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = orjson.loads(line[6:])
                if obj.get("choices"):
                    now = time.perf_counter()
                    if out.ttft_s is None:
                        out.ttft_s = now - t0
                    out.token_times.append(now)
                if obj.get("usage"):
                    out.tokens = obj["usage"]["completion_tokens"]
    except Exception as e:  # a failed request is counted, the run goes on
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(http: Any, url: str, model: str, requests: list[LoadRequest], send_at: list[float]) -> tuple[
        list[Outcome], float]:
    """Open loop: each request sent at its time whatever the others do. Returns the
    outcomes and the run's wall seconds (first send to last token)."""
    t_start = time.perf_counter()

    async def one(req: LoadRequest, at: float) -> Outcome:
        await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
        return await stream_one(http, url, model, req, t_start)
    outcomes = await asyncio.gather(*(one(r, t) for r, t in zip(requests, send_at)))
    return list(outcomes), time.perf_counter() - t_start


def summarize(outcomes: list[Outcome], wall_s: float, offered_rate: float) -> dict:
    """TBT (every gap between two tokens of a request, pooled) and TTFT percentiles."""
    done = [o for o in outcomes if o.error is None and o.ttft_s is not None]
    gaps = [b - a for o in done for a, b in zip(o.token_times, o.token_times[1:])]
    # after the second token: in 1P+1D the first gap is the handoff (the router's decode call, the pull)
    later = [b - a for o in done for a, b in zip(o.token_times[1:], o.token_times[2:])]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    events = sum(len(o.token_times) for o in done)

    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None
    return {
        "offered_rate": offered_rate, "requests": len(outcomes), "completed": len(done),
        "errors": [o.error for o in outcomes if o.error][:5], "wall_s": wall_s,
        "achieved_rate": len(done) / wall_s if wall_s > 0 else None,
        "tokens": sum(o.tokens for o in done), "token_events": events, "tbt_gaps": len(gaps),
        "tbt_p50_s": pct(gaps, 50), "tbt_p99_s": pct(gaps, 99), "tbt_max_s": max(gaps, default=None),
        "tbt_after_first_p99_s": pct(later, 99),
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
    }
