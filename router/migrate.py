"""Migration: a stream whose worker fails mid-generation goes on at another replica, and
the client sees one uninterrupted stream.

Every stream from a worker carries its token ids (an `fw:` line per event,
fleetwise/protocol.py); `Tracker` keeps them, per choice, with the prompt's, and passes the
events on without those lines. When the worker fails (the connection breaks, it times out,
or it says its engine is gone; never for the request's own error), `migrating` sends
`/internal/resume` to another replica of the same role (mixed, or decode: it recomputes the
prompt and the output) with the output so far kept as output, and relays the rest into the
same stream. A request is no longer movable when it keeps more ids than the bound, has
moved `max_migrations` times, or is a completion with several prompts (the
`fleetwise_router_unmigratable` metric says which).
"""

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import orjson

from fleetwise.protocol import TRACE_PREFIX

from .metrics import RouterMetrics
from .replica import Replica
from .retries import ENGINE_UNAVAILABLE, RouterError, error_code
from .upstream import Upstream, UpstreamError

WORKER_FAILED, DRAIN = "worker_failed", "drain"
DONE = b"data: [DONE]\n\n"


class EngineGone(UpstreamError):
    """The worker said, mid-stream, that its engine is gone."""


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
    response_id: str | None = None
    created: int | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    kept: int = 0
    why_not: str | None = None  # set once the stream can no longer move
    engine_gone: bool = False
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
                if error_code(event[6:]) == ENGINE_UNAVAILABLE:
                    self.engine_gone = True
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
            if self.prompt is None and d.get("prompt_token_ids") is not None:
                self.prompt = d["prompt_token_ids"]
                self._count(len(self.prompt))
        choice = self.choices.get(d.get("index", 0))
        if choice is None:
            choice = self.choices[d.get("index", 0)] = Choice()
        ids = d.get("token_ids") or []
        if self.why_not is None:
            choice.token_ids += ids
        self._count(len(ids))
        if d.get("finish_reason") is not None:
            choice.finished = True

    def _count(self, tokens: int) -> None:
        self.kept += tokens
        if self.kept > self.max_kept and self.why_not is None:
            self.why_not = "too_long"
            self.prompt = None
            for c in self.choices.values():
                c.token_ids = []

    def resume_body(self, kind: str, request: dict) -> bytes:
        assert self.prompt is not None and self.response_id is not None
        choices = []
        for i in range(self.n):
            c = self.choices.get(i) or Choice()
            choices.append({"index": i, "output_token_ids": c.token_ids, "draws": len(c.token_ids),
                            "finished": c.finished})
        return orjson.dumps({"kind": kind, "request": {**request, "stream": True}, "prompt_token_ids": self.prompt,
                             "choices": choices, "response_id": self.response_id, "created": self.created or 0})


@dataclass
class Where:
    """Where a stream may go on: the replicas of its role and what a resume request needs."""
    model: str
    role: str  # mixed or decode
    replicas: list[Replica]
    kind: str
    body: dict  # the client's request (a disaggregated one's sub-request)
    keys: list[int]
    prompt: list[int] | None = None  # known already from a prefill answer


Call = Callable[[str, str, list[Replica], bytes, list[int]], Awaitable[Upstream]]


@dataclass(eq=False)
class Moving:
    """A stream on its way, as a drain sees it: breaking it off moves it (reason drain).
    `movable` says whether it could move now (a drain never breaks off one that cannot)."""
    up: Upstream
    movable: Callable[[], bool] = lambda: True
    drained: bool = False

    def move(self) -> None:
        self.drained = True
        self.up.abort()


@dataclass
class Mover:
    """What `migrating` needs of the router: a way to send, to mark a replica, its metrics;
    and the streams on each replica, for drains."""
    call: Call                                    # (model, role, replicas, payload, keys) -> a stream
    broken: Callable[[Replica, UpstreamError], None]
    metrics: RouterMetrics
    max_kept: int
    max_migrations: int
    drain_grace: float = 30.0
    streams: dict[Replica, set[Moving]] = field(default_factory=dict)
    leaving: dict[Replica, float] = field(default_factory=dict)  # since when out of routing

    def drain(self, routable: list[Replica], now: float) -> None:
        """Streams on a replica out of routing (drained, or gone from discovery) for the
        grace period move elsewhere, so that it is idle soon and a rollout does not wait
        on its longest generation."""
        serving = set(routable)
        for replica in list(self.leaving):
            if replica in serving or replica not in self.streams:
                del self.leaving[replica]
        for replica, moving in self.streams.items():
            if replica in serving:
                continue
            since = self.leaving.setdefault(replica, now)
            if now - since >= self.drain_grace:
                for m in list(moving):
                    if not m.drained and m.movable():
                        m.move()

    def track(self, up: Upstream, movable: Callable[[], bool]) -> Moving:
        m = Moving(up, movable)
        if up.replica is not None:
            self.streams.setdefault(up.replica, set()).add(m)
        return m

    def untrack(self, m: Moving) -> None:
        replica = m.up.replica
        if replica is not None and replica in self.streams:
            self.streams[replica].discard(m)
            if not self.streams[replica]:
                del self.streams[replica]


