"""`fleetwise bench goodput`: SLO goodput of fleetwise's router against vllm-router's policies
on one fleet of real workers, under a prefix-skewed workload (workload.py).

Two fleets (`fleet`): `modelled` (the default), workers whose engine, HTTP API and metrics are
the real ones but whose device is a modelled GPU (worker/engine/modelled_device.py: each step
waits out a 70B model's time on that GPU, no forward pass), so the CPU share a worker gets on
a shared machine no longer sets its speed; and `cpu`, the small model's real forward pass on
the CPU, where it does (goodput moved by up to 10x between repeats).

One fleet of mixed workers serves every system: the
fleetwise router under its policy, and vllm-router under `cache_aware`, `power_of_two` and
`round_robin`, each its own process, all up from the start. Each repeat first measures the
fleet's capacity: a closed loop straight to the workers (the client round-robins; no router).
Then, for each offered load (a multiple of that capacity), every system in turn (the order
turning by one each time) gets the same arrivals and lengths with system prompts of its own
words, so none finds the caches warmed by another. Goodput is the rate of requests that met
both the TTFT and the TPOT target. The result goes to `OUT/goodput.json` and
`OUT/goodput.png`; see bench/README.md.
"""

import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fleetwise.bench.goodput.load import SLO, closed_loop, open_loop
from fleetwise.bench.goodput.report import System, build_report, plot, print_summary
from fleetwise.bench.goodput.workload import MODELLED, Shape, read_code_lengths, turn_requests
from fleetwise.bench.harness import make_console, progress, save_plot, write_json, wrote
from fleetwise.bench.models import preset_model
from fleetwise.bench.router.backend import run_loop
from fleetwise.bench.router.systems import ensure_vllm_router, environment
from fleetwise.bench.targets import SLO_TPOT_S, SLO_TTFT_S
from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, fleetwise_argv, stop_all, wait_healthy

VLLM_POLICIES = ("cache_aware", "power_of_two", "round_robin")
SEED = 0
READY_TIMEOUT_S = 120.0
CAPACITY_S = 20.0             # the closed loop that measures the fleet's capacity
WARMUP_SHARE = 0.2            # of each turn: arrivals then are sent but not counted
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODELLED_GPU, MODELLED_FORWARD = "A100", "llama2-70b:tp2"   # the modelled fleet's workers
MODELLED_CONTEXT = 8192       # the modelled fleet's tokenizer model: room for MODELLED's prompts


@dataclass(frozen=True)
class FleetKind:
    """What the workers are: their extra flags, the workload and the default SLO."""
    name: str
    worker_args: tuple[str, ...]
    shape: Shape
    ttft_s: float
    tpot_s: float
    context: int | None = None   # the tokenizer model's context (None: the preset's)
    clients_per_worker: int = 3  # the capacity's closed loop: enough to keep a worker busy


FLEETS = {
    "modelled": FleetKind("modelled", ("--modelled-gpu", MODELLED_GPU, "--modelled-forward", MODELLED_FORWARD),
                          MODELLED, 1.0, 0.15, MODELLED_CONTEXT, 8),
    "cpu": FleetKind("cpu", ("--device", "cpu", "--dtype", "float32"), Shape(), SLO_TTFT_S, SLO_TPOT_S),
}


