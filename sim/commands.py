"""`fleetwise sim ...` and `fleetwise plan`: the simulator's commands, which `fleetwise/cli.py`
mounts. Imports of the simulator itself are lazy, so the command line starts fast."""

from pathlib import Path

import typer

sim_app = typer.Typer(help="The fleet simulator.", no_args_is_help=True)


@sim_app.command("run")
def sim_run(
    config: Path = typer.Argument(..., help="A YAML file with the simulation's settings (sim/examples/ has one)."),
    out: Path = typer.Option(None, "--out", help="Write the result as JSON here (default: print it)."),
    plot: Path = typer.Option(None, "--plot", help="Draw latency, power per domain and pool use into this PNG."),
):
    """Simulate a fleet serving a trace, with the router's policies and the controllers' decisions."""
    from fleetwise.sim.run import main
    args = [str(config), *(["--out", str(out)] if out else []), *(["--plot", str(plot)] if plot else [])]
    raise typer.Exit(main(args))



def plan(
    rate: float = typer.Option(..., "--rate", help="Requests per second to serve."),
    trace: Path = typer.Option(None, "--trace", help="An Azure LLM trace CSV (default: conversation)."),
    slo_ttft: float = typer.Option(1.0, "--slo-ttft", help="Time to first token objective, seconds."),
    slo_tbt: float = typer.Option(0.1, "--slo-tbt", help="Time between tokens objective, seconds."),
    attainment: float = typer.Option(0.99, help="Fraction of requests that must meet both objectives."),
    shapes: str = typer.Option("H100/H100,A100/A100,H100/A100,H100",
                               help="PREFILL/DECODE products (disaggregated) or one (colocated), by commas."),
    power_budget_kw: float = typer.Option(None, "--power-budget-kw", help="The fleet's power budget (GPU power)."),
    max_oversubscription: float = typer.Option(1.0, help="Nameplate power over the budget allowed, with capping."),
    trial_s: float = typer.Option(120.0, "--trial-s", help="Simulated seconds per trial."),
    time_budget: float = typer.Option(600.0, "--time-budget", help="Stop searching after this many seconds."),
    out: Path = typer.Option(None, "--out", help="Write the plan as JSON here."),
):
    """The cheapest fleet (pool sizes per GPU product, oversubscription) that meets the objectives."""
    from fleetwise.sim.plan import PlanConfig, main
    try:
        config = PlanConfig(rate, str(trace) if trace else PlanConfig.trace, slo_ttft_s=slo_ttft, slo_tbt_s=slo_tbt,
                            attainment=attainment, shapes=[s.strip() for s in shapes.split(",")],
                            power_budget_watts=power_budget_kw * 1e3 if power_budget_kw else None,
                            max_oversubscription=max_oversubscription, trial_s=trial_s, time_budget_s=time_budget)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    raise typer.Exit(main(config, out))


@sim_app.command("power")
def sim_power(
    config: Path = typer.Argument(..., help="A YAML file with the simulation's settings, a `power` section included."),
    ratios: str = typer.Option("1.1,1.2,1.3,1.35,1.4,1.45,1.5,1.55,1.6,1.65,1.7",
                               help="Fleet sizes to try, as multiples of the budget's."),
    controllers: str = typer.Option("fleetwise,polca,none",
                                    help="Power controllers to compare: fleetwise, fleetwise-mean, polca, none."),
    out: Path = typer.Option(None, "--out", help="Write the study as JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Draw p99 loss and time over budget by ratio into this PNG."),
    jobs: int = typer.Option(1, "--jobs", min=1, max=64, help="Simulations run at once, each in its own process."),
):
    """How many servers a row's power budget carries under each power controller (the operator's, POLCA's, none)."""
    from fleetwise.sim.power import CONTROLLERS
    from fleetwise.sim.study import main
    try:
        grid = [float(r) for r in ratios.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--ratios must be numbers separated by commas, not {ratios!r}")
    chosen = tuple(c.strip() for c in controllers.split(","))
    if not chosen or any(c not in CONTROLLERS for c in chosen):
        raise typer.BadParameter(f"--controllers takes {', '.join(CONTROLLERS)}, not {controllers!r}")
    raise typer.Exit(main(config, grid, out, plot, chosen, jobs))


@sim_app.command("iso")
def sim_iso(
    machines: int = typer.Option(70, "--machines", min=2, max=1000, help="DGX machines (8 GPUs each) in the fleet."),
    trial_s: float = typer.Option(None, "--trial-s", min=10, max=3600,
                                  help="Simulated seconds of arrivals a trial (120; 600 with --splitwise-sim)."),
    out: Path = typer.Option(None, "--out", help="Write the comparison as JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Draw the highest rate per split into this PNG."),
    context_free: bool = typer.Option(False, "--context-free",
                                      help="Token steps without the KV-read term (--step-times context-free)."),
    objectives: str = typer.Option("fleetwise", "--objectives",
                                   help="fleetwise, or splitwise-sim: SplitwiseSim's reference, TBT and quantiles."),
    step_times: str = typer.Option("fleetwise", "--step-times",
                              help="Step times: fleetwise, context-free, or splitwise-sim (its performance model)."),
    batching: str = typer.Option("fleetwise", "--batching",
                                 help="fleetwise, or splitwise-sim: its iteration limits, memory, mixed passes, link."),
    routing: str = typer.Option("fleetwise", "--routing",
                                help="fleetwise, or splitwise-sim: prompts to the fewest pending tokens."),
    splitwise_sim: bool = typer.Option(False, "--splitwise-sim",
                                       help="All of SplitwiseSim's definitions and its 600 s traces."),
    splits: str = typer.Option(None, "--splits", help="Prompt machines to try first, comma-separated (then +-5)."),
    max_rate: float = typer.Option(250.0, "--max-rate", min=10, max=10000, help="The highest rate tried, requests/s."),
):
    """Phase splitting at iso-power: Splitwise-AA against Baseline-A100, BLOOM-176B, the conversation trace."""
    from fleetwise.sim.iso import SPLITWISE_SIM, IsoConfig, main
    if splitwise_sim:
        objectives = step_times = batching = routing = SPLITWISE_SIM
    theirs = SPLITWISE_SIM in (objectives, step_times, batching, routing)
    fractions = (0.36, 0.5, 0.64, 0.79) if theirs else (0.36, 0.5, 0.64)   # their best split has more prompt machines
    tried = sorted({p for p in (round(machines * f) for f in fractions) if 0 < p < machines})
    if splits:
        try:
            tried = sorted({int(p) for p in splits.split(",")})
        except ValueError:
            raise typer.BadParameter(f"must be integers separated by commas, not {splits!r}", param_hint="--splits")
        if not all(0 < p < machines for p in tried):
            raise typer.BadParameter(f"each must be between 1 and {machines - 1}", param_hint="--splits")
    try:
        config = IsoConfig(machines=machines, trial_s=trial_s or (600.0 if splitwise_sim else 120.0),
                           context_free=context_free, objectives=objectives, step_times=step_times,
                           batching=batching, routing=routing,
                           splits=tried, rate_hi=max_rate)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=f"--{str(e).split()[0].replace('_', '-')}")
    raise typer.Exit(main(config, out, plot))


