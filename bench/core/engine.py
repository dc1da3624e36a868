"""The core benchmark's system under test: fleetwise's `LLMEngine`, driven step by step in
the benchmark's own process (no HTTP), with what each step did: its time in scheduling, input
preparation, the model's forward pass alone and sampling (`worker/engine/phases.py`, which
synchronises CUDA around each), the rest (output processing), and the KV slots its running
sequences held against the tokens they hold."""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fleetwise.bench.core.baselines import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from fleetwise.bench.core.result import SystemResult, latencies, percentiles, usage_since, usage_snapshot
from fleetwise.bench.core.workload import Request, Workload
from fleetwise.bench.harness import progress_bar
from fleetwise.worker.engine.phases import PHASES, attach

KV_CACHE_MIB = 1024
BLOCK_SIZE = 16


@dataclass
class _Steps:
    """What the engine's steps did, one entry a step."""
    block_size: int
    step_s: list[float] = field(default_factory=list)
    phase_s: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    tokens: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    kv_alloc: int = 0
    kv_used: int = 0
    kv_alloc_peak: int = 0

    def record(self, eng: Any, n_running_before: int, n_tokens: int, phases: dict[str, float]) -> None:
        """`phases`: the seconds each phase took in this step."""
        self.step_s.append(eng.last_step_seconds)
        for p in PHASES:
            self.phase_s[p].append(phases[p])
        # KV slots held by the running sequences vs slots holding computed tokens
        running = eng.scheduler.running
        alloc = sum(len(s.block_table) for s in running) * self.block_size
        self.kv_alloc += alloc
        self.kv_used += sum(min(s.num_computed_tokens, s.num_tokens) for s in running)
        self.kv_alloc_peak = max(self.kv_alloc_peak, alloc)
        self.seqs.append(max(n_running_before, len(running)))
        self.tokens.append(n_tokens)

    def to_json(self, wall: float) -> dict:
        sum_step = float(sum(self.step_s))
        totals = {p: float(sum(v)) for p, v in self.phase_s.items()}
        totals["other"] = max(0.0, sum_step - sum(totals.values()))  # output processing, metrics
        return {
            "steps": len(self.step_s),
            "step_seconds_total": sum_step, "forward_seconds_total": totals["forward"],
            "phase_seconds_total": totals,
            "phase_shares": {p: t / sum_step if sum_step else 0.0 for p, t in totals.items()},
            "outside_forward_share": 1 - totals["forward"] / sum_step if sum_step else 0.0,
            "outside_step_share": 1 - sum_step / wall if wall else 0.0,
            "step_s": percentiles(self.step_s), "forward_s": percentiles(self.phase_s["forward"]),
            "kv_slots_allocated": int(self.kv_alloc), "kv_slots_used": int(self.kv_used),
            "kv_waste": 1 - self.kv_used / self.kv_alloc if self.kv_alloc else 0.0,
            "kv_slots_allocated_peak": int(self.kv_alloc_peak),
        }


def run_core(model_dir: Path, reqs: list[Request], device: str, console: Console,
             label: str = "core      ") -> tuple[SystemResult, Any]:
    from fleetwise.worker.engine.config import EngineConfig
    from fleetwise.worker.engine.engine import LLMEngine
    from fleetwise.worker.engine.sequence import SamplingParams

    config = EngineConfig(model=str(model_dir), dtype="float32", device=device,
                          max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          kv_cache_bytes=KV_CACHE_MIB << 20, block_size=BLOCK_SIZE)
    eng = LLMEngine(config)  # a new one each run: its prefix cache would serve a repeat
    bs = eng.block_manager.block_size

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    eng.add_request("warmup", reqs[0].prompt_ids[:8], params(4))
    while eng.has_work():
        eng.step()

    stamps: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    steps = _Steps(bs)
    clock = attach(eng)
    preempt0 = eng.scheduler.num_preemptions
    generated = 0
    with progress_bar(console, label, sum(r.output_len for r in reqs), "tokens") as advance:
        usage0 = usage_snapshot()
        t0 = time.perf_counter()
        for r in reqs:
            eng.add_request(r.request_id, r.prompt_ids, params(r.output_len))
        while eng.has_work():
            n_running_before = eng.num_running
            before = clock.snapshot()
            outs = eng.step()
            after = clock.snapshot()
            now = time.perf_counter()
            n = 0
            for o in outs:
                if o.token_ids:
                    stamps[o.request_id].append(now)
                    outputs[o.request_id].extend(o.token_ids)
                    n += len(o.token_ids)
                if o.error:
                    raise RuntimeError(f"{o.request_id} failed in the engine: {o.error}")
            steps.record(eng, n_running_before, n, {p: after[p] - before[p] for p in PHASES})
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
    res.extra = {
        **usage, **steps.to_json(wall),
        "kv_num_blocks": eng.block_manager.num_blocks, "block_size": bs,
        "preemptions": eng.scheduler.num_preemptions - preempt0,
        "mean_output_tokens_per_step": float(np.mean(steps.tokens)) if steps.tokens else 0.0,
        "mean_running_seqs": float(np.mean(steps.seqs)) if steps.seqs else 0.0,
        "engine": {k: v for k, v in asdict(config).items() if k != "model"} | {"served_model_name": config.served_name},
    }
    res.notes.append("KV waste: 1 - (computed tokens held) / (block slots held) by the running "
                     "sequences, summed over all steps (token-weighted)")
    return res, eng


def kv_at_lengths(model_dir: Path, wl: Workload, device: str, console: Console) -> dict:
    """One core run of `wl` for its KV use alone: what the paged cache wastes at the
    workload's lengths (the systems' comparison runs shorter requests, where a sequence's
    last, partly filled block is a larger share of what it holds)."""
    res, _ = run_core(model_dir, wl.requests, device, console, f"core x{wl.length_scale:g}".ljust(14))
    ws = wl.summary()
    return {"length_scale": wl.length_scale, "requests": len(wl.requests),
            "prompt_tokens_mean": ws["prompt_tokens"]["mean"], "output_tokens_mean": ws["output_tokens"]["mean"],
            **{k: res.extra[k] for k in ("kv_waste", "kv_slots_allocated", "kv_slots_used",
                                         "kv_slots_allocated_peak", "preemptions", "steps")}}
