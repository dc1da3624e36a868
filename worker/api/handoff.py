"""Prefill -> decode handoff endpoints (ARCHITECTURE.md, "The path of one request").

A prefill worker computes the prompt and the first token and keeps the prompt's blocks
under a lease; the router passes the handle to a decode worker, which reserves blocks,
pulls the keys and values (kv/transfer.py), releases the lease and decodes the rest in its
own batch. A pull that fails for any reason is never used: the prompt is recomputed. A
decode worker with no blocks to spare for the prompt waits for its running decodes to free
some (`KV_BLOCKS_WAIT_S`, first come first served) before it falls back to recomputing: a
prompt pass among its decodes is the stall disaggregation is for avoiding. The bodies are
the internal protocol's (fleetwise/protocol.py).

These routes are served only by the internal listener, behind the shared token
(server.py): the prefill address a decode request names comes from an authenticated
caller, and the pull carries the token to it. Everything a decode request says is checked
before any work: the address's shape (protocol.py), the token ids against this model's
vocabulary, the stream's header and frame sizes (kv/transfer.py). Prefills that would hold
blocks are admitted against the connector's lease caps, or get 429.
"""

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from fleetwise.openai_schema import ERRORS, ROUTES, errors
from fleetwise.protocol import (
    AUTH_HEADER,
    MAX_KV_SEGMENT_TOKENS,
    DecodeRequest,
    PrefillAnswer,
    PrefillRequest,
    ResumeRequest,
    bearer,
)

from ..engine.async_engine import tagged
from ..engine.engine import RequestError
from ..engine.sequence import SamplingParams
from ..kv.connector import KVConnector, KVReservation
from ..kv.pull import KVClient, pull, pull_segments
from ..kv.transfer import MAX_SEGMENTS, KVTransferError, client_session, stream_size
from .export import add_export_route
from .kv_stream import KVStreamResponse, kv_response
from .openai import APIError, ChatCompletionRequest, CompletionRequest
from .resume import resume
from .service import WorkerAPI, engine_request_id

log = logging.getLogger(__name__)

LEASES_FULL_RETRY_SECONDS = 1  # leases go as decode workers pull them: soon
KV_BLOCKS_WAIT_S = 10.0  # a decode request with no blocks to spare waits this long for some, then recomputes
KV_SEGMENT_TOKENS = 256  # an early prefill's stream: tokens per segment, where its prefill worker names none


async def _parse(api: WorkerAPI, kind: str, body: dict) -> tuple[CompletionRequest | ChatCompletionRequest,
                                                         list[int], SamplingParams]:
    """The client's request as the public endpoint would read it: (request, prompt, params)."""
    req: CompletionRequest | ChatCompletionRequest
    try:
        if kind == "completion":
            req = CompletionRequest.model_validate(body)
            prompts, params_list = await api.prepare_completion(req)
            if len(prompts) != 1:
                raise _error(400, "a prefill/decode handoff takes one prompt per request", "prompt")
            prompt, params = prompts[0], params_list[0]
        else:
            req = ChatCompletionRequest.model_validate(body)
            prompt, params = await api.prepare_chat(req)
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    if params.n != 1:
        raise _error(400, "a prefill/decode handoff takes n=1 (the router fans out n > 1)", "n")
    return req, prompt, params


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(status, message, param=param, code=code)


