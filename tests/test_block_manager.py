"""The KV block manager on its own: block accounting, prefix caching by chained hashes,
reference counts, LRU eviction of freed cached blocks, and no leaks."""

import random

import pytest

import fleetwise.worker.engine.block_manager as block_manager_module
from fleetwise.worker.engine.block_manager import BlockManager
from fleetwise.worker.engine.sequence import SamplingParams, Sequence

BS = 4

# block-sized token runs; distinct runs never share a token
X = [1, 2, 3, 4]
Y = [5, 6, 7, 8]
Z = [9, 10, 11, 12]
W = [13, 14, 15, 16]
V = [17, 18, 19, 20]


def make_seq(tokens, max_tokens=4):
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0))


def admit(bm, seq, num_new=None):
    """Allocate a new sequence the way the scheduler does (cached prefix first) and mark the
    `num_new` tokens after the prefix computed, as a forward pass would. Returns the hits."""
    computed = bm.get_computed_blocks(seq)
    if num_new is None:
        num_new = seq.num_tokens - len(computed) * bm.block_size
    assert bm.can_allocate(seq, num_new, computed)
    bm.allocate(seq, num_new, computed)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)
    return computed


def advance(bm, seq, n):
    """Compute `n` more tokens of a sequence that already holds blocks."""
    assert bm.can_append(seq, n)
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def hits(bm, tokens):
    """How many leading blocks of a prompt the cache would serve (looks only, takes nothing)."""
    return len(bm.get_computed_blocks(make_seq(tokens)))


def check_invariants(bm, live_seqs):
    counts = [0] * bm.num_blocks
    for seq in live_seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
        assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens)
        for b in seq.block_table:
            counts[b] += 1
    assert sum(b.ref_count for b in bm.blocks) == sum(len(s.block_table) for s in live_seqs)
    for block in bm.blocks:
        assert block.ref_count == counts[block.block_id]
        if block.block_id in bm.free_block_ids:
            assert block.ref_count == 0
        else:
            assert block.ref_count > 0, f"block {block.block_id} is neither free nor used"
    assert bm.num_free_blocks + sum(1 for b in bm.blocks if b.ref_count > 0) == bm.num_blocks
    for h, b in bm.hash_to_block_id.items():
        assert bm.blocks[b].hash == h
    hashed = [b.block_id for b in bm.blocks if b.hash is not None]
    assert sorted(hashed) == sorted(bm.hash_to_block_id.values())


def assert_all_free(bm):
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert sorted(bm.free_block_ids) == list(range(bm.num_blocks))
    check_invariants(bm, [])


# -- accounting -------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_rejects_non_positive_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("tokens, blocks", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed(tokens, blocks):
    assert BlockManager(8, 4).blocks_needed(tokens) == blocks


def test_fresh_manager_is_all_free():
    bm = BlockManager(5, BS)
    assert bm.num_blocks == 5
    assert bm.usage == 0.0
    assert_all_free(bm)


def test_allocate_takes_blocks_for_the_scheduled_tokens_only():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(100, 110)))  # 10 tokens
    bm.allocate(seq, 5, [])  # a first chunk of 5 tokens: 2 blocks
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    check_invariants(bm, [seq])
    bm.free(seq)
    assert_all_free(bm)


def test_append_slots_adds_a_block_only_when_crossing_a_boundary():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(100, 106)))  # 6 tokens: 2 blocks
    admit(bm, seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.append_token(1)
    advance(bm, seq, 1)  # 7 computed: still 2 blocks
    seq.append_token(2)
    advance(bm, seq, 1)  # 8 computed: still 2 blocks
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.append_token(3)
    advance(bm, seq, 1)  # 9 computed: a third block
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert len(set(seq.block_table)) == 3
    check_invariants(bm, [seq])
    bm.free(seq)
    assert_all_free(bm)


def test_can_allocate_and_can_append_at_the_boundary():
    bm = BlockManager(3, BS)
    a = make_seq(list(range(100, 112)))  # 12 tokens: exactly 3 blocks
    assert bm.can_allocate(a, 12, [])
    assert not bm.can_allocate(a, 13, [])
    assert bm.can_allocate(a, 8, [], watermark=1)
    assert not bm.can_allocate(a, 9, [], watermark=1)
    bm.allocate(a, 8, [])
    a.num_computed_tokens = 8
    assert bm.can_append(a, 4)       # fills the third block
    assert not bm.can_append(a, 5)   # would need a fourth
    bm.append_slots(a, 4)
    assert bm.num_free_blocks == 0
    assert bm.can_append(a, 0)
    with pytest.raises(KeyError):   # nothing left to take
        bm.append_slots(a, 5)
    bm.free(a)
    assert_all_free(bm)


def test_free_resets_the_sequence():
    bm = BlockManager(4, BS)
    seq = make_seq(X + Y + [1])
    admit(bm, seq)
    assert seq.block_hashes
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == []
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert seq.token_ids == X + Y + [1]  # the tokens themselves stay, for recomputation
    assert_all_free(bm)


def test_freeing_twice_asserts():
    bm = BlockManager(4, BS)
    seq = make_seq(X + [1])
    admit(bm, seq)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(seq)


# -- prefix caching ---------------------------------------------------------------------


def test_nothing_is_cached_before_it_is_computed():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + Z + [1])
    bm.allocate(a, a.num_tokens, [])  # blocks held, but no forward pass yet
    bm.cache_full_blocks(a)
    assert bm.hash_to_block_id == {}
    assert all(b.hash is None for b in bm.blocks)
    assert hits(bm, X + Y + Z + [1]) == 0
    a.num_computed_tokens = a.num_tokens
    bm.cache_full_blocks(a)
    assert len(bm.hash_to_block_id) == 3
    assert hits(bm, X + Y + Z + [1]) == 3
    bm.free(a)
    assert_all_free(bm)


