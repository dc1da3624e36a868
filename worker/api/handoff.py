"""Prefill -> decode handoff endpoints (ARCHITECTURE.md, "Data flow of one request").

A prefill worker computes the prompt and the first token and keeps the prompt's blocks
under a lease; the router passes the handle to a decode worker, which reserves blocks,
pulls the keys and values (kv/transfer.py), releases the lease and decodes the rest in its
own batch. A pull that fails for any reason is never used: the prompt is recomputed.
"""

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Literal

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from ..engine.async_engine import tagged
from ..engine.engine import RequestError
from ..kv.connector import KVConnector, KVReservation
from ..kv.transfer import KVTransferError, encode, pull, stream_size
from .openai import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

CORRUPT_KV = "corrupt-kv"  # test-only fault switch: flips a byte of every KV stream sent


class PrefillRequest(BaseModel):
    kind: Literal["completion", "chat"]
    request: dict


class DecodeRequest(BaseModel):
    kind: Literal["completion", "chat"]
    request: dict
    prompt_token_ids: list[int]
    first_token: int
    first_logprob: tuple[float, list[tuple[int, float]]] | None = None
    prefill_url: str | None = None
    handle: str | None = None  # None: nothing to pull (the prefill finished the request)


def _parse(api, kind: str, body: dict):
    """The client's request as the public endpoint would read it: (request, prompt, params)."""
    try:
        if kind == "completion":
            req = CompletionRequest.model_validate(body)
            prompts, params = api.prepare_completion(req)
            if len(prompts) != 1:
                raise _error(400, "a prefill/decode handoff takes one prompt per request", "prompt")
            prompt, params = prompts[0], params[0]
        else:
            req = ChatCompletionRequest.model_validate(body)
            prompt, params = api.prepare_chat(req)
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    if params.n != 1:
        raise _error(400, "a prefill/decode handoff takes n=1 (the router fans out n > 1)", "n")
    return req, prompt, params


def _error(status, message, param=None, code=None):
    return APIError(status, message, param=param, code=code)


def _corrupted(frames):
    for i, frame in enumerate(frames):
        if i == 2:  # the first layer's keys: flip their last byte
            frame = bytes(frame[:-1]) + bytes([frame[-1] ^ 0xFF])
        yield frame


