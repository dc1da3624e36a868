"""`fleetwise bench power`: the power controller on modelled GPUs, POLCA's question on one
machine: how fast it brings an over-budget domain back under its cap threshold, and what
the caps cost in throughput, for prompt-heavy and for token-heavy load.

Two mixed workers run as modelled GPUs (`--product`), a real Prometheus scrapes them every
0.5 s, and the load is a closed loop of client threads straight to the workers. Each
workload runs twice in the same run: uncapped (the baseline: its mean power P and its
throughput), then with the power loop (`fleetwise/power_loop.py`, a 1 s period) under a
budget of P / 0.94, so that uncapped the domain sits at 94% of its limit, above the 90% cap
threshold and below the 98% emergency one. Reaction: the first period that sees the domain
above the threshold -> the first cap applied -> the first period back under it. Cost, two ways: the
engines' step time over their forward passes' (the stretch a cap adds, which the engine waits
out: the modelled GPU's law in fleetwise/gpus.py, free of the CPU's noise), capped over
uncapped; and the throughput after the reaction over the baseline's (prompt tokens a second
for prompt-heavy load, generated tokens a second for token-heavy load), which on a shared CPU
moves with everything else the machine does.
"""

import contextlib
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.table import Table

from fleetwise.bench.harness import figure, finish, header, make_console, save_plot, write_json, wrote
from fleetwise.bench.targets import AT_MOST, Check, Target, checks_json, checks_table, target_values
from fleetwise.fleet import WorkerRef
from fleetwise.local_fleet import LocalFleet, Member
from fleetwise.net import free_port
from fleetwise.power_loop import DomainWorker, PowerLoop
from fleetwise.procs import fleetwise_argv, stop_all, wait_healthy
from fleetwise.spec import PowerBudgetSpec
from fleetwise.telemetry import catalog as c
from fleetwise.telemetry.prometheus import PrometheusClient, PrometheusError
from fleetwise.telemetry.prometheus_server import PrometheusServer
from fleetwise.up import write_token

console = make_console(120)
WORKLOADS = {  # name: (prompt tokens, max tokens, what throughput counts)
    "prompt_heavy": (800, 1, "prompt"),
    "token_heavy": (16, 64, "generated"),
}
UNCAPPED_SHARE = 0.94  # of the budget, where the uncapped load puts the domain
CLIENTS = 8
PERIOD_S = 1.0
# per workload. The first cap within two control periods of the crossing, power back under the
# cap threshold within five, and held there: the power after the reaction over the threshold,
# both measured in the capped run.
TARGETS = {
    "cap_applied_s": Target(AT_MOST, 2 * PERIOD_S, "threshold crossed -> first cap", "<= 2 periods (2 s)"),
    "under_threshold_s": Target(AT_MOST, 5 * PERIOD_S, "threshold crossed -> power under it", "<= 5 periods (5 s)"),
    "power_after_over_threshold": Target(AT_MOST, 1.0, "power after the reaction / cap threshold", "<= 1.0x"),
}


def evaluate(workloads: dict) -> dict[str, Check]:
    """Each target for each workload, named "<workload>.<target>"."""
    out = {}
    for name, w in workloads.items():
        cap = w["capped"]
        out[f"{name}.cap_applied_s"] = TARGETS["cap_applied_s"].check(cap["cap_applied_s"])
        out[f"{name}.under_threshold_s"] = TARGETS["under_threshold_s"].check(cap["under_threshold_s"])
        out[f"{name}.power_after_over_threshold"] = TARGETS["power_after_over_threshold"].ratio(
            cap["power_after_watts"], cap["threshold_watts"])
    return out


@dataclass
class Tick:
    """One control period as the benchmark saw it."""
    t: float              # seconds since the run began
    watts: float | None
    situation: str
    caps: int
    changes: int


@dataclass
class Load:
    urls: list[str]
    prompt_tokens: int
    max_tokens: int
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[tuple[float, int, int]] = field(default_factory=list)  # (finished at, prompt, generated)

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join(timeout=60)

    def _client(self, k: int) -> None:
        i = 0
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                i += 1
                prompt = [(13 * j + 7 * i + 101 * k) % 500 + 1 for j in range(self.prompt_tokens)]
                with contextlib.suppress(httpx.HTTPError):
                    r = http.post(self.urls[(i + k) % len(self.urls)] + "/v1/completions",
                                  json={"model": "tiny", "prompt": prompt, "max_tokens": self.max_tokens,
                                        "ignore_eos": True})
                    if r.status_code == 200:
                        usage = r.json()["usage"]
                        self.done.append((time.time(), usage["prompt_tokens"], usage["completion_tokens"]))

    def throughput(self, kind: str, start: float, end: float) -> float:
        picked = [(p if kind == "prompt" else g) for t, p, g in self.done if start <= t <= end]
        return sum(picked) / max(1e-9, end - start)


