"""`fleetwise up`: the fleet on one machine, as processes: a router in front of prefill and
decode workers (or mixed workers), started, watched and stopped together."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleetwise.net import free_port, port_free

console = Console()


@dataclass
class Proc:
    name: str
    role: str
    port: int
    args: list[str]
    log: Path
    popen: subprocess.Popen | None = None
    health: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        # own session: the terminal's Ctrl-C reaches `fleetwise up` only, which stops the
        # children in order instead of all of them dying at once mid-request
        self.popen = subprocess.Popen([sys.executable, "-m", "fleetwise", *self.args], stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    @property
    def exited(self) -> int | None:
        return self.popen.poll() if self.popen else None




def plan(model: Path, name: str, mode: str, port: int, prefill: int, decode: int, mixed: int,
         workdir: Path, worker_args: list[str]) -> list[Proc]:
    procs: list[Proc] = []
    roles = [("prefill", prefill), ("decode", decode)] if mode == "disaggregated" else [("mixed", mixed)]
    for role, count in roles:
        for i in range(count):
            p = free_port()
            procs.append(Proc(f"{role}-{i}", role, p, [
                "worker", "--model", str(model), "--role", role, "--port", str(p),
                "--served-model-name", name, *worker_args], workdir / "logs" / f"{role}-{i}.log"))
    config = {"models": [{"name": name, **{role: [p.url for p in procs if p.role == role]
                                           for role, _ in roles}}]}
    (workdir / "router.yaml").write_text(yaml.safe_dump(config))
    procs.append(Proc("router", "router", port, ["router", "--config", str(workdir / "router.yaml"),
                                                 "--port", str(port)], workdir / "logs" / "router.log"))
    return procs


def _poll(proc: Proc) -> None:
    if proc.exited is not None:
        proc.health = {"status": f"exited ({proc.exited})"}
        return
    try:
        r = httpx.get(proc.url + "/health", timeout=0.5)
        proc.health = r.json() | ({} if r.status_code == 200 else {"status": r.json().get("status", r.status_code)})
    except (httpx.HTTPError, ValueError):
        proc.health = {"status": "starting"}


def _table(procs: list[Proc], model_name: str) -> Table:
    t = Table(title=f"fleetwise: {model_name}", expand=False)
    for col in ("process", "role", "url", "pid", "status", "running", "waiting"):
        t.add_column(col)
    for p in procs:
        h = p.health
        status = h.get("status", "?")
        style = "green" if status == "ok" else ("red" if "exited" in str(status) or status == "dead" else "yellow")
        t.add_row(p.name, p.role, p.url, str(p.popen.pid if p.popen else "-"), f"[{style}]{status}[/]",
                  str(h.get("running", "")), str(h.get("waiting", h.get("inflight", ""))))
    return t


def stop_all(procs: list[Proc], grace: float = 10.0) -> None:
    """The router first (no new requests), then the workers; SIGTERM, then SIGKILL."""
    for group in ([p for p in procs if p.role == "router"], [p for p in procs if p.role != "router"]):
        live = [p for p in group if p.popen and p.popen.poll() is None]
        for p in live:
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait()


def run(model: Path | None, mode: str, port: int, prefill: int, decode: int, mixed: int, workdir: Path,
        worker_args: list[str], ready_timeout: float = 180.0) -> int:
    from fleetwise.worker.model.files import write_model
    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = workdir / "models" / "tiny"
        if not (model / "config.json").exists():
            with console.status("writing the tiny model"):
                write_model(model, "tiny", seed=0)
            console.print(f"wrote a tiny random model to {model}")
    if not (Path(model) / "config.json").exists():
        console.print(f"[red]{model} is not a model directory (no config.json)[/]")
        return 2
    if not port_free(port):
        console.print(f"[red]port {port} is in use; choose another with --port[/]")
        return 2
    name = Path(model).name
    procs = plan(Path(model).resolve(), name, mode, port, prefill, decode, mixed, workdir, worker_args)

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        (workdir / "pids.json").write_text(json.dumps({p.name: p.popen.pid for p in procs}))
        deadline = time.monotonic() + ready_timeout
        with console.status("starting the fleet") as status:
            while not stopping:
                for p in procs:
                    _poll(p)
                ready = sum(p.health.get("status") == "ok" for p in procs)
                status.update(f"starting the fleet: {ready}/{len(procs)} healthy")
                dead = [p for p in procs if p.exited is not None]
                if dead or time.monotonic() > deadline:
                    for p in dead or [p for p in procs if p.health.get("status") != "ok"]:
                        tail = p.log.read_text(errors="replace").splitlines()[-15:] if p.log.exists() else []
                        console.print(f"[red]{p.name} {'exited' if p.exited is not None else 'not healthy'}; "
                                      f"last lines of {p.log}:[/]\n" + "\n".join(tail))
                    return 1
                if ready == len(procs):
                    break
                time.sleep(0.2)
        if stopping:
            return 130
        router = procs[-1].url
        console.print(f"[green]fleet ready[/] ({mode}): router {router}  (logs in {workdir / 'logs'})")
        console.print(f"  curl -s {router}/v1/completions -H 'content-type: application/json' \\\n"
                      f"    -d '{{\"model\": \"{name}\", \"prompt\": \"hello\", \"max_tokens\": 16}}'")
        console.print("  Ctrl-C stops everything.")
        with Live(_table(procs, name), console=console, refresh_per_second=2) as live:
            while not stopping:
                for p in procs:
                    _poll(p)
                live.update(_table(procs, name))
                time.sleep(1.0)
        return 0
    finally:
        with console.status("stopping the fleet"):
            stop_all(procs)
        for s, handler in old.items():
            signal.signal(s, handler)
        console.print("fleet stopped")
