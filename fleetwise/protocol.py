"""The internal protocol between the router and the workers, in one place.

A disaggregated request crosses three internal calls (ARCHITECTURE.md, "The path of one
request"): the router asks a prefill worker for the prompt's first token
(`PrefillRequest` -> `PrefillAnswer`), then a decode worker to continue it
(`DecodeRequest`, answered like the public OpenAI endpoint), and the decode worker pulls the
prompt's keys and values from the prefill worker as a KV stream whose header is `KVHeader`
(the binary framing is in worker/kv/transfer.py). Every call carries the request's id in
`x-request-id` and the protocol version in `x-fleetwise-protocol`.

Mixed versions during a rolling upgrade follow one rule:
- A change that a peer of the previous version can ignore (a new optional field with a
  default) keeps `PROTOCOL_VERSION`; bodies are read with unknown fields ignored.
- Any other change bumps `PROTOCOL_VERSION`, and `SUPPORTED_VERSIONS` keeps the previous
  version for one release, so that old routers reach new workers and new routers old ones
  while pods roll.
- A peer that receives a version it does not speak answers 400 with the code
  `unsupported_protocol_version` (naming the versions it speaks) before doing any work; the
  router takes that as "this replica cannot serve this request" and tries another one.
Migration (version 1 still: each piece is one an older peer ignores or answers 404 to):
- A call with `x-fleetwise-token-ids: 1` gets, in a streamed answer, a line `fw: {json}`
  before each event's `data:` line (`TraceEvent`: the choice's new token ids and finish
  reason; the first event also the prompt's ids, the response's id and time). Every output
  token gets an event then, even one whose text is held back. The router keeps the ids and
  strips the lines; an SSE client would ignore them anyway (an unknown field).
- A call that also carries `x-fleetwise-coalesce: 1` (the router's, for a request it
  answers whole) and asks no logprobs gets its outputs as `fw:` lines alone, with their text
  in them (`text`), and the text as one event before the usage: the router keeps the ids
  but parses one event instead of one per token. The lines are held and merged, one line per
  choice with every id since its last (`COALESCED_IDS_EVERY_S`): a prompt's first goes at
  once, the others at most that often, and whatever is held goes before the stream's last
  events (the text, an error, `migrated`). The router wakes a few times per second per such
  request instead of once per token; a worker that fails holding ids costs a recompute of
  at most that much output, which the client never saw. When such a stream moves, the
  router passes on the text of the `fw:` lines since its last event before the resumed
  stream. A worker that ignores the header sends its usual events, which read the same, and
  one of the release before sends a line per token, which reads the same too.
- `POST /internal/resume` (`ResumeRequest`) continues a stream another worker was
  generating: the prompt, each unfinished choice's output so far (kept as output) and its
  random draws made, and the finished ones for usage. It answers as that stream would have
  gone on, under the same response id.
- A drain moves the KV too: `POST /internal/export` (`ExportRequest`) takes running
  requests off a worker, their streams ending with an error event of code `migrated` and
  each choice's context kept under a KV lease; the resume names the lease (`kv_url`, each
  choice's `kv_handle`) and the new worker pulls it as a decode worker pulls a prompt,
  recomputing instead when the pull fails. An older worker ignores the fields and recomputes.
The KV stream carries its own format version (`KV_STREAM_VERSION`, in its preamble), checked
the same way by the receiver. The receiver names the version it wants in the pull's query
(`kv_version`); a sender that does not know the parameter sends version 1, which receivers
still read (`KV_STREAM_VERSIONS`), and one asked for a version newer than it sends answers in
its newest (a sender of the release before, which answers 400 instead, is asked again for
version 2).

Every internal call is authenticated by a shared secret, `Authorization: Bearer <token>`,
read from a file (`--internal-token-file` or `FLEETWISE_INTERNAL_TOKEN_FILE`): the router
sends it to every worker, a decode worker to the prefill worker it pulls from. It is how
Envoy and the Kubernetes API server authenticate service-to-service calls when there is no
mutual TLS; mTLS is not part of the protocol. Only the workers' internal listener takes
these calls (ARCHITECTURE.md, "Worker HTTP API").
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
VERSION_HEADER = "x-fleetwise-protocol"
REQUEST_ID_HEADER = "x-request-id"
UNSUPPORTED_VERSION = "unsupported_protocol_version"
TOKEN_IDS_HEADER = "x-fleetwise-token-ids"
COALESCE_HEADER = "x-fleetwise-coalesce"  # with the token ids: the text as one event at the end
COALESCED_IDS_EVERY_S = 0.25  # a coalesced stream's held `fw:` lines go at most this often
TRACE_PREFIX = b"fw: "  # the line of a streamed event that carries its token ids
MAX_RESUME_TOKENS = 1 << 20  # prompt or output ids in a resume request
MAX_RESUME_CHOICES = 1024
MAX_REQUEST_ID_LENGTH = 128

AUTH_HEADER = "authorization"
TOKEN_FILE_ENV = "FLEETWISE_INTERNAL_TOKEN_FILE"
MIN_TOKEN_CHARS = 16

KV_STREAM_VERSION = 3  # what a receiver asks for; 2: CRC-32C, 3: CRC-32 by zlib-ng (worker/kv/transfer.py)
KV_STREAM_VERSIONS = (1, 2, 3, 4)  # read and sent on request; 1 until the release after next
# 4: a segmented stream (the prompt in segments of tokens, every layer of each, then the first
# token), sent while the prefill is still computing; only when asked for by number. A worker
# names the versions it reads in its /health answer (`kv_stream_versions`): the router asks
# for early prefills only while every decode replica it may choose reads version 4
KV_STREAM_SEGMENTED = 4
MAX_KV_HEADER_BYTES = 64 << 10  # a KV stream whose JSON header claims more is refused unread
MAX_KV_SEGMENT_TOKENS = 1 << 20  # a segmented stream's segment size (tokens) is at most this
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

Kind = Literal["completion", "chat"]
# a sampled token's logprob and the top alternatives: (logprob, [(token id, logprob), ...])
TokenLogprob = tuple[float, list[tuple[int, float]]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PrefillRequest(_Message):
    """Router -> prefill worker: compute this client request's prompt and first token."""
    kind: Kind
    request: dict  # the client's body, read by the worker as its public endpoint would
    # answer at admission: the KV streams (segmented) while the prompt is computed, and the
    # first token comes at the stream's end; an older prefill worker ignores it and answers late
    kv_early: bool = False


