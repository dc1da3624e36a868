"""A modelled device: the engine runs as it does (scheduler, paged blocks, prefix cache,
continuous batching, the HTTP API and /metrics), but each step's forward pass is replaced by
waiting out the time a performance model says the step takes on a GPU, and each token is a
deterministic pick instead of a sample.

What it is for: a fleet of these workers on a few CPU cores behaves like a fleet of GPU
workers, where routing and cache hits decide the latencies, not the CPU share each worker
process gets (waiting is sleeping, which needs no CPU). The CPU forward pass of a small model
is the other way round: a few processes on a shared machine move each other's step times by
multiples, so a comparison of routers drowns in that noise. llm-d's inference simulator
serves the same purpose.

The step time comes from the simulator's performance model (sim/perf.py, fitted from the
Splitwise authors' profile), the one source every modelled time in fleetwise uses: a step with
prompt tokens is a prompt pass over all its batched prompt tokens (plus what the decodes it
carries add, when the model says so); a step of decodes alone is a token step reading every
decode's context. The product is the worker's `--modelled-gpu`, so its power, a cap's stretch
and the DCGM series follow the same steps (engine.py's `_as_the_modelled_gpu`). The KV cache
holds what that model's KV cache holds on that product (`PerfModel.kv_capacity_tokens`), unless
`num_blocks` says otherwise.

The KV a handoff moves is real: the first time anything reads or writes the cache (a prefill
worker's stream, a decode worker's pull, a migration; never a mixed worker's own steps) the
runner makes the tensors the loaded model's shape asks for (float16), as many slots as the
modelled cache, so a prefill and a decode worker hand prompts over through the real lease,
stream and pull. What crosses the loopback is that model's KV (8 KiB a token for the small
preset), not the modelled model's (320 KiB a token for Llama-2-70B): `bench pd-load` sets the
time of the one against what the other would take on the simulator's link. Host memory: the
modelled cache's tokens times that model's KV a token (150 MB for llama2-70b:tp2 on A100s with
the small preset's shape, 3.7 GB for tp4's 457k tokens: `num_blocks` bounds it).

The token a sequence gets is one of its prompt's tokens (so it is text the tokenizer reads),
picked by a hash of the sequence's length and last token: the same prompt gives the same
output on any worker. Asked logprobs are 0 for it (certain), with no alternatives.
"""

import threading
import time
from typing import TYPE_CHECKING

import torch

from ..model.llama import ModelConfig
from ..model.sampler import SamplerOutput, TokenLogprob
from .config import EngineConfig
from .device_clock import DeviceClock
from .kv_hooks import LayerDone
from .runner import ModelRunner
from .scheduler import ScheduledBatch
from .sequence import Sequence

if TYPE_CHECKING:  # the simulator's model is loaded only by a worker that runs on it
    from fleetwise.sim.perf import PerfModel


def parse_forward(spec: str) -> tuple[str, int]:
    """'llama2-70b:tp2' -> ('llama2-70b', 2); a clear error naming what is wrong."""
    from fleetwise.sim.perf import MODELS
    model, sep, tp = spec.partition(":")
    if model not in MODELS:
        raise ValueError(f"modelled_forward: the model must be one of {', '.join(MODELS)}; got {model!r}")
    if not sep or not tp.startswith("tp") or not tp[2:].isdigit() or int(tp[2:]) < 1:
        raise ValueError(f"modelled_forward: MODEL:tpN (e.g. llama2-70b:tp2); got {spec!r}")
    return model, int(tp[2:])


def step_seconds(perf: "PerfModel", batch: ScheduledBatch) -> float:
    """How long the batch's step takes on the modelled GPU."""
    prompt_tokens = decodes = 0
    context = attended = 0.0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if n == 1:  # one new token: a decode (the engine's rule), reading its whole context
            decodes += 1
            context += seq.num_computed_tokens + 1
        else:
            prompt_tokens += n
            attended += n * (seq.num_computed_tokens + n)
    if prompt_tokens:
        ms = perf.prompt_ms(prompt_tokens) + perf.hybrid_ms(decodes, context) + perf.attention_ms(attended)
    else:
        ms = perf.token_ms(decodes, context)
    return ms / 1e3


