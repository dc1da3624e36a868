"""How much long prompts arriving at a worker stall the streams it is already serving: the
p99 inter-token latency of running streams while other clients send long prompts, with the
worker tokenising on its event loop (the baseline, a test-only switch) and off it.

    python -m fleetwise.bench.tokenize_stall

The prompts are longer than the tiny model's context, so the worker refuses each one right
after tokenising it: what the streams feel is the tokenising alone, not the prefill.
"""

import asyncio
import logging
import multiprocessing
import random
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from fleetwise.net import free_port

from .harness import percentile

STREAMS, SENDERS, PROMPT_CHARS = 4, 16, 16_000
WARMUP_S, MEASURE_S = 1.0, 6.0


def prompt_text(rng: random.Random) -> str:
    """Words no earlier prompt had (the tokenizer caches the words it has seen)."""
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz     ", k=PROMPT_CHARS))


async def stream(client: httpx.AsyncClient, url: str, gaps: list[float], measuring: asyncio.Event,
                 stop: asyncio.Event) -> None:
    """One client reading a long stream after another; the gaps between tokens count while measuring."""
    body = {"model": "tiny", "prompt": "the scheduler keeps", "max_tokens": 900, "ignore_eos": True,
            "temperature": 0, "stream": True}
    while not stop.is_set():
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            last = None
            async for line in r.aiter_lines():
                if stop.is_set():
                    return
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None and measuring.is_set():
                    gaps.append(now - last)
                last = now


async def send_long_prompts(client: httpx.AsyncClient, url: str, seed: int, stop: asyncio.Event) -> int:
    sent, rng = 0, random.Random(seed)
    while not stop.is_set():
        r = await client.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt_text(rng),
                                                            "max_tokens": 1})
        assert r.status_code == 400 and "context length" in r.text, r.text  # refused after tokenising
        sent += 1
    return sent


async def load(url: str) -> tuple[list[float], int]:
    gaps: list[float] = []
    measuring, stop = asyncio.Event(), asyncio.Event()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        streams = [asyncio.create_task(stream(client, url, gaps, measuring, stop)) for _ in range(STREAMS)]
        await asyncio.sleep(WARMUP_S)
        senders = [asyncio.create_task(send_long_prompts(client, url, i, stop)) for i in range(SENDERS)]
        measuring.set()
        await asyncio.sleep(MEASURE_S)
        stop.set()
        sent = sum(await asyncio.gather(*senders))
        await asyncio.gather(*streams)
    return gaps, sent


def run_load(url: str) -> tuple[list[float], int]:
    return asyncio.run(load(url))


def run(model_dir: Path, inline: bool) -> tuple[float, int, int]:
    """(p99 inter-token latency in ms, gaps measured, long prompts sent)."""
    from fleetwise.worker.api.server import build_app
    from fleetwise.worker.engine.async_engine import AsyncEngine
    from fleetwise.worker.engine.config import EngineConfig
    from fleetwise.worker.engine.engine import LLMEngine
    from fleetwise.worker.kv.connector import KVConnector
    core = LLMEngine(EngineConfig(model=str(model_dir), served_model_name="tiny", device="cpu"))
    core.kv_connector = connector = KVConnector(core)
    app = build_app(AsyncEngine(core), connector)
    app.state.api.tokenize_inline = inline
    # the streams are cut off at the end of the run: asyncio's warning for each write after it is noise
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        # the clients run in a process of their own: here they would take the GIL from the worker
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
            gaps, sent = clients.submit(run_load, url).result()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    return percentile(gaps, 99) * 1e3, len(gaps), sent


def main() -> None:
    from fleetwise.worker.model.files import write_model
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "tiny", "tiny")
        print(f"{STREAMS} streams, {SENDERS} clients sending {PROMPT_CHARS}-character prompts, "
              f"{MEASURE_S:g} s per run")
        results = {}
        for name, inline in (("on the event loop (baseline)", True), ("off the event loop", False)):
            p99, n, sent = run(model_dir, inline)
            results[name] = p99
            print(f"  tokenising {name:30s} p99 inter-token latency {p99:8.1f} ms "
                  f"({n} gaps, {sent} long prompts tokenised)")
        before, after = results.values()
        print(f"  ratio baseline / off the loop: {before / after:.1f}x")


if __name__ == "__main__":
    main()
