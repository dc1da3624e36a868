"""The worker's step profile, measured: the real engine (one torch thread, the worker's own
defaults) runs a stream of requests whose lengths come from the workload, arriving so that the
batch grows and shrinks, and every step's makeup (prompt tokens, decodes, the cache they read)
and its time are recorded; `fleetwise.sim.calibration.fit` fits them. The time is the engine
thread's CPU time, not the wall clock: on a shared machine the wall clock of a step is mostly
how long other processes held the core, which has nothing to do with the step's makeup and
drowns the shape of the cost (one torch thread: the forward pass runs on the calling thread).
How much slower the wall clock ran during the fleet's run is measured there (run.py)."""

import random
import time
from pathlib import Path

from fleetwise.sim.calibration import StepSample
from fleetwise.worker.engine.step_trace import makeup


def measure_steps(model_dir: Path, lengths: list[tuple[int, int]], steps: int, seed: int = 0,
                  warmup: int = 20) -> tuple[list[StepSample], int, int]:
    """Runs the engine for `steps` steps (after `warmup`); returns the samples, the engine's KV
    capacity in tokens and its KV bytes per token. A new request (lengths drawn from `lengths`)
    arrives before a step with a probability that keeps a few to a few dozen running."""
    import torch

    from fleetwise.bench.models import prompt_token_ids
    from fleetwise.worker.engine.config import EngineConfig
    from fleetwise.worker.engine.engine import LLMEngine
    from fleetwise.worker.engine.sequence import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu"))
    allowed = prompt_token_ids(model_dir).tolist()
    rng = random.Random(seed)
    seen: list = []
    engine.fault_hook = seen.append
    samples: list[StepSample] = []
    target = 1
    for i in range(warmup + steps):
        if i % 50 == 0:
            target = rng.choice([1, 2, 4, 8, 16, 32])   # the batch size the arrivals aim at for a while
        if engine.num_running + engine.num_waiting < target or rng.random() < 0.02:
            p, o = rng.choice(lengths)
            engine.add_request(f"c{i}", [rng.choice(allowed) for _ in range(p)],
                               SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True, logprobs=0))
        seen.clear()
        t0 = time.thread_time()
        engine.step()
        cpu = time.thread_time() - t0
        if i >= warmup and seen:
            p, d, c, a = makeup(seen[0])
            samples.append(StepSample(p, d, c, cpu, a))
    kv_tokens = engine.runner.num_blocks * engine.config.block_size
    cfg = engine.model_config
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    return samples, kv_tokens, kv_bytes
