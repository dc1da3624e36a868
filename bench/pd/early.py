"""`fleetwise bench pd-early`: what the early handoff buys in time to first token.

A late handoff moves a prompt's KV after the prefill worker has computed all of it; an early
one (the router's FLEETWISE_KV_EARLY=1, worker/kv/early.py) streams each layer of each chunk
as soon as the forward pass has written it, while the step computes the next layers and
chunked prefill the next chunks (Splitwise's overlap), so that only the last layer's
transfer is left when the prompt is done. Three routers over the same workers:

  colocated   one mixed worker computes the prompt and generates
  late        a prefill worker, then a decode worker that pulls the whole KV
  early       the same two workers, the KV streamed layer by layer as it is computed

The overlap needs a device that computes while the host moves the KV. On this project's CPU
machines the small model's forward pass and the transfer share the cores, so `bench pd
--kv-early` cannot show it; here the workers are modelled (`--modelled-gpu A100
--modelled-forward llama2-70b:tp2`, worker/engine/modelled_device.py): each step waits out
what the simulator's model says Llama-2-70B on two A100s takes, leaving the host's CPU free
as a GPU would, and their KV cache has that model's shape (80 layers x 8 KV heads x 128,
320 KiB a token in float16; no weights are read), so a handoff moves as many bytes as the
real one, through the real lease, stream and pull, over this machine's loopback. That link
is slow (a few GB/s against the simulator's 400 Gbit/s per GPU), which is the case the
overlap is for.

Each chunk budget (`--chunk-tokens`, every worker's token budget per step) is a fleet of its
own; within it the modes take turns request by request, in rotated order, each request with
a prompt of its own (random token ids, never repeated: no prefix cache helps). Smaller
chunks cost the prompt pass more steps. Target: the early handoff's TTFT (its best chunk
budget) within 10% of colocated's (its best), at every prompt length from 2k tokens. The
result goes to OUT/pd_early.json and .png.
"""

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwise.bench.harness import (
    AT_MOST,
    Target,
    figure,
    finish,
    header,
    label_bars,
    make_console,
    mark,
    progress,
    save_plot,
    target_values,
    write_json,
    wrote,
)
from fleetwise.bench.models import preset_model
from fleetwise.bench.pd.e2e import Prompts, complete, kv_counters
from fleetwise.bench.pd.kv import stats
from fleetwise.bench.pd.run import plan_fleet, running, server

MODES = ("colocated", "late", "early")
# the modelled models' KV as a config: (layers, KV heads, head dim), float16
KV_SHAPES = {"llama2-70b": (80, 8, 128), "bloom-176b": (70, 112, 128)}
MAX_TOKENS = 8
TARGET_FROM = 2048  # the target holds from this prompt length on
TARGETS = {"early_ttft_over_colocated": Target(AT_MOST, 1.10, "early handoff TTFT / colocated's (each its best)",
                                               "<= 1.10x")}


def kv_shaped_model(model_dir: Path, forward: str) -> Path:
    """A copy of `model_dir` (tokenizer and config) whose KV cache has the modelled model's
    shape; a modelled worker reads no weights, only the config's KV shape."""
    from fleetwise.sim.perf import MODELS
    from fleetwise.worker.engine.modelled_device import parse_forward
    model, _ = parse_forward(forward)
    layers, heads, dim = KV_SHAPES[model]
    assert 2 * layers * heads * dim * 2 == MODELS[model].kv_bytes_per_token, model
    out = model_dir.parent / f"{model_dir.name}-kv-{model}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, num_key_value_heads=heads, head_dim=dim,
               num_attention_heads=max(heads, cfg["num_attention_heads"]))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _worker_args(name: str, gpu: str, forward: str, chunk: int, longest: int) -> list[str]:
    # room for two prompts a worker (a lease not yet released, the next request) in 16-token blocks
    blocks = 2 * (longest + MAX_TOKENS + 64) // 16 + 16
    return ["--modelled-gpu", gpu, "--modelled-forward", forward, "--max-num-batched-tokens", str(chunk),
            "--num-blocks", str(blocks), "--kv-lease-seconds", "60", "--served-model-name", name]


async def _measure(routers: dict[str, str], decode_url: str, name: str, prompts: Prompts, lengths: list[int],
                   repeats: int, bar: Any, task: Any) -> dict[str, dict[str, list[dict]]]:
    import httpx
    out: dict[str, dict[str, list[dict]]] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0)) as http:
        for L in lengths:  # warm-up: every length through every router once
            for mode in MODES:
                await complete(http, routers[mode], name, prompts.new(L), 2)
        for L in lengths:
            out[str(L)] = {m: [] for m in MODES}
            for i in range(repeats):
                for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
                    bar.update(task, description=f"{L} tokens: {mode} {i + 1}/{repeats}")
                    c0 = await kv_counters(http, decode_url)
                    r = await complete(http, routers[mode], name, prompts.new(L), MAX_TOKENS)
                    c1 = await kv_counters(http, decode_url)
                    out[str(L)][mode].append({"ttft_s": r.ttft_s, "e2e_s": r.e2e_s,
                                              "tokens": r.completion_tokens,
                                              "pull_s": c1["seconds"] - c0["seconds"],
                                              "pull_bytes": c1["bytes"] - c0["bytes"],
                                              "recomputes": c1["recomputes"] - c0["recomputes"]})
                    bar.advance(task)
    return out