class PrefillAnswer(_Message):
    """Prefill worker -> router. `handle` is None when nothing is held: the first token
    already ended the request (`finish_reason` says why). `kv_early`: answered at admission,
    before the prompt is computed (no first token yet): the decode worker pulls the handle
    as a segmented stream, which ends with the first token."""
    handle: str | None
    prompt_token_ids: list[int]
    first_token: int | None
    kv_early: bool = False
    # with kv_early: the tokens per segment to pull the stream in, the prefill worker's step
    # budget, so that a segment is one step's chunk and leaves layer by layer as the step
    # computes it (kv/early.py); 0: the decode worker's own default (an older prefill worker)
    kv_segment_tokens: int = Field(default=0, ge=0, le=MAX_KV_SEGMENT_TOKENS)
    first_logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    model_id: str
    kv_lease_seconds: float


class DecodeRequest(_Message):
    """Router -> decode worker: continue a request whose prompt a prefill worker computed,
    pulling its keys and values from `prefill_url` under `handle` (None: nothing to pull)."""
    kind: Kind
    request: dict
    prompt_token_ids: list[int] = Field(min_length=1)
    first_token: int | None = Field(default=None, ge=0)  # None only with kv_early
    first_logprob: TokenLogprob | None = None
    handle: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,256}$")
    # the handle names an early prefill (PrefillAnswer.kv_early): the first token comes with its KV
    kv_early: bool = False
    kv_segment_tokens: int = Field(default=0, ge=0, le=MAX_KV_SEGMENT_TOKENS)  # PrefillAnswer's
    # after `handle`, whose value its check reads; checked when left out too
    prefill_url: str | None = Field(default=None, validate_default=True)

    @model_validator(mode="after")
    def _first_token_or_early(self) -> "DecodeRequest":
        if self.kv_early and not self.handle:
            raise ValueError("kv_early: needs a handle, the early prefill whose stream brings the first token")
        if not self.kv_early and self.first_token is None:
            raise ValueError("first_token: required unless kv_early")
        return self

    @field_validator("prompt_token_ids")
    @classmethod
    def _token_ids(cls, ids: list[int]) -> list[int]:
        bad = next((t for t in ids if t < 0), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is negative")
        return ids

    @field_validator("first_logprob")
    @classmethod
    def _finite(cls, logprob: TokenLogprob | None) -> TokenLogprob | None:
        if logprob is not None:
            values = [logprob[0], *(lp for _, lp in logprob[1])]
            if not all(math.isfinite(v) for v in values):
                raise ValueError("logprobs must be finite numbers")
            if any(t < 0 for t, _ in logprob[1]):
                raise ValueError("token ids must be non-negative")
        return logprob

    @field_validator("prefill_url")
    @classmethod
    def _url_with_handle(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None and info.data.get("handle"):
            raise ValueError("required with a handle: the prefill worker that holds the keys and values")

        if url is not None:
            problem = base_url_problem(url)
            if problem:
                raise ValueError(problem)
        return url


class TraceEvent(_Message):
    """What an `fw:` line says of the event it comes with."""
    index: int = 0
    token_ids: list[int] = []
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None  # the first event of each prompt
    prompt: int = 0                            # which prompt (a completion with several)
    request_id: str | None = None              # the first event of each prompt: the engine's id, for an export
    id: str | None = None                      # the first event only
    created: int | None = None                 # the first event only


def _ids(ids: list[int]) -> list[int]:
    bad = next((t for t in ids if t < 0), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is negative")
    return ids


class ResumeChoice(_Message):
    """One choice of a request being moved: the output so far and the seeded sampler's
    position (random draws already made: the continuation draws what the first worker
    would have). A finished choice is only counted in usage."""
    index: int = Field(ge=0, lt=MAX_RESUME_CHOICES)
    output_token_ids: list[int] = Field(max_length=MAX_RESUME_TOKENS)
    draws: int = Field(0, ge=0)
    finished: bool = False
    kv_handle: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,256}$")  # its KV, held at `kv_url`

    @field_validator("output_token_ids")
    @classmethod
    def _token_ids(cls, ids: list[int]) -> list[int]:
        return _ids(ids)

    @field_validator("draws")
    @classmethod
    def _draws(cls, draws: int, info: ValidationInfo) -> int:
        if draws > len(info.data.get("output_token_ids") or []):
            raise ValueError("more random draws than output tokens")
        return draws


class ExportRequest(_Message):
    """Router -> a draining decode or mixed worker: hand these requests' running choices
    over with their KV (the engine's ids, from each stream's `fw:` lines). Their streams end
    with an error event of code `migrated`; the KV waits under one lease per choice."""
    request_ids: list[Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_LENGTH + 16)]] = Field(
        min_length=1, max_length=MAX_RESUME_CHOICES)


