"""The core benchmark's two baselines from Hugging Face `transformers`, on the same model:

  static      `LlamaForCausalLM.generate()` in static batches (arrival order, left padding);
              every row of a batch decodes until the longest request of the batch is done
  continuous  transformers' own continuous batching (`continuous_batching_context_manager`,
              the machinery behind `generate_batch`), over its paged cache
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fleetwise.bench.core.result import SystemResult, latencies, usage_since, usage_snapshot
from fleetwise.bench.core.workload import Request
from fleetwise.bench.harness import progress_bar

MAX_NUM_SEQS = 64             # the core's limits, which the continuous baseline shares
MAX_NUM_BATCHED_TOKENS = 2048


# -- static batches with generate() ---------------------------------------------------------


class _StepClock:
    """A `generate()` streamer that only notes when each decoding step's tokens are out."""

    def __init__(self, on_step: Callable[[int], None] | None = None):
        self.stamps: list[float] = []
        self._prompt_seen = False
        self.on_step = on_step

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call hands over the prompt
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        if self.on_step:
            self.on_step(len(self.stamps))

    def end(self) -> None:
        pass


def load_hf_model(model_dir: Path, device: torch.device) -> Any:
    from transformers import LlamaForCausalLM
    # Any: transformers types the decorated `to` as taking the model again
    model: Any = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device).eval()


def _static_config(n_new: int, pad_id: int) -> Any:
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                            eos_token_id=None, pad_token_id=pad_id, num_beams=1)


def run_static(model: Any, reqs: list[Request], batch_size: int, pad_id: int, console: Console,
               label: str = "static    ") -> SystemResult:
    device = model.device

    def generate(batch: list[Request], streamer: _StepClock | None = None) -> tuple[list[list[int]], int]:
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
        steps: list[int] = []
        with progress_bar(console, label, sum(r.output_len for r in reqs), "tokens") as advance:
            usage0 = usage_snapshot()
            t0 = time.perf_counter()
            for batch in batches:
                lens = sorted(r.output_len for r in batch)

                def on_step(k: int, lens: list[int] = lens) -> None:  # k-th token: rows that still want one
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


# -- transformers continuous batching ------------------------------------------------------


class _DropNoise(logging.Filter):
    """The CPU memory probe complains without psutil; the cache is sized explicitly here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "without psutil" not in msg and "psutil is not available" not in msg


def _cb_configs(model: Any, reqs: list[Request], kv_tokens: int) -> tuple[Any, Any, dict]:
    """Generation config, continuous batching config (the core's token budget, request limit
    and KV capacity) and workload hints, where this transformers takes them."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    hints_cls: type | None
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints as hints_cls
    except ImportError:  # older layouts
        hints_cls = None
    if not hasattr(model, "continuous_batching_context_manager"):
        raise RuntimeError("this transformers has no continuous batching "
                           f"(version {__import__('transformers').__version__})")
    page = ContinuousBatchingConfig().page_size
    cb_config = ContinuousBatchingConfig(
        num_blocks=max(1, kv_tokens // page), max_batch_tokens=MAX_NUM_BATCHED_TOKENS,
        max_requests_per_batch=MAX_NUM_SEQS)
    max_new = max(r.output_len for r in reqs)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1)
    hints = {}
    if hints_cls is not None:
        hints["workload_hints"] = hints_cls(max_prompt_length=max(r.prompt_len for r in reqs),
                                           max_generated_length=max_new, num_requests=len(reqs))
    return gen_config, cb_config, hints


def _collect(manager: Any, results: dict[str, Any], ids: set[str],
             advance: Callable[[int], None] | None = None, limit_s: float = 3600.0) -> None:
    """Until every request of `ids` is finished; its result goes to `results`."""
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


def run_continuous(model: Any, reqs: list[Request], kv_tokens: int, console: Console,
                   label: str = "continuous") -> SystemResult:
    gen_config, cb_config, hints = _cb_configs(model, reqs, kv_tokens)
    cb_log = logging.getLogger("ContinuousBatchingLogger")
    noise = _DropNoise()
    cb_log.addFilter(noise)
    for h in cb_log.handlers:
        h.addFilter(noise)
    results: dict[str, Any] = {}
    try:
        with torch.inference_mode(), model.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=cb_config,
                block=True, timeout=30, warmup=True, **hints) as manager:
            resolved = manager.continuous_batching_config
            attn = model.config._attn_implementation  # switched for the run, restored on exit
            manager.add_request(reqs[0].prompt_ids[:8], request_id="warmup", max_new_tokens=4,
                                eos_token_id=-1)
            _collect(manager, results, {"warmup"})
            with progress_bar(console, label, sum(r.output_len for r in reqs), "tokens") as advance:
                usage0 = usage_snapshot()
                t0 = time.perf_counter()
                for r in reqs:  # one length per request (generate_batch takes a single one)
                    manager.add_request(r.prompt_ids, request_id=r.request_id,
                                        max_new_tokens=r.output_len, eos_token_id=-1,
                                        record_timestamps=True)
                _collect(manager, results, {r.request_id for r in reqs}, advance)
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
