"""`fleetwise up`: the fleet on one machine, as processes: a router in front of prefill and
decode workers (or mixed workers), started, watched and stopped together. Its `LocalFleet`
writes the router's endpoints file and is how the workers are quarantined, drained and
restarted.

Each worker gets two ports: the public one (its /health, in the table) and the internal one
that the router and the other workers call with the shared token. The token is new at each
start, in `internal-token` in the workdir, readable by the user alone. The admin API runs in
this process, on its own port, over the same `LocalFleet` (`admin/local.py`).

With `--power-limit-watts`, every worker is a modelled GPU of its pool's product, and the
power controller runs over them against a real Prometheus (fleetwise/local_power.py)."""

import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import httpx
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fleetwise.fleet import Routability
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.local_power import LocalPower, PowerOptions
from fleetwise.net import free_port, port_free
from fleetwise.procs import ProcessError, Restarts, fleetwise_argv, stop_all, wait_healthy

if TYPE_CHECKING:
    from fleetwise.admin.local import LocalAdmin
    from fleetwise.local_faults import LocalFaults
    from fleetwise.telemetry.prometheus_server import PrometheusServer

console = Console()


TOKEN_FILE = "internal-token"


def prometheus_available() -> bool:
    return shutil.which("prometheus") is not None


def write_token(workdir: Path) -> Path:
    """A new shared token in the workdir, readable and writable by the user alone (0600)."""
    path = workdir / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def plan(model: Path, name: str, mode: str, port: int, prefill: int, decode: int, mixed: int,
         workdir: Path, worker_args: list[str], token_file: Path,
         role_args: dict[str, list[str]] | None = None) -> list[Member]:
    """`role_args`: more worker arguments by role (a pool's modelled GPU)."""
    procs: list[Member] = []
    roles = [("prefill", prefill), ("decode", decode)] if mode == "disaggregated" else [("mixed", mixed)]
    token = ["--internal-token-file", str(token_file)]
    for role, count in roles:
        extra = [*worker_args, *(role_args or {}).get(role, [])]
        for i in range(count):
            p, q = free_port(), free_port()
            procs.append(Member(f"{role}-{i}", fleetwise_argv(
                "worker", "--model", str(model), "--role", role, "--port", str(p), "--internal-port", str(q),
                *token, "--served-model-name", name, *extra), workdir / "logs" / f"{role}-{i}.log",
                f"http://127.0.0.1:{p}", role=role, internal_url=f"http://127.0.0.1:{q}"))
    procs.append(Member("router", fleetwise_argv("router", "--config", str(workdir / "router.yaml"),
                                                 "--port", str(port), *token),
                        workdir / "logs" / "router.log", f"http://127.0.0.1:{port}", role="router"))
    return procs


def _poll(proc: Member) -> None:
    if proc.exited is not None:
        proc.health = {"status": f"exited ({proc.exited})"}
        return
    try:
        r = httpx.get(proc.url + "/health", timeout=0.5)
        proc.health = r.json() | ({} if r.status_code == 200 else {"status": r.json().get("status", r.status_code)})
    except (httpx.HTTPError, ValueError):
        proc.health = {"status": "starting"}


def _ready(proc: Member) -> bool:
    _poll(proc)
    return proc.health.get("status") == "ok"


def _table(procs: list[Member], fleet: LocalFleet, power: LocalPower | None = None,
           faults: "LocalFaults | None" = None) -> Table:
    caption = "\n".join(line for line in (_power_line(power), _faults_line(faults)) if line) or None
    t = Table(title=f"fleetwise: {fleet.model}", expand=False, caption=caption)
    decision = faults.loop.last if faults is not None else None
    for col in ("process", "role", "url", "pid", "status", "running", "waiting", "routing", "cap W") + \
            (("fault score",) if faults is not None else ()):
        t.add_column(col)
    for p in procs:
        h = p.health
        status = h.get("status", "?")
        style = "green" if status == "ok" else ("red" if "exited" in str(status) or status == "dead" else "yellow")
        routing = fleet.states.get(p.name)
        shown = "" if routing is None else str(routing.state)
        if routing is not None and routing.state is not Routability.SERVING:
            shown = f"[yellow]{shown}: {escape(routing.reason)}[/]"
        cap = fleet.caps.get(p.name)
        score = None if decision is None else decision.scores.get(p.name)
        t.add_row(p.name, p.role, p.url, str(p.pid or "-"), f"[{style}]{status}[/]",
                  str(h.get("running", "")), str(h.get("waiting", h.get("inflight", ""))), shown,
                  "" if cap is None else f"{cap:.0f}",
                  *(() if faults is None else ("" if score is None else f"{score:.1f}",)))
    return t


