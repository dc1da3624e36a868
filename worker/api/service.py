"""The request service behind the worker's OpenAI endpoints and its handoff routes:
checks and prepares requests, submits them to the engine, collects or streams the
outputs and shapes the response."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from fleetwise.logs import request_id
from fleetwise.protocol import COALESCE_HEADER, TOKEN_IDS_HEADER

from ..engine.async_engine import AsyncEngine, EngineDead, QueueFull, tagged
from ..engine.engine import LLMEngine, RequestError
from ..engine.sequence import SamplingParams
from ..metrics import WorkerMetrics
from .openai import APIError, ChatCompletionRequest, CompletionRequest, RequestLimits, sampling_params
from .responses import Outputs, ResponseFormat, Resumed

T = TypeVar("T")


async def _merged(gens: list[Outputs]) -> Outputs:
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

    async def pump(gen: Outputs) -> None:
        try:
            async for item in gen:
                await queue.put(item)
            await queue.put(done)
        except BaseException as exc:
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



def _prompt_parts(p: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request: texts or token id lists (none: one empty prompt)."""
    if isinstance(p, str):
        return [p]
    ids = [x for x in p if isinstance(x, int)]
    if len(ids) == len(p):  # one prompt as token ids (validation gives lists of one kind)
        return [ids]
    return [x for x in p if not isinstance(x, int)]


def engine_request_id() -> str:
    """The engine's id for a request: the caller's x-request-id, made unique (a client may
    send one id twice), so that the engine's own log lines name the request too."""
    return f"{request_id.get()}-{uuid.uuid4().hex[:8]}"

