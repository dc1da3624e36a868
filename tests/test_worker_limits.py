"""What one request may ask of a worker, against a real server: choices, prompts, stop
strings, logprobs and the body are bounded (400 naming the field, 413 for the body), and
every choice counts against the queue bound."""

import concurrent.futures as cf
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
import typer
from typer.testing import CliRunner

from fleetwise import defaults
from fleetwise.cli import app
from fleetwise.worker.api.openai import RequestLimits
from fleetwise.worker.engine.config import EngineConfig

from .workers import start_worker

LIMITS = RequestLimits(max_n=4, max_prompts=3, max_stop_strings=2, max_stop_chars=8, max_body_bytes=4096)


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                  num_blocks=512, max_logprobs=3), limits=LIMITS)
    yield w
    w.stop()


def post(worker, path, body):
    return httpx.post(worker.url + path, json=body, timeout=30)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "x", "max_tokens": 2}


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {**COMPLETION, "n": 5}, "n", "at most 4"),
    ("/v1/chat/completions", {**CHAT, "n": 5}, "n", "at most 4"),
    ("/v1/completions", {**COMPLETION, "n": 2, "best_of": 5}, "best_of", "at most 4"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c", "d"]}, "prompt", "at most 3 prompts"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1], [2], [3], [4]]}, "prompt", "at most 3 prompts"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c"]}, "stop", "at most 2 stop strings"),
    ("/v1/chat/completions", {**CHAT, "stop": "123456789"}, "stop", "at most 8 characters"),
    ("/v1/completions", {**COMPLETION, "logprobs": 4}, "logprobs", "at most 3"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 4}, "top_logprobs", "at most 3"),
])
def test_each_limit_is_a_400_naming_the_field(worker, path, body, param, words):
    r = post(worker, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_requests_at_the_limits_are_served(worker):
    r = post(worker, "/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 4, "best_of": 4,
                                         "stop": ["12345678", "z"], "logprobs": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 12
    r = post(worker, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    worker.wait_idle()


def test_a_large_body_gets_413_before_it_is_parsed(worker):
    big = {**COMPLETION, "prompt": "x" * 5000}
    r = post(worker, "/v1/completions", big)  # Content-Length says so
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "at most 4096 bytes" in err["message"] and r.headers["x-request-id"]
    # chunked: no Content-Length, the bytes read pass the limit
    chunks = (b'{"model": "tiny", "prompt": "' + b"x" * 1000 if i == 0 else b"x" * 1000 for i in range(6))
    r = httpx.post(worker.url + "/v1/completions", content=chunks, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "more than 4096 bytes" in r.json()["error"]["message"], r.text
    # a body under the limit, chunked, is handed on whole
    ok = (part for part in (b'{"model": "tiny", ', b'"prompt": "x", "max_tokens": 2}'))
    r = httpx.post(worker.url + "/v1/completions", content=ok, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text


def test_a_declared_large_body_is_refused_before_it_is_sent(worker):
    """Only the headers go out: the 413 comes back without waiting for 1 GB that never comes."""
    url = urlparse(worker.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 1000000000\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after the answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"request_too_large" in answer


def test_n_counts_against_the_queue_bound(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", max_waiting=4,
                                  max_num_seqs=1))
    gate = threading.Event()
    w.core.fault_hook = lambda batch: gate.wait(10)  # holds the engine inside a step
    try:
        r = post(w, "/v1/completions", {**COMPLETION, "n": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text  # never fits
        r = post(w, "/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 2})
        assert r.status_code == 400 and "6 sequences" in r.json()["error"]["message"], r.text
        with httpx.Client(timeout=30) as client, cf.ThreadPoolExecutor(2) as pool:
            held = pool.submit(client.post, w.url + "/v1/completions", json=COMPLETION)
            time.sleep(0.3)  # inside the held step: the queue is empty
            waiting = pool.submit(client.post, w.url + "/v1/completions", json={**COMPLETION, "n": 3})
            deadline = time.monotonic() + 5
            while w.engine.num_waiting() < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert w.engine.num_waiting() == 3
            full = post(w, "/v1/completions", {**COMPLETION, "n": 2})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full", full.text
            fits = pool.submit(client.post, w.url + "/v1/completions", json=COMPLETION)
            time.sleep(0.3)
            gate.set()
            assert [f.result().status_code for f in (held, waiting, fits)] == [200, 200, 200]
        w.wait_idle()
        assert w.engine.num_waiting() == 0
    finally:
        gate.set()
        w.stop()


def test_the_worker_options_take_their_defaults_from_defaults_py():
    worker = next(c for c in typer.main.get_command(app).commands.values() if c.name == "worker")
    options = {p.name: p.default for p in worker.params}
    for name in ("max_logprobs", "max_n", "max_body_mib"):
        assert options[name] == getattr(defaults, name.upper()), name
    limits = RequestLimits()
    assert (limits.max_n, limits.max_body_bytes) == (defaults.MAX_N, defaults.MAX_BODY_MIB << 20)
    assert EngineConfig(model="m").max_logprobs == defaults.MAX_LOGPROBS == 20
    bad = CliRunner().invoke(app, ["worker", "--model", "m", "--max-n", "0"])
    assert bad.exit_code != 0 and "--max-n" in bad.output
