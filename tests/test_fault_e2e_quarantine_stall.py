"""Acting on a sick worker of a real local fleet (four mixed worker processes behind the
router, the fault loop against a real Prometheus, as `fleetwise up --detect-faults` runs them):

- a worker quarantined while streams run on it: every stream finishes with all its tokens (those
  on it finish there), and the requests sent after the router has seen the quarantine never
  reach it (its own request counter does not move);
- a stalled engine loop: its health check turns 503 and the router takes it out, the loop's hard
  signal (the engine heartbeat) makes it an incident at once, and the loop quarantines and
  restarts it; windows go on being decided while the restart runs; it comes back serving, its
  switches off."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetwise.controllers.faults import Incident
from fleetwise.fault_signals import STALL_SECONDS
from fleetwise.fleet import Routability, WorkerRef

from .detecting_fleet import detecting_fleet
from .test_fault_loop_e2e import load
from .workers import AUTH

pytestmark = pytest.mark.slow
WINDOW = 10            # seconds: the FaultPolicy's least
HEALTH_STALL = 3       # seconds without an engine step before /health turns 503
STREAMS = 12
TOKENS = 200
STEP_DELAY = {"step_delay_seconds": 0.02}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("faults-e2e")
    with detecting_fleet(workdir, tiny_model_dir, "colocated", (0, 0, 4), WINDOW,
                         ("--health-stall-seconds", str(HEALTH_STALL))) as running:
        yield running


def finished(url: str) -> float:
    """Requests the worker finished, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total{[^}]*} (\S+)$", text, re.M))


def health(url: str) -> tuple[int, dict]:
    try:
        r = httpx.get(url + "/health", timeout=2)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError):
        return 0, {}


def stream(router: str, i: int) -> tuple[int, str | None]:
    """One streamed completion through the router: (completion tokens, finish reason)."""
    body = {"model": "tiny", "prompt": f"{i} stream through a quarantine " * 2, "max_tokens": TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, reason = 0, None
    with httpx.stream("POST", router + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                reason = choice.get("finish_reason") or reason
    return tokens, reason


def test_streams_on_a_quarantined_worker_finish_and_new_requests_avoid_it(fleet):
    fleet, procs, _ = fleet
    router, name, on_it = procs[-1].url, None, 0
    for w in fleet.workers.values():  # every step of every worker 20 ms longer: a stream lasts seconds
        assert httpx.post(w.internal_url + "/internal/faults", json=STEP_DELAY, headers=AUTH,
                          timeout=10).status_code == 200
    before = {n: finished(w.url) for n, w in fleet.workers.items()}
    with ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(stream, router, i) for i in range(STREAMS)]
        deadline = time.monotonic() + 30
        while name is None and time.monotonic() < deadline:  # the first worker seen with streams on it
            for n in ("mixed-2", "mixed-3", "mixed-0"):  # mixed-1 is the next test's
                if (on_it := health(fleet.workers[n].url)[1].get("running", 0)) >= 1:
                    name = n
                    break
        assert name is not None, "no stream reached a worker"
        target = fleet.workers[name]
        fleet.quarantine(WorkerRef(name), "streams in flight on a quarantined worker")
        results = [s.result(timeout=120) for s in streams]
    for w in fleet.workers.values():
        assert httpx.post(w.internal_url + "/internal/faults", json={}, headers=AUTH, timeout=10).status_code == 200
    after_streams = finished(target.url)
    print(f"{on_it} streams on {name} when it was quarantined; it finished {after_streams - before[name]}")
    assert results == [(TOKENS, "length")] * STREAMS  # every stream, all its tokens
    assert after_streams - before[name] >= on_it  # those on it finished there
    time.sleep(2)  # the router re-reads its file each probe round (1 s)
    others = sum(finished(w.url) for n, w in fleet.workers.items() if n != name)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: httpx.post(router + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": f"{i} after the quarantine", "max_tokens": 4}), range(16)))
    assert [r.status_code for r in answers] == [200] * 16
    assert finished(target.url) == after_streams  # none reached it
    assert sum(finished(w.url) for n, w in fleet.workers.items() if n != name) == others + 16
    fleet.restore(WorkerRef(name), "the test is over")
    assert fleet.state(WorkerRef(name)).state is Routability.SERVING


def _into_the_stall(url: str) -> None:
    try:
        httpx.post(url + "/v1/completions", timeout=120, json={"model": "tiny", "prompt": "into the stall",
                                                               "max_tokens": 4})
    except httpx.HTTPError:
        pass


def test_a_stalled_engine_fails_its_health_check_and_the_loop_quarantines_and_restarts_it(fleet):
    fleet, procs, faults = fleet
    loop, router, sick = faults.loop, procs[-1].url, fleet.workers["mixed-1"]
    incidents: list[tuple[float, Incident]] = []
    loop.on_incident = lambda inc: incidents.append((time.monotonic(), inc))
    stop = threading.Event()
    driver = threading.Thread(target=load, args=(router, stop), daemon=True)
    driver.start()
    try:
        time.sleep(2)
        r = httpx.post(sick.internal_url + "/internal/faults", json={"stall_seconds": 300}, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        # the stall holds the engine at its next step: a request in flight gives it one (the
        # restart then drops that request's connection, as a restart does)
        threading.Thread(target=_into_the_stall, args=(sick.url,), daemon=True).start()
        unhealthy, windows_while_restarting, seen = None, 0, loop.last
        while time.monotonic() - t0 < 150:
            if unhealthy is None and health(sick.url)[0] == 503:
                unhealthy = time.monotonic() - t0
            if loop.last is not seen:
                seen = loop.last
                windows_while_restarting += any(r.action.verb == "RestartPod" for r in loop.running)
            if any(d.action.verb == "RestartPod" for d in loop.done):
                break
            time.sleep(0.2)
        mine = [(t - t0, inc) for t, inc in incidents if inc.target == "mixed-1"]
        done = [(d.action.verb, d.action.target, d.outcome) for d in loop.done]
        restart = next((d for d in loop.done if d.action.verb == "RestartPod"), None)
        print(f"/health 503 after {unhealthy} s; incident after {mine[0][0] if mine else None} s; actions {done}; "
              f"restart took {restart.seconds if restart else None} s, {windows_while_restarting} windows meanwhile")
        assert unhealthy is not None and unhealthy <= HEALTH_STALL + 5, "the health check never failed"
        assert mine and str(mine[0][1].evidence.get("hard", "")).startswith("engine loop stalled for"), incidents
        assert mine[0][0] <= STALL_SECONDS + 2 * WINDOW + 5
        assert done == [("Quarantine", "mixed-1", "done"), ("RestartPod", "mixed-1", "done")]
        if restart is not None and restart.seconds > WINDOW + 3:  # a window fell inside the restart
            assert windows_while_restarting >= 1
        assert fleet.states["mixed-1"].state is Routability.SERVING
        view = httpx.get(sick.internal_url + "/internal/faults", headers=AUTH, timeout=10).json()
        assert view["stall_left_seconds"] == 0 and health(sick.url)[0] == 200
        answer = httpx.post(router + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "back",
                                                                           "max_tokens": 4})
        assert answer.status_code == 200
    finally:
        stop.set()
        driver.join(timeout=60)
