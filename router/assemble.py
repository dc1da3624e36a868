"""Non-streamed requests as streams: the router asks the worker for a stream (so that it
keeps the token ids and can move the request when the worker fails, migrate.py) and
assembles the answer the worker would have sent whole: the same choices, text, logprobs,
finish reasons and usage. An error event becomes the error answer it stands for."""

from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from starlette.responses import Response

from .retries import RouterError
from .upstream import Upstream, UpstreamError

_DATA = b"data: {"
_NEXT_DATA = b"\n\ndata: {"
_ERROR = b'data: {"error"'
_DONE = b"data: [DONE]"


def as_stream(body: dict) -> dict:
    """The body that asks for the same answer as a stream, with its usage."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


async def assemble(up: Upstream, kind: str) -> Upstream:
    """The whole answer from a stream's events (`up` is released)."""
    answer = _Answer(kind)
    try:
        failed = answer.take(up.body)
        if failed is None and up.rest is not None:
            async for chunk in up.rest:
                if (failed := answer.take(chunk)) is not None:
                    break
    except UpstreamError as e:
        raise RouterError(502, f"the replica failed after it accepted the request and no other could take it "
                          f"over ({e})", code="upstream_failed", type_="server_error")
    finally:
        up.release()
    return failed or Upstream(200, "application/json", answer.whole())


class _Choice:
    __slots__ = ("finish_reason", "logprobs", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list] | None = None


class _Answer:
    """The events read so far: the first one's id, time and model, each choice, the usage."""

    def __init__(self, kind: str):
        self.kind = kind
        self.buf = b""
        self.head: dict[str, Any] | None = None
        self.usage = None
        self.choices: dict[int, _Choice] = {}

    def take(self, chunk: bytes) -> Upstream | None:
        """A chunk's complete events added; an error event's answer, which ends it."""
        buf = self.buf + chunk if self.buf else chunk
        if buf[:1] == b"\n":
            buf = buf.lstrip(b"\n")  # blank lines before an event (a run of them cut by a chunk's end)
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return None
        head, self.buf = buf[:cut], buf[cut + 2:]
        if head.endswith(_DONE) and (len(head) == len(_DONE) or head[-len(_DONE) - 2:-len(_DONE)] == b"\n\n"):
            head = head[:-len(_DONE) - 2]
        if not head:
            return None
        if _ERROR not in head and head.startswith(_DATA):
            # no error: the events as one JSON array, no split (valid JSON only when every event is
            # one `data:` line with an object; anything else fails the parse and goes event by event)
            try:
                self._add(orjson.loads(b"[" + head[6:].replace(_NEXT_DATA, b",{") + b"]"))
                return None
            except orjson.JSONDecodeError:
                pass
        payloads = [e[6:] for e in head.split(b"\n\n") if e.startswith(_DATA)]
        for payload, data in zip(payloads, _parse(payloads)):
            if "error" in data:
                status = 503 if data["error"].get("code") == "engine_unavailable" else 500
                return Upstream(status, "application/json", payload)
            self._add((data,))
        return None

    def _add(self, events: Iterable[dict]) -> None:
        chat = self.kind != "completion"
        choices = self.choices
        head, usage = self.head, self.usage
        for data in events:
            if not head:
                head = data
            usage = data.get("usage") or usage
            for ch in data.get("choices") or ():
                index = ch["index"]
                c = choices.get(index)
                if c is None:
                    c = choices[index] = _Choice()
                text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                if text:
                    c.texts.append(text)
                finish = ch.get("finish_reason")
                if finish:
                    c.finish_reason = finish
                lp = ch.get("logprobs")
                if lp:
                    have = c.logprobs if c.logprobs is not None else {}
                    c.logprobs = have
                    for key, values in lp.items():
                        have.setdefault(key, []).extend(values)
        self.head, self.usage = head, usage

    def whole(self) -> bytes:
        head = self.head or {}
        kind = self.kind
        obj = "text_completion" if kind == "completion" else "chat.completion"
        return orjson.dumps({"id": head.get("id"), "object": obj, "created": head.get("created"),
                             "model": head.get("model"),
                             "choices": [_choice(i, c, kind) for i, c in sorted(self.choices.items())],
                             "usage": self.usage})


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


def _choice(i: int, c: _Choice, kind: str) -> dict[str, Any]:
    lp, text = c.logprobs, "".join(c.texts)
    if kind == "completion":
        if lp and "tokens" in lp:  # offsets of the tokens' own texts, as a whole answer counts them
            offsets, at = [], 0
            for token in lp["tokens"]:
                offsets.append(at)
                at += len(token)
            lp["text_offset"] = offsets
        return {"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": lp}
    return {"index": i, "message": {"role": "assistant", "content": text},
            "finish_reason": c.finish_reason, "logprobs": lp}


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


class _Whole(Response):
    """A whole answer with the headers Starlette's Response would give it, without its
    render and header scan (on every non-streamed request)."""

    def __init__(self, body: bytes, status: int, content_type: bytes):
        self.status_code, self.body, self.background = status, body, None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", content_type)]


def whole_response(body: bytes, status: int, media_type: str) -> Response:
    if status < 200 or status in (204, 304) or media_type.startswith("text/"):
        return Response(body, status_code=status, media_type=media_type)  # Starlette's own rules
    return _Whole(body, status, media_type.encode("latin-1"))
