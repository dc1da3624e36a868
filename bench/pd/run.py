"""`fleetwise bench pd`: prefill/decode disaggregation on one machine.

Two measurements, each against a baseline taken in the same run (bench/pd/kv.py and
bench/pd/e2e.py; the report is bench/pd/report.py, this module starts the fleet and runs them):

  KV transfer   a prompt's keys and values pulled from a prefill worker
                (GET /internal/kv/{handle}) as the decode worker pulls them: blocks reserved
                in a decode worker's paged cache by its KVConnector, the stream checked by
                kv_transfer.pull and written into them by KVConnector.write_kv, against a
                plain loopback TCP copy of the same number of bytes between two processes
                (sendall from one buffer, recv_into another). A third kind of trial only
                reads the same stream off the wire, which splits the pull's time into the
                sender and HTTP on one side and the receiver's checks and copies on the
                other. Trials rotate their order so that load from elsewhere hits all alike.
  end to end    the same prompts through a router over a prefill and a decode worker
                (disaggregated) and through a router over one mixed worker (colocated):
                streamed completions, greedy, EOS ignored, so both do the same work. The two
                modes alternate request by request.

All processes are started here (`python -m fleetwise worker|router`, logs under OUT/logs)
and stopped on the way out. Prompts are random token ids (no special tokens), distinct
per request, so no prefix cache helps either side. When the longest prompt plus the
completion does not fit the preset's context, the model is written again with a longer
`max_position_embeddings` (same seed, same shapes, same weights) and the run says so.

The result goes to OUT/pd.json and OUT/pd.png.
"""

import asyncio
import json
import os
import platform
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from fleetwise.bench.harness import header, make_console, progress, save_plot, target_values, write_json, wrote
from fleetwise.bench.models import kv_bytes_per_token, preset_model
from fleetwise.bench.pd.e2e import MODES, Prompts, complete, e2e_row, kv_counters, measure_e2e
from fleetwise.bench.pd.kv import (
    KV_TRIAL_KINDS,
    MIN_KV_TRIALS,
    DecodeSide,
    SocketCopy,
    kv_trials,
    measure_length,
    overall,
)
from fleetwise.bench.pd.report import TARGET_LENGTH, TARGETS, e2e_notes, kv_notes, plot, print_summary
from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, fleetwise_argv, stop_all, wait_healthy
from fleetwise.router.handoff import KV_EARLY_ENV
from fleetwise.worker.kv.transfer import NEWEST as KV_NEWEST

MAX_TOKENS = 32           # completion tokens per end-to-end request
WARMUP_MAX_TOKENS = 4
KV_CACHE_MIB = 1024       # per worker
MIN_BATCHED_TOKENS = 4096
KV_LEASE_SECONDS = 300.0  # the benchmark pulls one lease several times
READY_TIMEOUT_S = 300.0


@dataclass
class Fleet:
    """The workers (one of each role) and a router per mode."""
    name: str
    prefill: Process
    decode: Process
    mixed: Process
    routers: dict[str, Process] = field(default_factory=dict)
    internal: dict[str, str] = field(default_factory=dict)  # worker name -> its internal listener's URL
    token_file: Path | None = None

    @property
    def workers(self) -> list[Process]:
        return [self.prefill, self.decode, self.mixed]


