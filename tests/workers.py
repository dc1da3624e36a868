"""Real worker servers for tests: uvicorn on a free loopback port, in a thread of the test
process so that a test can reach into the engine (fault switches, block accounting)."""

import asyncio
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn

from fleetwise.net import free_port
from fleetwise.worker.api.server import build_app
from fleetwise.worker.engine.async_engine import AsyncEngine
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.kv.connector import KVConnector
from fleetwise.worker.metrics import WorkerMetrics


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
    core = LLMEngine(config, WorkerMetrics(config.served_model_name, role))
    core.kv_connector = connector = KVConnector(core)
    engine = AsyncEngine(core)
    app = build_app(engine, connector, role, health_stall_seconds, faults)
    port = free_port()
    server, thread = _serve_in_thread(app, port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    return RunningWorker(url, engine, server, thread)


def _serve_in_thread(app, port: int):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    return server, thread


def wait_healthy(url: str, timeout: float = 60.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become healthy")


@dataclass
class RunningRouter:
    url: str
    router: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def write_router_config(path, model: str, **roles) -> None:
    import yaml
    path.write_text(yaml.safe_dump({"models": [{"name": model, **{k: list(v) for k, v in roles.items()}}]}))


def start_router(config_path, policy: str = "prefix_affinity", **kw) -> RunningRouter:
    from fleetwise.router.app import Router, build_app
    from fleetwise.router.endpoints import StaticEndpoints
    router = Router(StaticEndpoints(config_path), policy, probe_interval=kw.pop("probe_interval", 0.2), **kw)
    port = free_port()
    server, thread = _serve_in_thread(build_app(router), port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    return RunningRouter(url, router, server, thread)


@dataclass
class WorkerProcess:
    url: str
    proc: "subprocess.Popen"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()


def start_worker_process(model_dir, role: str, *args: str) -> WorkerProcess:
    """A worker in its own process (`fleetwise worker`), for tests that kill it."""
    import subprocess
    import sys
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleetwise", "worker", "--model", str(model_dir), "--role", role,
                             "--port", str(port), "--served-model-name", "tiny", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, proc)
    except Exception:
        proc.kill()
        raise
    return WorkerProcess(url, proc)
