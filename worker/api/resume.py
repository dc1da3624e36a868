"""`POST /internal/resume`: a stream that another worker was generating goes on here.

The router sends it when the worker generating a stream failed (ARCHITECTURE.md, "The
path of one request"): the prompt's ids and each choice's output so far, kept as output
(fleetwise/protocol.py, `ResumeRequest`). The engine recomputes them and samples on, with
the seeded generators moved past the draws already made, so the continuation is the one
the first worker would have sent; the answer is that stream's rest under its response id.
Everything is checked before any work: ids within the vocabulary, each output shorter than
max_tokens and not already ended, the indices the request's choices.
"""

from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from fleetwise.protocol import ResumeRequest

from ..engine.async_engine import tagged
from ..engine.engine import RequestError, RequestOutput
from .openai import APIError, ChatCompletionRequest, CompletionRequest
from .responses import Resumed
from .service import WorkerAPI, engine_request_id


def _check_ids(body: ResumeRequest, vocab: int) -> None:
    bad = next((t for t in body.prompt_token_ids if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt_token_ids: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                       param="prompt_token_ids")
    for c in body.choices:
        bad = next((t for t in c.output_token_ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"choices[{c.index}].output_token_ids: token id {bad} is outside the vocabulary "
                           f"(0..{vocab - 1})", param="choices")


async def _nothing() -> AsyncGenerator[RequestOutput, None]:
    return
    yield


async def resume(api: WorkerAPI, body: ResumeRequest, request: Request) -> StreamingResponse | dict:
    if api.role not in ("decode", "mixed"):
        raise APIError(400, f"this worker's role is {api.role}; the endpoint needs decode or mixed",
                       code="wrong_role")
    _check_ids(body, api.core.model_config.vocab_size)
    if body.request.get("stream") is not True:
        raise APIError(400, "request.stream: a resumed request answers as a stream", param="request.stream")
    req: CompletionRequest | ChatCompletionRequest
    try:
        if body.kind == "completion":
            req = CompletionRequest.model_validate(body.request)
            prompts, params_list = await api.prepare_completion(req)
            if len(prompts) != 1:
                raise APIError(400, "request.prompt: a resumed request has one prompt", param="request.prompt")
            params = params_list[0]
        else:
            req = ChatCompletionRequest.model_validate(body.request)
            _, params = await api.prepare_chat(req)
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    live = [c for c in body.choices if not c.finished]
    for c in live:
        if len(c.output_token_ids) >= params.max_tokens:
            raise APIError(400, f"choices[{c.index}].output_token_ids: {len(c.output_token_ids)} tokens leave "
                           f"nothing of max_tokens={params.max_tokens}", param="choices")
    prompt = body.prompt_token_ids
    state = Resumed(counts={c.index: len(c.output_token_ids) for c in body.choices if c.finished},
                    started={c.index for c in body.choices if c.output_token_ids})
    stream = _nothing()
    if live:
        api.check_capacity(len(live))
        rid = engine_request_id()
        api.engine.open_stream(rid)
        try:
            state.sent = await api.engine.call(api.core.add_resumed, rid, prompt, params,
                                               [(c.index, c.output_token_ids, c.draws) for c in live])
        except RequestError as e:
            api.engine.abort(rid)
            raise APIError(400, str(e), param=e.param)
        stream = api.engine.stream(rid, len(live))
    outputs = tagged(0, stream)
    if isinstance(req, CompletionRequest):
        return await api.respond_completion(req, [prompt], outputs, request, (body.response_id, body.created, state))
    return await api.respond_chat(req, prompt, outputs, request, (body.response_id, body.created, state))
