"""The scheduler driven by a fake model: token budget, chunked prefill, FCFS admission,
preemption, prefix-cache reuse, n > 1 siblings and aborts; no blocks leak."""

import random

import pytest

from fleetwise.worker.engine.block_manager import BlockManager
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.scheduler import Scheduler
from fleetwise.worker.engine.sequence import SamplingParams, Sequence, SequenceStatus


def next_token(token_ids):
    """A deterministic "model": the next token is a function of the whole history."""
    h = 17
    for t in token_ids:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return 1000 + h % 997


def reference(prompt, max_tokens):
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt):]


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   enable_chunked_prefill=True, enable_prefix_caching=True):
    config = EngineConfig(model="unused", max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          block_size=block_size, num_blocks=num_blocks,
                          enable_chunked_prefill=enable_chunked_prefill,
                          enable_prefix_caching=enable_prefix_caching)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(config, bm)


def make_seq(prompt, max_tokens=4, request_id="r", index=0, parent=None):
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0),
                    request_id, index, parent=parent)


class FakeEngine:
    """schedule -> forward -> update_computed -> sample, as the engine does it. The forward
    pass checks that every position it attends to holds the KV of exactly its own prefix,
    and writes the KV of the scheduled positions."""

    def __init__(self, sched):
        self.sched = sched
        self.bm = sched.block_manager
        self.kv = {}  # (block, slot) -> the token prefix ending at that position
        self.batches = []

    def add(self, *seqs):
        for s in seqs:
            self.sched.add(s)

    def step(self):
        sched, bm = self.sched, self.bm
        batch = sched.schedule()
        self.batches.append(batch)
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len(batch.seqs) == len(batch.num_new_tokens) == len(set(map(id, batch.seqs)))
        for seq in batch.preempted:
            assert seq.status == SequenceStatus.WAITING and seq in sched.waiting
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            assert seq not in batch.seqs
        bs = bm.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status == SequenceStatus.RUNNING and seq in sched.running
            start = seq.num_computed_tokens
            assert n >= 1 and start + n <= seq.num_tokens
            assert len(seq.block_table) >= bm.blocks_needed(start + n)
            for p in range(start):  # attention reads the cached positions
                got = self.kv.get((seq.block_table[p // bs], p % bs))
                assert got == tuple(seq.token_ids[:p + 1]), f"stale KV at position {p}"
            for p in range(start, start + n):
                block = seq.block_table[p // bs]
                assert bm.blocks[block].ref_count == 1, "writing into a shared block"
                self.kv[(block, p % bs)] = tuple(seq.token_ids[:p + 1])
        sched.update_computed(batch)
        for seq in batch.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(next_token(seq.token_ids))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        check_state(sched)
        return batch

    def run(self, max_steps=1000):
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("the scheduler made no progress")


def check_state(sched):
    bm = sched.block_manager
    running, waiting = sched.running, list(sched.waiting)
    assert not set(map(id, running)) & set(map(id, waiting))
    assert len(set(map(id, running))) == len(running)
    assert len(set(map(id, waiting))) == len(waiting)
    assert all(s.status == SequenceStatus.RUNNING for s in running)
    assert all(s.status == SequenceStatus.WAITING for s in waiting)
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in waiting)
    counts = [0] * bm.num_blocks
    for s in running:
        for b in s.block_table:
            counts[b] += 1
    assert [b.ref_count for b in bm.blocks] == counts
    assert bm.num_free_blocks == counts.count(0)
    assert {b for s in running for b in s.block_table}.isdisjoint(bm.free_block_ids)


def assert_no_leak(sched):
    bm = sched.block_manager
    assert not sched.has_work()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def steps_of(engine, seq):
    """The number of tokens `seq` was given in each recorded step (0: not scheduled)."""
    out = []
    for batch in engine.batches:
        n = [k for s, k in zip(batch.seqs, batch.num_new_tokens) if s is seq]
        out.append(n[0] if n else 0)
    return out


# -- the basic cycle ----------------------------------------------------------------------


def test_prefill_then_decode_until_max_tokens():
    sched = make_scheduler()
    eng = FakeEngine(sched)
    seq = make_seq(range(5), max_tokens=3)
    eng.add(seq)
    eng.run()
    assert steps_of(eng, seq) == [5, 1, 1]
    assert seq.is_finished and seq.finish_reason == "length"
    assert seq.output_token_ids == reference(range(5), 3)
    assert seq.block_table == []
    assert_no_leak(sched)


def test_empty_step_when_nothing_to_do():
    sched = make_scheduler()
    batch = sched.schedule()
    assert not batch and batch.num_tokens == 0 and batch.preempted == []


def test_chunked_prefill_of_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, block_size=4)
    eng = FakeEngine(sched)
    seq = make_seq(range(20), max_tokens=2)
    eng.add(seq)
    computed, blocks, lengths = [], [], []
    while sched.has_work():
        eng.step()
        computed.append(seq.num_computed_tokens)
        blocks.append(len(seq.block_table))
        lengths.append(seq.num_tokens)
    assert steps_of(eng, seq) == [8, 8, 4, 1]
    # blocks grow with the chunks; no token is sampled until the prompt is all computed
    assert computed[:3] == [8, 16, 20]
    assert blocks[:3] == [2, 4, 5]
    assert lengths[:3] == [20, 20, 21]
    assert seq.output_token_ids == reference(range(20), 2)
    assert_no_leak(sched)


def test_decodes_and_a_prompt_chunk_share_a_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    eng = FakeEngine(sched)
    a = make_seq(range(3), max_tokens=10)
    eng.add(a)
    eng.step()
    b = make_seq(range(100, 120), max_tokens=2)
    eng.add(b)
    batch = eng.step()
    assert batch.seqs == [a, b]          # running first
    assert batch.num_new_tokens == [1, 7]  # the decode, then a chunk of what is left
    batch = eng.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7]
    batch = eng.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 6]
    eng.run()
    assert a.output_token_ids == reference(range(3), 10)
    assert b.output_token_ids == reference(range(100, 120), 2)
    assert_no_leak(sched)


