"""`fleetwise bench router`: the latency the router adds and the rate it sustains.

Fast stand-in backends (an OpenAI-completions-shaped HTTP server that answers at once with
a small fixed completion, one process each) take the requests. The same load goes

  direct             straight to the backends (the client round-robins over them)
  fleetwise/POLICY   through `fleetwise router` over the same backends: prefix_load
                     (its default), round_robin and least_outstanding
  vllm-router        through `vllm-router` (the Rust router, round_robin) over them
  vllm-router/cache_aware  the same with its default policy, prefix-aware as fleetwise's default

First an open loop: Poisson arrivals at `rate` requests/s, `seconds` of them per system,
the same seeded schedule and bodies for all. Then a closed loop for the rate each one
sustains: a fixed number of clients, each sending its next request when its last one has
returned. Every server is its own process, all of them up from the start; the load
generator is this process. The systems take turns in short rounds (the same slice of the
schedule each, the order turning every round), so load on the machine from elsewhere falls
on all of them alike. A router's overhead is its latency percentile minus the direct one.
The result goes to `OUT/router.json` and `OUT/router.png`; see bench/README.md. The backend,
the load, the systems' turns and the report each have their module in bench/router/; this
one starts the servers, runs the turns and writes the result.
"""

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from fleetwise.bench.harness import make_console, progress, save_plot, write_json, wrote
from fleetwise.bench.router.backend import run_loop
from fleetwise.bench.router.cases import (
    OWN_RUN,
    Cases,
    case_bodies,
    make_cases,
    plot_cases,
    print_case,
    router_config,
    run_case,
    start_case,
    tracker_cost,
)
from fleetwise.bench.router.load import make_bodies, poisson_schedule, split_schedule
from fleetwise.bench.router.report import (
    BASELINE,
    DEFAULT_POLICY,
    FLOOR,
    FLOOR_IDS,
    NUM_BACKENDS,
    POLICIES,
    VLLM_ROUTER_DEFAULT,
    VLLM_ROUTERS,
    build_report,
    plot,
    print_notes,
    print_summary,
)
from fleetwise.bench.router.systems import (
    SEED,
    System,
    ensure_vllm_router,
    environment,
    machine_cpu,
    measure_all,
    ours_cpu,
)
from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, answers_200, fleetwise_argv, stop_all, wait_healthy

ROUND_S = 2.0                 # open loop: each system's turn in a round
CLOSED_ROUND_S = 1.0          # closed loop: each system's turn in a round
CLOSED_LOOP_MAX_S = 5.0
READY_TIMEOUT_S = 60.0


