"""A prompt's keys and values where they sit in the paged cache: gathered out of a held
prompt's blocks for its stream (`KVLayers`, prefill side), and the reserved blocks' memory a
pulled stream is read into (`CacheSink`, decode side).

A layer's cache is `[2, slots, num_kv_heads, head_dim]` (keys, values), block b holding
slots b * block_size .. (b + 1) * block_size - 1: the tokens of one block are contiguous in
memory, and so are those of consecutive blocks.
"""

import concurrent.futures
from collections.abc import Callable, Iterator
from functools import cached_property

import torch

from .transfer import KVHeader, checksum, crc32_combine, payload_view


def slot_runs(block_ids: list[int], block_size: int, num_tokens: int, lo: int = 0) -> list[tuple[int, int]]:
    """The slots of the tokens `lo` .. `num_tokens` - 1 of `block_ids` (token t in block
    t // block_size), as runs (first slot, slots): consecutive blocks are one run."""
    runs: list[tuple[int, int]] = []
    for j, block in enumerate(block_ids):
        a, b = max(lo, j * block_size), min(num_tokens, (j + 1) * block_size)
        if b <= a:
            if b >= num_tokens:
                break
            continue
        slot = block * block_size + a - j * block_size
        if runs and sum(runs[-1]) == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + b - a)
        else:
            runs.append((slot, b - a))
    return runs


def slot_views(cache: torch.Tensor, runs: list[tuple[int, int]]) -> list[memoryview]:
    """Byte views of a CPU layer cache's slots in `runs`: keys, then values."""
    # from the shape and one buffer export: indexing the tensor or viewing it again costs
    # more than the slices, once per layer of every stream
    _, slots, heads, dim = cache.shape
    slot_bytes = heads * dim * cache.element_size()
    mem = cache.view(torch.uint8).numpy().data.cast("B")  # as bytes: numpy has no bfloat16
    return [mem[(base + s) * slot_bytes:(base + s + n) * slot_bytes] for base in (0, slots) for s, n in runs]


class HeldChecksums:
    """The CRC-32 of a held prompt's keys and of its values in each block and layer, taken
    once when its blocks go under a lease (kv/connector.py, in a thread, while its answer
    travels to the decode worker), so that a stream of it from any block on combines them
    instead of reading every byte again on the pull's path. Needs `crc32_combine` (zlib-ng)."""

    def __init__(self, caches: list[torch.Tensor], block_size: int, block_ids: list[int], num_tokens: int):
        runs = [(block * block_size, min(block_size, num_tokens - j * block_size)) for j, block in enumerate(block_ids)]
        _, _, heads, dim = caches[0].shape
        slot_bytes = heads * dim * caches[0].element_size()
        self.sizes = [n * slot_bytes for _, n in runs]
        # per layer: every block's keys, then every block's values, as slot_views orders them
        self.blocks = [[checksum(1, view) for view in slot_views(cache, runs)] for cache in caches]
        self.whole = self._combined(0)

    def layers(self, first: int) -> list[int]:
        """Each layer's CRC-32 of the payload of a stream from block `first` on (the tokens
        of `first` and the blocks after it)."""
        return self.whole if first == 0 else self._combined(first)

    def _combined(self, first: int) -> list[int]:
        assert crc32_combine is not None  # made only where zlib-ng is installed
        n = len(self.sizes)
        out = []
        for row in self.blocks:
            crc = 0
            for kind in (0, n):
                for j in range(first, n):
                    crc = crc32_combine(crc, row[kind + j], self.sizes[j])
            out.append(crc)
        return out


def taken_crcs(taken: "concurrent.futures.Future[HeldChecksums] | None", first: int) -> list[int] | None:
    """The layers' CRC-32 of a stream of a held prompt from block `first` on, when its
    checksums (`taken`, in a thread) are there; None: the stream computes them as it goes."""
    if taken is None:
        return None
    if not taken.done():
        taken.cancel()  # a pull faster than the thread: this one checksums as it sends
        return None
    if taken.cancelled() or taken.exception() is not None:
        return None
    return taken.result().layers(first)


