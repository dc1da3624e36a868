"""The `fleetwise` command line."""

from pathlib import Path

import typer

from fleetwise import defaults, gpus
from fleetwise.admin.commands import admin_app
from fleetwise.bench_commands import bench_app
from fleetwise.operator.agent_commands import node_agent
from fleetwise.sim.commands import plan, sim_app

app = typer.Typer(help="fleetwise: serve large language models on fleets of GPU nodes.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
model_app = typer.Typer(help="Model files.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")
app.add_typer(sim_app, name="sim")
app.command("plan")(plan)
app.add_typer(admin_app, name="admin")
app.command("node-agent")(node_agent)


@model_app.command("init")
def model_init(
    out: Path = typer.Option(..., "--out", help="Directory to write the model to."),
    preset: str = typer.Option("tiny", "--preset", help="tiny (tests) or small (benchmarks)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files."),
):
    """Write a randomly initialised Llama model in Hugging Face layout."""
    from fleetwise.worker.model.files import PRESETS, write_model
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}",
                                 param_hint="--preset")
    path = write_model(out, preset, seed)
    typer.echo(f"wrote a {preset} model to {path}")


@model_app.command("download")
def model_download(
    uri: str = typer.Argument(..., help="hf://ORG/NAME@REVISION"),
    out: Path = typer.Option(..., "--out", help="Directory to download the model into."),
):
    """Download a Hugging Face repository's model files (HF_TOKEN, HF_ENDPOINT apply)."""
    from fleetwise.model_source import ModelUriError
    from fleetwise.worker.model.hub import DownloadError, download
    try:
        path = download(uri, out)
    except (ModelUriError, DownloadError) as e:  # one line, unwrapped, for the init container's log
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2 if isinstance(e, ModelUriError) else 1)
    typer.echo(f"downloaded {uri} to {path}")


