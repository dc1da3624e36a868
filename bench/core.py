"""`fleetwise bench core`: the batched inference core against Hugging Face `transformers`.

Three systems run the same trace-shaped requests in one process, one after the other:

  static      `LlamaForCausalLM.generate()` in static batches (arrival order, left padding);
              every row of a batch decodes until the longest request of the batch is done
  continuous  transformers' own continuous batching (`continuous_batching_context_manager`,
              the machinery behind `generate_batch`), over its paged cache
  core        fleetwise's `LLMEngine`, driven step by step in the same process (no HTTP)

Requests are offline: all are submitted at t0, and every system produces exactly the
requested number of output tokens (EOS ignored), so all do the same useful work. Output
tokens/s counts only the requested tokens. The result goes to `OUT/core.json` and
`OUT/core.png`; see bench/README.md.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

TRACE_FILE = "AzureLLMInferenceTrace_conv.csv"
DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "data" / "azure-llm-trace-2023" / TRACE_FILE

# Work knobs. The trace fitted to a 2048-token context averages ~620 tokens per request,
# ~124k tokens for 200 requests: on a quiet 2-core CPU the three systems together take ~17
# minutes at those lengths (transformers' continuous batching alone ~10), ~3 minutes at
# 0.4 of them. The extra factor keeps a default run well inside ten minutes there, with room
# for a busy machine; override it with FLEETWISE_BENCH_LENGTH_SCALE (1.0: the fitted lengths).
DEFAULT_LENGTH_SCALE = 0.4
STATIC_BATCH_SIZE = 16
MAX_NUM_SEQS = 64
MAX_NUM_BATCHED_TOKENS = 2048
KV_CACHE_MIB = 1024
BLOCK_SIZE = 16

TARGETS = {  # measured value -> (comparison, target)
    "core_over_static": (">=", 3.0),
    "core_over_continuous": (">=", 1.5),
    "outside_forward_share": ("<", 0.15),
    "kv_waste": ("<", 0.04),
}

SYSTEM_LABELS = {
    "static": "transformers generate (static batches)",
    "continuous": "transformers continuous batching",
    "core": "fleetwise core (LLMEngine)",
}

SHORT_LABELS = {"static": "static (generate)", "continuous": "continuous (transformers)",
                "core": "core (fleetwise)"}

log = logging.getLogger(__name__)


# -- workload ----------------------------------------------------------------------------


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

        def stats(a):
            return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                    "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
                    "min": int(a.min()), "max": int(a.max()), "total": int(a.sum())}

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


def special_token_ids(model_dir: Path) -> set[int]:
    ids: set[int] = set()
    tok = model_dir / "tokenizer.json"
    if tok.exists():
        data = json.loads(tok.read_text())
        ids |= {t["id"] for t in data.get("added_tokens", []) if t.get("special", True)}
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        ids |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
    return ids


def build_workload(trace_path: Path, model_dir: Path, num_requests: int, seed: int,
                   length_scale: float) -> Workload:
    cfg = json.loads((model_dir / "config.json").read_text())
    context = int(cfg.get("max_position_embeddings", 2048))
    vocab = int(cfg["vocab_size"])
    specials = special_token_ids(model_dir)
    allowed = np.array([i for i in range(vocab) if i not in specials])
    if len(allowed) == 0:
        raise SystemExit("error: the model's vocabulary holds only special tokens")

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
        p = max(1, int(round(prompts[row] * scale)))
        o = max(1, int(round(outputs[row] * scale)))
        if p + o > context:
            clipped += 1
            o = min(o, context - 1)
            p = context - o
        ids = rng.choice(allowed, size=p).tolist()
        reqs.append(Request(f"req-{k}", float(seconds[row] - t_first), int(prompts[row]),
                            int(outputs[row]), ids, o))
    return Workload(reqs, context, fit, length_scale, str(trace_path), len(prompts), p99, clipped)


# -- measurements ------------------------------------------------------------------------


def percentiles(values) -> dict | None:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return None
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


@dataclass
class SystemResult:
    name: str
    wall_s: float
    useful_tokens: int
    generated_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
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
    ttft, itl = [], []
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


@contextmanager
def progress_bar(console, description: str, total: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    if not console.is_terminal:  # a log file: a line at every tenth instead of a live bar
        state = {"done": 0, "next": 1, "t0": time.perf_counter()}

        def advance(n: int) -> None:
            state["done"] += n
            while state["next"] <= 10 and state["done"] * 10 >= state["next"] * total:
                console.print(f"{description.strip()}: {state['next'] * 10}% ({state['done']}/{total} tokens, "
                              f"{time.perf_counter() - state['t0']:.0f} s)")
                state["next"] += 1

        yield advance
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tokens"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


# -- (a) static batches with generate() ---------------------------------------------------


class _StepClock:
    """A `generate()` streamer that only notes when each decoding step's tokens are out."""

    def __init__(self, on_step=None):
        self.stamps: list[float] = []
        self._prompt_seen = False
        self.on_step = on_step

    def put(self, value):
        if not self._prompt_seen:  # the first call hands over the prompt
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        if self.on_step:
            self.on_step(len(self.stamps))

    def end(self):
        pass


