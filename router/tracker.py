"""A stream's token ids as the router relays them (`Tracker`): what a migration resumes from.

Every stream from a worker carries its token ids (an `fw:` line per event,
fleetwise/protocol.py); the tracker passes the events on without those lines and keeps the
lines as they came, parsing them (per choice, with the prompt's) only when something asks:
a stream that must move, a drain that asks whether it could. Most streams never move, so
most never pay for the parse. What is kept raw is bounded (`RAW_BYTES`): past it, the lines
so far are parsed in one go and let go of, and the parsed ids keep their own bound
(`max_kept`).
"""

from dataclasses import dataclass, field

import orjson

from fleetwise.protocol import TRACE_PREFIX

from .retries import ENGINE_UNAVAILABLE, error_code

DONE = b"data: [DONE]\n\n"
MIGRATED = "migrated"  # the error code that ends an exported stream
RAW_BYTES = 256 << 10  # `fw:` lines kept unparsed per stream (with a per-line allowance), before a parse
LINE_COST = 64  # the allowance: what one kept line costs besides its bytes

_ERROR = b'data: {"error"'
_DONE_EVENT = DONE[:-2]
_LEFT_TO_EVENTS = (_ERROR, _DONE_EVENT)  # what `feed` leaves to `_events` even in a one-event chunk
_SKIP = len(TRACE_PREFIX)
_TRACE_LEADS = b"\n\n" + TRACE_PREFIX  # an event that begins with its ids, after the one before


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class Ids:
    """The parsed part: the prompt's ids, each choice's output, the response's id and time."""
    prompt: list[int] | None = None
    prompts: dict[int, list[int]] = field(default_factory=dict)  # a completion's several, by index
    request_ids: dict[int, str] = field(default_factory=dict)  # the engine's, by prompt: for an export
    response_id: str | None = None
    created: int | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    kept: int = 0
    why_not: str | None = None  # set once the stream can no longer move
    texts: list[tuple[int, int, str]] = field(default_factory=list)  # a coalesced stream's (line, choice, text)