def test_only_full_blocks_covered_by_computed_tokens_are_cached():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + Z)  # 12 tokens
    admit(bm, a, 6)  # chunk 1: the first block is full, the second half computed
    assert len(bm.hash_to_block_id) == 1
    assert len(a.block_hashes) == 1
    assert bm.get_computed_blocks(make_seq(X + Y + Z + [1])) == a.block_table[:1]
    advance(bm, a, 2)  # 8 computed: the second block is now full
    assert len(bm.hash_to_block_id) == 2
    assert hits(bm, X + Y + Z + [1]) == 2
    advance(bm, a, 4)
    assert len(bm.hash_to_block_id) == 3
    assert bm.get_computed_blocks(make_seq(X + Y + Z + [1])) == a.block_table
    bm.free(a)
    assert_all_free(bm)


def test_partial_last_block_is_never_cached():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + [1, 2])  # 10 tokens: the third block is partial
    admit(bm, a)
    assert len(bm.hash_to_block_id) == 2
    assert bm.blocks[a.block_table[2]].hash is None
    assert hits(bm, X + Y + [1, 2, 3, 4, 5]) == 2
    bm.free(a)
    assert_all_free(bm)


def test_the_last_token_is_never_a_hit():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y)  # exactly two full blocks
    admit(bm, a)
    assert len(bm.hash_to_block_id) == 2
    b = make_seq(X + Y)
    computed = admit(bm, b)
    assert computed == a.block_table[:1]  # N - 1 blocks: the model runs on the last block
    assert b.num_cached_tokens == BS
    assert hits(bm, X + Y + [1]) == 2  # one more token and both blocks are hits
    assert hits(bm, X) == 0
    assert hits(bm, X + [1]) == 1
    bm.free(a)
    bm.free(b)
    assert_all_free(bm)


def test_a_hit_needs_the_whole_chain():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + Z + [1])
    admit(bm, a)
    assert hits(bm, W + Y + Z + [1]) == 0   # same later blocks after a different first block
    assert hits(bm, X + W + Z + [1]) == 1   # the chain breaks at the second block
    assert hits(bm, Y + Z + [1]) == 0       # a block's content alone is not enough
    assert hits(bm, X + Y + W + [1]) == 2
    assert hits(bm, X + Y + Z + [1]) == 3
    bm.free(a)
    assert_all_free(bm)


def test_chained_hashes_distinguish_equal_blocks_in_different_positions():
    bm = BlockManager(8, BS)
    a = make_seq(X + X + X + [1])  # the same block content three times
    admit(bm, a)
    assert len(bm.hash_to_block_id) == 3
    assert len(set(a.block_table[:3])) == 3
    assert hits(bm, X + X + [1]) == 2
    assert hits(bm, X + X + X + X + [1]) == 3
    bm.free(a)
    assert_all_free(bm)


def test_hash_collision_with_different_tokens_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + [1])
    admit(bm, a)
    assert bm.hash_to_block_id == {42: a.block_table[0]}
    assert hits(bm, Z + [1]) == 0
    assert hits(bm, X + Z + [1]) == 1
    bm.free(a)
    assert_all_free(bm)


