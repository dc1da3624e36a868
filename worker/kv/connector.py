"""The engine's KV connector: keeps a finished prefill's blocks for a decode worker to pull
(prefill side) and fills blocks reserved for a prompt computed elsewhere (decode side).

The engine sees it only through engine/kv_hooks.py (a finished request, an id in use, the
loop's round, a step about to run and its layers); the handoff routes (api/handoff.py) call
the rest. On the prefill side the blocks stay under a lease, named by the request id,
until the decode worker releases it or it expires; on the decode side the engine takes the
request (add_prefilled), the pulled keys and values are written into its blocks, and the
engine activates it.

Leases are capped (`max_kv_leases`, and `max_kv_lease_fraction` of the blocks): a flood of
prefills that nobody pulls must not take the blocks this worker's own traffic needs. A
prefill is admitted against the caps before it runs (`admit_lease`): the leases held now
must leave room for one more, and their blocks with those of the prefills admitted but not
yet answered (pending) for its own. Pending prefills do not count against the number of
leases: most are pulled as soon as they are answered, and counting them would bound the
prefill queue instead of the leases.

A lease on a CPU cache has its checksums taken in a thread as soon as it is made
(slots.py's HeldChecksums), while its answer travels to the decode worker: a stream of it
from a block boundary then sends them instead of reading every byte on the pull's path.

Threads: the lease methods called by the engine (request_finished, expire, release_kv)
run on the engine thread, the readers of a lease (open_kv, close_kv and the gathers) on
the HTTP side, hence the lease lock; reserve_kv, retry_reserve, activate_kv: engine thread.
"""

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..engine.engine import LLMEngine, RequestOutput
from ..engine.kv_hooks import LayerDone
from ..engine.scheduler import ScheduledBatch
from ..engine.sequence import SamplingParams, Sequence, SequenceStatus
from ..model.files import model_id
from ..model.sampler import TokenLogprob
from .early import EarlyPrefill, first_token, recorded, segments
from .receive import KVSink
from .slots import CacheSink, HeldChecksums, KVLayers, StagingSink, taken_crcs
from .transfer import DTYPE_NAMES, KVHeader, LayerSource, crc32_combine

# a held prompt's checksums are taken here, off the engine and the event loop (the CRC releases the GIL)
_checksums = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-crc")


@dataclass
class KVLease:
    """A finished prefill's blocks, kept for a decode worker until it pulls them or time runs out."""
    seq: Sequence
    deadline: float
    readers: int = 0
    released: bool = False  # by the decode worker (else it expired)
    checksums: "concurrent.futures.Future[HeldChecksums] | None" = None  # taken while the answer travels


@dataclass
class KVReservation:
    """Blocks a decode worker set aside for a prompt computed elsewhere: the tokens from
    `start` on arrive from the prefill worker (those before are in its own prefix cache)."""
    request_id: str
    start: int          # a multiple of the block size
    num_tokens: int
    blocks: torch.Tensor  # the blocks that hold tokens start .. start + num_tokens - 1


