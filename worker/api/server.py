"""The worker's HTTP app: OpenAI completions and chat completions, models, health, metrics
and the handoff routes, OpenAI-shaped errors, and `serve`, which builds a whole worker.

One app, one engine, two listeners (listeners.py): the public one serves the OpenAI API,
/v1/models, /health and /metrics; the internal one, behind the shared token, the handoff
routes, the completion routes and /health, for the router and the other workers."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetwise import defaults
from fleetwise.logs import configure as configure_logs
from fleetwise.logs import incoming_request_id, request_id
from fleetwise.openai_schema import ROUTES, WORKER_HEALTH, openapi, openapi_error
from fleetwise.protocol import REQUEST_ID_HEADER

from ..engine.async_engine import AsyncEngine, EngineDead
from ..engine.config import EngineConfig
from ..engine.engine import LLMEngine
from ..engine.faults import FaultSwitches
from ..kv.connector import KVConnector
from ..kv.transfer import VERSIONS as KV_VERSIONS
from ..metrics import WorkerMetrics
from .fault_routes import add_fault_routes
from .handoff import add_handoff_routes
from .listeners import (
    INTERNAL,
    INTERNAL_PATHS,
    LISTENER,
    PUBLIC,
    PUBLIC_PATHS,
    Gate,
    Listener,
    Server,
    SharedLifespan,
    serve_together,
)
from .openai import APIError, ChatCompletionRequest, CompletionRequest, RequestLimits, error_body
from .power import add_power_routes
from .service import WorkerAPI

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.5  # how often the engine's state is looked at for on_engine_failure
FAIL_STEPS = "fail-steps"  # test-only fault switch: every engine step raises (through fault_hook)
SWITCHES = "switches"  # the drills' switches at POST /internal/faults (fault_routes.py)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def engine_failure(engine: AsyncEngine, failed_steps: int) -> dict | None:
    """Why the engine cannot serve, for good: its loop died, or `failed_steps` steps in a
    row failed every sequence (the loop lives on, failing each request alone). None: it can."""
    if not engine.alive:
        return {"status": "dead", "error": str(engine.error) if engine.error else None}
    core = engine.engine
    if core.failed_steps >= failed_steps:
        return {"status": "failing", "error": f"the last {core.failed_steps} engine steps failed every "
                                              f"request in them; the last error: {core.last_step_error}"}
    return None


@dataclass
class WorkerApps:
    """The two listeners' apps over one worker; `internal` is None for a public-only worker."""
    public: Listener
    internal: Listener | None


def build_app(engine: AsyncEngine, connector: KVConnector, role: str = "mixed", *args, **kwargs) -> Listener:
    """A public-only worker's app (no internal listener): build_apps' arguments, no token."""
    return build_apps(engine, connector, role, *args, **kwargs).public


def build_apps(engine: AsyncEngine, connector: KVConnector, role: str = "mixed",
               health_stall_seconds: float = defaults.HEALTH_STALL_SECONDS, faults: frozenset[str] = frozenset(),
               limits: RequestLimits = RequestLimits(), health_failed_steps: int = defaults.HEALTH_FAILED_STEPS,
               on_engine_failure: Callable[[str], None] | None = None,
               internal_token: str | None = None) -> WorkerApps:
    """`faults`: test-only switches (kv_stream.CORRUPT_KV); empty unless a test asks.
    `on_engine_failure` is called, with the reason, each time the engine turns dead or failing.
    `internal_token`: the shared token the internal listener asks every caller for (and the
    pulls from prefill workers carry); None: no internal listener."""
    app = _build(engine, connector, role, health_stall_seconds, faults, limits, health_failed_steps,
                 on_engine_failure, internal_token)
    app.state.power = add_power_routes(app, app.state.api)
    lifespan = SharedLifespan(app)  # the engine starts with the first listener and stops with the last
    return WorkerApps(Listener(app, lifespan, PUBLIC),
                      Listener(app, lifespan, INTERNAL) if internal_token else None)


