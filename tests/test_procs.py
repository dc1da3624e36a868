"""The process supervisor: health waits that fail fast with the log's tail, and stops that
escalate from SIGTERM to SIGKILL, group after group."""

import sys
import time

import pytest

from fleetwise.net import free_port
from fleetwise.procs import Process, ProcessError, stop_all, wait_healthy

# answers GET /health with 200 once started
SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

# ignores SIGTERM, then sleeps
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(600)
"""


def python(tmp_path, name: str, code: str, *args: str, url: str = "") -> Process:
    return Process(name, [sys.executable, "-c", code, *args], tmp_path / f"{name}.log", url)


def test_health_wait_returns_once_the_server_answers(tmp_path):
    port = free_port()
    p = python(tmp_path, "server", SERVER, str(port), url=f"http://127.0.0.1:{port}").start()
    try:
        seen = []
        assert wait_healthy([p], 30, interval=0.05, on_progress=lambda n, total: seen.append((n, total))) < 30
        assert seen[-1] == (1, 1)
        assert p.exited is None
    finally:
        p.stop(grace=5)
    assert p.exited is not None


def test_a_child_that_exits_fails_the_wait_at_once_with_its_log_tail(tmp_path):
    code = "import sys; print('line one'); print('cannot load the model', flush=True); sys.exit(3)"
    p = python(tmp_path, "broken", code, url=f"http://127.0.0.1:{free_port()}").start()
    t0 = time.monotonic()
    with pytest.raises(ProcessError) as e:
        wait_healthy([p], 60, interval=0.05)
    assert time.monotonic() - t0 < 20  # not the whole timeout
    assert e.value.procs == [p]
    message = str(e.value)
    assert "broken exited with 3" in message and "cannot load the model" in message and str(p.log) in message


def test_a_child_that_never_answers_fails_the_wait_when_the_time_is_up(tmp_path):
    p = python(tmp_path, "silent", STUBBORN, url=f"http://127.0.0.1:{free_port()}").start()
    try:
        with pytest.raises(ProcessError, match="silent not healthy after 1 s"):
            wait_healthy([p], 1.0, interval=0.05)
    finally:
        p.kill()
    assert p.exited is not None


def test_stop_escalates_to_sigkill_for_a_child_that_ignores_sigterm(tmp_path):
    p = python(tmp_path, "stubborn", STUBBORN).start()
    deadline = time.monotonic() + 30
    while "ignoring SIGTERM" not in p.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    stop_all([[p]], grace=0.5)
    assert time.monotonic() - t0 >= 0.5
    assert p.exited == -9  # SIGKILL: SIGTERM was ignored


def test_groups_stop_in_order(tmp_path):
    """The second group gets SIGTERM only once the first one is gone."""
    first = python(tmp_path, "first", STUBBORN).start()
    second = python(tmp_path, "second", "import time; time.sleep(600)").start()
    deadline = time.monotonic() + 30
    while "ignoring SIGTERM" not in first.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop_all([[first], [second]], grace=1.0)
    assert first.exited == -9 and second.exited == -15  # the first had to be killed; the second took SIGTERM


def test_a_process_started_elsewhere_can_be_waited_on(tmp_path):
    import subprocess
    popen = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    with pytest.raises(ProcessError, match="exited with 4"):
        wait_healthy([Process("elsewhere", [], None, f"http://127.0.0.1:{free_port()}", popen=popen)], 30,
                     interval=0.05)


def test_restarts_back_off_like_kubernetes_and_spare_what_was_stopped_on_purpose(tmp_path):
    from fleetwise.procs import Restarts
    crash = Process("crash", [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "crash.log").start()
    kept = Process("kept", [sys.executable, "-c", "pass"], tmp_path / "kept.log").start()
    never = Process("never", [sys.executable, "-c", "pass"], None)  # not started: nothing to restart
    crash.popen.wait()
    kept.popen.wait()
    r = Restarts(base=1.0, cap=4.0)
    starts = []
    t = 0.0
    while t < 20:
        for p in r.tick([crash, kept, never], t, keep_down=lambda p: p.name == "kept"):
            starts.append(t)
            p.popen.wait()
        t += 0.5
    assert starts == [1.0, 3.5, 8.0, 12.5, 17.0]  # waits 1, 2, 4, then the cap (polled every 0.5 s)
    assert r.count == {"crash": 5} and kept.popen.returncode == 0 and never.popen is None


def test_free_port_never_hands_out_a_port_twice_in_a_row(monkeypatch):
    """The OS may give the same port to two asks in a row (the first socket closed, nothing bound
    it yet): two workers started with them would race for it."""
    import collections

    import fleetwise.net as net
    picks = iter([41001, 41001, 41002])

    class Socket:
        def __init__(self, *args):
            self.port = next(picks)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)
    monkeypatch.setattr(net.socket, "socket", Socket)
    monkeypatch.setattr(net, "_RECENT", collections.deque(maxlen=16), raising=False)
    assert [net.free_port(), net.free_port()] == [41001, 41002]
