"""`fleetwise bench core`: the batched inference core against Hugging Face `transformers`.

Three systems run the same trace-shaped requests in one process, one after the other:

  static      `LlamaForCausalLM.generate()` in static batches (arrival order, left padding);
              every row of a batch decodes until the longest request of the batch is done;
              at each batch size of a sweep, the best one is the baseline
  continuous  transformers' own continuous batching (`continuous_batching_context_manager`,
              the machinery behind `generate_batch`), over its paged cache
  core        fleetwise's `LLMEngine`, driven step by step in the same process (no HTTP)

The workload (bench/core/workload.py), the baselines (baselines.py), the core (engine.py),
the rounds (rounds.py: each system `repeats` times in rotated order, median and spread) and
the report (report.py) each have their own module; this one runs them.

Requests are offline: all are submitted at t0, and every system produces exactly the
requested number of output tokens (EOS ignored), so all do the same useful work. Output
tokens/s counts only the requested tokens. The result goes to `OUT/core.json` and
`OUT/core.png`; see bench/README.md.
"""

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fleetwise.bench.core.baselines import (
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    load_hf_model,
    run_continuous,
    run_static,
)
from fleetwise.bench.core.engine import BLOCK_SIZE, KV_CACHE_MIB, kv_at_lengths, run_core
from fleetwise.bench.core.report import TARGETS, agreement, evaluate, plot, print_notes, print_summary, ratios
from fleetwise.bench.core.result import SYSTEM_LABELS, SystemResult
from fleetwise.bench.core.rounds import (
    STATIC_BATCH_SIZES,
    best_static,
    kind,
    median_run,
    run_rounds,
    static_name,
    summarise,
)
from fleetwise.bench.core.workload import Workload, build_workload, resolve_trace
from fleetwise.bench.harness import header, make_console, rotated, save_plot, write_json, wrote
from fleetwise.bench.models import kv_bytes_per_token, preset_model
from fleetwise.bench.targets import checks_json, target_values

# Work knobs. The trace fitted to a 2048-token context averages ~620 tokens per request,
# ~124k tokens for 200 requests: on a quiet 2-core CPU the three systems together take ~17
# minutes at those lengths (transformers' continuous batching alone ~10), ~3 minutes at
# 0.4 of them. The extra factor keeps a default run well inside ten minutes there, with room
# for a busy machine; override it with FLEETWISE_BENCH_LENGTH_SCALE (1.0: the fitted lengths).
DEFAULT_LENGTH_SCALE = 0.4
# the core's extra run at the trace's lengths, for its KV waste alone (a ratio): 200 requests would take minutes
KV_WASTE_REQUESTS = 64
REPEATS = 3
SKIP_ALIASES = {"static": "static", "generate": "static", "a": "static",
                "continuous": "continuous", "generate_batch": "continuous", "cb": "continuous", "b": "continuous"}


def _check_options(requests: int, skip: list[str], length_scale: float | None) -> tuple[set[str], float]:
    """The baselines to leave out and the length scale, or SystemExit with what is wrong."""
    skip = [s.strip().lower() for s in skip]
    unknown = [s for s in skip if s not in SKIP_ALIASES]
    if unknown:
        raise SystemExit(f"error: --skip takes static or continuous, not {', '.join(unknown)}")
    if requests < 1:
        raise SystemExit("error: --requests must be at least 1")
    if length_scale is None:
        env = os.environ.get("FLEETWISE_BENCH_LENGTH_SCALE")
        length_scale = float(env) if env else DEFAULT_LENGTH_SCALE
    if not 0 < length_scale <= 1:
        raise SystemExit(f"error: the length scale must be in (0, 1], got {length_scale}")
    return {SKIP_ALIASES[s] for s in skip}, length_scale


def _model_dir(model: Path | None, preset: str, out: Path, console: Console) -> Path:
    if model is None:
        return preset_model(out, preset, console)
    if not (Path(model) / "config.json").exists():
        raise SystemExit(f"error: {model} is not a model directory (no config.json)")
    return Path(model).resolve()