def load_hf_model(model_dir: Path, device: torch.device):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device).eval()


def _static_config(n_new: int, pad_id: int):
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                            eos_token_id=None, pad_token_id=pad_id, num_beams=1)


def run_static(model, reqs: list[Request], batch_size: int, pad_id: int, console) -> SystemResult:
    device = model.device

    def generate(batch: list[Request], streamer=None):
        n_new = max(r.output_len for r in batch)
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_ids)
            mask[i, width - r.prompt_len:] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=_static_config(n_new, pad_id), streamer=streamer)
        if out.shape[1] != width + n_new:
            raise RuntimeError(f"generate() stopped early: {out.shape[1] - width} of {n_new} tokens")
        return out[:, width:].tolist(), n_new

    with torch.inference_mode():
        generate([Request("warmup", 0.0, 0, 0, reqs[0].prompt_ids[:8], 4)])  # one-time costs

        batches = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
        stamps: dict[str, list[float]] = {}
        outputs: dict[str, list[int]] = {}
        generated = 0
        steps = []
        with progress_bar(console, "static    ", sum(r.output_len for r in reqs)) as advance:
            usage0 = usage_snapshot()
            t0 = time.perf_counter()
            for batch in batches:
                lens = sorted(r.output_len for r in batch)

                def on_step(k, lens=lens):  # k-th token: rows that still want one
                    advance(len(lens) - int(np.searchsorted(lens, k, side="left")))

                clock = _StepClock(on_step)
                out, n_new = generate(batch, clock)
                generated += len(batch) * n_new
                steps.append(n_new)
                for r, row in zip(batch, out):
                    stamps[r.request_id] = clock.stamps[:r.output_len]
                    outputs[r.request_id] = row[:r.output_len]
            wall = time.perf_counter() - t0
            usage = usage_since(usage0)
    useful = sum(r.output_len for r in reqs)
    ttft, itl = latencies(t0, stamps)
    res = SystemResult("static", wall, useful, generated, ttft, itl, outputs)
    res.extra = {**usage, "batch_size": batch_size, "num_batches": len(batches),
                 "decode_steps": int(sum(steps)),
                 "wasted_output_share": 1 - useful / generated if generated else 0.0,
                 "padded_prompt_tokens": int(sum(len(b) * max(r.prompt_len for r in b) for b in batches)),
                 "prompt_tokens": int(sum(r.prompt_len for r in reqs))}
    res.notes.append("TTFT of a request is its batch's first token (all requests submitted at t0); "
                     "ITL is measured over the request's own tokens only")
    res.notes.append("a padded batch can be longer than the context (transformers then warns); every "
                     "row's positions follow its attention mask and stay within its own length")
    return res


# -- (b) transformers continuous batching -------------------------------------------------


class _DropNoise(logging.Filter):
    """The CPU memory probe complains without psutil; the cache is sized explicitly here."""

    def filter(self, record):
        msg = record.getMessage()
        return "without psutil" not in msg and "psutil is not available" not in msg