class WorkerAPI:
    def __init__(self, engine: AsyncEngine, role: str, health_stall_seconds: float,
                 limits: RequestLimits = RequestLimits()):
        self.engine = engine
        self.limits = limits
        self.core: LLMEngine = engine.engine
        self.tokenizer = self.core.tokenizer
        self.model_name = self.core.config.served_name
        self.role = role
        self.health_stall_seconds = health_stall_seconds
        self.metrics: WorkerMetrics = self.core.metrics
        self.format = ResponseFormat(self.tokenizer, self.model_name)
        # tokenising a long prompt takes milliseconds to seconds: off the event loop, or every
        # stream on this worker stalls meanwhile. One thread, as vLLM's OpenAI server has
        # (Tokenizer.encode lets go of the GIL while it works).
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.tokenize_inline = False  # test-only: on the event loop (bench/tokenize_stall.py's baseline)

    async def _tokenizing(self, fn: Callable[[], T]) -> T:
        if self.tokenize_inline:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # -- request preparation -----------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this worker serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        parts = _prompt_parts(req.prompt)
        if len(parts) > self.limits.max_prompts:
            raise APIError(400, f"at most {self.limits.max_prompts} prompts per request, not {len(parts)}",
                           param="prompt")
        encode = self.tokenizer.encode
        prompts = await self._tokenizing(
            lambda: [list(p) if isinstance(p, list) else encode(p) if p else [] for p in parts])
        if any(not ids for ids in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompts

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.tools:
            raise APIError(400, "tools are not supported by this worker", param="tools")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]

        def render() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(messages, req.add_generation_prompt)
            except ValueError as e:
                raise APIError(400, str(e), param="messages")
            return self.tokenizer.encode(text, add_special_tokens=False)
        return await self._tokenizing(render)

    def params(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_tokens: int | None,
               logprobs: int | None) -> SamplingParams:
        if max_tokens is None:
            max_tokens = max(1, self.core.max_model_len - prompt_len)
        try:
            return sampling_params(req, max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0])

    def check_capacity(self, sequences: int = 1) -> None:
        """Refuses (429) a request whose `sequences` (prompts times n) do not fit in the queue
        now, and (400) one that never would."""
        bound = self.core.config.max_waiting
        if sequences > bound:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts times n); this worker "
                                f"queues at most {bound}", param="n")
        try:
            self.engine.check_room(sequences)
        except QueueFull as e:
            raise self._queue_full(e)

    def _queue_full(self, e: QueueFull) -> APIError:
        self.metrics.on_reject("queue_full")
        return APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(e.retry_after)})

    def submit(self, prompt: list[int], params: SamplingParams, hold_kv: bool = False,
               request_id: str | None = None) -> str:
        """Queues one prompt in the engine; refusals become OpenAI-shaped errors."""
        try:
            return self.engine.submit(prompt, params, request_id or engine_request_id(), hold_kv=hold_kv)
        except RequestError as e:
            self.metrics.on_reject("invalid")
            raise APIError(400, str(e), param=e.param)
        except QueueFull as e:
            raise self._queue_full(e)
        except EngineDead as e:
            raise APIError(503, str(e), type_="server_error", code="engine_unavailable")

    async def run(self, prompts: list[list[int]], params_list: list[SamplingParams], request: Request) -> Outputs:
        """Starts every prompt (each with n choices); yields (prompt index, output)."""
        self.check_capacity(sum(p.n for p in params_list))
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

    async def collect(self, stream: AsyncIterator[T], request: Request) -> list[T]:
        """Gathers a non-streaming response; gives up (and frees the blocks) if the client leaves."""
        items: list[T] = []

        async def consume() -> None:
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

    async def prepare_completion(self, req: CompletionRequest) -> tuple[list[list[int]], list[SamplingParams]]:
        self.check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of > self.limits.max_n:
            raise APIError(400, f"best_of must be at most {self.limits.max_n}", param="best_of")
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of must equal n when given", param="best_of")
        self.limits.check(req)
        prompts = await self.completion_prompts(req)
        return prompts, [self.params(req, len(p), req.max_tokens, req.logprobs) for p in prompts]

    async def prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        self.check_model(req.model)
        self.limits.check(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if (req.top_logprobs or 0) > self.core.config.max_logprobs:
            raise APIError(400, f"top_logprobs must be at most {self.core.config.max_logprobs}",
                           param="top_logprobs")
        prompt = await self.chat_prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return prompt, self.params(req, len(prompt), req.max_completion_tokens or req.max_tokens, logprobs)

    async def gather(self, stream: Outputs, request: Request, n: int) -> tuple[dict[int, dict], int]:
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

    async def respond_completion(self, req: CompletionRequest, prompts: list[list[int]], stream: Outputs,
                                 request: Request, resumed: tuple[str, int, Resumed] | None = None
                                 ) -> StreamingResponse | dict:
        """`resumed`: the response id, time and state of a stream moved here from another worker."""
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            state = None
            if resumed is not None:
                rid, created, state = resumed
            return StreamingResponse(self.format.completion_events(stream, prompts, rid, created, n, include_usage,
                                                                   _traced(request), state,
                                                                   _coalesced(request) and req.logprobs is None),
                                     media_type="text/event-stream")
        choices, cached = await self.gather(stream, request, n)
        return self.format.completion(rid, created, choices, prompts, cached, req.logprobs is not None)

    async def respond_chat(self, req: ChatCompletionRequest, prompt: list[int], stream: Outputs,
                           request: Request, resumed: tuple[str, int, Resumed] | None = None
                           ) -> StreamingResponse | dict:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            state = None
            if resumed is not None:
                rid, created, state = resumed
            return StreamingResponse(self.format.chat_events(stream, [prompt], rid, created, include_usage,
                                                             req.logprobs, _traced(request), state,
                                                             _coalesced(request) and not req.logprobs),
                                     media_type="text/event-stream")
        choices, cached = await self.gather(stream, request, 1)
        return self.format.chat(rid, created, choices, prompt, cached, req.logprobs)


def _traced(request: Request) -> bool:
    """The caller (the router) asked for every event's token ids (fleetwise/protocol.py)."""
    return request.headers.get(TOKEN_IDS_HEADER) == "1"


def _coalesced(request: Request) -> bool:
    """The caller (the router, for an answer it assembles) asked for the text as one event."""
    return request.headers.get(COALESCE_HEADER) == "1"