def movable(kind: str, body: dict) -> str | None:
    """Why a request cannot move at all, or None."""
    prompt = body.get("prompt")
    if kind == "completion" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
            and len(prompt) > 1:
        return "prompt_list"
    return None


def migrating(up: Upstream, where: Where, mover: Mover) -> Upstream:
    """`up` (a stream's first chunk and the rest) as a stream that moves to another replica
    when its own fails; it raises UpstreamError only when it cannot move."""
    n = where.body.get("n") or 1
    tracker = Tracker(mover.max_kept, n if isinstance(n, int) else 1, where.prompt)
    tracker.why_not = movable(where.kind, where.body)
    current = [up]
    m = mover.metrics

    async def relay() -> AsyncIterator[bytes]:
        up = current[0]
        moves = 0
        last, gap_from = time.perf_counter(), None
        while True:
            failure: UpstreamError
            moving = mover.track(up, partial(_could_move, tracker, where, up.replica, moves < mover.max_migrations))
            try:
                async for chunk in _chunks(up):
                    errors = tracker.errors
                    out = tracker.feed(chunk)
                    if tracker.errors > errors and up.replica is not None:
                        m.child(m.server_errors, where.model, where.role, up.replica.url).inc()
                    if out:
                        now = time.perf_counter()
                        if gap_from is not None:
                            m.child(m.migration_gap, where.model).observe(now - gap_from)
                            gap_from = None
                        yield out
                        last = now
                    if tracker.engine_gone:
                        break
                if not tracker.engine_gone:
                    return
                failure = EngineGone("the replica's engine is gone")
                tracker.engine_gone = False
            except UpstreamError as e:
                failure = e
            finally:
                mover.untrack(moving)
            failed = up.replica
            up.release()
            reason = DRAIN if moving.drained else WORKER_FAILED
            if failed is not None and reason == WORKER_FAILED:
                mover.broken(failed, failure)
            if tracker.done:
                return
            why = tracker.why_not or ("migrations_exhausted" if moves >= mover.max_migrations else None)
            if why is None and (tracker.prompt is None or tracker.response_id is None):
                why = "no_token_ids"
            if why is not None:
                m.child(m.unmigratable, where.model, why).inc()
                raise failure
            moves += 1
            tracker.buf = b""  # a part of an event from the failed replica is never sent
            others = [r for r in where.replicas if r is not failed]
            try:
                up = await mover.call(where.model, where.role, others, tracker.resume_body(where.kind, where.body),
                                      where.keys)
            except RouterError as e:
                m.child(m.unmigratable, where.model, "no_replica").inc()
                raise UpstreamError(f"{failure}; no replica could take the stream over: {e}")
            if up.status != 200 or up.rest is None:
                up.release()
                m.child(m.unmigratable, where.model, "refused").inc()
                raise UpstreamError(f"{failure}; the replica that was to take the stream over answered "
                                    f"{up.status}: {up.body[:200]!r}")
            current[0] = up
            m.child(m.migrations, where.model, reason).inc()
            gap_from = last

    def release() -> None:
        current[0].release()

    return Upstream(200, up.content_type, b"", relay(), release)


def _could_move(tracker: Tracker, where: Where, on: Replica | None, moves_left: bool) -> bool:
    """Whether a stream on `on` could move now (a drain breaks off only such a one)."""
    return (moves_left and tracker.why_not is None and tracker.prompt is not None
            and any(r.available for r in where.replicas if r is not on))


async def _chunks(up: Upstream) -> AsyncIterator[bytes]:
    yield up.body
    if up.rest is not None:
        async for chunk in up.rest:
            yield chunk
