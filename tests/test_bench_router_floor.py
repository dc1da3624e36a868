"""The router benchmark's reference proxies (bench/router/floor.py): the bare one passes the
backend's answer on whole; the one with migration's per-token work answers exactly what
fleetwise's router answers, because it asks for the same stream and assembles it the same
way. A backend that is gone is a 502, never a hang."""

import sys
import time

import httpx
import orjson
import pytest

from fleetwise.bench.router.backend import MODEL
from fleetwise.bench.router.cases import router_config
from fleetwise.bench.router.run import Servers
from fleetwise.net import free_port
from fleetwise.procs import fleetwise_argv
from fleetwise.up import write_token

BODY = orjson.dumps({"model": MODEL, "prompt": "the floor of a proxy", "max_tokens": 7})


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("floor"))
    backend = f"http://127.0.0.1:{free_port()}"
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    urls = {"backend": backend}
    servers.start("backend0", [sys.executable, "-m", "fleetwise.bench.router", "backend", "--port",
                               backend.rsplit(":", 1)[1]], backend)
    for name, extra in (("floor", []), ("floor_ids", ["--ids"]), ("floor_gone", [])):
        port = free_port()
        target = gone if name == "floor_gone" else backend
        urls[name] = f"http://127.0.0.1:{port}"
        servers.start(name, [sys.executable, "-m", "fleetwise.bench.router", "floor", "--port", str(port),
                             "--backend", target, *extra], urls[name])
    cfg = servers.logdir / "router.yaml"
    router_config(cfg, [backend])
    port = free_port()
    urls["router"] = f"http://127.0.0.1:{port}"
    servers.start("router", fleetwise_argv("router", "--config", str(cfg), "--port", str(port),
                                           "--internal-token-file", str(write_token(cfg.parent))), urls["router"])
    try:
        for name in ("backend0", "floor", "floor_ids", "router"):
            servers.wait_ready(name, BODY)
        yield urls
    finally:
        servers.stop_all()


def post(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", content=BODY, headers={"content-type": "application/json"}, timeout=10)


def test_the_bare_floor_passes_the_answer_on_whole(servers):
    direct, floor = post(servers["backend"]), post(servers["floor"])
    assert floor.status_code == direct.status_code == 200
    assert floor.content == direct.content


def test_the_floor_with_ids_answers_what_the_router_assembles(servers):
    routed, floor = post(servers["router"]), post(servers["floor_ids"])
    assert floor.status_code == routed.status_code == 200
    assert floor.content == routed.content
    answer = floor.json()
    assert answer["choices"][0]["text"] == " tok" * 7  # the stand-in's seven events, assembled
    assert answer["usage"]["completion_tokens"] == 7


def test_a_backend_that_is_gone_is_a_502(servers):
    r = post(servers["floor_gone"])
    assert r.status_code == 502
    assert "cannot connect" in r.json()["error"]


@pytest.mark.parametrize("itl_s, per_token, lines", [(0.0, False, 2), (0.05, False, 4), (0.25, False, 13),
                                                     (0.0, True, 13)])
def test_the_stand_in_holds_a_coalesced_streams_ids_as_a_worker_does(itl_s, per_token, lines):
    """The first token's line at once, then one line per quarter second of tokens (none
    written in between) and the rest at the end: every id once, in order, the text whole.
    As a worker of the release before: a line per token."""
    from fleetwise.bench.router.backend import stream_events
    from fleetwise.router.assemble import _Answer
    from fleetwise.router.tracker import Tracker

    pieces = stream_events(13, True, True, coalesce=True, itl_s=itl_s, ids_per_token=per_token)
    assert len(pieces) == 13 and sum(1 for p in pieces if p.startswith(b"fw: ")) == lines
    tracker, answer = Tracker(1 << 17), _Answer("completion")
    answer.take(tracker.feed(b"".join(p % 0.0 for p in pieces if p)))
    assert tracker.done and tracker.choices[0].token_ids == list(range(7, 20)) and tracker.choices[0].finished
    assert orjson.loads(answer.whole())["choices"][0]["text"] == " tok" * 13


def test_a_paced_stand_in_answers_whole_when_a_stream_of_as_many_tokens_ends(tmp_path):
    """At `--itl-ms`, a completion answered whole takes as long as the stream of as many
    tokens (the same ticker writes both), and holds that many tokens."""
    servers = Servers(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    servers.start("paced", [sys.executable, "-m", "fleetwise.bench.router", "backend", "--port",
                            url.rsplit(":", 1)[1], "--itl-ms", "10"], url)
    try:
        servers.wait_ready("paced", BODY)
        body = {"model": MODEL, "prompt": "paced", "max_tokens": 20}
        with httpx.Client(timeout=10) as client:
            took = {}
            for stream in (False, True, False, True):
                t0 = time.perf_counter()
                r = client.post(url + "/v1/completions", json={**body, "stream": stream})
                took.setdefault(stream, []).append(time.perf_counter() - t0)
                assert r.status_code == 200
                if not stream:
                    answer = r.json()
                    assert answer["usage"]["completion_tokens"] == 20 and answer["choices"][0]["text"] == " tok" * 20
                else:
                    assert r.text.count("data: {") == 20
        whole, streamed = min(took[False]), min(took[True])
        assert whole >= 0.19 and streamed >= 0.19  # 19 ticks of 10 ms after the first token
        assert abs(whole - streamed) < 0.05
    finally:
        servers.stop_all()


def test_the_benchmarks_servers_never_import_from_the_working_directory(tmp_path, monkeypatch):
    """A `--baseline-python` router started from a checkout runs its own install's code,
    not the checkout's: the working directory is not on a server's import path."""
    (tmp_path / "fleetwise").mkdir()
    (tmp_path / "fleetwise" / "__init__.py").write_text("raise SystemExit('imported the checkout')\n")
    monkeypatch.chdir(tmp_path)
    servers = Servers(tmp_path / "logs")
    p = servers.start("probe", [sys.executable, "-c", "import fleetwise, os; print('from', os.path.dirname("
                                                      "fleetwise.__file__))"], "")
    assert p.popen is not None and p.popen.wait(timeout=60) == 0
    printed = (tmp_path / "logs" / "probe.log").read_text()
    assert "imported the checkout" not in printed and str(tmp_path / "fleetwise") not in printed