def test_output_tokens_fill_blocks_that_become_cached():
    bm = BlockManager(8, BS)
    a = make_seq(X + [1, 2])
    admit(bm, a)
    assert len(bm.hash_to_block_id) == 1
    for t in (3, 4, 5):
        a.append_token(t)
        advance(bm, a, 1)
    # X + [1, 2, 3, 4] computed; the sampled 5 is not yet
    assert len(bm.hash_to_block_id) == 2
    assert hits(bm, X + [1, 2, 3, 4] + [5]) == 2
    bm.free(a)
    assert_all_free(bm)


def test_caching_disabled_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(X + Y + [1])
    admit(bm, a)
    assert bm.hash_to_block_id == {} and a.block_hashes == []
    b = make_seq(X + Y + [1])
    assert admit(bm, b) == []
    assert b.num_cached_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.get_computed_blocks(make_seq(X + Y + [1])) == []
    assert_all_free(bm)


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + [1])
    admit(bm, a)
    assert bm.num_free_blocks == 5
    b = make_seq(X + Y + [2, 3])
    computed = admit(bm, b)
    assert computed == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 10
    assert bm.num_free_blocks == 4  # only b's own third block was taken
    shared = a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    check_invariants(bm, [a, b])

    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    assert not set(shared) & set(bm.free_block_ids)
    assert bm.num_free_blocks == 5
    check_invariants(bm, [b])

    bm.free(b)
    assert all(i in bm.free_block_ids for i in shared)
    assert hits(bm, X + Y + [1]) == 2  # still cached while free
    assert_all_free(bm)


def test_freed_cached_blocks_are_taken_back():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + Z + [1])
    admit(bm, a)
    prefix = a.block_table[:3]
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = make_seq(X + Y + Z + [2])
    assert bm.can_allocate(b, 1, bm.get_computed_blocks(b))
    computed = admit(bm, b)
    assert computed == prefix
    assert b.block_table[:3] == prefix
    assert [bm.blocks[i].ref_count for i in prefix] == [1, 1, 1]
    assert not set(prefix) & set(bm.free_block_ids)
    assert bm.num_free_blocks == 4  # three revived, one new
    bm.free(b)
    assert_all_free(bm)


def test_can_allocate_counts_revived_blocks_against_the_free_pool():
    bm = BlockManager(4, BS)
    a = make_seq(X + Y + Z + [1])  # 4 blocks, 3 of them cached
    admit(bm, a)
    bm.free(a)
    hog = make_seq(list(range(100, 104)))
    bm.allocate(hog, 4, [])  # takes the one uncached free block
    assert bm.num_free_blocks == 3
    b = make_seq(X + Y + Z + [2])
    computed = bm.get_computed_blocks(b)
    assert len(computed) == 3
    # reviving the three cached blocks uses up the pool: no room for the new one
    assert not bm.can_allocate(b, 1, computed)
    assert bm.can_allocate(b, 0, computed)
    bm.free(hog)
    assert bm.can_allocate(b, 1, computed)
    admit(bm, b)
    assert bm.num_free_blocks == 0
    bm.free(b)
    assert_all_free(bm)


def test_counters_count_prompt_tokens_and_cached_tokens():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + [1])
    admit(bm, a)
    assert (bm.prefix_queries, bm.prefix_hits) == (9, 0)
    b = make_seq(X + Y + [2, 3])
    admit(bm, b)
    assert (bm.prefix_queries, bm.prefix_hits) == (9 + 10, 8)
    c = make_seq(X + Z + [4])
    admit(bm, c)
    assert (bm.prefix_queries, bm.prefix_hits) == (9 + 10 + 9, 8 + 4)
    # looking without allocating counts nothing
    bm.get_computed_blocks(make_seq(X + Y + [5]))
    assert (bm.prefix_queries, bm.prefix_hits) == (28, 12)
    for s in (a, b, c):
        bm.free(s)
    assert_all_free(bm)


def test_concurrent_duplicates_register_one_copy_and_the_other_is_reused_first():
    bm = BlockManager(6, BS)
    a = make_seq(X + Y + [1])
    b = make_seq(X + Y + [1])
    # both start before either is computed: no hits, separate blocks
    for s in (a, b):
        bm.allocate(s, s.num_tokens, bm.get_computed_blocks(s))
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert sorted(bm.hash_to_block_id.values()) == sorted(a.block_table[:2])
    assert b.block_hashes == a.block_hashes
    assert all(bm.blocks[i].hash is None for i in b.block_table)
    check_invariants(bm, [a, b])
    a_partial, b_table = a.block_table[2], list(b.block_table)
    bm.free(b)
    bm.free(a)
    # b's unregistered copies and both partial blocks go before a's cached blocks
    other = make_seq(list(range(100, 116)))
    bm.allocate(other, 16, [])
    assert set(other.block_table) == set(b_table) | {a_partial}
    assert hits(bm, X + Y + [1]) == 2
    bm.free(other)
    assert_all_free(bm)


