"""`fleetwise bench core`: the batched inference core against Hugging Face `transformers`.

Three systems run the same trace-shaped requests in one process, one after the other:

  static      `LlamaForCausalLM.generate()` in static batches (arrival order, left padding);
              every row of a batch decodes until the longest request of the batch is done
  continuous  transformers' own continuous batching (`continuous_batching_context_manager`,
              the machinery behind `generate_batch`), over its paged cache
  core        fleetwise's `LLMEngine`, driven step by step in the same process (no HTTP)

The workload (bench/core/workload.py), the baselines (baselines.py), the core (engine.py)
and the report (report.py) each have their own module; this one runs them in turn.

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

import torch
from rich.console import Console

from fleetwise.bench.core.baselines import (
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    load_hf_model,
    run_continuous,
    run_static,
)
from fleetwise.bench.core.engine import BLOCK_SIZE, KV_CACHE_MIB, run_core
from fleetwise.bench.core.report import TARGETS, agreement, measured, plot, print_notes, print_summary
from fleetwise.bench.core.result import SYSTEM_LABELS, SystemResult
from fleetwise.bench.core.workload import Workload, build_workload, resolve_trace
from fleetwise.bench.harness import header, make_console, save_plot, target_values, write_json, wrote
from fleetwise.bench.models import kv_bytes_per_token, preset_model

# Work knobs. The trace fitted to a 2048-token context averages ~620 tokens per request,
# ~124k tokens for 200 requests: on a quiet 2-core CPU the three systems together take ~17
# minutes at those lengths (transformers' continuous batching alone ~10), ~3 minutes at
# 0.4 of them. The extra factor keeps a default run well inside ten minutes there, with room
# for a busy machine; override it with FLEETWISE_BENCH_LENGTH_SCALE (1.0: the fitted lengths).
DEFAULT_LENGTH_SCALE = 0.4
STATIC_BATCH_SIZE = 16
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


def _run_baselines(model_dir: Path, cfg: dict, wl: Workload, device: str, skip: set[str], batch_size: int,
                   kv_tokens: int, console: Console) -> tuple[dict[str, SystemResult], dict[str, str]]:
    """The transformers systems not skipped; those that could not run, with the reason."""
    results: dict[str, SystemResult] = {}
    skipped = {n: "--skip" for n in skip}
    if {"static", "continuous"} <= skip:
        return results, skipped
    try:
        hf_model = load_hf_model(model_dir, torch.device(device))
    except Exception as exc:  # both baselines need it
        reason = f"transformers could not load the model: {type(exc).__name__}: {exc}"
        return results, {**{n: reason for n in ("static", "continuous")}, **skipped}
    if "static" not in skipped:
        console.print(f"[bold]static[/bold]: generate() in batches of {batch_size}, left padding, EOS off")
        results["static"] = run_static(hf_model, wl.requests, batch_size, _pad_id(model_dir, cfg), console)
    if "continuous" not in skipped:
        console.print("[bold]continuous[/bold]: transformers continuous batching, same token budget and "
                      "KV capacity as the core")
        try:
            results["continuous"] = run_continuous(hf_model, wl.requests, kv_tokens, console)
        except Exception as exc:
            skipped["continuous"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[yellow]continuous batching skipped: {skipped['continuous']}[/yellow]")
    return results, skipped


def _report(results: dict[str, SystemResult], skipped: dict[str, str], config: dict, ws: dict) -> dict:
    core = results["core"]
    systems: dict[str, dict] = {n: r.to_json() for n, r in results.items()}
    for n, why in skipped.items():
        systems[n] = {"label": SYSTEM_LABELS[n], "skipped": why}
    ratios = {f"core_over_{n}": core.tokens_per_s / results[n].tokens_per_s if n in results else None
              for n in ("static", "continuous")}
    report = {**header("core"), "config": config, "workload": ws, "systems": systems, "ratios": ratios}
    report["targets"] = {k: t.met(measured(report, k)) for k, t in TARGETS.items()}
    report["target_values"] = target_values(TARGETS)
    report["greedy_agreement_with_core"] = {n: agreement(core, results[n]) for n in ("static", "continuous")
                                            if n in results}
    return report


def run_core_bench(requests: int = 200, preset: str = "small", model: Path | None = None,
                   trace: Path | None = None, out: Path = Path("bench/results"), seed: int = 0,
                   skip: list[str] | None = None, length_scale: float | None = None,
                   static_batch_size: int = STATIC_BATCH_SIZE) -> dict:
    """Run the three systems on the same requests; write OUT/core.json and OUT/core.png.

    `length_scale` multiplies the context-fitted trace lengths (default DEFAULT_LENGTH_SCALE,
    or the FLEETWISE_BENCH_LENGTH_SCALE environment variable).
    """
    console = make_console(120)
    skip_set, length_scale = _check_options(requests, skip or [], length_scale)
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
    results, skipped = _run_baselines(model_dir, cfg, wl, device, skip_set, static_batch_size, kv_tokens, console)
    console.print(f"[bold]core[/bold]: LLMEngine, max_num_seqs {MAX_NUM_SEQS}, max_num_batched_tokens "
                  f"{MAX_NUM_BATCHED_TOKENS}, KV {KV_CACHE_MIB} MiB, block {BLOCK_SIZE}")
    results["core"], _ = run_core(model_dir, wl.requests, device, console)

    import transformers
    config = {
        "model_dir": str(model_dir), "model_name": model_dir.name, "preset": None if model else preset,
        "parameters": n_params, "seed": seed, "requests": requests, "device": device,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "static_batch_size": static_batch_size, "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "kv_cache_mib": KV_CACHE_MIB,
        "kv_capacity_tokens": kv_tokens, "block_size": BLOCK_SIZE, "skip": sorted(skip_set),
        "mode": "offline: all requests submitted at t0",
    }
    report = _report(results, skipped, config, ws)
    json_path = write_json(out / "core.json", report)
    png_path = save_plot(lambda p: plot(report, results, p), out / "core.png", console)
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
