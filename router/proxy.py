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
import weakref
from collections.abc import AsyncIterator, Callable
from functools import partial

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fleetwise.logs import incoming_request_id, request_id
from fleetwise.protocol import (
    AUTH_HEADER,
    COALESCE_HEADER,
    PROTOCOL_VERSION,
    REQUEST_ID_HEADER,
    TOKEN_IDS_HEADER,
    VERSION_HEADER,
    bearer,
)

from .assemble import as_stream, assemble, whole, whole_response
from .endpoints import EndpointSource, ModelRoute
from .fanout import fan_out
from .handoff import Handoffs
from .limits import Limits, check_counts, check_weight, parse_body, read_body, wants_stream
from .metrics import RouterMetrics
from .migrate import Mover, Where, migrating
from .policies import PREFIX_KEYS, RoutingPolicy, make_policy, prompt_text
from .replica import MAX_HEALTH_BYTES, Replica, kv_versions, last_resort
from .retries import RESET, Elsewhere, RouterError, error_event, first_chunk, on_failure, refused
from .upstream import Late, Pool, Upstream, UpstreamError, UpstreamTimeout, unsupported
from .upstream import Response as UpstreamResponse

log = logging.getLogger(__name__)

PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


class Router:
    def __init__(self, source: EndpointSource, policy: str = "prefix_load", max_inflight: int = 2048,
                 max_attempts: int = 3, request_timeout: float = 600.0, probe_interval: float = 1.0,
                 limits: Limits = Limits(), token: str | None = None, max_migrations: int = 3,
                 max_tokens_kept: int = 1 << 17, drain_grace: float = 30.0):
        """`token`: the shared token the workers' internal listeners ask for. A stream moves
        to another replica at most `max_migrations` times, and only while it keeps at most
        `max_tokens_kept` token ids (prompt and output); streams still on a replica
        `drain_grace` seconds after it left routing (drained) move too."""
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
        self.metrics.inflight.set_function(lambda: self.inflight)
        self._gauged: weakref.WeakSet[Replica] = weakref.WeakSet()  # replicas whose outstanding gauge reads them
        self.session: aiohttp.ClientSession | None = None  # probes and lease releases
        self.pool = Pool(read_timeout=request_timeout)  # requests
        self.auth = {AUTH_HEADER: bearer(token)} if token else {}
        self._auth_line = "".join(f"{k}: {v}\r\n" for k, v in self.auth.items()).encode()
        self._prober: asyncio.Task | None = None
        self.mover = Mover(self._resume, self._broken, self.metrics, max_tokens_kept, max_migrations, drain_grace,
                           self._export, self._replicas)
        self.handoffs = Handoffs(self.call, self._migrating, self.metrics, lambda: self.session, _STREAM)

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
                if r.status == 200:
                    replica.kv_versions = kv_versions(await r.content.read(MAX_HEALTH_BYTES))
                self._mark(replica, r.status == 200)
        except (TimeoutError, aiohttp.ClientError, OSError):
            self._mark(replica, False)

    async def probe_all(self) -> None:
        for url in self.source.refresh():
            for policy in self.policies.values():
                policy.forget(url)
        replicas = [r for route in self.source.models().values() for r in route.all()]
        for r in replicas:
            self._gauge(r)
        self.mover.drain([r for r in replicas if r.routable], time.monotonic())
        await asyncio.gather(*(self._probe(r) for r in replicas))

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a probe round must never end the loop
                log.exception("probe round failed")
            await asyncio.sleep(self.probe_interval)

    # -- sending -----------------------------------------------------------------------------

    def _gauge(self, replica: Replica) -> None:
        """Its outstanding gauge reads the count when scraped, not set per request; every
        replica is gauged by the probe round that finds it, before a request can reach it."""
        if replica not in self._gauged:
            self._gauged.add(replica)
            self.metrics.child(self.metrics.outstanding, replica.model, replica.role, replica.url).set_function(
                lambda: replica.outstanding)

    def _acquire(self, replica: Replica) -> Callable[[], None]:
        replica.outstanding += 1
        done: list[int] = []

        def release() -> None:
            if not done:
                done.append(1)
                replica.outstanding -= 1
        return release

    async def call(self, model: str, role: str, replicas: list[Replica], path: str, payload: bytes,
                   stream: bool, keys: list[int], retry_on: frozenset[str] = frozenset(),
                   late: Late | None = None, coalesce: bool = False) -> Upstream:
        """Sends to one replica after another until one takes the request; returns its answer
        (a 2xx, the request's own 4xx or 5xx, for a stream its first chunk) or, when every
        replica was busy, a 429. See retries.py for when another replica is tried.
        `coalesce`: a stream the router assembles, asked for with its text as one event."""
        tried: set[int] = set()
        last_error = "no replica of this role is available"
        busy = None
        policy = self.policy(model, role)
        headers = self._auth_line + _HEADERS % request_id.get().encode() + (_COALESCE if coalesce else b"")
        for _ in range(self.max_attempts):
            untried = [r for r in replicas if id(r) not in tried]
            replica = policy.choose(untried, keys) or last_resort(untried)
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
                close = partial(_close, resp, release)
                abort = resp.abort
                resp = None  # the stream's now: released by close()
                self._alive(replica)
                return Upstream(status, content_type, first, chunks, close, replica, abort=abort)
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
        response.raw_headers.append((_RID, rid.encode()))  # as headers[...] = would, without its scan
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
            stream = wants_stream(body)
            # hashing the prompt costs on every request: only the prefix policies read the keys
            keyer = PREFIX_KEYS.get(self.policy_name)
            keys = keyer(prompt_text(body, kind)) if keyer else []
            weight = len(subs)
            self._enter(weight)
            try:
                up = await self._send(route, kind, body, raw, subs, stream, keys)
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

    async def _send(self, route: ModelRoute, kind: str, body: dict, raw: bytes, subs: list[tuple[dict, int]],
                    stream: bool, keys: list[int]) -> Upstream:
        """The request to its replicas, always as a stream that can move when its worker
        fails; a non-streamed one is assembled whole (assemble.py)."""
        if not stream:
            body, raw = as_stream(body), b""
            if route.mode != "colocated":
                subs = [(as_stream(sub), offset) for sub, offset in subs]
        if route.mode == "colocated":
            mixed = route.replicas["mixed"]
            up = await self.call(route.name, "mixed", mixed, PATHS[kind], raw or orjson.dumps(body), True, keys,
                                 retry_on=_STREAM, coalesce=not stream)
            if up.status == 200 and not up.content_type.startswith("text/event-stream"):
                return await whole(up)  # a replica that answers whole (not a fleetwise worker): as it is
            if up.status == 200:
                up = self._migrating(up, Where(route.name, "mixed", mixed, kind, body, keys, coalesce=not stream))
        else:
            up = await self.handoffs.disaggregated(route, kind, body, subs, True, keys, coalesce=not stream)
        if not stream and up.status == 200:
            up = await assemble(up, kind)
        return up

    def _enter(self, weight: int) -> None:
        self.inflight += weight

    def _respond(self, up: Upstream, model: str, t0: float, weight: int) -> Response:
        if up.rest is None:
            self._enter(-weight)
            self.metrics.child(self.metrics.latency, model).observe(time.perf_counter() - t0)
            return whole_response(up.body, up.status, up.content_type)
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

    def _replicas(self, model: str, role: str) -> list[Replica]:
        route = self.source.models().get(model)
        return route.replicas[role] if route is not None else []

    def _migrating(self, up: Upstream, where: Where) -> Upstream:
        return migrating(up, where, self.mover)

    async def _resume(self, model: str, role: str, replicas: list[Replica], payload: bytes,
                      keys: list[int], coalesce: bool) -> Upstream:
        return await self.call(model, role, replicas, "/internal/resume", payload, True, keys, retry_on=_STREAM,
                               coalesce=coalesce)

    async def _export(self, replica: Replica, request_ids: list[str]) -> dict[int, str] | None:
        """A drained replica's streams handed over with their KV (migrate.py): each choice's
        lease, or None when the replica would not or could not (the stream is recomputed)."""
        if self.session is None:
            return None
        try:
            async with self.session.post(replica.url + "/internal/export", json={"request_ids": request_ids},
                                         headers={VERSION_HEADER: str(PROTOCOL_VERSION)}) as r:
                if r.status != 200:
                    log.warning("%s did not export %s (%d: %s): recomputing", replica.url, request_ids, r.status,
                                (await r.text())[:200])
                    return None
                return {c["index"]: c["handle"] for c in (await r.json())["choices"]}
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as e:
            log.warning("export from %s failed, recomputing: %r", replica.url, e)
            return None

    def _broken(self, replica: Replica, e: UpstreamError) -> None:
        """A stream that broke after its first chunk: the replica is marked down."""
        log.warning("stream from %s broke: %s", replica.url, e)
        self._mark(replica, False)
        if isinstance(e, UpstreamTimeout):
            self.metrics.child(self.metrics.timeouts, replica.model, replica.role, replica.url).inc()


def _close(resp: UpstreamResponse, release: Callable[[], None]) -> None:
    resp.release()
    release()


_RID = REQUEST_ID_HEADER.encode()

# a stream has given the client nothing before its first chunk: a broken connection until
# then is redone on another replica (ARCHITECTURE.md, "The path of one request")
_STREAM = frozenset({RESET})

# on every call to a worker: the request's id and the internal protocol's version
# and, for streams, each event's token ids (migrate.py)
_HEADERS = b"%s: %%s\r\n%s: %d\r\n%s: 1\r\n" % (REQUEST_ID_HEADER.encode(), VERSION_HEADER.encode(), PROTOCOL_VERSION,
                                                 TOKEN_IDS_HEADER.encode())
_COALESCE = b"%s: 1\r\n" % COALESCE_HEADER.encode()
