"""The engine: requests in, one batched step at a time, token and text deltas out.

A KV connector (kv_hooks.py), when one is attached, may keep a finished request's blocks
for another worker; the engine itself knows nothing of leases or transfers.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetwise import gpus
from fleetwise.telemetry.modelled_gpu import ModelledGPU, kubernetes_labels

from ..metrics import WorkerMetrics
from ..model.llama import ModelConfig
from ..model.sampler import TokenLogprob
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .faults import FaultSwitches
from .kv_hooks import KVHooks
from .modelled_device import make_runner
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SamplingParams, Sequence, SequenceStatus
from .step_trace import firsts, makeup
from .step_trace import from_env as step_trace_from_env

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses; the message says why and names the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class RequestOutput:
    """What one choice of a request gained in one step."""
    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when asked
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    emitted: int = 0  # characters of detok.text already sent


class LLMEngine:
    def __init__(self, config: EngineConfig, metrics: WorkerMetrics | None = None):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.runner = make_runner(config, self.model_config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.metrics = metrics or WorkerMetrics(config.served_name)
        self.gpu = self._modelled_gpu(config)
        self.requests: dict[str, list[Sequence]] = {}
        self._text: dict[int, _TextState] = {}
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.fault_hook: Callable[[ScheduledBatch], None] | None = None  # tests': before each forward
        self.switches: FaultSwitches | None = None  # drills' switches (faults.py); None: off
        self.clock = self.runner.device_clock()  # the forward's device seconds (device_clock.py)
        self.last_step_seconds = self.last_step_forward_seconds = 0.0
        self.failed_steps = 0  # in a row: steps in which every sequence failed
        self.last_step_error: str | None = None
        self.kv_connector: KVHooks | None = None  # attached by whoever builds a worker
        self.step_trace = step_trace_from_env()  # every step to a file (FLEETWISE_STEP_TRACE); None: off

    # -- requests ---------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{n + params.max_tokens} were requested ({n} in the prompt, {params.max_tokens} "
                "for the completion); shorten the prompt or lower max_tokens", "max_tokens")
        blocks = self.block_manager.blocks_needed(n + params.max_tokens)
        if blocks > self.block_manager.num_blocks:
            raise RequestError(f"the request needs {blocks} KV cache blocks but this worker has "
                               f"{self.block_manager.num_blocks}; lower max_tokens", "max_tokens")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise RequestError(f"logprobs must be at most {self.config.max_logprobs} (this worker's "
                               "max_logprobs)", "logprobs")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"stop token id {bad} is outside the vocabulary", "stop_token_ids")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False) -> None:
        """`hold_kv`: a prefill; when it has its first token, the KV connector keeps its
        blocks (the request id is the handle) for a decode worker to pull."""
        if hold_kv and params.n != 1:
            raise RequestError("a prefill handoff takes n=1", "n")
        if hold_kv and self.kv_connector is None:
            raise RequestError("this engine has no KV connector to hold a prefill's blocks")
        seqs = self._new_request(request_id, prompt_token_ids, params)
        for seq in seqs:
            seq.hold_kv = hold_kv
            self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Sequence]:
        held = self.kv_connector is not None and self.kv_connector.holds(request_id)
        if request_id in self.requests or held:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(prompt_token_ids, params, request_id, i, parent=seqs[0] if seqs else None)
            detok = IncrementalDetokenizer(self.tokenizer)
            detok.start(prompt_token_ids)
            self._text[seq.seq_id] = _TextState(detok)
            seqs.append(seq)
        return seqs

    # -- a request whose prompt another worker computed (the decode side of a handoff) ------

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                      params: SamplingParams, first_logprob: TokenLogprob | None = None) -> Sequence | None:
        """Takes a request whose prompt and first token were computed elsewhere and sets
        blocks aside for its prompt, reusing what the prefix cache holds. Returns the
        sequence, whose prompt's keys and values are due from `num_computed_tokens` on, or
        None when there are no blocks to spare. Either way the request waits, RESERVED,
        for activate_prefilled."""
        if params.n != 1:
            raise RequestError("a decode handoff takes n=1", "n")
        [seq] = self._new_request(request_id, prompt_token_ids, params)
        seq.append_token(first_token)
        if first_logprob is not None:
            seq.output_logprobs.append(first_logprob)
        seq.skip_draws = 1  # the prefill worker made the first draw of a seeded request
        seq.status = SequenceStatus.RESERVED
        self.requests[request_id] = [seq]
        return self.allocate_reserved(request_id)

    def allocate_reserved(self, request_id: str) -> Sequence | None:
        """Blocks for a RESERVED request's prompt (add_prefilled's; again, when there were
        none), reusing the prefix cache. None: none to spare, or no such request waits."""
        seqs = self.requests.get(request_id)
        if not seqs or seqs[0].status != SequenceStatus.RESERVED:
            return None
        seq, bm = seqs[0], self.block_manager
        if seq.block_table:
            return seq
        computed = bm.get_computed_blocks(seq)
        num_new = seq.num_prompt_tokens - len(computed) * bm.block_size
        if not bm.can_allocate(seq, num_new, computed, self.scheduler.watermark):
            return None
        bm.allocate(seq, num_new, computed)
        return seq

    def activate_prefilled(self, request_id: str, received: bool) -> list[RequestOutput]:
        """The reserved prompt's keys and values are in place (`received`) and it joins the
        running batch, or they are not and it queues to be recomputed. Emits the first token."""
        seqs = self.requests.get(request_id)
        if not seqs or seqs[0].status != SequenceStatus.RESERVED:
            return []  # aborted meanwhile
        seq = seqs[0]
        self.scheduler.activate(seq, seq.num_prompt_tokens if received else None)
        seq.first_token_time = seq.last_token_time = time.monotonic()
        lp = seq.output_logprobs[0] if seq.output_logprobs else None
        return [self._emit(seq, seq.last_token, lp)]

    def abort_request(self, request_id: str) -> None:
        for seq in list(self.requests.get(request_id, [])):
            if not seq.is_finished:
                self._finish(seq, "abort")
        self.requests.pop(request_id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the step ---------------------------------------------------------------------

    def _modelled_gpu(self, config: EngineConfig) -> ModelledGPU | None:
        if config.modelled_gpu is None:
            return None
        if self.runner.device.type == "cuda":
            raise ValueError("modelled_gpu is for a worker without a GPU: on a GPU the DCGM exporter reports it")
        gpu = ModelledGPU(gpus.product(config.modelled_gpu), extra_labels=kubernetes_labels())
        self.metrics.registry.register(gpu)
        return gpu

    def _as_the_modelled_gpu(self, batch: ScheduledBatch, forward: float) -> None:
        """The step as the modelled GPU draws it; a cap's stretch is waited out, as on a GPU."""
        assert self.gpu is not None
        decodes = sum(1 for n in batch.num_new_tokens if n == 1)  # one new token: a decode
        factor = self.gpu.step(batch.num_tokens - decodes, decodes, forward)
        if factor > 1:
            time.sleep(forward * (factor - 1))

    def step(self) -> list[RequestOutput]:
        if self.switches is not None:
            self.switches.hold_stall()
        t0, cpu0 = time.perf_counter(), time.thread_time() if self.step_trace is not None else 0.0
        bm = self.block_manager
        q0, h0 = bm.prefix_queries, bm.prefix_hits
        batch = self.scheduler.schedule()
        made, first = (makeup(batch), firsts(batch)) if self.step_trace is not None else ((0, 0, 0, 0), [])
        outputs: list[RequestOutput] = []
        forward = device = 0.0
        if batch:
            t1, error = time.perf_counter(), None
            try:
                if self.fault_hook:
                    self.fault_hook(batch)
                layer_done = self.kv_connector.step_started(batch) if self.kv_connector is not None else None
                self.clock.start()
                rows, sampled = self.runner.run(batch, layer_done)
                device = self.clock.stop()
                if self.switches is not None:  # a slow GPU: the forward pass itself takes longer
                    device += self.switches.after_forward(device, self.clock)
                forward = time.perf_counter() - t1
                if self.gpu is not None:
                    self._as_the_modelled_gpu(batch, forward)
                self.scheduler.update_computed(batch)
                outputs = self._process(batch, rows, sampled)
            except Exception:
                log.exception("a step of %d sequences failed; running them one by one", len(batch.seqs))
                if self.kv_connector is not None:  # streams of what the step was writing break
                    self.kv_connector.step_failed(batch)
                outputs, error = self._run_isolated(batch)
            self.failed_steps = self.failed_steps + 1 if error else 0
            self.last_step_error = error or self.last_step_error
        if bm.prefix_queries != q0:
            self.metrics.on_admit(bm.prefix_queries - q0, bm.prefix_hits - h0)
        self.last_step_seconds, self.last_step_forward_seconds = time.perf_counter() - t0, forward
        used = bm.num_blocks - bm.num_free_blocks
        self.metrics.on_step(self.last_step_seconds, forward, device, batch.num_tokens, len(batch.seqs),
                             self.num_running, self.num_waiting, used, bm.num_free_blocks, len(batch.preempted))
        if self.step_trace is not None and batch:
            self.step_trace.record(t0, self.last_step_seconds, time.thread_time() - cpu0, made,
                                   self.num_running + self.num_waiting, first)
        return outputs

    def _run_isolated(self, batch: ScheduledBatch) -> tuple[list[RequestOutput], str | None]:
        """A failed batch is retried one sequence at a time; only a sequence that fails on its
        own is failed. Nothing advanced in the failed attempt, so the retry is exact. Returns
        the outputs and, when every sequence failed, the last error."""
        outputs = []
        error, advanced = None, False
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:
                continue
            single = ScheduledBatch([seq], [n])
            try:
                if self.fault_hook:
                    self.fault_hook(single)
                rows, sampled = self.runner.run(single)
                self.scheduler.update_computed(single)
                outputs.extend(self._process(single, rows, sampled))
                advanced = True
            except Exception as exc:
                log.exception("request %s failed in the engine", seq.request_id)
                error = f"{type(exc).__name__}: {exc}"
                outputs.append(self._finish(seq, "error", error=error))
        return outputs, None if advanced else error

    def _process(self, batch: ScheduledBatch, rows: list[int], sampled) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for j, i in enumerate(rows):
            seq = batch.seqs[i]
            token = sampled.token_ids[j]
            seq.append_token(token)
            lp = sampled.logprobs[j]
            if lp is not None:
                seq.output_logprobs.append(lp)
            if seq.last_token_time is None:  # the first token: both times are set together
                seq.first_token_time = now
                self.metrics.on_first_token(now - seq.arrival_time)
            else:
                self.metrics.on_token(now - seq.last_token_time)
            seq.last_token_time = now
            outputs.append(self._emit(seq, token, lp))
        return outputs

    def _emit(self, seq: Sequence, token: int, logprob) -> RequestOutput:
        text, reason = self._text_step(seq, token)
        out = RequestOutput(seq.request_id, seq.index, [token], text,
                            [logprob] if logprob is not None else [],
                            num_prompt_tokens=seq.num_prompt_tokens,
                            num_output_tokens=seq.num_output_tokens,
                            num_cached_tokens=seq.num_cached_tokens)
        if reason is not None:
            self._finish(seq, reason, out)
        return out

    def _text_step(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        """The text `token` (just appended) makes ready to send, and why the sequence ends
        with it (None: it goes on)."""
        p = seq.params
        state = self._text[seq.seq_id]
        reason = None
        ids = seq.token_ids
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            reason = "stop"
            ids = ids[:-1]  # the stop token's text is not part of the output
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        state.detok.step(ids)
        if reason is not None:
            state.detok.flush(ids)
        text = state.detok.text
        if p.stop:
            hit = _find_stop(text, p.stop, state.emitted)
            if hit is not None:
                text = state.detok.text = text[:hit]
                reason = "stop"
        if reason is None and p.stop:
            # hold back what could still become a stop string
            ready = max(state.emitted, len(text) - (max(len(s) for s in p.stop) - 1))
        else:
            ready = len(text)
        new, state.emitted = text[state.emitted:ready], ready
        return new, reason

    def _finish(self, seq: Sequence, reason: str, out: RequestOutput | None = None,
                error: str | None = None) -> RequestOutput:
        if not seq.is_finished:
            held = self.kv_connector is not None and self.kv_connector.request_finished(seq, reason)
            self.scheduler.finish(seq, reason, free=not held)
        out = out or RequestOutput(seq.request_id, seq.index, num_prompt_tokens=seq.num_prompt_tokens,
                                   num_output_tokens=seq.num_output_tokens)
        out.finished, out.finish_reason, out.error = True, reason, error
        self.metrics.on_finish(reason, time.monotonic() - seq.arrival_time, seq.num_prompt_tokens,
                               seq.num_output_tokens)
        seqs = self.requests.get(seq.request_id, [])
        self._text.pop(seq.seq_id, None)
        if all(s.is_finished for s in seqs):
            self.requests.pop(seq.request_id, None)
        return out


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Earliest position of a stop string that ends after what was already sent."""
    start = max(0, emitted - max(len(s) for s in stops))
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None