def _check_tokens(body: DecodeRequest, vocab: int) -> None:
    """The handed-over token ids are this model's: a 400 naming the field otherwise."""
    bad = next((t for t in body.prompt_token_ids if t >= vocab), None)
    if bad is not None:
        raise _error(400, f"prompt_token_ids: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                     "prompt_token_ids")
    if body.first_token is not None and body.first_token >= vocab:
        raise _error(400, f"first_token: token id {body.first_token} is outside the vocabulary (0..{vocab - 1})",
                     "first_token")
    if body.first_logprob is not None and any(t >= vocab for t, _ in body.first_logprob[1]):
        raise _error(400, f"first_logprob: a token id is outside the vocabulary (0..{vocab - 1})", "first_logprob")


def _first_token(first: dict | None, vocab: int) -> dict | None:
    """A segmented stream's first token, when it is this model's (else the prompt is recomputed)."""
    if first is None:
        return None
    token, logprob = first.get("first_token"), first.get("first_logprob")
    if not isinstance(token, int) or not 0 <= token < vocab:
        log.warning("an early prefill's first token %r is not this model's; recomputing the prompt", token)
        return None
    try:
        if logprob is not None and not all(isinstance(t, int) and 0 <= t < vocab for t, _ in logprob[1]):
            return None
    except (TypeError, ValueError, IndexError):
        return None
    return first


def add_handoff_routes(app: FastAPI, api: WorkerAPI, connector: KVConnector, faults: frozenset[str] = frozenset(),
                       token: str | None = None) -> Callable[[], Awaitable[None]]:
    """Adds the endpoints; returns a coroutine function that closes their HTTP client.
    `token`: the shared token this worker's pulls carry to prefill workers."""
    handoff = Handoff(api, connector, faults, token)
    app.post("/internal/prefill", response_model=None, summary="Prefill: a prompt's first token, its KV held",
             responses={200: {"model": PrefillAnswer}, **ERRORS})(handoff.prefill)
    app.get("/internal/kv/{handle}", response_model=None, summary="A held prompt's KV stream", responses={
        200: {"description": "the KV stream (kv/transfer.py)", "content": {"application/octet-stream": {}}},
        **errors(400, 404)})(handoff.kv)
    app.delete("/internal/kv/{handle}", response_model=None, summary="Release a KV lease", status_code=204,
               responses=errors(404))(handoff.release)
    app.post("/internal/decode", response_model=None, summary="Decode: continue a prefilled request",
             responses=ROUTES["/v1/completions"]["responses"])(handoff.decode_)

    async def resume_(body: ResumeRequest, request: Request) -> StreamingResponse | dict:
        return await resume(api, body, request, handoff._pull)
    app.post("/internal/resume", response_model=None, summary="Resume: go on with another worker's stream",
             responses=ROUTES["/v1/completions"]["responses"])(resume_)
    add_export_route(app, api, connector)
    return handoff.close


class Handoff:
    def __init__(self, api: WorkerAPI, connector: KVConnector, faults: frozenset[str], token: str | None = None):
        self.api = api
        self.headers = {AUTH_HEADER: bearer(token)} if token else {}
        self.engine = api.engine
        self.metrics = api.metrics
        self.connector = connector
        self.faults = faults
        self.sessions: list[aiohttp.ClientSession] = []
        self.kv_client = KVClient(self.headers)
        self.background: set[asyncio.Task] = set()
        self.waiting_blocks: collections.deque[str] = collections.deque()  # decode requests, oldest first

    def http(self) -> aiohttp.ClientSession:
        """One pooled client per worker, made in the serving event loop."""
        if not self.sessions:
            self.sessions.append(client_session(self.headers))
        return self.sessions[0]

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        self.kv_client.close()

    def require(self, *roles: str) -> None:
        if self.api.role not in roles:
            raise _error(400, f"this worker's role is {self.api.role}; the endpoint needs {' or '.join(roles)}",
                         code="wrong_role")

    def _leases_full(self, full: str | None) -> None:
        if full is not None:
            self.metrics.on_reject("kv_leases_full")
            raise APIError(429, f"{full}; try again shortly or another prefill worker", code="kv_leases_full",
                           type_="rate_limit_error", headers={"Retry-After": str(LEASES_FULL_RETRY_SECONDS)})

    # -- prefill side ----------------------------------------------------------------------------

    async def prefill(self, body: PrefillRequest, request: Request) -> PrefillAnswer:
        """Computes the prompt and samples the first token; holds the prompt's KV blocks
        under a lease (the handle) unless the first token already ends the request."""
        self.require("prefill", "mixed")
        api = self.api
        self._leases_full(self.connector.lease_room())  # before any work, tokenising included
        _, prompt, params = await _parse(api, body.kind, body.request)
        try:
            api.core.validate(prompt, params)  # with the client's max_tokens, not the prefill's one
        except RequestError as e:
            raise _error(400, str(e), e.param)
        hold = params.max_tokens > 1
        blocks = api.core.block_manager.blocks_needed(len(prompt) + 1) if hold else 0
        if hold:
            self._leases_full(self.connector.admit_lease(blocks))
        if hold and body.kv_early:
            return self._early(prompt, params, blocks)
        try:
            rid = api.submit(prompt, dataclasses.replace(params, max_tokens=1), hold_kv=hold)
            [(_, out)] = await api.collect(tagged(0, self.engine.stream(rid, 1)), request)
        finally:
            if hold:
                self.connector.end_admission(blocks)
        if out.error:
            raise _error(500, f"prefill failed: {out.error}")
        held = hold and out.finish_reason == "length"
        return PrefillAnswer(handle=rid if held else None, prompt_token_ids=prompt, first_token=out.token_ids[0],
                             first_logprob=out.logprobs[0] if out.logprobs else None,
                             finish_reason=out.finish_reason, num_cached_tokens=out.num_cached_tokens,
                             model_id=self.connector.model_id, kv_lease_seconds=self.connector.lease_seconds)

    def _early(self, prompt: list[int], params: SamplingParams, blocks: int) -> PrefillAnswer:
        """An early prefill: submitted and answered at once; its KV streams while it is
        computed (kv/early.py), and its outputs are drained here until it ends."""
        rid = engine_request_id()
        self.connector.expect_early(rid, len(prompt))
        try:
            self.api.submit(prompt, dataclasses.replace(params, max_tokens=1), hold_kv=True, request_id=rid)
        except BaseException:
            self.connector.drop_early(rid)
            self.connector.end_admission(blocks)
            raise

        async def drain() -> None:
            try:
                async for _ in self.engine.stream(rid, 1):
                    pass
            except Exception as e:  # the engine failed it: the stream breaks, the decode side recomputes
                log.warning("early prefill %s failed: %s", rid, e)
            finally:
                self.connector.end_admission(blocks)
        self._background(drain())
        return PrefillAnswer(handle=rid, prompt_token_ids=prompt, first_token=None, kv_early=True,
                             kv_segment_tokens=min(self.api.core.config.max_num_batched_tokens, MAX_KV_SEGMENT_TOKENS),
                             model_id=self.connector.model_id, kv_lease_seconds=self.connector.lease_seconds)

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self.background.discard)

    async def kv(self, handle: str, start: int = 0, kv_version: int = 1, segment_tokens: int = 0) -> KVStreamResponse:
        """The held prompt's keys and values from token `start`, streamed layer by layer in
        stream version `kv_version` (kv/transfer.py), or (version 4) an early prefill's in
        segments of `segment_tokens` as they are computed; on a decode worker: a drained
        stream's context (engine/migration.py)."""
        self.require("prefill", "mixed", "decode")
        return kv_response(self.connector, self.metrics, self.faults, handle, start, kv_version, segment_tokens)

    async def release(self, handle: str) -> Response:
        self.require("prefill", "mixed", "decode")
        if not await self.engine.call(self.connector.release_kv, handle):
            raise _error(404, f"no KV lease {handle!r}", code="kv_not_found")
        return Response(status_code=204)

    # -- decode side -----------------------------------------------------------------------------

    async def decode_(self, body: DecodeRequest, request: Request) -> StreamingResponse | dict:
        """Continues a request whose prompt a prefill worker computed: pulls its KV (or
        recomputes the prompt when that fails) and answers like the public endpoint."""
        self.require("decode", "mixed")
        api, engine, connector = self.api, self.engine, self.connector
        _check_tokens(body, api.core.model_config.vocab_size)
        req, _, params = await _parse(api, body.kind, body.request)
        prompt = body.prompt_token_ids
        api.check_capacity()
        rid = engine_request_id()
        engine.open_stream(rid)
        activated = False
        try:
            try:  # an early prefill's first token comes with its KV: a stand-in until then
                res = await engine.call(connector.reserve_kv, rid, prompt, body.first_token or 0, params,
                                        body.first_logprob)
            except RequestError as e:
                raise _error(400, str(e), e.param)
            if res is None:
                res = await self._blocks_freed(rid)
            if body.kv_early:
                assert body.handle is not None and body.prefill_url is not None  # DecodeRequest's checks
                segment = max(body.kv_segment_tokens or KV_SEGMENT_TOKENS,  # in at most MAX_SEGMENTS
                              -(-(res.num_tokens if res is not None else 0) // MAX_SEGMENTS))
                first = await self._transfer(res, body.prefill_url, body.handle, segment)
                await engine.call(connector.activate_early, rid, _first_token(first, api.core.model_config.vocab_size))
            else:
                received = False
                if body.handle:
                    assert body.prefill_url is not None  # DecodeRequest refuses a handle without one
                    received = await self._pull(res, body.prefill_url, body.handle)
                await engine.call(connector.activate_kv, rid, received)
            activated = True
        finally:
            if not activated:
                engine.abort(rid)
        stream = tagged(0, engine.stream(rid, 1))
        if isinstance(req, CompletionRequest):
            return await api.respond_completion(req, [prompt], stream, request)
        return await api.respond_chat(req, prompt, stream, request)

    async def _blocks_freed(self, rid: str) -> KVReservation | None:
        """No blocks to spare for a handed-over prompt: it waits, at most `KV_BLOCKS_WAIT_S`
        and first come first served among those waiting, for running decodes to end and free
        theirs, rather than have its prompt recomputed here (a prompt pass inside every running
        decode's steps, what disaggregation keeps out of them). None: still none."""
        self.waiting_blocks.append(rid)
        deadline, delay = time.monotonic() + KV_BLOCKS_WAIT_S, 0.005
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.05)
                if self.waiting_blocks[0] == rid:
                    res = await self.engine.call(self.connector.retry_reserve, rid)
                    if res is not None:
                        return res
            log.info("no KV blocks freed for %s in %.0f s: its prompt is recomputed here", rid, KV_BLOCKS_WAIT_S)
            return None
        finally:
            self.waiting_blocks.remove(rid)

    async def _pull(self, res: KVReservation | None, url: str, handle: str) -> bool:
        return await self._transfer(res, url, handle) is not None

    async def _transfer(self, res: KVReservation | None, url: str, handle: str,
                        segment_tokens: int = 0) -> dict | None:
        """The reservation's KV pulled (segmented, an early prefill's, when `segment_tokens`):
        {} or the segmented stream's first token; None when it failed. The lease goes after."""
        metrics = self.metrics
        try:
            if res is None:
                metrics.on_kv_recompute("no_blocks")
                return None
            if res.num_tokens == 0 and not segment_tokens:  # the whole prompt is in this worker's prefix cache
                return {}
            expect = self.connector.header(res.start, res.num_tokens)
            t0, received = time.perf_counter(), 0
            try:
                switches = self.api.core.switches
                if switches is not None and (delay := switches.kv_delay(url)):
                    await asyncio.sleep(delay)  # a drill: a slow link to this peer
                first: dict = {}
                if segment_tokens:
                    first = await pull_segments(self.kv_client, url, handle, expect, self.connector.kv_sink(res),
                                                segment_tokens)
                    received = stream_size(expect, segment_tokens)
                else:
                    received = await pull(self.kv_client, url, handle, expect, self.connector.kv_sink(res))
            except (TimeoutError, KVTransferError, aiohttp.ClientError, OSError) as e:
                log.warning("KV pull of %s from %s failed, recomputing the prompt: %s",
                            handle, url, e)
                metrics.on_kv_recompute(e.reason if isinstance(e, KVTransferError) else "unreachable")
                metrics.on_kv_transfer("received", received)
                metrics.on_kv_peer(url, received, time.perf_counter() - t0, failed=True)
                return None
            metrics.on_kv_transfer("received", received, time.perf_counter() - t0)
            metrics.on_kv_peer(url, received, time.perf_counter() - t0, failed=False)
            return first
        finally:
            self._background(self._release(url, handle))

    async def _release(self, url: str, handle: str) -> None:
        try:
            async with self.http().delete(f"{url}/internal/kv/{handle}"):
                pass
        except (TimeoutError, aiohttp.ClientError, OSError) as e:  # the lease expires on its own
            log.info("could not release KV lease %s at %s: %s", handle, url, e)