@sim_app.command("faults")
def sim_faults(
    config: Path = typer.Argument(..., help="A YAML file with the simulation's settings, a `faults` section included."),
    out: Path = typer.Option(None, "--out", help="Write the comparison as JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Draw goodput and detection times into this PNG."),
    healthy: float = typer.Option(None, "--healthy-s", min=60, max=86400,
                                  help="Seconds of the healthy run with the detector on (default: the file's)."),
):
    """Injected faults with the operator's fault detector and without it: detection, false positives, goodput."""
    from fleetwise.sim.fault_study import faults_main
    raise typer.Exit(faults_main(config, out, plot, healthy))


@sim_app.command("scale")
def sim_scale(
    config: Path = typer.Argument(None, help="A YAML file to scale (default: sim/examples/conv-1000-gpus.yaml)."),
    sizes: str = typer.Option("1000,4000,16000", help="GPU counts, comma-separated."),
    duration: float = typer.Option(None, "--duration", help="Simulated seconds per run (default: the file's)."),
    out: Path = typer.Option(None, "--out", help="Write the points as JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Draw wall time and events per second by size into this PNG."),
):
    """How the simulator's run time grows with the fleet, at the same load per GPU."""
    from fleetwise.sim.scaling import main
    try:
        counts = [int(s) for s in sizes.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--sizes must be integers separated by commas, not {sizes!r}")
    raise typer.Exit(main(config, counts, duration, out, plot))


@sim_app.command("agree")
def sim_agree(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Where the JSON result, PNG and profile go."),
    preset: str = typer.Option("small", "--preset", help="Model preset the workers serve."),
    workers: int = typer.Option(1, "--workers", min=1, max=2, help="Mixed workers under fleetwise up (one or two)."),
    trace: Path = typer.Option(None, "--trace", help="An Azure LLM trace CSV (default: conversation)."),
    start: float = typer.Option(40.0, "--start", min=0, help="Seconds into the trace where the slice begins."),
    rate_scale: float = typer.Option(0.1, "--rate-scale", min=0.001, help="The trace's arrival rate times this."),
    seconds: float = typer.Option(300.0, "--seconds", min=1, max=3600,
                                  help="Seconds of the slowed trace to serve (300: 153 requests)."),
    length_scale: float = typer.Option(0.2, "--length-scale", min=0.001, max=1.0,
                                       help="Prompt and output lengths times this."),
    calibration_steps: int = typer.Option(200, "--calibration-steps", min=20, max=100_000,
                                          help="Engine steps measured for the step profile."),
    seed: int = typer.Option(0, "--seed"),
):
    """The simulator against `fleetwise up` on the same trace slice, the simulator timed by the
    worker's own measured steps; TTFT, TBT and throughput compared (needs a checkout: it is a benchmark)."""
    from fleetwise.bench_commands import _bench
    from fleetwise.sim.run import DEFAULT_TRACE
    run_agree = _bench("fleetwise.bench.agree.run", "run_agree")
    run_agree(out, preset, workers, trace or DEFAULT_TRACE, start, rate_scale, seconds, length_scale,
              calibration_steps, seed)