class ExportedChoice(_Message):
    index: int  # the choice's index in its response (prompt k's choice j: k * n + j)
    handle: str  # its KV lease, pulled with GET /internal/kv/{handle}
    num_tokens: int  # the tokens the lease holds: the prompt and the output but its last token


class ExportAnswer(_Message):
    choices: list[ExportedChoice]
    kv_lease_seconds: float


class ResumeRequest(_Message):
    """Router -> decode or mixed worker: go on with a stream another worker was generating.
    `request` is the client's body (for a disaggregated request, its sub-request); its
    max_tokens is the total, so what remains is max_tokens minus each choice's output."""
    kind: Kind
    request: dict
    prompt_token_ids: list[int] = Field(min_length=1, max_length=MAX_RESUME_TOKENS)
    choices: list[ResumeChoice] = Field(min_length=1, max_length=MAX_RESUME_CHOICES)
    response_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    created: int = Field(ge=0)
    # a completion with several prompts: all of them, the first being prompt_token_ids;
    # choice k belongs to prompt k // n
    prompt_list: list[list[int]] = Field([], max_length=MAX_RESUME_CHOICES)
    kv_url: str | None = None  # the worker the choices' `kv_handle`s are pulled from (a drain's export)

    @field_validator("prompt_token_ids")
    @classmethod
    def _token_ids(cls, ids: list[int]) -> list[int]:
        return _ids(ids)

    @field_validator("prompt_list")
    @classmethod
    def _prompt_list(cls, prompts: list[list[int]]) -> list[list[int]]:
        if sum(len(p) for p in prompts) > MAX_RESUME_TOKENS:
            raise ValueError(f"more than {MAX_RESUME_TOKENS} token ids in all")
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty")
        for p in prompts:
            _ids(p)
        return prompts

    @field_validator("kv_url")
    @classmethod
    def _kv_url(cls, url: str | None) -> str | None:
        problem = base_url_problem(url) if url is not None else None
        if problem:
            raise ValueError(problem)
        return url

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[ResumeChoice]) -> list[ResumeChoice]:
        if len({c.index for c in choices}) != len(choices):
            raise ValueError("a choice index appears twice")
        return choices


