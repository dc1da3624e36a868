"""Soak: 1,000 requests, streamed and not, through `fleetwise up --prefill 2 --decode 2`
while three workers are killed (two decode, one prefill); the fleet starts them again.
Every request returns exactly its max_tokens tokens and no error; the migrations and the
gap a client sees at one (p50, p99 from the router's histogram) are printed. Minutes long:
`pytest -m soak`."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .workers import free_port, wait_healthy

REQUESTS, CONCURRENCY, MAX_TOKENS = 1000, 16, 96
KILLS = {150: "decode-0", 400: "prefill-0", 650: "decode-1"}  # after so many requests finished


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """A histogram's q-quantile, linear within its bucket (Prometheus' histogram_quantile)."""
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_buckets(text: str, name: str) -> list[tuple[float, float]]:
    found = re.findall(name + r'_bucket\{le="([^"]+)",model_name="tiny"\} (\S+)', text)
    return sorted((float(le), float(v)) for le, v in found)


@pytest.mark.soak
def test_a_thousand_requests_survive_three_killed_workers(tmp_path, tiny_model_dir):
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "fleetwise", "up", "--port", str(port), "--workdir", str(tmp_path),
                           "--model", str(tiny_model_dir), "--prefill", "2", "--decode", "2"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def fleet_whole() -> bool:
        roles = httpx.get(url + "/health", timeout=5).json()["models"]["tiny"]
        return roles.get("prefill") == 2 and roles.get("decode") == 2

    try:
        wait_healthy(url, 180, up)
        deadline = time.monotonic() + 180
        while not fleet_whole():
            assert time.monotonic() < deadline, "the fleet did not start"
            time.sleep(0.2)
        finished: list[int] = []

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, str]:
            stream = i % 2 == 0
            body = {"model": "tiny", "prompt": f"soak request {i} " + "context " * (i % 13), "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "temperature": 0, "stream": stream,
                    "stream_options": {"include_usage": True} if stream else None}
            r = await client.post(url + "/v1/completions", json=body)
            finished.append(i)
            if r.status_code != 200:
                return i, -1, r.text
            if not stream:
                return i, r.json()["usage"]["completion_tokens"], ""
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            errors = [e for e in events if "error" in e]
            if errors or not r.text.rstrip().endswith("data: [DONE]"):
                return i, -1, str(errors)
            return i, events[-1]["usage"]["completion_tokens"], ""

        async def killer() -> list[str]:
            killed = []
            for after, name in KILLS.items():
                while len(finished) < after:
                    await asyncio.sleep(0.05)
                while not await asyncio.to_thread(fleet_whole):  # the last one killed is back
                    await asyncio.sleep(0.2)
                pid = json.loads((tmp_path / "pids.json").read_text())[name]
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
            return killed

        async def run():
            sem = asyncio.Semaphore(CONCURRENCY)
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
                async def bounded(i):
                    async with sem:
                        return await one(client, i)
                kills = asyncio.create_task(killer())
                results = await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
                return results, await kills

        router_pid = json.loads((tmp_path / "pids.json").read_text())["router"]
        t0, cpu0 = time.monotonic(), cpu_seconds(router_pid)
        results, killed = asyncio.run(run())
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(router_pid) - cpu0
        bad = [(i, n, why) for i, n, why in results if n != MAX_TOKENS]
        text = httpx.get(url + "/metrics", timeout=10).text
        moved = sum(float(v) for v in re.findall(r'fleetwise_router_migrations_total\{[^}]*\} (\S+)', text))
        gaps = metric_buckets(text, "fleetwise_router_migration_gap_seconds")
        p50, p99 = quantile(gaps, 0.5), quantile(gaps, 0.99)
        print(f"\n{REQUESTS} requests in {elapsed:.0f} s, {len(killed)} workers killed, {moved:.0f} migrations, "
              f"gap p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {len(bad)} requests short or failed; "
              f"router CPU {cpu * 1e6 / (REQUESTS * MAX_TOKENS):.0f} us per relayed token (all its work)")
        assert not bad, bad[:5]
        assert killed == list(KILLS.values())
        assert moved > 0 and p99 < 2.0
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
