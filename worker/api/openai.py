"""OpenAI request shapes (with vLLM's sampling extensions) and their mapping to SamplingParams."""

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fleetwise import defaults

from ..engine.sequence import SamplingParams


class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}



@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of this worker: beyond it, a 400 naming the field (a 413 for
    the body). vLLM bounds only logprobs (the engine's max_logprobs); these bound the rest of
    the work a single request can cause. The queue bound (EngineConfig.max_waiting) counts
    every choice of every prompt."""
    max_n: int = defaults.MAX_N
    max_prompts: int = defaults.MAX_PROMPTS
    max_stop_strings: int = defaults.MAX_STOP_STRINGS
    max_stop_chars: int = defaults.MAX_STOP_CHARS
    max_body_bytes: int = defaults.MAX_BODY_MIB << 20

    def check(self, req: "_Sampling") -> None:
        if req.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stop) > self.max_stop_strings:
            raise APIError(400, f"at most {self.max_stop_strings} stop strings are allowed, not {len(stop)}",
                           param="stop")
        if any(len(s) > self.max_stop_chars for s in stop):
            raise APIError(400, f"a stop string may have at most {self.max_stop_chars} characters", param="stop")


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

# vLLM's bound for seeds (torch.long); a sequence's generator takes seed + its choice index
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The bounds are vLLM's (SamplingParams._verify_args, protocol.py); SamplingParams checks
    the sampling ones again for callers that do not come through HTTP. Python's json reads
    `Infinity` and `NaN`: no field takes them."""
    # unknown fields are ignored, as by OpenAI-compatible servers generally; known ones are typed strictly
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text
    n: int = Field(1, ge=1)  # the upper bound is the worker's (RequestLimits.max_n)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int = Field(0, ge=-1, le=INT64_MAX)  # -1 or 0: off; beyond the vocabulary: every token
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: list[int] = Field(default_factory=list)  # the engine checks them against the vocabulary
    ignore_eos: bool = False

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, n=self.n,
        )


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]  # ids: checked by the engine
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)  # the upper bound is the engine's (max_logprobs)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: Text | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # the upper bound is the engine's (max_logprobs)
    tools: list[dict] | None = None
    add_generation_prompt: bool = True
