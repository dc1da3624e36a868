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
The KV stream carries its own format version (`KV_STREAM_VERSION`, in its preamble), checked
the same way by the receiver.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
VERSION_HEADER = "x-fleetwise-protocol"
REQUEST_ID_HEADER = "x-request-id"
UNSUPPORTED_VERSION = "unsupported_protocol_version"
MAX_REQUEST_ID_LENGTH = 128

KV_STREAM_VERSION = 1
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


class PrefillAnswer(_Message):
    """Prefill worker -> router. `handle` is None when nothing is held: the first token
    already ended the request (`finish_reason` says why)."""
    handle: str | None
    prompt_token_ids: list[int]
    first_token: int
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
    first_token: int = Field(ge=0)
    first_logprob: TokenLogprob | None = None
    handle: str | None = None
    # after `handle`, whose value its check reads; checked when left out too
    prefill_url: str | None = Field(default=None, validate_default=True)

    @field_validator("prefill_url")
    @classmethod
    def _url_with_handle(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None and info.data.get("handle"):
            raise ValueError("required with a handle: the prefill worker that holds the keys and values")
        return url


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
