"""A soak through `fleetwise up` (`pytest -m soak`, not in the default run): 1,000 requests,
valid and invalid bodies mixed, from concurrent clients on loopback, while two workers are
killed (SIGKILL) midway. Every valid request ends with its tokens or a clear error (an
OpenAI error body, or a stream's error event then [DONE]); every invalid one with a 4xx and
an error body, unless it was in flight on a worker as it was killed (the router does not
read bodies; the worker would have refused it), which ends with a clear 502 instead; none
hangs past its deadline, and no 500 comes without an error body.

A killed worker stays dead here: the requests it held end with an error, and the router
sends the rest to the workers left. The counts are printed (`-s` shows them)."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .workers import free_port, wait_healthy

pytestmark = pytest.mark.soak

REQUESTS = 1000
CLIENTS = 16
DEADLINE = 60.0  # seconds one request may take before it counts as a hang
KILLS_AT = (0.3, 0.6)  # the share of requests finished when each worker is killed
KILLED = {"upstream_failed", "replica_failed"}  # the router's codes for a replica lost with the request in hand

GOOD = [
    ("/v1/completions", {"prompt": "the model serves tokens", "max_tokens": 8}),
    ("/v1/completions", {"prompt": "a prefill worker computes", "max_tokens": 6, "stream": True}),
    ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 4, "n": 2, "seed": 7}),
    ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": "power budgets", "max_tokens": 6, "n": 2, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "logprobs": True,
                              "top_logprobs": 2, "temperature": 0.7, "top_p": 0.9}),
]

NO_MODEL = {"prompt": "x"}
BAD: list[tuple[str, object]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", [1, 2]),
    ("/v1/completions", NO_MODEL),
    ("/v1/completions", {"model": "nope", "prompt": "x"}),         # no such model: 404
    ("/v1/completions", {"prompt": "x", "n": 0}),
    ("/v1/completions", {"prompt": "x", "n": "2"}),
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/completions", {"prompt": "x", "top_p": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "x", "stream": 0}),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": "x", "seed": 1 << 64}),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 100}),
    ("/v1/completions", {"prompt": "x", "n": 100000}),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}'),  # a lone surrogate
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
]


@dataclass
class Outcome:
    valid: bool
    kind: str  # ok | clean_error | 4xx | FAIL: ...


def body_of(path: str, spec: object, model: str) -> bytes:
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, dict) and "model" not in spec and spec is not NO_MODEL:
        spec = {"model": model, **spec}
    return json.dumps(spec).encode()


def has_error_body(r: httpx.Response) -> bool:
    try:
        error = r.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and bool(error["message"])


def judge_valid(r: httpx.Response, spec: dict) -> str:
    if r.status_code != 200:
        if 400 <= r.status_code < 500 and r.status_code != 429:
            return f"FAIL: a valid request got {r.status_code}: {r.text[:200]}"
        return "clean_error" if has_error_body(r) else f"FAIL: {r.status_code} without an error body: {r.text[:200]}"
    choices = spec.get("n", 1) * (len(spec["prompt"]) if isinstance(spec.get("prompt"), list)
                                  and isinstance(spec["prompt"][0], str) else 1)
    if not spec.get("stream"):
        got = r.json()["choices"]
        finished = [c for c in got if c["finish_reason"] in ("stop", "length")]
        if len(finished) != choices:
            return f"FAIL: {len(finished)} of {choices} choices finished: {r.text[:200]}"
        return "ok"
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.strip()]
    if not events or events[-1] != "[DONE]":
        return f"FAIL: a stream ended without [DONE]: {r.text[-200:]}"
    bodies = [json.loads(e) for e in events[:-1]]
    if any("error" in b for b in bodies):
        return "clean_error"
    finished = {c["index"] for b in bodies for c in b.get("choices", []) if c.get("finish_reason")}
    return "ok" if len(finished) == choices else f"FAIL: a stream finished {len(finished)} of {choices} choices"


async def one(client: httpx.AsyncClient, url: str, path: str, spec: object, valid: bool, model: str) -> Outcome:
    try:
        r = await asyncio.wait_for(client.post(url + path, content=body_of(path, spec, model),
                                               headers={"content-type": "application/json"}), DEADLINE)
    except TimeoutError:
        return Outcome(valid, f"FAIL: no answer in {DEADLINE} s")
    except httpx.HTTPError as e:
        return Outcome(valid, f"FAIL: {type(e).__name__}: {e}")
    if valid:
        assert isinstance(spec, dict)
        return Outcome(valid, judge_valid(r, spec))
    if 400 <= r.status_code < 500 and has_error_body(r):
        return Outcome(valid, "4xx")
    if r.status_code >= 500 and has_error_body(r) and r.json()["error"]["code"] in KILLED:
        # in flight on the worker when it was killed: the router does not read bodies, the worker would have
        return Outcome(valid, "clean_error")
    return Outcome(valid, f"FAIL: an invalid request got {r.status_code}: {r.text[:200]}")


async def drive(url: str, model: str, kill: list) -> tuple[list[Outcome], float]:
    rng = random.Random(0)
    work = [(*rng.choice(GOOD), True) if rng.random() < 0.6 else (*rng.choice(BAD), False) for _ in range(REQUESTS)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    outcomes: list[Outcome] = []
    kills = [int(share * REQUESTS) for share in KILLS_AT]
    t0 = time.monotonic()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path, spec, valid = queue.get_nowait()
            outcomes.append(await one(client, url, path, spec, valid, model))
            if kills and len(outcomes) >= kills[0]:
                kills.pop(0)
                kill.pop(0)()

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=DEADLINE + 5, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CLIENTS)))
    return outcomes, time.monotonic() - t0


def start_up(workdir: Path, model_dir: Path, mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    roles = ["--mixed", "3"] if mode == "colocated" else ["--prefill", "2", "--decode", "2"]
    log = (workdir / "up.out").open("w")
    up = subprocess.Popen([sys.executable, "-m", "fleetwise", "up", "--port", str(port), "--workdir", str(workdir),
                           "--mode", mode, "--model", str(model_dir), "--kv-cache-mib", "64", *roles],
                          stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 300, up)
    deadline = time.monotonic() + 300
    while "fleet ready" not in (workdir / "up.out").read_text():  # every worker healthy too
        assert up.poll() is None and time.monotonic() < deadline, (workdir / "up.out").read_text()[-2000:]
        time.sleep(0.2)
    return up, url


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode, victims", [("colocated", ["mixed-0", "mixed-1"]),
                                           ("disaggregated", ["prefill-0", "decode-0"])])
def test_soak_through_fleetwise_up_with_two_worker_kills(tmp_path, tiny_model_dir, mode, victims):
    up, url = start_up(tmp_path, tiny_model_dir, mode)
    try:
        pids = json.loads((tmp_path / "pids.json").read_text())
        killed: list[str] = []

        def killer(name: str):
            def kill() -> None:
                os.kill(pids[name], signal.SIGKILL)
                killed.append(name)
            return kill

        outcomes, seconds = asyncio.run(drive(url, tiny_model_dir.name, [killer(v) for v in victims]))
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
    counts = Counter(("valid " if o.valid else "invalid ") + (o.kind if not o.kind.startswith("FAIL") else "FAIL")
                     for o in outcomes)
    print(f"\nsoak {mode}: {len(outcomes)} requests in {seconds:.1f} s, killed {killed}: "
          f"{dict(sorted(counts.items()))}")
    failures = [o.kind for o in outcomes if o.kind.startswith("FAIL")]
    assert len(outcomes) == REQUESTS and killed == victims
    assert not failures, Counter(failures).most_common(5)
    # only what was in flight on a killed worker may end so (the router sends nothing more there)
    assert counts["invalid clean_error"] <= CLIENTS * len(victims), counts
    assert counts["valid ok"] > 0.5 * sum(o.valid for o in outcomes)  # the workers left serve
