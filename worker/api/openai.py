"""The worker's side of the OpenAI API: its errors, its limits on one request, and a request's
mapping to SamplingParams. The shapes themselves are fleetwise/openai_schema.py's, which the
router shares."""

from dataclasses import dataclass

from fleetwise import defaults
from fleetwise.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields

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

    def check(self, req: SamplingFields) -> None:
        if req.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stop) > self.max_stop_strings:
            raise APIError(400, f"at most {self.max_stop_strings} stop strings are allowed, not {len(stop)}",
                           param="stop")
        if any(len(s) > self.max_stop_chars for s in stop):
            raise APIError(400, f"a stop string may have at most {self.max_stop_chars} characters", param="stop")


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The engine's parameters for one of `req`'s prompts."""
    if req.logit_bias:
        raise ValueError("logit_bias is not supported")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, logprobs=logprobs, n=req.n,
    )


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "RequestLimits", "error_body",
           "sampling_params"]