def test_budget_runs_out_on_running_sequences_oldest_first():
    sched = make_scheduler(max_num_batched_tokens=4, max_num_seqs=8)
    eng = FakeEngine(sched)
    seqs = [make_seq([i], max_tokens=6) for i in range(6)]
    eng.add(*seqs)
    batch = eng.step()
    assert batch.seqs == seqs[:4]  # one prompt token each fills the budget
    assert list(sched.waiting) == seqs[4:]
    eng.run()
    for s in seqs:
        assert s.output_token_ids == reference(s.token_ids[:1], 6)
    assert_no_leak(sched)


def test_budget_and_max_num_seqs_hold_under_load():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=200, max_num_seqs=3, max_num_batched_tokens=10)
    eng = FakeEngine(sched)
    seqs = [make_seq([rng.randrange(500) for _ in range(rng.randint(1, 25))],
                     max_tokens=rng.randint(1, 8)) for _ in range(12)]
    eng.add(*seqs)
    full_steps = 0
    while sched.has_work():
        batch = eng.step()  # checks the budget and max_num_seqs
        assert len(batch.seqs) <= 3
        full_steps += batch.num_tokens == 10
    assert full_steps > 0  # the budget was the limit at times
    for s in seqs:
        assert s.output_token_ids == reference(s.token_ids[:s.num_prompt_tokens], s.params.max_tokens)
    assert_no_leak(sched)


# -- admission order --------------------------------------------------------------------


def test_fcfs_admission_under_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    eng = FakeEngine(sched)
    a, b, c, d = (make_seq([i, i], max_tokens=m) for i, m in zip(range(4), (1, 3, 2, 2)))
    eng.add(a, b, c, d)
    batch = eng.step()
    assert batch.seqs == [a, b]
    assert list(sched.waiting) == [c, d]
    assert a.is_finished  # one token: done after the first step
    batch = eng.step()
    assert batch.seqs == [b, c]  # the free slot goes to the earliest waiting
    assert list(sched.waiting) == [d]
    started = {}
    while sched.has_work():
        batch = eng.step()
        for s in batch.seqs:
            started.setdefault(s.seq_id, len(eng.batches))
    assert d.seq_id in started
    assert_no_leak(sched)


