"""The worker's HTTP API: OpenAI completions and chat completions, models, health, metrics."""

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine, EngineDead, QueueFull, tagged
from ..engine.config import EngineConfig
from ..engine.engine import LLMEngine, RequestError, RequestOutput
from ..kv.connector import KVConnector
from .handoff import add_handoff_routes
from ..metrics import WorkerMetrics
from .openai import APIError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merged(gens: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; closes all of them when left early."""
    if len(gens) == 1:
        try:
            async for item in gens[0]:
                yield item
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen):
        try:
            async for item in gen:
                await queue.put(item)
            await queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


class WorkerAPI:
    def __init__(self, engine: AsyncEngine, role: str, health_stall_seconds: float):
        self.engine = engine
        self.core: LLMEngine = engine.engine
        self.tokenizer = self.core.tokenizer
        self.model_name = self.core.config.served_model_name
        self.role = role
        self.health_stall_seconds = health_stall_seconds
        self.metrics: WorkerMetrics = self.core.metrics

    # -- request preparation -----------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this worker serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)] if p else [[]]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) if x else [] for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            prompts = [[]]
        if any(not ids for ids in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompts

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.tools:
            raise APIError(400, "tools are not supported by this worker", param="tools")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None):
        if req.n < 1:
            raise APIError(400, "n must be at least 1", param="n")
        if max_tokens is None:
            max_tokens = max(1, self.core.max_model_len - prompt_len)
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0])

    def check_capacity(self) -> None:
        waiting = self.engine.num_waiting()
        if waiting >= self.core.config.max_waiting:
            self.metrics.on_reject("queue_full")
            e = QueueFull(waiting, self.engine.retry_after())
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)})

    def submit(self, prompt: list[int], params, hold_kv: bool = False) -> str:
        """Queues one prompt in the engine; refusals become OpenAI-shaped errors."""
        try:
            return self.engine.submit(prompt, params, hold_kv=hold_kv)
        except RequestError as e:
            self.metrics.on_reject("invalid")
            raise APIError(400, str(e), param=e.param)
        except QueueFull as e:
            self.metrics.on_reject("queue_full")
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)})
        except EngineDead as e:
            raise APIError(503, str(e), type_="server_error", code="engine_unavailable")

    async def run(self, prompts: list[list[int]], params_list, request: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Starts every prompt (each with n choices); yields (prompt index, output)."""
        submitted: list[str] = []
        try:
            for ids, params in zip(prompts, params_list):
                submitted.append(self.submit(ids, params))
        finally:
            if len(submitted) < len(prompts):
                for request_id in submitted:
                    self.engine.abort(request_id)
        return _merged([tagged(i, self.engine.stream(rid, p.n))
                        for i, (rid, p) in enumerate(zip(submitted, params_list))])

    async def collect(self, stream: AsyncIterator, request: Request) -> list:
        """Gathers a non-streaming response; gives up (and frees the blocks) if the client leaves."""
        items: list = []

        async def consume():
            async for item in stream:
                items.append(item)

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return items
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client closed the request")
        finally:
            if not task.done():
                task.cancel()

    def prepare_completion(self, req: CompletionRequest) -> tuple[list[list[int]], list]:
        self.check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of must equal n when given", param="best_of")
        prompts = self.completion_prompts(req)
        return prompts, [self.params(req, len(p), req.max_tokens, req.logprobs) for p in prompts]

    def prepare_chat(self, req: ChatCompletionRequest):
        self.check_model(req.model)
        prompt = self.chat_prompt(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return prompt, self.params(req, len(prompt), req.max_completion_tokens or req.max_tokens, logprobs)

    async def gather(self, stream, request: Request, n: int):
        """A non-streaming response's choices: {choice index: text, tokens, logprobs, reason, count}."""
        choices: dict[int, dict] = {}
        cached = 0
        for i, out in await self.collect(stream, request):
            c = choices.setdefault(i * n + out.index, {"text": "", "tokens": [], "logprobs": [],
                                                       "reason": None, "count": 0})
            c["text"] += out.text
            c["tokens"] += out.token_ids
            c["logprobs"] += out.logprobs
            c["count"] = out.num_output_tokens
            cached = max(cached, out.num_cached_tokens)
            if out.finished:
                c["reason"] = out.finish_reason
                if out.error:
                    raise APIError(500, f"generation failed: {out.error}", type_="server_error")
        return dict(sorted(choices.items())), cached

    async def respond_completion(self, req: CompletionRequest, prompts, stream, request: Request):
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_completion_events(self, stream, prompts, rid, created, n, include_usage),
                                     media_type="text/event-stream")
        choices, cached = await self.gather(stream, request, n)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": k, "text": c["text"], "finish_reason": c["reason"],
                             "logprobs": self.completion_logprobs(c["logprobs"], c["tokens"], 0)
                             if req.logprobs is not None else None} for k, c in choices.items()],
                "usage": _usage(prompts, {k: c["count"] for k, c in choices.items()}, cached)}

    async def respond_chat(self, req: ChatCompletionRequest, prompt: list[int], stream, request: Request):
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_events(self, stream, [prompt], rid, created, include_usage, req.logprobs),
                                     media_type="text/event-stream")
        choices, cached = await self.gather(stream, request, 1)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": k, "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["reason"],
                             "logprobs": self.chat_logprobs(c["logprobs"], c["tokens"]) if req.logprobs else None}
                            for k, c in choices.items()],
                "usage": _usage([prompt], {k: c["count"] for k, c in choices.items()}, cached)}

    # -- logprobs ------------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, entries: list, token_ids: list[int], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, (lp, top) in zip(token_ids, entries):
            text = self._token_text(tid)
            tokens.append(text)
            lps.append(lp)
            tops.append({self._token_text(t): v for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list, token_ids: list[int]) -> dict:
        content = []
        for tid, (lp, top) in zip(token_ids, entries):
            content.append({
                "token": self._token_text(tid), "logprob": lp, "bytes": list(self.tokenizer.token_bytes(tid)),
                "top_logprobs": [{"token": self._token_text(t), "logprob": v,
                                  "bytes": list(self.tokenizer.token_bytes(t))} for t, v in top],
            })
        return {"content": content}


def _usage(prompts: list[list[int]], outs: dict, cached: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(outs.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def build_app(engine: AsyncEngine, kv: KVConnector, role: str = "mixed", health_stall_seconds: float = 30.0,
              faults: frozenset[str] = frozenset()) -> FastAPI:
    """`faults`: test-only switches (handoff.CORRUPT_KV); empty unless a test asks."""
    api = WorkerAPI(engine, role, health_stall_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start(asyncio.get_running_loop())
        yield
        await close_handoff()
        engine.stop()

    app = FastAPI(title="fleetwise worker", lifespan=lifespan)
    app.state.api = api

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return _error_response(APIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, e: EngineDead):
        return _error_response(APIError(503, str(e), type_="server_error", code="engine_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), type_="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error"))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "dead", "error": str(engine.error) if engine.error else None},
                                status_code=503)
        stalled = engine.stalled_for()
        if stalled > health_stall_seconds:
            return JSONResponse({"status": "stalled", "stalled_seconds": round(stalled, 3)}, status_code=503)
        return {"status": "ok", "role": role, "model": api.model_name,
                "running": api.core.num_running, "waiting": engine.num_waiting()}

    @app.get("/metrics")
    async def metrics():
        api.metrics.heartbeat_age.labels(model_name=api.model_name, role=role).set(engine.stalled_for())
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": api.model_name, "object": "model", "created": 0, "owned_by": "fleetwise",
            "root": api.core.config.model, "max_model_len": api.core.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts, params = api.prepare_completion(req)
        return await api.respond_completion(req, prompts, await api.run(prompts, params, request), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        prompt, params = api.prepare_chat(req)
        return await api.respond_chat(req, prompt, await api.run([prompt], [params], request), request)

    close_handoff = add_handoff_routes(app, api, kv, faults)
    return app


async def _events(stream, make_chunk, usage_chunk) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream started is sent as an error event."""
    try:
        async for item in stream:
            chunk = make_chunk(*item)
            if chunk is not None:
                yield _sse(chunk)
        if usage_chunk is not None:
            yield _sse(usage_chunk())
    except APIError as e:
        yield _sse(error_body(e.message, e.type, e.param, e.code))
    except EngineDead as e:
        yield _sse(error_body(str(e), "server_error", None, "engine_unavailable"))
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _completion_events(api: WorkerAPI, stream, prompts, rid, created, n, include_usage):
    counts, offsets, cached = {}, {}, [0]

    def chunk(i: int, out: RequestOutput):
        key = i * n + out.index
        counts[key] = out.num_output_tokens
        cached[0] = max(cached[0], out.num_cached_tokens)
        if out.error:
            raise APIError(500, f"generation failed: {out.error}", type_="server_error")
        lp = None
        if out.logprobs:
            lp = api.completion_logprobs(out.logprobs, out.token_ids, offsets.get(key, 0))
        offsets[key] = offsets.get(key, 0) + len(out.text)
        if not out.text and not out.finished and lp is None:
            return None
        return {"id": rid, "object": "text_completion", "created": created, "model": api.model_name,
                "choices": [{"index": key, "text": out.text, "logprobs": lp,
                             "finish_reason": out.finish_reason if out.finished else None}]}

    def usage():
        return {"id": rid, "object": "text_completion", "created": created, "model": api.model_name,
                "choices": [], "usage": _usage(prompts, counts, cached[0])}

    return _events(stream, chunk, usage if include_usage else None)


def _chat_events(api: WorkerAPI, stream, prompts, rid, created, include_usage, logprobs):
    counts, started, cached = {}, set(), [0]
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": api.model_name}

    def chunk(_: int, out: RequestOutput):
        k = out.index
        counts[k] = out.num_output_tokens
        cached[0] = max(cached[0], out.num_cached_tokens)
        if out.error:
            raise APIError(500, f"generation failed: {out.error}", type_="server_error")
        delta = {"content": out.text}
        if k not in started:
            started.add(k)
            delta = {"role": "assistant", "content": out.text}
        elif not out.text and not out.finished:
            return None
        lp = api.chat_logprobs(out.logprobs, out.token_ids) if logprobs and out.logprobs else None
        return {**base, "choices": [{"index": k, "delta": delta, "logprobs": lp,
                                     "finish_reason": out.finish_reason if out.finished else None}]}

    def usage():
        return {**base, "choices": [], "usage": _usage(prompts, counts, cached[0])}

    return _events(stream, chunk, usage if include_usage else None)


def serve(config: EngineConfig, host: str, port: int, role: str = "mixed",
          health_stall_seconds: float = 30.0, faults: frozenset[str] = frozenset()) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    core = LLMEngine(config, WorkerMetrics(config.served_model_name, role))
    core.kv_connector = kv = KVConnector(core)
    app = build_app(AsyncEngine(core), kv, role, health_stall_seconds, faults)
    # on SIGTERM (a drained pod being deleted) requests in flight, streams included, get up
    # to 50 s to finish; the pod's termination grace period is 60 s
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=50)