def _step_seconds(fleet: LocalFleet) -> tuple[float, float]:
    """(engine step seconds, forward pass seconds) summed over the workers: a step's time over
    its forward pass's is the cap's stretch that the engine waited out, free of the CPU's noise."""
    totals = [0.0, 0.0]
    for m in fleet.workers.values():
        page = httpx.get(m.url + "/metrics", timeout=10).text
        for line in page.splitlines():
            for i, name in enumerate((c.STEP_SECONDS + "_sum{", c.STEP_FORWARD_SECONDS + "_sum{")):
                if line.startswith(name):
                    totals[i] += float(line.rsplit(" ", 1)[1])
    return totals[0], totals[1]


def _stretch(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(1e-9, after[1] - before[1])


def _power(prom: PrometheusClient) -> float | None:
    try:
        return prom.latest(c.DCGM_POWER_USAGE).total()
    except PrometheusError:
        return None


def _uncapped(fleet: LocalFleet, prom: PrometheusClient, workload: str, seconds: float) -> dict:
    prompt, gen, kind = WORKLOADS[workload]
    load = Load([w.url for w in fleet.workers.values()], prompt, gen)
    samples: list[float] = []
    runner = threading.Thread(target=load.run, args=(seconds,))
    steps = _step_seconds(fleet)
    t0 = time.time()
    runner.start()
    while runner.is_alive():
        time.sleep(0.5)
        if time.time() - t0 > seconds / 3 and (p := _power(prom)) is not None:  # past the ramp
            samples.append(p)
    return {"power_watts": statistics.mean(samples) if samples else None,
            "throughput": load.throughput(kind, t0 + seconds / 3, t0 + seconds),
            "step_stretch": _stretch(steps, _step_seconds(fleet))}


def _capped(fleet: LocalFleet, prom: PrometheusClient, workload: str, seconds: float, limit: float,
            products: str) -> dict:
    prompt, gen, kind = WORKLOADS[workload]
    budget = PowerBudgetSpec(node_selector={"bench": "power"}, limit_watts=limit, min_gpu_cap_watts=50)
    workers = [DomainWorker(WorkerRef(m.name, url=m.internal_url), "Low", m.role, products,
                            series=(("instance", m.url.removeprefix("http://")),)) for m in fleet.workers.values()]
    loop = PowerLoop(prom, fleet, period_seconds=PERIOD_S)
    load = Load([w.url for w in fleet.workers.values()], prompt, gen)
    runner = threading.Thread(target=load.run, args=(seconds,))
    steps = _step_seconds(fleet)
    t0 = time.time()
    runner.start()
    timeline: list[Tick] = []
    while runner.is_alive():
        p = loop.run_period(budget, workers)
        timeline.append(Tick(p.at - t0, p.reading.watts, p.decision.situation, len(p.caps), len(p.changed)))
        time.sleep(max(0.0, PERIOD_S - (time.time() - p.at)))
    stretch = _stretch(steps, _step_seconds(fleet))
    loop.release_all(workers, "the benchmark's run ended")
    threshold = budget.cap_threshold * limit
    crossed = next((x.t for x in timeline if (x.watts or 0) >= threshold), None)
    capped = next((x.t for x in timeline if x.changes and crossed is not None and x.t >= crossed), None)
    under = next((x.t for x in timeline if capped is not None and x.t > capped
                  and x.watts is not None and x.watts < threshold), None)
    settled = (under if under is not None else seconds / 2) + 2.0
    after = [x.watts for x in timeline if x.t >= settled and x.watts is not None]
    return {"limit_watts": limit, "threshold_watts": threshold, "timeline": [asdict(x) for x in timeline],
            "crossed_s": crossed, "cap_applied_s": None if capped is None else capped - (crossed or 0),
            "under_threshold_s": None if under is None else under - (crossed or 0),
            "power_after_watts": statistics.mean(after) if after else None,
            "throughput": load.throughput(kind, t0 + settled, t0 + seconds), "step_stretch": stretch}


def _fleet(workdir: Path, model: Path, product: str) -> LocalFleet:
    token = write_token(workdir)
    members = []
    for i in range(2):
        p, q = free_port(), free_port()
        members.append(Member(f"mixed-{i}", fleetwise_argv(
            "worker", "--model", str(model), "--role", "mixed", "--port", str(p), "--internal-port", str(q),
            "--internal-token-file", str(token), "--served-model-name", "tiny", "--modelled-gpu", product),
            workdir / "logs" / f"mixed-{i}.log", f"http://127.0.0.1:{p}", die_with_parent=True,
            internal_url=f"http://127.0.0.1:{q}"))
    return LocalFleet("tiny", members, workdir / "router.yaml", workdir / "logs" / "actions.log",
                      token=token.read_text().strip())


def run_power_bench(out: Path, product: str = "H100", seconds: float = 30.0) -> dict:
    from fleetwise.worker.model.files import write_model
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fleetwise-bench-power-"))
    model = write_model(workdir / "tiny", "tiny", seed=0)
    fleet = _fleet(workdir, model, product)
    members = list(fleet.workers.values())
    for m in members:
        m.start()
    prometheus = None
    report: dict = {**header("power"), "product": product, "seconds": seconds, "workloads": {}}
    try:
        wait_healthy(members, 180)
        prometheus = PrometheusServer(workdir / "prometheus", {"workers": [m.url.removeprefix("http://")
                                                                           for m in members]},
                                      scrape_interval=0.5).start()
        prom = PrometheusClient(prometheus.url)
        for name in WORKLOADS:
            console.print(f"{name}: uncapped, {seconds:.0f} s")
            base = _uncapped(fleet, prom, name, seconds)
            if not base["power_watts"]:
                raise RuntimeError(f"{name}: no power reading from Prometheus")
            console.print(f"{name}: under a budget of {base['power_watts'] / UNCAPPED_SHARE:.0f} W, {seconds:.0f} s")
            capped = _capped(fleet, prom, name, seconds, base["power_watts"] / UNCAPPED_SHARE, product)
            saved = 1 - (capped["power_after_watts"] or base["power_watts"]) / base["power_watts"]
            report["workloads"][name] = {"uncapped": base, "capped": capped, "power_saved_fraction": saved,
                                         "throughput_ratio": capped["throughput"] / max(1e-9, base["throughput"]),
                                         "step_time_ratio": capped["step_stretch"] / base["step_stretch"]}
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_all([members])
    checks = evaluate(report["workloads"])
    report |= {"targets": checks_json(checks), "target_values": target_values(TARGETS)}
    _print(report)
    console.print(checks_table(checks, {k: "{:.1f} s" for k in checks if k.endswith("_s")}))
    json_path = write_json(out / "power.json", report)
    wrote(console, json_path, save_plot(lambda p: _plot(report, p), out / "power.png", console))
    return report


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{unit}"


def _print(report: dict) -> None:
    t = Table(title=f"power capping on modelled {report['product']}s")
    for col in ("workload", "uncapped W", "budget W", "capped W", "to first cap", "to under threshold",
                "step time capped / uncapped", "throughput capped / uncapped"):
        t.add_column(col)
    for name, w in report["workloads"].items():
        cap = w["capped"]
        t.add_row(name, _fmt(w["uncapped"]["power_watts"]), _fmt(cap["limit_watts"]), _fmt(cap["power_after_watts"]),
                  _fmt(cap["cap_applied_s"], " s"), _fmt(cap["under_threshold_s"], " s"),
                  f"{w['step_time_ratio']:.3f}", f"{w['throughput_ratio']:.2f}")
    console.print(t)


def _plot(report: dict, path: Path) -> None:
    fig, axes = figure(len(report["workloads"]), (6 * len(report["workloads"]), 3.8))
    for ax, (name, w) in zip(list(axes), report["workloads"].items()):
        cap = w["capped"]
        ts = [x["t"] for x in cap["timeline"]]
        ax.plot(ts, [x["watts"] for x in cap["timeline"]], label="domain power")
        for share, style in ((0.98, ":"), (0.9, "--"), (0.8, "-.")):
            ax.axhline(share * cap["limit_watts"], linestyle=style, color="grey", linewidth=0.8)
        for x in cap["timeline"]:
            if x["changes"]:
                ax.axvline(x["t"], color="red", alpha=0.3, linewidth=0.8)
        ax.axhline(w["uncapped"]["power_watts"], color="orange", linewidth=0.8, label="uncapped mean")
        ax.set_title(f"{name}: step time x{w['step_time_ratio']:.3f}, throughput x{w['throughput_ratio']:.2f}",
                     fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("W")
        ax.legend(fontsize=7)
    finish(fig, path, "power under a budget: thresholds 98/90/80%, red: cap changes")
