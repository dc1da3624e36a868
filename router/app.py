"""The router's HTTP face: an OpenAI-compatible ASGI app over a Router, and `serve` to run it.

The two completion paths are dispatched straight to the Router; the rest (models, health,
metrics) goes through Starlette. `serve` runs it behind the front door (front.py), which
takes the completion paths off the ASGI stack altogether; the tests serve the same app
under uvicorn. The work on a request is in proxy.py (ARCHITECTURE.md,
"The path of one request").
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetwise.openai_schema import openapi, router_routes

from .endpoints import EndpointSource
from .limits import ConnectionLimits
from .proxy import Router
from .retries import RouterError

log = logging.getLogger(__name__)


def build_app(router: Router) -> ASGIApp:
    async def completions(request: Request) -> Response:
        return await router.handle(request, "completion")

    async def chat(request: Request) -> Response:
        return await router.handle(request, "chat")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetwise", "mode": route.mode}
            for name, route in router.source.models().items()]})

    async def health(request: Request) -> Response:
        summary = {name: {role: sum(r.available for r in rs) for role, rs in route.replicas.items() if rs}
                   for name, route in router.source.models().items()}
        servable = any(all(v > 0 for v in roles.values()) for roles in summary.values())
        return JSONResponse({"status": "ok" if servable else "no_replicas", "models": summary,
                             "inflight": router.inflight}, status_code=200 if servable else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    document: list[dict] = []

    async def openapi_document(request: Request) -> Response:
        """The same OpenAI shapes as the workers' (fleetwise/openai_schema.py), built once."""
        if not document:
            document.append(openapi("fleetwise router", version("fleetwise"), router_routes()))
        return JSONResponse(document[0])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        await router.probe_all()
        yield
        await router.stop()

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
    ], lifespan=lifespan)
    hot = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        """The two request paths skip Starlette's routing and middleware: they are every
        request the router serves, and that stack is a good share of its overhead."""
        kind = hot.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if kind is None:
            await app(scope, receive, send)
            return
        response = await answer(router, Request(scope, receive), kind)
        await response(scope, receive, send)
    return asgi


async def answer(router: Router, request: Any, kind: str) -> Response:
    """A completion request's answer; a fault of the router's own is still an OpenAI error
    body, never a bare 500. `request`: Starlette's, or the front door's (front.py)."""
    try:
        return await router.handle(request, kind)
    except Exception as e:
        log.exception("unexpected error")
        return RouterError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").response()


def serve(source: EndpointSource, host: str, port: int, token: str | None, policy: str = "prefix_load",
          max_inflight: int = 2048, probe_interval: float = 1.0, max_migrations: int = 3,
          max_tokens_kept: int = 1 << 17, drain_grace: float = 30.0,
          connections: ConnectionLimits = ConnectionLimits()) -> None:
    """`token`: the shared token of the workers' internal listeners, which the router calls."""
    from .front import run_door

    router = Router(source, policy, max_inflight=max_inflight, probe_interval=probe_interval, token=token,
                    max_migrations=max_migrations, max_tokens_kept=max_tokens_kept, drain_grace=drain_grace)
    door = run_door(router, build_app(router), partial(answer, router), host, port, limits=connections)
    try:
        import uvloop
    except ImportError:
        asyncio.run(door)
        return
    uvloop.run(door)
