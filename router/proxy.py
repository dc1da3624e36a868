"""The router: OpenAI-compatible front door over the replicas of each model.

Colocated models: one mixed replica takes the whole request. Disaggregated models: a
prefill replica computes the prompt and the first token, a decode replica pulls the KV
and generates the rest (ARCHITECTURE.md, "Data flow of one request"). A replica that
fails before the client has seen a byte is taken out and the request goes to another;
probes bring it back. Streams pass through chunk by chunk.
"""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fleetwise.telemetry import catalog as c

from .endpoints import EndpointSource, ModelRoute
from .fanout import fan_out, merge_bodies, merge_streams
from .policies import make_policy, prefix_keys
from .replica import Replica
from .upstream import Pool, Upstream, UpstreamError

log = logging.getLogger(__name__)

PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.type, self.param = status, code, headers, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(c.ROUTER_REQUESTS, "Requests by model, mode and HTTP status.",
                                ["model_name", "mode", "status"], registry=r)
        self.decisions = Counter(c.ROUTER_DECISIONS, "Replica choices by model, role and policy.",
                                 ["model_name", "role", "policy"], registry=r)
        self.retries = Counter(c.ROUTER_RETRIES, "Attempts that failed before the client saw a byte.",
                               ["model_name", "role"], registry=r)
        self.inflight = Gauge(c.ROUTER_INFLIGHT, "Requests inside the router.", registry=r)
        self.healthy = Gauge(c.ROUTER_REPLICA_HEALTHY, "1 while a replica takes requests.",
                             ["model_name", "role", "url"], registry=r)
        self.outstanding = Gauge(c.ROUTER_REPLICA_OUTSTANDING, "Requests sent to a replica and not finished.",
                                 ["model_name", "role", "url"], registry=r)
        self.latency = Histogram(c.ROUTER_REQUEST_SECONDS, "Time from request to last byte.", ["model_name"],
                                 buckets=BUCKETS, registry=r)
        self.ttft = Histogram(c.ROUTER_TTFT_SECONDS, "Time from request to the first streamed chunk.",
                              ["model_name"], buckets=BUCKETS, registry=r)
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels):
        """A metric's labelled series, looked up once (labels() costs more than inc())."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series


class Router:
    def __init__(self, source: EndpointSource, policy: str = "prefix_affinity", max_inflight: int = 2048,
                 max_attempts: int = 3, request_timeout: float = 600.0, probe_interval: float = 1.0):
        self.source = source
        self.policy_name = policy
        self.policies = {}  # one per (model, role): each keeps its own affinity table
        make_policy(policy)  # fails early on an unknown name
        self.max_inflight, self.max_attempts = max_inflight, max_attempts
        self.request_timeout, self.probe_interval = request_timeout, probe_interval
        self.inflight = 0
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None  # probes and lease releases
        self.pool = Pool(read_timeout=request_timeout)  # requests
        self._prober: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.request_timeout),
            json_serialize=lambda o: orjson.dumps(o).decode())
        self._prober = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._prober:
            self._prober.cancel()
        if self.session:
            await self.session.close()
        self.pool.close()

    def policy(self, model: str, role: str):
        key = (model, role)
        if key not in self.policies:
            self.policies[key] = make_policy(self.policy_name)
        return self.policies[key]

    # -- health ------------------------------------------------------------------------------

    def _mark(self, replica: Replica, ok: bool) -> None:
        was = replica.healthy
        if ok:
            replica.failures = 0
            replica.healthy = True
        else:
            replica.failures += 1
            replica.healthy = False
        if was != replica.healthy or replica.failures <= 1:
            self.metrics.child(self.metrics.healthy, replica.model, replica.role, replica.url).set(int(replica.healthy))

    async def _probe(self, replica: Replica) -> None:
        try:
            async with self.session.get(replica.url + "/health", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                self._mark(replica, r.status == 200)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            self._mark(replica, False)

    async def probe_all(self) -> None:
        for url in self.source.refresh():
            for policy in self.policies.values():
                policy.forget(url)
        replicas = [r for route in self.source.models().values() for r in route.all()]
        await asyncio.gather(*(self._probe(r) for r in replicas))

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a probe round must never end the loop
                log.exception("probe round failed")
            await asyncio.sleep(self.probe_interval)

    # -- sending -----------------------------------------------------------------------------

    def _acquire(self, replica: Replica) -> Callable[[], None]:
        replica.outstanding += 1
        gauge = self.metrics.child(self.metrics.outstanding, replica.model, replica.role, replica.url)
        gauge.set(replica.outstanding)
        done = []

        def release():
            if not done:
                done.append(1)
                replica.outstanding -= 1
                gauge.set(replica.outstanding)
        return release

    async def call(self, model: str, role: str, replicas: list[Replica], path: str, payload: bytes,
                   stream: bool, keys: list[int]) -> Upstream:
        """Sends to one replica after another until one answers: a 2xx, or a 4xx that is the
        request's own fault; for a stream, until its first chunk has arrived."""
        tried: set[int] = set()
        last_error = "no replica of this role is available"
        busy = None
        policy = self.policy(model, role)
        for _ in range(self.max_attempts):
            replica = policy.choose([r for r in replicas if id(r) not in tried], keys)
            if replica is None:
                break
            tried.add(id(replica))
            self.metrics.child(self.metrics.decisions, model, role, self.policy_name).inc()
            release = self._acquire(replica)
            resp = None
            try:
                resp = await self.pool.post(replica.url, path, payload)
                if resp.status == 429:
                    busy = Upstream(resp.status, resp.content_type, await resp.read(), replica=replica)
                    resp.release()
                    release()
                    continue
                if resp.status >= 500:
                    last_error = f"{replica.url} answered {resp.status}: {(await resp.read())[:200]!r}"
                    raise _Retry()
                if replica.failures or not replica.healthy:
                    self._mark(replica, True)
                if not stream or resp.status != 200:
                    body = await resp.read()
                    resp.release()
                    release()
                    return Upstream(resp.status, resp.content_type, body, replica=replica)
                chunks = resp.iter_chunks()
                first = await anext(chunks, b"")
                if not first:
                    last_error = f"{replica.url} closed the stream before the first chunk"
                    raise _Retry()

                def close(resp=resp, release=release):
                    resp.release()
                    release()
                return Upstream(resp.status, resp.content_type, first, chunks, close, replica)
            except (_Retry, UpstreamError) as e:
                if not isinstance(e, _Retry):
                    last_error = f"{replica.url}: {e}"
                log.warning("%s replica failed for %s, trying another: %s", role, model, last_error)
                self._mark(replica, False)
                self.metrics.child(self.metrics.retries, model, role).inc()
                if resp is not None:
                    resp.release()
                release()
        if busy is not None:
            return busy
        raise RouterError(503, f"no {role} replica of {model!r} could take the request: {last_error}",
                          code="no_replica", type_="server_error")

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        model, mode, status = "", "", 500
        try:
            raw = await request.body()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise RouterError(400, f"the body is not valid JSON: {e}")
            if not isinstance(body, dict):
                raise RouterError(400, "the body must be a JSON object")
            model = body.get("model")
            if not isinstance(model, str):
                raise RouterError(400, "model: a model name is required", param="model")
            route = self.source.models().get(model)
            if route is None:
                raise RouterError(404, f"the model {model!r} does not exist; served: "
                                  f"{', '.join(sorted(self.source.models()))}", code="model_not_found", param="model")
            if self.inflight >= self.max_inflight:
                raise RouterError(429, f"the router is at its limit of {self.max_inflight} requests in flight",
                                  code="router_full", headers={"Retry-After": "1"}, type_="rate_limit_error")
            mode = route.mode
            stream = bool(body.get("stream"))
            keys = prefix_keys(_prompt_text(body, kind)) if self.policy_name == "prefix_affinity" else []
            self.inflight += 1
            self.metrics.inflight.set(self.inflight)
            try:
                if mode == "colocated":
                    up = await self.call(model, "mixed", route.replicas["mixed"], PATHS[kind], raw, stream, keys)
                else:
                    up = await self.disaggregated(route, kind, body, stream, keys)
            except BaseException:
                self._leave()
                raise
            status = up.status
            return self._respond(up, model, t0)
        except RouterError as e:
            status = e.status
            if not mode:
                self.metrics.child(self.metrics.requests, model or "", mode, str(status)).inc()
            return e.response()
        finally:
            if mode:
                self.metrics.child(self.metrics.requests, model, mode, str(status)).inc()

    def _leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)

    def _respond(self, up: Upstream, model: str, t0: float) -> Response:
        if up.rest is None:
            self._leave()
            self.metrics.child(self.metrics.latency, model).observe(time.perf_counter() - t0)
            return Response(up.body, status_code=up.status, media_type=up.content_type)
        self.metrics.child(self.metrics.ttft, model).observe(time.perf_counter() - t0)

        async def relay():
            try:
                yield up.body
                async for chunk in up.rest:
                    yield chunk
            except UpstreamError as e:
                # tokens already reached the client: end the stream with a clear error
                log.warning("stream from %s broke: %s", up.replica.url if up.replica else "?", e)
                if up.replica:
                    self._mark(up.replica, False)
                err = {"error": {"message": f"the replica failed mid-stream: {type(e).__name__}",
                                 "type": "server_error", "param": None, "code": "replica_failed"}}
                yield b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n"
            finally:
                up.release()
                self._leave()
                self.metrics.child(self.metrics.latency, model).observe(time.perf_counter() - t0)
        return StreamingResponse(relay(), status_code=up.status, media_type="text/event-stream")

    async def disaggregated(self, route: ModelRoute, kind: str, body: dict, stream: bool,
                            keys: list[int]) -> Upstream:
        subs = fan_out(body, kind)
        if len(subs) == 1:
            return await self.handoff(route, kind, body, stream, keys)
        ups = await asyncio.gather(*(self.handoff(route, kind, sub, stream, keys) for sub, _ in subs),
                                   return_exceptions=True)
        failed = next((u for u in ups if isinstance(u, BaseException)), None)
        if failed is None:
            failed = next((u for u in ups if u.status != 200), None)
        if failed is not None:
            for u in ups:
                if not isinstance(u, BaseException):
                    u.release()
            if isinstance(failed, BaseException):
                raise failed
            return failed
        offsets = [offset for _, offset in subs]
        counted = [offset % max(1, int(body.get("n") or 1)) == 0 for offset in offsets]
        if not stream:
            return Upstream(200, "application/json", merge_bodies(ups, offsets, counted))
        return merge_streams(ups, offsets, counted, bool((body.get("stream_options") or {}).get("include_usage")))

    async def handoff(self, route: ModelRoute, kind: str, body: dict, stream: bool, keys: list[int]) -> Upstream:
        model = route.name
        payload = orjson.dumps({"kind": kind, "request": body})
        pre = await self.call(model, "prefill", route.replicas["prefill"], "/internal/prefill", payload, False, keys)
        if pre.status != 200:
            return pre  # the client's own error (4xx), or every prefill replica busy (429)
        first = orjson.loads(pre.body)
        dbody = orjson.dumps({"kind": kind, "request": body, "prompt_token_ids": first["prompt_token_ids"],
                              "first_token": first["first_token"], "first_logprob": first["first_logprob"],
                              "prefill_url": pre.replica.url, "handle": first["handle"]})
        try:
            return await self.call(model, "decode", route.replicas["decode"], "/internal/decode", dbody, stream, keys)
        except RouterError:
            if first["handle"]:
                asyncio.create_task(self._release_lease(pre.replica.url, first["handle"]))
            raise

    async def _release_lease(self, url: str, handle: str) -> None:
        try:
            async with self.session.delete(f"{url}/internal/kv/{handle}"):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # the lease expires on its own