def _run_chunk(model_dir: Path, out: Path, gpu: str, forward: str, chunk: int, lengths: list[int], repeats: int,
               console: Console) -> dict[str, dict[str, list[dict]]]:
    """One fleet (prefill, decode, mixed workers; the three routers) at one chunk budget."""
    fleet = plan_fleet(model_dir, _worker_args(model_dir.name, gpu, forward, chunk, lengths[-1]), out, kv_early=True)
    late = server("router-late", ["router", "--config", str(out / "router-disaggregated.yaml"),
                                  "--internal-token-file", str(fleet.token_file)], out / "logs")
    routers = {"colocated": fleet.routers["colocated"], "early": fleet.routers["disaggregated"], "late": late}
    with running([list(routers.values()), fleet.workers], console), progress(console) as bar:
        task = bar.add_task(f"chunks of {chunk}", total=len(lengths) * repeats * len(MODES))
        return asyncio.run(_measure({m: p.url for m, p in routers.items()}, fleet.decode.url, fleet.name,
                                    Prompts(model_dir, seed=chunk), lengths, repeats, bar, task))


def summarize(runs: dict[int, dict[str, dict[str, list[dict]]]], lengths: list[int]) -> dict:
    """Per chunk budget and length, each mode's TTFT; per length, each mode's best budget and
    the ratios to colocated's best; the target's checks."""
    by_chunk: dict[str, dict] = {}
    for chunk, by_length in runs.items():
        rows = {}
        for L, by_mode in by_length.items():
            row: dict[str, Any] = {m: {"ttft_s": stats([t["ttft_s"] for t in trials]),
                                       "pull_s": float(np.median([t["pull_s"] for t in trials])),
                                       "pull_bytes": float(np.median([t["pull_bytes"] for t in trials])),
                                       "recomputes": sum(t["recomputes"] for t in trials),
                                       "trials": trials} for m, trials in by_mode.items()}
            colo = row["colocated"]["ttft_s"]["median"]
            for m in ("late", "early"):
                row[f"{m}_over_colocated"] = row[m]["ttft_s"]["median"] / colo
            rows[L] = row
        by_chunk[str(chunk)] = rows
    best: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    target = TARGETS["early_ttft_over_colocated"]
    for L in map(str, lengths):
        b: dict[str, Any] = {}
        for m in MODES:
            fastest, ttft = min(((c, rows[L][m]["ttft_s"]["median"]) for c, rows in by_chunk.items()),
                                key=lambda x: x[1])
            b[m] = {"ttft_s": ttft, "chunk_tokens": int(fastest)}
        for m in ("late", "early"):
            b[f"{m}_over_colocated"] = b[m]["ttft_s"] / b["colocated"]["ttft_s"]
        best[L] = b
        if int(L) >= TARGET_FROM:
            checks[L] = target.ratio(b["early"]["ttft_s"], b["colocated"]["ttft_s"]).to_json()
    return {"by_chunk": by_chunk, "best": best, "targets": checks}


def print_summary(console: Console, report: dict) -> None:
    t = Table(title="TTFT median s (late / early over colocated at the same chunk budget)")
    t.add_column("chunk budget")
    t.add_column("prompt tokens", justify="right")
    for m in MODES:
        t.add_column(m, justify="right")
    t.add_column("late / colocated", justify="right")
    t.add_column("early / colocated", justify="right")
    t.add_column("pull s late / early", justify="right")
    for chunk, rows in report["by_chunk"].items():
        for L, row in rows.items():
            t.add_row(chunk, L, *(f"{row[m]['ttft_s']['median']:.3f}" for m in MODES),
                      f"{row['late_over_colocated']:.3f}", f"{row['early_over_colocated']:.3f}",
                      f"{row['late']['pull_s']:.3f} / {row['early']['pull_s']:.3f}")
    console.print(t)
    b = Table(title="each mode at its best chunk budget; the target: early / colocated <= 1.10 from "
                    f"{TARGET_FROM} tokens")
    for col in ("prompt tokens", *MODES, "late / colocated", "early / colocated", "target"):
        b.add_column(col, justify="right")
    for L, row in report["best"].items():
        check = report["targets"].get(L)
        b.add_row(L, *(f"{row[m]['ttft_s']:.3f} ({row[m]['chunk_tokens']})" for m in MODES),
                  f"{row['late_over_colocated']:.3f}", f"{row['early_over_colocated']:.3f}",
                  "-" if check is None else mark(check["met"]))
    console.print(b)


