"""The worker's two listeners over one app (ARCHITECTURE.md, "Worker HTTP API").

The public listener serves the OpenAI API, /v1/models, /health and /metrics, to anyone who
can reach the port (the kubelet's probes included). The internal listener serves the
handoff routes (/internal/*), the completion routes and /health to the router and the
other workers, and only to a caller that sends the shared token (`Authorization: Bearer`,
compared in constant time); anything else gets 401 before any work. A worker without a
token has no internal listener. Mutual TLS is not part of this: the token is the
service-to-service check Envoy and the Kubernetes API server use without it, and the
chart's NetworkPolicy keeps the internal port to the router's and the workers' pods.

Both listeners run in one event loop over one engine (`serve_together`); the app's
lifespan (the engine's start and stop) runs once for both (`SharedLifespan`).
"""

import asyncio
import contextlib
import hmac
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetwise.protocol import AUTH_HEADER, UNSUPPORTED_VERSION, VERSION_HEADER, version_error

from .openai import APIError

PUBLIC, INTERNAL = "public", "internal"
LISTENER = "fleetwise.listener"  # the scope key a Listener sets: which one the request came in on
PUBLIC_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                          "/openapi.json"})
INTERNAL_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/health", "/openapi.json"})  # and /internal/*

Refuse = Callable[[APIError, Scope, Receive, Send], Awaitable[None]]


class Listener:
    """The app as one listener serves it: each request tagged with the listener's name;
    the lifespan shared with the other listener."""

    def __init__(self, app: Starlette, lifespan: "SharedLifespan", name: str):
        self.app, self.lifespan, self.name = app, lifespan, name

    @property
    def state(self) -> State:
        """The app's state (its `api`: the WorkerAPI)."""
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan.serve(receive, send)
            return
        await self.app({**scope, LISTENER: self.name}, receive, send)


class Gate:
    """What each listener lets through, before the body is read: on the internal one, a
    caller with the token (else 401), then only its paths (else 404) in a protocol version
    this worker speaks (else 400, protocol.py); on the public one only its paths. A request
    that came in on no Listener is taken as public."""

    def __init__(self, app: ASGIApp, token: str | None, refuse: Refuse):
        self.app, self.refuse = app, refuse
        self.expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is not None:
            await self.refuse(problem, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> APIError | None:
        path = scope["path"]
        if scope.get(LISTENER) != INTERNAL:
            if path in PUBLIC_PATHS:
                return None
            return APIError(404, f"{path} is not served on this port", code="not_found")
        headers = dict(scope["headers"])
        if not self.authorized(headers.get(AUTH_HEADER.encode())):
            return APIError(401, "the internal API needs the shared token: Authorization: Bearer <token>",
                            code="invalid_internal_token", headers={"WWW-Authenticate": "Bearer"})
        if path.startswith("/internal/"):
            version = headers.get(VERSION_HEADER.encode())
            problem = version_error(version.decode("latin-1") if version is not None else None)
            if problem is not None:
                return APIError(400, problem, param=VERSION_HEADER, code=UNSUPPORTED_VERSION)
            return None
        if path in INTERNAL_PATHS:
            return None
        return APIError(404, f"{path} is not served on the internal port", code="not_found")

    def authorized(self, given: bytes | None) -> bool:
        if self.expected is None or given is None:
            return False
        scheme, _, token = given.partition(b" ")
        # the comparison takes as long whatever the token's first wrong byte
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


class SharedLifespan:
    """One app's lifespan under several listeners: it starts with the first listener's
    startup and ends with the last one's shutdown, so that the engine stops only once no
    listener has requests left to finish."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.users = 0
        self.inbox: asyncio.Queue[Message] | None = None
        self.started: asyncio.Future[None] | None = None
        self.stopped: asyncio.Future[None] | None = None
        self.task: asyncio.Task | None = None

    async def serve(self, receive: Receive, send: Send) -> None:
        """One listener's side of the ASGI lifespan protocol."""
        await receive()  # lifespan.startup
        try:
            await self.enter()
        except Exception as e:
            await send({"type": "lifespan.startup.failed", "message": str(e)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.exit()
        await send({"type": "lifespan.shutdown.complete"})

    async def enter(self) -> None:
        self.users += 1
        if self.started is None:
            loop = asyncio.get_running_loop()
            self.inbox, self.started, self.stopped = asyncio.Queue(), loop.create_future(), loop.create_future()
            scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
            self.task = asyncio.create_task(self._run(scope, self.inbox.get))
            self.task.add_done_callback(self._ended)
            self.inbox.put_nowait({"type": "lifespan.startup"})
        try:
            await asyncio.shield(self.started)
        except Exception:
            self.users -= 1
            raise

    async def exit(self) -> None:
        self.users -= 1
        if self.users == 0 and self.inbox is not None and self.stopped is not None:
            self.inbox.put_nowait({"type": "lifespan.shutdown"})
            await asyncio.shield(self.stopped)

    async def _run(self, scope: Scope, receive: Receive) -> None:
        await self.app(scope, receive, self._hear)

    async def _hear(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            _settle(self.started)
        elif kind == "lifespan.startup.failed":
            _settle(self.started, RuntimeError(message.get("message") or "startup failed"))
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            _settle(self.stopped)

    def _ended(self, task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        _settle(self.started, error or RuntimeError("the app's lifespan ended before it started"))
        _settle(self.stopped)


def _settle(future: asyncio.Future | None, error: BaseException | None = None) -> None:
    if future is not None and not future.done():
        future.set_result(None) if error is None else future.set_exception(error)


class Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve_together`: two servers in one process
    would each take the handlers over from the other."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_together(servers: list[uvicorn.Server]) -> None:
    """Runs the servers in this event loop until one of them stops (SIGINT or SIGTERM
    stops them all); then each finishes its requests in flight and stops."""
    def stop_all() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    main = threading.current_thread() is threading.main_thread()
    if main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_all)
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop_all()
        await asyncio.gather(*tasks)
    finally:
        if main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