# -- eviction ---------------------------------------------------------------------------


def take(bm, n):
    """Take `n` blocks for a sequence that computes nothing (no new cache entries)."""
    seq = make_seq(list(range(1000, 1000 + n * BS)))
    bm.allocate(seq, n * BS, [])
    return seq


def test_uncached_free_blocks_are_used_before_cached_ones():
    bm = BlockManager(8, BS)
    a = make_seq(X + Y + Z + [1])  # 3 cached blocks, 1 partial
    admit(bm, a)
    cached = a.block_table[:3]
    bm.free(a)
    hog = take(bm, 5)  # exactly the uncached free blocks
    assert not set(hog.block_table) & set(cached)
    assert hits(bm, X + Y + Z + [1]) == 3
    assert len(bm.hash_to_block_id) == 3
    bm.free(hog)
    assert_all_free(bm)


def test_tail_blocks_are_evicted_before_prefix_blocks():
    bm = BlockManager(4, BS)
    a = make_seq(X + Y + Z + [1])
    admit(bm, a)
    a0, a1, a2, a3 = a.block_table
    bm.free(a)
    assert list(bm.free_block_ids) == [a3, a2, a1, a0]
    hog = take(bm, 2)  # the partial block, then the last cached block
    assert hog.block_table == [a3, a2]
    assert bm.blocks[a2].hash is None
    assert hits(bm, X + Y + Z + [1]) == 2
    hog2 = take(bm, 1)
    assert hog2.block_table == [a1]
    assert hits(bm, X + Y + Z + [1]) == 1
    check_invariants(bm, [hog, hog2])
    bm.free(hog)
    bm.free(hog2)
    assert_all_free(bm)


def test_least_recently_freed_cached_block_is_evicted_first():
    bm = BlockManager(6, BS)
    a = make_seq(X + Y + [1])
    b = make_seq(Z + W + [2])
    admit(bm, a)
    admit(bm, b)
    assert bm.num_free_blocks == 0
    bm.free(a)  # freed first: evicted first
    bm.free(b)
    hog = take(bm, 2)  # the two uncached partial blocks
    assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == (2, 2)
    expected = [(1, 2), (0, 2), (0, 1), (0, 0)]
    held = [hog]
    for want in expected:
        held.append(take(bm, 1))
        assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == want
        check_invariants(bm, held)
    for s in held:
        bm.free(s)
    assert bm.hash_to_block_id == {}
    assert_all_free(bm)


def test_reviving_a_cached_block_makes_it_most_recently_used():
    bm = BlockManager(6, BS)
    a = make_seq(X + Y + [1])
    b = make_seq(Z + W + [2])
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    # a's prefix is used again, so b's blocks are now the least recently used
    a2 = make_seq(X + Y + [3])
    assert len(admit(bm, a2)) == 2
    bm.free(a2)
    hog = take(bm, 2)  # the uncached ones
    assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == (2, 2)
    one = take(bm, 1)
    assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == (2, 1)
    two = take(bm, 1)
    assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == (2, 0)
    three = take(bm, 1)
    assert (hits(bm, X + Y + [1]), hits(bm, Z + W + [2])) == (1, 0)
    for s in (hog, one, two, three):
        bm.free(s)
    assert_all_free(bm)


def test_blocks_in_use_are_never_evicted():
    bm = BlockManager(4, BS)
    a = make_seq(X + Y + [1])
    admit(bm, a)
    hog = take(bm, 1)  # the last free block
    assert bm.num_free_blocks == 0
    assert hits(bm, X + Y + [1]) == 2
    assert not bm.can_allocate(make_seq(Z + [1]), 1, [])
    bm.free(hog)
    bm.free(a)
    assert_all_free(bm)


def test_an_evicted_block_is_recached_with_its_new_content():
    bm = BlockManager(2, BS)
    a = make_seq(X + [1])
    admit(bm, a)
    bm.free(a)
    b = make_seq(Y + Z + [2])  # needs more blocks than are uncached: evicts X
    computed = bm.get_computed_blocks(b)
    assert computed == []
    bm.allocate(b, 8, computed)
    b.num_computed_tokens = 8
    bm.cache_full_blocks(b)
    assert hits(bm, X + [1]) == 0
    assert hits(bm, Y + Z + [3]) == 2
    assert len(bm.hash_to_block_id) == 2
    for bid in b.block_table:
        assert bm.blocks[bid].token_ids in (tuple(Y), tuple(Z))
    bm.free(b)
    assert_all_free(bm)


