"""A stream's token ids as the router relays them (`Tracker`): what a migration resumes from.

Every stream from a worker carries its token ids (an `fw:` line per event,
fleetwise/protocol.py); the tracker keeps them, per choice, with the prompt's, and passes the
events on without those lines.
"""

from dataclasses import dataclass, field

import orjson

from fleetwise.protocol import TRACE_PREFIX

from .retries import ENGINE_UNAVAILABLE, error_code

DONE = b"data: [DONE]\n\n"
MIGRATED = "migrated"  # the error code that ends an exported stream


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class Tracker:
    """One stream's token ids as relayed to the client: the prompt's, each choice's output,
    which choices finished, the response's id and time. Events go on whole or not at all,
    so what the client has is exactly what is kept."""
    max_kept: int
    n: int = 1
    prompt: list[int] | None = None  # given when known before the stream (a prefill's answer)
    prompts: dict[int, list[int]] = field(default_factory=dict)  # a completion's several, by index
    request_ids: dict[int, str] = field(default_factory=dict)  # the engine's, by prompt: for an export
    response_id: str | None = None
    created: int | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    kept: int = 0
    why_not: str | None = None  # set once the stream can no longer move
    engine_gone: bool = False
    exported: bool = False  # the worker ended the stream to hand it over (a drain's export)
    errors: int = 0  # error events passed on: the request's own failure, a 5xx of the replica's
    done: bool = False
    buf: bytes = b""

    def __post_init__(self) -> None:
        if self.prompt is not None:
            self._count(len(self.prompt))

    def feed(self, data: bytes) -> bytes:
        """The client's bytes of the complete events in `data` (and before it). Stops at an
        error event saying the engine is gone (`engine_gone`): it is not the client's.
        Per chunk, not per event: one split, the `fw:` lines parsed in one go (the per-token
        cost of migration, on every event of every stream)."""
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return b""
        events = buf[:cut].split(b"\n\n")
        self.buf = buf[cut + 2:]
        out = []
        traces = []
        for k, event in enumerate(events):
            if event.startswith(TRACE_PREFIX):
                line = event.find(b"\n")
                traces.append(event[len(TRACE_PREFIX):line] if line >= 0 else event[len(TRACE_PREFIX):])
                if line < 0:
                    continue  # an output whose text is held back: its ids, no event for the client
                event = event[line + 1:]
            elif event.startswith(b'data: {"error"'):
                code = error_code(event[6:])
                if code in (ENGINE_UNAVAILABLE, MIGRATED):
                    self.engine_gone, self.exported = code == ENGINE_UNAVAILABLE, code == MIGRATED
                    self.buf = b"".join(e + b"\n\n" for e in events[k + 1:]) + self.buf
                    break
                self.errors += 1
            elif event == DONE[:-2]:
                self.done = True
            out.append(event)
        if traces:
            self._notes(traces)
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _notes(self, traces: list[bytes]) -> None:
        try:
            notes = orjson.loads(b"[" + b",".join(traces) + b"]")
        except orjson.JSONDecodeError:
            notes = None
        if notes is None or len(notes) != len(traces):  # one bad line: each on its own
            notes = []
            for t in traces:
                try:
                    notes.append(orjson.loads(t))
                except orjson.JSONDecodeError:
                    notes.append(None)
        for d in notes:
            try:
                self._note(d)
            except (TypeError, AttributeError):
                self.why_not = self.why_not or "no_token_ids"  # not what a worker sends: not movable

    def _note(self, d: dict) -> None:
        if d.get("id") is not None:
            self.response_id, self.created = d["id"], d.get("created")
        if d.get("prompt_token_ids") is not None:
            i = d.get("prompt", 0)
            if isinstance(d.get("request_id"), str):
                self.request_ids[i] = d["request_id"]
            if i == 0 and self.prompt is None:
                self.prompt = d["prompt_token_ids"]
                self._count(len(self.prompt))
            elif i != 0 and i not in self.prompts:
                self.prompts[i] = d["prompt_token_ids"]
                self._count(len(self.prompts[i]))
        index = d.get("index", 0)
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = Choice()
        ids = d.get("token_ids") or []
        if self.why_not is None:
            choice.token_ids += ids
        self.kept += len(ids)  # _count's, inline: this runs for every event
        if self.kept > self.max_kept:
            self._count(0)
        if d.get("finish_reason") is not None:
            choice.finished = True

    def _count(self, tokens: int) -> None:
        self.kept += tokens
        if self.kept > self.max_kept and self.why_not is None:
            self.why_not = "too_long"
            self.prompt = None
            self.prompts = {}
            for c in self.choices.values():
                c.token_ids = []

    def num_prompts(self, request: dict) -> int:
        p = request.get("prompt")
        return len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1

    def complete(self, request: dict) -> bool:
        """Whether every prompt's ids are known (a prompt's first event may not have come yet)."""
        return self.prompt is not None and len(self.prompts) == self.num_prompts(request) - 1

    def resume_body(self, kind: str, request: dict, kv: tuple[str, dict[int, str]] | None = None) -> bytes:
        """`kv`: the exporting worker and each choice's KV lease there."""
        assert self.prompt is not None and self.response_id is not None
        choices = []
        for i in range(self.n * self.num_prompts(request)):
            c = self.choices.get(i) or Choice()
            choice = {"index": i, "output_token_ids": c.token_ids, "draws": len(c.token_ids), "finished": c.finished}
            if kv is not None and i in kv[1] and not c.finished:
                choice["kv_handle"] = kv[1][i]
            choices.append(choice)
        body = {"kind": kind, "request": {**request, "stream": True}, "prompt_token_ids": self.prompt,
                "choices": choices, "response_id": self.response_id, "created": self.created or 0}
        if self.prompts:
            body["prompt_list"] = [self.prompt, *(self.prompts[i] for i in sorted(self.prompts))]
        if kv is not None:
            body["kv_url"] = kv[0]
        return orjson.dumps(body)