def test_a_waiting_head_that_does_not_fit_is_not_overtaken():
    sched = make_scheduler(num_blocks=4, block_size=4)
    eng = FakeEngine(sched)
    a = make_seq(range(7), max_tokens=1)         # 2 blocks
    b = make_seq(range(100, 112), max_tokens=1)  # 3 blocks: does not fit beside a
    c = make_seq(range(200, 203), max_tokens=1)  # 1 block: would fit, but came later
    eng.add(a, b, c)
    batch = eng.step()
    assert batch.seqs == [a]
    assert list(sched.waiting) == [b, c]
    batch = eng.step()
    assert batch.seqs == [b, c]
    eng.run()
    assert_no_leak(sched)


def test_without_chunked_prefill_a_prompt_waits_for_room_in_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    eng = FakeEngine(sched)
    a = make_seq(range(3), max_tokens=3)
    eng.add(a)
    eng.step()
    b = make_seq(range(100, 108), max_tokens=1)  # 8 tokens: only fits a step of its own
    eng.add(b)
    assert eng.step().seqs == [a]
    assert eng.step().seqs == [a]  # a's last token
    assert a.is_finished
    batch = eng.step()
    assert batch.seqs == [b] and batch.num_new_tokens == [8]
    assert b.is_finished
    assert_no_leak(sched)


def test_watermark_keeps_headroom_while_something_runs():
    sched = make_scheduler(num_blocks=10, block_size=4)
    assert sched.watermark == 1
    eng = FakeEngine(sched)
    a = make_seq(range(4), max_tokens=1)          # 1 block
    b = make_seq(range(100, 136), max_tokens=1)   # 9 blocks: fits the 9 free, not with headroom
    eng.add(a, b)
    assert eng.step().seqs == [a]
    assert list(sched.waiting) == [b]
    assert a.is_finished
    batch = eng.step()  # nothing runs now: no headroom needed
    assert batch.seqs == [b] and batch.num_new_tokens == [36]
    eng.run()
    assert_no_leak(sched)


def test_no_watermark_when_nothing_runs():
    sched = make_scheduler(num_blocks=10, block_size=4)
    eng = FakeEngine(sched)
    a = make_seq(range(40), max_tokens=1)  # every block in the cache
    eng.add(a)
    batch = eng.step()
    assert batch.seqs == [a] and batch.num_new_tokens == [40]
    assert a.is_finished and a.output_token_ids == reference(range(40), 1)
    assert_no_leak(sched)


def test_small_caches_have_no_watermark():
    assert make_scheduler(num_blocks=8).watermark == 0
    assert make_scheduler(num_blocks=300).watermark == 3


# -- preemption -------------------------------------------------------------------------


def test_preemption_takes_the_newest_and_requeues_it_first():
    # block_size 1: every decode needs a new block
    sched = make_scheduler(num_blocks=7, block_size=1)
    eng = FakeEngine(sched)
    bm = sched.block_manager
    a = make_seq([1, 2], max_tokens=4)
    b = make_seq([3, 4], max_tokens=4)
    eng.add(a, b)
    eng.step()  # a and b: 2 blocks each
    c = make_seq([5], max_tokens=4)
    d = make_seq([6, 7, 8], max_tokens=1)
    eng.add(c, d)
    batch = eng.step()  # a and b decode (1 block each), c starts (1 block): the pool is empty
    assert batch.seqs == [a, b, c]
    assert list(sched.waiting) == [d]
    assert bm.num_free_blocks == 0
    c_blocks = list(c.block_table)

    batch = eng.step()
    # a needs a block: c, the newest, goes; b then finds nothing and is the newest left
    assert batch.seqs == [a]
    assert batch.preempted == [c, b]
    assert sched.num_preemptions == 2
    assert sched.running == [a]
    assert list(sched.waiting) == [b, c, d]  # arrival order kept, ahead of d
    assert c.block_table == [] and b.block_table == []
    assert set(c_blocks) & set(a.block_table)  # a got c's block
    assert b.num_tokens == 4 and c.num_tokens == 2  # their tokens stay for recomputation

    eng.run()
    for s, prompt in ((a, [1, 2]), (b, [3, 4]), (c, [5]), (d, [6, 7, 8])):
        assert s.is_finished and s.finish_reason == "length"
        assert s.output_token_ids == reference(prompt, s.params.max_tokens)
    assert_no_leak(sched)