class Servers:
    """The servers of one run, by name: each its own process with its log in `logdir`,
    ending with the benchmark even if it is killed outright. Each imports fleetwise from its
    interpreter's install, never from the working directory (`PYTHONSAFEPATH`): run from a
    checkout, `python -m fleetwise` would otherwise import the checkout's code, and a
    `--baseline-python` router would run the code it is compared with."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, Process] = {}

    def start(self, name: str, argv: list[str], url: str) -> Process:
        p = Process(name, argv, self.logdir / f"{name.replace('/', '_')}.log", url,
                    env={"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}, die_with_parent=True).start()
        self.procs[name] = p
        return p

    def wait_ready(self, name: str, body: bytes) -> float:
        """Until a completion through the server succeeds; the seconds it took."""
        return wait_healthy([self.procs[name]], READY_TIMEOUT_S, interval=0.1,
                            ready=lambda p: answers_200(p.url + "/v1/completions", body, timeout=2.0))

    def stop(self, name: str) -> None:
        self.procs.pop(name).stop(grace=3.0)

    def stop_all(self) -> None:
        """The routers first, then the backends."""
        backends = [p for name, p in self.procs.items() if name.startswith("backend")]
        stop_all([[p for p in self.procs.values() if p not in backends], backends], grace=3.0)


def start_backends(servers: Servers, bodies: list[bytes], n: int = NUM_BACKENDS) -> list[str]:
    """`n` stand-in backends up and answering; their URLs."""
    backends = []
    for k in range(n):
        port = free_port()
        servers.start(f"backend{k}", [sys.executable, "-m", "fleetwise.bench.router", "backend", "--port", str(port)],
                      f"http://127.0.0.1:{port}")
        backends.append(f"http://127.0.0.1:{port}")
    for k in range(n):
        servers.wait_ready(f"backend{k}", bodies[0])
    return backends


def _plan(cfg: Path, backends: list[str], vllm_cmd: list[str] | None, vllm_version: str | None,
          baseline_python: str | None = None) -> list[tuple[str, str, list[str] | None]]:
    """(key, label, command with {port} and {port2} to fill in) of every system; None: direct.
    fleetwise's router calls workers' internal listeners with the shared token: it gets one
    (the stand-in backends do not check it)."""
    from fleetwise.up import write_token
    token = write_token(cfg.parent)
    plan: list[tuple[str, str, list[str] | None]] = [
        ("direct", "direct to the backends (client round-robin)", None)]
    for policy in POLICIES:
        plan.append((f"fleetwise/{policy}", f"fleetwise router, {policy}"
                     + (" (its default)" if policy == DEFAULT_POLICY else ""),
                     fleetwise_argv("router", "--config", str(cfg), "--host", "127.0.0.1",
                                    "--port", "{port}", "--policy", policy, "--internal-token-file", str(token))))
    if baseline_python:
        plan.append((BASELINE, f"fleetwise router of {baseline_python}, its default policy",
                     [baseline_python, "-m", "fleetwise", "router", "--config", str(cfg), "--host", "127.0.0.1",
                      "--port", "{port}", "--internal-token-file", str(token)]))
    floor = [sys.executable, "-m", "fleetwise.bench.router", "floor", "--port", "{port}",
             *(a for b in backends for a in ("--backend", b))]
    plan.append((FLOOR, "reference: a bare Python proxy (protocol callbacks, no routing), answers passed whole", floor))
    plan.append((FLOOR_IDS, "reference: the bare proxy with migration's per-token work (ids kept, answer assembled)",
                 [*floor, "--ids"]))
    if vllm_cmd:
        for key, policy in VLLM_ROUTERS.items():
            plan.append((key, f"vllm-router {vllm_version}, {policy}"
                         + (" (its default)" if policy == VLLM_ROUTER_DEFAULT else ""),
                         [*vllm_cmd, "--host", "127.0.0.1", "--port", "{port}", "--worker-urls", *backends,
                          "--policy", policy, "--prometheus-port", "{port2}",
                          "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "60",
                          "--log-level", "warning"]))
    return plan


def _start_systems(servers: Servers, bodies: list[bytes], vllm_cmd: list[str] | None, vllm_version: str | None,
                   skipped: dict[str, System], console: Console, baseline_python: str | None = None) -> list[System]:
    """The backends, then every system up and answering, before any measurement."""
    backends = start_backends(servers, bodies)
    cfg = servers.logdir / "router.yaml"
    router_config(cfg, backends)
    systems: list[System] = []
    for key, label, argv in _plan(cfg, backends, vllm_cmd, vllm_version, baseline_python):
        if argv is None:
            systems.append(System(key, label, [b + "/v1/completions" for b in backends]))
            continue
        port, port2 = free_port(), free_port()
        argv = [a.replace("{port}", str(port)).replace("{port2}", str(port2)) for a in argv]
        p = servers.start(key, argv, f"http://127.0.0.1:{port}")
        systems.append(System(key, label, [f"{p.url}/v1/completions"], pid=p.pid, command=argv))
    for s in list(systems):
        if s.pid is None:
            continue
        try:
            s.startup_s = servers.wait_ready(s.key, bodies[0])
        except ProcessError as e:
            if s.key not in VLLM_ROUTERS:
                raise
            console.print(f"[yellow]{s.key} left out: {e}[/yellow]")
            servers.stop(s.key)
            systems.remove(s)
            s.skipped = f"did not start: {str(e).splitlines()[0]}"
            skipped[s.key] = s
    return systems


def _n(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def _measure(servers: Servers, systems: list[System], bodies: list[bytes], parts: list[tuple[np.ndarray, float]],
             closed_rounds: int, closed_round_s: float, console: Console) -> dict:
    """All the rounds; what the machine's CPUs did meanwhile."""
    with progress(console, percent=True, auto_refresh=False) as bar:
        m0, w0 = machine_cpu(), time.perf_counter()
        ours0 = ours_cpu(list(servers.procs.values()))
        run_loop(measure_all(systems, bodies, parts, closed_rounds, closed_round_s, bar))
        m1, w1, ours1 = machine_cpu(), time.perf_counter(), ours_cpu(list(servers.procs.values()))
    if not (m0 and m1):
        return {}
    wall = w1 - w0
    machine = {"wall_s": wall, "busy_cores": (m1[0] - m0[0]) / wall, "steal_cores": (m1[1] - m0[1]) / wall,
               "this_benchmark_cores": (ours1 - ours0) / wall}
    machine["other_load_cores"] = machine["busy_cores"] - machine["this_benchmark_cores"]
    return machine


