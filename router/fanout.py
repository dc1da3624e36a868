"""Disaggregated requests with several sequences (n > 1, prompt lists): one handoff per
sequence, and their answers merged back into one OpenAI response or stream; a merged stream
that loses one of its sequences ends with an error, as a single stream does."""

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .limits import whole
from .replica import Replica
from .retries import error_event
from .upstream import Upstream, UpstreamError


def fan_out(body: dict, kind: str) -> list[tuple[dict, int]]:
    """One sub-request per prompt and choice (a handoff carries one sequence), with the
    choice's index offset; seeded choices get seed + j, as a worker gives its j-th choice.
    A body whose `n`, `seed` or prompt list is not what the worker takes goes whole: the
    prefill worker refuses it with a 400 naming the field, as a colocated worker would."""
    n = 1 if body.get("n") is None else whole(body["n"])
    seed = None if body.get("seed") is None else whole(body["seed"])
    if n is None or n < 1 or (seed is None and body.get("seed") is not None):
        return [(body, 0)]
    prompts = [None]
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(_ids(x) for x in p)):
            prompts = p
    if n == 1 and len(prompts) == 1:
        return [(body, 0)]
    subs = []
    for i, p in enumerate(prompts):
        for j in range(n):
            sub = {**body, "n": 1}
            if p is not None:
                sub["prompt"] = p
            if seed is not None:
                sub["seed"] = _wrap64(seed + j)
            subs.append((sub, i * n + j))
    return subs


def _ids(x: object) -> bool:
    """A prompt as token ids, as a list of prompts holds them."""
    return isinstance(x, list) and all(whole(t) is not None for t in x)


def _wrap64(seed: int) -> int:
    """A seed within the worker's bound (int64): seed + j past 2^63 - 1 wraps around rather
    than turning the client's valid seed into a 400."""
    return (seed + (1 << 63)) % (1 << 64) - (1 << 63)


def merge_bodies(ups: list[Upstream], offsets: list[int], counted: list[bool]) -> bytes:
    merged: dict[str, Any] = {}
    choices: list[dict[str, Any]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for up, offset, count_prompt in zip(ups, offsets, counted):
        data = orjson.loads(up.body)
        merged = merged or data
        for ch in data["choices"]:
            choices.append({**ch, "index": offset})
        u = data.get("usage") or {}
        if count_prompt:
            usage["prompt_tokens"] += u.get("prompt_tokens", 0)
        usage["completion_tokens"] += u.get("completion_tokens", 0)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    merged["choices"] = sorted(choices, key=lambda ch: ch["index"])
    merged["usage"] = usage
    return orjson.dumps(merged)


def merge_streams(ups: list[Upstream], offsets: list[int], counted: list[bool], include_usage: bool,
                  on_broken: Callable[[Replica, UpstreamError], None] = lambda replica, e: None) -> Upstream:
    """Interleaves several SSE streams into one, renumbering choices and summing usage. A
    stream that breaks off (`on_broken` hears of it) or sends an error ends the merged one
    with that error and [DONE], as a single stream ends: never with usage as if complete."""
    queue: asyncio.Queue[bytes | _Failed | None] = asyncio.Queue()
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    template: dict = {}

    async def pump(up: Upstream, offset: int, count_prompt: bool) -> None:
        buf = b""
        try:
            async for chunk in _chunks(up):
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if not event.startswith(b"data: {"):
                        continue
                    data = orjson.loads(event[6:])
                    if "error" in data:
                        await queue.put(_Failed(event + b"\n\n"))
                        return
                    if not template:
                        template.update({k: v for k, v in data.items() if k not in ("choices", "usage")})
                    data["id"] = template["id"]
                    if data.get("usage"):
                        u = data["usage"]
                        if count_prompt:
                            usage["prompt_tokens"] += u.get("prompt_tokens", 0)
                        usage["completion_tokens"] += u.get("completion_tokens", 0)
                    if data.get("choices"):
                        for ch in data["choices"]:
                            ch["index"] = offset
                        data.pop("usage", None)
                        await queue.put(b"data: " + orjson.dumps(data) + b"\n\n")
        except UpstreamError as e:
            if up.replica is not None:
                on_broken(up.replica, e)
            await queue.put(_Failed(error_event(e)))
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:  # not the stream a worker sends
            await queue.put(_Failed(error_event(e)))
        finally:
            await queue.put(None)

    async def merged() -> AsyncIterator[bytes]:
        tasks = [asyncio.create_task(pump(u, o, cp)) for u, o, cp in zip(ups, offsets, counted)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, _Failed):
                    yield item.event + b"data: [DONE]\n\n"
                    return
                yield item
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield b"data: " + orjson.dumps({**template, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    def release() -> None:
        for u in ups:
            u.release()

    return Upstream(200, "text/event-stream", b"", merged(), release)


@dataclass
class _Failed:
    event: bytes  # the error event that ends the merged stream


async def _chunks(up: Upstream) -> AsyncIterator[bytes]:
    """A stream's first chunk, then the rest."""
    yield up.body
    if up.rest is not None:
        async for chunk in up.rest:
            yield chunk