class _Retry(Exception):
    pass


def _prompt_text(body: dict, kind: str) -> str:
    if kind == "chat":
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{m.get('role')}:{content}")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


def build_app(router: Router) -> Starlette:
    async def completions(request: Request):
        return await router.handle(request, "completion")

    async def chat(request: Request):
        return await router.handle(request, "chat")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetwise", "mode": route.mode}
            for name, route in router.source.models().items()]})

    async def health(request: Request):
        summary = {name: {role: sum(r.available for r in rs) for role, rs in route.replicas.items() if rs}
                   for name, route in router.source.models().items()}
        servable = any(all(v > 0 for v in roles.values()) for roles in summary.values())
        return JSONResponse({"status": "ok" if servable else "no_replicas", "models": summary,
                             "inflight": router.inflight}, status_code=200 if servable else 503)

    async def metrics(request: Request):
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app):
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
    ], lifespan=lifespan)
    hot = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}

    async def asgi(scope, receive, send):
        """The two request paths skip Starlette's routing and middleware: they are every
        request the router serves, and that stack is a good share of its overhead."""
        kind = hot.get(scope.get("path")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if kind is None:
            await app(scope, receive, send)
            return
        response = await router.handle(Request(scope, receive), kind)
        await response(scope, receive, send)
    return asgi


def serve(source: EndpointSource, host: str, port: int, policy: str = "prefix_affinity", max_inflight: int = 2048,
          probe_interval: float = 1.0) -> None:
    import uvicorn

    router = Router(source, policy, max_inflight=max_inflight, probe_interval=probe_interval)
    uvicorn.run(build_app(router), host=host, port=port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False, date_header=False, timeout_graceful_shutdown=5)