def _print_setup(console: Console, model_dir: Path, cfg: dict, n_params: int, device: str, wl: Workload,
                 ws: dict, seed: int) -> None:
    console.rule("fleetwise bench core")
    console.print(f"model {model_dir} ({cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                  f"vocab {cfg.get('vocab_size')}, {n_params / 1e6:.1f}M parameters, context {wl.context}); "
                  f"device {device}, torch threads {torch.get_num_threads()}")
    console.print(f"trace {Path(wl.trace_path).name}: {wl.trace_rows} rows, p99 prompt+output "
                  f"{wl.trace_p99_total:.0f} tokens")
    console.print(f"length scaling: {wl.fit_scale:.4f} (trace p99 fits the {wl.context}-token context) "
                  f"x {wl.length_scale:g} (work bound; FLEETWISE_BENCH_LENGTH_SCALE) = {wl.scale:.4f}; "
                  f"{wl.num_clipped} requests clipped to the context")
    console.print(f"{len(wl.requests)} requests (seed {seed}): prompt mean {ws['prompt_tokens']['mean']:.0f} "
                  f"p99 {ws['prompt_tokens']['p99']:.0f} max {ws['prompt_tokens']['max']}, output mean "
                  f"{ws['output_tokens']['mean']:.0f} p99 {ws['output_tokens']['p99']:.0f} max "
                  f"{ws['output_tokens']['max']}; {ws['prompt_tokens']['total']} prompt + "
                  f"{ws['output_tokens']['total']} output tokens")


class _Systems:
    """Runs one system by name; the transformers model is loaded once, when a baseline first needs it."""

    def __init__(self, model_dir: Path, cfg: dict, wl: Workload, device: str, kv_tokens: int, console: Console):
        self.model_dir, self.cfg, self.wl, self.device = model_dir, cfg, wl, device
        self.kv_tokens, self.console = kv_tokens, console
        self.skipped: dict[str, str] = {}
        self._hf: Any = None

    def _hf_model(self) -> Any:
        if self._hf is None:
            self._hf = load_hf_model(self.model_dir, torch.device(self.device))
        return self._hf

    def run(self, name: str, r: int) -> SystemResult | None:
        """One run of `name` in round `r`; None once it could not run (the reason in `skipped`)."""
        if name in self.skipped:
            return None
        label = f"{name} r{r + 1}".ljust(14)
        try:
            if kind(name) == "core":
                return run_core(self.model_dir, self.wl.requests, self.device, self.console, label)[0]
            model = self._hf_model()
            if kind(name) == "static":
                return run_static(model, self.wl.requests, int(name.split("/")[1]),
                                  _pad_id(self.model_dir, self.cfg), self.console, label)
            return run_continuous(model, self.wl.requests, self.kv_tokens, self.console, label)
        except Exception as exc:
            if kind(name) == "core":
                raise
            self.skipped[name] = f"{type(exc).__name__}: {exc}"
            self.console.print(f"[yellow]{name} skipped: {self.skipped[name]}[/yellow]")
            return None


def _names(skip: set[str], batch_sizes: tuple[int, ...]) -> list[str]:
    names = [] if "static" in skip else [static_name(b) for b in batch_sizes]
    return names + ([] if "continuous" in skip else ["continuous"]) + ["core"]


def _report(runs: dict[str, list[SystemResult]], order: list[list[str]], skipped: dict[str, str], config: dict,
            ws: dict) -> dict:
    systems = summarise(runs, order)
    for n, why in skipped.items():
        if n in systems:  # ran, then failed in a later round
            systems[n]["failed_in_a_later_round"] = why
        else:
            systems[n] = {"label": SYSTEM_LABELS[kind(n)], "skipped": why}
    best = best_static(systems)
    checks = evaluate(systems, best)
    report = {**header("core"), "config": config, "workload": ws, "systems": systems, "static_best": best,
              "order": order, "ratios": ratios(systems, best), "targets": checks_json(checks),
              "target_values": target_values(TARGETS)}
    core = median_run(runs["core"])
    report["greedy_agreement_with_core"] = {n: agreement(core, median_run(rs)) for n, rs in runs.items()
                                            if n != "core"}
    return report


