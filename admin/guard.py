"""What every admin API request passes before a route sees it, as one ASGI middleware: the
caller's identity from its bearer token (the routes then check the role), the request rate
per caller (429 with Retry-After), 401 without a valid one, the body size (413, before more than the limit is read),
and the audit: every request that would change something is recorded with its actor, its
request and how it ended, whether it was done, refused, invalid or denied."""

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetwise.logs import incoming_request_id

from .auth import Principal, RateLimiter, Tokens, retry_after
from .problems import problem

log = logging.getLogger(__name__)
READS = {"GET", "HEAD", "OPTIONS"}
AUDITED_BODY = 4096


def outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status in (404, 409):
        return "refused"
    if status == 429:
        return "limited"
    return "error" if status >= 500 else "invalid"


class TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: ASGIApp, tokens: Tokens, limiter: RateLimiter, max_body: int,
                 audit: Callable[..., Any], prefix: str = "/api/") -> None:
        self.app, self.tokens, self.limiter, self.max_body = app, tokens, limiter, max_body
        self.audit, self.prefix = audit, prefix
        self.streaks: OrderedDict[str, None] = OrderedDict()  # callers over the rate, audited once

    async def identify(self, headers: dict[bytes, bytes]) -> tuple[Principal | None, str]:
        """In a thread: a lookup may ask Kubernetes (`admin/token_review.py`)."""
        raw = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = raw.partition(" ")
        if not raw:
            return None, "no bearer token: send Authorization: Bearer <token>"
        principal = None
        if scheme.lower() == "bearer" and token.strip():
            principal = await anyio.to_thread.run_sync(self.tokens.lookup, token.strip())
        return principal, "" if principal else "the bearer token is not valid"

    async def _body(self, receive: Receive, length: str | None) -> bytes:
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise TooLarge
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        principal, why = await self.identify(headers)
        rid = incoming_request_id(headers.get(b"x-request-id"))
        state.update(principal=principal, auth_error=why, request_id=rid)
        status, body = 500, b""

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        caller = principal.name if principal else "anonymous@" + str((scope.get("client") or ("?",))[0])
        audited = True
        try:
            wait = self.limiter.take(caller)
            if not wait:
                self.streaks.pop(caller, None)
            else:
                audited = scope["method"] in READS or self._audit_limited(caller)
                state["audit_detail"] = f"over {self.limiter.rate:g} requests/s; retry in {wait:.1f} s"
                await problem(429, state["audit_detail"], scope["path"],
                              {"Retry-After": retry_after(wait)})(scope, receive, sending)
                return
            if principal is None:  # before the body is read or parsed: nothing for a stranger
                state["audit_detail"] = why
                await problem(401, why, scope["path"], {"WWW-Authenticate": "Bearer"})(scope, receive, sending)
                return
            try:
                body = await self._body(receive, headers.get(b"content-length", b"").decode() or None)
            except TooLarge:
                state["audit_detail"] = f"the body is over the limit of {self.max_body} bytes"
                await problem(413, state["audit_detail"], scope["path"])(scope, receive, sending)
                return
            await self.app(scope, _replay(body, receive), sending)
        finally:
            if scope["method"] not in READS and audited:
                await self._audit(scope, principal, body, status, rid)

    def _audit_limited(self, caller: str) -> bool:
        """Whether to audit a mutation over the rate: a flood writes one entry per caller and
        streak, not one per request (that would let it fill the store the limit protects)."""
        if caller in self.streaks:
            return False
        self.streaks[caller] = None
        while len(self.streaks) > self.limiter.max_callers:
            self.streaks.popitem(last=False)
        return True

    async def _audit(self, scope: Scope, principal: Principal | None, body: bytes, status: int, rid: str) -> None:
        state = scope["state"]
        query = scope.get("query_string", b"").decode("latin-1")
        entry = {"actor": principal.name if principal else "anonymous",
                 "role": principal.role.label if principal else "",
                 "method": scope["method"], "path": scope["path"] + (f"?{query}" if query else ""),
                 "body": body[:AUDITED_BODY].decode("utf-8", "replace"), "status": status,
                 "outcome": outcome(status), "detail": str(state.get("audit_detail", ""))[:4096], "request_id": rid}
        try:
            await anyio.to_thread.run_sync(lambda: self.audit(**entry))
        except Exception:
            log.exception("could not write the audit entry %s", entry)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read once, then the connection's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
