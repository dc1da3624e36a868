"""Fault switches for tests, drills and the benchmark: what a sick GPU or link does to a
worker, turned on and off at run time (`POST /internal/faults`, only on a worker started with
`--fault switches`). Off by default; every switch has an explicit bound.

A slow device (`slow_factor`) keeps the device busy for `slow_factor - 1` times the forward
pass's device time after it (`DeviceClock.burn`: GPU time on CUDA, the engine thread's CPU time
on the CPU), so device time grows against the work in the step, as on a GPU with a low clock,
and the detector sees it where it looks; `step_delay_seconds` sleeps that much more after each
step, whatever the work (a slow host, which no device clock sees; tests use it so that a stream
outlasts their reaction); a stall holds the engine loop
(the heartbeat stops, so /health turns 503); a slow KV link delays every pull from one
prefill worker; an XID error sets the modelled GPU's DCGM XID series."""

import threading
import time
from dataclasses import asdict, dataclass

from .device_clock import DeviceClock

MAX_SLOW_FACTOR = 20.0
MAX_STEP_DELAY_SECONDS = 1.0
MAX_STALL_SECONDS = 600.0
MAX_KV_DELAY_SECONDS = 30.0
MAX_XID = 1000


@dataclass(frozen=True)
class FaultSettings:
    slow_factor: float = 1.0       # 1: off
    step_delay_seconds: float = 0.0  # 0: off
    stall_seconds: float = 0.0     # from when it was set; 0: off
    kv_slow_peer: str | None = None  # a prefill worker's internal URL
    kv_delay_seconds: float = 0.0
    xid: int = 0                   # 0: none


class FaultSwitches:
    """Read by the engine thread and the HTTP side; set from the HTTP side."""

    def __init__(self) -> None:
        self.settings = FaultSettings()
        self.stall_until = 0.0
        self._lock = threading.Lock()

    def set(self, settings: FaultSettings) -> None:
        with self._lock:
            self.settings = settings
            self.stall_until = time.monotonic() + settings.stall_seconds if settings.stall_seconds else 0.0

    def view(self) -> dict:
        return asdict(self.settings) | {"stall_left_seconds": round(max(0.0, self.stall_until - time.monotonic()), 3)}

    def hold_stall(self) -> None:
        """Called by the engine before a step: sleeps out a stall that is on."""
        while (left := self.stall_until - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def after_forward(self, device_seconds: float, clock: DeviceClock) -> float:
        """Called by the engine after a forward pass of `device_seconds`: burns the slow
        device's extra time on `clock`, then sleeps a step delay; returns the device seconds
        burnt."""
        s = self.settings
        burnt = clock.burn(device_seconds * (s.slow_factor - 1.0)) if s.slow_factor > 1.0 else 0.0
        if s.step_delay_seconds > 0:
            time.sleep(s.step_delay_seconds)
        return burnt

    def kv_delay(self, peer: str) -> float:
        s = self.settings
        return s.kv_delay_seconds if s.kv_slow_peer and peer.rstrip("/") == s.kv_slow_peer.rstrip("/") else 0.0
