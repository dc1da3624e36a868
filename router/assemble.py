"""Non-streamed requests as streams: the router asks the worker for a stream (so that it
keeps the token ids and can move the request when the worker fails, migrate.py) and
assembles the answer the worker would have sent whole: the same choices, text, logprobs,
finish reasons and usage. An error event becomes the error answer it stands for."""

from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from .retries import RouterError
from .upstream import Upstream, UpstreamError


def as_stream(body: dict) -> dict:
    """The body that asks for the same answer as a stream, with its usage."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


async def assemble(up: Upstream, kind: str) -> Upstream:
    """The whole answer from a stream's events (`up` is released)."""
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {}
    usage = None
    buf = b""
    try:
        async for chunk in _chunks(up):
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            payloads = [e[6:] for e in events if e.startswith(b"data: {")]
            for payload, data in zip(payloads, _parse(payloads)):
                if "error" in data:
                    status = 503 if data["error"].get("code") == "engine_unavailable" else 500
                    return Upstream(status, "application/json", payload)
                head = head or data
                usage = data.get("usage") or usage
                for ch in data.get("choices") or ():
                    _add(choices.setdefault(ch["index"], {}), ch, kind)
    except UpstreamError as e:
        raise RouterError(502, f"the replica failed after it accepted the request and no other could take it "
                          f"over ({e})", code="upstream_failed", type_="server_error")
    finally:
        up.release()
    obj = "text_completion" if kind == "completion" else "chat.completion"
    whole = {"id": head.get("id"), "object": obj, "created": head.get("created"), "model": head.get("model"),
             "choices": [_choice(i, c, kind) for i, c in sorted(choices.items())], "usage": usage}
    return Upstream(200, "application/json", orjson.dumps(whole))


def _parse(payloads: list[bytes]) -> Iterable[Any]:
    """The events' JSON, parsed in one go (an array of them); one by one if that fails, so
    that a bad event raises where it is."""
    if len(payloads) > 1:
        try:
            parsed = orjson.loads(b"[" + b",".join(payloads) + b"]")
            if len(parsed) == len(payloads):
                return parsed
        except orjson.JSONDecodeError:
            pass
    return (orjson.loads(p) for p in payloads)


def _add(c: dict[str, Any], ch: dict[str, Any], kind: str) -> None:
    text = ch.get("text") if kind == "completion" else (ch.get("delta") or {}).get("content")
    c["text"] = c.get("text", "") + (text or "")
    if ch.get("finish_reason"):
        c["finish_reason"] = ch["finish_reason"]
    lp = ch.get("logprobs")
    if lp:
        have = c.setdefault("logprobs", {})
        for key, values in lp.items():
            have.setdefault(key, []).extend(values)


def _choice(i: int, c: dict[str, Any], kind: str) -> dict[str, Any]:
    lp = c.get("logprobs")
    if kind == "completion":
        if lp and "tokens" in lp:  # offsets of the tokens' own texts, as a whole answer counts them
            offsets, at = [], 0
            for token in lp["tokens"]:
                offsets.append(at)
                at += len(token)
            lp["text_offset"] = offsets
        return {"index": i, "text": c.get("text", ""), "finish_reason": c.get("finish_reason"), "logprobs": lp}
    return {"index": i, "message": {"role": "assistant", "content": c.get("text", "")},
            "finish_reason": c.get("finish_reason"), "logprobs": lp}


async def whole(up: Upstream) -> Upstream:
    """An answer that came whole though a stream was asked for, read to its end (`up` is released)."""
    try:
        body = b"".join([chunk async for chunk in _chunks(up)])
    except UpstreamError as e:
        raise RouterError(502, f"the replica failed after it accepted the request ({e})", code="upstream_failed",
                          type_="server_error")
    finally:
        up.release()
    return Upstream(up.status, up.content_type, body)


async def _chunks(up: Upstream) -> AsyncIterator[bytes]:
    yield up.body
    if up.rest is not None:
        async for chunk in up.rest:
            yield chunk
