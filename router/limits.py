"""Bounds on the work one request brings into the router: its body's size (413 before any
of it is parsed), its number of choices `n` and of prompts (400 naming the field), and the
sequences it fans out to, which count against the router's in-flight bound. And bounds on
the front door's client connections: how many at once, how long a head, a body and an idle
keep-alive connection may take (`ConnectionLimits`)."""

from dataclasses import dataclass

import orjson
from starlette.requests import Request

from .retries import RouterError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 << 20  # a 128k-token prompt as token ids is about 1 MB of JSON
    max_n: int = 128                # OpenAI's bound on n, which clients of vLLM's server expect
    max_prompts: int = 1024         # prompts in one completion request (a batch)


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on the front door's client connections (router/http1.py, router/front.py)."""
    max_connections: int = 4096  # open at once; one more is answered 503 and closed
    head_timeout_s: float = 30.0  # a request's head, whole, from its first byte (the first's from the connect)
    body_timeout_s: float = 60.0  # a request's body, whole, from the end of its head (408 after)
    keep_alive_s: float = 75.0  # an idle keep-alive connection closes after it: longer than clients keep
    # idle connections (aiohttp 15 s, httpx 5 s), as a server that closes first races the client's reuse

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections: at least 1")
        for name in ("head_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes: from its
    Content-Length before reading, else while it arrives."""
    whole = getattr(request, "whole_body", None)
    if whole is not None:  # the front door's request, read (and bounded) as it arrived
        if len(whole) > limit:
            raise _too_large(limit)
        return whole
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> RouterError:
    return RouterError(413, f"the body is larger than the router's limit of {limit} bytes", code="body_too_large")


def whole(x: object) -> int | None:
    """`x` as JSON Schema's (and the worker's) integer: 2.0 is one, True is not; else None."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def wants_stream(body: dict) -> bool:
    """The client's `stream`: a boolean when given, as the document says. The router asks every
    upstream for a stream, so a wrong type must be refused here: the worker never sees it."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RouterError(400, f"stream: must be true or false; got {stream!r}", param="stream")
    return bool(stream)


def check_counts(body: dict, kind: str, limits: Limits) -> None:
    """n and the number of prompts, each within its bound."""
    n = whole(body.get("n"))
    if n is not None and n > limits.max_n:
        raise RouterError(400, f"n: at most {limits.max_n} choices per request; got {n}", param="n")
    prompt = body.get("prompt") if kind == "completion" else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > limits.max_prompts:
        raise RouterError(400, f"prompt: at most {limits.max_prompts} prompts per request; got {len(prompt)}",
                          param="prompt")


def check_weight(weight: int, inflight: int, max_inflight: int) -> None:
    """A request that fans out to `weight` sequences takes that many places in flight."""
    if weight > max_inflight:
        raise RouterError(400, f"n: the request fans out to {weight} sequences (n times the prompts); the router "
                          f"holds at most {max_inflight} in flight", param="n")
    if inflight + weight > max_inflight:
        raise RouterError(429, f"the router is at its limit of {max_inflight} requests in flight",
                          code="router_full", headers={"Retry-After": "1"}, type_="rate_limit_error")


def parse_body(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RouterError(400, f"the body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise RouterError(400, "the body must be a JSON object")
    return body