@app.command()
def worker(
    model: Path = typer.Option(..., "--model", help="Model directory (Hugging Face layout)."),
    role: str = typer.Option("mixed", "--role", help="prefill, decode or mixed."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(defaults.PORT, "--port", help="Public: the OpenAI API, /health, /metrics."),
    internal_port: int = typer.Option(defaults.INTERNAL_PORT, "--internal-port",
                                      help="Internal: /internal/* and the completion routes, for the router "
                                           "and other workers, with the shared token."),
    internal_token_file: Path = typer.Option(None, "--internal-token-file", envvar="FLEETWISE_INTERNAL_TOKEN_FILE",
                                             help="The shared token the internal port asks every caller for."),
    public_only: bool = typer.Option(False, "--public-only",
                                     help="Mixed role only: no internal port, no token (a worker used directly, "
                                          "not behind the router)."),
    served_model_name: str | None = typer.Option(None, "--served-model-name",
                                          help="Name in the API (default: the directory name)."),
    dtype: str = typer.Option(defaults.DTYPE, "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option(defaults.DEVICE, "--device", help="auto, cpu or cuda[:N]."),
    block_size: int = typer.Option(defaults.BLOCK_SIZE, "--block-size"),
    num_blocks: int = typer.Option(None, "--num-blocks", help="KV cache blocks (default: from --kv-cache-mib)."),
    kv_cache_mib: int = typer.Option(defaults.KV_CACHE_MIB, "--kv-cache-mib", help="KV cache memory budget."),
    max_num_seqs: int = typer.Option(defaults.MAX_NUM_SEQS, "--max-num-seqs"),
    max_num_batched_tokens: int = typer.Option(defaults.MAX_NUM_BATCHED_TOKENS, "--max-num-batched-tokens"),
    max_model_len: int = typer.Option(None, "--max-model-len"),
    max_waiting: int = typer.Option(defaults.MAX_WAITING, "--max-waiting",
                                    help="Queue bound; beyond it requests get 429."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching"),
    health_stall_seconds: float = typer.Option(defaults.HEALTH_STALL_SECONDS, "--health-stall-seconds",
                                               help="/health turns 503 when one engine step takes longer."),
    kv_lease_seconds: float = typer.Option(defaults.KV_LEASE_SECONDS, "--kv-lease-seconds",
                                           help="Prefill role: how long a prompt's KV waits for a decode worker."),
    max_kv_leases: int = typer.Option(defaults.MAX_KV_LEASES, "--max-kv-leases", min=1,
                                      help="Prompts held for decode workers at once; beyond it prefills get 429."),
    max_kv_lease_fraction: float = typer.Option(defaults.MAX_KV_LEASE_FRACTION, "--max-kv-lease-fraction",
                                                min=0.01, max=1.0,
                                                help="The share of the KV blocks leases may hold; beyond it 429."),
    max_logprobs: int = typer.Option(defaults.MAX_LOGPROBS, "--max-logprobs", min=0,
                                     help="The most logprobs (top_logprobs) a request may ask for."),
    max_n: int = typer.Option(defaults.MAX_N, "--max-n", min=1, help="The most choices (n, best_of) per prompt."),
    max_body_mib: int = typer.Option(defaults.MAX_BODY_MIB, "--max-body-mib", min=1,
                                     help="The largest request body; a larger one gets 413."),
    health_failed_steps: int = typer.Option(defaults.HEALTH_FAILED_STEPS, "--health-failed-steps", min=1,
                                            help="/health turns 503 after this many engine steps in a row "
                                                 "failed every request in them."),
    exit_on_engine_failure: bool = typer.Option(False, "--exit-on-engine-failure",
                                                help="Exit non-zero once the engine loop dies or "
                                                     "--health-failed-steps steps in a row failed."),
    modelled_gpu: str = typer.Option(None, "--modelled-gpu",
                                     help="Without a GPU: run as a modelled one of this product (H100, A100, "
                                          "...), its power, caps and DCGM series."),
    modelled_forward: str = typer.Option(None, "--modelled-forward",
                                         help="With --modelled-gpu: no forward pass; each step waits out "
                                              "MODEL:tpN's time on that GPU (sim/perf.py, e.g. llama2-70b:tp2)."),
    fault: list[str] = typer.Option([], "--fault", hidden=True,
                                    help="Test-only fault switches (corrupt-kv, fail-steps, "
                                         "switches: POST /internal/faults)."),
):
    """Run one worker: the batched inference core behind an OpenAI-compatible HTTP API."""
    if role not in ("prefill", "decode", "mixed"):
        raise typer.BadParameter("must be prefill, decode or mixed", param_hint="--role")
    _check_modelled(modelled_gpu, modelled_forward)
    token = _internal_token(role, internal_token_file, public_only)
    from fleetwise.worker.api.openai import RequestLimits
    from fleetwise.worker.api.server import serve
    from fleetwise.worker.engine.config import EngineConfig
    config = EngineConfig(
        model=str(model), served_model_name=served_model_name, dtype=dtype, device=device,
        block_size=block_size, num_blocks=num_blocks, kv_cache_bytes=kv_cache_mib << 20,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len, enable_prefix_caching=not no_prefix_caching,
        max_waiting=max_waiting, kv_lease_seconds=kv_lease_seconds, max_logprobs=max_logprobs,
        max_kv_leases=max_kv_leases, max_kv_lease_fraction=max_kv_lease_fraction, modelled_gpu=modelled_gpu,
        modelled_forward=modelled_forward)
    status = serve(config, host=host, port=port, role=role, health_stall_seconds=health_stall_seconds,
                   faults=frozenset(fault), limits=RequestLimits(max_n=max_n, max_body_bytes=max_body_mib << 20),
                   health_failed_steps=health_failed_steps, exit_on_engine_failure=exit_on_engine_failure,
                   internal_port=internal_port, internal_token=token)
    if status:
        raise typer.Exit(status)


def _check_modelled(modelled_gpu: str | None, modelled_forward: str | None) -> None:
    if modelled_gpu is not None and modelled_gpu not in gpus.PRODUCTS:
        raise typer.BadParameter(f"choose one of {', '.join(gpus.PRODUCTS)}", param_hint="--modelled-gpu")
    if modelled_forward is None:
        return
    if modelled_gpu is None:
        raise typer.BadParameter("goes with --modelled-gpu", param_hint="--modelled-forward")
    from fleetwise.worker.engine.modelled_device import parse_forward
    try:
        parse_forward(modelled_forward)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--modelled-forward")


def _internal_token(role: str, path: Path | None, public_only: bool) -> str | None:
    """The worker's shared token, or None for a mixed worker run `--public-only`."""
    from fleetwise.protocol import TOKEN_FILE_ENV, load_token
    if public_only:
        if role != "mixed":
            raise typer.BadParameter(f"a {role} worker is reached only through its internal port; "
                                     "only a mixed worker may run public-only", param_hint="--public-only")
        if path is not None:
            raise typer.BadParameter("give --public-only or --internal-token-file, not both",
                                     param_hint="--public-only")
        return None
    if path is None:
        raise typer.BadParameter(
            f"the internal port needs the shared token: give --internal-token-file FILE or set {TOKEN_FILE_ENV} "
            "(the router and decode workers send it). A mixed worker used directly, not behind the router, "
            "may run without the internal port: --public-only", param_hint="--internal-token-file")
    try:
        return load_token(path)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--internal-token-file")


@app.command()
def up(
    model: Path = typer.Option(None, "--model", help="Model directory (default: write the tiny model)."),
    mode: str = typer.Option("disaggregated", "--mode", help="disaggregated (prefill + decode) or colocated (mixed)."),
    port: int = typer.Option(8000, "--port", help="The router's port."),
    prefill: int = typer.Option(1, "--prefill", help="Prefill workers (disaggregated)."),
    decode: int = typer.Option(1, "--decode", help="Decode workers (disaggregated)."),
    mixed: int = typer.Option(1, "--mixed", help="Mixed workers (colocated)."),
    workdir: Path = typer.Option(Path(".fleetwise"), "--workdir", help="Logs, router config, the default model."),
    kv_cache_mib: int = typer.Option(defaults.KV_CACHE_MIB, "--kv-cache-mib", help="KV cache per worker."),
    device: str = typer.Option(defaults.DEVICE, "--device"),
    power_limit_watts: float = typer.Option(None, "--power-limit-watts", min=1,
                                            help="Run the power controller over the fleet with this budget "
                                                 "(every worker a modelled GPU; needs `prometheus` on PATH)."),
    modelled_gpu: list[str] = typer.Option([], "--modelled-gpu",
                                           help="With --power-limit-watts: the workers' GPU product (H100), or "
                                                "one per pool (prefill=H100, repeatable). Default H100."),
    power_priority: str = typer.Option("High", "--power-priority", help="High or Low: the model's priority."),
    power_period: float = typer.Option(2.0, "--power-period", min=0.5, max=60,
                                       help="Seconds between the power controller's periods."),
    admin_port: int = typer.Option(8081, "--admin-port", min=0,
                                   help="The admin API's port (another if taken; 0: no admin API)."),
    detect_faults: bool = typer.Option(False, "--detect-faults",
                                       help="Compare the workers of each role window by window (needs Prometheus); "
                                            "quarantine and restart one that stays slower than its peers."),
    fault_window_seconds: int = typer.Option(30, "--fault-window-seconds", min=10, max=3600,
                                             help="With --detect-faults: the detector's window."),
):
    """The main job on one machine: router + prefill and decode workers as local processes."""
    if mode not in ("disaggregated", "colocated"):
        raise typer.BadParameter("must be disaggregated or colocated", param_hint="--mode")
    for name, value in (("--prefill", prefill), ("--decode", decode), ("--mixed", mixed)):
        if value < 1:
            raise typer.BadParameter("must be at least 1", param_hint=name)
    power = None
    if power_limit_watts is not None:
        from fleetwise.local_power import PowerOptions
        roles = ("prefill", "decode") if mode == "disaggregated" else ("mixed",)
        if power_priority not in ("High", "Low"):
            raise typer.BadParameter("must be High or Low", param_hint="--power-priority")
        power = PowerOptions(power_limit_watts, _pool_products(modelled_gpu, roles), power_priority, power_period)
    elif modelled_gpu:
        raise typer.BadParameter("goes with --power-limit-watts", param_hint="--modelled-gpu")
    from fleetwise.up import run
    raise typer.Exit(run(model, mode, port, prefill, decode, mixed, workdir,
                         ["--kv-cache-mib", str(kv_cache_mib), "--device", device], power=power,
                         admin_port=admin_port, fault_window_seconds=fault_window_seconds if detect_faults else None))


def _pool_products(values: list[str], roles: tuple[str, ...]) -> dict[str, str]:
    """`--modelled-gpu` values (PRODUCT, or ROLE=PRODUCT) -> a product for each role."""
    products = dict.fromkeys(roles, "H100")
    for value in values:
        role, _, product = value.rpartition("=")
        if product not in gpus.PRODUCTS:
            raise typer.BadParameter(f"{product!r}: choose one of {', '.join(gpus.PRODUCTS)}",
                                     param_hint="--modelled-gpu")
        if role and role not in roles:
            raise typer.BadParameter(f"{role!r}: this mode's pools are {', '.join(roles)}", param_hint="--modelled-gpu")
        products.update(dict.fromkeys([role] if role else roles, product))
    return products


@app.command()
def router(
    config: Path = typer.Option(None, "--config", help="Endpoints file: models with prefill/decode/mixed URLs."),
    kubernetes: bool = typer.Option(False, "--kubernetes", help="Discover worker pods from the Kubernetes API."),
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="With --kubernetes (default: in-cluster)."),
    namespace: list[str] = typer.Option([], "--namespace",
                                        help="With --kubernetes: only these namespaces (repeatable; default: all)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    policy: str = typer.Option("prefix_load", "--policy",
                               help="prefix_load, prefix_affinity, least_outstanding or round_robin."),
    max_inflight: int = typer.Option(2048, "--max-inflight", help="Beyond it requests get 429."),
    probe_interval: float = typer.Option(1.0, "--probe-interval", help="Seconds between health probes."),
    internal_token_file: Path = typer.Option(None, "--internal-token-file", envvar="FLEETWISE_INTERNAL_TOKEN_FILE",
                                             help="The shared token the workers' internal ports ask for."),
    max_migrations: int = typer.Option(3, "--max-migrations", min=0,
                                       help="Moves of one stream to another replica when its worker fails."),
    max_tokens_kept: int = typer.Option(1 << 17, "--max-tokens-kept", min=1,
                                        help="Token ids kept per request; beyond them it cannot move."),
    drain_grace: float = typer.Option(30.0, "--drain-grace", min=0,
                                      help="Seconds a drained replica keeps its streams before they move."),
    max_connections: int = typer.Option(4096, "--max-connections", min=1,
                                        help="Client connections open at once; one more gets 503 and is closed."),
    head_timeout: float = typer.Option(30.0, "--head-timeout", min=0.01,
                                       help="Seconds for a request's head to arrive whole (the first's from the "
                                            "connect): a connection that sent nothing is closed, a partial head 408."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", min=0.01,
                                       help="Seconds for a request's body to arrive whole after its head (408)."),
    keep_alive_timeout: float = typer.Option(75.0, "--keep-alive-timeout", min=0.01,
                                             help="Seconds an idle keep-alive client connection stays open."),
):
    """Run the router: the OpenAI-compatible front door over the workers' internal ports."""
    import logging

    from fleetwise.logs import configure as configure_logs
    from fleetwise.router.app import serve
    from fleetwise.router.endpoints import ConfigError, EndpointSource, StaticEndpoints
    from fleetwise.router.limits import ConnectionLimits
    from fleetwise.router.policies import POLICIES
    if policy not in POLICIES:
        raise typer.BadParameter(f"choose one of {', '.join(POLICIES)}", param_hint="--policy")
    if (config is None) == (not kubernetes):
        raise typer.BadParameter("give either --config FILE or --kubernetes", param_hint="--config")
    from fleetwise.protocol import load_token
    try:
        token = load_token(internal_token_file)
    except ValueError as e:
        raise typer.BadParameter(f"{e} (the workers' internal ports ask for it)", param_hint="--internal-token-file")
    configure_logs(logging.INFO)
    source: EndpointSource
    if kubernetes:
        from fleetwise.operator.kube import load_client
        from fleetwise.router.kube_source import KubernetesEndpoints
        source = KubernetesEndpoints(load_client(kubeconfig), namespace)
    else:
        try:
            source = StaticEndpoints(config)
        except ConfigError as e:
            raise typer.BadParameter(str(e), param_hint="--config")
    serve(source, host, port, token, policy, max_inflight, probe_interval,
          max_migrations=max_migrations, max_tokens_kept=max_tokens_kept, drain_grace=drain_grace,
          connections=ConnectionLimits(max_connections, head_timeout, body_timeout, keep_alive_timeout))


@app.command()
def operator(
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Default: in-cluster, else ~/.kube/config."),
    namespace: list[str] = typer.Option([], "--namespace", help="Namespaces to watch (default: all)."),
    lease_namespace: str = typer.Option("default", "--lease-namespace", envvar="POD_NAMESPACE",
                                        help="Where the leader-election Lease lives."),
    metrics_port: int = typer.Option(9090, "--metrics-port", help="Prometheus metrics (0: off)."),
    liveness_port: int = typer.Option(8080, "--liveness-port", help="kopf's /healthz (0: off)."),
    tolerate_taint: list[str] = typer.Option([], "--tolerate-taint", help="Extra taint keys worker pods tolerate."),
    drain_timeout: float = typer.Option(120.0, "--drain-timeout",
                                        help="Seconds a draining worker gets to finish its requests."),
    internal_token_file: Path = typer.Option(None, "--internal-token-file", envvar="FLEETWISE_INTERNAL_TOKEN_FILE",
                                             help="The shared internal token, copied into a Secret in each "
                                                  "namespace with workers, which their pods mount."),
    prometheus_url: str = typer.Option(None, "--prometheus-url", envvar="FLEETWISE_PROMETHEUS_URL",
                                       help="Prometheus with the GPUs' DCGM series: the PowerBudgets' power loops "
                                            "read it (none: no power capping)."),
    power_period: float = typer.Option(5.0, "--power-period", min=1, max=300,
                                       help="Seconds between a PowerBudget's control periods."),
    power_actuator: str = typer.Option("worker", "--power-actuator",
                                       help="worker or node-agent: who applies caps: the worker (a modelled GPU) "
                                            "or `fleetwise node-agent` on the GPU nodes, from the pod's annotation "
                                            "(real GPUs)."),
    admin_url: str = typer.Option(None, "--admin-url", envvar="FLEETWISE_ADMIN_URL",
                                  help="The admin API, which incidents and actions are sent to (queued through "
                                       "its outages)."),
    admin_token_file: Path = typer.Option(None, "--admin-token-file", envvar="FLEETWISE_ADMIN_TOKEN_FILE",
                                          help="With --admin-url: the operator's token (an operator role), re-read "
                                               "before each send."),
):
    """Run the kopf operator: ModelDeployments -> placed and bound prefill/decode worker pods."""
    from fleetwise.operator.main import run_operator
    from fleetwise.protocol import load_token
    try:
        load_token(internal_token_file)
    except ValueError as e:
        raise typer.BadParameter(f"{e} (worker pods mount a copy of it)", param_hint="--internal-token-file")
    if (admin_url is None) != (admin_token_file is None):
        raise typer.BadParameter("give both --admin-url and --admin-token-file, or neither", param_hint="--admin-url")
    if power_actuator not in ("worker", "node-agent"):
        raise typer.BadParameter("worker or node-agent", param_hint="--power-actuator")
    run_operator(kubeconfig, namespace, lease_namespace, metrics_port, liveness_port, tolerate_taint,
                 drain_timeout=drain_timeout, token_file=internal_token_file, prometheus_url=prometheus_url,
                 power_period=power_period, admin_url=admin_url, admin_token_file=admin_token_file,
                 power_actuator=power_actuator)


if __name__ == "__main__":
    app()
