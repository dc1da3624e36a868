"""A worker's coalesced stream (`x-fleetwise-coalesce: 1` with the token ids,
fleetwise/protocol.py): the outputs are `fw:` lines alone, with their text, held and merged per
choice (`HeldIds`); the text comes as one event before the usage, the same text the worker
answers whole. With logprobs asked the stream keeps its event per token."""

import json

import httpx
import pytest

from fleetwise.protocol import COALESCE_HEADER, TOKEN_IDS_HEADER
from fleetwise.worker.api.responses import HeldIds
from fleetwise.worker.engine.config import EngineConfig

from .workers import AUTH, start_worker

HEADERS = {**AUTH, TOKEN_IDS_HEADER: "1", COALESCE_HEADER: "1"}


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=256))
    yield w
    w.stop()


def read(worker, path: str, body: dict) -> tuple[list[dict], list[dict]]:
    """(the `fw:` lines, the data events) of a stream."""
    r = httpx.post(worker.internal_url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                   headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    lines, events = [], []
    for event in r.text.split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("fw: "):
                lines.append(json.loads(line[4:]))
            elif line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return lines, events


def test_a_coalesced_completion_sends_its_text_once_and_in_its_fw_lines(worker):
    body = {"model": "tiny", "prompt": "coalesced text", "max_tokens": 12, "n": 2, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(worker.url + "/v1/completions", json=body, timeout=60).json()
    lines, events = read(worker, "/v1/completions", body)
    for k in (0, 1):  # every output token's id, in fewer lines than tokens (merged: at most 4 a second)
        assert sum(len(d["token_ids"]) for d in lines if d["index"] == k) == 12
    assert len(lines) < 24
    assert [d["finish_reason"] for d in lines if d["finish_reason"]] == ["length", "length"]
    [merged, usage] = events
    assert usage["usage"]["completion_tokens"] == 24 and usage["choices"] == []
    assert [c["text"] for c in merged["choices"]] == [c["text"] for c in whole["choices"]]
    assert [c["finish_reason"] for c in merged["choices"]] == ["length", "length"]
    for k in (0, 1):
        assert "".join(d["text"] for d in lines if d["index"] == k) == whole["choices"][k]["text"]


def test_a_coalesced_chat_sends_one_message_event(worker):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=60).json()
    lines, events = read(worker, "/v1/chat/completions", body)
    [merged, _] = events
    assert merged["object"] == "chat.completion.chunk"
    assert merged["choices"][0]["delta"] == {"role": "assistant", "content": whole["choices"][0]["message"]["content"]}
    assert "".join(d["text"] for d in lines) == whole["choices"][0]["message"]["content"]


def test_with_logprobs_the_stream_keeps_an_event_per_token(worker):
    lines, events = read(worker, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5, "logprobs": 1,
                                                     "temperature": 0, "ignore_eos": True})
    assert len(events) == 6 and all(e["choices"][0]["logprobs"] for e in events[:5])
    assert all("text" not in d for d in lines)


def test_held_lines_go_merged_per_choice_a_prompts_first_at_once():
    now = [0.0]
    held = HeldIds(every=0.25, clock=lambda: now[0])
    first = held.add({"index": 0, "token_ids": [5], "finish_reason": None, "text": "a", "prompt": 0,
                      "prompt_token_ids": [1, 2], "request_id": "r0", "id": "cmpl-1", "created": 7})
    assert [json.loads(x[4:]) for x in first.split("\n\n") if x] == [
        {"index": 0, "token_ids": [5], "finish_reason": None, "text": "a", "prompt": 0, "prompt_token_ids": [1, 2],
         "request_id": "r0", "id": "cmpl-1", "created": 7}]
    now[0] = 0.1
    assert held.add({"index": 1, "token_ids": [6], "finish_reason": None, "text": "b"}) == ""
    assert held.add({"index": 0, "token_ids": [8], "finish_reason": None, "text": "c"}) == ""
    now[0] = 0.24
    assert held.add({"index": 0, "token_ids": [9, 10], "finish_reason": "length", "text": "de"}) == ""
    now[0] = 0.26  # a quarter second since the first line went
    sent = held.add({"index": 1, "token_ids": [11], "finish_reason": "stop", "text": "f"})
    assert sent.endswith("\n\n") and sent.count("\n\n") == 2
    assert [json.loads(x[4:]) for x in sent.split("\n\n") if x] == [
        {"index": 1, "token_ids": [6, 11], "finish_reason": "stop", "text": "bf"},
        {"index": 0, "token_ids": [8, 9, 10], "finish_reason": "length", "text": "cde"}]
    assert held.lines == {}
    now[0] = 0.3
    assert held.add({"index": 0, "token_ids": [12], "finish_reason": None, "text": "g"}) == ""
    assert json.loads(held.flush()[4:]) == {"index": 0, "token_ids": [12], "finish_reason": None, "text": "g"}


def test_held_ids_go_out_before_a_drains_migrated_event_and_before_an_engine_error():
    """Every id sampled before the stream ends is sent first: the router resumes from them
    (a drain's KV holds exactly those tokens)."""
    import asyncio

    from fleetwise.worker.api.responses import Merged, events, tracer
    from fleetwise.worker.engine.async_engine import EngineDead
    from fleetwise.worker.engine.engine import RequestOutput
    from fleetwise.worker.engine.migration import MIGRATED

    async def outputs(end: str):
        for k in range(5):
            yield 0, RequestOutput("r0", 0, [10 + k], f"t{k}")
        if end == "migrated":
            yield 0, RequestOutput("r0", 0, [], "", finished=True, finish_reason=MIGRATED)
        else:
            raise EngineDead("the engine is gone")

    async def read(end: str) -> list[str]:
        chunk = lambda i, out: {"id": "c", "choices": [{"index": out.index, "text": out.text,  # noqa: E731
                                                       "finish_reason": None}]}
        return [e async for e in events(outputs(end), chunk, None, tracer([[1, 2]], "c", 0, 1, True),
                                        Merged(chat=False))]

    for end, code in (("migrated", MIGRATED), ("engine", "engine_unavailable")):
        sent = "".join(asyncio.run(read(end)))
        ids = [t for line in sent.split("\n") if line.startswith("fw: ") for t in json.loads(line[4:])["token_ids"]]
        assert ids == [10, 11, 12, 13, 14]
        assert sent.index(f'"code": "{code}"') > sent.rindex("fw: ")
        assert sent.count("fw: ") == 2  # the first at once, the other four held and merged