def test_preempted_sequence_recomputes_all_its_tokens():
    sched = make_scheduler(num_blocks=6, block_size=2, enable_prefix_caching=False)
    eng = FakeEngine(sched)
    a = make_seq([1, 2, 3], max_tokens=6)
    b = make_seq([4, 5, 6], max_tokens=6)
    eng.add(a, b)
    preempted_at = None
    while sched.has_work():
        batch = eng.step()
        if b in batch.preempted and preempted_at is None:
            preempted_at = len(eng.batches)
            tokens_then = b.num_tokens
    assert preempted_at is not None
    readmit = next(k for k in steps_of(eng, b)[preempted_at:] if k)
    assert readmit == tokens_then  # prompt and outputs so far, computed again
    assert b.num_output_tokens == 6
    assert a.output_token_ids == reference([1, 2, 3], 6)
    assert b.output_token_ids == reference([4, 5, 6], 6)
    assert_no_leak(sched)


@pytest.mark.parametrize("caching", [True, False])
def test_tight_memory_gives_the_same_tokens_as_ample_memory(caching):
    rng = random.Random(1)
    stem = [rng.randrange(300) for _ in range(10)]
    prompts = [stem[:rng.randint(0, 10)] + [rng.randrange(300) for _ in range(rng.randint(1, 8))]
               for _ in range(10)]
    max_tokens = [rng.randint(3, 12) for _ in prompts]

    def run(num_blocks):
        sched = make_scheduler(num_blocks=num_blocks, block_size=2, max_num_batched_tokens=16,
                               enable_prefix_caching=caching)
        eng = FakeEngine(sched)
        seqs = [make_seq(p, m) for p, m in zip(prompts, max_tokens)]
        eng.add(*seqs)
        eng.run(5000)
        assert_no_leak(sched)
        return [s.output_token_ids for s in seqs], sched.num_preemptions

    ample, n_ample = run(200)
    tight, n_tight = run(15)
    assert n_ample == 0 and n_tight > 0
    assert tight == ample
    assert [len(o) for o in tight] == max_tokens


# -- prefix caching ---------------------------------------------------------------------


def test_a_repeated_prompt_computes_only_its_uncached_tail():
    sched = make_scheduler(block_size=4)
    bm = sched.block_manager
    eng = FakeEngine(sched)
    prompt = list(range(10))
    first = make_seq(prompt, max_tokens=2)
    eng.add(first)
    eng.run()
    assert first.num_cached_tokens == 0
    assert (bm.prefix_queries, bm.prefix_hits) == (10, 0)

    second = make_seq(prompt, max_tokens=2)
    eng.add(second)
    batch = eng.step()
    assert batch.num_new_tokens == [2]  # two full blocks came from the cache
    assert second.num_cached_tokens == 8
    assert (bm.prefix_queries, bm.prefix_hits) == (20, 8)
    eng.run()
    assert second.output_token_ids == first.output_token_ids == reference(prompt, 2)
    assert_no_leak(sched)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block():
    sched = make_scheduler(block_size=4)
    eng = FakeEngine(sched)
    prompt = list(range(8))
    eng.add(make_seq(prompt, max_tokens=1))
    eng.run()
    second = make_seq(prompt, max_tokens=2)
    eng.add(second)
    assert eng.step().num_new_tokens == [4]
    assert second.num_cached_tokens == 4
    eng.run()
    assert second.output_token_ids == reference(prompt, 2)
    assert_no_leak(sched)


def test_concurrent_identical_prompts_share_blocks():
    sched = make_scheduler(block_size=4)
    bm = sched.block_manager
    eng = FakeEngine(sched)
    prompt = list(range(50, 63))  # 13 tokens: 3 full blocks
    first = make_seq(prompt, max_tokens=6)
    eng.add(first)
    eng.step()
    second = make_seq(prompt, max_tokens=6)
    eng.add(second)
    batch = eng.step()
    assert batch.seqs == [first, second] and batch.num_new_tokens == [1, 1]
    assert second.block_table[:3] == first.block_table[:3]
    assert [bm.blocks[b].ref_count for b in first.block_table[:3]] == [2, 2, 2]
    assert second.block_table[3] != first.block_table[3]
    used = bm.num_blocks - bm.num_free_blocks
    assert used == 5  # 4 for the first, 1 more for the second
    eng.run()
    assert second.output_token_ids == first.output_token_ids == reference(prompt, 6)
    assert_no_leak(sched)


