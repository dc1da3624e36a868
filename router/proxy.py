"""The router's work on one request: pick a replica, send, retry elsewhere, hand off from
prefill to decode, relay the answer.

Colocated models: one mixed replica takes the whole request. Disaggregated models: a
prefill replica computes the prompt and the first token, a decode replica pulls the KV
and generates the rest (ARCHITECTURE.md, "The path of one request"). A replica that
fails before the client has seen a byte is taken out and the request goes to another;
probes bring it back. Streams pass through chunk by chunk.

Replicas are the workers' internal listeners: every request, probe and lease release
carries the shared token (`Authorization: Bearer`, fleetwise/protocol.py).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fleetwise.logs import incoming_request_id, request_id
from fleetwise.protocol import (
    AUTH_HEADER,
    PROTOCOL_VERSION,
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    DecodeRequest,
    PrefillAnswer,
    PrefillRequest,
    bearer,
)

from .endpoints import EndpointSource, ModelRoute
from .fanout import fan_out, merge_bodies, merge_streams
from .limits import Limits, check_counts, check_weight, parse_body, read_body
from .metrics import RouterMetrics
from .policies import RoutingPolicy, make_policy, prefix_keys, prompt_text
from .replica import Replica
from .retries import RESET, TIMEOUT, Elsewhere, RouterError, error_event, first_chunk, on_failure, refused
from .upstream import Late, Pool, Upstream, UpstreamError, UpstreamTimeout, unsupported
from .upstream import Response as UpstreamResponse

log = logging.getLogger(__name__)

PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


class Router:
    def __init__(self, source: EndpointSource, policy: str = "prefix_affinity", max_inflight: int = 2048,
                 max_attempts: int = 3, request_timeout: float = 600.0, probe_interval: float = 1.0,
                 limits: Limits = Limits(), token: str | None = None):
        """`token`: the shared token the workers' internal listeners ask for."""
        for route in source.models().values():
            for replica in route.all():
                problem = unsupported(replica.url)
                if problem:
                    raise ValueError(f"replica of {route.name!r}: {problem}")
        self.source = source
        self.limits = limits
        self.policy_name = policy
        # one per (model, role): each keeps its own affinity table
        self.policies: dict[tuple[str, str], RoutingPolicy] = {}
        make_policy(policy)  # fails early on an unknown name
        self.max_inflight, self.max_attempts = max_inflight, max_attempts
        self.request_timeout, self.probe_interval = request_timeout, probe_interval
        self.inflight = 0
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None  # probes and lease releases
        self.pool = Pool(read_timeout=request_timeout)  # requests
        self.auth = {AUTH_HEADER: bearer(token)} if token else {}
        self._auth_line = "".join(f"{k}: {v}\r\n" for k, v in self.auth.items()).encode()
        self._prober: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # lease releases: held until done, or they may be collected

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.request_timeout),
            json_serialize=lambda o: orjson.dumps(o).decode(), headers=self.auth)
        self._prober = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._prober:
            self._prober.cancel()
        if self.session:
            await self.session.close()
        self.pool.close()

    def policy(self, model: str, role: str) -> RoutingPolicy:
        key = (model, role)
        if key not in self.policies:
            self.policies[key] = make_policy(self.policy_name)
        return self.policies[key]

    # -- health ------------------------------------------------------------------------------

    def _mark(self, replica: Replica, ok: bool) -> None:
        if replica.record(ok):
            self.metrics.child(self.metrics.healthy, replica.model, replica.role, replica.url).set(int(replica.healthy))

    async def _probe(self, replica: Replica) -> None:
        assert self.session is not None
        problem = unsupported(replica.url)  # one a reload brought in: never probed over TLS
        if problem:
            if replica.healthy:
                log.error("replica of %r taken out: %s", replica.model, problem)
            self._mark(replica, False)
            return
        try:
            async with self.session.get(replica.url + "/health", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                self._mark(replica, r.status == 200)
        except (TimeoutError, aiohttp.ClientError, OSError):
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
        done: list[int] = []

        def release() -> None:
            if not done:
                done.append(1)
                replica.outstanding -= 1
                gauge.set(replica.outstanding)
        return release

    async def call(self, model: str, role: str, replicas: list[Replica], path: str, payload: bytes,
                   stream: bool, keys: list[int], retry_on: frozenset[str] = frozenset(),
                   late: Late | None = None) -> Upstream:
        """Sends to one replica after another until one takes the request; returns its answer
        (a 2xx, the request's own 4xx or 5xx, for a stream its first chunk) or, when every
        replica was busy, a 429. See retries.py for when another replica is tried."""
        tried: set[int] = set()
        last_error = "no replica of this role is available"
        busy = None
        policy = self.policy(model, role)
        headers = self._auth_line + _HEADERS % request_id.get().encode()
        for _ in range(self.max_attempts):
            replica = policy.choose([r for r in replicas if id(r) not in tried], keys)
            if replica is None:
                break
            tried.add(id(replica))
            self.metrics.child(self.metrics.decisions, model, role, self.policy_name).inc()
            try:
                up = await self._attempt(replica, path, payload, headers, stream, retry_on, late)
            except Elsewhere as e:
                last_error = str(e)
                log.warning("%s replica failed for %s, trying another: %s", role, model, last_error)
                self.metrics.child(self.metrics.retries, model, role).inc()
                continue
            if up.status == 429:
                busy = up
                continue
            return up
        if busy is not None:
            return busy
        raise RouterError(503, f"no {role} replica of {model!r} could take the request: {last_error}",
                          code="no_replica", type_="server_error")

    async def _attempt(self, replica: Replica, path: str, payload: bytes, headers: bytes, stream: bool,
                       retry_on: frozenset[str], late: Late | None) -> Upstream:
        """One try at one replica: its answer, or Elsewhere when another replica may take the
        request, or the RouterError the client gets."""
        release = self._acquire(replica)
        resp: UpstreamResponse | None = None
        try:
            resp = await self.pool.post(replica.url, path, payload, headers, late)
            status, content_type = resp.status, resp.content_type
            if stream and status == 200:
                chunks = resp.iter_chunks()
                first = await first_chunk(chunks)

                def close(resp: UpstreamResponse = resp, release: Callable[[], None] = release) -> None:
                    resp.release()
                    release()
                resp = None  # the stream's now: released by close()
                self._alive(replica)
                return Upstream(status, content_type, first, chunks, close, replica)
            body = await resp.read()
        except UpstreamError as e:
            self._mark(replica, False)  # a broken connection or a timeout: unwell, whatever the request
            if isinstance(e, UpstreamTimeout):
                self.metrics.child(self.metrics.timeouts, replica.model, replica.role, replica.url).inc()
            raise on_failure(replica.url, e, retry_on)
        finally:
            if resp is not None:
                resp.release()
                release()
        if status >= 500:
            self.metrics.child(self.metrics.server_errors, replica.model, replica.role, replica.url).inc()
        refusal = refused(replica.url, status, body)
        if refusal is not None:
            if refusal.down:
                self._mark(replica, False)
            raise refusal
        self._alive(replica)
        return Upstream(status, content_type, body, replica=replica)

    def _alive(self, replica: Replica) -> None:
        if replica.failures or not replica.healthy:
            self._mark(replica, True)

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: Request, kind: str) -> Response:
        rid = incoming_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id.set(rid)
        response = await self._handle(request, kind)
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    async def _handle(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        model = ""  # the served model the body named, for the request metric: a bounded label
        mode, status = "", 500
        try:
            raw = await read_body(request, self.limits.max_body_bytes)
            body = parse_body(raw)
            name = body.get("model")
            if not isinstance(name, str):
                raise RouterError(400, "model: a model name is required", param="model")
            if (route := self.source.models().get(name)) is None:
                raise RouterError(404, f"the model {name!r} does not exist; served: "
                                  f"{', '.join(sorted(self.source.models()))}", code="model_not_found", param="model")
            model = name
            check_counts(body, kind, self.limits)
            # in disaggregated mode each sequence is a handoff of its own, and holds a place
            subs = fan_out(body, kind) if route.mode == "disaggregated" else [(body, 0)]
            check_weight(len(subs), self.inflight, self.max_inflight)
            mode = route.mode
            stream = bool(body.get("stream"))
            # hashing the prompt costs on every request: only prefix affinity reads the keys
            keys = prefix_keys(prompt_text(body, kind)) if self.policy_name == "prefix_affinity" else []
            weight = len(subs)
            self._enter(weight)
            try:
                if mode == "colocated":
                    up = await self.call(model, "mixed", route.replicas["mixed"], PATHS[kind], raw, stream, keys,
                                         retry_on=_STREAM if stream else frozenset())
                else:
                    up = await self.disaggregated(route, kind, body, subs, stream, keys)
            except BaseException:
                self._enter(-weight)
                raise
            status = up.status
            return self._respond(up, model, t0, weight)
        except RouterError as e:
            status = e.status
            if not mode:
                self.metrics.child(self.metrics.requests, model or "", mode, str(status)).inc()
            return e.response()
        finally:
            if mode:
                self.metrics.child(self.metrics.requests, model, mode, str(status)).inc()

    def _enter(self, weight: int) -> None:
        self.inflight += weight
        self.metrics.inflight.set(self.inflight)

    def _respond(self, up: Upstream, model: str, t0: float, weight: int) -> Response:
        if up.rest is None:
            self._enter(-weight)
            self.metrics.child(self.metrics.latency, model).observe(time.perf_counter() - t0)
            return Response(up.body, status_code=up.status, media_type=up.content_type)
        self.metrics.child(self.metrics.ttft, model).observe(time.perf_counter() - t0)
        return StreamingResponse(self._relay(up, model, t0, weight), status_code=up.status,
                                 media_type="text/event-stream")

    async def _relay(self, up: Upstream, model: str, t0: float, weight: int) -> AsyncIterator[bytes]:
        assert up.rest is not None
        try:
            yield up.body
            async for chunk in up.rest:
                yield chunk
        except UpstreamError as e:
            # tokens already reached the client: end the stream with a clear error
            if up.replica:
                self._broken(up.replica, e)
            yield error_event(e) + b"data: [DONE]\n\n"
        finally:
            up.release()
            self._enter(-weight)
            self.metrics.child(self.metrics.latency, model).observe(time.perf_counter() - t0)

    def _broken(self, replica: Replica, e: UpstreamError) -> None:
        """A stream that broke after its first chunk: the replica is marked down."""
        log.warning("stream from %s broke: %s", replica.url, e)
        self._mark(replica, False)
        if isinstance(e, UpstreamTimeout):
            self.metrics.child(self.metrics.timeouts, replica.model, replica.role, replica.url).inc()

    async def disaggregated(self, route: ModelRoute, kind: str, body: dict, subs: list[tuple[dict, int]],
                            stream: bool, keys: list[int]) -> Upstream:
        if len(subs) == 1:
            return await self.handoff(route, kind, body, stream, keys)
        outcomes = await asyncio.gather(*(self.handoff(route, kind, sub, stream, keys) for sub, _ in subs),
                                        return_exceptions=True)
        ups = [u for u in outcomes if not isinstance(u, BaseException)]
        errors = [u for u in outcomes if isinstance(u, BaseException)]
        failed: Upstream | BaseException | None = errors[0] if errors else next(
            (u for u in ups if u.status != 200), None)
        if failed is not None:
            for u in ups:
                u.release()
            if isinstance(failed, BaseException):
                raise failed
            return failed
        offsets = [offset for _, offset in subs]
        counted = [offset % max(1, int(body.get("n") or 1)) == 0 for offset in offsets]
        if not stream:
            return Upstream(200, "application/json", merge_bodies(ups, offsets, counted))
        return merge_streams(ups, offsets, counted, bool((body.get("stream_options") or {}).get("include_usage")),
                             self._broken)

    async def handoff(self, route: ModelRoute, kind: str, body: dict, stream: bool, keys: list[int]) -> Upstream:
        model = route.name
        payload = PrefillRequest(kind=kind, request=body).model_dump_json().encode()  # type: ignore[arg-type]
        # a prefill is bounded work (one token): after a broken connection or a timeout it is
        # redone on another replica, and a late answer from the first has its lease released
        pre = await self.call(model, "prefill", route.replicas["prefill"], "/internal/prefill", payload, False, keys,
                              retry_on=frozenset({RESET, TIMEOUT}), late=self._late_prefill)
        if pre.status != 200:
            return pre  # the client's own error (4xx or 5xx), or every prefill replica busy (429)
        assert pre.replica is not None  # call() names the replica that answered
        prefill_url = pre.replica.url
        try:
            first = PrefillAnswer.model_validate_json(pre.body)
        except ValidationError as e:
            raise RouterError(502, f"the prefill worker {prefill_url} answered outside protocol version "
                              f"{PROTOCOL_VERSION}: {e.errors()[0]['msg']}", code="bad_upstream", type_="server_error")
        dbody = DecodeRequest(kind=kind, request=body, prompt_token_ids=first.prompt_token_ids,  # type: ignore[arg-type]
                              first_token=first.first_token, first_logprob=first.first_logprob,
                              prefill_url=prefill_url, handle=first.handle).model_dump_json().encode()
        taken = False
        try:
            up = await self.call(model, "decode", route.replicas["decode"], "/internal/decode", dbody, stream, keys,
                                 retry_on=_STREAM if stream else frozenset())
            # a decode worker answers 200 only after it pulled the KV (and let the lease go)
            taken = up.status == 200
            return up
        finally:
            if first.handle and not taken:
                self._release_soon(prefill_url, first.handle)

    async def _late_prefill(self, url: str, resp: UpstreamResponse) -> None:
        """A prefill answer that came after the router had given up on it: its lease goes."""
        body = await resp.read()
        if resp.status == 200:
            try:
                handle = PrefillAnswer.model_validate_json(body).handle
            except ValidationError:
                return
            if handle:
                await self._release_lease(url, handle)

    def _release_soon(self, url: str, handle: str) -> None:
        task = asyncio.create_task(self._release_lease(url, handle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_lease(self, url: str, handle: str) -> None:
        assert self.session is not None
        try:
            async with self.session.delete(f"{url}/internal/kv/{handle}"):
                pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # the lease expires on its own


# a stream has given the client nothing before its first chunk: a broken connection until
# then is redone on another replica (ARCHITECTURE.md, "The path of one request")
_STREAM = frozenset({RESET})

# on every call to a worker: the request's id and the internal protocol's version
_HEADERS = b"%s: %%s\r\n%s: %d\r\n" % (REQUEST_ID_HEADER.encode(), VERSION_HEADER.encode(), PROTOCOL_VERSION)
