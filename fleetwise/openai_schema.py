"""The OpenAI API as fleetwise serves it, in one place: the request bodies (with vLLM's
sampling extensions), the response bodies, the stream's events, the error object, the model
list and the health answers, as pydantic models; and the OpenAPI document built from them.

The worker validates requests with these models; the router, which must not import the
worker (torch), publishes the same document for the same routes. Responses are declared, not
validated at run time: a route's `responses=` feeds the document only, so the hot path pays
nothing for it (FastAPI's `response_model` would re-validate and re-serialise every body);
the schema fuzzing tests check real responses against the document instead.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute


def _unicode(text: str) -> str:
    """JSON may escape a lone surrogate ("\\ud800"), which is no character: no tokenizer
    or UTF-8 encoder takes it, so it is refused here, by field, not deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                         f"{e.start}), which is not valid Unicode")
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _whole(x: object) -> object:
    """JSON Schema's integer is any number without a fraction (2.0 included); never a bool."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


Int = Annotated[int, BeforeValidator(_whole)]

# vLLM's bound for seeds (torch.long); a sequence's generator takes seed + its choice index
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


# -- requests -----------------------------------------------------------------------------------

class _Strict(BaseModel):
    """JSON types as the document states them: `"stream": 0` or `"seed": false` is a 400
    naming the field, as OpenAI's API answers, not read as False or 0 (pydantic's lax mode);
    an integer field takes 2.0 as JSON Schema does (`Int`)."""
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """The bounds are vLLM's (SamplingParams._verify_args, protocol.py); the engine checks
    the sampling ones again for callers that do not come through HTTP. Python's json reads
    `Infinity` and `NaN`: no field takes them."""
    # unknown fields are ignored, as by OpenAI-compatible servers generally; known ones are typed strictly
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: Text
    n: Int = Field(1, ge=1)  # the upper bound is the worker's (RequestLimits.max_n)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: Int = Field(0, ge=-1, le=INT64_MAX)  # -1 or 0: off; beyond the vocabulary: every token
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: list[Int] = Field(default_factory=list)  # the engine checks them against the vocabulary
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]]  # ids: checked by the engine
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0)  # the upper bound is the engine's (max_logprobs)
    echo: bool = False
    best_of: Int | None = Field(None, ge=1)
    suffix: Text | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0)  # the upper bound is the engine's (max_logprobs)
    tools: list[dict] | None = None
    add_generation_prompt: bool = True


# -- responses ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"]


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx, and the event that ends a stream which failed after it started."""
    error: ErrorObject


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One event of a streamed completion; the last one (with stream_options.include_usage)
    has no choices and the usage."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None          # a worker's: the model's folder
    max_model_len: int | None = None  # a worker's: its context length
    mode: Literal["colocated", "disaggregated"] | None = None  # the router's: how it serves the model


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class WorkerHealth(BaseModel):
    """A worker's 200; its 503 is `WorkerUnwell`."""
    status: Literal["ok"]
    role: Literal["prefill", "decode", "mixed"]
    model: str
    running: int
    waiting: int
    kv_leases: int = 0  # KV held for another worker to pull (a prefill's, a drained stream's): a drain waits for it
    kv_exported: int = 0  # running sequences handed to other workers with their KV (drains), since it started
    kv_stream_versions: list[int] = []  # the KV stream versions it reads and sends (4: it takes early handoffs)


class WorkerUnwell(BaseModel):
    status: Literal["dead", "failing", "stalled"]
    error: str | None = None
    stalled_seconds: float | None = None


class RouterHealth(BaseModel):
    """200 while some model has an available replica of each of its roles, else 503."""
    status: Literal["ok", "no_replicas"]
    models: dict[str, dict[str, int]]  # model -> role -> available replicas
    inflight: int


# -- the OpenAPI document ----------------------------------------------------------------------

_ERRORS = {400: "a client mistake, naming the field in `param`", 401: "no or a wrong shared token",
           404: "an unknown model or route", 409: "valid, but this worker cannot do it (e.g. it has no GPU to cap)",
           413: "the body is over the limit",
           429: "full: try again after Retry-After", "5XX": "the server failed; never without this body"}


def errors(*codes: int | str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


def _streamed(model: type[BaseModel], chunk: type[BaseModel], what: str) -> dict[str, Any]:
    return {"model": model, "description": f"the {what}; with `stream: true` server-sent events instead, "
            f"each `data:` a {chunk.__name__} (or an ErrorResponse when it fails midway), then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": sse_event(chunk)}}}


def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream, as Open API 3.1 describes an event stream: its `data`
    is JSON (a chunk, or an error when the stream fails midway) or, last, `[DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}


ERRORS = errors(400, 404, 413, 429, "5XX")
# each route's declaration: its summary and every answer it may give (`app.post(path, **ROUTES[path])`)
ROUTES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"summary": "Completions", "responses": {
        200: _streamed(CompletionResponse, CompletionChunk, "completion"), **ERRORS}},
    "/v1/chat/completions": {"summary": "Chat completions", "responses": {
        200: _streamed(ChatCompletionResponse, ChatCompletionChunk, "chat completion"), **ERRORS}},
    "/v1/models": {"summary": "The served models", "responses": {200: {"model": ModelList}}},
    "/metrics": {"summary": "Prometheus metrics", "responses": {
        200: {"description": "the Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}},
}
WORKER_HEALTH: dict[str, Any] = {"summary": "Health", "responses": {
    200: {"model": WorkerHealth}, 503: {"model": WorkerUnwell, "description": "the engine cannot serve"}}}
ROUTER_HEALTH: dict[str, Any] = {"summary": "Health", "responses": {
    200: {"model": RouterHealth}, 503: {"model": RouterHealth, "description": "no model can be served"}}}
INTERNAL_ERRORS = errors(401)


def router_routes() -> list[APIRoute]:
    """The router's routes as declarations (the router serves them itself, without FastAPI)."""
    async def completions(body: CompletionRequest) -> None: ...
    async def chat(body: ChatCompletionRequest) -> None: ...
    async def get() -> None: ...
    ends: list[tuple[str, str, Callable[..., Any], dict[str, Any]]] = [
        ("/v1/completions", "POST", completions, ROUTES["/v1/completions"]),
        ("/v1/chat/completions", "POST", chat, ROUTES["/v1/chat/completions"]),
        ("/v1/models", "GET", get, ROUTES["/v1/models"]), ("/health", "GET", get, ROUTER_HEALTH),
        ("/metrics", "GET", get, ROUTES["/metrics"])]
    return [APIRoute(path, end, methods=[method], response_model=None, **decl) for path, method, end, decl in ends]


def openapi(title: str, version: str, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The document for these routes. Request validation answers 400 with an ErrorResponse
    (never FastAPI's 422), and each stream's event model is in the components."""
    doc = get_openapi(title=title, version=version, routes=routes)
    for item in doc.get("paths", {}).values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in (CompletionChunk, ChatCompletionChunk)],
                                 ref_template="#/components/schemas/{model}")
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return doc


def openapi_error(code: int | str) -> dict[str, Any]:
    """An error answer as it stands in a document whose components hold ErrorResponse."""
    return {"description": _ERRORS[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