def run_continuous(model, reqs: list[Request], kv_tokens: int, console) -> SystemResult:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:  # older layouts
        WorkloadHints = None
    if not hasattr(model, "continuous_batching_context_manager"):
        raise RuntimeError("this transformers has no continuous batching "
                           f"(version {__import__('transformers').__version__})")

    cb_log = logging.getLogger("ContinuousBatchingLogger")
    noise = _DropNoise()
    cb_log.addFilter(noise)
    for h in cb_log.handlers:
        h.addFilter(noise)

    page = ContinuousBatchingConfig().page_size
    cb_config = ContinuousBatchingConfig(
        num_blocks=max(1, kv_tokens // page), max_batch_tokens=MAX_NUM_BATCHED_TOKENS,
        max_requests_per_batch=MAX_NUM_SEQS)
    max_new = max(r.output_len for r in reqs)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1)
    hints = {}
    if WorkloadHints is not None:
        hints["workload_hints"] = WorkloadHints(max_prompt_length=max(r.prompt_len for r in reqs),
                                                max_generated_length=max_new, num_requests=len(reqs))

    results: dict[str, object] = {}
    try:
        with torch.inference_mode(), model.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=cb_config,
                block=True, timeout=30, warmup=True, **hints) as manager:
            resolved = manager.continuous_batching_config
            attn = model.config._attn_implementation  # switched for the run, restored on exit

            def collect(ids: set[str], advance=None, limit_s: float = 3600.0):
                deadline = time.monotonic() + limit_s
                while ids - results.keys():
                    if time.monotonic() > deadline:
                        raise TimeoutError("continuous batching made no progress")
                    r = manager.get_result(timeout=1)
                    if r is None:
                        if not manager.is_running():
                            raise RuntimeError("the continuous batching thread stopped")
                        continue
                    if r.is_finished():
                        if r.error is not None:
                            raise RuntimeError(f"request {r.request_id} failed: {r.error}")
                        results[r.request_id] = r
                        if advance and r.request_id in ids:
                            advance(len(r.generated_tokens))

            manager.add_request(reqs[0].prompt_ids[:8], request_id="warmup", max_new_tokens=4,
                                eos_token_id=-1)
            collect({"warmup"})
            with progress_bar(console, "continuous", sum(r.output_len for r in reqs)) as advance:
                usage0 = usage_snapshot()
                t0 = time.perf_counter()
                for r in reqs:  # one length per request (generate_batch takes a single one)
                    manager.add_request(r.prompt_ids, request_id=r.request_id,
                                        max_new_tokens=r.output_len, eos_token_id=-1,
                                        record_timestamps=True)
                collect({r.request_id for r in reqs}, advance)
                wall = time.perf_counter() - t0
                usage = usage_since(usage0)
    finally:
        cb_log.removeFilter(noise)
        for h in cb_log.handlers:
            h.removeFilter(noise)

    stamps, outputs, generated = {}, {}, 0
    for r in reqs:
        out = results[r.request_id]
        toks = list(out.generated_tokens)
        if len(toks) != r.output_len:
            raise RuntimeError(f"{r.request_id}: {len(toks)} tokens generated, {r.output_len} requested")
        generated += len(toks)
        outputs[r.request_id] = toks
        stamps[r.request_id] = list(out.timestamps or [])
    ttft, itl = latencies(t0, stamps)
    res = SystemResult("continuous", wall, sum(r.output_len for r in reqs), generated, ttft, itl, outputs)
    res.extra = {**usage, "attn_implementation": attn,
                 "page_size": resolved.page_size, "num_blocks": resolved.num_blocks,
                 "max_batch_tokens": resolved.max_batch_tokens,
                 "max_requests_per_batch": resolved.max_requests_per_batch}
    res.notes.append("driven through continuous_batching_context_manager + add_request, the path "
                     "generate_batch takes, so that each request gets its own max_new_tokens "
                     "(generate_batch itself accepts one max_new_tokens for all)")
    return res


# -- (c) the fleetwise core ---------------------------------------------------------------


