"""Real worker servers for tests: uvicorn on free loopback ports (the public and the
internal listener), in a thread of the test process so that a test can reach into the
engine (fault switches, block accounting). Every worker and router here shares `TOKEN`."""

import asyncio
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv
from fleetwise.procs import wait_healthy as wait_processes
from fleetwise.protocol import AUTH_HEADER, bearer
from fleetwise.worker.api.listeners import serve_together
from fleetwise.worker.api.server import build_apps
from fleetwise.worker.engine.async_engine import AsyncEngine
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.engine.engine import LLMEngine
from fleetwise.worker.kv.connector import KVConnector
from fleetwise.worker.metrics import WorkerMetrics

TOKEN = "test-internal-token-0123456789"
AUTH = {AUTH_HEADER: bearer(TOKEN)}


def token_file() -> Path:
    """TOKEN in a file, for worker and router processes."""
    path = LOGS / "internal-token"
    if not path.exists():
        LOGS.mkdir(parents=True, exist_ok=True)
        path.write_text(TOKEN)
        path.chmod(0o600)
    return path


@dataclass
class RunningWorker:
    url: str           # public: the OpenAI API, /health, /metrics
    internal_url: str  # internal: /internal/*, completions, /health, with `auth`
    engine: AsyncEngine
    servers: list[uvicorn.Server]
    thread: threading.Thread
    token: str = TOKEN

    @property
    def auth(self) -> dict[str, str]:
        """The headers the internal listener asks for."""
        return {AUTH_HEADER: bearer(self.token)}

    @property
    def core(self) -> LLMEngine:
        return self.engine.engine

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
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
                 faults: frozenset[str] = frozenset(), token: str = TOKEN, **app_options) -> RunningWorker:
    """`app_options`: build_apps' other keywords (limits, ...)."""
    core = LLMEngine(config, WorkerMetrics(config.served_name, role))
    core.kv_connector = connector = KVConnector(core)
    engine = AsyncEngine(core)
    apps = build_apps(engine, connector, role, health_stall_seconds, faults, internal_token=token, **app_options)
    assert apps.internal is not None
    ports = free_port(), free_port()
    servers = [uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
               for app, port in zip((apps.public, apps.internal), ports)]
    thread = threading.Thread(target=lambda: asyncio.run(serve_together(servers)), daemon=True)
    thread.start()
    url, internal_url = (f"http://127.0.0.1:{port}" for port in ports)
    wait_healthy(url, 30)
    return RunningWorker(url, internal_url, engine, servers, thread, token)


def internal(method: str, worker: RunningWorker, path: str, **kw) -> httpx.Response:
    """A call to `worker`'s internal listener, with the token."""
    headers = {**worker.auth, **kw.pop("headers", {})}
    return httpx.request(method, worker.internal_url + path, headers=headers, timeout=kw.pop("timeout", 30), **kw)


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
    kw.setdefault("token", TOKEN)
    router = Router(StaticEndpoints(config_path), policy, probe_interval=kw.pop("probe_interval", 0.2), **kw)
    port = free_port()
    server, thread = _serve_in_thread(build_app(router), port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    return RunningRouter(url, router, server, thread)


# the logs of worker processes, kept for a failed test to show
LOGS = Path(tempfile.gettempdir()) / "fleetwise-test-workers"


@dataclass
class WorkerProcess(Process):
    """A worker in its own process; `kill()` is a crash, `stop()` a shutdown. `url` is its
    public listener, `internal_url` its internal one (TOKEN)."""
    internal_url: str = ""


def start_worker_process(model_dir: Path, role: str, *args: str, wait: bool = True) -> WorkerProcess:
    """A worker in its own process (`fleetwise worker`), for tests that kill it. `wait`:
    until it is healthy (else the caller waits, for several started at once)."""
    port, internal = free_port(), free_port()
    log = LOGS / f"{role}-{port}.log"
    log.unlink(missing_ok=True)
    proc = WorkerProcess(f"{role} worker", fleetwise_argv(
        "worker", "--model", str(model_dir), "--role", role, "--port", str(port), "--internal-port", str(internal),
        "--internal-token-file", str(token_file()), "--served-model-name", "tiny", *args),
        log, f"http://127.0.0.1:{port}", die_with_parent=True, internal_url=f"http://127.0.0.1:{internal}").start()
    if not wait:
        return proc
    try:
        wait_processes([proc], 120, interval=0.05)
    except Exception:
        proc.kill()
        raise
    return proc


SLOW_STEPS = {"step_delay_seconds": 0.01}  # every step 10 ms more: a stream outlasts a test's reaction


def slow_steps(worker: "WorkerProcess | RunningWorker", settings: dict = SLOW_STEPS) -> None:
    """Sets a worker's fault switches (it runs with `--fault switches`), by default slow steps."""
    r = httpx.post(worker.internal_url + "/internal/faults", json=settings, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
