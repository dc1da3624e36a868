"""The router's front door (router/front.py) as `fleetwise router` runs it, over a real
worker: every answer the same as the ASGI app's under uvicorn (the one the other router
tests serve), and what only a hand-written HTTP server has to get right: keep-alive,
pipelining, chunked bodies, limits on the request head, a client leaving mid-stream."""

import json
import socket
import time

import httpx
import pytest

from fleetwise.net import free_port
from fleetwise.procs import Process, fleetwise_argv
from fleetwise.procs import wait_healthy as wait_processes

from .workers import LOGS, start_router, start_worker, token_file, write_router_config


@pytest.fixture(scope="module")
def config(tiny_model_dir, tmp_path_factory):
    """A router config over one real worker."""
    from fleetwise.worker.engine.config import EngineConfig
    worker = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                       num_blocks=256))
    path = tmp_path_factory.mktemp("front") / "r.yaml"
    write_router_config(path, "tiny", mixed=[worker.internal_url])
    try:
        yield path
    finally:
        worker.stop()


def start_door(config, *flags: str) -> Process:
    """`fleetwise router` as it runs, with its front door."""
    port = free_port()
    door = Process("router", fleetwise_argv("router", "--config", str(config), "--port", str(port),
                                            "--internal-token-file", str(token_file()), *flags),
                   LOGS / f"router-{port}.log", f"http://127.0.0.1:{port}", die_with_parent=True).start()
    try:
        wait_processes([door], 60, interval=0.05)
    except BaseException:
        door.stop(grace=5)
        raise
    return door


@pytest.fixture(scope="module")
def fleet(config):
    asgi = start_router(config)
    door = start_door(config)
    try:
        yield door.url, asgi.url
    finally:
        door.stop(grace=5)
        asgi.stop()


def both(fleet, method: str, path: str, **kw) -> tuple[httpx.Response, httpx.Response]:
    door, asgi = fleet
    return tuple(httpx.request(method, url + path, timeout=60, **kw) for url in (door, asgi))  # type: ignore[return-value]


def same(a: httpx.Response, b: httpx.Response, body: bool = True) -> None:
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.headers.get("content-type") == b.headers.get("content-type")
    if body:
        assert a.content == b.content


def test_errors_and_other_routes_answer_as_the_asgi_app_does(fleet):
    rid = {"x-request-id": "abc-123"}
    cases = [
        ("POST", "/v1/completions", {"json": {"prompt": "hi"}, "headers": rid}),              # 400 model
        ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}),              # 404 model
        ("POST", "/v1/completions", {"content": b"{not json", "headers": rid}),                # 400 JSON
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": [], "stream": "yes"}}),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "hi", "n": 1000}}),   # 400 n
        ("GET", "/v1/completions", {}), ("GET", "/nope", {}), ("GET", "/openapi.json", {}),
        ("GET", "/v1/models", {}), ("HEAD", "/v1/models", {}),
    ]
    for method, path, kw in cases:
        a, b = both(fleet, method, path, **kw)
        same(a, b)
        if a.status_code >= 400 and path.startswith("/v1/c") and method == "POST":
            assert a.json()["error"]["message"], a.text
    a, b = both(fleet, "POST", "/v1/completions", json={"prompt": "hi"}, headers=rid)
    assert a.headers["x-request-id"] == b.headers["x-request-id"] == "abc-123"
    assert a.json()["error"]["param"] == "model"
    a, b = both(fleet, "GET", "/health")
    assert a.status_code == b.status_code == 200 and a.json()["models"] == b.json()["models"]
    a, _ = both(fleet, "GET", "/metrics")
    assert a.status_code == 200 and "fleetwise_router_requests_total" in a.text


def test_completions_and_streams_are_the_workers_answers(fleet):
    body = {"model": "tiny", "prompt": "the front door", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    a, b = both(fleet, "POST", "/v1/completions", json=body)
    same(a, b, body=False)
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # cached tokens differ: the second hits
        assert a.json()["usage"][key] == b.json()["usage"][key]
    a, b = both(fleet, "POST", "/v1/completions", json={**body, "stream": True})
    same(a, b, body=False)
    assert a.headers.get("transfer-encoding") == "chunked"

    def events(r: httpx.Response) -> list[str]:
        return [json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                if line.startswith("data: {")]
    text = both(fleet, "POST", "/v1/completions", json=body)[0].json()["choices"][0]["text"]
    assert events(a) == events(b) and "".join(events(a)) == text
    assert a.text.endswith("data: [DONE]\n\n") and "fw:" not in a.text


def _raw(url: str, data: bytes, timeout: float = 30) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_keep_alive_pipelining_chunked_bodies_and_bad_requests(fleet):
    door = fleet[0]
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    # two requests in one write, then a GET: answered in order on one connection
    out = _raw(door, post % (len(body), body) + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
               + post % (len(body), body))
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b'"object":"list"') > out.index(b'"text_completion"')
    # a chunked body, and a chunked body over the limit: 413 before all of it is sent
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
    assert _raw(door, chunked % (len(body), body)).startswith(b"HTTP/1.1 200 OK")
    big = b"x" * (1 << 20)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    out = _raw(door, head + b"".join(b"%x\r\n%s\r\n" % (len(big), big) for _ in range(17)) + b"0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b"body_too_large" in out
    declared = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 << 20)
    assert _raw(door, declared).startswith(b"HTTP/1.1 413")
    assert _raw(door, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * (70 << 10) + b"\r\n\r\n"
    assert _raw(door, huge).startswith(b"HTTP/1.1 431")
    with httpx.Client(base_url=door, timeout=30) as c:  # keep-alive: one connection, many requests
        for _ in range(5):
            assert c.post("/v1/completions", content=body).status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_place(fleet):
    door = fleet[0]
    body = json.dumps({"model": "tiny", "prompt": "leaving", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    host, port = door.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    assert httpx.get(door + "/health").json()["inflight"] == 1
    s.close()
    deadline = time.monotonic() + 20
    while httpx.get(door + "/health").json()["inflight"] != 0:
        assert time.monotonic() < deadline, "the stream's place was never freed"
        time.sleep(0.05)