def run_core_bench(requests: int = 200, preset: str = "small", model: Path | None = None,
                   trace: Path | None = None, out: Path = Path("bench/results"), seed: int = 0,
                   skip: list[str] | None = None, length_scale: float | None = None,
                   static_batch_sizes: tuple[int, ...] = STATIC_BATCH_SIZES, repeats: int = REPEATS,
                   threads: int | None = None) -> dict:
    """Run every system `repeats` times in rotated order on the same requests; write
    OUT/core.json and OUT/core.png.

    `length_scale` multiplies the context-fitted trace lengths (default DEFAULT_LENGTH_SCALE,
    or the FLEETWISE_BENCH_LENGTH_SCALE environment variable). `threads`: torch's threads for
    every system (default: torch's own choice).
    """
    console = make_console(120)
    skip_set, length_scale = _check_options(requests, skip or [], length_scale)
    if repeats < 1 or not static_batch_sizes or min(static_batch_sizes) < 1:
        raise SystemExit("error: --repeats and every static batch size must be at least 1")
    if threads is not None:
        if threads < 1:
            raise SystemExit("error: --threads must be at least 1")
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace_path = resolve_trace(trace)
    model_dir = _model_dir(model, preset, out, console)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    wl = build_workload(trace_path, model_dir, requests, seed, length_scale)
    ws = wl.summary()
    cfg = json.loads((model_dir / "config.json").read_text())
    n_params = _count_params(model_dir)
    _print_setup(console, model_dir, cfg, n_params, device, wl, ws, seed)

    kv_tokens = (KV_CACHE_MIB << 20) // kv_bytes_per_token(cfg)
    order = rotated(_names(skip_set, tuple(static_batch_sizes)), repeats)
    console.print(f"{repeats} rounds, each system once a round: " + " | ".join(", ".join(o) for o in order))
    console.print(("" if "static" in skip_set else f"static: generate() in batches of "
                   f"{', '.join(map(str, static_batch_sizes))}, left padding, EOS off; ")
                  + ("" if "continuous" in skip_set else "continuous: transformers continuous batching, same "
                     "token budget and KV capacity as the core; ")
                  + f"core: LLMEngine, max_num_seqs {MAX_NUM_SEQS}, max_num_batched_tokens "
                    f"{MAX_NUM_BATCHED_TOKENS}, KV {KV_CACHE_MIB} MiB, block {BLOCK_SIZE}")
    systems = _Systems(model_dir, cfg, wl, device, kv_tokens, console)
    runs = run_rounds(order, systems.run)
    at_trace = None
    if length_scale < 1 and runs.get("core"):  # the KV target's measure at the trace's own (fitted) lengths too
        full = build_workload(trace_path, model_dir, min(requests, KV_WASTE_REQUESTS), seed, 1.0)
        at_trace = kv_at_lengths(model_dir, full, device, console)

    import transformers
    config = {
        "model_dir": str(model_dir), "model_name": model_dir.name, "preset": None if model else preset,
        "parameters": n_params, "seed": seed, "requests": requests, "device": device,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "static_batch_sizes": list(static_batch_sizes), "repeats": repeats, "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "kv_cache_mib": KV_CACHE_MIB,
        "kv_capacity_tokens": kv_tokens, "block_size": BLOCK_SIZE,
        "skip": sorted({n for n in skip_set} | set(systems.skipped)),
        "mode": "offline: all requests submitted at t0",
    }
    report = _report(runs, order, {**{n: "--skip" for n in skip_set}, **systems.skipped}, config, ws)
    report["core_kv_at_trace_lengths"] = at_trace
    json_path = write_json(out / "core.json", report)
    png_path = save_plot(lambda p: plot(report, runs, p), out / "core.png", console)
    console.rule("summary")
    print_summary(console, report)
    print_notes(console, report)
    if report.get("warnings"):
        write_json(json_path, report)
    wrote(console, json_path, png_path)
    return report


def _pad_id(model_dir: Path, cfg: dict) -> int:
    """The tokenizer's pad token, else the first of config.json's pad, EOS and BOS ids."""
    tc = model_dir / "tokenizer_config.json"
    tok = model_dir / "tokenizer.json"
    if tc.exists() and tok.exists():
        pad = json.loads(tc.read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        for t in json.loads(tok.read_text()).get("added_tokens", []):
            if t.get("content") == pad:
                return int(t["id"])
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = cfg.get(key)
        if isinstance(v, list):
            if v:
                return int(v[0])
        elif v is not None:
            return int(v)
    return 0


def _count_params(model_dir: Path) -> int:
    """Parameters in the safetensors files."""
    from safetensors import safe_open
    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                n += math.prod(sf.get_slice(k).get_shape())
    return n
