"""`POST /internal/resume`: a stream that another worker was generating goes on here.

The router sends it when the worker generating a stream failed or was drained
(ARCHITECTURE.md, "The path of one request"): the prompt's ids (every prompt's, for a
completion with several) and each choice's output so far, kept as output
(fleetwise/protocol.py, `ResumeRequest`). The engine recomputes them and samples on, with
the seeded generators moved past the draws already made, so the continuation is the one
the first worker would have sent; the answer is that stream's rest under its response id.
A drain's resume names where each choice's KV waits (`kv_url`, `kv_handle`): those choices
pull it over the KV transfer path instead (engine/migration.py) and decode on at once; a
pull that fails is recomputed. Everything is checked before any work: ids within the
vocabulary, each output shorter than max_tokens and not already ended, the indices the
request's choices.
"""

from collections.abc import AsyncGenerator, Awaitable, Callable

import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from fleetwise.protocol import ResumeChoice, ResumeRequest

from ..engine.async_engine import tagged
from ..engine.engine import RequestError, RequestOutput
from ..engine.migration import activate_moved, add_moved, add_resumed
from ..engine.sequence import SamplingParams, Sequence
from ..kv.connector import KVReservation
from .openai import APIError, ChatCompletionRequest, CompletionRequest
from .responses import Outputs, Resumed
from .service import WorkerAPI, _merged, engine_request_id

Pull = Callable[[KVReservation | None, str, str], Awaitable[bool]]  # (slots, worker, handle) -> received


def _check_ids(body: ResumeRequest, vocab: int) -> None:
    for name, ids in [("prompt_token_ids", body.prompt_token_ids), *(("prompt_list", p) for p in body.prompt_list)]:
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"{name}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=name)
    for c in body.choices:
        bad = next((t for t in c.output_token_ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"choices[{c.index}].output_token_ids: token id {bad} is outside the vocabulary "
                           f"(0..{vocab - 1})", param="choices")


async def _nothing() -> AsyncGenerator[tuple[int, RequestOutput], None]:
    return
    yield


async def _parse(api: WorkerAPI, body: ResumeRequest) -> tuple[CompletionRequest | ChatCompletionRequest,
                                                              list[list[int]], list[SamplingParams]]:
    """The client's request, the prompts (as the resume names them) and each one's sampling."""
    req: CompletionRequest | ChatCompletionRequest
    prompts = body.prompt_list or [body.prompt_token_ids]
    if body.prompt_list and body.prompt_list[0] != body.prompt_token_ids:
        raise APIError(400, "prompt_list: its first prompt is not prompt_token_ids", param="prompt_list")
    try:
        if body.kind == "completion":
            req = CompletionRequest.model_validate(body.request)
            parts, params_list = await api.prepare_completion(req)
            if len(parts) != len(prompts):
                raise APIError(400, f"request.prompt: {len(parts)} prompts, but the resume names {len(prompts)}",
                               param="request.prompt")
        else:
            if len(prompts) != 1:
                raise APIError(400, "prompt_list: a chat has one prompt", param="prompt_list")
            req = ChatCompletionRequest.model_validate(body.request)
            _, params = await api.prepare_chat(req)
            params_list = [params]
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    return req, prompts, params_list


async def resume(api: WorkerAPI, body: ResumeRequest, request: Request, pull: Pull | None = None
                 ) -> StreamingResponse | dict:
    if api.role not in ("decode", "mixed"):
        raise APIError(400, f"this worker's role is {api.role}; the endpoint needs decode or mixed",
                       code="wrong_role")
    _check_ids(body, api.core.model_config.vocab_size)
    if body.request.get("stream") is not True:
        raise APIError(400, "request.stream: a resumed request answers as a stream", param="request.stream")
    req, prompts, params_list = await _parse(api, body)
    n = params_list[0].n
    live = [c for c in body.choices if not c.finished]
    for c in live:
        if c.index >= n * len(prompts):
            raise APIError(400, f"choices: index {c.index} is not a choice of this request (n={n}, "
                           f"{len(prompts)} prompts)", param="choices")
        max_tokens = params_list[c.index // n].max_tokens
        if len(c.output_token_ids) >= max_tokens:
            raise APIError(400, f"choices[{c.index}].output_token_ids: {len(c.output_token_ids)} tokens leave "
                           f"nothing of max_tokens={max_tokens}", param="choices")
    state = Resumed(counts={c.index: len(c.output_token_ids) for c in body.choices if c.finished},
                    started={c.index for c in body.choices if c.output_token_ids})
    streams: list[Outputs] = []
    if live:
        api.check_capacity(len(live))
    try:
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            mine = [c for c in live if c.index // n == i]
            if mine:
                streams.append(await _start(api, body, i, prompt, params, mine, state, pull))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    outputs = _merged(streams) if streams else _nothing()
    if isinstance(req, CompletionRequest):
        return await api.respond_completion(req, prompts, outputs, request, (body.response_id, body.created, state))
    return await api.respond_chat(req, prompts[0], outputs, request, (body.response_id, body.created, state))


async def _start(api: WorkerAPI, body: ResumeRequest, i: int, prompt: list[int], params: SamplingParams,
                 choices: list[ResumeChoice], state: Resumed, pull: Pull | None) -> Outputs:
    """Prompt `i`'s live choices in the engine, by their KV where it waits for them; their
    outputs tagged `i`. Fills `state.sent` (keyed by the response's choice index)."""
    n, engine = params.n, api.engine
    rid = engine_request_id()
    engine.open_stream(rid)
    args = [(c.index % n, c.output_token_ids, c.draws) for c in choices]
    moving = pull is not None and body.kv_url is not None and any(c.kv_handle for c in choices)
    try:
        if moving:
            sent, reserved, follows = await engine.call(add_moved, api.core, rid, prompt, params, args)
        else:
            sent = await engine.call(add_resumed, api.core, rid, prompt, params, args)
    except RequestError as e:
        engine.abort(rid)
        raise APIError(400, str(e), param=e.param)
    state.sent.update({i * n + j: chars for j, chars in sent.items()})
    if moving:
        assert pull is not None and body.kv_url is not None
        try:
            received: dict[int, bool] = {}
            for c in choices:  # the leader first: a choice that shares its blocks is whole only with them
                j = c.index % n
                if c.kv_handle:
                    got = await pull(_slots(api, rid, reserved[j]), body.kv_url, c.kv_handle)
                    received[j] = got and (j not in follows or received.get(follows[j], False))
            await engine.call(activate_moved, api.core, rid, received)
        except BaseException:
            engine.abort(rid)
            raise
    return tagged(i, engine.stream(rid, len(choices)))


def _slots(api: WorkerAPI, rid: str, seq: Sequence | None) -> KVReservation | None:
    """Where a moved choice's pulled keys and values go: its context from what this
    worker's prefix cache did not hold."""
    if seq is None:
        return None
    first = seq.num_computed_tokens // api.core.block_manager.block_size
    blocks = torch.tensor(seq.block_table[first:], dtype=torch.long, device=api.core.runner.device)
    return KVReservation(rid, seq.num_computed_tokens, seq.num_tokens - 1 - seq.num_computed_tokens, blocks)