def server(name: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> Process:
    port = free_port()
    return Process(name, fleetwise_argv(*args, "--port", str(port)), logs / f"{name}.log", f"http://127.0.0.1:{port}",
                   env=env or {})


def plan_fleet(model_dir: Path, worker_args: list[str], out: Path, kv_early: bool = False) -> Fleet:
    """The processes, not yet started; the routers' configs written under OUT. Workers and
    routers share a fresh internal token, as under `fleetwise up`."""
    import yaml

    from fleetwise.up import write_token
    name, logs = model_dir.name, out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    token = ["--internal-token-file", str(write_token(out))]
    internal = {role: free_port() for role in ("prefill", "decode", "mixed")}
    prefill, decode, mixed = (server(role, ["worker", "--model", str(model_dir), "--role", role, *token,
                                            "--internal-port", str(internal[role]), *worker_args], logs)
                              for role in ("prefill", "decode", "mixed"))
    fleet = Fleet(name, prefill, decode, mixed, internal={r: f"http://127.0.0.1:{p}" for r, p in internal.items()},
                  token_file=Path(token[1]))
    configs = {"disaggregated": {"models": [{"name": name, "prefill": [fleet.internal["prefill"]],
                                             "decode": [fleet.internal["decode"]]}]},
               "colocated": {"models": [{"name": name, "mixed": [fleet.internal["mixed"]]}]}}
    for mode, cfg in configs.items():
        path = out / f"router-{mode}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        early = {KV_EARLY_ENV: "1"} if kv_early and mode == "disaggregated" else None  # early handoffs
        fleet.routers[mode] = server(f"router-{mode}", ["router", "--config", str(path), *token], logs, early)
    return fleet


def _model_dir(out: Path, preset: str, need: int, console: Console) -> tuple[Path, dict]:
    """The preset's model, with a longer context where `need` tokens do not fit its own."""
    from fleetwise.worker.model.files import PRESETS
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    context = PRESETS[preset].max_position_embeddings
    if need <= context:
        return preset_model(out, preset, console), {"context": context, "context_override": None, "note": None}
    longer = context
    while longer < need:
        longer *= 2
    note = (f"the {preset} preset's context ({context} tokens) does not hold the longest prompt plus "
            f"{MAX_TOKENS} output tokens ({need}); this run writes the {preset} preset with "
            f"max_position_embeddings={longer} (same seed and weights, rope unchanged)")
    return preset_model(out, preset, console, context=longer), {
        "context": longer, "context_override": {"max_position_embeddings": longer}, "note": note}


async def _measure(fleet: Fleet, model_dir: Path, cfg: dict, lengths: list[int], repeats: int,
                   sock: SocketCopy, console: Console) -> dict:
    import httpx

    from fleetwise.worker.model.files import model_id

    prompts = Prompts(model_dir, seed=0)
    trials = max(MIN_KV_TRIALS, repeats)
    notes: list[str] = []
    from fleetwise.protocol import bearer, load_token
    auth = {"Authorization": bearer(load_token(fleet.token_file))}  # the prefill worker's internal listener
    http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0), headers=auth,
                             limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
    side = DecodeSide(str(model_dir), KV_CACHE_MIB, max(MIN_BATCHED_TOKENS, lengths[-1]), auth)
    routers = {m: fleet.routers[m].url for m in MODES}
    per_token = kv_bytes_per_token(cfg)
    steps = (2 * len(lengths) + sum(1 + len(KV_TRIAL_KINDS) * kv_trials(L * per_token, trials) for L in lengths)
             + 2 * len(lengths) * repeats)
    try:
        with progress(console) as bar:
            task = bar.add_task("warm-up", total=steps)
            # warm-up: every length once through both routers (shapes, allocator, connections)
            for L in lengths:
                for mode in MODES:
                    bar.update(task, description=f"warm-up {mode} {L}")
                    await complete(http, routers[mode], fleet.name, prompts.new(L), WARMUP_MAX_TOKENS)
                    bar.advance(task)
            kv_rows = {str(L): await measure_length(http, side, fleet.internal["prefill"], fleet.name,
                                                    model_id(model_dir), prompts.new(L), trials, sock,
                                                    bar, task, notes, fleet.prefill.pid) for L in lengths}
            before = await kv_counters(http, fleet.decode.url)
            runs = await measure_e2e(http, routers, fleet.decode.url, fleet.name, prompts, lengths, repeats,
                                     MAX_TOKENS, bar, task, notes)
            after = await kv_counters(http, fleet.decode.url)
    finally:
        await http.aclose()
        await side.close()

    e2e_rows = {L: e2e_row(by_mode) for L, by_mode in runs.items()}
    target_ratio = e2e_notes(e2e_rows, notes)
    worst = kv_notes(kv_rows, notes)
    decode_view: dict[str, Any] = {k: after[k] - before[k] for k in after}
    decode_view["bps"] = decode_view["bytes"] / decode_view["seconds"] if decode_view["seconds"] > 0 else None
    return {
        "kv_transfer": {"by_length": kv_rows, "overall": overall(kv_rows), "worst_ratio": worst,
                        "decode_worker_during_e2e": decode_view},
        "e2e": {"by_length": e2e_rows, "target_length": TARGET_LENGTH, "target_ratio": target_ratio},
        "targets": {"kv_over_socket": TARGETS["kv_over_socket"].met(worst),
                    "disaggregated_over_colocated_e2e":
                        TARGETS["disaggregated_over_colocated_e2e"].met(target_ratio)},
        "target_values": target_values(TARGETS),
        "notes": notes,
    }


@contextmanager
def running(groups: list[list[Process]], console: Console) -> Iterator[None]:
    """The processes started (the last group first) and healthy; on the way out, also on
    SIGTERM as on Ctrl-C, stopped group after group (routers before the workers they call)."""
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)
    old_term = signal.signal(signal.SIGTERM, on_term)
    procs = [p for group in reversed(groups) for p in group]
    try:
        for p in procs:
            if p.log is not None and p.log.exists():
                p.log.unlink()
            p.start()
        with console.status("starting workers and routers") as status:
            wait_healthy(procs, READY_TIMEOUT_S, interval=0.3, on_progress=lambda n, total: status.update(
                f"starting workers and routers: {n}/{total} healthy"))
        yield
    except ProcessError as e:
        raise SystemExit(f"error: {e}")
    finally:
        with console.status("stopping workers and routers"):
            stop_all(groups)
        signal.signal(signal.SIGTERM, old_term)


