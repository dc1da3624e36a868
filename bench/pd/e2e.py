"""The pd benchmark's end-to-end measurement: the same prompts through a router over a
prefill and a decode worker (disaggregated) and through a router over one mixed worker
(colocated); streamed completions, greedy, EOS ignored, so both do the same work. The two
modes alternate request by request. The decode worker's own metrics tell how long each
disaggregated request's KV pull took."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID

from fleetwise.bench.models import prompt_token_ids
from fleetwise.bench.pd.kv import stats

MODES = ("disaggregated", "colocated")


class Prompts:
    """Random token-id prompts, never repeated, without special tokens."""

    def __init__(self, model_dir: Path, seed: int = 0):
        self.allowed = prompt_token_ids(model_dir)
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


async def complete(http: Any, router_url: str, model: str, prompt: list[int], max_tokens: int) -> E2EResult:
    """One streamed completion through a router: its end-to-end time, time to first token, text."""
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


def _metric_values(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def kv_counters(http: Any, url: str) -> dict[str, float]:
    """The decode worker's own view of its pulls: seconds, count, bytes, recomputes."""
    r = await http.get(url + "/metrics")
    vals = _metric_values(r.text)

    def total(name: str, **want: str) -> float:
        return sum(v for (n, labels), v in vals.items()
                   if n == name and all(dict(labels).get(k) == w for k, w in want.items()))
    return {"seconds": total("fleetwise_kv_transfer_seconds_sum"),
            "pulls": total("fleetwise_kv_transfer_seconds_count"),
            "bytes": total("fleetwise_kv_transfer_bytes_total", direction="received"),
            "recomputes": total("fleetwise_kv_recomputes_total")}


async def measure_e2e(http: Any, routers: dict[str, str], decode_url: str, name: str, prompts: Prompts,
                      lengths: list[int], repeats: int, max_tokens: int, progress: Progress, task: TaskID,
                      notes: list[str]) -> dict[str, dict[str, list[E2EResult]]]:
    """`repeats` prompts of each length through both routers, the order alternating."""
    runs: dict[str, dict[str, list[E2EResult]]] = {}
    for L in lengths:
        runs[str(L)] = {m: [] for m in MODES}
        for i in range(repeats):
            prompt = prompts.new(L)
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                progress.update(task, description=f"end to end {L}: {mode} {i + 1}/{repeats}")
                if mode == "disaggregated":
                    c0 = await kv_counters(http, decode_url)
                res = await complete(http, routers[mode], name, prompt, max_tokens)
                if mode == "disaggregated":
                    c1 = await kv_counters(http, decode_url)
                    if c1["pulls"] > c0["pulls"]:
                        res.kv_seconds = c1["seconds"] - c0["seconds"]
                    res.kv_bytes = c1["bytes"] - c0["bytes"]
                    res.recomputed = c1["recomputes"] - c0["recomputes"]
                if res.completion_tokens != max_tokens:
                    notes.append(f"{mode} {L}: {res.completion_tokens} completion tokens, not {max_tokens}")
                runs[str(L)][mode].append(res)
                progress.advance(task)
    return runs


def e2e_row(by_mode: dict[str, list[E2EResult]]) -> dict:
    """One length's row in the result: each mode's times, and disaggregated over colocated."""
    row: dict[str, Any] = {}
    for mode, rs in by_mode.items():
        row[mode] = {"e2e_s": stats([r.e2e_s for r in rs]), "ttft_s": stats([r.ttft_s for r in rs]),
                     "e2e_trials_s": [r.e2e_s for r in rs], "ttft_trials_s": [r.ttft_s for r in rs],
                     "completion_tokens": [r.completion_tokens for r in rs]}
    d = by_mode["disaggregated"]
    pulls = [r.kv_seconds for r in d if r.kv_seconds is not None]
    kvb = [r.kv_bytes or 0.0 for r in d if r.kv_seconds is not None]
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
    return row