def run_core(model_dir: Path, reqs: list[Request], device: str, console) -> tuple[SystemResult, object]:
    from fleetwise.worker.engine.config import EngineConfig
    from fleetwise.worker.engine.engine import LLMEngine
    from fleetwise.worker.engine.sequence import SamplingParams

    config = EngineConfig(model=str(model_dir), dtype="float32", device=device,
                          max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          kv_cache_bytes=KV_CACHE_MIB << 20, block_size=BLOCK_SIZE)
    eng = LLMEngine(config)
    bs = eng.block_manager.block_size

    def params(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    eng.add_request("warmup", reqs[0].prompt_ids[:8], params(4))
    while eng.has_work():
        eng.step()

    stamps: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    step_s, fwd_s, batch_tokens, batch_seqs = [], [], [], []
    kv_alloc = kv_used = 0
    kv_alloc_peak = 0
    preempt0 = eng.scheduler.num_preemptions
    generated = 0
    with progress_bar(console, "core      ", sum(r.output_len for r in reqs)) as advance:
        usage0 = usage_snapshot()
        t0 = time.perf_counter()
        for r in reqs:
            eng.add_request(r.request_id, r.prompt_ids, params(r.output_len))
        while eng.has_work():
            n_running_before = eng.num_running
            outs = eng.step()
            now = time.perf_counter()
            step_s.append(eng.last_step_seconds)
            fwd_s.append(eng.last_step_forward_seconds)
            # KV slots held by the running sequences vs slots holding computed tokens
            running = eng.scheduler.running
            alloc = sum(len(s.block_table) for s in running) * bs
            used = sum(min(s.num_computed_tokens, s.num_tokens) for s in running)
            kv_alloc += alloc
            kv_used += used
            kv_alloc_peak = max(kv_alloc_peak, alloc)
            batch_seqs.append(max(n_running_before, len(running)))
            n = 0
            for o in outs:
                if o.token_ids:
                    stamps[o.request_id].append(now)
                    outputs[o.request_id].extend(o.token_ids)
                    n += len(o.token_ids)
                if o.error:
                    raise RuntimeError(f"{o.request_id} failed in the engine: {o.error}")
            batch_tokens.append(n)
            generated += n
            advance(n)
        wall = time.perf_counter() - t0
        usage = usage_since(usage0)
    for r in reqs:
        if len(outputs[r.request_id]) != r.output_len:
            raise RuntimeError(f"{r.request_id}: {len(outputs[r.request_id])} tokens generated, "
                               f"{r.output_len} requested")
    ttft, itl = latencies(t0, stamps)
    res = SystemResult("core", wall, sum(r.output_len for r in reqs), generated, ttft, itl, outputs)
    sum_step, sum_fwd = float(sum(step_s)), float(sum(fwd_s))
    res.extra = {
        **usage,
        "steps": len(step_s),
        "step_seconds_total": sum_step, "forward_seconds_total": sum_fwd,
        "outside_forward_share": 1 - sum_fwd / sum_step if sum_step else 0.0,
        "outside_step_share": 1 - sum_step / wall if wall else 0.0,
        "step_s": percentiles(step_s),
        "kv_slots_allocated": int(kv_alloc), "kv_slots_used": int(kv_used),
        "kv_waste": 1 - kv_used / kv_alloc if kv_alloc else 0.0,
        "kv_slots_allocated_peak": int(kv_alloc_peak),
        "kv_num_blocks": eng.block_manager.num_blocks, "block_size": bs,
        "preemptions": eng.scheduler.num_preemptions - preempt0,
        "mean_output_tokens_per_step": float(np.mean(batch_tokens)) if batch_tokens else 0.0,
        "mean_running_seqs": float(np.mean(batch_seqs)) if batch_seqs else 0.0,
        "engine": {k: v for k, v in asdict(config).items() if k != "model"},
    }
    res.notes.append("KV waste: 1 - (computed tokens held) / (block slots held) by the running "
                     "sequences, summed over all steps (token-weighted)")
    return res, eng


# -- report ------------------------------------------------------------------------------


def _check(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[name]
    return value >= target if op == ">=" else value < target


def _fmt_lat(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['p50'] * 1e3:.0f} / {p['p90'] * 1e3:.0f} / {p['p99'] * 1e3:.0f}"


def print_summary(console, report: dict) -> None:
    from rich.table import Table
    systems = report["systems"]
    t = Table(title="fleetwise bench core: output tokens/s (useful tokens only)", show_lines=False)
    for col, just in (("system", "left"), ("wall s", "right"), ("useful tok", "right"),
                      ("generated", "right"), ("tok/s", "right"),
                      ("TTFT ms p50/p90/p99", "right"), ("ITL ms p50/p90/p99", "right")):
        t.add_column(col, justify=just)
    for name in ("static", "continuous", "core"):
        s = systems.get(name)
        if s is None:
            continue
        if "skipped" in s:
            t.add_row(SHORT_LABELS[name], "-", "-", "-", "-", "-", f"skipped: {s['skipped']}"[:60])
            continue
        t.add_row(SHORT_LABELS[name], f"{s['wall_s']:.1f}", f"{s['useful_output_tokens']}",
                  f"{s['generated_tokens']}", f"{s['output_tokens_per_s']:.1f}",
                  _fmt_lat(s["ttft_s"]), _fmt_lat(s["itl_s"]))
    console.print(t)

    c = Table(title="targets")
    for col in ("measure", "measured", "target", "met"):
        c.add_column(col)
    labels = {"core_over_static": "core / static tok/s", "core_over_continuous": "core / continuous tok/s",
              "outside_forward_share": "core step time outside forward", "kv_waste": "core KV slots wasted"}
    for name, (op, target) in TARGETS.items():
        v = report["ratios"].get(name) if name.startswith("core_over") else systems.get("core", {}).get(name)
        is_share = not name.startswith("core_over")
        shown = "-" if v is None else (f"{v * 100:.1f}%" if is_share else f"{v:.2f}x")
        tshown = f"{op} {target * 100:.0f}%" if is_share else f"{op} {target:.1f}x"
        ok = report["targets"].get(name)
        c.add_row(labels[name], shown, tshown,
                  "-" if ok is None else ("[green]yes[/green]" if ok else "[red]no[/red]"))
    console.print(c)


def plot(report: dict, results: dict[str, SystemResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("static", "continuous", "core") if n in results]
    colors = {"static": "#999999", "continuous": "#4c72b0", "core": "#dd8452"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    tps = [results[n].tokens_per_s for n in names]
    bars = ax.bar(names, tps, color=[colors[n] for n in names])
    core = results.get("core")
    for b, n in zip(bars, names):
        label = f"{results[n].tokens_per_s:.0f}"
        if core and n != "core" and results[n].tokens_per_s > 0:
            label += f"\ncore {core.tokens_per_s / results[n].tokens_per_s:.2f}x"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=9)
    ax.set_ylabel("useful output tokens/s")
    ax.set_title("throughput")
    ax.margins(y=0.25)
    for ax, attr, title in ((axes[1], "ttft_s", "time to first token (offline: all sent at t0)"),
                            (axes[2], "itl_s", "inter-token latency")):
        for n in names:
            v = np.sort(np.asarray(getattr(results[n], attr)))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=n, color=colors[n])
        ax.set_xlabel("seconds")
        ax.set_ylabel("CDF")
        ax.set_title(title)
        if attr == "itl_s":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    w = report["workload"]
    fig.suptitle(f"{report['config']['model_name']}: {w['requests']} requests from the Azure conversation "
                 f"trace, lengths x{w['scale']:.3f}, {report['config']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement(a: SystemResult, b: SystemResult) -> dict:
    """Greedy outputs of two systems: requests identical, and the mean share of equal tokens."""
    same, shares = 0, []
    for rid, x in a.outputs.items():
        y = b.outputs.get(rid, [])
        same += x == y
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        shares.append(k / max(1, len(x)))
    return {"identical_requests": same, "requests": len(a.outputs),
            "mean_matching_prefix_share": float(np.mean(shares)) if shares else 0.0}


# -- entry point -------------------------------------------------------------------------


def run_core_bench(requests: int = 200, preset: str = "small", model: Path | None = None,
                   trace: Path | None = None, out: Path = Path("bench/results"), seed: int = 0,
                   skip: list[str] | None = None, length_scale: float | None = None,
                   static_batch_size: int = STATIC_BATCH_SIZE) -> dict:
    """Run the three systems on the same requests; write OUT/core.json and OUT/core.png.

    `length_scale` multiplies the context-fitted trace lengths (default DEFAULT_LENGTH_SCALE,
    or the FLEETWISE_BENCH_LENGTH_SCALE environment variable).
    """
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the tables
        console = Console(width=max(console.width, 120))
    skip = [s.strip().lower() for s in (skip or [])]
    aliases = {"static": "static", "generate": "static", "a": "static",
               "continuous": "continuous", "generate_batch": "continuous", "cb": "continuous", "b": "continuous"}
    unknown = [s for s in skip if s not in aliases]
    if unknown:
        raise SystemExit(f"error: --skip takes static or continuous, not {', '.join(unknown)}")
    skip_set = {aliases[s] for s in skip}
    if requests < 1:
        raise SystemExit("error: --requests must be at least 1")
    if length_scale is None:
        env = os.environ.get("FLEETWISE_BENCH_LENGTH_SCALE")
        length_scale = float(env) if env else DEFAULT_LENGTH_SCALE
    if not 0 < length_scale <= 1:
        raise SystemExit(f"error: the length scale must be in (0, 1], got {length_scale}")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace_path = resolve_trace(trace)

    if model is None:
        from fleetwise.worker.model.files import PRESETS, write_model
        if preset not in PRESETS:
            raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        model_dir = out / "models" / preset
        if not (model_dir / "config.json").exists():
            console.print(f"writing the {preset} model to {model_dir}")
            write_model(model_dir, preset, seed=0)
    else:
        model_dir = Path(model)
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"error: {model_dir} is not a model directory (no config.json)")
    model_dir = model_dir.resolve()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    wl = build_workload(trace_path, model_dir, requests, seed, length_scale)
    ws = wl.summary()
    reqs = wl.requests
    cfg = json.loads((model_dir / "config.json").read_text())
    n_params = _count_params(model_dir)
    console.rule("fleetwise bench core")
    console.print(f"model {model_dir} ({cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                  f"vocab {cfg.get('vocab_size')}, {n_params / 1e6:.1f}M parameters, context {wl.context}); "
                  f"device {device}, torch threads {torch.get_num_threads()}")
    console.print(f"trace {trace_path.name}: {wl.trace_rows} rows, p99 prompt+output {wl.trace_p99_total:.0f} tokens")
    console.print(f"length scaling: {wl.fit_scale:.4f} (trace p99 fits the {wl.context}-token context) "
                  f"x {wl.length_scale:g} (work bound; FLEETWISE_BENCH_LENGTH_SCALE) = {wl.scale:.4f}; "
                  f"{wl.num_clipped} requests clipped to the context")
    console.print(f"{len(reqs)} requests (seed {seed}): prompt mean {ws['prompt_tokens']['mean']:.0f} "
                  f"p99 {ws['prompt_tokens']['p99']:.0f} max {ws['prompt_tokens']['max']}, output mean "
                  f"{ws['output_tokens']['mean']:.0f} p99 {ws['output_tokens']['p99']:.0f} max "
                  f"{ws['output_tokens']['max']}; {ws['prompt_tokens']['total']} prompt + "
                  f"{ws['output_tokens']['total']} output tokens")

    kv_tokens = (KV_CACHE_MIB << 20) // _bytes_per_token(cfg)
    results: dict[str, SystemResult] = {}
    skipped: dict[str, str] = {}
    hf_model = None
    if not {"static", "continuous"} <= skip_set:
        try:
            hf_model = load_hf_model(model_dir, torch.device(device))
        except Exception as exc:  # both baselines need it
            reason = f"transformers could not load the model: {type(exc).__name__}: {exc}"
            for n in ("static", "continuous"):
                if n not in skip_set:
                    skipped[n] = reason
    for n in skip_set:
        skipped[n] = "--skip"

    if "static" not in skipped:
        console.print(f"[bold]static[/bold]: generate() in batches of {static_batch_size}, left padding, "
                      "EOS off")
        pad_id = _pad_id(model_dir, cfg)
        results["static"] = run_static(hf_model, reqs, static_batch_size, pad_id, console)
    if "continuous" not in skipped:
        console.print("[bold]continuous[/bold]: transformers continuous batching, same token budget and "
                      "KV capacity as the core")
        try:
            results["continuous"] = run_continuous(hf_model, reqs, kv_tokens, console)
        except Exception as exc:
            skipped["continuous"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[yellow]continuous batching skipped: {skipped['continuous']}[/yellow]")
    del hf_model

    console.print(f"[bold]core[/bold]: LLMEngine, max_num_seqs {MAX_NUM_SEQS}, max_num_batched_tokens "
                  f"{MAX_NUM_BATCHED_TOKENS}, KV {KV_CACHE_MIB} MiB, block {BLOCK_SIZE}")
    core, _ = run_core(model_dir, reqs, device, console)
    results["core"] = core

    systems: dict[str, dict] = {n: r.to_json() for n, r in results.items()}
    for n, why in skipped.items():
        systems[n] = {"label": SYSTEM_LABELS[n], "skipped": why}
    ratios = {}
    for n in ("static", "continuous"):
        ratios[f"core_over_{n}"] = core.tokens_per_s / results[n].tokens_per_s if n in results else None
    checks = {k: _check(k, ratios.get(k) if k.startswith("core_over") else systems["core"].get(k))
              for k in TARGETS}
    agree = {n: agreement(core, results[n]) for n in ("static", "continuous") if n in results}
    import transformers
    report = {
        "benchmark": "core",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "model_dir": str(model_dir), "model_name": model_dir.name, "preset": None if model else preset,
            "parameters": n_params, "seed": seed, "requests": requests, "device": device,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "static_batch_size": static_batch_size, "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "kv_cache_mib": KV_CACHE_MIB,
            "kv_capacity_tokens": kv_tokens, "block_size": BLOCK_SIZE, "skip": sorted(skip_set),
            "mode": "offline: all requests submitted at t0",
        },
        "workload": ws,
        "systems": systems,
        "ratios": ratios,
        "targets": checks,
        "target_values": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "greedy_agreement_with_core": agree,
    }
    json_path, png_path = out / "core.json", out / "core.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, results, png_path)
    except Exception as exc:  # the numbers matter more than the picture
        console.print(f"[yellow]plot not written: {type(exc).__name__}: {exc}[/yellow]")
        png_path = None
    console.rule("summary")
    print_summary(console, report)
    c = systems["core"]
    console.print(f"core: {c['steps']} steps, step time outside forward {c['outside_forward_share'] * 100:.1f}%, "
                  f"bench loop outside step() {c['outside_step_share'] * 100:.1f}% of wall, KV waste "
                  f"{c['kv_waste'] * 100:.2f}% (peak {c['kv_slots_allocated_peak']} of "
                  f"{c['kv_num_blocks'] * c['block_size']} slots), {c['preemptions']} preemptions")
    if "static" in systems and "skipped" not in systems["static"]:
        s = systems["static"]
        console.print(f"static: {s['wasted_output_share'] * 100:.1f}% of generated tokens past a request's "
                      f"length; {s['padded_prompt_tokens']} padded prompt tokens for {s['prompt_tokens']}")
    busy = []
    for n in ("static", "continuous", "core"):
        s = systems.get(n, {})
        if "cpu_s" not in s:
            continue
        p = s.get("cpu_pressure_share")
        busy.append(f"{n} {s['cpu_utilisation'] * torch.get_num_threads():.1f}/{torch.get_num_threads()} cores"
                    + ("" if p is None else f", CPU contention {p * 100:.0f}% of the time"))
        if p is not None and p > 0.10:
            report.setdefault("warnings", []).append(f"{n}: tasks waited for a CPU {p * 100:.0f}% of its run")
    if busy:
        console.print("CPU use while timed: " + "; ".join(busy))
    if report.get("warnings"):
        console.print("[yellow]warning: other work competed for the CPUs during the run (" +
                      "; ".join(report["warnings"]) + "); the timings and ratios are unreliable, "
                      "rerun on a quiet machine[/yellow]")
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    for n, a in agree.items():
        console.print(f"greedy agreement core vs {n}: {a['identical_requests']}/{a['requests']} requests "
                      f"identical, mean matching prefix {a['mean_matching_prefix_share'] * 100:.1f}%")
    console.print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return report


def _bytes_per_token(cfg: dict) -> int:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 4  # float32


def _pad_id(model_dir: Path, cfg: dict) -> int:
    tc = model_dir / "tokenizer_config.json"
    tok = model_dir / "tokenizer.json"
    if tc.exists() and tok.exists():
        pad = json.loads(tc.read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        for t in json.loads(tok.read_text()).get("added_tokens", []):
            if t.get("content") == pad:
                return int(t["id"])
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = cfg.get(key)
        if isinstance(v, list) and v:
            return int(v[0])
        if v is not None:
            return int(v)
    return 0


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open
    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                n += math.prod(sf.get_slice(k).get_shape())
    return n