def _faults_line(faults: "LocalFaults | None") -> str | None:
    """The fault loop's last window: its incidents, actions running, or why it has none."""
    if faults is None:
        return None
    loop = faults.loop
    if loop.error:
        return f"faults: {escape(str(loop.error))}"
    if loop.last is None:
        return "faults: waiting for the first window"
    found = "; ".join(f"{i.kind} {i.target}" for i in loop.last.incidents) or "no incident"
    running = ", ".join(f"{r.action.verb} {r.action.target}" for r in loop.running)
    done = loop.done[-1] if loop.done else None
    last = f"; last action {done.action.verb} {done.action.target}: {done.outcome}" if done else ""
    return escape(f"faults: {found}" + (f"; running {running}" if running else "") + last)


def _power_line(power: LocalPower | None) -> str | None:
    if power is None:
        return None
    last, limit = power.last, power.options.limit_watts
    if last is None:
        return f"power: waiting for the first reading; budget {limit:.0f} W"
    watts = "no reading" if last.reading.watts is None else f"{last.reading.watts:.0f} W"
    return f"power: {watts} of a {limit:.0f} W budget ({last.decision.situation}); {escape(last.decision.summary)}"


def _start_prometheus(procs: list[Member], workdir: Path) -> "PrometheusServer | None":
    """One Prometheus for the power and fault loops alike; None, said why, when it cannot
    start (no binary)."""
    from fleetwise.local_faults import local_prometheus
    from fleetwise.telemetry.prometheus_server import PrometheusUnavailable
    try:
        with console.status("starting Prometheus"):
            return local_prometheus(procs, workdir).start()
    except PrometheusUnavailable as e:
        console.print(f"[red]{e}[/]")
        return None


def _start_power(power: PowerOptions | None, fleet: LocalFleet, workdir: Path,
                 prometheus: "PrometheusServer") -> LocalPower | None:
    if power is None:
        return None
    local_power = LocalPower(power, fleet, workdir, prometheus).start()
    console.print(f"power: budget {power.limit_watts:.0f} W, Prometheus {prometheus.url}")
    return local_power


def _print_admin(admin: "LocalAdmin") -> None:
    """The admin API's address and its new admin token, shown this once (it is also in the workdir, 0600)."""
    moved = f" (port {admin.moved_from} was taken)" if admin.moved_from else ""
    console.print(f"  admin API {admin.url}/api/v1{moved}; admin token, shown once: "
                  f"{escape(admin.token_file.read_text().strip())} (also in {admin.token_file})")


def _start_faults(fleet: LocalFleet, procs: list[Member], workdir: Path, window: int,
                  prometheus: "PrometheusServer") -> "LocalFaults":
    """The fault loop over the fleet (`local_faults.py`)."""
    from fleetwise.local_faults import local_policy, start_local_faults
    faults = start_local_faults(fleet, procs, workdir, local_policy(window), prometheus=prometheus)
    console.print(f"  fault detection every {window} s (Prometheus {faults.prometheus.url}); "
                  f"scores and incidents in {workdir / 'faults.json'}, actions in {workdir / 'logs' / 'actions.log'}")
    return faults


def stop_fleet(procs: list[Member], grace: float = 10.0) -> None:
    """The router first (no new requests), then the workers; SIGTERM, then SIGKILL."""
    stop_all([[p for p in procs if p.role == "router"], [p for p in procs if p.role != "router"]], grace)


def _model_dir(model: Path | None, workdir: Path) -> Path | None:
    """The model to serve: the one given, or a tiny random one written once into the work
    directory; None (after saying why) when the directory holds no model."""
    from fleetwise.worker.model.files import write_model
    if model is None:
        model = workdir / "models" / "tiny"
        if not (model / "config.json").exists():
            with console.status("writing the tiny model"):
                write_model(model, "tiny", seed=0)
            console.print(f"wrote a tiny random model to {model}")
    if not (Path(model) / "config.json").exists():
        console.print(f"[red]{model} is not a model directory (no config.json)[/]")
        return None
    return Path(model)


