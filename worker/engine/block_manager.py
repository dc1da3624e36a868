"""The paged KV cache's bookkeeping: fixed-size blocks, a free pool, per-sequence block
tables, and prefix caching by chained hashes of full blocks.

A full block whose keys and values are computed is registered under the hash of its tokens
chained with the hash of the block before it, so equal hashes mean equal prefixes. Freed
blocks keep their contents and hash: they sit in the free pool in least-recently-used order
and a later prompt with the same prefix takes them back; allocation evicts the oldest.
"""

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks, first evicted first: never-used and uncached blocks at the front,
        # cached ones behind them in the order they were freed
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0     # of those, found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Blocks of `seq`'s leading full blocks already in the cache. The last token is never
        a hit: the model must run on at least one token to give the next token's logits."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int],
                     watermark: int = 0) -> bool:
        num_computed = len(computed_blocks) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return needed + revived + watermark <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int]) -> None:
        """First allocation of a waiting sequence: reuse its cached prefix, then add blocks
        for the `num_new_tokens` it computes next."""
        assert not seq.block_table
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            assert block.hash is not None  # computed blocks come from hash_to_block_id
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        seq.num_cached_tokens = len(computed_blocks) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens
        self.append_slots(seq, num_new_tokens)

    def share(self, seq: Sequence, blocks: list[int], num_new_tokens: int) -> None:
        """First allocation of a sequence whose leading `blocks` another holds and will fill
        (a moved request's choices: one pull brings their common prompt's blocks for all),
        then blocks for its next `num_new_tokens`."""
        assert not seq.block_table
        for block_id in blocks:
            self.blocks[block_id].ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(blocks) * self.block_size
        self.append_slots(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the least recently used cached block
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block_id:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Give back a sequence's blocks; the last blocks are freed first so that they are
        evicted before the shared prefix blocks."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
