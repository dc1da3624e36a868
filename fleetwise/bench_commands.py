"""`fleetwise bench`: the benchmarks' commands. The benchmarks come with a checkout, not the package."""

import importlib
from collections.abc import Callable
from pathlib import Path

import typer

from fleetwise import gpus

bench_app = typer.Typer(help="Benchmarks that compare against a baseline measured in the same run.",
                        no_args_is_help=True)


def _bench(module: str, name: str) -> Callable[..., None]:
    """A benchmark's entry point. The benchmarks come with a checkout, not with the package."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("fleetwise.bench"):
            raise
        typer.echo("the benchmarks are not part of the installed package; run them from a checkout of the "
                   'repository after `pip install -e ".[dev]"`', err=True)
        raise typer.Exit(2)


def _listed(text: str, param: str, kind: type = int) -> list:
    """A comma-separated option's values; a clear error naming the option otherwise."""
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers, e.g. 0.5,1.0"
        raise typer.BadParameter(f"comma-separated {what}", param_hint=param)


@bench_app.command("core")
def bench_core(
    requests: int = typer.Option(200, "--requests", help="Requests drawn from the Azure conversation trace."),
    preset: str = typer.Option("small", "--preset", help="Model preset to benchmark."),
    model: Path = typer.Option(None, "--model", help="Use this model directory instead of a preset."),
    trace: Path = typer.Option(None, "--trace", help="Azure LLM trace CSV (default: the conversation trace)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    seed: int = typer.Option(0, "--seed"),
    skip: list[str] = typer.Option([], "--skip", help="Baselines to leave out: static, continuous."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs of each system, in rotated order."),
    static_batch_sizes: str = typer.Option("4,8,16,32,64", "--static-batch-sizes",
                                           help="Comma-separated batch sizes of the static baseline's sweep."),
    threads: int = typer.Option(None, "--threads", min=1, help="torch threads for every system (default: torch's)."),
):
    """Throughput and latency of the core against transformers, on trace-shaped requests."""
    sizes = tuple(_listed(static_batch_sizes, "--static-batch-sizes"))
    run_core_bench = _bench("fleetwise.bench.core.run", "run_core_bench")
    run_core_bench(requests=requests, preset=preset, model=model, trace=trace, out=out, seed=seed, skip=skip,
                   repeats=repeats, static_batch_sizes=sizes, threads=threads)


@bench_app.command("pd")
def bench_pd(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    preset: str = typer.Option("small", "--preset", help="Model preset."),
    prompt_lengths: str = typer.Option("256,512,1024,2048,4096,8192", "--prompt-lengths",
                                       help="Comma-separated prompt lengths."),
    repeats: int = typer.Option(3, "--repeats", help="Requests per prompt length and mode."),
    kv_early: bool = typer.Option(False, "--kv-early", help="Early handoffs: the KV streams while the prompt is "
                                                            "computed (the router's FLEETWISE_KV_EARLY=1)."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help="Every worker's token budget per step (chunked "
                                                                  "prefill); default: the longest prompt in one."),
):
    """KV transfer throughput vs a raw socket copy; disaggregated vs colocated end-to-end latency."""
    run_pd_bench = _bench("fleetwise.bench.pd.run", "run_pd_bench")
    run_pd_bench(out=out, preset=preset, prompt_lengths=_listed(prompt_lengths, "--prompt-lengths"), repeats=repeats,
                 kv_early=kv_early, chunk_tokens=chunk_tokens)


@bench_app.command("pd-early")
def bench_pd_early(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    prompt_lengths: str = typer.Option("1024,2048,4096", "--prompt-lengths", help="Comma-separated prompt lengths."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Requests per prompt length, mode and chunk budget."),
    chunk_tokens: str = typer.Option("256,512,2048", "--chunk-tokens",
                                     help="Comma-separated token budgets per step (chunked prefill), a fleet each."),
    modelled_gpu: str = typer.Option("A100", "--modelled-gpu", help="The modelled workers' GPU product."),
    modelled_forward: str = typer.Option("llama2-70b:tp2", "--modelled-forward",
                                         help="The modelled workers' MODEL:tpN; their KV cache has its shape."),
):
    """TTFT of colocated, late and early handoffs on modelled workers carrying the model's real KV size."""
    run = _bench("fleetwise.bench.pd.early", "run_pd_early_bench")
    run(out=out, lengths=_listed(prompt_lengths, "--prompt-lengths"), repeats=repeats,
        chunk_tokens=_listed(chunk_tokens, "--chunk-tokens"), gpu=modelled_gpu, forward=modelled_forward)


@bench_app.command("pd-load")
def bench_pd_load(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    preset: str = typer.Option("small", "--preset", help="Model preset."),
    requests: int = typer.Option(24, "--requests", min=2, help="Trace requests per load."),
    loads: str = typer.Option(None, "--loads",
                              help="Comma-separated loads, as multiples of two workers' unbatched rate "
                                   "(default: 1,2,4,8 on the modelled fleet, 0.5,1,2,4 on the cpu one)."),
    trace_start: int = typer.Option(0, "--trace-start", min=0, help="The trace row to start from."),
    fleet: str = typer.Option("modelled", "--fleet",
                              help="modelled: the real engine and KV handoff with Llama-2-70B's step times on "
                                   "A100s (pd_load.*); cpu: the small model's forward pass, a core per worker "
                                   "(pd_load-cpu.*)."),
    modelled_gpu: str = typer.Option("A100", "--modelled-gpu", help="The modelled fleet's GPU product."),
    modelled_forward: str = typer.Option("llama2-70b:tp2", "--modelled-forward",
                                         help="The modelled fleet's MODEL:tpN (others write pd_load-GPU-MODEL-tpN.*)."),
):
    """1 prefill + 1 decode worker vs 2 mixed workers under bursty trace arrivals: TBT and TTFT."""
    if fleet not in ("modelled", "cpu"):
        raise typer.BadParameter("modelled or cpu", param_hint="--fleet")
    multipliers = _listed(loads, "--loads", float) if loads else None
    if multipliers is not None and (not multipliers or min(multipliers) <= 0):
        raise typer.BadParameter("positive numbers", param_hint="--loads")
    run = _bench("fleetwise.bench.pd.load_run", "run_pd_load_bench")
    run(out=out, preset=preset, requests=requests, multipliers=multipliers, trace_start=trace_start, fleet=fleet,
        modelled_gpu=modelled_gpu, modelled_forward=modelled_forward)


@bench_app.command("router")
def bench_router(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    rate: int = typer.Option(500, "--rate", help="Requests per second offered."),
    seconds: float = typer.Option(10.0, "--seconds", help="Duration of each run."),
    skip_vllm_router: bool = typer.Option(False, "--skip-vllm-router", help="Leave out the vllm-router baseline."),
    cases: str = typer.Option("stream,whole,handoff,retry,migrate", "--cases",
                              help="Further cases after the first: stream, whole, handoff, retry, migrate "
                                   "(comma-separated; '' none)."),
    case_seconds: float = typer.Option(6.0, "--case-seconds", help="Open-loop seconds per system in each case."),
    stream_rate: float = typer.Option(100.0, "--stream-rate",
                                      help="Requests per second offered in the stream and whole cases."),
    tokens: int = typer.Option(64, "--tokens", help="Tokens per answer in the stream and whole cases."),
    itl_ms: float = typer.Option(1.0, "--itl-ms", help="Milliseconds between tokens at the backend (stream, whole)."),
    fail_every: int = typer.Option(10, "--fail-every", help="Retry case: every k-th request at a backend gets 429."),
    baseline_python: str = typer.Option("", "--baseline-python",
                                        help="The Python of another fleetwise install (say, the main branch's) whose "
                                             "router runs too, as `fleetwise-baseline`, in the same rounds."),
):
    """Latency the router adds and the rate it sustains, against direct calls and vllm-router."""
    run_router_bench = _bench("fleetwise.bench.router.run", "run_router_bench")
    from fleetwise.bench.router.cases import CASES, Cases
    names = tuple(c for c in cases.split(",") if c)
    bad = [c for c in names if c not in CASES]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: the cases are {', '.join(CASES)}", param_hint="--cases")
    run_router_bench(out=out, rate=rate, seconds=seconds, skip_vllm_router=skip_vllm_router,
                     extra=Cases(names, rate, stream_rate, case_seconds, tokens, itl_ms, fail_every),
                     baseline_python=baseline_python or None)


@bench_app.command("operator")
def bench_operator(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    nodes: int = typer.Option(250, "--nodes", help="kwok GPU nodes."),
    deployments: int = typer.Option(100, "--deployments", help="ModelDeployments to create at once."),
    prefill: int = typer.Option(4, "--prefill", help="Prefill replicas per deployment."),
    decode: int = typer.Option(6, "--decode", help="Decode replicas per deployment."),
    timeout: float = typer.Option(600.0, "--timeout", help="Give up after this many seconds."),
):
    """Operator convergence on a real API server (kwok nodes), and placement of 10,000 GPUs."""
    run_operator_bench = _bench("fleetwise.bench.operator", "run_operator_bench")
    run_operator_bench(out, nodes, deployments, prefill, decode, timeout)


@bench_app.command("power")
def bench_power(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    product: str = typer.Option("H100", "--product", help="The modelled GPU product."),
    seconds: float = typer.Option(30.0, "--seconds", min=5, help="Duration of each run."),
):
    """The power controller on modelled GPUs: reaction time and throughput cost of caps."""
    if product not in gpus.PRODUCTS:
        raise typer.BadParameter(f"choose one of {', '.join(gpus.PRODUCTS)}", param_hint="--product")
    run_power_bench = _bench("fleetwise.bench.power", "run_power_bench")
    run_power_bench(out=out, product=product, seconds=seconds)


@bench_app.command("goodput")
def bench_goodput(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    preset: str = typer.Option("small", "--preset", help="Model preset of the workers."),
    workers: int = typer.Option(4, "--workers", min=1, help="Mixed workers, one torch thread each."),
    loads: str = typer.Option("0.5,0.75,1.0,1.2", "--loads", help="Offered loads, times the fleet's capacity."),
    seconds: float = typer.Option(30.0, "--seconds", min=1, help="Each system's turn at each load."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Turns per system and load."),
    ttft: float = typer.Option(None, "--ttft", help="The SLO's time-to-first-token target, seconds "
                                                    "(default: 1.0 modelled, 1.5 cpu)."),
    tpot: float = typer.Option(None, "--tpot", help="The SLO's time-per-output-token target, seconds "
                                                    "(default: 0.15 modelled, 0.25 cpu)."),
    policy: list[str] = typer.Option(["prefix_load"], "--policy", help="fleetwise router policies to run."),
    trace: Path = typer.Option(None, "--trace", help="Azure LLM trace CSV (default: the code trace)."),
    skip_vllm_router: bool = typer.Option(False, "--skip-vllm-router", help="Leave out the vllm-router baseline."),
    fleet: str = typer.Option("modelled", "--fleet", help="modelled: workers on modelled A100s (a 70B model's step "
                                                          "times, no forward pass); cpu: the small model's real "
                                                          "forward pass on the CPU."),
):
    """SLO goodput of the router against vllm-router's policies, real workers, prefix-skewed load."""
    if fleet not in ("modelled", "cpu"):
        raise typer.BadParameter("modelled or cpu", param_hint="--fleet")
    load_list = _listed(loads, "--loads", float)
    run_goodput_bench = _bench("fleetwise.bench.goodput.run", "run_goodput_bench")
    run_goodput_bench(out=out, preset=preset, workers=workers, loads=load_list, seconds=seconds, repeats=repeats,
                      ttft_s=ttft, tpot_s=tpot, policies=policy, trace=trace, skip_vllm_router=skip_vllm_router,
                      fleet_kind=fleet)


@bench_app.command("faults")
def bench_faults(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result and the PNG plot go."),
    quick: bool = typer.Option(False, "--quick",
                               help="One XID on three mixed workers, with and without quarantine (no restart)."),
    workers: int = typer.Option(None, "--workers", min=3, max=8,
                                help="Workers in each pool (at least minPeers, 3; default 4, quick 3)."),
    healthy: float = typer.Option(None, "--healthy-seconds", min=10,
                                  help="The healthy stretch before the faults (default 120; quick 10)."),
    rate: float = typer.Option(None, "--rate", min=0.1, max=20, help="Mean requests/s of the bursty load."),
    seed: int = typer.Option(0, "--seed"),
):
    """Fault detection on a real local fleet: time to incident and action per fault, false positives per hour."""
    run = _bench("fleetwise.bench.faults.run", "run_faults_bench")
    run(out=out, quick=quick, per_pool=workers, healthy_s=healthy, rate=rate, seed=seed)
