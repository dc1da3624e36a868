"""The router's front door: HTTP/1.1 on the event loop (http1.py), no ASGI server.

The two completion routes go from the parser straight to `Router.handle`: no ASGI scope,
no Starlette request or streaming response with its task group in between. They are every
request the router serves, and that stack cost about as much CPU per request as the
proxying itself. Every other request (models, health, metrics, the OpenAPI document, a
wrong method or path) goes whole to the same ASGI app the tests serve under uvicorn
(`app.build_app`), so those answers are Starlette's own.

Connections: at most `max_connections` open at once (router/limits.py, `--max-connections`);
one beyond it is answered 503 `too_many_connections` (with `Retry-After: 1`) and closed, and
while as many again are being refused, further ones are closed at once without an answer.
The limits on one connection's requests and their timeouts are http1.py's.
"""

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from .http1 import CHECK_S, Connection, Incoming
from .limits import ConnectionLimits
from .proxy import Router

log = logging.getLogger(__name__)

HOT = {b"/v1/completions": "completion", b"/v1/chat/completions": "chat"}
GRACE_S = 5.0  # on SIGTERM, requests in flight get this long to finish

Handle = Callable[[object, str], Awaitable[Response]]


class Door:
    """What every connection shares: the Router, the ASGI app for the other routes, the
    open connections (for the limit, the deadlines and shutdown)."""

    def __init__(self, router: Router, app: ASGIApp, handle: Handle, limits: ConnectionLimits):
        self.router, self.app, self.handle, self.limits = router, app, handle, limits
        self.max_body = router.limits.max_body_bytes
        self.hot = HOT
        self.conns: set[Connection] = set()
        self.refusing: set[Connection] = set()  # over the limit: answered 503, lingering
        self.stopping = False

    async def serve(self, conn: Connection, req: Incoming, keep: bool) -> None:
        if req.kind is None:
            await self._other(conn, req, keep)
            return
        response = await self.handle(req, req.kind)
        if isinstance(response, StreamingResponse):
            await conn.write_stream(response, keep and req.version == "1.1")
        else:
            conn.write_whole(response, keep, req.method)

    async def _other(self, conn: Connection, req: Incoming, keep: bool) -> None:
        """Through the ASGI app, answered whole."""
        path, _, query = req.url.partition(b"?")
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": req.version,
                 "method": req.method.decode(), "scheme": "http", "root_path": "",
                 "path": unquote(path.decode("latin-1")), "raw_path": path, "query_string": query,
                 "headers": req.raw_headers, "server": None, "state": {},
                 "client": tuple(peer[:2]) if isinstance(peer, tuple) and len(peer) >= 2 else None}
        sent = [False]
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await conn.disconnected
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(scope, receive, send)
        response = Response(b"".join(parts), status_code=start.get("status", 500))
        response.raw_headers = [(k.lower(), v) for k, v in start.get("headers", [])
                                if k.lower() not in (b"content-length", b"transfer-encoding")]
        conn.write_whole(response, keep, req.method)

    async def check_deadlines(self) -> None:
        """Slow or idle clients closed or refused (http1.py): one sweep every CHECK_S or less."""
        loop = asyncio.get_running_loop()
        every = min(CHECK_S, self.limits.head_timeout_s / 4, self.limits.body_timeout_s / 4,
                    self.limits.keep_alive_s / 4)
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for conn in list(self.conns):
                conn.check(now)


async def run_door(router: Router, app: ASGIApp, handle: Handle, host: str, port: int,
                   ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None,
                   limits: ConnectionLimits = ConnectionLimits()) -> None:
    """Serves until SIGTERM or SIGINT (or `stop`), then lets requests in flight finish for up
    to GRACE_S seconds."""
    loop = asyncio.get_running_loop()
    door = Door(router, app, handle, limits)
    await router.start()
    await router.probe_all()
    server = await loop.create_server(lambda: Connection(door), host, port, backlog=2048, reuse_address=True)
    checker = asyncio.create_task(door.check_deadlines())
    gc.collect()
    gc.freeze()  # what startup built (modules, the app, the schemas) is never scanned again: a full
    # collection then walks only what requests made, short pauses rather than a p99 tail
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread: `stop` ends it
            pass
    if ready:
        ready()
    try:
        await stop.wait()
    finally:
        door.stopping = True
        server.close()
        checker.cancel()
        for conn in list(door.conns):
            if conn.task is None and conn.transport:
                conn.transport.close()
        busy = [c.task for c in door.conns if c.task is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=GRACE_S)
            for task in late:
                task.cancel()
        for conn in list(door.conns):
            if conn.transport:
                conn.transport.close()
        await router.stop()