class Fleet:
    """The workers and the routers of one run, each a child process with its log."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.workers: list[Process] = []
        self.routers: list[Process] = []

    def start(self, name: str, argv: list[str], url: str, env: dict[str, str]) -> Process:
        return Process(name, argv, self.logdir / f"{name.replace('/', '_')}.log", url, env=env,
                       die_with_parent=True).start()

    def start_workers(self, model: Path, n: int, token: Path, args: list[str]) -> list[tuple[str, str]]:
        """(public, internal) URL of each worker, once all answer."""
        urls = []
        for k in range(n):
            port, internal = free_port(), free_port()
            p = self.start(f"worker{k}", fleetwise_argv(
                "worker", "--model", str(model), "--port", str(port), "--internal-port", str(internal),
                "--internal-token-file", str(token), *args), f"http://127.0.0.1:{port}", ONE_THREAD)
            self.workers.append(p)
            urls.append((p.url, f"http://127.0.0.1:{internal}"))
        wait_healthy(self.workers, READY_TIMEOUT_S)
        return urls

    def start_router(self, name: str, argv: list[str], port: int) -> Process:
        p = self.start(name, argv, f"http://127.0.0.1:{port}", {"PYTHONUNBUFFERED": "1"})
        self.routers.append(p)
        return p

    def stop(self) -> None:
        stop_all([self.routers, self.workers], grace=3.0)


def _systems(fleet: Fleet, model_name: str, urls: list[tuple[str, str]], token: Path, policies: list[str],
             vllm_cmd: list[str] | None) -> list[System]:
    cfg = fleet.logdir / "router.yaml"
    cfg.write_text(f"models:\n  - name: {model_name}\n    mixed:\n" + "".join(f"      - {i}\n" for _, i in urls))
    systems = []
    for policy in policies:
        port = free_port()
        p = fleet.start_router(f"fleetwise/{policy}", fleetwise_argv(
            "router", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--internal-token-file", str(token)), port)
        systems.append(System(f"fleetwise/{policy}", p.url + "/v1/completions", p))
    for policy in VLLM_POLICIES if vllm_cmd else ():
        assert vllm_cmd is not None
        port, port2 = free_port(), free_port()
        p = fleet.start_router(f"vllm-router/{policy}", [
            *vllm_cmd, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *[u for u, _ in urls],
            "--policy", policy, "--prometheus-port", str(port2), "--worker-startup-check-interval", "1",
            "--worker-startup-timeout-secs", "60", "--log-level", "warning"], port)
        systems.append(System(f"vllm-router/{policy}", p.url + "/v1/completions", p))
    wait_healthy([s.proc for s in systems], READY_TIMEOUT_S, ready=lambda p: _answers(p.url, model_name))
    return systems


def _kv_cache(kind: FleetKind, kv_cache_mib: int) -> str:
    if kind.name == "cpu":
        return f"{kv_cache_mib} MiB"
    from fleetwise.sim.perf import perf_model
    from fleetwise.worker.engine.modelled_device import parse_forward
    return f"{perf_model(MODELLED_GPU, *parse_forward(MODELLED_FORWARD)).kv_capacity_tokens} tokens"


def _answers(url: str, model_name: str) -> bool:
    from fleetwise.procs import answers_200
    return answers_200(url + "/v1/completions", f'{{"model": "{model_name}", "prompt": "the", "max_tokens": 1}}'
                       .encode(), timeout=10.0)


def _capacity(urls: list[tuple[str, str]], kind: FleetKind, lengths: tuple, model_name: str, repeat: int) -> float:
    """Requests/s the fleet completes for a closed loop straight to the workers (no router)."""
    reqs = turn_requests(kind.shape, lengths, 1.0, 400.0, SEED, turn=100_000 + repeat, words=0)
    done, window = run_loop(closed_loop([u + "/v1/completions" for u, _ in urls], reqs, model_name,
                                        kind.clients_per_worker * len(urls), CAPACITY_S))
    return done / window


def _measure(systems: list[System], urls: list[tuple[str, str]], kind: FleetKind, lengths: tuple, model_name: str,
             loads: list[float], seconds: float, repeats: int, slo: SLO, console: Console) -> list[float]:
    """Each repeat: the fleet's capacity again (the machine's other load moves it), then every
    load, each system in turn. The capacities measured."""
    capacities = []
    with progress(console, unit="turns") as bar:
        task = bar.add_task("systems' turns", total=repeats * len(loads) * len(systems))
        for r in range(repeats):
            capacity = _capacity(urls, kind, lengths, model_name, r)
            capacities.append(capacity)
            console.print(f"repeat {r}: capacity {capacity:.2f} requests/s (closed loop, "
                          f"{kind.clients_per_worker * len(urls)} clients, no router)")
            for li, load in enumerate(loads):
                n = r * len(loads) + li
                for j in range(len(systems)):
                    k = (n + j) % len(systems)
                    s = systems[k]
                    reqs = turn_requests(kind.shape, lengths, load * capacity, seconds, SEED, turn=1 + n, words=k)
                    outcomes, span = run_loop(open_loop(s.url, reqs, model_name))
                    counted = [o for q, o in zip(reqs, outcomes) if q.at >= WARMUP_SHARE * seconds]
                    s.add(li, counted, seconds * (1 - WARMUP_SHARE), slo, span)
                    bar.advance(task)
                    console.print(f"repeat {r} load {load:.2f}x ({load * capacity:.2f}/s) {s.key}: "
                                  f"goodput {s.goodput[li][-1]:.2f}/s, {s.attainment[li][-1]:.0%} within the SLO")
    return capacities


def run_goodput_bench(out: Path = Path("bench/results"), preset: str = "small", workers: int = 4,
                      loads: list[float] | None = None, seconds: float = 30.0, repeats: int = 3,
                      ttft_s: float | None = None, tpot_s: float | None = None, kv_cache_mib: int = 64,
                      policies: list[str] | None = None, trace: Path | None = None,
                      skip_vllm_router: bool = False, fleet_kind: str = "modelled") -> dict:
    """Writes OUT/goodput.json and OUT/goodput.png (the cpu fleet: goodput-cpu.*) and returns
    the report. The SLO's targets default to the fleet's."""
    console = make_console(160)
    loads = loads or [0.5, 0.75, 1.0, 1.2]
    policies = policies or ["prefix_load"]
    if workers < 1 or seconds <= 0 or repeats < 1 or min(loads) <= 0:
        raise ValueError("workers, seconds, repeats and loads must be positive")
    if fleet_kind not in FLEETS:
        raise ValueError(f"fleet must be one of {', '.join(FLEETS)}; got {fleet_kind!r}")
    kind = FLEETS[fleet_kind]
    args = [*kind.worker_args] + (["--kv-cache-mib", str(kv_cache_mib)] if kind.name == "cpu" else [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape, slo = kind.shape, SLO(ttft_s or kind.ttft_s, tpot_s or kind.tpot_s)
    lengths = read_code_lengths(trace)
    model = preset_model(out, preset, console, kind.context)
    vllm_cmd, why, vllm_version = (None, "--skip-vllm-router", None) if skip_vllm_router \
        else ensure_vllm_router(console)
    if why:
        console.print(f"[yellow]vllm-router left out: {why}[/yellow]")
    from fleetwise.up import write_token
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="fleetwise-bench-goodput-")))
    old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    try:
        token = write_token(fleet.logdir)
        urls = fleet.start_workers(model, workers, token, args)
        systems = _systems(fleet, model.name, urls, token, policies, vllm_cmd)
        console.print(f"{workers} {kind.name} workers ({' '.join(args)}), {len(systems)} systems")
        for s in systems:
            s.init(len(loads))
        capacities = _measure(systems, urls, kind, lengths, model.name, loads, seconds, repeats, slo, console)
    except ProcessError as e:
        raise SystemExit(f"error: {e}")
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, old_term)
    report = build_report(systems, loads, capacities, seconds, repeats, slo, shape, WARMUP_SHARE,
                          {"kind": kind.name, "capacity_clients_per_worker": kind.clients_per_worker,
                           "workers": workers, "preset": preset, "worker_args": args,
                           "kv_cache": _kv_cache(kind, kv_cache_mib), "torch_threads_per_worker": 1,
                           "vllm_router": vllm_version},
                          environment(vllm_version))
    stem = "goodput" if kind.name == "modelled" else "goodput-cpu"
    json_path = write_json(out / f"{stem}.json", report)
    png_path = save_plot(lambda p: plot(report, p), out / f"{stem}.png", console)
    print_summary(console, report)
    shutil.rmtree(fleet.logdir, ignore_errors=True)
    wrote(console, json_path, png_path)
    return report


