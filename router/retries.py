"""When a request goes to another replica, when a replica is marked down, and the error the
client gets otherwise.

The rule is Envoy's retry policy with `connect-failure`, `reset-before-request` and
`retriable-status-codes`: a request goes to another replica only when it never reached this
one (no connection; a pooled connection the replica had closed is retried by the pool) or
when the replica refused it before doing any work (429, `unsupported_protocol_version`,
`engine_unavailable`). After that, work may be running or may have run: a timeout is a 504
and a broken answer a 502 to the client, so a generation is never started twice. A call
may widen the rule where redoing the work is safe (`RESET`, `TIMEOUT`: Envoy's `reset` and
per-try timeout).

A replica is marked down (until a probe brings it back) only for what says it is unwell,
whatever the request: a connection error, a timeout, its engine unavailable. Any other 5xx
belongs to the request and goes back to the client unchanged, as Envoy's outlier detection
ejects on gateway failures and not on an application's 500.
"""

from collections.abc import AsyncIterator

import orjson
from starlette.responses import JSONResponse

from fleetwise.protocol import PROTOCOL_VERSION, UNSUPPORTED_VERSION

from .upstream import NoAnswer, NotSent, UpstreamError, UpstreamTimeout

ENGINE_UNAVAILABLE = "engine_unavailable"  # the worker's 503 when its engine loop is gone
RESET = "reset"      # the connection broke before an answer: the replica's work ended with it
TIMEOUT = "timeout"  # the replica sent nothing for the read timeout: it may still be working


class RouterError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.type, self.param = status, code, headers, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class Elsewhere(Exception):
    """This replica did not take the request; another may. `down`: mark this one down."""

    def __init__(self, message: str, down: bool = True):
        super().__init__(message)
        self.down = down


def on_failure(url: str, e: UpstreamError, retry_on: frozenset[str]) -> Exception:
    """What a failed try means for the request: Elsewhere, or the client's RouterError."""
    if isinstance(e, UpstreamTimeout):
        if TIMEOUT in retry_on:
            return Elsewhere(f"{url}: {e}")
        return RouterError(504, f"the replica {url} timed out: {e}; the request was not restarted on "
                           "another replica, as it may still be running there", code="upstream_timeout",
                           type_="server_error")
    if isinstance(e, NotSent) or (isinstance(e, NoAnswer) and RESET in retry_on):
        return Elsewhere(f"{url}: {e}")
    return RouterError(502, f"the replica {url} failed after it accepted the request ({e}); the request "
                       "was not restarted on another replica", code="upstream_failed", type_="server_error")


def error_code(body: bytes) -> str | None:
    """The `code` of an OpenAI-shaped error body, if it is one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def refused(url: str, status: int, body: bytes) -> Elsewhere | None:
    """An answer by which the replica refused the request before any work (429 is the
    caller's: it keeps the answer in case every replica is busy)."""
    if status == 503 and error_code(body) == ENGINE_UNAVAILABLE:
        return Elsewhere(f"{url}: its engine is unavailable")
    if status == 400 and error_code(body) == UNSUPPORTED_VERSION:
        # a replica of another version, mid-rollout: not the request's fault
        return Elsewhere(f"{url} does not speak protocol version {PROTOCOL_VERSION}", down=False)
    return None


async def first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """A stream's first chunk. A stream that ends or breaks before it has given the client
    nothing: that is a reset (NoAnswer); a timeout stays one."""
    try:
        first = await anext(chunks, b"")
    except UpstreamTimeout:
        raise
    except UpstreamError as e:
        raise NoAnswer(f"the stream broke before its first chunk: {e}")
    if not first:
        raise NoAnswer("the stream closed before its first chunk")
    return first


def error_event(e: Exception) -> bytes:
    """The event that ends a stream whose replica failed after the client had tokens."""
    err = {"error": {"message": f"the replica failed mid-stream: {type(e).__name__}: {e}",
                     "type": "server_error", "param": None, "code": "replica_failed"}}
    return b"data: " + orjson.dumps(err) + b"\n\n"
