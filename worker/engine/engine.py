"""The engine: requests in, one batched step at a time, token and text deltas out."""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from ..kv.transfer import DTYPE_NAMES, KVHeader
from ..model.files import model_id
from ..model.llama import ModelConfig
from ..metrics import WorkerMetrics
from .runner import ModelRunner
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SamplingParams, Sequence, SequenceStatus
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer

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
    logprobs: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...])
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class KVLease:
    """A finished prefill's blocks, kept for a decode worker until it pulls them or time runs out."""
    seq: Sequence
    deadline: float
    readers: int = 0
    released: bool = False  # by the decode worker (else it expired)


@dataclass
class KVReservation:
    """Blocks a decode worker set aside for a prompt computed elsewhere: the tokens from
    `start` on arrive from the prefill worker (those before are in its own prefix cache)."""
    request_id: str
    start: int          # a multiple of the block size
    num_tokens: int
    blocks: torch.Tensor  # the blocks that hold tokens start .. start + num_tokens - 1


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
        self.runner = ModelRunner(config, self.model_config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.metrics = metrics or WorkerMetrics(config.served_model_name)
        self.requests: dict[str, list[Sequence]] = {}
        self._text: dict[int, _TextState] = {}
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        # test-only fault switch: called with each batch before the forward pass
        self.fault_hook: Callable[[ScheduledBatch], None] | None = None
        self.last_step_forward_seconds = 0.0
        self.last_step_seconds = 0.0
        self.model_id = model_id(config.model)
        self.leases: dict[str, KVLease] = {}
        self._lease_lock = threading.Lock()  # readers of a lease run on the HTTP side

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
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"stop token id {bad} is outside the vocabulary", "stop_token_ids")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False) -> None:
        """`hold_kv`: a prefill; when it has its first token, its blocks stay under a lease
        (the request id is the handle) for a decode worker to pull."""
        if hold_kv and params.n != 1:
            raise RequestError("a prefill handoff takes n=1", "n")
        seqs = self._new_request(request_id, prompt_token_ids, params)
        for seq in seqs:
            seq.hold_kv = hold_kv
            self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Sequence]:
        if request_id in self.requests or request_id in self.leases:
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

    # -- prefill side of a handoff: leases on finished prompts ---------------------------

    def open_kv(self, handle: str, start: int = 0) -> tuple[KVHeader, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Keys and values of a held prompt from token `start` on, layer by layer. Safe to
        call from another thread: the lease cannot expire while it is being read."""
        with self._lease_lock:
            lease = self.leases.get(handle)
            if lease is None:
                raise KeyError(handle)
            seq = lease.seq
            if lease.released:
                raise KeyError(handle)
            if not 0 <= start <= seq.num_prompt_tokens:
                raise ValueError(f"start must be within the prompt (0..{seq.num_prompt_tokens})")
            lease.readers += 1
        mc = self.model_config
        header = KVHeader(self.model_id, DTYPE_NAMES[self.runner.dtype], mc.num_hidden_layers,
                          mc.num_key_value_heads, mc.head_dim, start, seq.num_prompt_tokens - start)
        bs = self.block_manager.block_size
        first = start // bs
        blocks = torch.tensor(seq.block_table[first:-(-seq.num_prompt_tokens // bs)], device=self.runner.device)
        lo, hi = start - first * bs, seq.num_prompt_tokens - first * bs

        def layers():  # whole blocks at a time: one gather per layer and kind
            for cache in self.runner.kv_caches:
                k = cache[0].view(-1, bs, *cache.shape[2:]).index_select(0, blocks)
                v = cache[1].view(-1, bs, *cache.shape[2:]).index_select(0, blocks)
                yield k.flatten(0, 1)[lo:hi], v.flatten(0, 1)[lo:hi]
        return header, layers()

    def close_kv(self, handle: str) -> None:
        """Pairs with open_kv, whether the reader finished or not."""
        with self._lease_lock:
            lease = self.leases.get(handle)
            if lease is not None:
                lease.readers -= 1

    def release_kv(self, handle: str) -> bool:
        """The decode worker has the blocks (or gave up): free them now, or once the last reader is done."""
        with self._lease_lock:
            lease = self.leases.get(handle)
            if lease is None:
                return False
            lease.deadline = 0.0
            lease.released = True
        self.expire_leases()
        return True

    def expire_leases(self) -> list[str]:
        now = time.monotonic()
        with self._lease_lock:
            expired = [h for h, lease in self.leases.items() if lease.deadline <= now and lease.readers == 0]
            gone = [self.leases.pop(h) for h in expired]
            held = len(self.leases)
        for lease in gone:
            self.block_manager.free(lease.seq)
        if gone:
            self.metrics.on_leases(held, sum(not lease.released for lease in gone))
        return expired

    # -- decode side of a handoff -----------------------------------------------------------

    def reserve_kv(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                   params: SamplingParams, first_logprob=None) -> KVReservation | None:
        """Takes a request whose prompt was computed elsewhere. Returns the slots to fill,
        or None when there are no blocks to spare (the prompt is then recomputed here)."""
        if params.n != 1:
            raise RequestError("a decode handoff takes n=1", "n")
        [seq] = self._new_request(request_id, prompt_token_ids, params)
        seq.append_token(first_token)
        if first_logprob is not None:
            seq.output_logprobs.append(first_logprob)
        seq.skip_draws = 1  # the prefill worker made the first draw of a seeded request
        seq.status = SequenceStatus.RESERVED
        self.requests[request_id] = [seq]
        bm = self.block_manager
        computed = bm.get_computed_blocks(seq)
        n = len(prompt_token_ids)
        num_new = n - len(computed) * bm.block_size
        if not bm.can_allocate(seq, num_new, computed, self.scheduler.watermark):
            return None
        bm.allocate(seq, num_new, computed)
        first = seq.num_computed_tokens // bm.block_size
        blocks = torch.tensor(seq.block_table[first:], dtype=torch.long, device=self.runner.device)
        return KVReservation(request_id, seq.num_computed_tokens, num_new, blocks)

    def write_kv(self, res: KVReservation, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Received keys and values of one layer into the reserved blocks: whole blocks in
        one copy, the last partial block token by token. Only the receiving request owns
        these blocks, so this may run outside the engine thread."""
        bs = self.block_manager.block_size
        cache = self.runner.kv_caches[layer]
        full = res.num_tokens // bs
        for i, src in enumerate((k, v)):
            src = src.to(cache.device, cache.dtype)
            if full:
                cache[i].view(-1, bs, *cache.shape[2:]).index_copy_(
                    0, res.blocks[:full], src[:full * bs].view(full, bs, *cache.shape[2:]))
            tail = res.num_tokens - full * bs
            if tail:
                slots = res.blocks[full] * bs + torch.arange(tail, device=cache.device)
                cache[i].index_copy_(0, slots, src[full * bs:])

    def activate_kv(self, request_id: str, received: bool) -> list[RequestOutput]:
        """The reserved prompt's keys and values are in place (`received`) and it joins the
        running batch, or they are not and it queues to be recomputed. Emits the first token."""
        seqs = self.requests.get(request_id)
        if not seqs or seqs[0].status != SequenceStatus.RESERVED:
            return []  # aborted meanwhile
        seq = seqs[0]
        if received:
            seq.num_computed_tokens = seq.num_prompt_tokens
            self.block_manager.cache_full_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            self.scheduler.running.append(seq)
        else:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            self.scheduler.add(seq)
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

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        bm = self.block_manager
        q0, h0 = bm.prefix_queries, bm.prefix_hits
        batch = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        forward = 0.0
        if batch:
            t1 = time.perf_counter()
            try:
                if self.fault_hook:
                    self.fault_hook(batch)
                rows, sampled = self.runner.run(batch)
                forward = time.perf_counter() - t1
                self.scheduler.update_computed(batch)
                outputs = self._process(batch, rows, sampled)
            except Exception:
                log.exception("a step of %d sequences failed; running them one by one", len(batch.seqs))
                outputs = self._run_isolated(batch)
        if bm.prefix_queries != q0:
            self.metrics.on_admit(bm.prefix_queries - q0, bm.prefix_hits - h0)
        self.last_step_seconds = time.perf_counter() - t0
        self.last_step_forward_seconds = forward
        used = bm.num_blocks - bm.num_free_blocks
        self.metrics.on_step(self.last_step_seconds, forward, batch.num_tokens, len(batch.seqs),
                             self.num_running, self.num_waiting, used, bm.num_free_blocks,
                             len(batch.preempted))
        return outputs

    def _run_isolated(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """A failed batch is retried one sequence at a time; only a sequence that fails on its
        own is failed. Nothing advanced in the failed attempt, so the retry is exact."""
        outputs = []
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
            except Exception as exc:
                log.exception("request %s failed in the engine", seq.request_id)
                outputs.append(self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}"))
        return outputs

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
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.metrics.on_first_token(now - seq.arrival_time)
            else:
                self.metrics.on_token(now - seq.last_token_time)
            seq.last_token_time = now
            outputs.append(self._emit(seq, token, lp))
        return outputs

    def _emit(self, seq: Sequence, token: int, logprob) -> RequestOutput:
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
        out = RequestOutput(seq.request_id, seq.index, [token], text[state.emitted:ready],
                            [logprob] if logprob is not None else [],
                            num_prompt_tokens=seq.num_prompt_tokens,
                            num_output_tokens=seq.num_output_tokens,
                            num_cached_tokens=seq.num_cached_tokens)
        state.emitted = ready
        if reason is not None:
            self._finish(seq, reason, out)
        return out

    def _finish(self, seq: Sequence, reason: str, out: RequestOutput | None = None,
                error: str | None = None) -> RequestOutput:
        if not seq.is_finished:
            hold = seq.hold_kv and reason == "length"
            self.scheduler.finish(seq, reason, free=not hold)
            if hold:
                with self._lease_lock:
                    self.leases[seq.request_id] = KVLease(seq, time.monotonic() + self.config.kv_lease_seconds)
                    held = len(self.leases)
                self.metrics.on_leases(held, 0)
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