async def _watch(engine: AsyncEngine, health_failed_steps: int,
                 on_engine_failure: Callable[[str], None] | None) -> None:
    """Logs each change between failed and serving; `on_engine_failure` hears each failure."""
    failing = False
    while True:
        failure = engine_failure(engine, health_failed_steps)
        if (failure is not None) != failing:
            failing = failure is not None
            if failure is None:
                log.info("the engine serves again")
            else:
                log.error("the engine has failed: %s", failure["error"])
                if on_engine_failure is not None:
                    on_engine_failure(str(failure["error"]))
        await asyncio.sleep(WATCH_SECONDS)


def _build(engine: AsyncEngine, connector: KVConnector, role: str, health_stall_seconds: float,
           faults: frozenset[str], limits: RequestLimits, health_failed_steps: int,
           on_engine_failure: Callable[[str], None] | None, internal_token: str | None) -> FastAPI:
    api = WorkerAPI(engine, role, health_stall_seconds, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine._thread is None:
            engine.start(asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch(engine, health_failed_steps, on_engine_failure))
        yield
        watcher.cancel()
        await close_handoff()
        engine.stop()
        api.close()

    app = FastAPI(title="fleetwise worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Gate, token=internal_token, refuse=_refuse)  # before the body is read
    app.add_middleware(RequestContext)  # outermost: a 401, 404 or 413 carries the request id too
    _add_error_handlers(app)

    @app.get("/health", **WORKER_HEALTH)
    async def health():
        failure = engine_failure(engine, health_failed_steps)
        if failure is not None:
            return JSONResponse(failure, status_code=503)
        stalled = engine.stalled_for()
        if stalled > health_stall_seconds:
            return JSONResponse({"status": "stalled", "stalled_seconds": round(stalled, 3)}, status_code=503)
        return {"status": "ok", "role": role, "model": api.model_name,
                "running": api.core.num_running, "waiting": engine.num_waiting(), "kv_leases": len(connector.leases),
                "kv_exported": api.metrics.kv_exported_total, "kv_stream_versions": list(KV_VERSIONS)}

    @app.get("/metrics", **ROUTES["/metrics"])
    async def metrics():
        api.metrics.heartbeat_age.labels(model_name=api.model_name, role=role).set(engine.stalled_for())
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **ROUTES["/v1/models"])
    async def models():
        return {"object": "list", "data": [{
            "id": api.model_name, "object": "model", "created": 0, "owned_by": "fleetwise",
            "root": api.core.config.model, "max_model_len": api.core.max_model_len}]}

    @app.post("/v1/completions", **ROUTES["/v1/completions"])
    async def completions(req: CompletionRequest, request: Request):
        prompts, params = await api.prepare_completion(req)
        return await api.respond_completion(req, prompts, await api.run(prompts, params, request), request)

    @app.post("/v1/chat/completions", **ROUTES["/v1/chat/completions"])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        prompt, params = await api.prepare_chat(req)
        return await api.respond_chat(req, prompt, await api.run([prompt], [params], request), request)

    close_handoff = add_handoff_routes(app, api, connector, faults, internal_token)
    documents: dict[str, dict] = {}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        """Each listener's own routes: the internal ones only on the internal listener."""
        listener = request.scope.get(LISTENER, PUBLIC)
        if listener not in documents:
            documents[listener] = listener_document(app, listener)
        return JSONResponse(documents[listener])
    if SWITCHES in faults and internal_token:
        api.core.switches = api.core.switches or FaultSwitches()
        add_fault_routes(app, api.core)
    return app


def listener_document(app: FastAPI, listener: str) -> dict:
    """The OpenAPI document of the routes one listener serves (listeners.py)."""
    internal = listener == INTERNAL
    paths = INTERNAL_PATHS if internal else PUBLIC_PATHS
    routes = [r for r in app.routes if isinstance(r, APIRoute)
              and (r.path in paths or (internal and r.path.startswith("/internal/")))]
    doc = openapi(f"fleetwise worker ({listener} listener)", version("fleetwise"), routes)
    if internal:  # every internal call needs the shared token
        doc["components"]["securitySchemes"] = {"internal_token": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"internal_token": []}]
        for item in doc["paths"].values():
            for op in item.values():
                op["responses"].setdefault("401", openapi_error(401))
    return doc


