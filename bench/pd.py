"""`fleetwise bench pd`: prefill/decode disaggregation on one machine.

Two measurements, each against a baseline taken in the same run:

  KV transfer   a prompt's keys and values pulled from a prefill worker
                (GET /internal/kv/{handle}), read and checked by the decode worker's own code
                (kv_transfer.decode with the header it expects) and copied into a cache-shaped
                buffer, against a plain loopback TCP copy of the same number of bytes between
                two processes (sendall from one buffer, recv_into another). A third kind of
                trial only reads the same stream off the wire, which splits the pull's time
                into the sender and HTTP on one side and the receiver's checks and copies on
                the other. Trials rotate their order so that load from elsewhere hits all alike.
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

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetwise.net import free_port

MAX_TOKENS = 32           # completion tokens per end-to-end request
WARMUP_MAX_TOKENS = 4
KV_CACHE_MIB = 1024       # per worker
MIN_BATCHED_TOKENS = 4096
MIN_KV_TRIALS = 5         # KV pulls (and socket copies) per prompt length, at least
KV_LEASE_SECONDS = 300.0  # the benchmark pulls one lease several times
READY_TIMEOUT_S = 300.0
TARGET_LENGTH = 2048      # the end-to-end target is stated for 2k-token prompts

TARGETS = {  # measured value -> (comparison, target)
    "kv_over_socket": (">=", 0.5),
    "disaggregated_over_colocated_e2e": ("<=", 1.10),
}

MODES = ("disaggregated", "colocated")
# per KV trial: the full pull as the decode worker does it, the same stream only read off the
# wire (what the prefill side and HTTP cost without the receiver's checks and copies), and the
# raw socket copy of the same number of bytes
KV_TRIAL_KINDS = ("kv", "http_read", "socket")


# -- processes ------------------------------------------------------------------------------



def _tail(path: Path, n: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _wait_healthy(procs, timeout: float, console) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    pending = list(procs)
    with console.status("starting workers and routers") as status:
        while pending:
            for p in list(pending):
                if p.exited is not None:
                    raise SystemExit(f"error: {p.name} exited ({p.exited}); last lines of {p.log}:\n{_tail(p.log)}")
                try:
                    r = httpx.get(p.url + "/health", timeout=1.0)
                    if r.status_code == 200 and r.json().get("status") == "ok":
                        pending.remove(p)
                except (httpx.HTTPError, ValueError):
                    pass
            status.update(f"starting workers and routers: {len(procs) - len(pending)}/{len(procs)} healthy")
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise SystemExit(f"error: not healthy after {timeout:.0f}s: {names}; last lines of "
                                 f"{pending[0].log}:\n{_tail(pending[0].log)}")
            if pending:
                time.sleep(0.3)


# -- the raw socket baseline ----------------------------------------------------------------

# A separate process, as the prefill worker is: on each request (8 bytes, little-endian
# length) it sends that many bytes of one random buffer. It exits when its stdin closes,
# so that it never outlives the benchmark.
_SOCKET_SERVER = r"""
import os, socket, struct, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
size = int(sys.argv[1])
buf = memoryview(bytearray(os.urandom(size)))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = b""
            while len(head) < 8:
                part = conn.recv(8 - len(head))
                if not part:
                    break
                head += part
            if len(head) < 8:
                break
            (n,) = struct.unpack("<Q", head)
            conn.sendall(buf[:n])
