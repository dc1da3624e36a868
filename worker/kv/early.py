"""A prefill's KV streamed while its prompt is still being computed (Splitwise's overlap).

With chunked prefill the prompt's first chunks are in the paged cache, every layer of them,
before its last chunk is computed; and within a step, layer i's keys and values are written
before layer i + 1 runs. A prefill admitted as early (`KVConnector.expect_early`, before it
is submitted) has an `EarlyPrefill`, into which the connector publishes, on the engine
thread: before each step that computes some of its prompt, the tokens scheduled and their
blocks, which it pins (one reference more each) so that neither a preemption nor an abort
hands them to another request while a stream reads them; after each layer of that step, the
layers done; each round of the engine loop, the tokens computed; when the request finishes,
its first token. Where the cache is on a GPU the host has only queued that work: each layer
and each round's publication carries a CUDA event recorded after it, which a stream's
gather (on a CUDA stream of its own, not behind the forward pass queued on the engine's)
waits for on the device.

A segmented stream (version 4, kv/transfer.py) reads that progress from another thread
(`segments`): each segment of a fixed number of tokens goes once it is scheduled, one layer
frame at a time as each layer of it is computed, and the first token last. A segment whose
tokens are one step's chunk (the prefill worker announces its step budget as the segment
size) thus leaves the worker layer by layer while the step computes the next layers; only
the last layer's frame is left when the prompt is done. A stream waits for the engine at
most `wait_seconds` between two layers; a prefill preempted (its computed tokens went back),
ended without its prompt computed, or in a step that failed (its layers may be written again
while a stream reads them) breaks the stream, and the decode side recomputes the prompt.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..engine.block_manager import BlockManager
from ..engine.sequence import SamplingParams, Sequence
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
    written: "torch.cuda.Event | None" = None  # on a GPU: after the computed tokens' writes
    first: dict | None = None          # once finished: first_token, first_logprob, finish_reason
    broken: str | None = None          # why the stream cannot go on

    def has(self, tokens: int, layer: int) -> bool:
        """Whether layer `layer` of the prompt's first `tokens` tokens is written (or queued, on a GPU)."""
        return self.computed >= tokens or (self.scheduled >= tokens and self.layers > layer)

    def event(self, tokens: int, layer: int) -> "torch.cuda.Event | None":
        """On a GPU, what to wait for before reading layer `layer` of the first `tokens` tokens."""
        if self.computed >= tokens:
            return self.written
        return self.events[layer] if layer < len(self.events) else None


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

    def hold(self, block_manager: BlockManager, blocks: list[int]) -> None:
        """A reference more on each of `blocks` not pinned yet: no one else gets them."""
        if self.pin is None:
            self.pin = Sequence([0], SamplingParams(max_tokens=1), f"{self.handle}#pin")
        for block in blocks[len(self.pin.block_table):]:
            block_manager.blocks[block].ref_count += 1
            self.pin.block_table.append(block)

    def publish(self, computed: int, block_ids: list[int], first: dict | None = None,
                broken: str | None = None, written: "torch.cuda.Event | None" = None) -> None:
        """Between steps: `computed` tokens are in the cache (on a GPU, once `written` is
        done), no step of them in flight."""
        with self.cond:
            p = self.progress
            p.computed, p.block_ids, p.scheduled, p.layers, p.events = computed, list(block_ids), computed, 0, []
            p.first, p.broken, p.written = first, broken, written
            self.done = first is not None or broken is not None
            self.cond.notify_all()

    def break_off(self, why: str) -> None:
        """The stream cannot go on (`why`): its readers fail, and it is let go once unread."""
        self.deadline = 0.0
        self.publish(self.progress.computed, self.progress.block_ids, broken=why)

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
                    return Progress(p.computed, p.block_ids, p.scheduled, p.layers, list(p.events), p.written,
                                    p.first, p.broken)
                left = end - time.monotonic()
                if left <= 0:
                    what = "computed" if layer is None else f"scheduled with layer {layer} done:"
                    raise KVTransferError(f"the prefill {self.handle} {what} {p.computed} of {tokens} "
                                          f"tokens in {timeout:.0f} s", "unreachable")
                self.cond.wait(left)


def recorded(device: torch.device) -> "torch.cuda.Event | None":
    """On a GPU, an event after everything queued so far on the device's current stream."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class LayerWise:
    """A segment's layers (kv/transfer.py's LayerSource), each once the engine has written it.
    On a GPU a layer is gathered on a stream of its own, not behind the forward pass still
    queued on the engine's."""

    def __init__(self, early: EarlyPrefill, end: int, layers: KVLayers, wait_seconds: float,
                 side: "torch.cuda.Stream | None"):
        self.early, self.end, self.layers, self.wait_seconds, self.side = early, end, layers, wait_seconds, side

    def __len__(self) -> int:
        return len(self.layers)

    def ready(self, layer: int) -> "torch.cuda.Event | None":
        """Waits until the engine has written (queued, on a GPU) the layer; returns, on a
        GPU, the event after which its bytes are there."""
        p = self.early.wait(self.end, layer, self.wait_seconds)
        if not p.has(self.end, layer):
            raise KVTransferError(f"the prefill {self.early.handle} ended at {p.computed} of "
                                  f"{self.early.num_prompt_tokens} prompt tokens", "refused")
        return p.event(self.end, layer)

    def pending(self, layer: int) -> bool:
        """Whether the layer is not written yet (a stream sends what it has before waiting)."""
        early = self.early
        with early.cond:
            return not (early.progress.has(self.end, layer) or early.done)

    def views(self, layer: int) -> list[memoryview] | None:
        if self.side is not None:
            return None  # a GPU cache: gathered
        self.ready(layer)
        return self.layers.views(layer)

    def gather(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        event = self.ready(layer)
        if self.side is None:
            return self.layers.gather(layer, out)
        with torch.cuda.stream(self.side):
            if event is not None:
                self.side.wait_event(event)
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
        if not p.has(end, 0):
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
