"""A coalesced stream (an answer the router assembles: each output's `fw:` line alone with its
text, the text as one event at the end, fleetwise/protocol.py) that moves: the text its
worker generated reaches the answer once, from the `fw:` lines, however often it moves and
wherever it breaks."""

import asyncio
import json
from collections.abc import AsyncIterator

from fleetwise.router.assemble import assemble
from fleetwise.router.metrics import RouterMetrics
from fleetwise.router.migrate import Mover, Where, migrating
from fleetwise.router.replica import Replica
from fleetwise.router.tracker import Tracker
from fleetwise.router.upstream import Upstream, UpstreamError

HEAD = {"id": "c-1", "created": 1, "prompt": 0, "prompt_token_ids": [1, 2], "request_id": "r"}


def fw(token: int, text: str, first: bool = False, finish: str | None = None) -> bytes:
    d = {"index": 0, "token_ids": [token], "finish_reason": finish, "text": text, **(HEAD if first else {})}
    return b"fw: " + json.dumps(d).encode() + b"\n\n"


def merged(text: str) -> bytes:
    event = {"id": "c-1", "object": "text_completion", "created": 1, "model": "tiny",
             "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def breaking(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c
    raise UpstreamError("connection closed: by the replica")


async def ending(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def answer(first: bytes, rest: AsyncIterator[bytes], resumes: list[AsyncIterator[bytes]]) -> tuple[dict, list]:
    """The assembled answer of a coalesced stream that moves to each of `resumes` in turn; and
    what each resume call was asked (its payload and whether it asked for coalescing)."""
    replicas = [Replica(f"http://w-{i}:1", "tiny", "mixed") for i in range(4)]
    asked: list = []

    async def call(model, role, others, payload, keys, coalesce) -> Upstream:
        asked.append((json.loads(payload), coalesce))
        return Upstream(200, "text/event-stream", b"", resumes[len(asked) - 1], replica=others[0])

    async def main() -> bytes:
        mover = Mover(call=call, broken=lambda replica, e: None, metrics=RouterMetrics(), max_kept=1000,
                      max_migrations=3)
        up = migrating(Upstream(200, "text/event-stream", first, rest, replica=replicas[0]),
                       Where("tiny", "mixed", replicas, "completion", {"model": "tiny", "prompt": "x"}, [],
                             coalesce=True), mover)
        return (await assemble(up, "completion")).body
    return json.loads(asyncio.run(main())), asked


def test_the_text_of_a_broken_coalesced_stream_comes_from_its_fw_lines_once():
    got, asked = answer(fw(5, "a", first=True), breaking(fw(6, "b")),
                        [ending(fw(7, "c"), merged("c"), b"data: [DONE]\n\n")])
    assert got["choices"][0]["text"] == "abc"
    assert got["id"] == "c-1" and got["choices"][0]["finish_reason"] == "length"
    [(payload, coalesce)] = asked
    assert coalesce and payload["choices"][0]["output_token_ids"] == [5, 6]


def test_a_stream_that_moves_twice_keeps_each_workers_text_once():
    got, asked = answer(fw(5, "a", first=True), breaking(fw(6, "b")),
                        [breaking(fw(7, "c")), ending(fw(8, "d"), merged("d"), b"data: [DONE]\n\n")])
    assert got["choices"][0]["text"] == "abcd"
    assert [p["choices"][0]["output_token_ids"] for p, _ in asked] == [[5, 6], [5, 6, 7]]


def test_a_stream_that_breaks_after_its_text_was_passed_on_repeats_none_of_it():
    """The merged event went out, then the connection broke before [DONE]: the resume adds
    nothing that was already there."""
    got, _ = answer(fw(5, "a", first=True), breaking(fw(6, "b", finish="length"), merged("ab")),
                    [ending(b"data: [DONE]\n\n")])
    assert got["choices"][0]["text"] == "ab"


def test_lines_without_text_leave_nothing_to_pass_on():
    """A stream whose events carry their text (not coalesced, or a worker that ignores the
    header): its `fw:` lines have none, and a move adds nothing of its own."""
    t = Tracker(max_kept=100)
    line = {"index": 0, "token_ids": [5], "finish_reason": None, **HEAD}
    out = t.feed(b"fw: " + json.dumps(line).encode() + b'\ndata: {"choices": [{"index": 0, "text": "a"}]}\n\n')
    assert out and t.unsent_text("completion", "tiny") == b""
    t = Tracker(max_kept=100)
    assert t.feed(fw(5, "a", first=True) + fw(6, "b")) == b""
    event = t.unsent_text("chat", "tiny")
    assert json.loads(event[6:])["choices"] == [{"index": 0, "delta": {"content": "ab"}}]
    assert t.unsent_text("chat", "tiny") == b""  # passed on once
