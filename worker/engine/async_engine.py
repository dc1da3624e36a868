"""Runs the engine loop in its own thread; the HTTP side awaits per-request output streams.

The loop never waits on the HTTP side and the HTTP side never waits on a forward pass:
requests and aborts travel to the loop through a queue, outputs come back through
`call_soon_threadsafe`. The loop's heartbeat tells /health whether it is alive and stepping.
"""

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

from .engine import LLMEngine, RequestError, RequestOutput
from .sequence import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the worker's queue is full ({waiting} requests waiting); retry later")
        self.retry_after = retry_after


class EngineDead(Exception):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_poll: float = 0.2):
        self.engine = engine
        self.idle_poll = idle_poll
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._calls: set[asyncio.Future] = set()  # `call`s not yet answered (event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # sequences submitted and those the loop has taken in: each counter has one writer
        # (the event loop, the engine thread), so neither needs a lock; the difference is pending
        self._submitted = 0
        self._admitted = 0
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.error: BaseException | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stalled_for(self) -> float:
        """Seconds since the loop last came round."""
        return time.monotonic() - self.heartbeat

    def num_waiting(self) -> int:
        """Sequences waiting (a request with n choices counts n), queued ones included."""
        return self.engine.num_waiting + self._submitted - self._admitted

    def check_room(self, sequences: int) -> None:
        """Raises QueueFull unless `sequences` more fit under the queue bound."""
        waiting = self.num_waiting()
        if waiting + sequences > self.engine.config.max_waiting:
            raise QueueFull(waiting, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: one step per waiting request, at least 1."""
        return max(1, int(self.num_waiting() * self.engine.last_step_seconds) + 1)

    # -- called from the event loop ---------------------------------------------------------

    def submit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None = None, hold_kv: bool = False) -> str:
        """Checks and queues a request (raising RequestError, QueueFull or EngineDead at once);
        its outputs are read with `stream`."""
        if not self.alive:
            raise EngineDead("the engine loop is not running")
        self.engine.validate(prompt_token_ids, params)
        if params.n > self.engine.config.max_waiting:
            raise RequestError(f"n={params.n} is more than this worker's queue holds "
                               f"({self.engine.config.max_waiting} sequences)", "n")
        self.check_room(params.n)
        request_id = request_id or uuid.uuid4().hex
        self._streams[request_id] = asyncio.Queue()
        self._submitted += params.n
        self._commands.put(("add", request_id, prompt_token_ids, params, hold_kv))
        self._wake.set()
        return request_id

    def open_stream(self, request_id: str) -> None:
        """Output stream for a request that enters the engine by other means (a KV handoff)."""
        self._streams[request_id] = asyncio.Queue()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the engine thread between two steps; its outputs, if it
        returns a list of them, go to their streams."""
        if not self.alive:
            raise EngineDead("the engine loop is not running")
        assert self._loop is not None  # alive: start() has set it
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.add(future)  # if the loop dies before it runs fn, _fail_all answers it
        try:
            self._commands.put(("call", fn, args, future))
            self._wake.set()
            return await future
        finally:
            self._calls.discard(future)

    async def stream(self, request_id: str, n: int) -> AsyncGenerator[RequestOutput, None]:
        """Yields the outputs of all `n` choices as they come; if the consumer stops early
        (a client that went away) the request is aborted and its blocks are freed at once."""
        queue_ = self._streams[request_id]
        remaining = n
        try:
            while remaining:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        request_id = self.submit(prompt_token_ids, params, request_id)
        async for out in self.stream(request_id, params.n):
            yield out

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._drain_commands(loop)
                if self.engine.kv_connector is not None:
                    self.engine.kv_connector.expire()
                if not self.engine.has_work():
                    self._wake.wait(self.idle_poll)
                    self._wake.clear()
                    continue
                self.busy_since = time.monotonic()
                outputs = self.engine.step()
                self.busy_since = None
                if outputs:
                    loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # the loop is gone: /health says so
            log.exception("the engine loop died")
            self.error = exc
            self._fail_all_soon(loop, EngineDead(f"the engine failed: {exc}"))
        else:
            self._fail_all_soon(loop, EngineDead("the engine has stopped"))

    def _fail_all_soon(self, loop: asyncio.AbstractEventLoop, exc: EngineDead) -> None:
        """Every open stream and every unanswered call fails: nothing waits on a loop that is
        gone. Calls made later fail at once (`alive` is false by now)."""
        try:
            loop.call_soon_threadsafe(self._fail_all, exc)
        except RuntimeError:  # the event loop is closed: no one is left waiting
            pass

    def _drain_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt, params, hold_kv = cmd
                self._admitted += params.n
                try:
                    self.engine.add_request(request_id, prompt, params, hold_kv)
                except RequestError as exc:
                    loop.call_soon_threadsafe(self._deliver, request_id, exc)
            elif cmd[0] == "call":
                _, fn, args, future = cmd
                try:
                    result = fn(*args)
                except Exception as exc:  # handed to the caller
                    loop.call_soon_threadsafe(_settle, future, None, exc)
                else:
                    if isinstance(result, list) and result and isinstance(result[0], RequestOutput):
                        loop.call_soon_threadsafe(self._dispatch, result)
                    loop.call_soon_threadsafe(_settle, future, result, None)
            else:
                self.engine.abort_request(cmd[1])

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(exc)
        for future in list(self._calls):
            _settle(future, None, exc)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def tagged(i: int, gen: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(i, output) for each output of `gen`; closing this closes `gen`."""
    try:
        async for out in gen:
            yield i, out
    finally:
        await gen.aclose()