class KVLayers:
    """A held prompt's keys and values for the tokens `lo` .. `hi` - 1 of its blocks
    `block_ids`, one layer at a time: gathered into a buffer, or (a CPU cache, a range
    that starts on a block) seen in place (`views`); `crcs`: each layer's CRC-32, when known."""

    def __init__(self, caches: list[torch.Tensor], block_size: int, block_ids: list[int], lo: int, hi: int,
                 crcs: list[int] | None = None):
        self.caches, self.bs, self.lo, self.hi = caches, block_size, lo, hi
        self.block_ids = block_ids
        self.runs: list[tuple[int, int]] | None = None  # views' slots, found once
        self.crcs = crcs

    @cached_property
    def blocks(self) -> torch.Tensor:
        """The block ids as a tensor, for gathers only: a CPU stream is sent from views."""
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.caches[0].device)

    def __len__(self) -> int:
        return len(self.caches)

    def crc32(self, layer: int) -> int | None:
        """The layer's payload's CRC-32 when it was taken beforehand (HeldChecksums), else None."""
        return self.crcs[layer] if self.crcs is not None else None

    def views(self, layer: int) -> list[memoryview] | None:
        """The layer's payload (keys then values) as byte views of the cache's own slots, so
        that it is sent without a copy; None where it must be gathered (a cache off the CPU)."""
        cache = self.caches[layer]
        if cache.device.type != "cpu":
            return None
        if self.runs is None:
            self.runs = slot_runs(self.block_ids, self.bs, self.hi, self.lo)
        return slot_views(cache, self.runs)

    def gather(self, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's keys and values, `[2, tokens, num_kv_heads, head_dim]`, into `out`
        (a contiguous tensor of that shape, on any device) with one gather per kind: whole
        blocks by index_select, the last partial block by a slice."""
        cache = self.caches[layer]
        shape, bs, n = cache.shape[2:], self.bs, self.hi - self.lo
        if out is None:
            out = torch.empty(2, n, *shape, dtype=cache.dtype, device=cache.device)
        if self.lo:  # a range that does not start on a block: gather whole blocks, then cut
            whole = cache.view(2, -1, bs, *shape).index_select(1, self.blocks).flatten(1, 2)
            out.copy_(whole[:, self.lo:self.hi])
            return out
        full = n // bs
        for kind in (0, 1):
            dst = out[kind]
            if full:
                src = cache[kind].view(-1, bs, *shape)
                into = dst[:full * bs].view(full, bs, *shape)
                if into.device == src.device:
                    torch.index_select(src, 0, self.blocks[:full], out=into)
                else:
                    into.copy_(src.index_select(0, self.blocks[:full]))
            if n > full * bs:
                first = self.block_ids[full] * bs
                dst[full * bs:].copy_(cache[kind, first:first + n - full * bs])
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) of each layer, as new tensors."""
        for layer in range(len(self)):
            kv = self.gather(layer)
            yield kv[0], kv[1]


class StagingSink:
    """A layer at a time into one staging buffer, handed to `write(layer, keys, values)`
    once checked; the tensors are overwritten by the next layer."""

    def __init__(self, expect: KVHeader, write: Callable[[int, torch.Tensor, torch.Tensor], None]):
        self.write = write
        self.buf = torch.empty(expect.payload_bytes, dtype=torch.uint8)
        self.kv = payload_view(self.buf, expect)

    def views(self, layer: int) -> list[memoryview]:
        return [self.buf.numpy().data.cast("B")]

    def done(self, layer: int) -> None:
        self.write(layer, self.kv[0], self.kv[1])


class CacheSink:
    """A pulled stream read straight into a CPU cache's reserved blocks: each layer's
    payload (keys then values for `num_tokens` tokens from the first reserved block on) as
    byte views of the blocks' slots, consecutive blocks as one view."""

    def __init__(self, caches: list[torch.Tensor], block_size: int, block_ids: list[int], num_tokens: int):
        self.caches, self.block_ids, self.bs = caches, block_ids, block_size
        self.runs = slot_runs(block_ids, block_size, num_tokens)

    def views(self, layer: int) -> list[memoryview]:
        return slot_views(self.caches[layer], self.runs)

    def range_views(self, layer: int, lo: int, hi: int) -> list[memoryview]:
        """The views of the tokens `lo` .. `hi` - 1 alone (a segment of a version 4 stream)."""
        return slot_views(self.caches[layer], slot_runs(self.block_ids, self.bs, hi, lo))

    def done(self, layer: int) -> None:
        pass  # the bytes are where they belong
