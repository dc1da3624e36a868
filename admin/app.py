"""The admin API as one FastAPI app, and how it is served: `fleetwise admin` in a cluster
(over `KubeView` and `KubeFleet`), or a thread of `fleetwise up` (over its `LocalFleet`).
The OpenAPI schema is at /openapi.json (no token needed: it describes, it reveals no
state), with every error answer documented as problem details. CORS is off unless origins
are configured."""

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from . import act_routes, problems, read_routes
from .auth import RateLimiter, Tokens
from .deps import Ctx
from .guard import Guard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 10
    rate_per_second: float = 20.0  # per token (per client address without a valid one)
    burst: int = 40
    cors_origins: list[str] = field(default_factory=list)


def create_app(ctx: Ctx, tokens: Tokens, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="fleetwise admin API", version="1", docs_url="/docs", redoc_url=None,
                  description="See the fleet, act on it, and read the audit of every action. Every route under "
                              "/api/v1 needs `Authorization: Bearer <token>`; errors are RFC 9457 problem details.")
    app.state.ctx = ctx
    problems.install(app)
    app.include_router(read_routes.router)
    app.include_router(act_routes.router)
    app.add_middleware(Guard, tokens=tokens, limiter=RateLimiter(limits.rate_per_second, limits.burst),
                       max_body=limits.max_body_bytes, audit=ctx.store.audit)
    if limits.cors_origins:  # outermost, so a preflight never needs a token
        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        """Ready while the store answers: a Service sends nothing to a replica whose database is gone."""
        try:
            ctx.store.ping()
        except Exception as e:
            return problems.problem(503, f"the store does not answer: {type(e).__name__}", "/readyz")
        return Response(b'{"status":"ok"}', media_type="application/json")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_content(get_openapi(title=app.title, version=app.version,
                                                              description=app.description, routes=app.routes))
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
    return app


def _problem_content(schema: dict[str, Any]) -> dict[str, Any]:
    """Every 4xx and 5xx answer is application/problem+json with the Problem schema (FastAPI
    would say application/json, and its own shape for 422)."""
    for path in schema.get("paths", {}).values():
        for op in path.values():
            for code, response in op.get("responses", {}).items():
                if code[0] in "45":
                    response["content"] = {problems.PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(unused, None)
    return schema


class Server:
    """The admin API on its own port, in a thread of the calling process."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="admin-api", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 10.0) -> "Server":
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            deadline.wait(0.05)
        if not self.server.started:
            raise RuntimeError(f"the admin API did not start on {self.url}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(app: FastAPI, host: str, port: int) -> None:
    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
