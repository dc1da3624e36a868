"""The fault benchmark's client: the bursty requests (`workload.py`) sent open-loop through the
router from a thread of its own, until the run stops it; every answer's outcome is kept with
its send time, so the goodput of any stretch of the run can be counted afterwards."""

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from fleetwise.bench.faults.workload import Request
from fleetwise.bench.goodput.load import Outcome, one


@dataclass
class Sent:
    at: float            # time.time() of the send
    outcome: Outcome


@dataclass
class LoadThread:
    """`start()`, then `stop()`; `sent` grows as requests go out."""
    url: str
    model: str
    requests: list[Request]
    sent: list[Sent] = field(default_factory=list)
    started: float = 0.0     # time.time() when the first request's clock started (`Request.at` counts from it)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "LoadThread":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="fault-bench-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace)

    async def _run(self) -> None:
        url = self.url.rstrip("/") + "/v1/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            t0, tasks = time.perf_counter(), set()
            self.started = time.time()
            for req in self.requests:
                while (delay := t0 + req.at - time.perf_counter()) > 0 and not self._stop.is_set():
                    await asyncio.sleep(min(delay, 0.2))
                if self._stop.is_set():
                    break
                payload = orjson.dumps({"model": self.model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                                        "stream": True, "ignore_eos": True, "temperature": 0.0,
                                        "stream_options": {"include_usage": True}})
                s = Sent(time.time(), Outcome(req.rank))
                self.sent.append(s)
                task = asyncio.create_task(one(session, url, payload, s.outcome, t0 + req.at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=60)

    def counts(self, since: float = 0.0, until: float = float("inf")) -> dict:
        """Requests sent in [since, until): how many, how many answered, the failures' kinds."""
        return counts([s for s in self.sent if since <= s.at < until])


def counts(sent: list[Sent]) -> dict:
    """How many requests were sent, how many answered, the failures' kinds."""
    errors: dict[str, int] = {}
    for s in sent:
        if not s.outcome.ok and s.outcome.error:
            errors[s.outcome.error] = errors.get(s.outcome.error, 0) + 1
    return {"sent": len(sent), "ok": sum(s.outcome.ok for s in sent), "errors": errors}
