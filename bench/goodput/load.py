"""The goodput benchmark's client: an open loop of streamed completions (each request sent at
its time whatever the answers before it), and what each request felt: time to first token
from its scheduled send time (so a late client is charged, never hidden), time per output
token after the first, and whether it met the SLO."""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from fleetwise.bench.goodput.workload import Request
from fleetwise.bench.harness import Alarm

REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def met(self, r: "Outcome") -> bool:
        return r.ok and r.ttft_s is not None and r.ttft_s <= self.ttft_s and (r.tpot_s or 0.0) <= self.tpot_s

    def to_json(self) -> dict:
        return {"ttft_s": {"op": "<=", "value": self.ttft_s}, "tpot_s": {"op": "<=", "value": self.tpot_s}}


@dataclass
class Outcome:
    rank: int
    ok: bool = False
    error: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    cached_tokens: int | None = None    # what the worker's usage says its prefix cache held


def body(req: Request, model: str) -> bytes:
    return orjson.dumps({"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
                         "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}})


async def one(session: aiohttp.ClientSession, url: str, payload: bytes, out: Outcome, t_sched: float) -> None:
    first = last = None
    events = 0
    try:
        async with session.post(url, data=payload, headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
            if resp.status != 200:
                out.error = f"http {resp.status}"
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[5:])
                if event.get("usage"):
                    usage = event["usage"]
                    out.tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = details.get("cached_tokens")
                if event.get("choices"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    events += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        out.error = type(e).__name__
        return
    if first is None or last is None:
        out.error = "no tokens"
        return
    out.tokens = out.tokens or events
    out.ok = True
    out.ttft_s = first - t_sched
    out.tpot_s = (last - first) / (out.tokens - 1) if out.tokens > 1 else 0.0


async def open_loop(url: str, requests: list[Request], model: str,
                    tick: Callable[[int], None] | None = None) -> tuple[list[Outcome], float]:
    """Every request at its time; the outcomes in order and the seconds until the last answer."""
    payloads = [body(r, model) for r in requests]
    outcomes = [Outcome(r.rank) for r in requests]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        tasks = []
        async with Alarm() as alarm:
            for req, payload, out in zip(requests, payloads, outcomes):
                await alarm.until(t0 + req.at)
                tasks.append(asyncio.create_task(one(session, url, payload, out, t0 + req.at)))
                if tick:
                    tasks[-1].add_done_callback(lambda _: tick(1))
        await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - t0


async def closed_loop(urls: list[str], requests: list[Request], model: str, clients: int,
                      seconds: float) -> tuple[int, float]:
    """`clients` each sending the next request when the last returned, over `urls` in turn:
    (requests completed, seconds) in a window after a warm-up of a quarter of it."""
    payloads = [body(r, model) for r in requests]
    done: list[float] = []
    stop = time.perf_counter() + seconds * 1.25
    counter = iter(range(1 << 30))

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            out = Outcome(0)
            await one(session, urls[i % len(urls)], payloads[i % len(payloads)], out, time.perf_counter())
            if out.ok:
                done.append(time.perf_counter())
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    start = t0 + seconds * 0.25
    counted = [t for t in done if start <= t <= stop]
    return len(counted), stop - start