def add_handoff_routes(app: FastAPI, api, connector: KVConnector, faults: frozenset[str] = frozenset()):
    """Adds the endpoints; returns a coroutine function that closes their HTTP client."""
    engine = api.engine
    metrics = api.metrics
    sessions: list[aiohttp.ClientSession] = []

    def http() -> aiohttp.ClientSession:
        """One pooled client per worker, made in the serving event loop."""
        if not sessions:
            sessions.append(aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=30.0),
                connector=aiohttp.TCPConnector(limit=256), read_bufsize=1 << 20))
        return sessions[0]

    def require(*roles: str) -> None:
        if api.role not in roles:
            raise _error(400, f"this worker's role is {api.role}; the endpoint needs {' or '.join(roles)}",
                         code="wrong_role")

    @app.post("/internal/prefill")
    async def prefill(body: PrefillRequest, request: Request):
        """Computes the prompt and samples the first token; holds the prompt's KV blocks
        under a lease (the handle) unless the first token already ends the request."""
        require("prefill", "mixed")
        _, prompt, params = _parse(api, body.kind, body.request)
        try:
            api.core.validate(prompt, params)  # with the client's max_tokens, not the prefill's one
        except RequestError as e:
            raise _error(400, str(e), e.param)
        hold = params.max_tokens > 1
        rid = api.submit(prompt, dataclasses.replace(params, max_tokens=1), hold_kv=hold)
        [(_, out)] = await api.collect(tagged(0, engine.stream(rid, 1)), request)
        if out.error:
            raise _error(500, f"prefill failed: {out.error}")
        held = hold and out.finish_reason == "length"
        return {"handle": rid if held else None, "prompt_token_ids": prompt, "first_token": out.token_ids[0],
                "first_logprob": out.logprobs[0] if out.logprobs else None, "finish_reason": out.finish_reason,
                "num_cached_tokens": out.num_cached_tokens, "model_id": connector.model_id,
                "kv_lease_seconds": connector.lease_seconds}

    @app.get("/internal/kv/{handle}")
    async def kv(handle: str, start: int = 0):
        """The held prompt's keys and values from token `start`, streamed layer by layer."""
        require("prefill", "mixed")
        try:
            header, layers = connector.open_kv(handle, start)
        except KeyError:
            raise _error(404, f"no KV lease {handle!r}: unknown, released or expired", code="kv_not_found")
        except ValueError as e:
            raise _error(400, str(e), param="start")
        frames = encode(header, layers)
        if CORRUPT_KV in faults:
            frames = _corrupted(frames)

        async def body():
            sent = 0
            # the next frame (a layer's gather and checksum) is made in a thread while the
            # current one is sent
            upcoming = asyncio.ensure_future(asyncio.to_thread(next, frames, None))
            try:
                while (chunk := await upcoming) is not None:
                    upcoming = asyncio.ensure_future(asyncio.to_thread(next, frames, None))
                    sent += len(chunk)
                    yield chunk
            finally:
                # the lease is let go only once no thread reads its blocks any more; no await
                # here: a cancelled response would be cancelled again at every await
                def done(_, sent=sent):
                    connector.close_kv(handle)
                    metrics.on_kv_transfer("sent", sent)
                upcoming.add_done_callback(done)
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-length": str(stream_size(header))})

    @app.delete("/internal/kv/{handle}")
    async def release(handle: str):
        require("prefill", "mixed")
        if not await engine.call(connector.release_kv, handle):
            raise _error(404, f"no KV lease {handle!r}", code="kv_not_found")
        return Response(status_code=204)

    @app.post("/internal/decode")
    async def decode_(body: DecodeRequest, request: Request):
        """Continues a request whose prompt a prefill worker computed: pulls its KV (or
        recomputes the prompt when that fails) and answers like the public endpoint."""
        require("decode", "mixed")
        req, _, params = _parse(api, body.kind, body.request)
        prompt = body.prompt_token_ids
        api.check_capacity()
        rid = uuid.uuid4().hex
        engine.open_stream(rid)
        activated = False
        try:
            try:
                res = await engine.call(connector.reserve_kv, rid, prompt, body.first_token, params, body.first_logprob)
            except RequestError as e:
                raise _error(400, str(e), e.param)
            received = await _pull(res, body) if body.handle else False
            await engine.call(connector.activate_kv, rid, received)
            activated = True
        finally:
            if not activated:
                engine.abort(rid)
        stream = tagged(0, engine.stream(rid, 1))
        if body.kind == "completion":
            return await api.respond_completion(req, [prompt], stream, request)
        return await api.respond_chat(req, prompt, stream, request)

    async def _pull(res: KVReservation | None, body: DecodeRequest) -> bool:
        try:
            if res is None:
                metrics.on_kv_recompute("no_blocks")
                return False
            if res.num_tokens == 0:  # the whole prompt is in this worker's prefix cache
                return True
            expect = connector.header(res.start, res.num_tokens)
            t0, received = time.perf_counter(), 0
            try:
                received = await pull(http(), body.prefill_url, body.handle, expect,
                                      lambda layer, k, v: connector.write_kv(res, layer, k, v))
            except (KVTransferError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                log.warning("KV pull of %s from %s failed, recomputing the prompt: %s",
                            body.handle, body.prefill_url, e)
                metrics.on_kv_recompute(e.reason if isinstance(e, KVTransferError) else "unreachable")
                metrics.on_kv_transfer("received", received)
                return False
            metrics.on_kv_transfer("received", received, time.perf_counter() - t0)
            return True
        finally:
            asyncio.create_task(_release(body.prefill_url, body.handle))

    async def close() -> None:
        for session in sessions:
            await session.close()

    async def _release(url: str, handle: str) -> None:
        try:
            async with http().delete(f"{url}/internal/kv/{handle}"):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # the lease expires on its own
            log.info("could not release KV lease %s at %s: %s", handle, url, e)

    return close
