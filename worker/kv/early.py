"""A prefill's KV streamed while its prompt is still being computed (Splitwise's overlap).

With chunked prefill the prompt's first chunks are in the paged cache, every layer of them,
before its last chunk is computed. A prefill admitted as early (`KVConnector.expect_early`,
before it is submitted) has an `EarlyPrefill`: each round of the engine loop the connector
publishes into it, on the engine thread, the prompt tokens computed so far and their blocks,
which it pins (one reference more each) so that neither a preemption nor an abort hands them
to another request while a stream reads them; when the request finishes, its first token.
A segmented stream (version 4, kv/transfer.py) reads the published progress from another
thread (`segments`): each segment of a fixed number of tokens goes as soon as it is
computed, and the first token last. A stream waits for the engine at most `wait_seconds`
between two segments; a prefill preempted (its computed tokens went back) or ended without
its prompt computed breaks the stream, and the decode side recomputes the prompt.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..engine.sequence import Sequence
from .slots import KVLayers
from .transfer import SEGMENT_WAIT_S, KVTransferError

WAIT_SECONDS = SEGMENT_WAIT_S  # the longest a stream waits for the next segment to be computed


@dataclass
class Progress:
    """What the engine thread has published of one prefill."""
    computed: int = 0                  # prompt tokens whose keys and values are in the cache
    block_ids: list[int] = field(default_factory=list)  # the blocks that hold them (pinned)
    first: dict | None = None          # once finished: first_token, first_logprob, finish_reason
    broken: str | None = None          # why the stream cannot go on


class EarlyPrefill:
    """One early prefill's progress, from the engine thread to the streams that read it."""

    def __init__(self, handle: str, num_prompt_tokens: int, deadline: float):
        self.handle, self.num_prompt_tokens = handle, num_prompt_tokens
        self.deadline = deadline       # until which it waits for a reader once finished
        self.created = time.monotonic()
        self.cond = threading.Condition()
        self.progress = Progress()
        self.pin: Sequence | None = None   # holds the pinned blocks (engine thread only)
        self.seen = False                  # the engine has taken the request
        self.readers = 0
        self.done = False                  # finished or broken: nothing more is published

    def publish(self, computed: int, block_ids: list[int], first: dict | None = None,
                broken: str | None = None) -> None:
        with self.cond:
            p = self.progress
            p.computed, p.block_ids = computed, list(block_ids)
            p.first, p.broken = first, broken
            self.done = first is not None or broken is not None
            self.cond.notify_all()

    def wait(self, tokens: int, timeout: float = WAIT_SECONDS) -> Progress:
        """The progress once at least `tokens` are computed or the prefill is done; raises
        KVTransferError when it broke or did not get there in `timeout` seconds."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                p = self.progress
                if p.broken is not None:
                    raise KVTransferError(f"the prefill {self.handle} {p.broken}", "refused")
                if p.computed >= tokens or self.done:
                    return Progress(p.computed, p.block_ids, p.first, p.broken)
                left = end - time.monotonic()
                if left <= 0:
                    raise KVTransferError(f"the prefill {self.handle} computed {p.computed} of {tokens} "
                                          f"tokens in {timeout:.0f} s", "unreachable")
                self.cond.wait(left)


def segments(early: EarlyPrefill, caches: list[torch.Tensor], block_size: int, start: int,
             segment_tokens: int, wait_seconds: float = WAIT_SECONDS) -> Iterator[tuple[int, int, KVLayers]]:
    """The prompt's tokens from `start` on in segments of `segment_tokens` (the last one
    shorter): (first token, tokens, its layers), each once it is computed."""
    total = early.num_prompt_tokens
    at = start
    while at < total:
        end = min(at + segment_tokens, total)
        p = early.wait(end, wait_seconds)
        if p.computed < end:
            raise KVTransferError(f"the prefill {early.handle} ended at {p.computed} of {total} prompt tokens",
                                  "refused")
        first = at // block_size
        blocks = p.block_ids[first:-(-end // block_size)]
        yield at, end - at, KVLayers(caches, block_size, blocks, at - first * block_size, end - first * block_size)
        at = end


def first_token(early: EarlyPrefill, wait_seconds: float = WAIT_SECONDS) -> dict:
    """The prefill's first token, once it has one."""
    p = early.wait(early.num_prompt_tokens + 1, wait_seconds)
    if p.first is None:
        raise KVTransferError(f"the prefill {early.handle} has no first token", "refused")
    return p.first