class KVConnector:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.model_id = model_id(engine.config.model)
        self.lease_seconds = engine.config.kv_lease_seconds
        self.leases: dict[str, KVLease] = {}
        self._lease_lock = threading.Lock()  # readers of a lease run on the HTTP side
        config = engine.config
        self.max_leases = config.max_kv_leases
        self.max_lease_blocks = max(1, int(engine.block_manager.num_blocks * config.max_kv_lease_fraction))
        self.pending_leases = self.pending_blocks = 0  # admitted prefills whose answer is not out yet
        self.early: dict[str, EarlyPrefill] = {}  # prefills whose KV may stream while they compute (early.py)

    def header(self, start: int, num_tokens: int) -> KVHeader:
        """The stream header of this worker's model and cache layout for a token range."""
        mc, dtype = self.engine.model_config, self.engine.runner.dtype
        return KVHeader(self.model_id, DTYPE_NAMES[dtype], mc.num_hidden_layers,
                        mc.num_key_value_heads, mc.head_dim, start, num_tokens)

    # -- the engine's hooks (kv_hooks.py) -----------------------------------------------------

    def request_finished(self, seq: Sequence, reason: str) -> bool:
        """A prefill that ended on its one token (not on a stop) goes under a lease."""
        early = self.early.get(seq.request_id)
        if early is not None and not early.done:
            self._publish(early, seq, reason)
        if not (seq.hold_kv and reason == "length"):
            return False
        lease = KVLease(seq, time.monotonic() + self.lease_seconds)
        caches = self.engine.runner.kv_caches
        if crc32_combine is not None and caches[0].device.type == "cpu":  # a GPU worker gathers its layers instead
            bs, n = self.engine.block_manager.block_size, seq.num_prompt_tokens
            lease.checksums = _checksums.submit(HeldChecksums, caches, bs, seq.block_table[:-(-n // bs)], n)
        with self._lease_lock:
            self.leases[seq.request_id] = lease
            held = len(self.leases)
        self.engine.metrics.on_leases(held, 0)
        return True

    def holds(self, request_id: str) -> bool:
        return request_id in self.leases

    def expire(self) -> None:
        if self.early:
            self._round_early()
        if not self.leases:
            return
        now = time.monotonic()
        with self._lease_lock:
            expired = [h for h, lease in self.leases.items() if lease.deadline <= now and lease.readers == 0]
            gone = [self.leases.pop(h) for h in expired]
            held = len(self.leases)
        for lease in gone:
            if lease.checksums is not None:
                lease.checksums.cancel()  # not taken yet: no longer wanted
            self.engine.block_manager.free(lease.seq)
        if gone:
            self.engine.metrics.on_leases(held, sum(not lease.released for lease in gone))

    # -- prefill side: leases on finished prompts -----------------------------------------------

    def lease_room(self, num_blocks: int = 0) -> str | None:
        """Why the caps do not let a prefill that will hold `num_blocks` run now, or None."""
        with self._lease_lock:
            return self._no_room(num_blocks)

    def _no_room(self, num_blocks: int) -> str | None:
        leases = len(self.leases)
        blocks = sum(len(lease.seq.block_table) for lease in self.leases.values()) + self.pending_blocks
        if leases + 1 > self.max_leases:
            return f"this worker holds {leases} KV leases, its most ({self.max_leases})"
        if blocks + max(1, num_blocks) > self.max_lease_blocks:
            return (f"KV leases hold {blocks} blocks; {max(1, num_blocks)} more would pass this worker's cap "
                    f"of {self.max_lease_blocks}")
        return None

    def admit_lease(self, num_blocks: int) -> str | None:
        """Counts a prefill that will hold `num_blocks` under a lease as pending, or says
        why the caps do not let it run now. Pairs with `end_admission`."""
        with self._lease_lock:
            full = self._no_room(num_blocks)
            if full is None:
                self.pending_leases += 1
                self.pending_blocks += num_blocks
        return full

    def end_admission(self, num_blocks: int) -> None:
        """The admitted prefill is answered: its lease, if any, now counts as one."""
        with self._lease_lock:
            self.pending_leases -= 1
            self.pending_blocks -= num_blocks

    def open_kv(self, handle: str, start: int = 0) -> tuple[KVHeader, KVLayers]:
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
        header = self.header(start, seq.num_prompt_tokens - start)
        bs = self.engine.block_manager.block_size
        first, lo = divmod(start, bs)
        blocks = seq.block_table[first:-(-seq.num_prompt_tokens // bs)]
        return header, KVLayers(self.engine.runner.kv_caches, bs, blocks, lo, seq.num_prompt_tokens - first * bs,
                                None if lo else taken_crcs(lease.checksums, first))

    def close_kv(self, handle: str) -> None:
        """Pairs with open_kv, whether the reader finished or not."""
        with self._lease_lock:
            lease = self.leases.get(handle)
            if lease is not None:
                lease.readers -= 1

    def release_kv(self, handle: str) -> bool:
        """The decode worker has the blocks (or gave up): free them now, or once the last reader is done."""
        with self._lease_lock:
            early = self.early.get(handle)
            if early is not None:  # let go once done and unread
                early.deadline = 0.0
            lease = self.leases.get(handle)
            if lease is None:
                return early is not None
            lease.deadline = 0.0
            lease.released = True
        self.expire()
        return True

    # -- prefill side: a prompt's KV streamed while it is computed (early.py) ---------------------

    def expect_early(self, handle: str, num_prompt_tokens: int) -> None:
        """Before the prefill `handle` is submitted: its KV may be streamed while it computes."""
        with self._lease_lock:
            self.early[handle] = EarlyPrefill(handle, num_prompt_tokens, float("inf"))

    def drop_early(self, handle: str) -> None:
        """An early prefill that was never submitted (nothing of it is pinned)."""
        with self._lease_lock:
            self.early.pop(handle, None)

    def _round_early(self) -> None:
        """The engine thread, each round: every early prefill's progress published, its blocks
        pinned; those done, unread and released (or past their time) let go."""
        now = time.monotonic()
        with self._lease_lock:
            items = list(self.early.items())
        for handle, early in items:
            if early.done:
                with self._lease_lock:  # with the check: a stream opened meanwhile keeps it
                    gone = early.readers == 0 and early.deadline <= now and self.early.pop(handle, None) is not None
                if gone and early.pin is not None:
                    self.engine.block_manager.free(early.pin)
                continue
            seqs = self.engine.requests.get(handle)
            if seqs:
                early.seen = True
                self._publish(early, seqs[0], None)
            elif early.seen or now - early.created > self.lease_seconds:  # gone, or never came: it never ran
                early.break_off("ended")

    def _publish(self, early: EarlyPrefill, seq: Sequence, reason: str | None) -> None:
        """`seq`'s progress into `early`, its new blocks pinned; `reason`: it has just finished."""
        computed = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        first, broken = None, None
        if reason is None:  # still running
            if computed < early.progress.computed:  # preempted: its blocks went back (the pins keep them)
                early.break_off("was preempted")
                return
            if computed == early.progress.computed:
                return
        else:
            early.deadline = min(early.deadline, time.monotonic() + self.lease_seconds)
            if computed == seq.num_prompt_tokens and seq.num_output_tokens:
                first = {"first_token": seq.output_token_ids[0], "finish_reason": reason,
                         "first_logprob": seq.output_logprobs[0] if seq.output_logprobs else None}
            else:
                broken = f"ended ({reason}) before its prompt was computed"
        blocks = seq.block_table[:-(-computed // self.engine.block_manager.block_size)]
        early.hold(self.engine.block_manager, blocks)
        early.publish(computed, blocks, first, broken, recorded(self.engine.runner.device))

    def step_started(self, batch: ScheduledBatch) -> LayerDone | None:
        """Before a step (the engine thread): each early prefill in `batch` publishes the
        tokens the step computes and pins their blocks; the callback then tells them of each
        layer written (with a CUDA event per layer on a GPU, whose host only queued it)."""
        if not self.early:
            return None
        bs = self.engine.block_manager.block_size
        steps = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            early = self.early.get(seq.request_id)
            if early is None or early.done or seq.num_computed_tokens >= seq.num_prompt_tokens:
                continue
            pinned = early.pin.block_table if early.pin is not None else []
            if seq.block_table[:len(pinned)] != pinned:  # preempted and started again in other blocks
                early.break_off("was preempted")
                continue
            scheduled = min(seq.num_computed_tokens + n, seq.num_prompt_tokens)
            blocks = seq.block_table[:-(-scheduled // bs)]
            early.hold(self.engine.block_manager, blocks)
            early.begin_step(scheduled, blocks)
            steps.append(early)
        if not steps:
            return None

        def layer_done(layer: int) -> None:
            event = recorded(self.engine.runner.device)
            for early in steps:
                early.layer_done(layer, event)
        return layer_done

    def step_failed(self, batch: ScheduledBatch) -> None:
        """The step of `batch` failed: the layers it wrote will be written again (engine.py
        runs its sequences one by one), perhaps while a stream reads them, so the streams of
        its early prefills that were in flight break (the decode side recomputes)."""
        for seq in batch.seqs:
            early = self.early.get(seq.request_id)
            if early is not None and not early.done and early.progress.scheduled > early.progress.computed:
                early.break_off("was in a step that failed while its KV streamed")

    def open_segments(self, handle: str, start: int, segment_tokens: int
                      ) -> tuple[KVHeader, Iterator[tuple[int, int, LayerSource]], Callable[[], dict]]:
        """An early prefill's keys and values from token `start` on, in segments as they are
        computed, and its first token (kv/transfer.py's encode_segments). Pairs with close_early."""
        with self._lease_lock:
            early = self.early.get(handle)
            if early is None:
                raise KeyError(handle)
            if not 0 <= start <= early.num_prompt_tokens:
                raise ValueError(f"start must be within the prompt (0..{early.num_prompt_tokens})")
            early.readers += 1
        header = self.header(start, early.num_prompt_tokens - start)
        runner, bs = self.engine.runner, self.engine.block_manager.block_size
        return header, segments(early, runner.kv_caches, bs, start, segment_tokens), lambda: first_token(early)

    def close_early(self, handle: str) -> None:
        with self._lease_lock:
            early = self.early.get(handle)
            if early is not None:
                early.readers -= 1

    # -- decode side: a prompt computed elsewhere -------------------------------------------------

    def reserve_kv(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                   params: SamplingParams, first_logprob: TokenLogprob | None = None) -> KVReservation | None:
        """Takes a request whose prompt was computed elsewhere. Returns the slots to fill,
        or None when there are no blocks to spare (the prompt is then recomputed here)."""
        return self._reservation(self.engine.add_prefilled(request_id, prompt_token_ids, first_token, params,
                                                           first_logprob))

    def retry_reserve(self, request_id: str) -> KVReservation | None:
        """Another try for a request reserve_kv found no blocks for (decodes end, theirs free)."""
        return self._reservation(self.engine.allocate_reserved(request_id))

    def _reservation(self, seq: Sequence | None) -> KVReservation | None:
        if seq is None:
            return None
        first = seq.num_computed_tokens // self.engine.block_manager.block_size
        blocks = torch.tensor(seq.block_table[first:], dtype=torch.long, device=self.engine.runner.device)
        return KVReservation(seq.request_id, seq.num_computed_tokens, seq.num_prompt_tokens - seq.num_computed_tokens,
                             blocks)

    def write_kv(self, res: KVReservation, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Received keys and values of one layer into the reserved blocks: whole blocks in
        one copy, the last partial block token by token. Only the receiving request owns
        these blocks, so this may run outside the engine thread."""
        bs = self.engine.block_manager.block_size
        cache = self.engine.runner.kv_caches[layer]
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

    def kv_sink(self, res: KVReservation) -> "KVSink":
        """Where a pull puts the reservation's keys and values: on a CPU worker straight
        into the reserved blocks (their slots are contiguous within a block, and runs of
        consecutive blocks are taken as one piece), elsewhere through a staging buffer and
        write_kv."""
        cache = self.engine.runner.kv_caches[0]
        if cache.device.type != "cpu":
            return StagingSink(self.header(res.start, res.num_tokens),
                               lambda layer, k, v: self.write_kv(res, layer, k, v))
        return CacheSink(self.engine.runner.kv_caches, self.engine.block_manager.block_size, res.blocks.tolist(),
                         res.num_tokens)

    def activate_early(self, request_id: str, first: dict | None) -> list[RequestOutput]:
        """A request reserved with a stand-in first token (an early prefill's, which came at
        the end of its stream): with `first` it runs on from the pulled KV and that token;
        without (the pull failed), it computes its prompt and first token here."""
        seqs = self.engine.requests.get(request_id)
        if not seqs or seqs[0].status != SequenceStatus.RESERVED:
            return []  # aborted meanwhile
        seq = seqs[0]
        if first is not None:
            seq.token_ids[-1] = first["first_token"]
            seq.output_logprobs = [first["first_logprob"]] if first.get("first_logprob") is not None else []
            return self.engine.activate_prefilled(request_id, True)
        seq.token_ids.pop()  # the stand-in: the first token is sampled here
        seq.output_logprobs, seq.skip_draws = [], 0
        self.engine.scheduler.activate(seq, None)
        return []

    def activate_kv(self, request_id: str, received: bool) -> list[RequestOutput]:
        """The reserved request joins the running batch (`received`) or queues to be recomputed."""
        return self.engine.activate_prefilled(request_id, received)
