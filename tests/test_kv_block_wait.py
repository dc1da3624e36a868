"""A handed-over prompt that finds no KV blocks to spare on its decode worker waits for
running decodes to free theirs, first come first served, instead of being recomputed among
them at once (a prompt pass inside every running decode's steps)."""

import asyncio

from fleetwise.worker.api import handoff
from fleetwise.worker.api.handoff import Handoff
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.engine.sequence import SamplingParams, SequenceStatus
from fleetwise.worker.kv.connector import KVConnector

BS = 8


def test_a_reservation_without_blocks_gets_them_once_a_request_lets_go(tiny_model_dir):
    core = LLMEngine(EngineConfig(model=str(tiny_model_dir), block_size=BS, num_blocks=8))
    connector = KVConnector(core)
    core.kv_connector = connector
    held = connector.reserve_kv("a", list(range(3, 51)), 7, SamplingParams(max_tokens=4))  # 48 tokens
    assert held is not None and len(held.blocks) == 6
    assert connector.reserve_kv("b", list(range(60, 90)), 7, SamplingParams(max_tokens=4)) is None
    assert connector.retry_reserve("b") is None  # still none
    assert core.requests["b"][0].status == SequenceStatus.RESERVED and not core.requests["b"][0].block_table
    core.abort_request("a")
    res = connector.retry_reserve("b")
    assert res is not None and res.start == 0 and res.num_tokens == 30 and len(res.blocks) == 4
    assert connector.retry_reserve("b").blocks.tolist() == res.blocks.tolist()  # asked again: the same
    assert connector.retry_reserve("nobody") is None


class _Engine:
    """Runs a call at once, as the engine thread would between steps."""

    async def call(self, fn, *args):
        return fn(*args)


class _Connector:
    """Blocks for one request at a time, once `free` says so; notes who got them, in order."""

    def __init__(self):
        self.free, self.got = 0, []

    def retry_reserve(self, rid):
        if self.free:
            self.free -= 1
            self.got.append(rid)
            return rid
        return None


def test_waiters_get_freed_blocks_in_arrival_order_and_give_up_after_the_limit(monkeypatch):
    waits = Handoff.__new__(Handoff)
    waits.engine, waits.connector = _Engine(), _Connector()
    waits.waiting_blocks = handoff.collections.deque()

    async def scenario():
        first = asyncio.ensure_future(waits._blocks_freed("first"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(waits._blocks_freed("second"))
        await asyncio.sleep(0.2)
        assert list(waits.waiting_blocks) == ["first", "second"] and waits.connector.got == []
        waits.connector.free = 1  # one request's blocks come free: the first waiter's
        assert await first == "first"
        await asyncio.sleep(0.2)
        assert not second.done() and waits.waiting_blocks[0] == "second"
        waits.connector.free = 1
        assert await second == "second" and not waits.waiting_blocks
        monkeypatch.setattr(handoff, "KV_BLOCKS_WAIT_S", 0.2)
        assert await waits._blocks_freed("late") is None and not waits.waiting_blocks  # recomputed then
    asyncio.run(scenario())
    assert waits.connector.got == ["first", "second"]
