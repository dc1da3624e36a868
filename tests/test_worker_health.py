"""A worker's health tells the truth about its engine, against real servers: steps that fail
every request turn /health to 503 (and, when asked, end the process), and calls into the
engine thread fail instead of hanging when its loop dies."""

import asyncio
import concurrent.futures as cf
import threading
import time

import httpx

from fleetwise.protocol import PROTOCOL_VERSION, VERSION_HEADER
from fleetwise.worker.engine.config import EngineConfig

from .workers import start_worker, start_worker_process

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 2}


def config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(model_dir), served_model_name="tiny", block_size=8, num_blocks=256, **kw)


def post(url: str, body: dict = BODY) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def test_health_turns_503_after_k_steps_in_a_row_fail_every_request(tiny_model_dir):
    w = start_worker(config(tiny_model_dir), health_failed_steps=3)

    def broken(batch):
        raise RuntimeError("injected: the GPU is gone")
    w.core.fault_hook = broken
    try:
        for i in range(3):
            assert httpx.get(w.url + "/health").status_code == 200, f"after {i} failed steps"
            r = post(w.url)
            assert r.status_code == 500 and "injected" in r.text, r.text
        health = httpx.get(w.url + "/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "failing"
        assert "3 engine steps" in health.json()["error"] and "the GPU is gone" in health.json()["error"]
        # the loop lives on: one step that serves a request makes it healthy again
        w.core.fault_hook = None
        assert post(w.url).status_code == 200
        assert httpx.get(w.url + "/health").status_code == 200
    finally:
        w.stop()


def test_a_step_where_some_requests_succeed_is_not_a_failed_step(tiny_model_dir):
    w = start_worker(config(tiny_model_dir), health_failed_steps=1)
    gate = threading.Event()
    # the engine thread waits between two steps until both requests are queued: one batch
    held = asyncio.run_coroutine_threadsafe(w.engine.call(gate.wait, 10), w.engine._loop)
    w.core.fault_hook = lambda batch: None if all(s.params.seed != 666 for s in batch.seqs) else 1 / 0
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            good = pool.submit(post, w.url, {**BODY, "max_tokens": 1})
            bad = pool.submit(post, w.url, {**BODY, "max_tokens": 1, "seed": 666})
            deadline = time.monotonic() + 5
            while w.engine.num_waiting() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            held.result(10)
            assert good.result().status_code == 200 and bad.result().status_code == 500
        assert w.core.failed_steps == 0, "one step served one request and failed the other"
        assert httpx.get(w.url + "/health").status_code == 200
    finally:
        gate.set()
        w.stop()


def test_the_process_exits_non_zero_when_asked_and_the_engine_fails(tiny_model_dir):
    proc = start_worker_process(tiny_model_dir, "mixed", "--fault", "fail-steps", "--health-failed-steps", "2",
                                "--exit-on-engine-failure")
    try:
        for _ in range(2):
            assert post(proc.url).status_code == 500
        deadline = time.monotonic() + 30
        while proc.exited is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.exited == 1, proc.tail()
        assert "the engine failed" in proc.tail()
    finally:
        proc.kill()


def test_without_the_flag_the_failing_process_stays_up_and_says_why(tiny_model_dir):
    proc = start_worker_process(tiny_model_dir, "mixed", "--fault", "fail-steps", "--health-failed-steps", "2")
    try:
        for _ in range(2):
            assert post(proc.url).status_code == 500
        time.sleep(1.0)  # longer than the watch interval
        assert proc.running
        health = httpx.get(proc.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failing"
    finally:
        proc.kill()


def test_calls_into_the_engine_thread_fail_when_its_loop_dies(tiny_model_dir):
    """A lease delete and a decode handoff wait on the engine thread; when its loop dies
    they get 503 at once, as does every call made afterwards, instead of hanging."""
    w = start_worker(config(tiny_model_dir))
    gate = threading.Event()

    def dying_schedule():
        gate.wait(10)
        raise RuntimeError("scheduler bug")
    w.core.scheduler.schedule = dying_schedule
    headers = {VERSION_HEADER: str(PROTOCOL_VERSION), **w.auth}
    ids = w.core.tokenizer.encode("hello")
    decode = {"kind": "completion", "request": BODY, "prompt_token_ids": ids, "first_token": ids[-1]}
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            stuck = pool.submit(post, w.url)  # the loop takes it in and blocks in schedule()
            deadline = time.monotonic() + 5
            while w.engine.busy_since is None and time.monotonic() < deadline:
                time.sleep(0.01)
            release = pool.submit(httpx.delete, w.internal_url + "/internal/kv/some-handle", headers=headers,
                                  timeout=10)
            handoff = pool.submit(httpx.post, w.internal_url + "/internal/decode", json=decode, headers=headers,
                                  timeout=10)
            time.sleep(0.3)  # both calls are queued behind the blocked step
            assert not release.done() and not handoff.done()
            gate.set()
            for f in (stuck, release, handoff):
                r = f.result()
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        after = httpx.delete(w.internal_url + "/internal/kv/another", headers=headers, timeout=5)
        assert after.status_code == 503, after.text
    finally:
        gate.set()
        w.stop()
