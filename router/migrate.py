"""Migration: a stream whose worker fails mid-generation goes on at another replica, and
the client sees one uninterrupted stream.

Every stream from a worker carries its token ids (an `fw:` line per event,
fleetwise/protocol.py); `Tracker` keeps them, per choice, with the prompt's, and passes the
events on without those lines. When the worker fails (the connection breaks, it times out,
or it says its engine is gone; never for the request's own error), `migrating` sends
`/internal/resume` to another replica of the same role (mixed, or decode: it recomputes the
prompt and the output) with the output so far kept as output, and relays the rest into the
same stream. A request is no longer movable when it keeps more ids than the bound or has
moved `max_migrations` times (the `fleetwise_router_unmigratable` metric says which).

A drain moves the KV itself (live migration, as Llumnix): when the grace period ends the
router asks the draining worker to export the stream's requests (`/internal/export`); the
worker ends the stream with a `migrated` event once every token sampled before has gone
out, and keeps each choice's KV under a lease that the resume names, for the new worker
to pull instead of recomputing. When the export is refused or fails, the stream is broken
off and recomputed as for a failure.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from .metrics import RouterMetrics
from .replica import Replica
from .retries import RouterError
from .tracker import Tracker
from .upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

WORKER_FAILED, DRAIN = "worker_failed", "drain"


EXPORT_SECONDS = 5.0  # an export that takes longer is given up: the stream is recomputed instead


class EngineGone(UpstreamError):
    """The worker said, mid-stream, that its engine is gone."""


class Exported(UpstreamError):
    """The worker handed the stream over with its KV (a drain's export)."""


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
    coalesce: bool = False  # its text comes as one event at the end (an answer the router assembles)


# (model, role, replicas, payload, keys, coalesce) -> a stream
Call = Callable[[str, str, list[Replica], bytes, list[int], bool], Awaitable[Upstream]]
# (draining replica, the engine's request ids) -> each choice's KV lease there, or None: refused or failed
Export = Callable[[Replica, list[str]], Awaitable[dict[int, str] | None]]


@dataclass(eq=False)
class Moving:
    """A stream on its way, as a drain sees it: breaking it off moves it (reason drain).
    `movable` says whether it could move now (a drain never breaks off one that cannot);
    `request_ids`, the engine's ids of its requests on the worker (None: not all known)."""
    up: Upstream
    movable: Callable[[], bool] = lambda: True
    request_ids: Callable[[], list[str] | None] = lambda: None
    drained: bool = False
    exporting: "asyncio.Task[dict[int, str] | None] | None" = None

    def move(self) -> None:
        self.drained = True
        self.up.abort()

    async def export(self, export: Export, ids: list[str]) -> dict[int, str] | None:
        """Asks the worker to hand the stream over with its KV; breaks it off (to be
        recomputed) when the worker will not."""
        replica = self.up.replica
        assert replica is not None
        try:
            handles = await asyncio.wait_for(export(replica, ids), EXPORT_SECONDS)
        except TimeoutError:
            log.warning("export from %s took over %.0f s: recomputing", replica.url, EXPORT_SECONDS)
            handles = None
        if handles is None:
            self.move()
        return handles


@dataclass
class Mover:
    """What `migrating` needs of the router: a way to send, to mark a replica, its metrics;
    and the streams on each replica, for drains."""
    call: Call                                    # (model, role, replicas, payload, keys, coalesce) -> a stream
    broken: Callable[[Replica, UpstreamError], None]
    metrics: RouterMetrics
    max_kept: int
    max_migrations: int
    drain_grace: float = 30.0
    export: Export | None = None  # None: a drain recomputes, as for a failure
    # (model, role) -> its replicas as discovery has them now: a stream moves among these, not
    # among those of when it began (a rollout replaces every one of those); None: those
    current: Callable[[str, str], list[Replica]] | None = None
    streams: dict[Replica, set[Moving]] = field(default_factory=dict)
    leaving: dict[Replica, float] = field(default_factory=dict)  # since when out of routing

    def replicas(self, where: "Where") -> list[Replica]:
        """Where a stream of `where` may go on now."""
        return where.replicas if self.current is None else self.current(where.model, where.role)

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
                        ids = m.request_ids()
                        if self.export is None or ids is None:
                            m.move()
                            continue
                        m.drained = True
                        m.exporting = asyncio.ensure_future(m.export(self.export, ids))

    def track(self, up: Upstream, movable: Callable[[], bool],
              request_ids: Callable[[], list[str] | None] = lambda: None) -> Moving:
        m = Moving(up, movable, request_ids)
        if up.replica is not None:
            self.streams.setdefault(up.replica, set()).add(m)
        return m

    def untrack(self, m: Moving) -> None:
        replica = m.up.replica
        if replica is not None and replica in self.streams:
            self.streams[replica].discard(m)
            if not self.streams[replica]:
                del self.streams[replica]


def migrating(up: Upstream, where: Where, mover: Mover) -> Upstream:
    """`up` (a stream's first chunk and the rest) as a stream that moves to another replica
    when its own fails; it raises UpstreamError only when it cannot move."""
    n = where.body.get("n") or 1
    tracker = Tracker(mover.max_kept, n if isinstance(n, int) else 1, where.prompt)
    current = [up]
    m = mover.metrics

    async def relay() -> AsyncIterator[bytes]:
        up = current[0]
        moves = 0
        last, gap_from = time.perf_counter(), None
        while True:
            failure: UpstreamError
            moving = mover.track(up, partial(_could_move, tracker, mover, where, up.replica,
                                             moves < mover.max_migrations),
                                 partial(_request_ids, tracker, where))
            try:
                chunk: bytes | None = up.body  # the first chunk, then the rest: no generator in between
                rest = up.rest
                while chunk is not None:
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
                    if tracker.engine_gone or tracker.exported:
                        break
                    chunk = await anext(rest, None) if rest is not None else None
                if not (tracker.engine_gone or tracker.exported):
                    return
                failure = Exported("handed over") if tracker.exported else EngineGone("the replica's engine is gone")
            except UpstreamError as e:
                failure = e
            finally:
                mover.untrack(moving)
            handles = await moving.exporting if moving.exporting is not None else None
            kv = (up.replica.url, handles) if handles and tracker.exported and up.replica is not None else None
            tracker.engine_gone = tracker.exported = False
            failed = up.replica
            up.release()
            reason = DRAIN if moving.drained else WORKER_FAILED
            if failed is not None and reason == WORKER_FAILED:
                mover.broken(failed, failure)
            if tracker.done:
                return
            why = _why_not(tracker, mover, where, moves)
            if why is not None:
                m.child(m.unmigratable, where.model, why).inc()
                raise failure
            moves += 1
            tracker.buf = b""  # a part of an event from the failed replica is never sent
            others = [r for r in mover.replicas(where) if r is not failed]
            try:
                up = await mover.call(where.model, where.role, others,
                                      tracker.resume_body(where.kind, where.body, kv), where.keys, where.coalesce)
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
            if unsent := tracker.unsent_text(where.kind, where.model):  # a coalesced stream's text so far
                yield unsent

    def release() -> None:
        current[0].release()

    return Upstream(200, up.content_type, b"", relay(), release)


def _why_not(tracker: Tracker, mover: Mover, where: Where, moves: int) -> str | None:
    """Why a stream that broke cannot move (the unmigratable metric's reason), or None."""
    why = tracker.why_not or ("migrations_exhausted" if moves >= mover.max_migrations else None)
    if why is None and (not tracker.complete(where.body) or tracker.response_id is None):
        why = "no_token_ids"
    return why


def _could_move(tracker: Tracker, mover: Mover, where: Where, on: Replica | None, moves_left: bool) -> bool:
    """Whether a stream on `on` could move now (a drain breaks off only such a one)."""
    return (moves_left and tracker.why_not is None and tracker.complete(where.body)
            and any(r.available for r in mover.replicas(where) if r is not on))


def _request_ids(tracker: Tracker, where: Where) -> list[str] | None:
    """The engine's ids of the stream's requests on its worker, by prompt; None until all are known."""
    count = tracker.num_prompts(where.body)
    if len(tracker.request_ids) != count or not tracker.complete(where.body):
        return None
    return [tracker.request_ids[i] for i in range(count)]

