"""Child processes that fleetwise starts on one machine (`fleetwise up`, the test control
plane, the benchmarks, the tests): start one in its own session with its log file, wait
until its HTTP health URL answers, stop a group of them in order.

Each child gets its own session (and process group): the terminal's Ctrl-C reaches only the
parent, which then stops the children in the order it chooses instead of all of them dying
at once mid-request; a signal sent to the group also reaches what the child started."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

import httpx


def fleetwise_argv(*args: str) -> list[str]:
    """The command line of `fleetwise ARGS` run by this interpreter."""
    return [sys.executable, "-m", "fleetwise", *args]


def answers_200(url: str, body: bytes | None = None, timeout: float = 1.0) -> bool:
    """GET `url` (POST `body` as JSON, when given) answered 200."""
    try:
        if body is None:
            return httpx.get(url, timeout=timeout).status_code == 200
        return httpx.post(url, content=body, headers={"content-type": "application/json"},
                          timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent ends, even if it is killed outright."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Process:
    """One child: its command, its log file and the base URL of its HTTP server, if any.
    `popen` may also be a process started elsewhere, to wait on its health."""
    name: str
    argv: list[str]
    log: Path | None
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    die_with_parent: bool = False                      # Linux: ends when the parent dies
    popen: subprocess.Popen | None = None

    def start(self) -> Self:
        """Starts the command, stdout and stderr appended to the log."""
        preexec = _die_with_parent if self.die_with_parent and sys.platform.startswith("linux") else None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") if self.log is not None else open(os.devnull, "wb") as out:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env} if self.env else None,
                                          start_new_session=True, preexec_fn=preexec)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def exited(self) -> int | None:
        """The exit code once it has ended, else None (also before it started)."""
        return self.popen.poll() if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def healthy(self) -> bool:
        return answers_200(self.url + "/health")

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        if self.log is None or not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """`sig` to its process group: the child and whatever it started."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL now, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, grace: float = 10.0) -> None:
        stop_all([[self]], grace)


@dataclass
class Restarts:
    """Kubernetes' `restartPolicy: Always` for local children: one that exited is started
    again after a back-off that doubles from `base` up to `cap` (as CrashLoopBackOff), and
    falls back to `base` once a start has run `reset_after` seconds."""
    base: float = 1.0
    cap: float = 300.0
    reset_after: float = 600.0
    delay: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)     # when an exited child starts again
    started: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def tick(self, procs: Sequence[Process], now: float, keep_down: Callable[[Process], bool] = lambda p: False,
             ) -> list[Process]:
        """Starts the exited children whose back-off is over (not those `keep_down` names:
        stopped on purpose); returns them."""
        restarted = []
        for p in procs:
            if p.running:
                if now - self.started.get(p.name, now) >= self.reset_after:
                    self.delay.pop(p.name, None)
                continue
            if p.popen is None or keep_down(p):
                self.due.pop(p.name, None)
                continue
            if p.name not in self.due:
                delay = self.delay.get(p.name, self.base)
                self.due[p.name] = now + delay
                self.delay[p.name] = min(self.cap, delay * 2)
            elif now >= self.due[p.name]:
                del self.due[p.name]
                p.start()
                self.started[p.name] = now
                self.count[p.name] = self.count.get(p.name, 0) + 1
                restarted.append(p)
        return restarted


class ProcessError(RuntimeError):
    """Processes that exited, or were not healthy in time; the message holds each one's log tail."""

    def __init__(self, procs: Sequence[Process], why: str):
        self.procs = list(procs)
        super().__init__("\n".join(self._line(p, why) for p in procs))

    @staticmethod
    def _line(p: Process, why: str) -> str:
        line = f"{p.name} {why}" + ("" if p.exited is None else f" with {p.exited}")
        return line if p.log is None else f"{line}; last lines of {p.log}:\n{p.tail()}"


P = TypeVar("P", bound=Process)


def wait_healthy(procs: Sequence[P], timeout: float, *, ready: Callable[[P], bool] = Process.healthy,
                 interval: float = 0.2, on_progress: Callable[[int, int], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> float:
    """Until `ready` holds for every process (default: its /health answers 200); returns
    the seconds it took. Raises ProcessError as soon as one of them exits, and when the time
    is up; returns early when `cancelled()` turns true."""
    t0 = time.monotonic()
    pending = list(procs)
    while not cancelled():
        dead = [p for p in procs if p.exited is not None]
        if dead:
            raise ProcessError(dead, "exited")
        pending = [p for p in pending if not ready(p)]
        if on_progress:
            on_progress(len(procs) - len(pending), len(procs))
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            raise ProcessError(pending, f"not healthy after {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - t0


def stop_all(groups: Sequence[Sequence[Process]], grace: float = 10.0) -> None:
    """Group after group: SIGTERM to every running process of the group, then SIGKILL to
    those still running `grace` seconds later; the next group once this one is gone."""
    for group in groups:
        live = [p for p in group if p.running]
        for p in live:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            assert p.popen is not None
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
