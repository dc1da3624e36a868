"""Real worker servers for tests: uvicorn on a free loopback port, in a thread of the test
process so that a test can reach into the engine (fault switches, block accounting)."""

import asyncio
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv
from fleetwise.procs import wait_healthy as wait_processes
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
                 faults: frozenset[str] = frozenset(), **app_options) -> RunningWorker:
    """`app_options`: build_app's other keywords (limits, ...)."""
    core = LLMEngine(config, WorkerMetrics(config.served_name, role))
    core.kv_connector = connector = KVConnector(core)
    engine = AsyncEngine(core)
    app = build_app(engine, connector, role, health_stall_seconds, faults, **app_options)
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


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Until url/health answers 200; fails at once if `proc` (the server's process) exits."""
    wait_processes([Process(url, [], None, url, popen=proc)], timeout, interval=0.05)


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
    from fleetwise.router.app import build_app
    from fleetwise.router.endpoints import StaticEndpoints
    from fleetwise.router.proxy import Router
    router = Router(StaticEndpoints(config_path), policy, probe_interval=kw.pop("probe_interval", 0.2), **kw)
    port = free_port()
    server, thread = _serve_in_thread(build_app(router), port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    return RunningRouter(url, router, server, thread)


# the logs of worker processes, kept for a failed test to show
LOGS = Path(tempfile.gettempdir()) / "fleetwise-test-workers"


class WorkerProcess(Process):
    """A worker in its own process; `kill()` is a crash, `stop()` a shutdown."""


def start_worker_process(model_dir: Path, role: str, *args: str) -> WorkerProcess:
    """A worker in its own process (`fleetwise worker`), for tests that kill it."""
    port = free_port()
    log = LOGS / f"{role}-{port}.log"
    log.unlink(missing_ok=True)
    proc = WorkerProcess(f"{role} worker", fleetwise_argv(
        "worker", "--model", str(model_dir), "--role", role, "--port", str(port), "--served-model-name", "tiny",
        *args), log, f"http://127.0.0.1:{port}", die_with_parent=True).start()
    try:
        wait_processes([proc], 120, interval=0.05)
    except Exception:
        proc.kill()
        raise
    return proc