def test_without_prefix_caching_nothing_is_reused():
    sched = make_scheduler(block_size=4, enable_prefix_caching=False)
    eng = FakeEngine(sched)
    prompt = list(range(10))
    eng.add(make_seq(prompt, max_tokens=1))
    eng.run()
    second = make_seq(prompt, max_tokens=2)
    eng.add(second)
    assert eng.step().num_new_tokens == [10]
    assert second.num_cached_tokens == 0
    assert sched.block_manager.prefix_hits == 0
    eng.run()
    assert_no_leak(sched)


# -- n > 1 ------------------------------------------------------------------------------


def test_siblings_wait_for_the_parent_prompt_then_reuse_its_blocks():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=8)
    bm = sched.block_manager
    eng = FakeEngine(sched)
    prompt = list(range(300, 312))  # 12 tokens: three full blocks
    parent = make_seq(prompt, max_tokens=3, request_id="n3", index=0)
    s1 = make_seq(prompt, max_tokens=3, request_id="n3", index=1, parent=parent)
    s2 = make_seq(prompt, max_tokens=3, request_id="n3", index=2, parent=parent)
    eng.add(parent, s1, s2)

    batch = eng.step()
    assert batch.seqs == [parent] and batch.num_new_tokens == [8]
    assert list(sched.waiting) == [s1, s2]

    q = make_seq(range(400, 404), max_tokens=1)
    r = make_seq(range(500, 503), max_tokens=1)
    eng.add(q, r)
    batch = eng.step()
    # the siblings are held back while the parent's prompt is incomplete; a later request
    # is not held back by them, and they keep their place ahead of the one still waiting
    assert batch.seqs == [parent, q] and batch.num_new_tokens == [4, 4]
    assert list(sched.waiting) == [s1, s2, r]
    assert parent.num_computed_tokens == 12

    batch = eng.step()
    assert batch.seqs == [parent, s1, s2]
    assert list(sched.waiting) == [r]
    assert batch.num_new_tokens == [1, 4, 3]  # each sibling skips the two cached blocks
    assert s1.num_cached_tokens == s2.num_cached_tokens == 8
    assert s1.block_table[:2] == s2.block_table[:2] == parent.block_table[:2]
    assert [bm.blocks[b].ref_count for b in parent.block_table[:2]] == [3, 3]
    assert s1.block_table[2] != parent.block_table[2] != s2.block_table[2]

    eng.run()
    for s in (parent, s1, s2):
        assert s.output_token_ids == reference(prompt, 3)
    assert_no_leak(sched)


def test_a_sibling_of_an_aborted_parent_starts():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    eng = FakeEngine(sched)
    prompt = list(range(10))
    parent = make_seq(prompt, max_tokens=2)
    child = make_seq(prompt, max_tokens=2, index=1, parent=parent)
    eng.add(parent, child)
    eng.step()
    assert list(sched.waiting) == [child]
    sched.finish(parent, "abort")
    batch = eng.step()
    assert batch.seqs == [child]
    eng.run()
    assert child.output_token_ids == reference(prompt, 2)
    assert_no_leak(sched)


# -- aborts -----------------------------------------------------------------------------


def test_abort_while_waiting():
    sched = make_scheduler(max_num_seqs=1)
    eng = FakeEngine(sched)
    a = make_seq(range(5), max_tokens=3)
    b = make_seq(range(10, 15), max_tokens=3)
    c = make_seq(range(20, 25), max_tokens=3)
    eng.add(a, b, c)
    eng.step()
    sched.finish(b, "abort")
    assert b.is_finished and b.finish_reason == "abort"
    assert list(sched.waiting) == [c]
    eng.run()
    assert b.num_output_tokens == 0
    assert all(b not in batch.seqs for batch in eng.batches)
    assert c.output_token_ids == reference(range(20, 25), 3)
    assert_no_leak(sched)