async def _refuse(e: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await _error_response(e)(scope, receive, send)


class RequestContext:
    """Every request runs under its id (the caller's `x-request-id`, or a new one), which its
    log lines and the engine's id for it carry and its answer sends back."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = incoming_request_id(headers.get(REQUEST_ID_HEADER.encode()))
        request_id.set(rid)
        rid_header = (REQUEST_ID_HEADER.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """A body over `max_bytes` gets 413 before anything parses it: at once when its
    Content-Length says so, else as soon as the bytes read pass the limit (a chunked body
    or one that lies about its length). Every route parses its body whole, so the body is
    read here and handed on in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(f"is {int(length)} bytes", scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(f"has more than {self.max_bytes} bytes", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # afterwards the app hears of a disconnect as usual
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        limit = f"{self.max_bytes / (1 << 20):g} MiB" if self.max_bytes >= 1 << 20 else f"{self.max_bytes} bytes"
        e = APIError(413, f"the request body {what}; this worker takes at most {limit}",
                     code="request_too_large", headers={"connection": "close"})
        await _error_response(e)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-shaped body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        # a field's own check explains more than the other members of its union refusing the type
        errors.sort(key=lambda err: err.get("type") != "value_error")
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body" and not _union_member(x)]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            loc = []
        else:
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"{'.'.join(loc) or 'body'}: {msg}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return _error_response(APIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, e: EngineDead) -> JSONResponse:
        return _error_response(APIError(503, str(e), type_="server_error", code="engine_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(e.status_code, str(e.detail), type_="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error"))


def _union_member(part: object) -> bool:
    """pydantic names the member of a union in an error's location ('str', 'list[int]',
    'function-after[...]', 'TextPart'); the client's field path leaves them out."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper())


def serve(config: EngineConfig, host: str, port: int, role: str = "mixed",
          health_stall_seconds: float = defaults.HEALTH_STALL_SECONDS, faults: frozenset[str] = frozenset(),
          limits: RequestLimits = RequestLimits(), health_failed_steps: int = defaults.HEALTH_FAILED_STEPS,
          exit_on_engine_failure: bool = False, internal_port: int = defaults.INTERNAL_PORT,
          internal_token: str | None = None) -> int:
    """Runs a worker until it is stopped: the public listener on `port` and, with a token,
    the internal one on `internal_port`. Returns the process's exit status: 1 when it
    stopped because the engine failed (`exit_on_engine_failure`), so that Kubernetes
    restarts the container, 3 when it never started (uvicorn's), else 0."""
    configure_logs(logging.INFO)
    core = LLMEngine(config, WorkerMetrics(config.served_name, role))
    core.kv_connector = connector = KVConnector(core)
    if FAIL_STEPS in faults:
        core.fault_hook = _fail_step
    failed: list[str] = []
    servers: list[uvicorn.Server] = []

    def stop_on_failure(reason: str) -> None:
        failed.append(reason)
        for server in servers:  # requests in flight finish (they fail fast), then serve returns
            server.should_exit = True

    apps = build_apps(AsyncEngine(core), connector, role, health_stall_seconds, faults, limits, health_failed_steps,
                      stop_on_failure if exit_on_engine_failure else None, internal_token)
    # on SIGTERM (a drained pod being deleted) requests in flight, streams included, get up
    # to 50 s to finish; the pod's termination grace period is 60 s
    for app, p in ((apps.public, port), (apps.internal, internal_port)):
        if app is not None:
            servers.append(Server(uvicorn.Config(app, host=host, port=p, log_level="warning",
                                                 timeout_graceful_shutdown=50)))
    try:  # uvloop's transports write a buffer without copying it and cost less per call
        import uvloop
        uvloop.run(serve_together(servers))
    except ImportError:
        asyncio.run(serve_together(servers))
    if failed:
        log.error("exiting: the engine failed (%s)", failed[0])
        return 1
    return 0 if all(server.started for server in servers) else 3


def _fail_step(batch: object) -> None:
    raise RuntimeError("injected fault: every step fails")