def _supervise(procs: list[Member], fleet: LocalFleet, workdir: Path, stopping: list[int],
               local_power: LocalPower | None, faults: "LocalFaults | None" = None) -> None:
    """The live table until a signal; a worker that died starts again (the router takes it back
    once its probe passes); one drained or being restarted by the fleet stays as the fleet left it."""
    restarts = Restarts()
    with Live(_table(procs, fleet, local_power, faults), console=console, refresh_per_second=2) as live:
        while not stopping:
            for again in restarts.tick(procs, time.monotonic(), fleet.stopped_on_purpose):
                live.console.print(f"[yellow]{again.name} exited; started again "
                                   f"(restart {restarts.count[again.name]})[/]")
                (workdir / "pids.json").write_text(json.dumps({p.name: p.pid for p in procs}))
            for p in procs:
                _poll(p)
            live.update(_table(procs, fleet, local_power, faults))
            time.sleep(1.0)


def run(model: Path | None, mode: str, port: int, prefill: int, decode: int, mixed: int, workdir: Path,
        worker_args: list[str], ready_timeout: float = 180.0, power: PowerOptions | None = None,
        admin_port: int = 8081, fault_window_seconds: int | None = None) -> int:
    """`power`: run the power controller over the fleet (each worker a modelled GPU);
    `fault_window_seconds`: run the fault detector with this window."""
    if power is not None and not prometheus_available():
        from fleetwise.telemetry.prometheus_server import INSTALL_HINT
        console.print(f"[red]--power-limit-watts needs Prometheus, and there is no `prometheus` on PATH: "
                      f"{INSTALL_HINT}[/]")
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    model = _model_dir(model, workdir)
    if model is None:
        return 2
    if not port_free(port):
        console.print(f"[red]port {port} is in use; choose another with --port[/]")
        return 2
    name = Path(model).name
    token_file = write_token(workdir)
    procs = plan(Path(model).resolve(), name, mode, port, prefill, decode, mixed, workdir, worker_args,
                 token_file, {role: ["--modelled-gpu", gpu] for role, gpu in (power.products if power else {}).items()})
    fleet = LocalFleet(name, procs, workdir / "router.yaml", workdir / "logs" / "actions.log",
                       token=token_file.read_text().strip())
    local_power: LocalPower | None = None
    from fleetwise.admin.local import LocalAdmin, start_local
    admin: LocalAdmin | None = None
    faults: LocalFaults | None = None
    prometheus: PrometheusServer | None = None

    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        if admin_port:
            admin = start_local(fleet, workdir, admin_port)
        (workdir / "pids.json").write_text(json.dumps({p.name: p.pid for p in procs}))
        with console.status("starting the fleet") as status:
            try:
                wait_healthy(procs, ready_timeout, ready=_ready, cancelled=lambda: bool(stopping),
                             on_progress=lambda n, total: status.update(f"starting the fleet: {n}/{total} healthy"))
            except ProcessError as e:
                for failed in e.procs:
                    console.print(f"[red]{failed.name} {'exited' if failed.exited is not None else 'not healthy'}; "
                                  f"last lines of {failed.log}:[/]\n" + failed.tail(15))
                return 1
        if stopping:
            return 130
        if power is not None or fault_window_seconds is not None:
            if (prometheus := _start_prometheus(procs, workdir)) is None:
                return 2
            if fault_window_seconds is not None:
                faults = _start_faults(fleet, procs, workdir, fault_window_seconds, prometheus)
            local_power = _start_power(power, fleet, workdir, prometheus)
        router = procs[-1].url
        console.print(f"[green]fleet ready[/] ({mode}): router {router}  (logs in {workdir / 'logs'})")
        console.print(f"  curl -s {router}/v1/completions -H 'content-type: application/json' \\\n"
                      f"    -d '{{\"model\": \"{name}\", \"prompt\": \"hello\", \"max_tokens\": 16}}'")
        if admin is not None:
            _print_admin(admin)
        console.print("  Ctrl-C stops everything.")
        _supervise(procs, fleet, workdir, stopping, local_power, faults)
        return 0
    finally:
        with console.status("stopping the fleet"):
            if local_power is not None:
                local_power.stop()
            if admin is not None:
                admin.stop()
            if faults is not None:
                faults.stop()
            if prometheus is not None:  # after both loops
                prometheus.stop()
            stop_fleet(procs)
        for s, handler in old.items():
            signal.signal(s, handler)
        console.print("fleet stopped")