def plot(report: dict, path: Path) -> None:
    chunks = list(report["by_chunk"])
    fig, axes = figure(len(chunks) + 1, (5.5 * (len(chunks) + 1), 4.5))
    colors = {"colocated": "#555555", "late": "#c44e52", "early": "#4c72b0"}
    for ax, chunk in zip(axes, chunks):
        rows = report["by_chunk"][chunk]
        x = np.arange(len(rows))
        for j, m in enumerate(MODES):
            vals = [row[m]["ttft_s"]["median"] for row in rows.values()]
            bars = ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=m, color=colors[m])
            if m != "colocated":
                label_bars(ax, bars, [f"{row[f'{m}_over_colocated']:.2f}x" for row in rows.values()], fontsize=7)
        ax.set_xticks(x, list(rows))
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT, s (median)")
        ax.set_title(f"chunks of {chunk} tokens")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    ax = axes[-1]
    best = report["best"]
    x = np.arange(len(best))
    for j, m in enumerate(("late", "early")):
        vals = [row[f"{m}_over_colocated"] for row in best.values()]
        bars = ax.bar(x + (j - 0.5) * 0.35, vals, 0.35, label=m, color=colors[m])
        label_bars(ax, bars, [f"{v:.2f}" for v in vals], fontsize=7)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.axhline(TARGETS["early_ttft_over_colocated"].value, color="green", ls=":", lw=1, label="target (early)")
    ax.set_xticks(x, list(best))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT / colocated's (each at its best chunk budget)")
    ax.set_title("what the handoff adds")
    ax.set_ylim(0.9, max(1.2, *(r["late_over_colocated"] for r in best.values())) * 1.08)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    cfg = report["config"]
    finish(fig, path, f"modelled {cfg['modelled_forward']} on {cfg['modelled_gpu']}, its KV "
                      f"({cfg['kv_bytes_per_token'] // 1024} KiB a token) moved over loopback; "
                      f"{cfg['repeats']} requests per point")


def run_pd_early_bench(out: Path = Path("bench/results"), lengths: list[int] | None = None, repeats: int = 3,
                       chunk_tokens: list[int] | None = None, gpu: str = "A100",
                       forward: str = "llama2-70b:tp2") -> dict:
    """Every chunk budget's fleet in turn; writes OUT/pd_early.json and OUT/pd_early.png."""
    from fleetwise.sim.perf import MODELS
    from fleetwise.worker.engine.modelled_device import parse_forward
    console = make_console(150)
    lengths = sorted(set(lengths or [1024, 2048, 4096]))
    chunks = sorted(set(chunk_tokens or [256, 512, 2048]))
    if lengths[0] < 1 or chunks[0] < 1 or repeats < 1:
        raise SystemExit("error: prompt lengths, chunk budgets and repeats must be at least 1")
    model = parse_forward(forward)[0]
    if model not in KV_SHAPES:
        raise SystemExit(f"error: --modelled-forward: no KV shape for {model!r}; one of {', '.join(KV_SHAPES)}")
    out = Path(out)
    work = out / "pd_early"
    work.mkdir(parents=True, exist_ok=True)
    context = 1 << max(lengths[-1] + MAX_TOKENS, 2048).bit_length()
    model_dir = kv_shaped_model(preset_model(work, "small", console, context=context), forward)
    console.rule("fleetwise bench pd-early")
    console.print(f"modelled {forward} on {gpu}, KV {MODELS[model].kv_bytes_per_token // 1024} KiB a token; prompt "
                  f"lengths {lengths}, chunk budgets {chunks}, {repeats} requests per point and mode")
    runs = {c: _run_chunk(model_dir, work / f"chunks-{c}", gpu, forward, c, lengths, repeats, console)
            for c in chunks}
    report = {**header("pd_early"),
              "config": {"modelled_gpu": gpu, "modelled_forward": forward, "prompt_lengths": lengths,
                         "chunk_tokens": chunks, "repeats": repeats, "max_tokens": MAX_TOKENS,
                         "kv_bytes_per_token": MODELS[model].kv_bytes_per_token, "kv_shape": KV_SHAPES[model],
                         "link": "loopback TCP on this machine, the workers' own KV stream and pull",
                         "ttft": "send to the first streamed token, through the router, one request at a time"},
              **summarize(runs, lengths), "target_values": target_values(TARGETS)}
    json_path = write_json(out / "pd_early.json", report)
    png_path = save_plot(lambda p: plot(report, p), out / "pd_early.png", console)
    print_summary(console, report)
    wrote(console, json_path, png_path)
    shutil.rmtree(work, ignore_errors=True)
    return report