def _run_fleet(fleet: Fleet, model_dir: Path, cfg: dict, lengths: list[int], repeats: int, sock_bytes: int,
               console: Console) -> dict:
    """Start the fleet, measure, stop it."""
    with running([list(fleet.routers.values()), fleet.workers], console):
        sock = SocketCopy(sock_bytes)
        try:
            return asyncio.run(_measure(fleet, model_dir, cfg, lengths, repeats, sock, console))
        finally:
            sock.close()


def _print_setup(console: Console, model_dir: Path, cfg: dict, ctx: dict, lengths: list[int], repeats: int,
                 batched: int, load_before: tuple[float, float, float]) -> None:
    console.rule("fleetwise bench pd")
    console.print(f"model {model_dir} ({cfg['num_hidden_layers']} layers, {cfg['num_key_value_heads']} KV "
                  f"heads x {cfg['head_dim']}, context {ctx['context']})")
    if ctx["note"]:
        console.print(f"[yellow]note:[/yellow] {ctx['note']}")
    console.print(f"prompt lengths {lengths}, {repeats} request(s) per length and mode, {MAX_TOKENS} output "
                  f"tokens; workers: KV cache {KV_CACHE_MIB} MiB, max_num_batched_tokens {batched}; "
                  f"load average before start {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    if load_before[0] > 0.5:
        console.print("[yellow]note:[/yellow] the machine is busy with other work; timings may be noisy")


def run_pd_bench(out: Path = Path("bench/results"), preset: str = "small",
                 prompt_lengths: list[int] | None = None, repeats: int = 3, kv_early: bool = False,
                 chunk_tokens: int | None = None) -> dict:
    """Start the fleet, measure, stop it; write OUT/pd.json and OUT/pd.png. Returns the report.
    `kv_early`: the disaggregated router hands over early (the KV streams while the prompt is
    computed); `chunk_tokens`: every worker's token budget per step (chunked prefill), by
    default one step holds the longest prompt."""
    console = make_console(150)
    prompt_lengths = sorted(set(prompt_lengths or [256, 512, 1024, 2048, 4096, 8192]))
    if prompt_lengths[0] < 1:
        raise SystemExit("error: prompt lengths must be at least 1")
    if repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    need = prompt_lengths[-1] + MAX_TOKENS
    model_dir, ctx = _model_dir(out, preset, need, console)
    name = model_dir.name
    if chunk_tokens is not None and chunk_tokens < 1:
        raise SystemExit("error: --chunk-tokens must be at least 1")
    batched = chunk_tokens or max(MIN_BATCHED_TOKENS, need)  # every worker's step budget
    worker_args = ["--kv-cache-mib", str(KV_CACHE_MIB), "--max-num-batched-tokens", str(batched),
                   "--kv-lease-seconds", str(KV_LEASE_SECONDS), "--served-model-name", name]
    fleet = plan_fleet(model_dir, worker_args, out, kv_early)

    load_before = os.getloadavg()
    cfg = json.loads((model_dir / "config.json").read_text())
    _print_setup(console, model_dir, cfg, ctx, prompt_lengths, repeats, batched, load_before)
    measures = _run_fleet(fleet, model_dir, cfg, prompt_lengths, repeats,
                          need * kv_bytes_per_token(cfg) + (1 << 20), console)
    load_after = os.getloadavg()

    import torch
    config = {
        "model_dir": str(model_dir), "model_name": name, "preset": preset, **ctx,
        "prompt_lengths": prompt_lengths, "repeats": repeats, "max_tokens": MAX_TOKENS,
        "kv_cache_mib": KV_CACHE_MIB, "max_num_batched_tokens": batched, "kv_lease_seconds": KV_LEASE_SECONDS,
        "kv_early": kv_early, "worker_args": worker_args, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "kv_trials_per_length": {str(r): measures["kv_transfer"]["by_length"][str(r)]["trials"]
                                 for r in prompt_lengths},
        "request": "streamed /v1/completions through the router, temperature 0, ignore_eos, "
                   "random token-id prompts distinct per request",
        "kv_measure": "GET /internal/kv/{handle} through kv_transfer.pull with the decode worker's client, into "
                      "blocks KVConnector.reserve_kv set aside in a decode worker's paged cache (its engine and "
                      "connector in the benchmark's process), written by KVConnector.write_kv; http_read: the same "
                      "stream only read; baseline: loopback TCP, another process sendall()s the same number of "
                      "bytes, recv_into 4 MiB at a time; trials rotate the order of the three",
        "kv_stream_version": KV_NEWEST,
    }
    if ctx["note"]:
        measures["notes"].insert(0, ctx["note"])
    if max(load_before[0], load_after[0]) > 0.5:
        measures["notes"].append(f"other work ran on the machine (load average {load_before[0]:.2f} before, "
                                 f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs): timings are noisy")
    report = {**header("pd"), **measures, "config": config}
    json_path = write_json(out / "pd.json", report)
    png_path = save_plot(lambda p: plot(report, p), out / "pd.png", console)
    console.rule("summary")
    print_summary(console, report)
    for line in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {line}")
    wrote(console, json_path, png_path)
    return report