def test_abort_while_running_frees_its_blocks():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    bm = sched.block_manager
    eng = FakeEngine(sched)
    a = make_seq(range(3), max_tokens=20)
    b = make_seq(range(100, 120), max_tokens=5)  # chunked over several steps
    eng.add(a, b)
    eng.step()
    eng.step()
    assert b.status == SequenceStatus.RUNNING and 0 < b.num_computed_tokens < b.num_tokens
    held_by_b = len(b.block_table)
    free_before = bm.num_free_blocks
    sched.finish(b, "abort")
    assert b.is_finished and b.finish_reason == "abort"
    assert b not in sched.running and b.block_table == []
    assert bm.num_free_blocks == free_before + held_by_b
    check_state(sched)
    batch = eng.step()
    assert batch.seqs == [a]
    sched.finish(a, "abort")
    assert_no_leak(sched)


def test_abort_after_preemption():
    sched = make_scheduler(num_blocks=7, block_size=1)
    eng = FakeEngine(sched)
    a = make_seq([1, 2], max_tokens=4)
    b = make_seq([3, 4], max_tokens=4)
    eng.add(a, b)
    eng.step()
    c = make_seq([5], max_tokens=4)
    eng.add(c)
    eng.step()
    batch = eng.step()
    assert c in batch.preempted
    sched.finish(c, "abort")
    assert c not in sched.waiting and c.is_finished
    check_state(sched)
    eng.run()
    assert c.num_output_tokens == 1
    assert a.output_token_ids == reference([1, 2], 4)
    assert b.output_token_ids == reference([3, 4], 4)
    assert_no_leak(sched)


# -- property test ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_workload(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    num_blocks = rng.choice([12, 20, 40])
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size,
                           max_num_seqs=rng.choice([2, 4, 8]),
                           max_num_batched_tokens=rng.choice([6, 16, 32]),
                           enable_chunked_prefill=True)
    bm = sched.block_manager
    eng = FakeEngine(sched)
    stems = [[rng.randrange(200) for _ in range(16)] for _ in range(3)]
    cap = num_blocks * block_size  # a request must fit the cache on its own
    all_seqs, aborted = [], set()

    def new_request():
        stem = rng.choice(stems)
        prompt = stem[:rng.randint(0, 16)] + [rng.randrange(200) for _ in range(rng.randint(1, 6))]
        max_tokens = rng.randint(1, 10)
        prompt = prompt[:cap - max_tokens]
        first = make_seq(prompt, max_tokens, request_id=str(len(all_seqs)))
        seqs = [first]
        for i in range(1, rng.choice([1, 1, 1, 2, 3])):
            seqs.append(make_seq(prompt, max_tokens, first.request_id, i, parent=first))
        eng.add(*seqs)
        all_seqs.extend(seqs)

    for _ in range(40):
        new_request()
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 5000, "the scheduler made no progress"
        if rng.random() < 0.1:
            new_request()
        if rng.random() < 0.03:
            live = [s for s in all_seqs if not s.is_finished]
            if live:
                victim = rng.choice(live)
                sched.finish(victim, "abort")
                aborted.add(victim.seq_id)
                check_state(sched)
        eng.step()

    for s in all_seqs:
        assert s.is_finished
        prompt = s.token_ids[:s.num_prompt_tokens]
        if s.seq_id in aborted:
            assert s.finish_reason == "abort"
            assert s.output_token_ids == reference(prompt, s.num_output_tokens)
        else:
            assert s.finish_reason == "length"
            assert s.output_token_ids == reference(prompt, s.params.max_tokens)
    assert bm.prefix_hits > 0
    assert_no_leak(sched)


def test_random_workloads_exercise_preemption():
    """The property test above is only meaningful if memory pressure actually happens."""
    preempted = 0
    for seed in range(8):
        rng = random.Random(seed)
        block_size = rng.choice([1, 2, 4])
        num_blocks = rng.choice([12, 20, 40])
        sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=8,
                               max_num_batched_tokens=32)
        eng = FakeEngine(sched)
        cap = num_blocks * block_size  # the engine refuses requests larger than the cache
        for _ in range(12):
            max_tokens = rng.randint(5, 10)
            prompt = [rng.randrange(200) for _ in range(rng.randint(1, 10))]
            eng.add(make_seq(prompt[:cap - max_tokens], max_tokens))
        eng.run(5000)
        preempted += sched.num_preemptions
        assert_no_leak(sched)
    assert preempted > 0
