"""A prefill's KV streamed while its prompt is still being computed (Splitwise's overlap).

With chunked prefill the prompt's first chunks are in the paged cache, every layer of them,
before its last chunk is computed; and within a step, layer i's keys and values are written
before layer i + 1 runs. A prefill admitted as early (`KVConnector.expect_early`, before it
is submitted) has an `EarlyPrefill`, into which the connector publishes, on the engine
thread: before each step that computes some of its prompt, the tokens scheduled and their
blocks, which it pins (one reference more each) so that neither a preemption nor an abort
hands them to another request while a stream reads them; after each layer of that step, the
layers done (with a CUDA event per layer where the cache is on a GPU: the host has only
queued the layer); each round of the engine loop, the tokens computed; when the request
finishes, its first token.

A segmented stream (version 4, kv/transfer.py) reads that progress from another thread
(`segments`): each segment of a fixed number of tokens goes once it is scheduled, one layer
frame at a time as each layer of it is computed, and the first token last. A segment whose
tokens are one step's chunk (the prefill worker announces its step budget as the segment
size) thus leaves the worker layer by layer while the step computes the next layers; only
the last layer's frame is left when the prompt is done. A stream waits for the engine at
most `wait_seconds` between two layers; a prefill preempted (its computed tokens went back)
or ended without its prompt computed breaks the stream, and the decode side recomputes the
prompt. A step that fails and is run again (engine.py's `_run_isolated`) writes the same
keys and values again: a layer frame sent from the failed attempt carries them.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..engine.sequence import Sequence
from .slots import KVLayers
from .transfer import SEGMENT_WAIT_S, KVTransferError

WAIT_SECONDS = SEGMENT_WAIT_S  # the longest a stream waits for the next layer to be computed


@dataclass
class Progress:
    """What the engine thread has published of one prefill."""
    computed: int = 0                  # prompt tokens whose keys and values are in the cache, every layer
    block_ids: list[int] = field(default_factory=list)  # the blocks that hold the scheduled tokens (pinned)
    scheduled: int = 0                 # the step in flight computes the prompt up to here (>= computed)
    layers: int = 0                    # layers of the step in flight done (the scheduled tokens' in them)
    events: list = field(default_factory=list)  # on a GPU: a CUDA event per layer done, to wait on
    first: dict | None = None          # once finished: first_token, first_logprob, finish_reason
    broken: str | None = None          # why the stream cannot go on

    def has(self, tokens: int, layer: int) -> bool:
        """Whether layer `layer` of the prompt's first `tokens` tokens is written (or queued, on a GPU)."""
        return self.computed >= tokens or (self.scheduled >= tokens and self.layers > layer)


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
        """Between steps: `computed` tokens are in the cache, no step of them in flight."""
        with self.cond:
            p = self.progress
            p.computed, p.block_ids, p.scheduled, p.layers, p.events = computed, list(block_ids), computed, 0, []
            p.first, p.broken = first, broken
            self.done = first is not None or broken is not None
            self.cond.notify_all()

    def begin_step(self, scheduled: int, block_ids: list[int]) -> None:
        """A step computing the prompt up to `scheduled` is about to run over `block_ids`."""
        with self.cond:
            p = self.progress
            p.scheduled, p.block_ids, p.layers, p.events = scheduled, list(block_ids), 0, []
            self.cond.notify_all()

    def layer_done(self, layer: int, event: "torch.cuda.Event | None") -> None:
        """The step in flight has written layer `layer` (a GPU: queued it, up to `event`)."""
        with self.cond:
            p = self.progress
            p.layers = layer + 1
            if event is not None:
                p.events.append(event)
            self.cond.notify_all()

    def wait(self, tokens: int, layer: int | None = None, timeout: float = WAIT_SECONDS) -> Progress:
        """The progress once the first `tokens` tokens are computed (`layer` None), or
        scheduled with layer `layer` of them done, or the prefill is done; raises
        KVTransferError when it broke or did not get there in `timeout` seconds."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                p = self.progress
                if p.broken is not None:
                    raise KVTransferError(f"the prefill {self.handle} {p.broken}", "refused")
                if p.computed >= tokens or self.done or (layer is not None and p.has(tokens, layer)):
                    return Progress(p.computed, p.block_ids, p.scheduled, p.layers, list(p.events), p.first,
                                    p.broken)
                left = end - time.monotonic()
                if left <= 0:
                    what = "computed" if layer is None else f"scheduled with layer {layer} done:"
                    raise KVTransferError(f"the prefill {self.handle} {what} {p.computed} of {tokens} "
                                          f"tokens in {timeout:.0f} s", "unreachable")
                self.cond.wait(left)


class LayerWise:
    """A segment's layers (kv/transfer.py's LayerSource), each once the engine has written it.
    On a GPU a layer is gathered on a stream of its own, not behind the forward pass still
    queued on the engine's."""

    def __init__(self, early: EarlyPrefill, end: int, layers: KVLayers, wait_seconds: float,
                 side: "torch.cuda.Stream | None"):
        self.early, self.end, self.layers, self.wait_seconds, self.side = early, end, layers, wait_seconds, side

    def __len__(self) -> int:
        return len(self.layers)

    def ready(self, layer: int) -> None:
        p = self.early.wait(self.end, layer, self.wait_seconds)
        if not p.has(self.end, layer):
            raise KVTransferError(f"the prefill {self.early.handle} ended at {p.computed} of "
                                  f"{self.early.num_prompt_tokens} prompt tokens", "refused")
        if p.computed < self.end and layer < len(p.events):
            p.events[layer].synchronize()

    def views(self, layer: int) -> list[memoryview] | None:
        self.ready(layer)
        return self.layers.views(layer)

    def gather(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        self.ready(layer)
        if self.side is None:
            return self.layers.gather(layer, out)
        with torch.cuda.stream(self.side):
            self.layers.gather(layer, out)
        self.side.synchronize()
        return out


def segments(early: EarlyPrefill, caches: list[torch.Tensor], block_size: int, start: int,
             segment_tokens: int, wait_seconds: float = WAIT_SECONDS) -> Iterator[tuple[int, int, LayerWise]]:
    """The prompt's tokens from `start` on in segments of `segment_tokens` (the last one
    shorter): (first token, tokens, its layers), each once it is scheduled, its layers each
    once it is computed."""
    total = early.num_prompt_tokens
    side = torch.cuda.Stream(caches[0].device) if caches[0].device.type == "cuda" else None
    at = start
    while at < total:
        end = min(at + segment_tokens, total)
        p = early.wait(end, 0, wait_seconds)
        if max(p.computed, p.scheduled) < end:
            raise KVTransferError(f"the prefill {early.handle} ended at {p.computed} of {total} prompt tokens",
                                  "refused")
        first = at // block_size
        blocks = p.block_ids[first:-(-end // block_size)]
        layers = KVLayers(caches, block_size, blocks, at - first * block_size, end - first * block_size)
        yield at, end - at, LayerWise(early, end, layers, wait_seconds, side)
        at = end


def first_token(early: EarlyPrefill, wait_seconds: float = WAIT_SECONDS) -> dict:
    """The prefill's first token, once it has one."""
    p = early.wait(early.num_prompt_tokens + 1, timeout=wait_seconds)
    if p.first is None:
        raise KVTransferError(f"the prefill {early.handle} has no first token", "refused")
    return p.first
