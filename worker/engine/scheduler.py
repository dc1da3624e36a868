"""Continuous batching with one token budget per step.

Every sequence has `num_computed_tokens` catching up with `num_tokens`: a decode computes
one token, a prompt computes as many as the budget allows (chunked prefill), and a prompt
whose prefix is cached starts with those tokens already computed. Running sequences go
first, oldest first; when blocks run out the newest running sequence is preempted (its
blocks freed, recomputed later from its tokens). Waiting sequences start in arrival order.
"""

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .phases import PhaseClock
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        # a little headroom when admitting new prompts, so that the running decodes do not
        # have to be preempted in the very next step
        self.watermark = max(1, block_manager.num_blocks // 100) if block_manager.num_blocks > 8 else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.clock: PhaseClock | None = None  # phases.attach: time each schedule()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def activate(self, seq: Sequence, computed: int | None) -> None:
        """A RESERVED sequence joins the batch: with its KV arrived up to `computed` tokens
        (running from there), or without it (None: its blocks freed, computed from scratch)."""
        if computed is not None:
            seq.num_computed_tokens = computed
            self.block_manager.cache_full_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            self.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, free: bool = True) -> None:
        """Ends a sequence (done, aborted or failed) and gives its blocks back at once,
        unless `free` is False: then the caller holds them (a prefill's KV lease)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if free:  # (a RESERVED sequence is in neither queue; its blocks are freed here too)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _can_start(self, seq: Sequence) -> bool:
        # a sibling of an n > 1 request waits for the first one's prompt, then reuses its blocks
        p = seq.parent
        return p is None or p.is_finished or p.num_computed_tokens >= p.num_prompt_tokens

    def schedule(self) -> ScheduledBatch:
        if self.clock is None:
            return self._schedule()
        self.clock.start()
        batch = self._schedule()
        self.clock.lap("schedule")
        return batch

    def _schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        running, self.running = self.running, []
        while running and budget > 0:
            seq = running.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq, num_new) and running:
                victim = running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
            if not bm.can_append(seq, num_new):  # nothing left to preempt but seq itself
                self._preempt(seq)
                batch.preempted.append(seq)
                break
            bm.append_slots(seq, num_new)
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.running.extend(running)  # not scheduled this step: the budget ran out

        if batch.preempted:
            return batch
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._can_start(seq):
                skipped.append(self.waiting.popleft())
                continue
            computed = bm.get_computed_blocks(seq)
            num_new = seq.num_tokens - len(computed) * bm.block_size
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not bm.can_allocate(seq, num_new, computed, self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_new, computed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return batch

    def update_computed(self, batch: ScheduledBatch) -> None:
        """After a successful forward pass: the scheduled tokens are now in the cache."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
