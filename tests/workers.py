"""Real worker servers for tests: uvicorn on a free loopback port, in a thread of the test
process so that a test can reach into the engine (fault switches, block accounting)."""

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn

from fleetwise.worker.async_engine import AsyncEngine
from fleetwise.worker.config import EngineConfig
from fleetwise.worker.engine import LLMEngine
from fleetwise.worker.metrics import WorkerMetrics
from fleetwise.worker.server import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningWorker:
    url: str
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def core(self) -> LLMEngine:
        return self.engine.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request and every block is back in the pool."""
        deadline = time.monotonic() + timeout
        bm = self.core.block_manager
        while time.monotonic() < deadline:
            if not self.core.requests and bm.num_free_blocks == bm.num_blocks:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle: {len(self.core.requests)} requests, "
                             f"{bm.num_blocks - bm.num_free_blocks} blocks held")


def start_worker(config: EngineConfig, role: str = "mixed", health_stall_seconds: float = 30.0,
                 faults: frozenset[str] = frozenset()) -> RunningWorker:
    engine = AsyncEngine(LLMEngine(config, WorkerMetrics(config.served_model_name, role)))
    app = build_app(engine, role, health_stall_seconds, faults)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return RunningWorker(url, engine, server, thread)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("worker did not become healthy")