def _run_cases(extra: Cases, bodies: list[bytes], vllm_cmd: list[str] | None, console: Console,
               baseline_python: str | None = None) -> dict:
    """Each further case over its own backends, its servers stopped before the next starts."""
    from fleetwise.up import write_token
    cases = make_cases(extra.rate, extra.stream_rate, extra.tokens, extra.itl_ms, extra.fail_every)
    out: dict = {}
    for name in extra.names:
        if name in OWN_RUN:
            continue
        case = cases[name]
        servers = Servers(Path(tempfile.mkdtemp(prefix=f"fleetwise-bench-router-{name}-")))
        token = write_token(servers.logdir)
        cbodies = case_bodies(case, bodies)
        rounds = max(1, round(extra.seconds / ROUND_S))
        closed_rounds = max(1, round(min(CLOSED_LOOP_MAX_S, max(1.0, extra.seconds / 2)) / CLOSED_ROUND_S))
        try:
            systems = start_case(case, servers, cbodies, token, vllm_cmd, console, baseline_python)
            console.print(f"case {name}: {len(systems)} systems up, {case.rate:g} req/s")
            out[name] = run_case(case, systems, cbodies, extra.seconds, rounds, closed_rounds, CLOSED_ROUND_S,
                                 console)
        finally:
            servers.stop_all()
            shutil.rmtree(servers.logdir, ignore_errors=True)
        print_case(console, name, out[name])
    return out


def run_router_bench(out: Path = Path("bench/results"), rate: int = 500, seconds: float = 10.0,
                     skip_vllm_router: bool = False, extra: Cases | None = None,
                     baseline_python: str | None = None) -> dict:
    """Direct, fleetwise router (each policy) and vllm-router over the same stand-in backends;
    then the further cases (`extra`: streams, the handoff, retries); writes OUT/router.json,
    OUT/router.png and OUT/router_cases.png and returns the report."""
    console = make_console(180)
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bodies = make_bodies(SEED)
    schedule = poisson_schedule(rate, seconds, SEED)
    open_rounds = max(1, round(seconds / ROUND_S))
    parts = split_schedule(schedule, seconds, open_rounds)
    closed_s = min(CLOSED_LOOP_MAX_S, max(1.0, seconds / 2))
    closed_rounds = max(1, round(closed_s / CLOSED_ROUND_S))
    closed_round_s = closed_s / closed_rounds

    vllm_cmd, vllm_skip, vllm_version = (None, "--skip-vllm-router", None) if skip_vllm_router \
        else ensure_vllm_router(console)
    if vllm_skip and not skip_vllm_router:
        console.print(f"[yellow]vllm-router baseline left out: {vllm_skip}[/yellow]")
    env = environment(vllm_version)
    if env["cpus_usable"] and env["cpus_usable"] < 4:
        console.print(f"[yellow]{env['cpus_usable']} CPUs: the load generator, the routers and the backends share "
                      f"them; latencies include that contention, alike for every system[/yellow]")

    skipped: dict[str, System] = {}
    if not vllm_cmd:
        skipped.update({k: System(k, k, [], skipped=vllm_skip) for k in VLLM_ROUTERS})
    servers = Servers(Path(tempfile.mkdtemp(prefix="fleetwise-bench-router-")))
    old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    try:
        systems = _start_systems(servers, bodies, vllm_cmd, vllm_version, skipped, console, baseline_python)
        console.print(f"{NUM_BACKENDS} stand-in backends, {len(systems)} systems up; "
                      f"{_n(open_rounds, 'open-loop round')} of {seconds / open_rounds:.1f} s and "
                      f"{_n(closed_rounds, 'closed-loop round')} of "
                      f"{closed_round_s:.1f} s each, the systems taking turns")
        machine = _measure(servers, systems, bodies, parts, closed_rounds, closed_round_s, console)
    finally:
        servers.stop_all()
        signal.signal(signal.SIGTERM, old_term)

    runs = {s.key: s for s in systems}
    report = build_report(runs, skipped, rate, seconds, parts, closed_rounds, closed_round_s, bodies, env, machine)
    shutil.rmtree(servers.logdir, ignore_errors=True)
    console.rule("summary")
    print_summary(console, report)
    print_notes(console, report)
    if extra is not None and extra.names:
        console.rule("further cases")
        report["cases"] = _run_cases(extra, bodies, vllm_cmd, console, baseline_python)
        report["migration_per_token"] = tracker_cost()
        t = report["migration_per_token"]
        console.print(f"migration's per-token work (Tracker.feed, in process): {t['tracker_us_per_event']:.2f} µs "
                      f"per event against {t['pass_through_us_per_event']:.2f} µs passed through")
        save_plot(lambda p: plot_cases(report["cases"], p), out / "router_cases.png", console)
        if "migrate" in extra.names:
            from fleetwise.bench.router.migration import plot_migration, run_migration
            report["migration"] = run_migration(out, console)
            save_plot(lambda p: plot_migration(report["migration"], p), out / "router_migration.png", console)
    json_path = write_json(out / "router.json", report)
    png_path = save_plot(lambda p: plot(report, runs, p), out / "router.png", console)
    wrote(console, json_path, png_path)
    return report
