"""The front door's limits on client connections (router/http1.py, router/front.py), with raw
sockets against `fleetwise router`: a head or a body that never arrives whole (slowloris),
a connection that sends nothing, an idle keep-alive connection, the cap on open connections
reached and freed."""

import json
import socket
import time

import pytest

from .test_router_front import config, start_door  # noqa: F401  # `config` is a fixture

LIMIT_S = 2.0  # the head, body and keep-alive timeouts of the router under test


@pytest.fixture(scope="module")
def tight(config):  # noqa: F811
    door = start_door(config, "--head-timeout", str(LIMIT_S), "--body-timeout", str(LIMIT_S),
                      "--keep-alive-timeout", str(LIMIT_S))
    try:
        yield door.url
    finally:
        door.stop(grace=5)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _until_closed(s: socket.socket, trickle: bytes = b"", every: float = 0.1) -> tuple[bytes, float]:
    """What the server sends until it closes, and the seconds that took; `trickle` sent a
    byte at a time meanwhile (a slow client)."""
    t0 = time.monotonic()
    out = b""
    s.settimeout(every)
    while time.monotonic() - t0 < 30:
        if trickle:
            try:
                s.sendall(trickle[:1])
            except OSError:
                pass
            trickle = trickle[1:]
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out, time.monotonic() - t0


def test_a_head_that_never_arrives_whole_gets_408_and_silence_is_closed(tight):
    with _connect(tight) as s:  # connects and sends nothing: closed without an answer
        out, took = _until_closed(s)
    assert out == b"" and LIMIT_S * 0.9 <= took < LIMIT_S + 10
    with _connect(tight) as s:  # slowloris: a header a byte at a time, never the end of the head
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        out, took = _until_closed(s, trickle=b"X-Slow: " + b"y" * 400)
    assert out.startswith(b"HTTP/1.1 408"), out
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert b"head" in out and LIMIT_S * 0.9 <= took < LIMIT_S + 10


def test_a_body_that_never_arrives_whole_gets_408(tight):
    with _connect(tight) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        out, took = _until_closed(s, trickle=b" " * 50)
    assert out.startswith(b"HTTP/1.1 408") and b"body" in out, out
    assert LIMIT_S * 0.9 <= took < LIMIT_S + 10


def test_an_idle_keep_alive_connection_closes_and_a_busy_one_does_not(tight):
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with _connect(tight) as s:
        for _ in range(3):  # requests spaced under the limit keep the connection
            s.sendall(post)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
            time.sleep(LIMIT_S / 4)
        out, took = _until_closed(s)
    assert out == b"" and LIMIT_S * 0.5 <= took < LIMIT_S + 10


def test_connections_beyond_the_cap_get_503_until_one_closes(config):  # noqa: F811
    door = start_door(config, "--max-connections", "3")
    held = [_connect(door.url) for _ in range(3)]
    try:
        time.sleep(0.3)  # accepted
        with _connect(door.url) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            out, _ = _until_closed(s)
        assert out.startswith(b"HTTP/1.1 503"), out
        error = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_connections" and "3" in error["message"]
        assert b"retry-after: 1" in out.lower()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the freed place is taken again
            with _connect(door.url) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                out, _ = _until_closed(s)
            if out.startswith(b"HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        door.stop(grace=5)