def base_url_problem(url: str) -> str | None:
    """Why `url` is not a worker's base address (http(s)://host:port and nothing more), or
    None. A decode worker pulls only from such an address, so a caller cannot point it at
    a path, a query or credentials of some other service."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return "must be http(s)://host:port"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.path or parts.query or parts.fragment:
        return "must be http(s)://host:port, with no path, query or fragment"
    return None


@dataclass
class KVHeader:
    """The KV stream's header: whose keys and values these are and which tokens they cover.
    A receiver refuses a stream whose header differs from what it expects in any field."""
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    start: int
    num_tokens: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of one layer's frame payload: keys then values."""
        return 2 * self.num_tokens * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]


def load_token(path: str | Path | None = None) -> str:
    """The shared token from `path` (default: the file `FLEETWISE_INTERNAL_TOKEN_FILE`
    names), surrounding whitespace stripped. Raises ValueError saying what is wrong: no
    file named, unreadable, or a token too short to be a secret."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise ValueError(f"no internal token: give --internal-token-file or set {TOKEN_FILE_ENV}")
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"the internal token file {path} cannot be read: {e.strerror or e}")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(f"the internal token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters "
                         "(fleetwise up writes one with secrets.token_urlsafe(32))")
    return token


def bearer(token: str) -> str:
    """The `Authorization` header's value for `token`."""
    return f"Bearer {token}"


def version_error(received: str | None) -> str | None:
    """Why a request's protocol version cannot be served, or None when it can. A request
    without the header is taken as the current version (peers older than the header)."""
    if received is None:
        return None
    try:
        version = int(received)
    except ValueError:
        version = None
    if version in SUPPORTED_VERSIONS:
        return None
    speaks = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
    return f"{VERSION_HEADER} {received!r} is not spoken here; this peer speaks version {speaks}"


POWER_PATH = "/internal/power"
MAX_CAP_TTL_SECONDS = 3600.0


class PowerCapRequest(BaseModel):
    """`POST /internal/power`: hold the GPU's power limit at `watts` per GPU (None: lift it) for
    `ttl_seconds`, counted on the worker's own clock; a cap not renewed by then falls back to
    `fallback_watts` (None: lifted). A lift takes no ttl."""
    model_config = ConfigDict(extra="forbid")

    watts: float | None = Field(gt=0)
    ttl_seconds: float = Field(default=30.0, gt=0, le=MAX_CAP_TTL_SECONDS)
    fallback_watts: float | None = Field(default=None, gt=0)
    reason: str = Field(default="", max_length=1024)


class PowerCapState(BaseModel):
    """What `GET`/`POST /internal/power` answer: the cap in force (None: none) and its lease."""
    watts: float | None
    seconds_left: float | None     # None: no expiry (no cap, or a fallback in force)
    fallback_watts: float | None
    reason: str
    source: Literal["modelled", "nvml"]
    min_watts: float               # the range the GPU accepts
    max_watts: float
