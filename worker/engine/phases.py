"""Where an engine step's time goes: scheduling, input preparation, the model's forward pass
alone, and sampling, each timed on its own (the engine's own step timing counts all but the
scheduling as "forward").

Off by default: the runner and the scheduler are timed only while a `PhaseClock` is attached
(`attach`), and then each phase costs two clock reads. On CUDA every lap synchronises the
device first, so a phase owns the kernels it launched (the forward pass is asynchronous
there); that changes the timing it measures a little, which is why it is not always on.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PHASES = ("schedule", "prepare", "forward", "sample")


@dataclass
class PhaseClock:
    """Seconds spent in each phase since attached, summed over the steps."""
    sync: Callable[[], None] | None = None  # torch.cuda.synchronize on CUDA
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _t: float = 0.0

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since `start` or the last lap goes to `phase`."""
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def attach(engine: Any) -> PhaseClock:
    """Times an `LLMEngine`'s phases from now on; `detach` stops it. (Any: the engine module
    imports this one.)"""
    device = engine.runner.device
    clock = PhaseClock(sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    engine.runner.clock = clock
    engine.scheduler.clock = clock
    return clock


def detach(engine: Any) -> None:
    engine.runner.clock = None
    engine.scheduler.clock = None