# -- property test ----------------------------------------------------------------------


class ShadowKV:
    """What the model would have written in every KV slot: the token prefix ending at that
    position, so a block served from the cache can be checked for the right contents."""

    def __init__(self, bm):
        self.bm = bm
        self.slots = {}

    def write(self, seq, start, n):
        bs = self.bm.block_size
        for p in range(start, start + n):
            block = seq.block_table[p // bs]
            # only a sequence's own blocks are written into, never shared ones
            assert self.bm.blocks[block].ref_count == 1
            self.slots[(block, p % bs)] = tuple(seq.token_ids[:p + 1])

    def check(self, seq, upto):
        bs = self.bm.block_size
        for p in range(upto):
            got = self.slots.get((seq.block_table[p // bs], p % bs))
            assert got == tuple(seq.token_ids[:p + 1]), f"stale KV at position {p}"


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    bm = BlockManager(rng.choice([6, 10, 16]), bs)
    kv = ShadowKV(bm)
    stems = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    running, waiting = [], []
    counters = {"hit_blocks": 0, "allocated": 0, "preempted": 0, "finished": 0}
    queries = 0

    def new_prompt():
        stem = rng.choice(stems)
        return stem[:rng.randint(0, len(stem))] + [rng.randrange(50) for _ in range(rng.randint(1, 5))]

    def try_admit(seq):
        nonlocal queries
        computed = bm.get_computed_blocks(seq)
        num_cached = len(computed) * bs
        assert num_cached < seq.num_tokens
        num_new = rng.randint(1, seq.num_tokens - num_cached)
        needed = bm.blocks_needed(num_cached + num_new) - len(computed)
        revived = sum(1 for b in computed if bm.blocks[b].ref_count == 0)
        ok = bm.can_allocate(seq, num_new, computed)
        assert ok == (needed + revived <= bm.num_free_blocks)
        if not ok:
            return False
        free_before = bm.num_free_blocks
        bm.allocate(seq, num_new, computed)
        assert bm.num_free_blocks == free_before - needed - revived
        assert seq.num_cached_tokens == seq.num_computed_tokens == num_cached
        queries += seq.num_tokens
        kv.check(seq, num_cached)  # the cached prefix holds exactly this prefix's KV
        kv.write(seq, num_cached, num_new)
        seq.num_computed_tokens += num_new
        bm.cache_full_blocks(seq)
        counters["hit_blocks"] += len(computed)
        counters["allocated"] += 1
        return True

    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not running:
            if waiting and rng.random() < 0.5:
                seq = waiting[0]
            else:
                seq = make_seq(new_prompt())
            if try_admit(seq):
                if seq in waiting:
                    waiting.remove(seq)
                running.append(seq)
        elif op < 0.75:
            seq = rng.choice(running)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.choice([rng.randrange(50), seq.token_ids[-1]]))
            n = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
            if bm.can_append(seq, n):
                free_before, table_before = bm.num_free_blocks, len(seq.block_table)
                bm.append_slots(seq, n)
                grown = len(seq.block_table) - table_before
                assert grown == max(0, bm.blocks_needed(seq.num_computed_tokens + n) - table_before)
                assert bm.num_free_blocks == free_before - grown
                kv.check(seq, seq.num_computed_tokens)
                kv.write(seq, seq.num_computed_tokens, n)
                seq.num_computed_tokens += n
                bm.cache_full_blocks(seq)
            else:
                assert bm.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table) > bm.num_free_blocks
        elif op < 0.9:
            seq = running.pop(rng.randrange(len(running)))
            free_before = bm.num_free_blocks
            sole = sum(1 for b in seq.block_table if bm.blocks[b].ref_count == 1)
            bm.free(seq)
            assert bm.num_free_blocks == free_before + sole
            counters["finished"] += 1
        else:
            seq = running.pop(rng.randrange(len(running)))
            bm.free(seq)
            waiting.insert(0, seq)  # recomputed later from its tokens
            counters["preempted"] += 1
        check_invariants(bm, running)
        live = {b for s in running for b in s.block_table}
        assert live.isdisjoint(bm.free_block_ids)
        assert all(not s.block_table and s.num_computed_tokens == 0 for s in waiting)
        assert bm.prefix_queries == queries

    # the run exercised what it is meant to
    assert counters["hit_blocks"] > 0
    assert counters["allocated"] > 20
    assert counters["preempted"] > 0 and counters["finished"] > 0
    for seq in running:
        bm.free(seq)
    assert_all_free(bm)