"""


class SocketCopy:
    """Client side of the baseline: one connection, reads with 4 MiB recv_into calls."""

    def __init__(self, max_bytes: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _SOCKET_SERVER, str(max_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = self.proc.stdout.readline()
            if not line.strip():
                raise SystemExit("error: the loopback socket server did not start")
            self.sock = socket.create_connection(("127.0.0.1", int(line)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.buf = bytearray(max_bytes)

    def copy(self, n: int) -> float:
        view = memoryview(self.buf)
        t0 = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", n))
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], min(n - got, 4 << 20))
            if k == 0:
                raise RuntimeError("the socket server closed the connection")
            got += k
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.sock.close()
            self.proc.stdin.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- requests -------------------------------------------------------------------------------


class Prompts:
    """Random token-id prompts, never repeated, without special tokens."""

    def __init__(self, model_dir: Path, seed: int = 0):
        cfg = json.loads((model_dir / "config.json").read_text())
        tok = json.loads((model_dir / "tokenizer.json").read_text())
        special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special", True)}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = cfg.get(key)
            special |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
        self.allowed = np.array([i for i in range(int(cfg["vocab_size"])) if i not in special])
        self.rng = np.random.default_rng(seed)
        self.seen: set[tuple[int, ...]] = set()

    def new(self, n: int) -> list[int]:
        while True:
            ids = self.rng.choice(self.allowed, size=n).tolist()
            if tuple(ids[:16]) not in self.seen:  # distinct from the first block on
                self.seen.add(tuple(ids[:16]))
                return ids


@dataclass
class E2EResult:
    e2e_s: float
    ttft_s: float | None
    completion_tokens: int | None
    text: str
    kv_seconds: float | None = None   # disaggregated: the decode worker's pull, from its metrics
    kv_bytes: float | None = None
    recomputed: float | None = None


async def complete(http, router_url: str, model: str, prompt: list[int], max_tokens: int) -> E2EResult:
    import orjson
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    ttft, text, usage = None, [], None
    t0 = time.perf_counter()
    async with http.stream("POST", router_url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{router_url} answered {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = orjson.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{router_url} failed mid-stream: {obj['error']}")
            if obj.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(obj["choices"][0].get("text") or "")
            if obj.get("usage"):
                usage = obj["usage"]
    e2e = time.perf_counter() - t0
    return E2EResult(e2e, ttft, usage.get("completion_tokens") if usage else None, "".join(text))


async def prefill(http, url: str, model: str, prompt: list[int]) -> dict:
    r = await http.post(url + "/internal/prefill", json={"kind": "completion", "request": {
        "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}})
    if r.status_code != 200:
        raise RuntimeError(f"prefill at {url} answered {r.status_code}: {r.text[:500]}")
    first = r.json()
    if not first.get("handle"):
        raise RuntimeError(f"the prefill worker holds no KV for the prompt: {first}")
    return first


async def pull_kv(session, url: str, handle: str, expect, sink) -> tuple[int, float]:
    """Exactly as the decode worker pulls (kv_transfer.pull): stream, check every layer,
    copy it into cache-shaped tensors. Returns (bytes on the wire, seconds)."""
    from fleetwise.worker.kv.transfer import pull
    t0 = time.perf_counter()
    received = await pull(session, url, handle, expect, sink.slot_copy)
    return received, time.perf_counter() - t0


async def read_kv(session, url: str, handle: str) -> tuple[int, float]:
    """The stream read off the wire with the same client and dropped: no checks, no copies."""
    received = 0
    t0 = time.perf_counter()
    async with session.get(f"{url}/internal/kv/{handle}") as r:
        if r.status != 200:
            raise RuntimeError(f"the prefill worker answered {r.status}")
        async for chunk in r.content.iter_any():
            received += len(chunk)
    return received, time.perf_counter() - t0


class _Sink:
    """Stand-in for the decode worker's cache. The worker copies whole blocks at a time
    (LLMEngine.write_kv); blocks here are consecutive, so one copy per layer and kind."""

    def __init__(self, num_layers: int, num_tokens: int, heads: int, head_dim: int, dtype):
        import torch
        self.caches = [torch.empty(2, num_tokens, heads, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.slots = torch.arange(num_tokens)

    def slot_copy(self, layer: int, k, v) -> None:
        cache = self.caches[layer]
        cache[0].copy_(k)
        cache[1].copy_(v)


def _metric_values(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def kv_counters(http, url: str) -> dict[str, float]:
    """The decode worker's own view of its pulls: seconds, count, bytes, recomputes."""
    r = await http.get(url + "/metrics")
    vals = _metric_values(r.text)

    def total(name: str, **want) -> float:
        return sum(v for (n, labels), v in vals.items()
                   if n == name and all(dict(labels).get(k) == w for k, w in want.items()))
    return {"seconds": total("fleetwise_kv_transfer_seconds_sum"),
            "pulls": total("fleetwise_kv_transfer_seconds_count"),
            "bytes": total("fleetwise_kv_transfer_bytes_total", direction="received"),
            "recomputes": total("fleetwise_kv_recomputes_total")}