class Tracker:
    """One stream's token ids as relayed to the client: the prompt's, each choice's output,
    which choices finished, the response's id and time. Events go on whole or not at all,
    so what the client has is exactly what is kept."""

    def __init__(self, max_kept: int, n: int = 1, prompt: list[int] | None = None):
        """`prompt`: given when known before the stream (a prefill's answer)."""
        self.max_kept, self.n = max_kept, n
        self.ids = Ids()
        self.raw: list[bytes] = []  # `fw:` lines not parsed yet, in order
        self.raw_bytes = 0
        self.keeping = True  # False once the stream cannot move: its lines are dropped
        self.engine_gone = False
        self.exported = False  # the worker ended the stream to hand it over (a drain's export)
        self.errors = 0  # error events passed on: the request's own failure, a 5xx of the replica's
        self.done = False
        self.buf = b""
        self.lines = 0  # `fw:` lines kept so far
        self.noted = 0  # of them parsed
        self.text_from = 0  # the lines before it had their text passed on in an event
        if prompt is not None:
            self.ids.prompt = prompt
            self._count(len(prompt))

    # -- the parsed part, parsed when asked for ---------------------------------------------------

    def settle(self) -> Ids:
        """Every line kept so far parsed into `ids`."""
        if self.raw:
            raw, self.raw, self.raw_bytes = self.raw, [], 0
            self._notes(raw)
        return self.ids

    @property
    def prompt(self) -> list[int] | None:
        return self.settle().prompt

    @property
    def prompts(self) -> dict[int, list[int]]:
        return self.settle().prompts

    @property
    def request_ids(self) -> dict[int, str]:
        return self.settle().request_ids

    @property
    def response_id(self) -> str | None:
        return self.settle().response_id

    @property
    def created(self) -> int | None:
        return self.settle().created

    @property
    def choices(self) -> dict[int, Choice]:
        return self.settle().choices

    @property
    def why_not(self) -> str | None:
        return self.settle().why_not

    # -- relaying ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """The client's bytes of the complete events in `data` (and before it). Stops at an
        error event saying the engine is gone (`engine_gone`): it is not the client's.
        Per chunk, not per event: one split, the `fw:` lines cut off and kept as they are."""
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return b""
        self.buf = buf[cut + 2:]
        if buf.startswith(TRACE_PREFIX) and buf.find(b"\n\n", 0, cut) < 0:  # one event led by its ids: most
            line = buf.find(b"\n")
            if line == cut or not buf.startswith(_LEFT_TO_EVENTS, line + 1):
                if self.keeping:
                    self.raw.append(buf[_SKIP:line])
                    self.lines += 1
                    self.raw_bytes += line + LINE_COST
                    if self.raw_bytes > RAW_BYTES:
                        self.settle()
                # an output whose text is held back, or a coalesced stream's (no line after its ids): no event
                if line >= cut:
                    return b""
                self.text_from = self.lines
                return buf[line + 1:cut + 2]
        head = buf[:cut]
        out = self._events(head.split(b"\n\n")) if _ERROR in head else self._many(head)
        if out:
            self.text_from = self.lines
        return out

    def _many(self, head: bytes) -> bytes:
        """`feed` for several events and no error: split where an `fw:` line begins an event."""
        pieces = head.split(_TRACE_LEADS)
        out, traces = [], []
        first = pieces[0]
        if first.startswith(TRACE_PREFIX):
            pieces[0] = first[_SKIP:]
        else:
            out.append(first)  # events with no ids (the usage, [DONE]) before the first that has some
            del pieces[0]
        for piece in pieces:  # an event's ids, then (past a newline) the event and any without ids after it
            trace, _, rest = piece.partition(b"\n")
            traces.append(trace)
            if rest:
                out.append(rest if rest[0] != 10 else rest[1:])  # 10, a newline: an event with ids alone
                # (its text held back) and events without ids after it
        self._keep(traces)
        body = b"\n\n".join(out) + b"\n\n" if out else b""
        if DONE in body and (body.startswith(DONE) or b"\n\n" + DONE in body):
            self.done = True
        return body

    def _events(self, events: list[bytes]) -> bytes:
        out = []
        traces = []
        for k, event in enumerate(events):
            if event.startswith(TRACE_PREFIX):
                line = event.find(b"\n")
                traces.append(event[_SKIP:line] if line >= 0 else event[_SKIP:])
                if line < 0:
                    continue  # an output whose text is held back: its ids, no event for the client
                event = event[line + 1:]
            if event.startswith(_ERROR):
                code = error_code(event[6:])
                if code in (ENGINE_UNAVAILABLE, MIGRATED):
                    self.engine_gone, self.exported = code == ENGINE_UNAVAILABLE, code == MIGRATED
                    self.buf = b"".join(e + b"\n\n" for e in events[k + 1:]) + self.buf
                    break
                self.errors += 1
            elif event == _DONE_EVENT:
                self.done = True
            out.append(event)
        if traces:
            self._keep(traces)
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _keep(self, traces: list[bytes]) -> None:
        if not self.keeping:
            return  # a stream that cannot move needs no more of its ids
        self.raw += traces
        self.lines += len(traces)
        self.raw_bytes += sum(map(len, traces)) + LINE_COST * len(traces)
        if self.raw_bytes > RAW_BYTES:
            self.settle()

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
                self.ids.why_not = self.ids.why_not or "no_token_ids"  # not what a worker sends: not movable
            self.noted += 1
        self.keeping = self.ids.why_not is None

    def _note(self, d: dict) -> None:
        ids = self.ids
        if d.get("id") is not None:
            ids.response_id, ids.created = d["id"], d.get("created")
        if d.get("prompt_token_ids") is not None:
            i = d.get("prompt", 0)
            if isinstance(d.get("request_id"), str):
                ids.request_ids[i] = d["request_id"]
            if i == 0 and ids.prompt is None:
                ids.prompt = d["prompt_token_ids"]
                self._count(len(ids.prompt))
            elif i != 0 and i not in ids.prompts:
                ids.prompts[i] = d["prompt_token_ids"]
                self._count(len(ids.prompts[i]))
        index = d.get("index", 0)
        choice = ids.choices.get(index)
        if choice is None:
            choice = ids.choices[index] = Choice()
        tokens = d.get("token_ids") or []
        if ids.why_not is None:
            choice.token_ids += tokens
        self._count(len(tokens))
        if d.get("finish_reason") is not None:
            choice.finished = True
        text = d.get("text")
        if isinstance(text, str) and text:
            ids.texts.append((self.noted, index, text))

    def _count(self, tokens: int) -> None:
        ids = self.ids
        ids.kept += tokens
        if ids.kept > self.max_kept and ids.why_not is None:
            ids.why_not = "too_long"
            ids.prompt = None
            ids.prompts = {}
            for c in ids.choices.values():
                c.token_ids = []
            ids.texts = []
            self.raw, self.raw_bytes, self.keeping = [], 0, False

    # -- resuming ---------------------------------------------------------------------------------

    def unsent_text(self, kind: str, model: str) -> bytes:
        """A coalesced stream's text that its `fw:` lines carried since the last event passed
        on, as one event (b"" when there is none): what the client's answer would miss when
        the stream goes on elsewhere. Passed on once."""
        ids = self.settle()
        texts: dict[int, list[str]] = {}
        for line, index, text in ids.texts:
            if line >= self.text_from:
                texts.setdefault(index, []).append(text)
        ids.texts, self.text_from = [], self.lines
        if not texts:
            return b""
        chat = kind == "chat"
        choices = [{"index": i, "delta": {"content": "".join(t)}} if chat else {"index": i, "text": "".join(t)}
                   for i, t in sorted(texts.items())]
        return b"data: " + orjson.dumps({"id": ids.response_id, "object": "chat.completion.chunk" if chat else
                                         "text_completion", "created": ids.created, "model": model,
                                         "choices": choices}) + b"\n\n"

    def num_prompts(self, request: dict) -> int:
        p = request.get("prompt")
        return len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1

    def complete(self, request: dict) -> bool:
        """Whether every prompt's ids are known (a prompt's first event may not have come yet)."""
        ids = self.settle()
        return ids.prompt is not None and len(ids.prompts) == self.num_prompts(request) - 1

    def resume_body(self, kind: str, request: dict, kv: tuple[str, dict[int, str]] | None = None) -> bytes:
        """`kv`: the exporting worker and each choice's KV lease there."""
        ids = self.settle()
        assert ids.prompt is not None and ids.response_id is not None
        choices = []
        for i in range(self.n * self.num_prompts(request)):
            c = ids.choices.get(i) or Choice()
            choice = {"index": i, "output_token_ids": c.token_ids, "draws": len(c.token_ids), "finished": c.finished}
            if kv is not None and i in kv[1] and not c.finished:
                choice["kv_handle"] = kv[1][i]
            choices.append(choice)
        body = {"kind": kind, "request": {**request, "stream": True}, "prompt_token_ids": ids.prompt,
                "choices": choices, "response_id": ids.response_id, "created": ids.created or 0}
        if ids.prompts:
            body["prompt_list"] = [ids.prompt, *(ids.prompts[i] for i in sorted(ids.prompts))]
        if kv is not None:
            body["kv_url"] = kv[0]
        return orjson.dumps(body)