def modelled_token(seq: Sequence) -> int:
    """A prompt token picked by the sequence's length and last token (deterministic)."""
    prompt = seq.token_ids[:seq.num_prompt_tokens]
    first = 1 if len(prompt) > 1 else 0  # a leading BOS is not text
    h = (seq.num_tokens * 2654435761 + seq.token_ids[-1] * 40503) & 0xFFFFFFFF
    return prompt[first + h % (len(prompt) - first)]


class ModelledRunner(ModelRunner):
    """ModelRunner's interface without a model: `run` waits out the modelled step."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig):  # no super(): nothing to load
        if config.modelled_gpu is None or config.modelled_forward is None:
            raise ValueError("modelled_forward needs modelled_gpu (the product whose steps are modelled)")
        from fleetwise.sim.perf import perf_model
        model, tp = parse_forward(config.modelled_forward)
        self.perf = perf_model(config.modelled_gpu, model, tp)
        self.config, self.model_config = config, model_config
        self.device = torch.device("cpu")
        self.dtype = torch.float16
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks or self.perf.kv_capacity_tokens // config.block_size
        self._kv: list[torch.Tensor] | None = None
        self._kv_lock = threading.Lock()  # the first reader may be the HTTP side or the engine thread
        self.clock = None  # phases.attach may set it; a modelled step has no phases to time
        self.last_seconds = 0.0

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The loaded model's KV cache layout over the modelled cache's slots, made on first
        use: only a handoff (prefill, decode, migration) touches it, a mixed worker's steps never."""
        with self._kv_lock:
            if self._kv is None:
                mc, slots = self.model_config, self.num_blocks * self.block_size
                self._kv = [torch.zeros(2, slots, mc.num_key_value_heads, mc.head_dim, dtype=self.dtype)
                            for _ in range(mc.num_hidden_layers)]
            return self._kv

    @kv_caches.setter
    def kv_caches(self, caches: list[torch.Tensor]) -> None:
        with self._kv_lock:
            self._kv = caches

    def device_clock(self) -> DeviceClock:
        return ModelledClock(self)

    def run(self, batch: ScheduledBatch, layer_done: LayerDone | None = None
            ) -> tuple[list[int], SamplerOutput | None]:
        """The modelled step waited out; with `layer_done`, layer by layer (each an equal
        share of the step), telling it of each layer as a forward pass would."""
        t0 = time.perf_counter()
        self.last_seconds = step_seconds(self.perf, batch)
        due = t0 + self.last_seconds
        rows = [i for i, s in enumerate(batch.seqs)
                if s.num_computed_tokens + batch.num_new_tokens[i] >= s.num_tokens]
        tokens = [modelled_token(batch.seqs[i]) for i in rows]
        logprobs: list[TokenLogprob | None] = [
            None if batch.seqs[i].params.logprobs is None else (0.0, [(t, 0.0)]) for i, t in zip(rows, tokens)]
        if layer_done is not None:
            layers = self.model_config.num_hidden_layers
            for i in range(layers):  # against the step's start: no layer's oversleep adds up
                if (left := t0 + self.last_seconds * (i + 1) / layers - time.perf_counter()) > 0:
                    time.sleep(left)
                layer_done(i)
        elif (left := due - time.perf_counter()) > 0:
            time.sleep(left)
        return rows, SamplerOutput(tokens, logprobs) if rows else None


class ModelledClock(DeviceClock):
    """The modelled device's busy time: the modelled step's seconds, not the host's CPU time;
    `burn` (a slow switch) waits out the extra device time as the step itself does."""

    def __init__(self, runner: "ModelledRunner"):
        super().__init__(runner.device)
        self.runner = runner

    def start(self) -> None:
        self.runner.last_seconds = 0.0

    def stop(self) -> float:
        return self.runner.last_seconds

    def burn(self, seconds: float) -> float:
        if seconds <= 0:
            return 0.0
        time.sleep(seconds)
        return seconds


def make_runner(config: EngineConfig, model_config: ModelConfig) -> ModelRunner:
    """The model's runner, or the modelled device's when `modelled_forward` is set."""
    return (ModelledRunner if config.modelled_forward else ModelRunner)(config, model_config)