# -- statistics and report ---------------------------------------------------------------


def stats(values) -> dict | None:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return None
    return {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),
            "max": float(a.max()), "std": float(a.std()), "n": int(a.size)}


def _check(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[name]
    return value >= target if op == ">=" else value <= target


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]yes[/green]" if ok else "[red]no[/red]")


def _mbs(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:,.0f}"


def print_summary(console, report: dict) -> None:
    from rich.table import Table
    kv = report["kv_transfer"]["by_length"]
    t = Table(title="KV transfer (median of trials, MB/s): full pull (HTTP + check + copy into a cache), the same "
                    "stream only read, and a raw loopback socket copy of the same bytes")
    for col in ("prompt tokens", "stream MiB", "KV pull ms", "KV MB/s", "HTTP read MB/s", "socket ms",
                "socket MB/s", "KV / socket", "best / best", ">= 50%", "decode worker MB/s"):
        t.add_column(col, justify="right")
    for L, row in kv.items():
        dw = report["e2e"]["by_length"].get(L, {}).get("disaggregated", {}).get("decode_worker_kv_bps")
        t.add_row(L, f"{row['bytes'] / 2**20:.1f}", f"{row['kv_s']['median'] * 1e3:.1f}", _mbs(row["kv_bps"]),
                  _mbs(row["http_read_bps"]), f"{row['socket_s']['median'] * 1e3:.1f}", _mbs(row["socket_bps"]),
                  f"{row['ratio'] * 100:.1f}%", f"{row['ratio_best'] * 100:.1f}%",
                  _mark(row["ratio"] >= TARGETS["kv_over_socket"][1]), _mbs(dw))
    agg = report["kv_transfer"]["overall"]
    t.add_row("all", f"{agg['bytes'] / 2**20:.1f}", f"{agg['kv_s'] * 1e3:.1f}", _mbs(agg["kv_bps"]),
              _mbs(agg["http_read_bps"]), f"{agg['socket_s'] * 1e3:.1f}", _mbs(agg["socket_bps"]),
              f"{agg['ratio'] * 100:.1f}%", "", _mark(agg["ratio"] >= TARGETS["kv_over_socket"][1]), "",
              style="bold")
    console.print(t)

    e = Table(title=f"end to end, {report['config']['max_tokens']} output tokens, streamed through the router "
                    "(median of repeats; mean in brackets)")
    for col in ("prompt tokens", "disagg E2E ms", "coloc E2E ms", "disagg / coloc", "disagg TTFT ms",
                "coloc TTFT ms", "decode-side KV pull ms", "same text"):
        e.add_column(col, justify="right")
    for L, row in report["e2e"]["by_length"].items():
        d, c = row["disaggregated"], row["colocated"]
        pull = d.get("decode_worker_kv_s")
        e.add_row(L, f"{d['e2e_s']['median'] * 1e3:.0f} ({d['e2e_s']['mean'] * 1e3:.0f})",
                  f"{c['e2e_s']['median'] * 1e3:.0f} ({c['e2e_s']['mean'] * 1e3:.0f})",
                  f"{row['ratio_median']:.3f} ({row['ratio_mean']:.3f})",
                  f"{d['ttft_s']['median'] * 1e3:.0f}" if d["ttft_s"] else "-",
                  f"{c['ttft_s']['median'] * 1e3:.0f}" if c["ttft_s"] else "-",
                  f"{pull['median'] * 1e3:.1f}" if pull else "-",
                  f"{row['same_text']}/{row['requests']}")
    console.print(e)

    c = Table(title="targets")
    for col in ("measure", "measured", "target", "met"):
        c.add_column(col)
    tv = report["targets"]
    kv_all = report["kv_transfer"]["worst_ratio"]
    c.add_row("KV transfer / raw socket copy (worst prompt length)",
              "-" if kv_all is None else f"{kv_all * 100:.1f}%", ">= 50%", _mark(tv["kv_over_socket"]))
    r = report["e2e"]["target_ratio"]
    c.add_row(f"disaggregated / colocated E2E at {TARGET_LENGTH} tokens (median)",
              "-" if r is None else f"{r:.3f}", "<= 1.10", _mark(tv["disaggregated_over_colocated_e2e"]))
    console.print(c)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    e2e = report["e2e"]["by_length"]
    lengths = [int(L) for L in e2e]
    colors = {"disaggregated": "#dd8452", "colocated": "#4c72b0"}
    for mode in MODES:
        med = [e2e[str(L)][mode]["e2e_s"]["median"] * 1e3 for L in lengths]
        lo = [e2e[str(L)][mode]["e2e_s"]["min"] * 1e3 for L in lengths]
        hi = [e2e[str(L)][mode]["e2e_s"]["max"] * 1e3 for L in lengths]
        ax.plot(lengths, med, marker="o", color=colors[mode], label=f"{mode} E2E")
        ax.fill_between(lengths, lo, hi, color=colors[mode], alpha=0.15)
        ttft = [(e2e[str(L)][mode]["ttft_s"] or {}).get("median", np.nan) * 1e3 for L in lengths]
        ax.plot(lengths, ttft, marker=".", ls="--", color=colors[mode], label=f"{mode} TTFT")
    for L in lengths:
        ax.annotate(f"{e2e[str(L)]['ratio_median']:.2f}x", (L, e2e[str(L)]["disaggregated"]["e2e_s"]["median"] * 1e3),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms (median; band: min..max)")
    ax.set_title(f"end to end, {report['config']['max_tokens']} output tokens (labels: disagg / coloc)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    kv = report["kv_transfer"]["by_length"]
    klen = list(kv)
    x = np.arange(len(klen))
    w = 0.27
    kv_b = [kv[L]["kv_bps"] / 1e6 for L in klen]
    rd_b = [kv[L]["http_read_bps"] / 1e6 for L in klen]
    so_b = [kv[L]["socket_bps"] / 1e6 for L in klen]
    ax.bar(x - w, kv_b, w, label="KV pull (HTTP, checked, copied into a cache)", color="#dd8452")
    ax.bar(x, rd_b, w, label="same stream, only read", color="#e8b48f")
    ax.bar(x + w, so_b, w, label="raw loopback socket copy", color="#999999")
    for i, L in enumerate(klen):
        ax.annotate(f"{kv[L]['ratio'] * 100:.0f}%", (x[i] - w, kv_b[i]), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{kv[L]['http_read_ratio'] * 100:.0f}%", (x[i], rd_b[i]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=max(so_b + kv_b + rd_b) * 5)  # room for the legend above the bars
    ax.set_xticks(x, [f"{L}\n({kv[L]['bytes'] / 2**20:.0f} MiB)" for L in klen])
    ax.set_xlabel("prompt tokens (KV stream size)")
    ax.set_ylabel("MB/s (median of trials)")
    ax.set_title("KV transfer vs socket copy of the same bytes (labels: share of socket)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    cfg = report["config"]
    fig.suptitle(f"fleetwise bench pd: {cfg['model_name']} ({cfg['device']}, {cfg['cpu_count']} CPUs), "
                 f"{cfg['repeats']} request(s) per length and mode", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Fleet:
    name: str
    prefill: object
    decode: object
    mixed: object
    routers: dict = field(default_factory=dict)


def _model_dir(out: Path, preset: str, need: int, console) -> tuple[Path, dict]:
    from fleetwise.worker.model.files import PRESETS, write_model
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    context = PRESETS[preset].max_position_embeddings
    note = None
    if need > context:
        longer = context
        while longer < need:
            longer *= 2
        note = (f"the {preset} preset's context ({context} tokens) does not hold the longest prompt plus "
                f"{MAX_TOKENS} output tokens ({need}); this run writes the {preset} preset with "
                f"max_position_embeddings={longer} (same seed and weights, rope unchanged)")
        model_dir, overrides = out / "models" / f"{preset}-ctx{longer}", {"max_position_embeddings": longer}
        context = longer
    else:
        model_dir, overrides = out / "models" / preset, {}
    cfg_path = model_dir / "config.json"
    if not (cfg_path.exists() and json.loads(cfg_path.read_text()).get("max_position_embeddings") == context):
        with console.status(f"writing the {preset} model to {model_dir}"):
            write_model(model_dir, preset, seed=0, **overrides)
    return model_dir.resolve(), {"context": context, "context_override": overrides or None, "note": note}


def run_pd_bench(out: Path = Path("bench/results"), preset: str = "small",
                 prompt_lengths: list[int] | None = None, repeats: int = 3) -> dict:
    """Start the fleet, measure, stop it; write OUT/pd.json and OUT/pd.png. Returns the report."""
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the tables
        console = Console(width=max(console.width, 150))
    prompt_lengths = sorted(set(prompt_lengths or [512, 1024, 2048, 4096]))
    if prompt_lengths[0] < 1:
        raise SystemExit("error: prompt lengths must be at least 1")
    if repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    need = prompt_lengths[-1] + MAX_TOKENS
    model_dir, ctx = _model_dir(out, preset, need, console)

    from fleetwise.up import Proc, stop_all
    name = model_dir.name
    batched = max(MIN_BATCHED_TOKENS, need)
    worker_args = ["--kv-cache-mib", str(KV_CACHE_MIB), "--max-num-batched-tokens", str(batched),
                   "--kv-lease-seconds", str(KV_LEASE_SECONDS), "--served-model-name", name]
    logs = out / "logs"
    procs: list[Proc] = []
    for role in ("prefill", "decode", "mixed"):
        port = free_port()
        procs.append(Proc(role, role, port, ["worker", "--model", str(model_dir), "--role", role,
                                             "--port", str(port), *worker_args], logs / f"{role}.log"))
    fleet = Fleet(name, *procs)
    configs = {"disaggregated": {"models": [{"name": name, "prefill": [fleet.prefill.url],
                                             "decode": [fleet.decode.url]}]},
               "colocated": {"models": [{"name": name, "mixed": [fleet.mixed.url]}]}}
    import yaml
    for mode, cfg in configs.items():
        path = out / f"router-{mode}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        r = Proc(f"router-{mode}", "router", port, ["router", "--config", str(path), "--port", str(port)],
                 logs / f"router-{mode}.log")
        fleet.routers[mode] = r
        procs.append(r)

    load_before = os.getloadavg()
    console.rule("fleetwise bench pd")
    cfg_json = json.loads((model_dir / "config.json").read_text())
    console.print(f"model {model_dir} ({cfg_json['num_hidden_layers']} layers, {cfg_json['num_key_value_heads']} KV "
                  f"heads x {cfg_json['head_dim']}, context {ctx['context']})")
    if ctx["note"]:
        console.print(f"[yellow]note:[/yellow] {ctx['note']}")
    console.print(f"prompt lengths {prompt_lengths}, {repeats} request(s) per length and mode, {MAX_TOKENS} output "
                  f"tokens; workers: KV cache {KV_CACHE_MIB} MiB, max_num_batched_tokens {batched}; "
                  f"load average before start {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    if load_before[0] > 0.5:
        console.print("[yellow]note:[/yellow] the machine is busy with other work; timings may be noisy")
    sock = None

    def on_term(signum, frame):  # stop the fleet on SIGTERM as on Ctrl-C
        raise SystemExit(128 + signum)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        for p in procs:
            if p.log.exists():
                p.log.unlink()
            p.start()
        _wait_healthy(procs, READY_TIMEOUT_S, console)
        sock = SocketCopy(need * _kv_bytes_per_token(cfg_json) + (1 << 20))
        report = asyncio.run(_measure(fleet, model_dir, cfg_json, prompt_lengths, repeats, sock, console))
    finally:
        if sock is not None:
            sock.close()
        with console.status("stopping workers and routers"):
            stop_all(procs)
        signal.signal(signal.SIGTERM, old_term)
    load_after = os.getloadavg()

    import torch
    report["config"] = {
        "model_dir": str(model_dir), "model_name": name, "preset": preset, **ctx,
        "prompt_lengths": prompt_lengths, "repeats": repeats, "max_tokens": MAX_TOKENS,
        "kv_cache_mib": KV_CACHE_MIB, "max_num_batched_tokens": batched, "kv_lease_seconds": KV_LEASE_SECONDS,
        "worker_args": worker_args, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "kv_trials_per_length": max(MIN_KV_TRIALS, repeats),
        "request": "streamed /v1/completions through the router, temperature 0, ignore_eos, "
                   "random token-id prompts distinct per request",
        "kv_measure": "GET /internal/kv/{handle} through kv_transfer.pull (aiohttp, as the decode worker), "
                      "header, index_copy_ into cache-shaped tensors (as the decode worker); http_read: the same "
                      "stream only read; baseline: loopback TCP, another process sendall()s the same number of "
                      "bytes, recv_into 4 MiB at a time; trials rotate the order of the three",
    }
    if ctx["note"]:
        report["notes"].insert(0, ctx["note"])
    if max(load_before[0], load_after[0]) > 0.5:
        report["notes"].append(f"other work ran on the machine (load average {load_before[0]:.2f} before, "
                               f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs): timings are noisy")
    report = {"benchmark": "pd", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
    json_path, png_path = out / "pd.json", out / "pd.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, png_path)
    except Exception as exc:  # the numbers matter more than the picture
        console.print(f"[yellow]plot not written: {type(exc).__name__}: {exc}[/yellow]")
        png_path = None
    console.rule("summary")
    print_summary(console, report)
    for line in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {line}")
    console.print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return report


def _kv_bytes_per_token(cfg: dict) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # float32 at most


async def _measure(fleet: Fleet, model_dir: Path, cfg: dict, lengths: list[int], repeats: int,
                   sock: SocketCopy, console) -> dict:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fleetwise.worker.engine.runner import resolve_device, resolve_dtype
    from fleetwise.worker.kv.transfer import DTYPE_NAMES, KVHeader
    from fleetwise.worker.model.files import model_id
    from fleetwise.worker.model.llama import DTYPES

    dtype = resolve_dtype("auto", resolve_device("auto"))  # what the workers resolve "auto" to
    mid = model_id(model_dir)
    prompts = Prompts(model_dir, seed=0)
    name = fleet.name
    trials = max(MIN_KV_TRIALS, repeats)
    notes: list[str] = []
    timeout = httpx.Timeout(600.0, connect=5.0)
    http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
    import aiohttp
    kv_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), read_bufsize=1 << 20)
    routers = {m: fleet.routers[m].url for m in MODES}
    steps = 2 * len(lengths) + len(lengths) * (1 + len(KV_TRIAL_KINDS) * trials) + 2 * len(lengths) * repeats
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("warm-up", total=steps)

            # warm-up: every length once through both routers (shapes, allocator, connections)
            for L in lengths:
                for mode in MODES:
                    progress.update(task, description=f"warm-up {mode} {L}")
                    await complete(http, routers[mode], name, prompts.new(L), WARMUP_MAX_TOKENS)
                    progress.advance(task)

            # KV transfer vs the raw socket, trials interleaved
            kv_rows: dict[str, dict] = {}
            for L in lengths:
                progress.update(task, description=f"KV transfer: prefill {L}")
                first = await prefill(http, fleet.prefill.url, name, prompts.new(L))
                if first["model_id"] != mid:
                    notes.append(f"the prefill worker's model id {first['model_id']} differs from the files' {mid}")
                progress.advance(task)
                expect = KVHeader(first["model_id"], DTYPE_NAMES[dtype], cfg["num_hidden_layers"],
                                  cfg["num_key_value_heads"], cfg["head_dim"], 0, L)
                sink = _Sink(cfg["num_hidden_layers"], L, cfg["num_key_value_heads"], cfg["head_dim"],
                             DTYPES[expect.dtype])
                times: dict[str, list[float]] = {k: [] for k in KV_TRIAL_KINDS}
                try:
                    nbytes, _ = await pull_kv(kv_session, fleet.prefill.url, first["handle"], expect, sink)  # warm
                    for i in range(trials):
                        progress.update(task, description=f"KV transfer {L}: trial {i + 1}/{trials}")
                        k = i % len(KV_TRIAL_KINDS)  # rotate the order, so that drift hits all alike
                        for kind in KV_TRIAL_KINDS[k:] + KV_TRIAL_KINDS[:k]:
                            if kind == "socket":
                                times[kind].append(sock.copy(nbytes))
                            else:
                                if kind == "kv":
                                    n, t = await pull_kv(kv_session, fleet.prefill.url, first["handle"], expect, sink)
                                else:
                                    n, t = await read_kv(kv_session, fleet.prefill.url, first["handle"])
                                if n != nbytes:
                                    raise RuntimeError(f"KV stream sizes differ between pulls: {nbytes} vs {n}")
                                times[kind].append(t)
                            progress.advance(task)
                finally:
                    await http.delete(f"{fleet.prefill.url}/internal/kv/{first['handle']}")
                if nbytes != expect.payload_bytes * expect.num_layers + _framing(expect):
                    notes.append(f"{L} tokens: {nbytes} bytes on the wire, not the payload plus framing")
                med = {k: float(np.median(v)) for k, v in times.items()}
                kv_rows[str(L)] = {
                    "bytes": nbytes, "payload_bytes": expect.payload_bytes * expect.num_layers,
                    "kv_s": stats(times["kv"]), "http_read_s": stats(times["http_read"]),
                    "socket_s": stats(times["socket"]),
                    "kv_trials_s": times["kv"], "http_read_trials_s": times["http_read"],
                    "socket_trials_s": times["socket"],
                    "kv_bps": nbytes / med["kv"], "http_read_bps": nbytes / med["http_read"],
                    "socket_bps": nbytes / med["socket"],
                    "kv_bps_best": nbytes / min(times["kv"]), "socket_bps_best": nbytes / min(times["socket"]),
                    "ratio": med["socket"] / med["kv"], "ratio_best": min(times["socket"]) / min(times["kv"]),
                    "http_read_ratio": med["socket"] / med["http_read"],
                }
                del sink
            tot_b = sum(r["bytes"] for r in kv_rows.values())
            tot_kv = sum(r["kv_s"]["median"] for r in kv_rows.values())
            tot_rd = sum(r["http_read_s"]["median"] for r in kv_rows.values())
            tot_so = sum(r["socket_s"]["median"] for r in kv_rows.values())
            overall = {"bytes": tot_b, "kv_s": tot_kv, "http_read_s": tot_rd, "socket_s": tot_so,
                       "kv_bps": tot_b / tot_kv, "http_read_bps": tot_b / tot_rd, "socket_bps": tot_b / tot_so,
                       "ratio": tot_so / tot_kv, "http_read_ratio": tot_so / tot_rd}

            # end to end: the same prompt through both routers, order alternating
            before = await kv_counters(http, fleet.decode.url)
            runs: dict[str, dict[str, list[E2EResult]]] = {}
            for L in lengths:
                runs[str(L)] = {m: [] for m in MODES}
                for i in range(repeats):
                    prompt = prompts.new(L)
                    order = MODES if i % 2 == 0 else MODES[::-1]
                    for mode in order:
                        progress.update(task, description=f"end to end {L}: {mode} {i + 1}/{repeats}")
                        if mode == "disaggregated":
                            c0 = await kv_counters(http, fleet.decode.url)
                        res = await complete(http, routers[mode], name, prompt, MAX_TOKENS)
                        if mode == "disaggregated":
                            c1 = await kv_counters(http, fleet.decode.url)
                            if c1["pulls"] > c0["pulls"]:
                                res.kv_seconds = c1["seconds"] - c0["seconds"]
                            res.kv_bytes = c1["bytes"] - c0["bytes"]
                            res.recomputed = c1["recomputes"] - c0["recomputes"]
                        if res.completion_tokens != MAX_TOKENS:
                            notes.append(f"{mode} {L}: {res.completion_tokens} completion tokens, not {MAX_TOKENS}")
                        runs[str(L)][mode].append(res)
                        progress.advance(task)
            after = await kv_counters(http, fleet.decode.url)
    finally:
        await http.aclose()
        await kv_session.close()

    e2e_rows = {}
    for L, by_mode in runs.items():
        row = {}
        for mode, rs in by_mode.items():
            row[mode] = {"e2e_s": stats([r.e2e_s for r in rs]), "ttft_s": stats([r.ttft_s for r in rs]),
                         "e2e_trials_s": [r.e2e_s for r in rs], "ttft_trials_s": [r.ttft_s for r in rs],
                         "completion_tokens": [r.completion_tokens for r in rs]}
        d = by_mode["disaggregated"]
        pulls = [r.kv_seconds for r in d if r.kv_seconds is not None]
        kvb = [r.kv_bytes for r in d if r.kv_seconds is not None]
        row["disaggregated"]["decode_worker_kv_s"] = stats(pulls)
        row["disaggregated"]["decode_worker_kv_bps"] = (sum(kvb) / sum(pulls)) if pulls and sum(pulls) > 0 else None
        row["disaggregated"]["kv_recomputes"] = sum(r.recomputed or 0 for r in d)
        de, ce = row["disaggregated"]["e2e_s"], row["colocated"]["e2e_s"]
        row["ratio_median"] = de["median"] / ce["median"]
        row["ratio_mean"] = de["mean"] / ce["mean"]
        row["ttft_ratio_median"] = (row["disaggregated"]["ttft_s"]["median"] / row["colocated"]["ttft_s"]["median"]
                                    if row["disaggregated"]["ttft_s"] and row["colocated"]["ttft_s"] else None)
        row["e2e_delta_ms_median"] = (de["median"] - ce["median"]) * 1e3
        row["same_text"] = sum(a.text == b.text for a, b in zip(d, by_mode["colocated"]))
        row["requests"] = len(d)
        e2e_rows[L] = row
        if row["disaggregated"]["kv_recomputes"]:
            notes.append(f"{L} tokens: {row['disaggregated']['kv_recomputes']:.0f} disaggregated requests "
                         "recomputed the prompt instead of pulling its KV (see the decode log)")

    target_ratio = e2e_rows.get(str(TARGET_LENGTH), {}).get("ratio_median")
    if target_ratio is None:
        notes.append(f"no {TARGET_LENGTH}-token prompts in this run: the end-to-end target is not checked")
    else:
        row = e2e_rows[str(TARGET_LENGTH)]
        spread = max((row[m]["e2e_s"]["max"] - row[m]["e2e_s"]["min"]) / row[m]["e2e_s"]["median"] for m in MODES)
        if spread > 0.10:
            notes.append(f"end to end at {TARGET_LENGTH} tokens: repeats of one mode differ by up to "
                         f"{spread * 100:.0f}% of their median, more than the 10% target allows; for a firm "
                         "check use more --repeats on a quiet machine")
    if kv_rows:
        share = sum(r["http_read_s"]["median"] for r in kv_rows.values()) / sum(
            r["kv_s"]["median"] for r in kv_rows.values())
        notes.append(f"KV pull time (all lengths, medians): {share * 100:.0f}% passes before the stream has "
                     f"arrived (the same stream only read), {100 - share * 100:.0f}% goes to the receiver's checks "
                     "and copies")
    worst = min((r["ratio"] for r in kv_rows.values()), default=None)
    decode_view = {k: after[k] - before[k] for k in after}
    decode_view["bps"] = decode_view["bytes"] / decode_view["seconds"] if decode_view["seconds"] > 0 else None
    return {
        "kv_transfer": {"by_length": kv_rows, "overall": overall, "worst_ratio": worst,
                        "decode_worker_during_e2e": decode_view},
        "e2e": {"by_length": e2e_rows, "target_length": TARGET_LENGTH, "target_ratio": target_ratio},
        "targets": {"kv_over_socket": _check("kv_over_socket", worst),
                    "disaggregated_over_colocated_e2e": _check("disaggregated_over_colocated_e2e", target_ratio)},
        "target_values": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "notes": notes,
    }


def _framing(h) -> int:
    from dataclasses import asdict

    from fleetwise.worker.kv import transfer as kt
    head = json.dumps(asdict(h)).encode()
    return kt._PREAMBLE.size + len(head) + h.num_layers * kt._LAYER.size + kt._DONE.size
